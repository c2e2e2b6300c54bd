-- Re-claims (resetting their idle time) the entries still pending to this consumer.
-- KEYS: the stream. ARGV: 1 group, 2 consumer, 3.. entries. Returns the entries that are not
-- (another consumer took them over, or they are gone).
local lost = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost

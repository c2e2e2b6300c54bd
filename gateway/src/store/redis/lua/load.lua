-- Reads a record (by id, or through the live index), and the failed checks.
-- KEYS: record, live, failed checks (a placeholder where unused).
-- ARGV: whether to read the record and the live index (`1`/`0`), the failed checks (`1`, `0`,
-- or `R`: those of the record's phone), the record key prefix of the group, the failed-checks
-- key prefix of the group.
local live = false
local rkey = false
if ARGV[1] == '1' then rkey = KEYS[1] end
if ARGV[2] == '1' then
  live = redis.call('GET', KEYS[2])
  if live and not rkey then rkey = ARGV[4] .. live end
end
local rev, blob, phone = false, false, false
if rkey then
  local fields = redis.call('HMGET', rkey, 'r', 'b', 'p')
  rev, blob, phone = fields[1], fields[2], fields[3]
end
local failed = false
if ARGV[3] == '1' then
  failed = redis.call('GET', KEYS[3])
elseif ARGV[3] == 'R' and phone then
  failed = redis.call('GET', ARGV[5] .. phone)
end
return {live or '', rev or '', blob or '', failed or ''}

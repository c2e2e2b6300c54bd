-- Writes a call's changes if the record (and live index) are as read.
-- KEYS: 1 record, 2 live, 3 failed checks, 4 deadlines, 5 stream to add to, 6 stream to
-- acknowledge in, 7 the webhook outbox stream, 8 the delay watches, 9.. the phone's limit
-- keys.
-- ARGV: 1 expected revision ('' = absent, '*' = unchecked), 2 record ('' = unchanged), 3 keep ms,
-- 4 expected live ('*' = unchecked, '' = absent), 5 live op ('', S, D), 6 live id,
-- 7 failed op ('', S, D), 8 failed value, 9 failed keep ms, 10 deadline op ('', A, R),
-- 11 deadline, 12 member, 13 job ('' = none), 14 entry to acknowledge ('' = none),
-- 15 consumer group, 16 phone rules ('T,tau;…', '' = none), 17 clock offset ms, 18 the
-- record's phone digits, 19 a delay watch's due time ('' = none), 20 its member, 21 a delay
-- watch to remove ('' = none; the events are written only if it was there), 22 an entry of
-- KEYS[6] that must be pending to consumer 23 ('' = none), 24 the failed checks as read ('*' =
-- unchecked, '' = absent), 25 webhook events, then each event's client, kind, id and body.
-- Returns {1, revision, entry} | {0} (conflict) | {2, retry ms, rule} | {3} (entry not ours).
if ARGV[22] ~= '' then
  local pending = redis.call('XPENDING', KEYS[6], ARGV[15], ARGV[22], ARGV[22], 1)
  if (not pending[1]) or pending[1][2] ~= ARGV[23] then return {3} end
  redis.call('XCLAIM', KEYS[6], ARGV[15], ARGV[23], 0, ARGV[22], 'JUSTID')
end
if ARGV[24] ~= '*' then
  local failed = redis.call('GET', KEYS[3])
  if ARGV[24] == '' then
    if failed then return {0} end
  elseif failed ~= ARGV[24] then
    return {0}
  end
end
local rev = redis.call('HGET', KEYS[1], 'r')
if ARGV[1] == '' then
  if rev then return {0} end
elseif ARGV[1] ~= '*' and rev ~= ARGV[1] then
  return {0}
end
if ARGV[4] ~= '*' then
  local live = redis.call('GET', KEYS[2])
  if ARGV[4] == '' then
    if live then return {0} end
  elseif live ~= ARGV[4] then
    return {0}
  end
end
if ARGV[16] ~= '' then
  local refused = gcra(ARGV[16], 9, ARGV[17])
  if refused then return refused end
end
local newrev = tonumber(rev) or 0
if ARGV[2] ~= '' then
  newrev = redis.call('HINCRBY', KEYS[1], 'r', 1)
  redis.call('HSET', KEYS[1], 'b', ARGV[2], 'p', ARGV[18])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if ARGV[5] == 'S' then
  redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[3])
elseif ARGV[5] == 'D' then
  if redis.call('GET', KEYS[2]) == ARGV[6] then redis.call('DEL', KEYS[2]) end
end
if ARGV[7] == 'S' then
  redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[9])
elseif ARGV[7] == 'D' then
  redis.call('DEL', KEYS[3])
end
if ARGV[10] == 'A' then
  redis.call('ZADD', KEYS[4], ARGV[11], ARGV[12])
elseif ARGV[10] == 'R' then
  redis.call('ZREM', KEYS[4], ARGV[12])
end
local entry = ''
if ARGV[13] ~= '' then
  entry = redis.call('XADD', KEYS[5], '*', 'j', ARGV[13])
end
if ARGV[14] ~= '' then
  redis.call('XACK', KEYS[6], ARGV[15], ARGV[14])
  redis.call('XDEL', KEYS[6], ARGV[14])
end
if ARGV[19] ~= '' then
  redis.call('ZADD', KEYS[8], ARGV[19], ARGV[20])
end
local announce = true
if ARGV[21] ~= '' then
  announce = redis.call('ZREM', KEYS[8], ARGV[21]) == 1
end
for e = 0, (announce and tonumber(ARGV[25]) or 0) - 1 do
  local at = 26 + e * 4
  redis.call('XADD', KEYS[7], '*', 'c', ARGV[at], 'k', ARGV[at + 1], 'i', ARGV[at + 2], 'b', ARGV[at + 3])
end
return {1, newrev, entry}

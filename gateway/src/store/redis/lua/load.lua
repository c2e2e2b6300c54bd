-- Reads a record (by id, or through the live index), and the failed checks.
-- Its keys and arguments are named in the block below, in the order of LOAD_NAMES in txn.rs
-- (a test there checks that the two agree). A key that is not read is a placeholder.
-- Returns {live id, revision, record, failed checks}, '' for each that is absent.
local record_key = KEYS[1]
local live_key = KEYS[2]
local failed_key = KEYS[3]
local read_record = ARGV[1] -- '1' / '0'
local read_live = ARGV[2] -- '1' / '0'
local read_failed = ARGV[3] -- '1', '0', or 'R': those of the record's phone and client
local records_of = ARGV[4] -- what the group's record keys start with
local failed_of = ARGV[5] -- what the group's failed-checks keys start with (the record's 'p' follows)

local live = false
local rkey = false
if read_record == '1' then rkey = record_key end
if read_live == '1' then
  live = redis.call('GET', live_key)
  if live and not rkey then rkey = records_of .. live end
end
local rev, blob, phone_client = false, false, false
if rkey then
  local fields = redis.call('HMGET', rkey, 'r', 'b', 'p')
  rev, blob, phone_client = fields[1], fields[2], fields[3]
end
local failed = false
if read_failed == '1' then
  failed = redis.call('GET', failed_key)
elseif read_failed == 'R' and phone_client and string.find(phone_client, ':', 1, true) then
  -- A record written before phones were keyed by HMAC holds bare digits: its failed checks
  -- are not read (COMMIT checks those of the new key, which start from none).
  failed = redis.call('GET', failed_of .. phone_client)
end
return {live or '', rev or '', blob or '', failed or ''}

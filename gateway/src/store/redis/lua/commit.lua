-- Writes a call's changes if the record, the live index and the failed checks are as read.
-- Its keys and arguments are named in the block below, in the order of COMMIT_NAMES in txn.rs
-- (a test there checks that the two agree). An expected value is '*' when unchecked, '' when
-- it must be absent; an op is '' (none), 'S' (set), 'D' (delete), or for the deadline 'A'
-- (add) and 'R' (remove); '' also stands for a job, entry or watch that there is none of.
-- Past the named ones: KEYS from first_limit_key are the phone's limit keys, one per rule of
-- phone_rules; ARGV from first_event_arg are each webhook event's client, kind, id and body.
-- Returns {1, revision, entry, events dropped} | {0} (conflict) | {2, retry ms, rule} |
-- {3} (entry not ours). Events that find the outbox stream at outbox_max entries are dropped
-- (the last ones of the list), and the caller counts them as the embedded outbox does.
local record_key = KEYS[1]
local live_key = KEYS[2]
local failed_key = KEYS[3]
local deadlines_key = KEYS[4]
local push_stream = KEYS[5] -- the stream to add the job to
local ack_stream = KEYS[6] -- the stream of ack_entry and owned_entry
local outbox_key = KEYS[7]
local delays_key = KEYS[8]
local expected_revision = ARGV[1]
local record = ARGV[2] -- '' = unchanged
local keep_ms = ARGV[3] -- the record's and the live index's
local expected_live = ARGV[4]
local live_op = ARGV[5]
local live_id = ARGV[6]
local failed_op = ARGV[7]
local failed = ARGV[8] -- 'count:window_start'
local failed_keep_ms = ARGV[9]
local deadline_op = ARGV[10]
local deadline = ARGV[11]
local member = ARGV[12] -- the verification id
local job = ARGV[13]
local ack_entry = ARGV[14] -- acknowledged and deleted
local consumer_group = ARGV[15]
local phone_rules = ARGV[16] -- 'emission,tolerance;…' (gcra.lua)
local clock_offset_ms = ARGV[17]
local phone_client = ARGV[18] -- the record's phone (keyed by HMAC) and client, as key names hold them
local watch_due = ARGV[19] -- a delay watch to start: when it is due
local watch_member = ARGV[20]
local unwatch_member = ARGV[21] -- the events are written only if this watch was there
local owned_entry = ARGV[22] -- must be pending to consumer
local consumer = ARGV[23]
local expected_failed = ARGV[24]
local event_count = ARGV[25]
local outbox_max = ARGV[26] -- entries the outbox stream may hold, read or not
local changed_channel = ARGV[27] -- where the ids of changed verifications are published
local changed = ARGV[28] -- ids to publish, comma-separated: long-polls wake on them
local first_limit_key = 9
local first_event_arg = 29

-- Whether a value is as read: `expected` '*' is unchecked, '' absent.
local function as_read(value, expected)
  if expected == '*' then return true end
  if expected == '' then return not value end
  return value == expected
end

if owned_entry ~= '' then
  local pending = redis.call('XPENDING', ack_stream, consumer_group, owned_entry, owned_entry, 1)
  if (not pending[1]) or pending[1][2] ~= consumer then return {3} end
  redis.call('XCLAIM', ack_stream, consumer_group, consumer, 0, owned_entry, 'JUSTID')
end
if expected_failed ~= '*' and not as_read(redis.call('GET', failed_key), expected_failed) then
  return {0}
end
local rev = redis.call('HGET', record_key, 'r')
if not as_read(rev, expected_revision) then return {0} end
if expected_live ~= '*' and not as_read(redis.call('GET', live_key), expected_live) then
  return {0}
end
if phone_rules ~= '' then
  local refused = gcra(phone_rules, first_limit_key, clock_offset_ms)
  if refused then return refused end
end
local newrev = tonumber(rev) or 0
if record ~= '' then
  newrev = redis.call('HINCRBY', record_key, 'r', 1)
  redis.call('HSET', record_key, 'b', record, 'p', phone_client)
  redis.call('PEXPIRE', record_key, keep_ms)
end
if live_op == 'S' then
  redis.call('SET', live_key, live_id, 'PX', keep_ms)
elseif live_op == 'D' then
  if redis.call('GET', live_key) == live_id then redis.call('DEL', live_key) end
end
if failed_op == 'S' then
  redis.call('SET', failed_key, failed, 'PX', failed_keep_ms)
elseif failed_op == 'D' then
  redis.call('DEL', failed_key)
end
if deadline_op == 'A' then
  redis.call('ZADD', deadlines_key, deadline, member)
elseif deadline_op == 'R' then
  redis.call('ZREM', deadlines_key, member)
end
local entry = ''
if job ~= '' then
  entry = redis.call('XADD', push_stream, '*', 'j', job)
end
if ack_entry ~= '' then
  redis.call('XACK', ack_stream, consumer_group, ack_entry)
  redis.call('XDEL', ack_stream, ack_entry)
end
if watch_due ~= '' then
  redis.call('ZADD', delays_key, watch_due, watch_member)
end
local announce = true
if unwatch_member ~= '' then
  announce = redis.call('ZREM', delays_key, unwatch_member) == 1
end
local dropped = 0
if announce and tonumber(event_count) > 0 then
  local room = tonumber(outbox_max) - redis.call('XLEN', outbox_key)
  for e = 0, tonumber(event_count) - 1 do
    if e < room then
      local at = first_event_arg + e * 4
      redis.call('XADD', outbox_key, '*', 'c', ARGV[at], 'k', ARGV[at + 1], 'i', ARGV[at + 2], 'b', ARGV[at + 3])
    else
      dropped = dropped + 1
    end
  end
end
-- Long-poll wake-ups come last and never fail the commit: everything above is written, and an
-- error here (a user without channel rights) must not turn a written change into an error.
for id in string.gmatch(changed, '[^,]+') do
  redis.pcall('PUBLISH', changed_channel, id)
end
return {1, newrev, entry, dropped}

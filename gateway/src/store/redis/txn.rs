//! One engine call's transaction: `LOAD` reads what the call needs, `COMMIT` writes back what
//! it changed if nothing it read changed meanwhile.

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis::{self, Value};

use super::codec::{
    StreamEntry, decode_failed, decode_record, encode_failed, encode_job, encode_record,
};
use super::error::StoreError;
use super::keys::{CONSUMER_GROUP, group};
use super::limits::gcra_rules;
use super::pool::RedisStore;
use crate::clock::Millis;
use crate::config::Rule;
use crate::ids::{AckToken, ClientId, VerificationId};
use crate::queue::Job;
use crate::store::{DeadlineWrite, FailedChecks};
use crate::verification::Verification;

/// What `LOAD` read.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The live verification of the phone and client, when asked for.
    pub live: Option<VerificationId>,
    pub record: Option<(u64, Verification)>,
    pub failed_checks: Option<FailedChecks>,
}

/// Which keys a `LOAD` reads: a record by id, or the live record of a phone and client, and the
/// phone's failed checks.
#[derive(Debug, Clone, Copy)]
pub struct LoadKeys {
    pub group: u8,
    pub id: Option<VerificationId>,
    pub live: Option<(u64, ClientId)>,
    pub failed_checks: FailedChecksOf,
}

impl LoadKeys {
    /// The record `id`, nothing else.
    pub fn record(id: VerificationId) -> LoadKeys {
        LoadKeys {
            group: group(&id),
            id: Some(id),
            live: None,
            failed_checks: FailedChecksOf::None,
        }
    }
}

/// Whose failed checks a `LOAD` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedChecksOf {
    None,
    Phone(u64),
    /// The phone of the record read.
    Record,
}

/// Everything one `COMMIT` writes.
#[derive(Debug, Default)]
pub struct Commit {
    pub group: u8,
    pub id: Option<VerificationId>,
    /// The revision read (`None`: the record did not exist); unchecked unless
    /// `check_revision`.
    pub expected_revision: Option<u64>,
    pub check_revision: bool,
    /// The new record and the time to keep it.
    pub record: Option<(Verification, Duration)>,
    /// `(phone, client)` and the live id read, checked unchanged when `check_live`.
    pub live_key: Option<(u64, ClientId)>,
    pub expected_live: Option<VerificationId>,
    pub check_live: bool,
    pub live: LiveWrite,
    pub failed_checks: Option<(u64, Option<FailedChecks>, Duration)>,
    pub deadline: DeadlineWrite,
    pub push: Option<Job>,
    pub ack: Option<(u8, AckToken)>,
    /// The phone's send rules, when this commit spends one send of them.
    pub phone_limit: Option<(u64, Vec<Rule>)>,
    /// Webhook events the change raises: added to the group's outbox stream with it.
    pub events: Vec<crate::webhook::RenderedEvent>,
    /// A `verification.delayed` watch to start: when it is due, and the send it watches.
    pub watch_delay: Option<(Millis, u8)>,
    /// A due watch the call has dealt with: the send it watched. Its events are written only
    /// if the watch was still there (one instance announces it, not every one that swept it).
    pub unwatch_delay: Option<u8>,
    /// The job's stream entry, which must still be pending to this instance (another may
    /// have taken it over); refreshed as held.
    pub owns: Option<(u8, AckToken)>,
    /// The failed checks as read, checked unchanged (`Some(None)`: absent).
    pub expected_failed_checks: Option<Option<FailedChecks>>,
    pub clock_offset_ms: i64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum LiveWrite {
    #[default]
    Keep,
    Set(VerificationId),
    /// Removed if it still names this verification.
    Remove(VerificationId),
}

/// How a `COMMIT` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Done {
        entry: Option<StreamEntry>,
        /// The record's revision after the write.
        revision: u64,
    },
    /// Something it read changed meanwhile: read again and start over.
    Conflict,
    /// The phone's send limit refused: the rule (its index) and when to try again.
    Limited { rule: usize, retry_after: Duration },
    /// The job's entry is no longer this instance's: another took it over.
    NotOwned,
}

impl RedisStore {
    /// Reads a record (by id or through the phone's live index) and the phone's failed checks.
    pub async fn load(&self, keys: LoadKeys) -> Result<Loaded, StoreError> {
        let group = keys.group;
        let placeholder = self.keys().placeholder(group);
        let record_key = keys
            .id
            .map_or_else(|| placeholder.clone(), |id| self.keys().record(&id));
        let live_key = keys.live.map_or_else(
            || placeholder.clone(),
            |(phone, client)| self.keys().live(group, phone, client),
        );
        let failed_key = match keys.failed_checks {
            FailedChecksOf::Phone(phone) => self.keys().failed(group, phone),
            FailedChecksOf::None | FailedChecksOf::Record => placeholder.clone(),
        };
        let mut invocation = LOAD_SCRIPT.prepare_invoke();
        invocation
            .key(record_key)
            .key(live_key)
            .key(failed_key)
            .arg(if keys.id.is_some() { "1" } else { "0" })
            .arg(if keys.live.is_some() { "1" } else { "0" })
            .arg(match keys.failed_checks {
                FailedChecksOf::None => "0",
                FailedChecksOf::Phone(_) => "1",
                FailedChecksOf::Record => "R",
            })
            .arg(self.keys().records_of(group))
            .arg(self.keys().failed_of(group));
        let (live, revision, blob, failed): (String, String, Vec<u8>, String) =
            self.invoke(&invocation).await?;
        let live = if live.is_empty() {
            None
        } else {
            Some(
                VerificationId::parse(&live)
                    .ok_or_else(|| StoreError::Protocol(format!("live index holds {live:?}")))?,
            )
        };
        let record = if revision.is_empty() || blob.is_empty() {
            None
        } else {
            let revision: u64 = revision
                .parse()
                .map_err(|_| StoreError::Protocol(format!("revision {revision:?}")))?;
            Some((revision, decode_record(&blob)?))
        };
        let failed_checks = decode_failed(&failed);
        Ok(Loaded {
            live,
            record,
            failed_checks,
        })
    }

    /// Writes what a call changed, if nothing it read changed meanwhile.
    pub async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        let group = commit.group;
        let placeholder = self.keys().placeholder(group);
        let mut invocation = COMMIT_SCRIPT.prepare_invoke();
        invocation
            .key(
                commit
                    .id
                    .map_or_else(|| placeholder.clone(), |id| self.keys().record(&id)),
            )
            .key(commit.live_key.map_or_else(
                || placeholder.clone(),
                |(phone, client)| self.keys().live(group, phone, client),
            ))
            .key(commit.failed_checks.as_ref().map_or_else(
                || placeholder.clone(),
                |(phone, _, _)| self.keys().failed(group, *phone),
            ))
            .key(self.keys().deadlines(group))
            .key(commit.push.as_ref().map_or_else(
                || placeholder.clone(),
                |job| self.keys().stream(group, job.lane),
            ))
            .key(commit.ack.or(commit.owns).map_or_else(
                || placeholder.clone(),
                |(lane, _)| self.keys().stream(group, lane),
            ))
            .key(self.keys().outbox(group))
            .key(self.keys().delays(group));
        let rules = match &commit.phone_limit {
            Some((phone, phone_rules)) => {
                for index in 0..phone_rules.len() {
                    invocation.key(self.keys().phone_limit(group, *phone, index));
                }
                gcra_rules(phone_rules)
            }
            None => String::new(),
        };
        let (blob, ttl_ms, phone) = match &commit.record {
            Some((record, keep)) => (
                encode_record(record)?,
                keep.as_millis().max(1) as u64,
                record.phone.as_u64().to_string(),
            ),
            None => (Vec::new(), 0, String::new()),
        };
        invocation
            .arg(match commit.expected_revision {
                _ if !commit.check_revision => "*".to_owned(),
                Some(revision) => revision.to_string(),
                None => String::new(),
            })
            .arg(blob)
            .arg(ttl_ms)
            .arg(if commit.check_live {
                commit
                    .expected_live
                    .map_or_else(String::new, |id| id.to_string())
            } else {
                "*".to_owned()
            });
        match commit.live {
            LiveWrite::Keep => invocation.arg("").arg(""),
            LiveWrite::Set(id) => invocation.arg("S").arg(id.to_string()),
            LiveWrite::Remove(id) => invocation.arg("D").arg(id.to_string()),
        };
        match &commit.failed_checks {
            None => invocation.arg("").arg("").arg(0),
            Some((_, None, _)) => invocation.arg("D").arg("").arg(0),
            Some((_, Some(failed), keep)) => invocation
                .arg("S")
                .arg(encode_failed(failed))
                .arg(keep.as_millis().max(1) as u64),
        };
        let member = commit.id.map_or_else(String::new, |id| id.to_string());
        match commit.deadline {
            DeadlineWrite::Keep => invocation.arg("").arg(0).arg(&member),
            DeadlineWrite::At(at) => invocation.arg("A").arg(at).arg(&member),
            DeadlineWrite::Remove => invocation.arg("R").arg(0).arg(&member),
        };
        invocation
            .arg(commit.push.as_ref().map_or_else(String::new, encode_job))
            .arg(commit.ack.map_or_else(String::new, |(_, entry)| {
                StreamEntry::from(entry).to_string()
            }))
            .arg(CONSUMER_GROUP)
            .arg(rules)
            .arg(commit.clock_offset_ms)
            .arg(phone);
        match commit.watch_delay {
            Some((due, send)) => invocation.arg(due).arg(format!("{member}:{send}")),
            None => invocation.arg("").arg(""),
        };
        invocation
            .arg(
                commit
                    .unwatch_delay
                    .map_or_else(String::new, |send| format!("{member}:{send}")),
            )
            .arg(commit.owns.map_or_else(String::new, |(_, entry)| {
                StreamEntry::from(entry).to_string()
            }))
            .arg(&self.shared.consumer)
            .arg(match commit.expected_failed_checks {
                None => "*".to_owned(),
                Some(None) => String::new(),
                Some(Some(failed)) => encode_failed(&failed),
            })
            .arg(commit.events.len());
        for event in &commit.events {
            invocation
                .arg(event.client)
                .arg(event.kind as u8)
                .arg(&event.id)
                .arg(&event.body);
        }
        let answer: Vec<Value> = self.invoke(&invocation).await?;
        if let (Some((_, entry)), Some(Value::Int(1))) = (commit.ack, answer.first()) {
            self.release(entry);
        }
        let int = |index: usize| match answer.get(index) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        match int(0) {
            Some(1) => {
                let entry = match answer.get(2) {
                    Some(Value::BulkString(bytes)) => {
                        std::str::from_utf8(bytes).ok().and_then(StreamEntry::parse)
                    }
                    _ => None,
                };
                Ok(Committed::Done {
                    entry,
                    revision: int(1).unwrap_or(0).max(0) as u64,
                })
            }
            Some(0) => Ok(Committed::Conflict),
            Some(3) => Ok(Committed::NotOwned),
            Some(2) => Ok(Committed::Limited {
                retry_after: Duration::from_millis(int(1).unwrap_or(1000).max(1) as u64),
                rule: int(2).unwrap_or(1).max(1) as usize - 1,
            }),
            _ => Err(StoreError::Protocol(format!("commit answered {answer:?}"))),
        }
    }
}

// --- scripts ---

static LOAD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(LOAD));
static COMMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COMMIT));

/// Reads a record (by id, or through the live index), and the failed checks.
/// KEYS: record, live, failed checks (a placeholder where unused).
/// ARGV: whether to read the record and the live index (`1`/`0`), the failed checks (`1`, `0`,
/// or `R`: those of the record's phone), the record key prefix of the group, the failed-checks
/// key prefix of the group.
const LOAD: &str = r"
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
";

/// Writes a call's changes if the record (and live index) are as read.
/// KEYS: 1 record, 2 live, 3 failed checks, 4 deadlines, 5 stream to add to, 6 stream to
/// acknowledge in, 7 the webhook outbox stream, 8 the delay watches, 9.. the phone's limit
/// keys.
/// ARGV: 1 expected revision ('' = absent, '*' = unchecked), 2 record ('' = unchanged), 3 keep ms,
/// 4 expected live ('*' = unchecked, '' = absent), 5 live op ('', S, D), 6 live id,
/// 7 failed op ('', S, D), 8 failed value, 9 failed keep ms, 10 deadline op ('', A, R),
/// 11 deadline, 12 member, 13 job ('' = none), 14 entry to acknowledge ('' = none),
/// 15 consumer group, 16 phone rules ('T,tau;…', '' = none), 17 clock offset ms, 18 the
/// record's phone digits, 19 a delay watch's due time ('' = none), 20 its member, 21 a delay
/// watch to remove ('' = none; the events are written only if it was there), 22 an entry of
/// KEYS[6] that must be pending to consumer 23 ('' = none), 24 the failed checks as read ('*' =
/// unchecked, '' = absent), 25 webhook events, then each event's client, kind, id and body.
/// Returns {1, revision, entry} | {0} (conflict) | {2, retry ms, rule} | {3} (entry not ours).
const COMMIT: &str = r"
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
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[17])
  local tats = {}
  local i = 0
  for spec in string.gmatch(ARGV[16], '[^;]+') do
    i = i + 1
    local emission, tolerance = string.match(spec, '(%d+),(%d+)')
    emission, tolerance = tonumber(emission), tonumber(tolerance)
    local tat = tonumber(redis.call('GET', KEYS[8 + i])) or now
    if tat < now then tat = now end
    if now < tat - tolerance then return {2, tat - tolerance - now, i} end
    tats[i] = tat + emission
  end
  for j = 1, i do
    redis.call('SET', KEYS[8 + j], string.format('%d', tats[j]), 'PX', string.format('%d', math.max(1, tats[j] - now)))
  end
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
";

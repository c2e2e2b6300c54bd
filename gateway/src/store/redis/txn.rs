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
use super::named::{Named, Names};
use super::pool::RedisStore;
use crate::clock::Millis;
use crate::config::Rule;
use crate::ids::{AckToken, ClientId, VerificationId};
use crate::queue::Job;
use crate::store::effects::{DeadlineWrite, FailedChecks};
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
/// failed checks of a phone and client.
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
    /// This phone's, counted for this client.
    Phone((u64, ClientId)),
    /// Those of the record's phone and client.
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
    /// `((phone, client), failed checks or none, time to keep them)`.
    pub failed_checks: Option<((u64, ClientId), Option<FailedChecks>, Duration)>,
    pub deadline: DeadlineWrite,
    pub push: Option<Job>,
    pub ack: Option<(u8, AckToken)>,
    /// The phone's send rules, when this commit spends one send of them.
    pub phone_limit: Option<(u64, Vec<Rule>)>,
    /// Webhook events the change raises: added to the group's outbox stream with it, as long
    /// as the stream holds fewer than `outbox_max` entries (the rest are dropped).
    pub events: Vec<crate::webhook::RenderedEvent>,
    pub outbox_max: usize,
    /// Verifications whose long-polls the change wakes, on every instance: their ids are
    /// published on the changes channel.
    pub changed: Vec<VerificationId>,
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
        /// How many of the commit's webhook events (the last ones) found the outbox stream
        /// full and were dropped.
        dropped_events: usize,
    },
    /// Something it read changed meanwhile: read again and start over.
    Conflict,
    /// The phone's send limit refused: the rule (its index) and when to try again.
    Limited { rule: usize, retry_after: Duration },
    /// The job's entry is no longer this instance's: another took it over.
    NotOwned,
}

impl RedisStore {
    /// Reads a record (by id or through the phone's live index) and the failed checks of the
    /// phone and client.
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
            FailedChecksOf::Phone((phone, client)) => self.keys().failed(group, phone, client),
            FailedChecksOf::None | FailedChecksOf::Record => placeholder.clone(),
        };
        let mut invocation = LOAD_SCRIPT.prepare_invoke();
        let flag = |read: bool| if read { "1" } else { "0" };
        Named::new(&mut invocation, &LOAD_NAMES)
            .key("record_key", record_key)
            .key("live_key", live_key)
            .key("failed_key", failed_key)
            .arg("read_record", flag(keys.id.is_some()))
            .arg("read_live", flag(keys.live.is_some()))
            .arg(
                "read_failed",
                match keys.failed_checks {
                    FailedChecksOf::None => "0",
                    FailedChecksOf::Phone(_) => "1",
                    FailedChecksOf::Record => "R",
                },
            )
            .arg("records_of", self.keys().records_of(group))
            .arg("failed_of", self.keys().failed_of(group))
            .done();
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
        let keys = self.keys();
        let placeholder = || keys.placeholder(group);
        let (record, keep_ms, phone_client) = match &commit.record {
            Some((record, keep)) => (
                encode_record(record)?,
                keep.as_millis().max(1) as u64,
                keys.phone_client(record.phone.as_u64(), record.client),
            ),
            None => (Vec::new(), 0, String::new()),
        };
        let expected_revision = match commit.expected_revision {
            _ if !commit.check_revision => "*".to_owned(),
            Some(revision) => revision.to_string(),
            None => String::new(),
        };
        let expected_live = match commit.expected_live {
            _ if !commit.check_live => "*".to_owned(),
            Some(id) => id.to_string(),
            None => String::new(),
        };
        let (live_op, live_id) = match commit.live {
            LiveWrite::Keep => ("", String::new()),
            LiveWrite::Set(id) => ("S", id.to_string()),
            LiveWrite::Remove(id) => ("D", id.to_string()),
        };
        let (failed_op, failed, failed_keep_ms) = match &commit.failed_checks {
            None => ("", String::new(), 0),
            Some((_, None, _)) => ("D", String::new(), 0),
            Some((_, Some(failed), keep)) => {
                ("S", encode_failed(failed), keep.as_millis().max(1) as u64)
            }
        };
        let member = commit.id.map_or_else(String::new, |id| id.to_string());
        let (deadline_op, deadline) = match commit.deadline {
            DeadlineWrite::Keep => ("", 0),
            DeadlineWrite::At(at) => ("A", at),
            DeadlineWrite::Remove => ("R", 0),
        };
        let (watch_due, watch_member) = match commit.watch_delay {
            Some((due, send)) => (due.to_string(), format!("{member}:{send}")),
            None => (String::new(), String::new()),
        };
        let entry = |entry: Option<(u8, AckToken)>| {
            entry.map_or_else(String::new, |(_, entry)| {
                StreamEntry::from(entry).to_string()
            })
        };
        let expected_failed = match commit.expected_failed_checks {
            None => "*".to_owned(),
            Some(None) => String::new(),
            Some(Some(failed)) => encode_failed(&failed),
        };
        let mut invocation = COMMIT_SCRIPT.prepare_invoke();
        let mut named = Named::new(&mut invocation, &COMMIT_NAMES)
            .key(
                "record_key",
                commit.id.map_or_else(placeholder, |id| keys.record(&id)),
            )
            .key(
                "live_key",
                commit.live_key.map_or_else(placeholder, |(phone, client)| {
                    keys.live(group, phone, client)
                }),
            )
            .key(
                "failed_key",
                commit
                    .failed_checks
                    .as_ref()
                    .map_or_else(placeholder, |((phone, client), _, _)| {
                        keys.failed(group, *phone, *client)
                    }),
            )
            .key("deadlines_key", keys.deadlines(group))
            .key(
                "push_stream",
                commit
                    .push
                    .as_ref()
                    .map_or_else(placeholder, |job| keys.stream(group, job.lane)),
            )
            .key(
                "ack_stream",
                commit
                    .ack
                    .or(commit.owns)
                    .map_or_else(placeholder, |(lane, _)| keys.stream(group, lane)),
            )
            .key("outbox_key", keys.outbox(group))
            .key("delays_key", keys.delays(group))
            .arg("expected_revision", expected_revision)
            .arg("record", record)
            .arg("keep_ms", keep_ms)
            .arg("expected_live", expected_live)
            .arg("live_op", live_op)
            .arg("live_id", live_id)
            .arg("failed_op", failed_op)
            .arg("failed", failed)
            .arg("failed_keep_ms", failed_keep_ms)
            .arg("deadline_op", deadline_op)
            .arg("deadline", deadline)
            .arg("member", &member)
            .arg(
                "job",
                commit.push.as_ref().map_or_else(String::new, encode_job),
            )
            .arg("ack_entry", entry(commit.ack))
            .arg("consumer_group", CONSUMER_GROUP)
            .arg(
                "phone_rules",
                commit
                    .phone_limit
                    .as_ref()
                    .map_or_else(String::new, |(_, rules)| gcra_rules(rules)),
            )
            .arg("clock_offset_ms", commit.clock_offset_ms)
            .arg("phone_client", phone_client)
            .arg("watch_due", watch_due)
            .arg("watch_member", watch_member)
            .arg(
                "unwatch_member",
                commit
                    .unwatch_delay
                    .map_or_else(String::new, |send| format!("{member}:{send}")),
            )
            .arg("owned_entry", entry(commit.owns))
            .arg("consumer", &self.shared.consumer)
            .arg("expected_failed", expected_failed)
            .arg("event_count", commit.events.len())
            .arg("outbox_max", commit.outbox_max)
            .arg("changed_channel", keys.changes())
            .arg(
                "changed",
                commit
                    .changed
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            );
        if let Some((phone, rules)) = &commit.phone_limit {
            for rule in 0..rules.len() {
                named = named.more_key(keys.phone_limit(group, *phone, rule));
            }
        }
        for event in &commit.events {
            named = named
                .more_arg(event.client)
                .more_arg(event.kind as u8)
                .more_arg(&event.id)
                .more_arg(&event.body);
        }
        named.done();
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
                    dropped_events: int(3).unwrap_or(0).max(0) as usize,
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

/// `LOAD`: reads a record (by id, or through the live index), and the failed checks
/// (`lua/load.lua`).
static LOAD_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/load.lua")));
/// `COMMIT`: writes a call's changes if what it read is unchanged (`lua/commit.lua`, after the
/// GCRA function that spends the phone's send limit, `lua/gcra.lua`).
static COMMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        include_str!("lua/gcra.lua"),
        include_str!("lua/commit.lua")
    ))
});

/// `LOAD`'s keys and arguments; `lua/load.lua` says what each holds.
static LOAD_NAMES: Names = Names {
    keys: &["record_key", "live_key", "failed_key"],
    args: &[
        "read_record",
        "read_live",
        "read_failed",
        "records_of",
        "failed_of",
    ],
    more_keys: None,
    more_args: None,
};

/// `COMMIT`'s keys and arguments; `lua/commit.lua` says what each holds. Past the named keys
/// come the phone's limit keys, one per rule; past the named arguments each webhook event's
/// client, kind, id and body.
static COMMIT_NAMES: Names = Names {
    keys: &[
        "record_key",
        "live_key",
        "failed_key",
        "deadlines_key",
        "push_stream",
        "ack_stream",
        "outbox_key",
        "delays_key",
    ],
    args: &[
        "expected_revision",
        "record",
        "keep_ms",
        "expected_live",
        "live_op",
        "live_id",
        "failed_op",
        "failed",
        "failed_keep_ms",
        "deadline_op",
        "deadline",
        "member",
        "job",
        "ack_entry",
        "consumer_group",
        "phone_rules",
        "clock_offset_ms",
        "phone_client",
        "watch_due",
        "watch_member",
        "unwatch_member",
        "owned_entry",
        "consumer",
        "expected_failed",
        "event_count",
        "outbox_max",
        "changed_channel",
        "changed",
    ],
    more_keys: Some("first_limit_key"),
    more_args: Some("first_event_arg"),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::named::assert_script_reads;

    #[test]
    fn load_reads_its_keys_and_arguments_by_the_names_given_here() {
        assert_script_reads(include_str!("lua/load.lua"), &LOAD_NAMES);
    }

    #[test]
    fn commit_reads_its_keys_and_arguments_by_the_names_given_here() {
        assert_script_reads(include_str!("lua/commit.lua"), &COMMIT_NAMES);
    }
}

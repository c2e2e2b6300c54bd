//! The redis back-end: what must be shared by several gateway instances, or survive one, kept in
//! Redis (standalone or Cluster) through a deadpool-redis pool.
//!
//! A call reads what it needs (`LOAD`), runs the engine's own logic on that copy, and writes the
//! result back with `COMMIT`, one Lua script that checks the revision it read (optimistic
//! concurrency: another instance's write in between makes it start over), takes the phone's
//! send limit on Redis's clock, writes the record, the live index, the failed checks and the
//! deadline, and adds or acknowledges the SMS job, all in one step.
//!
//! # Keys
//! Every key, and the hash tags that keep one call's keys on one Cluster slot, is named in
//! `keys.rs`, with a table of them.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis::{self, Value};

use crate::clock::Millis;
use crate::config::Rule;
use crate::ids::{AckToken, ClientId, VerificationId};
use crate::queue::Job;
use crate::store::{DeadlineWrite, FailedChecks};
use crate::sync::lock;
use crate::verification::Verification;

mod codec;
mod error;
mod idempotency;
mod keys;
mod limits;
mod pool;
mod receipts;

pub use self::codec::{StreamEntry, decode_record, encode_record};
use self::codec::{decode_failed, decode_job, encode_failed, encode_job};
pub use self::error::StoreError;
pub use self::idempotency::IdempotencyHolder;
use self::keys::CONSUMER_GROUP;
pub use self::keys::{GROUPS, group, phone_group};
use self::limits::gcra_rules;
pub use self::pool::RedisStore;

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

/// A job read from a stream, with where it came from.
#[derive(Debug)]
pub struct StreamJob {
    pub group: u8,
    pub lane: u8,
    pub entry: StreamEntry,
    pub job: Job,
}

impl RedisStore {
    /// Forgets a stream entry this instance held: it was acknowledged, or let go for another
    /// instance (or this one, later) to take over.
    pub fn release(&self, token: AckToken) {
        let entry = StreamEntry::from(token);
        lock(&self.shared.held).remove(&entry);
    }

    fn hold(&self, job: &StreamJob) {
        lock(&self.shared.held).insert(job.entry, (job.group, job.lane));
    }

    /// After a failed stream call: if the consumer groups are gone (Redis lost its data, or
    /// came up after this instance), creates them again.
    async fn recover(&self, error: &StoreError, lanes: &[u8]) {
        if let StoreError::Redis(error) = error {
            if error.code() == Some("NOGROUP") {
                tracing::warn!(
                    "redis has lost the SMS streams' consumer groups; creating them again"
                );
                if let Err(error) = self.prepare_streams(lanes).await {
                    tracing::warn!(%error, "creating the consumer groups failed");
                }
            }
        }
    }

    // --- verifications ---

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

    // --- the SMS streams ---

    /// Reads up to `count` jobs of one group, every lane at once: new ones, or with `own` those
    /// already delivered to this instance and not acknowledged (an answer lost to a timeout
    /// leaves some there).
    pub async fn read_jobs(
        &self,
        group: u8,
        lanes: &[u8],
        count: usize,
        own: bool,
    ) -> Result<Vec<StreamJob>, StoreError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(&self.shared.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS");
        for &lane in lanes {
            cmd.arg(self.keys().stream(group, lane));
        }
        for _ in lanes {
            cmd.arg(if own { "0" } else { ">" });
        }
        let reply: Option<redis::streams::StreamReadReply> = self.run(&cmd).await?;
        Ok(self.jobs_of(
            group,
            lanes,
            reply.map(|reply| reply.keys).unwrap_or_default(),
        ))
    }

    fn jobs_of(
        &self,
        group: u8,
        lanes: &[u8],
        keys: Vec<redis::streams::StreamKey>,
    ) -> Vec<StreamJob> {
        let mut jobs = Vec::new();
        for key in keys {
            let Some(&lane) = lanes
                .iter()
                .find(|&&lane| self.keys().stream(group, lane) == key.key)
            else {
                continue;
            };
            for entry in key.ids {
                self.push_entry(group, lane, &entry.id, &entry.map, &mut jobs);
            }
        }
        jobs
    }

    fn push_entry(
        &self,
        group: u8,
        lane: u8,
        entry: &str,
        map: &HashMap<String, Value>,
        jobs: &mut Vec<StreamJob>,
    ) {
        let Some(entry) = StreamEntry::parse(entry) else {
            return;
        };
        let job = match map.get("j") {
            Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).ok().and_then(decode_job),
            _ => None,
        };
        match job {
            Some(mut job) => {
                job.entry = Some(entry.into());
                jobs.push(StreamJob {
                    group,
                    lane,
                    entry,
                    job,
                });
            }
            None => {
                tracing::warn!(%entry, "an SMS stream holds an entry that is not a job; skipped")
            }
        }
    }

    /// Takes over jobs another consumer has held for longer than `idle` (a dead instance's).
    pub async fn reclaim_jobs(
        &self,
        group: u8,
        lane: u8,
        idle: Duration,
        count: usize,
    ) -> Result<Vec<StreamJob>, StoreError> {
        let reply: redis::streams::StreamAutoClaimReply = self
            .run(
                redis::cmd("XAUTOCLAIM")
                    .arg(self.keys().stream(group, lane))
                    .arg(CONSUMER_GROUP)
                    .arg(&self.shared.consumer)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let mut jobs = Vec::new();
        for entry in reply.claimed {
            self.push_entry(group, lane, &entry.id, &entry.map, &mut jobs);
        }
        Ok(jobs)
    }

    /// Tells the group this instance still holds `entries` of a stream, so no one takes them
    /// over; returns those another instance took over meanwhile (or that are gone).
    async fn keep(
        &self,
        key: String,
        entries: &[StreamEntry],
    ) -> Result<Vec<StreamEntry>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = KEEP_SCRIPT.prepare_invoke();
        invocation
            .key(key)
            .arg(CONSUMER_GROUP)
            .arg(&self.shared.consumer);
        for entry in entries {
            invocation.arg(entry.to_string());
        }
        let lost: Vec<String> = self.invoke(&invocation).await?;
        Ok(lost
            .iter()
            .filter_map(|entry| StreamEntry::parse(entry))
            .collect())
    }

    // --- the webhook outbox streams ---

    /// Reads up to `count` webhook events of one group: new ones, or with `own` those already
    /// delivered to this instance and not acknowledged.
    pub async fn read_events(
        &self,
        group: u8,
        count: usize,
        own: bool,
    ) -> Result<Vec<(StreamEntry, crate::webhook::RenderedEvent)>, StoreError> {
        let reply: Option<redis::streams::StreamReadReply> = self
            .run(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(CONSUMER_GROUP)
                    .arg(&self.shared.consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(self.keys().outbox(group))
                    .arg(if own { "0" } else { ">" }),
            )
            .await?;
        let mut events = Vec::new();
        for key in reply.map(|reply| reply.keys).unwrap_or_default() {
            for entry in key.ids {
                if let Some(event) = event_of(&entry.id, &entry.map) {
                    events.push(event);
                }
            }
        }
        Ok(events)
    }

    /// Takes over webhook events another consumer has held longer than `idle`.
    pub async fn reclaim_events(
        &self,
        group: u8,
        idle: Duration,
        count: usize,
    ) -> Result<Vec<(StreamEntry, crate::webhook::RenderedEvent)>, StoreError> {
        let reply: redis::streams::StreamAutoClaimReply = self
            .run(
                redis::cmd("XAUTOCLAIM")
                    .arg(self.keys().outbox(group))
                    .arg(CONSUMER_GROUP)
                    .arg(&self.shared.consumer)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(reply
            .claimed
            .iter()
            .filter_map(|entry| event_of(&entry.id, &entry.map))
            .collect())
    }

    /// Acknowledges (and deletes) webhook events that were delivered or given up.
    pub async fn finish_events(
        &self,
        group: u8,
        entries: &[StreamEntry],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = entries.iter().map(ToString::to_string).collect();
        let _: Value = self
            .run(
                redis::cmd("XACK")
                    .arg(self.keys().outbox(group))
                    .arg(CONSUMER_GROUP)
                    .arg(&ids),
            )
            .await?;
        let _: Value = self
            .run(redis::cmd("XDEL").arg(self.keys().outbox(group)).arg(&ids))
            .await?;
        let mut held = lock(&self.shared.held_events);
        for entry in entries {
            held.remove(entry);
        }
        Ok(())
    }

    /// Keeps the SMS jobs and webhook events this instance holds claimed, so no one takes them
    /// over; forgets those another instance took over meanwhile.
    async fn keep_held(&self) {
        let mut jobs: HashMap<(u8, u8), Vec<StreamEntry>> = HashMap::new();
        for (entry, stream) in lock(&self.shared.held).iter() {
            jobs.entry(*stream).or_default().push(*entry);
        }
        for ((group, lane), entries) in jobs {
            for chunk in entries.chunks(512) {
                match self.keep(self.keys().stream(group, lane), chunk).await {
                    Ok(lost) => {
                        for entry in lost {
                            self.release(entry.into());
                        }
                    }
                    Err(error) => tracing::debug!(%error, "keeping held SMS jobs claimed failed"),
                }
            }
        }
        let mut events: HashMap<u8, Vec<StreamEntry>> = HashMap::new();
        for (entry, group) in lock(&self.shared.held_events).iter() {
            events.entry(*group).or_default().push(*entry);
        }
        for (group, entries) in events {
            for chunk in entries.chunks(512) {
                match self.keep(self.keys().outbox(group), chunk).await {
                    Ok(lost) => {
                        let mut held = lock(&self.shared.held_events);
                        for entry in lost {
                            held.remove(&entry);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "keeping held webhook events claimed failed");
                    }
                }
            }
        }
    }

    /// Jobs in a lane's streams not yet acknowledged: queued or being sent, by every instance.
    pub async fn backlog(&self, lane: u8) -> Result<u64, StoreError> {
        let mut total = 0;
        for group in 0..GROUPS {
            let n: u64 = self
                .run(redis::cmd("XLEN").arg(self.keys().stream(group, lane)))
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// `verification.delayed` watches of a group that are due: `(id, send)`.
    pub async fn due_delays(
        &self,
        group: u8,
        now: Millis,
        count: usize,
    ) -> Result<Vec<(VerificationId, u8)>, StoreError> {
        let members: Vec<String> = self
            .run(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys().delays(group))
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count),
            )
            .await?;
        Ok(members
            .iter()
            .filter_map(|member| {
                let (id, send) = member.split_once(':')?;
                Some((VerificationId::parse(id)?, send.parse().ok()?))
            })
            .collect())
    }

    /// Pending verifications, every group (each has a deadline until it ends).
    pub async fn pending_count(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for group in 0..GROUPS {
            let n: u64 = self
                .run(redis::cmd("ZCARD").arg(self.keys().deadlines(group)))
                .await?;
            total += n;
        }
        Ok(total)
    }

    /// Verifications of a group whose deadline has come, at most `count`.
    pub async fn due(
        &self,
        group: u8,
        now: Millis,
        count: usize,
    ) -> Result<Vec<VerificationId>, StoreError> {
        let ids: Vec<String> = self
            .run(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys().deadlines(group))
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count),
            )
            .await?;
        Ok(ids
            .iter()
            .filter_map(|id| VerificationId::parse(id))
            .collect())
    }
}

/// A webhook event as the `COMMIT` script added it to an outbox stream.
fn event_of(
    entry: &str,
    map: &HashMap<String, Value>,
) -> Option<(StreamEntry, crate::webhook::RenderedEvent)> {
    let entry = StreamEntry::parse(entry)?;
    let field = |name: &str| match map.get(name) {
        Some(Value::BulkString(bytes)) => Some(bytes.clone()),
        _ => None,
    };
    let text = |name: &str| field(name).and_then(|bytes| String::from_utf8(bytes).ok());
    let kind: usize = text("k")?.parse().ok()?;
    Some((
        entry,
        crate::webhook::RenderedEvent {
            client: text("c")?.parse().ok()?,
            kind: *crate::verification::EventKind::ALL.get(kind)?,
            id: text("i")?,
            body: field("b")?,
        },
    ))
}

/// What [`feed`] moves jobs and webhook events between.
#[derive(Debug)]
pub struct Feed {
    pub store: RedisStore,
    pub queue: crate::queue::Queue,
    pub webhooks: crate::webhook::Webhooks,
    pub clock: crate::clock::Clock,
    /// Every lane that can hold jobs.
    pub lanes: Vec<u8>,
    /// Jobs to keep on hand in the queue.
    pub prefetch: usize,
    /// When a job or event another instance holds counts as abandoned.
    pub claim_after: Duration,
    /// Fired when shutdown begins: no more jobs or events are read, but what is held stays
    /// claimed and finished events are acknowledged until `feed` is stopped.
    pub draining: tokio_util::sync::CancellationToken,
}

/// Moves SMS jobs from the streams into this instance's queue, as fast as its carriers take
/// them: reads new jobs while the queue holds fewer than `prefetch`, takes over jobs other
/// instances stopped acknowledging, and keeps its own held jobs claimed. Stops when `stop`
/// fires or the queue closes.
pub async fn feed(feed: Feed, stop: tokio_util::sync::CancellationToken) {
    let Feed {
        store,
        queue,
        webhooks,
        clock,
        mut lanes,
        prefetch,
        claim_after,
        draining,
    } = feed;
    // Higher lanes first, across every group, so a backlog of low-priority jobs in one group
    // does not fill the room before urgent ones in another.
    lanes.sort_unstable_by(|a, b| b.cmp(a));
    let with_webhooks = webhooks.any_enabled();
    // Events read while their client's line was full: held (and kept claimed) until it drains.
    let mut parked: Vec<(u8, StreamEntry, crate::webhook::RenderedEvent)> = Vec::new();
    let mut last_reclaim = tokio::time::Instant::now();
    let mut last_keep = tokio::time::Instant::now();
    let mut last_own = tokio::time::Instant::now();
    // Where the next pass over the groups starts, so none is always served last.
    let mut first_group: u8 = 0;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let reading = !draining.is_cancelled();
        let mut got = 0;
        let mut failures = 0;
        let mut passes = 0;
        if reading {
            first_group = (first_group + 1) % GROUPS;
            'lanes: for &lane in &lanes {
                for offset in 0..GROUPS {
                    let group = (first_group + offset) % GROUPS;
                    let room = prefetch.saturating_sub(queue.len());
                    if room == 0 {
                        break 'lanes;
                    }
                    passes += 1;
                    match store.read_jobs(group, &[lane], room.min(256), false).await {
                        Ok(jobs) => {
                            got += jobs.len();
                            if !push_all(&store, &queue, jobs) {
                                return;
                            }
                        }
                        Err(error) => {
                            failures += 1;
                            store.recover(&error, &lanes).await;
                            tracing::debug!(%error, group, "reading SMS jobs from redis failed");
                        }
                    }
                }
            }
        }
        // Every read failing means Redis is away: wait before trying again.
        let failed = passes > 0 && failures == passes;
        if reading && with_webhooks && !failed {
            got += move_events(&store, &webhooks, &clock, Source::New, &mut parked, &lanes).await;
        } else if with_webhooks {
            // While draining, only acknowledge what was delivered.
            move_events(&store, &webhooks, &clock, Source::None, &mut parked, &lanes).await;
        }
        let now = tokio::time::Instant::now();
        if reading && !failed && now >= last_reclaim + claim_after / 2 {
            last_reclaim = now;
            if with_webhooks {
                got += move_events(
                    &store,
                    &webhooks,
                    &clock,
                    Source::Reclaim(claim_after),
                    &mut parked,
                    &lanes,
                )
                .await;
            }
            for group in 0..GROUPS {
                for &lane in &lanes {
                    match store.reclaim_jobs(group, lane, claim_after, 256).await {
                        Ok(jobs) => {
                            if !jobs.is_empty() {
                                tracing::info!(
                                    jobs = jobs.len(),
                                    group,
                                    lane,
                                    "took over SMS jobs another instance held too long"
                                );
                            }
                            got += jobs.len();
                            if !push_all(&store, &queue, jobs) {
                                return;
                            }
                        }
                        Err(error) => store.recover(&error, &lanes).await,
                    }
                }
            }
        }
        // What Redis delivered to this instance but whose answer was lost (a timeout) is read
        // again from its pending entries, rather than waiting for a take-over.
        if reading && !failed && now >= last_own + OWN_PENDING_EVERY {
            last_own = now;
            for group in 0..GROUPS {
                match store.read_jobs(group, &lanes, 256, true).await {
                    Ok(jobs) => {
                        if !push_all(&store, &queue, jobs) {
                            return;
                        }
                    }
                    Err(error) => store.recover(&error, &lanes).await,
                }
            }
            if with_webhooks {
                move_events(&store, &webhooks, &clock, Source::Own, &mut parked, &lanes).await;
            }
        }
        // Always, even after failed reads and while draining: the others must not take over
        // what this instance holds because one Redis node was away or it is shutting down.
        if now >= last_keep + claim_after / 3 {
            last_keep = now;
            store.keep_held().await;
        }
        let pause = if failed {
            Duration::from_millis(200)
        } else if got == 0 || !reading {
            FEED_IDLE_PAUSE
        } else {
            Duration::ZERO
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
        } else if queue.len() >= prefetch {
            // Full: let the carriers take some.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Moves webhook events from the outbox streams (new ones, this instance's own pending ones, or
/// those another instance held too long) into this instance's webhook outbox, and acknowledges
/// those it finished. Returns how many it took.
async fn move_events(
    store: &RedisStore,
    webhooks: &crate::webhook::Webhooks,
    clock: &crate::clock::Clock,
    source: Source,
    parked: &mut Vec<(u8, StreamEntry, crate::webhook::RenderedEvent)>,
    lanes: &[u8],
) -> usize {
    let mut finished: HashMap<u8, Vec<StreamEntry>> = HashMap::new();
    for (group, entry) in webhooks.take_finished() {
        finished.entry(group).or_default().push(entry.into());
    }
    for (group, entries) in finished {
        if let Err(error) = store.finish_events(group, &entries).await {
            tracing::debug!(%error, "acknowledging webhook events failed; trying again later");
            webhooks.refinish(entries.into_iter().map(|entry| (group, entry.into())));
        }
    }
    if matches!(source, Source::None) {
        return 0;
    }
    let mut taken = 0;
    for (group, entry, event) in std::mem::take(parked) {
        if webhooks.enqueue(event.clone(), Some((group, entry.into())), clock.now_ms()) {
            taken += 1;
        } else {
            parked.push((group, entry, event));
        }
    }
    for group in 0..GROUPS {
        if parked.len() >= MAX_PARKED_EVENTS {
            break;
        }
        let events = match source {
            Source::New => store.read_events(group, 64, false).await,
            Source::Own => store.read_events(group, 256, true).await,
            Source::Reclaim(idle) => store.reclaim_events(group, idle, 64).await,
            Source::None => Ok(Vec::new()),
        };
        let events = match events {
            Ok(events) => events,
            Err(error) => {
                store.recover(&error, lanes).await;
                continue;
            }
        };
        for (entry, event) in events {
            if lock(&store.shared.held_events).contains_key(&entry) {
                continue;
            }
            lock(&store.shared.held_events).insert(entry, group);
            // A full line parks it here until the line drains.
            if webhooks.enqueue(event.clone(), Some((group, entry.into())), clock.now_ms()) {
                taken += 1;
            } else {
                parked.push((group, entry, event));
            }
        }
    }
    taken
}

/// Where [`move_events`] reads events from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Nothing: only acknowledge what was finished.
    None,
    New,
    /// This instance's pending entries.
    Own,
    /// Entries another instance held longer than this.
    Reclaim(Duration),
}

/// How often the feeder reads its own pending entries again.
const OWN_PENDING_EVERY: Duration = Duration::from_secs(1);

/// Webhook events an instance holds while their clients' lines are full; past it, it reads no
/// more (they wait in Redis).
const MAX_PARKED_EVENTS: usize = 1024;

/// How long the feeder waits when every stream was empty.
const FEED_IDLE_PAUSE: Duration = Duration::from_millis(10);

/// Puts jobs read from Redis in the local queue; false once the queue is closed.
fn push_all(store: &RedisStore, queue: &crate::queue::Queue, jobs: Vec<StreamJob>) -> bool {
    for job in jobs {
        if lock(&store.shared.held).contains_key(&job.entry) {
            continue;
        }
        store.hold(&job);
        let entry = job.entry;
        if queue.push(job.job).is_err() {
            // Closed (shutting down) or full: the job stays pending in its stream, for
            // another instance to take over.
            store.release(entry.into());
            return !queue.is_closed();
        }
    }
    true
}

// --- scripts ---

static LOAD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(LOAD));
static COMMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COMMIT));
static KEEP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(KEEP));

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

/// Re-claims (resetting their idle time) the entries still pending to this consumer.
/// KEYS: the stream. ARGV: 1 group, 2 consumer, 3.. entries. Returns the entries that are not
/// (another consumer took them over, or they are gone).
const KEEP: &str = r"
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
";

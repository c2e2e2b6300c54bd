//! The streams: each group's SMS jobs (a stream per lane) and webhook events (its outbox),
//! read by every instance in one consumer group. What this instance holds it keeps claimed
//! (`KEEP`); what another instance held too long it takes over.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis::{self, Value};

use super::codec::{StreamEntry, decode_job};
use super::error::StoreError;
use super::keys::{CONSUMER_GROUP, GROUPS};
use super::pool::RedisStore;
use crate::ids::AckToken;
use crate::queue::Job;
use crate::sync::lock;

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

    pub(crate) fn hold(&self, job: &StreamJob) {
        lock(&self.shared.held).insert(job.entry, (job.group, job.lane));
    }

    /// After a failed stream call: if the consumer groups are gone (Redis lost its data, or
    /// came up after this instance), creates them again.
    pub(crate) async fn recover(&self, error: &StoreError, lanes: &[u8]) {
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
        let keys = lanes.iter().map(|&lane| self.keys().stream(group, lane));
        let reply = self.read(keys, count, own).await?;
        Ok(self.jobs_of(group, lanes, reply))
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
        let reply = self
            .take_over(self.keys().stream(group, lane), idle, count)
            .await?;
        let mut jobs = Vec::new();
        for entry in reply.claimed {
            self.push_entry(group, lane, &entry.id, &entry.map, &mut jobs);
        }
        Ok(jobs)
    }

    /// Reads up to `count` entries of the streams `keys` in the consumer group: new ones, or with
    /// `own` those already delivered to this instance and not acknowledged.
    async fn read(
        &self,
        keys: impl ExactSizeIterator<Item = String>,
        count: usize,
        own: bool,
    ) -> Result<Vec<redis::streams::StreamKey>, StoreError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(CONSUMER_GROUP)
            .arg(&self.shared.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS");
        let streams = keys.len();
        for key in keys {
            cmd.arg(key);
        }
        for _ in 0..streams {
            cmd.arg(if own { "0" } else { ">" });
        }
        let reply: Option<redis::streams::StreamReadReply> = self.run(&cmd).await?;
        Ok(reply.map(|reply| reply.keys).unwrap_or_default())
    }

    /// Takes over up to `count` entries of a stream that another consumer has held for longer
    /// than `idle`.
    async fn take_over(
        &self,
        key: String,
        idle: Duration,
        count: usize,
    ) -> Result<redis::streams::StreamAutoClaimReply, StoreError> {
        self.run(
            redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(CONSUMER_GROUP)
                .arg(&self.shared.consumer)
                .arg(idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(count),
        )
        .await
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
        let reply = self
            .read(std::iter::once(self.keys().outbox(group)), count, own)
            .await?;
        let mut events = Vec::new();
        for key in reply {
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
        let reply = self
            .take_over(self.keys().outbox(group), idle, count)
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
            held.remove(&(group, *entry));
        }
        Ok(())
    }

    /// Keeps the SMS jobs and webhook events this instance holds claimed, so no one takes them
    /// over; forgets those another instance took over meanwhile.
    pub(crate) async fn keep_held(&self) {
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
        for (group, entry) in lock(&self.shared.held_events).iter() {
            events.entry(*group).or_default().push(*entry);
        }
        for (group, entries) in events {
            for chunk in entries.chunks(512) {
                match self.keep(self.keys().outbox(group), chunk).await {
                    Ok(lost) => {
                        let mut held = lock(&self.shared.held_events);
                        for entry in lost {
                            held.remove(&(group, entry));
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

/// `KEEP`: re-claims the entries still pending to this consumer (`lua/keep.lua`).
static KEEP_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/keep.lua")));

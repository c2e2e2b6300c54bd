//! The feeder: the task that moves SMS jobs from the streams into this instance's queue and
//! webhook events into its outbox, and keeps what it holds claimed.

use std::collections::HashMap;
use std::time::Duration;

use super::codec::StreamEntry;
use super::keys::GROUPS;
use super::pool::RedisStore;
use super::streams::StreamJob;
use crate::sync::lock;

/// What [`feed`] moves jobs and webhook events between.
#[derive(Debug, Clone)]
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
/// fires; once the queue closes it only waits for that.
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
                                // Shutting down: wait to be stopped (ending early would count as a crash).
                                stop.cancelled().await;
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
            got += move_events(&store, &webhooks, &clock, Source::New, &lanes).await;
        } else if with_webhooks {
            // While draining, only acknowledge what was delivered.
            move_events(&store, &webhooks, &clock, Source::None, &lanes).await;
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
                                // Shutting down: wait to be stopped (ending early would count as a crash).
                                stop.cancelled().await;
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
                            // Shutting down: wait to be stopped (ending early would count as a crash).
                            stop.cancelled().await;
                            return;
                        }
                    }
                    Err(error) => store.recover(&error, &lanes).await,
                }
            }
            if with_webhooks {
                move_events(&store, &webhooks, &clock, Source::Own, &lanes).await;
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
/// those it finished. An event whose client's line is full is dropped and counted there, and
/// acknowledged with the finished ones: the feeder never stops reading a stream because one
/// client's endpoint is down, so every other client's events keep flowing. Returns how many it
/// read.
async fn move_events(
    store: &RedisStore,
    webhooks: &crate::webhook::Webhooks,
    clock: &crate::clock::Clock,
    source: Source,
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
    for group in 0..GROUPS {
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
            if !lock(&store.shared.held_events).insert((group, entry)) {
                continue;
            }
            webhooks.enqueue(event, Some((group, entry.into())), clock.now_ms());
            taken += 1;
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

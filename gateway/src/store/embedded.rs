//! The embedded back-end: verifications, the live-per-phone index, failed-check counters,
//! idempotency keys, the send limiters and the receipt index, all in process memory.
//!
//! The data is split into shards, each behind a `std::sync::Mutex` (no lock is ever held across
//! an `.await`). A verification lives in the shard of its phone number, and its id carries that
//! shard in its first byte, so one lock covers everything a call touches: the verification, the
//! phone's live index and its failed-check counter. A call's rule runs under that lock and its
//! effects are applied before the lock is let go, so what a rule raises is in the order of the
//! changes. Every call here completes without waiting: its `async` face is the seam's.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::error::ApiError;
use crate::guess_caps::{GuessCaps, GuessLimiter};
use crate::ids::{CarrierId, ClientId, VerificationId};
use crate::queue::{Job, PushError, Queue};
use crate::ratelimit::{Limiters, Rejection};
use crate::receipt::{EarlyReceipts, ReceiptIndex, ReceiptStatus};
use crate::routing::CarrierSet;
use crate::store::effects::{
    Claim, DeadlineWrite, Effects, Held, Keys, LaneBacklog, Outcome, Shard,
};
use crate::store::watchers::Watchers;
use crate::sync::lock;
use crate::webhook::Webhooks;

/// Shards in the embedded store: enough that two cores rarely meet on one lock.
const N_SHARDS: usize = 64;

/// Early receipts held at most at once; beyond it the oldest count as unmatched.
const EARLY_RECEIPTS_HELD: usize = 100_000;

/// How often the receipt index forgets the ids of verifications that are gone.
const RECEIPT_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How long an `Idempotency-Key` claimed by a request that never settled it holds.
const IDEMPOTENCY_CLAIM_MS: Millis = 30_000;

/// The embedded back-end.
pub struct Embedded {
    shards: Box<[Mutex<Shard>]>,
    idempotency: Box<[Mutex<HashMap<IdempotencyKey, Idempotency>>]>,
    limiters: Limiters,
    /// The caps on wrong codes per citizen address and per client.
    guesses: GuessLimiter,
    receipts: ReceiptIndex,
    early_receipts: EarlyReceipts,
    /// When the receipt index was last cleaned of verifications that are gone (clock time).
    last_receipt_sweep: Mutex<Duration>,
    queue: Queue,
    webhooks: Webhooks,
    watchers: Watchers,
    clock: Clock,
    retention_ms: Millis,
    idempotency_ttl_ms: Millis,
    failed_window_ms: Millis,
}

/// An `Idempotency-Key` as sent by one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct IdempotencyKey {
    client: ClientId,
    key: Box<str>,
}

/// What a key is doing: claimed by a request still being served, or settled on a verification.
#[derive(Debug, Clone, Copy)]
struct Idempotency {
    /// A hash of the request it came with; the same key with another request is refused.
    fingerprint: u64,
    id: Option<VerificationId>,
    since_ms: Millis,
}

/// What the embedded back-end is built from.
#[derive(Debug)]
pub struct EmbeddedParts {
    pub limiters: Limiters,
    pub queue: Queue,
    pub webhooks: Webhooks,
    pub clock: Clock,
    pub retention: Duration,
    pub idempotency_ttl: Duration,
    pub failed_checks_window: Duration,
    pub guess_caps: GuessCaps,
}

// === impl Embedded ===

impl Embedded {
    pub fn new(parts: EmbeddedParts) -> Embedded {
        Embedded {
            shards: (0..N_SHARDS)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            idempotency: (0..N_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limiters: parts.limiters,
            guesses: GuessLimiter::new(parts.guess_caps),
            receipts: ReceiptIndex::new(),
            early_receipts: EarlyReceipts::new(EARLY_RECEIPTS_HELD),
            last_receipt_sweep: Mutex::new(Duration::ZERO),
            queue: parts.queue,
            webhooks: parts.webhooks,
            watchers: Watchers::new(),
            clock: parts.clock,
            retention_ms: parts.retention.as_millis() as Millis,
            idempotency_ttl_ms: parts.idempotency_ttl.as_millis() as Millis,
            failed_window_ms: parts.failed_checks_window.as_millis() as Millis,
        }
    }

    pub fn watchers(&self) -> &Watchers {
        &self.watchers
    }

    pub fn limiters(&self) -> &Limiters {
        &self.limiters
    }

    /// Runs `body` on the shard `keys` name, under its lock, and applies its effects there.
    pub fn run<T>(
        &self,
        keys: Keys,
        body: impl FnOnce(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let now = self.clock.now_ms();
        let mut shard = lock(self.shard(keys.shard_byte));
        let mut effects = Effects::default();
        let result = body(&mut shard, &mut effects, now);
        self.write_deadline(&mut shard, &effects);
        self.apply(effects, now);
        result
    }

    /// [`Embedded::run`], leaving the effects but the deadline to the caller.
    pub fn run_deferring<T>(
        &self,
        keys: Keys,
        body: impl FnOnce(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<Outcome<T>, ApiError> {
        let now = self.clock.now_ms();
        let mut shard = lock(self.shard(keys.shard_byte));
        let mut effects = Effects::default();
        let result = body(&mut shard, &mut effects, now);
        self.write_deadline(&mut shard, &effects);
        drop(shard);
        match result {
            Ok(value) => Ok(Outcome::Ran {
                value,
                effects: Box::new(effects),
                written: None,
            }),
            Err(error) => {
                self.apply(effects, now);
                Err(error)
            }
        }
    }

    /// What a call raised outside the store: webhook events, delay watches, long-polls.
    pub fn apply(&self, effects: Effects, now: Millis) {
        effects.apply(&self.webhooks, &self.watchers, now);
    }

    fn write_deadline(&self, shard: &mut Shard, effects: &Effects) {
        let Some((id, write)) = effects.deadline else {
            return;
        };
        let at = match write {
            DeadlineWrite::Keep => return,
            DeadlineWrite::At(at) => at,
            // Ended: forgotten at the end of its retention.
            DeadlineWrite::Remove => match shard.records.get(&id).and_then(|r| r.ended_ms) {
                Some(ended) => ended + self.retention_ms,
                None => return,
            },
        };
        shard.deadlines.push(Reverse((at, id)));
    }

    pub fn enqueue(&self, job: Job) -> Result<u64, PushError> {
        self.queue.push(job)
    }

    /// Puts a job back in line, and notes its new place on its verification.
    pub fn requeue(&self, job: Job) {
        let id = job.id;
        let mut shard = lock(self.shard(id.shard_byte()));
        let ticket = self.queue.requeue(job);
        if let Some(record) = shard.records.get_mut(&id) {
            record.queue_ticket = ticket;
        }
    }

    pub fn queue_is_full(&self) -> bool {
        self.queue.len() >= self.queue.capacity()
    }

    pub fn ahead_of_new(&self, lane: u8, carriers: CarrierSet) -> usize {
        self.queue.ahead_of_new(lane, carriers)
    }

    pub fn ahead_of(&self, lane: u8, ticket: u64, carriers: CarrierSet) -> usize {
        self.queue.ahead_of(lane, ticket, carriers)
    }

    /// Every lane's depth, and the jobs ahead of a new one for any carrier.
    pub fn backlog(&self) -> Vec<LaneBacklog> {
        self.queue
            .depths()
            .into_iter()
            .map(|lane| LaneBacklog {
                lane: lane.lane,
                depth: lane.depth,
                ahead_of_new: self.queue.ahead_of_new(lane.lane, CarrierSet::MAX),
            })
            .collect()
    }

    // --- limits ---

    pub fn limit_client(&self, client: ClientId) -> Result<(), Rejection> {
        self.limiters.check_client(client)
    }

    pub fn limit_ip(&self, ip: IpAddr) -> Result<(), Rejection> {
        self.limiters.check_ip(ip)
    }

    /// The prefix first: it is the narrower limit, the one a walk through a range meets, and
    /// a refusal by it leaves the country's budget of sends alone.
    pub fn limit_destination(&self, country: &str, prefix: &str) -> Result<(), Rejection> {
        self.limiters.check_prefix(prefix)?;
        self.limiters.check_country(country)
    }

    pub fn spend_phone(&self, phone: u64) -> Result<(), Rejection> {
        self.limiters.check_phone(phone)
    }

    /// Whether `ip` and `client` may have a code compared (spends nothing).
    pub fn peek_guesses(&self, ip: Option<IpAddr>, client: ClientId) -> Result<(), Rejection> {
        let now = self.clock.now_ms();
        for guesser in self.guesses.caps().guessers(ip, client) {
            self.guesses.peek(guesser, now)?;
        }
        Ok(())
    }

    /// Spends one wrong code of the caps of `ip` and `client`.
    pub fn spend_guess(&self, ip: Option<IpAddr>, client: ClientId) {
        let now = self.clock.now_ms();
        for guesser in self.guesses.caps().guessers(ip, client) {
            self.guesses.spend(guesser, now);
        }
    }

    // --- idempotency keys ---

    /// Claims `key` for a request with `fingerprint`, or says who holds it.
    pub fn claim(&self, client: ClientId, key: &str, fingerprint: u64) -> Claim {
        let now = self.clock.now_ms();
        let key = IdempotencyKey {
            client,
            key: key.into(),
        };
        let mut map = lock(self.idempotency_shard(&key));
        if let Some(held) = map.get(&key).copied() {
            let fresh = match held.id {
                Some(_) => now < held.since_ms + self.idempotency_ttl_ms,
                None => now < held.since_ms + IDEMPOTENCY_CLAIM_MS,
            };
            if fresh {
                return match held.id {
                    Some(id) => Claim::Done {
                        fingerprint: held.fingerprint,
                        id,
                    },
                    None => Claim::Pending {
                        fingerprint: held.fingerprint,
                    },
                };
            }
        }
        map.insert(
            key,
            Idempotency {
                fingerprint,
                id: None,
                since_ms: now,
            },
        );
        Claim::Claimed
    }

    /// Records that the request holding `key` created or found `id`.
    pub fn settle(&self, client: ClientId, key: &str, fingerprint: u64, id: VerificationId) {
        let key = IdempotencyKey {
            client,
            key: key.into(),
        };
        let since_ms = self.clock.now_ms();
        lock(self.idempotency_shard(&key)).insert(
            key,
            Idempotency {
                fingerprint,
                id: Some(id),
                since_ms,
            },
        );
    }

    pub fn release(&self, client: ClientId, key: &str) {
        let key = IdempotencyKey {
            client,
            key: key.into(),
        };
        lock(self.idempotency_shard(&key)).remove(&key);
    }

    // --- receipts ---

    pub fn find_receipt(&self, carrier: CarrierId, id: &str) -> Option<VerificationId> {
        self.receipts.find(carrier, id)
    }

    pub fn index_receipt(&self, carrier: CarrierId, id: &str, verification: VerificationId) {
        self.receipts.insert(carrier, id, verification);
    }

    /// Holds a receipt that matched nothing yet; returns the carriers of the receipts it
    /// evicted, which count as unmatched.
    pub fn hold_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
        status: ReceiptStatus,
    ) -> Vec<CarrierId> {
        self.early_receipts
            .hold(carrier, id, status, self.clock.now_ms())
    }

    pub fn take_held_receipt(&self, carrier: CarrierId, id: &str) -> Option<Held> {
        self.early_receipts
            .take(carrier, id)
            .map(|(id, status)| Held { id, status })
    }

    pub fn expired_receipts(&self, now: Millis) -> Vec<CarrierId> {
        self.early_receipts.expire(now)
    }

    // --- the sweep ---

    /// The pending verifications whose deadline has come; forgets along the way those past
    /// their retention.
    pub fn due(&self, now: Millis) -> Vec<VerificationId> {
        let mut due = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            while let Some(&Reverse((deadline, id))) = shard.deadlines.peek() {
                if deadline > now {
                    break;
                }
                shard.deadlines.pop();
                let Some(record) = shard.records.get(&id) else {
                    continue;
                };
                match record.ended_ms {
                    Some(ended) if now >= ended + self.retention_ms => {
                        shard.records.remove(&id);
                    }
                    Some(ended) => shard
                        .deadlines
                        .push(Reverse((ended + self.retention_ms, id))),
                    None => due.push(id),
                }
            }
        }
        due
    }

    /// SMS still queued past their clients' thresholds: `(id, send)`.
    pub fn due_delays(&self, now: Millis) -> Vec<(VerificationId, u8)> {
        self.webhooks.due_delays(now)
    }

    /// Trims what only grows: failed checks out of their window, settled idempotency keys,
    /// the receipt index (once a minute), long-poll watchers, limiter keys. Returns the number
    /// of verifications held and the limiters' phone and IP keys.
    pub fn housekeep(&self, now: Millis) -> (usize, usize, usize) {
        let mut n_records = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let window_ms = self.failed_window_ms;
            shard
                .failed_checks
                .retain(|_, failed| now < failed.window_start_ms + window_ms);
            n_records += shard.records.len();
        }
        for map in self.idempotency.iter() {
            lock(map).retain(|_, held| match held.id {
                Some(_) => now < held.since_ms + self.idempotency_ttl_ms,
                None => now < held.since_ms + IDEMPOTENCY_CLAIM_MS,
            });
        }
        self.guesses.housekeep(now);
        self.watchers.prune();
        let elapsed = self.clock.elapsed();
        let receipts_due = {
            let mut last = lock(&self.last_receipt_sweep);
            let due = elapsed >= *last + RECEIPT_SWEEP_EVERY;
            if due {
                *last = elapsed;
            }
            due
        };
        if receipts_due {
            // Ids of verifications past retention go; one lock at a time, never with a shard
            // lock held first.
            self.receipts
                .retain(|id| lock(self.shard(id.shard_byte())).records.contains_key(id));
        }
        let (n_phone_keys, n_ip_keys) = self.limiters.housekeep();
        (n_records, n_phone_keys, n_ip_keys)
    }

    fn shard(&self, shard_byte: u8) -> &Mutex<Shard> {
        &self.shards[shard_byte as usize % N_SHARDS]
    }

    fn idempotency_shard(
        &self,
        key: &IdempotencyKey,
    ) -> &Mutex<HashMap<IdempotencyKey, Idempotency>> {
        let mut stable = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(key, &mut stable);
        &self.idempotency[stable.finish() as usize % N_SHARDS]
    }
}

impl fmt::Debug for Embedded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedded")
            .field("shards", &N_SHARDS)
            .finish_non_exhaustive()
    }
}

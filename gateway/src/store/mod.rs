//! Where verifications live, behind one seam: [`Backend`], the embedded store in process memory
//! or Redis (standalone or Cluster).
//!
//! The engine's rules run on a [`Shard`] and record what they cause in [`Effects`]
//! (`effects.rs`); a back-end runs a rule where its data is safe to change and applies or
//! commits its effects. Each back-end also owns idempotency keys, the send limits, the receipt
//! index, the deadlines the sweep looks at, and the backlog behind admission and
//! `eta_seconds`. The engine calls the same methods whichever it is.

pub mod effects;
pub mod embedded;
pub mod redis;
pub mod watchers;

use std::net::IpAddr;

use crate::clock::Millis;
use crate::error::ApiError;
use crate::ids::{AckToken, CarrierId, ClientId, VerificationId};
use crate::queue::{Job, PushError};
use crate::ratelimit::Rejection;
use crate::receipt::ReceiptStatus;
use crate::routing::CarrierSet;

pub use self::effects::{
    Claim, DeadlineWrite, Effects, FailedChecks, Held, Keys, LaneBacklog, Outcome, Shard, Snapshot,
};
use self::embedded::Embedded;
use self::redis::backend::RedisBackend;
use self::watchers::Watchers;

/// The back-end the engine runs on.
#[derive(Debug)]
pub enum Backend {
    Embedded(Embedded),
    Redis(RedisBackend),
}

/// What a sweep's housekeeping found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Housekeeping {
    /// Verifications held (embedded).
    pub records: Option<usize>,
    /// The limiters' phone and IP keys (embedded).
    pub limiter_keys: Option<(usize, usize)>,
}

// === impl Backend ===

impl Backend {
    /// `"embedded"` or `"redis"`, as `/readyz` says.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Embedded(_) => "embedded",
            Backend::Redis(_) => "redis",
        }
    }

    /// Whether the store answers now (the embedded one always does).
    pub async fn is_up(&self) -> bool {
        match self {
            Backend::Embedded(_) => true,
            Backend::Redis(redis) => redis.ping().await,
        }
    }

    /// Whether a call waits on the network. Then the dispatcher prepares each job inside its
    /// submit future (so a window's round trips overlap), a start runs in a task of its own
    /// (so a client that hangs up cannot cancel it between its write and its answer), and a
    /// long-poll looks again now and then for changes other instances made.
    pub fn is_remote(&self) -> bool {
        matches!(self, Backend::Redis(_))
    }

    pub fn watchers(&self) -> &Watchers {
        match self {
            Backend::Embedded(embedded) => embedded.watchers(),
            Backend::Redis(redis) => redis.watchers(),
        }
    }

    // --- running a rule ---

    /// Runs `body` on the data `keys` name, and applies what it caused once its changes stand.
    pub async fn run<T>(
        &self,
        keys: Keys,
        body: impl FnMut(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        match self {
            Backend::Embedded(embedded) => embedded.run(keys, body),
            Backend::Redis(redis) => redis.run(keys, body).await,
        }
    }

    /// [`Backend::run`], leaving the effects to the caller ([`Backend::apply`]), and starting
    /// from `preloaded` when a back-end that reads can (Redis).
    pub async fn run_deferring<T>(
        &self,
        keys: Keys,
        preloaded: Option<Snapshot>,
        body: impl FnMut(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<Outcome<T>, ApiError> {
        match self {
            Backend::Embedded(embedded) => embedded.run_deferring(keys, body),
            Backend::Redis(redis) => redis.run_deferring(keys, preloaded, body).await,
        }
    }

    pub fn apply(&self, effects: Effects, now: Millis) {
        match self {
            Backend::Embedded(embedded) => embedded.apply(effects, now),
            Backend::Redis(redis) => redis.apply(effects, now),
        }
    }

    /// Queues `job` for a rule: at once (embedded, which answers its ticket in the queue), or
    /// with the rule's commit.
    pub fn enqueue(&self, effects: &mut Effects, job: Job) -> Result<u64, PushError> {
        match self {
            Backend::Embedded(embedded) => embedded.enqueue(job),
            Backend::Redis(_) => {
                effects.job = Some(job);
                Ok(0)
            }
        }
    }

    /// Spends one send of `phone`'s limit for a rule: at once, or with the rule's commit (which
    /// refuses the whole write if the limit does, and runs the rule again with the refusal).
    pub fn spend_phone(&self, effects: &mut Effects, phone: u64) -> Result<(), Rejection> {
        match self {
            Backend::Embedded(embedded) => embedded.spend_phone(phone),
            Backend::Redis(_) => match effects.phone_refused {
                Some(rejection) => Err(rejection),
                None => {
                    effects.spends_phone_limit = true;
                    Ok(())
                }
            },
        }
    }

    /// Puts a job that is still due back in this instance's queue.
    pub fn requeue(&self, job: Job) {
        match self {
            Backend::Embedded(embedded) => embedded.requeue(job),
            Backend::Redis(redis) => redis.requeue(job),
        }
    }

    /// Lets go of a job this instance could not record: it is read again and retried.
    pub fn release(&self, token: Option<AckToken>) {
        if let (Backend::Redis(redis), Some(token)) = (self, token) {
            redis.release(token);
        }
    }

    // --- limits ---

    /// Spends one start of the client's limit; `Some` when it refused.
    pub async fn limit_client(&self, client: ClientId) -> Result<Option<Rejection>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.limit_client(client).err()),
            Backend::Redis(redis) => redis.limit_client(client).await,
        }
    }

    /// Spends one send of a citizen IP's limits; `Some` when one refused.
    pub async fn limit_ip(&self, ip: IpAddr) -> Result<Option<Rejection>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.limit_ip(ip).err()),
            Backend::Redis(redis) => redis.limit_ip(ip).await,
        }
    }

    /// Spends one verification of a phone country's velocity limit (`country_sends`) and of
    /// its number prefix's (`prefix_sends`); `Some` when one refused.
    pub async fn limit_destination(
        &self,
        country: &str,
        prefix: &str,
    ) -> Result<Option<Rejection>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.limit_destination(country, prefix).err()),
            Backend::Redis(redis) => redis.limit_destination(country, prefix).await,
        }
    }

    /// Whether a check from `ip` (its limit key, when known) through `client` may have its code
    /// compared: `Some` with the guessing cap that refuses. Spends nothing: only a wrong code
    /// spends the caps ([`Backend::spend_guess`]).
    pub async fn peek_guesses(
        &self,
        ip: Option<IpAddr>,
        client: ClientId,
    ) -> Result<Option<Rejection>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.peek_guesses(ip, client).err()),
            Backend::Redis(redis) => redis.peek_guesses(ip, client).await,
        }
    }

    /// Spends one wrong code of the guessing caps of `ip` and `client`.
    pub async fn spend_guess(&self, ip: Option<IpAddr>, client: ClientId) -> Result<(), ApiError> {
        match self {
            Backend::Embedded(embedded) => {
                embedded.spend_guess(ip, client);
                Ok(())
            }
            Backend::Redis(redis) => redis.spend_guess(ip, client).await,
        }
    }

    /// Whether a new verification spends a country or a prefix limit.
    pub fn has_destination_rules(&self) -> bool {
        match self {
            Backend::Embedded(embedded) => {
                let limiters = embedded.limiters();
                !limiters.country_rules().is_empty() || !limiters.prefix_rules().is_empty()
            }
            Backend::Redis(redis) => redis.has_destination_rules(),
        }
    }

    /// Spends one SMS of every budget in `budgets` (`crate::budget`), or none; `Some` when one
    /// refused. The embedded back-end keeps the buckets in `held`; Redis keeps them shared.
    pub async fn spend_budgets(
        &self,
        held: &crate::budget::Budgets,
        budgets: &[crate::budget::BudgetKey],
        now: Millis,
    ) -> Result<Option<crate::budget::BudgetRefusal>, ApiError> {
        if budgets.is_empty() {
            return Ok(None);
        }
        match self {
            Backend::Embedded(_) => Ok(held.spend_here(budgets, now).err()),
            Backend::Redis(redis) => redis.spend_budgets(budgets).await,
        }
    }

    /// Whether a new verification spends an IP limit (else a start needs one round, not two).
    pub fn has_ip_rules(&self) -> bool {
        match self {
            Backend::Embedded(embedded) => !embedded.limiters().ip_rules().is_empty(),
            Backend::Redis(redis) => redis.has_ip_rules(),
        }
    }

    // --- idempotency keys ---

    pub async fn claim(
        &self,
        client: ClientId,
        key: &str,
        fingerprint: u64,
    ) -> Result<Claim, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.claim(client, key, fingerprint)),
            Backend::Redis(redis) => redis.claim(client, key, fingerprint).await,
        }
    }

    /// Records what the request holding `key` answered; a failure is logged (the key then
    /// frees itself when its claim runs out).
    pub async fn settle(&self, client: ClientId, key: &str, fingerprint: u64, id: VerificationId) {
        match self {
            Backend::Embedded(embedded) => embedded.settle(client, key, fingerprint, id),
            Backend::Redis(redis) => {
                if let Err(error) = redis.settle(client, key, fingerprint, id).await {
                    tracing::warn!(%error, "an Idempotency-Key could not be recorded");
                }
            }
        }
    }

    /// Frees `key`: its request failed, or its verification is gone.
    pub async fn release_key(&self, client: ClientId, key: &str) -> Result<(), ApiError> {
        match self {
            Backend::Embedded(embedded) => {
                embedded.release(client, key);
                Ok(())
            }
            Backend::Redis(redis) => redis.release_key(client, key).await.map_err(|error| {
                tracing::warn!(%error, "an Idempotency-Key could not be released");
                ApiError::StoreUnavailable
            }),
        }
    }

    // --- receipts ---

    /// The verification a receipt from `carrier` for `id` may belong to.
    pub async fn find_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
    ) -> Result<Option<VerificationId>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.find_receipt(carrier, id)),
            Backend::Redis(redis) => redis.find_receipt(carrier, id).await,
        }
    }

    /// Indexes the id `carrier` accepted an SMS of `verification` with; a failure is logged
    /// (its receipts then go unmatched).
    pub async fn index_receipt(&self, carrier: CarrierId, id: &str, verification: VerificationId) {
        match self {
            Backend::Embedded(embedded) => embedded.index_receipt(carrier, id, verification),
            Backend::Redis(redis) => {
                if let Err(error) = redis.index_receipt(carrier, id, verification).await {
                    tracing::warn!(%error, verification = %verification, "a carrier message id could not be indexed for receipts");
                }
            }
        }
    }

    /// Holds a receipt that matched nothing yet; returns the carriers of receipts it pushed
    /// out to make room (they count as unmatched).
    pub async fn hold_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
        status: ReceiptStatus,
    ) -> Result<Vec<CarrierId>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.hold_receipt(carrier, id, status)),
            Backend::Redis(redis) => redis
                .hold_receipt(carrier, id, status)
                .await
                .map(|()| Vec::new()),
        }
    }

    /// Takes the receipt held for this carrier and id, if one came early.
    pub async fn take_held_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
    ) -> Result<Option<Held>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.take_held_receipt(carrier, id)),
            Backend::Redis(redis) => redis.take_held_receipt(carrier, id).await,
        }
    }

    /// Receipts held past their wait: the carriers they came from.
    pub async fn expired_receipts(&self, now: Millis) -> Vec<CarrierId> {
        match self {
            Backend::Embedded(embedded) => embedded.expired_receipts(now),
            Backend::Redis(redis) => redis.expired_receipts(now).await,
        }
    }

    // --- the sweep, admission and gauges ---

    /// Trims what only grows. Walks the embedded store: call it off the request-serving
    /// workers.
    pub fn housekeep(&self, now: Millis) -> Housekeeping {
        match self {
            Backend::Embedded(embedded) => {
                let (records, phone_keys, ip_keys) = embedded.housekeep(now);
                Housekeeping {
                    records: Some(records),
                    limiter_keys: Some((phone_keys, ip_keys)),
                }
            }
            Backend::Redis(redis) => {
                redis.watchers().prune();
                Housekeeping::default()
            }
        }
    }

    /// The pending verifications whose deadline has come.
    pub async fn due(&self, now: Millis) -> Result<Vec<VerificationId>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.due(now)),
            Backend::Redis(redis) => redis.due(now).await,
        }
    }

    /// SMS still queued past their clients' thresholds: `(id, send)`.
    pub async fn due_delays(&self, now: Millis) -> Result<Vec<(VerificationId, u8)>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.due_delays(now)),
            Backend::Redis(redis) => redis.due_delays(now).await,
        }
    }

    /// Every lane's backlog, read now (Redis: also kept for admission until the next sweep).
    pub async fn backlog(&self) -> Result<Vec<LaneBacklog>, ApiError> {
        match self {
            Backend::Embedded(embedded) => Ok(embedded.backlog()),
            Backend::Redis(redis) => redis.backlog().await,
        }
    }

    /// Pending verifications in a shared store (Redis), every instance's.
    pub async fn pending_count(&self) -> Option<u64> {
        match self {
            Backend::Embedded(_) => None,
            Backend::Redis(redis) => redis.pending_count().await,
        }
    }

    /// Whether the queue (every instance's, on Redis) is full.
    pub fn queue_is_full(&self) -> bool {
        match self {
            Backend::Embedded(embedded) => embedded.queue_is_full(),
            Backend::Redis(redis) => redis.queue_is_full(),
        }
    }

    /// Jobs ahead of a new one in `lane` that `carriers` may take.
    pub fn ahead_of_new(&self, lane: u8, carriers: CarrierSet) -> usize {
        match self {
            Backend::Embedded(embedded) => embedded.ahead_of_new(lane, carriers),
            Backend::Redis(redis) => redis.backlog_ahead(lane),
        }
    }

    /// Jobs ahead of the queued job with `ticket` in `lane`.
    pub fn ahead_of(&self, lane: u8, ticket: u64, carriers: CarrierSet) -> usize {
        match self {
            Backend::Embedded(embedded) => embedded.ahead_of(lane, ticket, carriers),
            Backend::Redis(redis) => redis.backlog_ahead(lane),
        }
    }
}

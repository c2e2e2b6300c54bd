//! The engine's side of the redis back-end: a call's rule runs on a copy of the keys it read,
//! and what it changed and caused is written back in one `COMMIT` (optimistic concurrency: if
//! another instance changed the verification meanwhile, read again and run again).

use std::net::IpAddr;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::config::{Rule, VerificationPolicy};
use crate::error::ApiError;
use crate::guess_caps::GuessCaps;
use crate::ids::{AckToken, CarrierId, ClientId, VerificationId};
use crate::queue::{Job, Queue};
use crate::ratelimit::{LimitKind, Limiters, Rejection};
use crate::receipt::ReceiptStatus;
use crate::store::effects::{
    Claim, DeadlineWrite, Effects, Held, Keys, LaneBacklog, Outcome, Shard, Snapshot,
};
use crate::store::redis::{
    Commit, Committed, FailedChecksOf, GROUPS, GuessOp, IdempotencyHolder, LiveWrite, LoadKeys,
    Loaded, RedisStore, StoreError, encode_record,
};
use crate::store::watchers::Watchers;
use crate::sync::lock;
use crate::verification::Verification;
use crate::webhook::{RenderedEvent, Webhooks};

/// Tries of a call whose verification another instance keeps changing.
const TXN_ROUNDS: usize = 16;
/// How long a receipt that matches nothing yet waits for its submit answer.
const EARLY_RECEIPT_HOLD: Duration = Duration::from_secs(30);
/// Due verifications a sweep takes per group and pass.
const SWEEP_BATCH: usize = 1024;

/// The redis back-end, as the engine sees it.
#[derive(Debug)]
pub struct RedisBackend {
    store: RedisStore,
    limiters: Limiters,
    /// Whether clients are configured: anonymous use has no client limit worth a round trip.
    has_clients: bool,
    queue: Queue,
    webhooks: Webhooks,
    watchers: Watchers,
    clock: Clock,
    policy: VerificationPolicy,
    failed_checks_rule: Rule,
    /// The caps on wrong codes per citizen address and per client.
    guess_caps: GuessCaps,
    /// Jobs not yet acknowledged in each lane's streams, by every instance, as of the last
    /// sweep: `(lane, jobs)`.
    backlog: std::sync::Mutex<Vec<(u8, u64)>>,
}

/// What the redis back-end is built from.
#[derive(Debug)]
pub struct RedisParts {
    pub store: RedisStore,
    pub limiters: Limiters,
    pub has_clients: bool,
    pub queue: Queue,
    pub webhooks: Webhooks,
    pub clock: Clock,
    pub policy: VerificationPolicy,
    pub failed_checks_rule: Rule,
    pub guess_caps: GuessCaps,
}

// === impl RedisBackend ===

impl RedisBackend {
    pub fn new(parts: RedisParts) -> RedisBackend {
        RedisBackend {
            store: parts.store,
            limiters: parts.limiters,
            has_clients: parts.has_clients,
            queue: parts.queue,
            webhooks: parts.webhooks,
            watchers: Watchers::new(),
            clock: parts.clock,
            policy: parts.policy,
            failed_checks_rule: parts.failed_checks_rule,
            guess_caps: parts.guess_caps,
            backlog: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn watchers(&self) -> &Watchers {
        &self.watchers
    }

    /// Runs `body` on a copy of what `keys` name, writes back what it changed, then applies
    /// what it caused.
    pub async fn run<T>(
        &self,
        keys: Keys,
        body: impl FnMut(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        match self.run_deferring(keys, None, body).await? {
            Outcome::Ran { value, effects, .. } => {
                self.apply(*effects, self.clock.now_ms());
                Ok(value)
            }
            Outcome::NotOwned => Err(ApiError::StoreUnavailable),
        }
    }

    /// [`RedisBackend::run`], starting from a record already read (and its revision) when
    /// `preloaded` holds one, and leaving what the call caused outside Redis to the caller.
    pub async fn run_deferring<T>(
        &self,
        keys: Keys,
        mut preloaded: Option<Snapshot>,
        mut body: impl FnMut(&mut Shard, &mut Effects, Millis) -> Result<T, ApiError>,
    ) -> Result<Outcome<T>, ApiError> {
        let retention_ms = self.policy.retention.as_millis() as Millis;
        let load_keys = LoadKeys {
            group: keys.shard_byte % GROUPS,
            id: keys.id,
            live: keys.live,
            failed_checks: if keys.failed_checks {
                // A start names the phone and client; every other call, the record it reads.
                match (keys.id, keys.live) {
                    (None, Some(phone_and_client)) => FailedChecksOf::Phone(phone_and_client),
                    _ => FailedChecksOf::Record,
                }
            } else {
                FailedChecksOf::None
            },
        };
        let mut phone_refused = None;
        for _ in 0..TXN_ROUNDS {
            let loaded = match preloaded.take() {
                Some(snapshot) => Loaded {
                    live: None,
                    record: Some(*snapshot),
                    failed_checks: None,
                },
                None => self.store.load(load_keys).await.map_err(unavailable)?,
            };
            let now = self.clock.now_ms();
            let mut shard = Shard::default();
            let mut effects = Effects {
                phone_refused,
                ..Effects::default()
            };
            let loaded_id = keys.id.or(loaded.live);
            let mut before: Option<(u64, Vec<u8>)> = None;
            // Whose failed checks the call read and may write: the phone's and client's.
            let mut failed_owner = keys.live;
            if let (Some(id), Some((revision, record))) = (loaded_id, loaded.record) {
                // Past retention it is gone, as in the embedded store (Redis forgets it on its
                // own clock; a test's clock may run ahead).
                let gone = record
                    .ended_ms
                    .is_some_and(|ended| now >= ended + retention_ms);
                if !gone {
                    let blob = encode_record(&record).map_err(unavailable)?;
                    before = Some((revision, blob));
                    failed_owner = Some((record.phone.as_u64(), record.client));
                    if record.is_pending() {
                        shard
                            .live
                            .insert((record.phone.as_u64(), record.client), id);
                    }
                    shard.records.insert(id, Box::new(record));
                }
            }
            if let (Some(live), Some(key)) = (loaded.live, keys.live) {
                shard.live.insert(key, live);
            }
            if let (Some(owner), Some(failed)) = (failed_owner, loaded.failed_checks) {
                shard.failed_checks.insert(owner, failed);
            }
            let live_before = shard.live.clone();
            let failed_before = shard.failed_checks.clone();

            let result = body(&mut shard, &mut effects, now);

            let mut commit = Commit {
                group: load_keys.group,
                id: loaded_id,
                expected_revision: before.as_ref().map(|(revision, _)| *revision),
                check_revision: false,
                clock_offset_ms: self.clock.advanced_ms(),
                ..Commit::default()
            };
            // The one record the call may write: the one it read, or one it created.
            let mut changed = None;
            for (id, record) in &shard.records {
                let blob = encode_record(record).map_err(unavailable)?;
                let same =
                    Some(*id) == loaded_id && before.as_ref().is_some_and(|(_, old)| *old == blob);
                if !same {
                    changed = Some(*id);
                }
            }
            if let Some(id) = changed {
                let record = &shard.records[&id];
                if Some(id) != loaded_id {
                    commit.expected_revision = None;
                }
                commit.id = Some(id);
                commit.check_revision = true;
                commit.deadline = if record.is_pending() {
                    DeadlineWrite::At(record.next_deadline(now, &self.policy))
                } else {
                    DeadlineWrite::Remove
                };
                commit.record = Some(((**record).clone(), self.keep_for(record, now)));
            } else if let Some((_, deadline)) = effects.deadline {
                commit.deadline = deadline;
            }
            // The live index: what the call set or removed.
            if let Some(key) = keys.live {
                commit.live_key = Some(key);
                commit.check_live = true;
                commit.expected_live = loaded.live;
            }
            for (key, id) in &shard.live {
                if live_before.get(key) != Some(id) {
                    commit.live_key = Some(*key);
                    commit.live = LiveWrite::Set(*id);
                }
            }
            for (key, id) in &live_before {
                if !shard.live.contains_key(key) {
                    commit.live_key = Some(*key);
                    commit.live = LiveWrite::Remove(*id);
                }
            }
            if let Some(owner) = failed_owner {
                let after = shard.failed_checks.get(&owner).copied();
                let before = failed_before.get(&owner).copied();
                if before != after {
                    let window_ms = self.failed_checks_rule.per.as_millis() as Millis;
                    let keep = after.map_or(1, |failed| {
                        (failed.window_start_ms + window_ms)
                            .saturating_sub(now)
                            .max(1)
                    });
                    commit.failed_checks = Some((owner, after, Duration::from_millis(keep)));
                    // Two verifications of one phone may count wrong codes at once.
                    commit.expected_failed_checks = Some(before);
                }
            }
            // Webhook events go to the group's outbox stream with the change itself.
            let events: Vec<RenderedEvent> = effects
                .events
                .iter()
                .filter_map(|(client, kind, view)| self.webhooks.render(*client, *kind, view, now))
                .collect();
            commit.events = events.clone();
            commit.outbox_max = self.webhooks.stream_capacity();
            commit.changed = effects.notified.clone();
            // At most one SMS is queued per call: its delay watch goes with the change.
            commit.watch_delay = effects.delay_watches.first().and_then(|(client, _, send)| {
                Some((self.webhooks.delay_due(*client, now)?, *send))
            });
            commit.unwatch_delay = effects.unwatch_delay;
            commit.owns = effects.owns;
            commit.push = effects.job.clone();
            commit.ack = effects.ack;
            if effects.spends_phone_limit {
                let phone = failed_owner.map(|(phone, _)| phone);
                if let Some(phone) = phone.or(commit.record.as_ref().map(|(r, _)| r.phone.as_u64()))
                {
                    commit.phone_limit = Some((phone, self.limiters.phone_rules()));
                }
            }
            let writes = commit.record.is_some()
                || commit.live != LiveWrite::Keep
                || commit.failed_checks.is_some()
                || commit.deadline != DeadlineWrite::Keep
                || commit.push.is_some()
                || commit.ack.is_some()
                || commit.phone_limit.is_some()
                || !commit.events.is_empty()
                || commit.watch_delay.is_some()
                || commit.unwatch_delay.is_some()
                || commit.owns.is_some();
            let written_record = commit.record.clone();
            let mut written = None;
            let mut dropped_events = 0;
            if writes {
                match self.store.commit(commit).await.map_err(unavailable)? {
                    Committed::Done {
                        revision,
                        dropped_events: dropped,
                        ..
                    } => {
                        if let Some((record, _)) = written_record {
                            written = Some(Box::new((revision, record)));
                        }
                        dropped_events = dropped;
                    }
                    Committed::Conflict => continue,
                    Committed::NotOwned => return Ok(Outcome::NotOwned),
                    Committed::Limited { rule, retry_after } => {
                        let rules = self.limiters.phone_rules();
                        let Some(rule) = rules.get(rule).copied() else {
                            return Err(ApiError::StoreUnavailable);
                        };
                        phone_refused = Some(Rejection {
                            limit: LimitKind::Phone,
                            rule,
                            retry_after,
                        });
                        continue;
                    }
                }
            }
            // The commit wrote the events and the delay watch itself.
            effects.events.clear();
            effects.delay_watches.clear();
            for event in &events {
                self.webhooks.count(event);
            }
            // The stream was full: the last events were not written.
            for event in &events[events.len().saturating_sub(dropped_events)..] {
                self.webhooks.count_dropped(event.client, now);
            }
            return match result {
                Ok(value) => Ok(Outcome::Ran {
                    value,
                    effects: Box::new(effects),
                    written,
                }),
                Err(error) => {
                    self.apply(effects, now);
                    Err(error)
                }
            };
        }
        tracing::warn!(
            group = load_keys.group,
            "a verification changed under every try; giving up"
        );
        Err(ApiError::StoreUnavailable)
    }

    /// What a written call does outside Redis: webhook events and delay watches it did not
    /// commit, long-poll wake-ups.
    pub fn apply(&self, effects: Effects, now: Millis) {
        effects.apply(&self.webhooks, &self.watchers, now);
    }

    /// How long Redis keeps a record: past its retention once ended; while pending, past the
    /// latest it could expire plus retention.
    fn keep_for(&self, record: &Verification, now: Millis) -> Duration {
        let policy = &self.policy;
        let retention_ms = policy.retention.as_millis() as Millis;
        let until = match record.ended_ms {
            Some(ended) => ended + retention_ms,
            None => {
                record.created_ms
                    + (policy.code_ttl + policy.max_extension).as_millis() as Millis
                    + retention_ms
            }
        };
        Duration::from_millis(until.saturating_sub(now).max(1000))
    }

    /// Lets go of a job: read again from this instance's pending entries, it is sent again
    /// unless its verification ended meanwhile.
    pub fn release(&self, token: AckToken) {
        self.store.release(token);
    }

    // --- limits ---

    /// Spends one start of the client's limit; `Some` when it refused.
    pub async fn limit_client(&self, client: ClientId) -> Result<Option<Rejection>, ApiError> {
        if !self.has_clients {
            return Ok(None);
        }
        let Some(rule) = self.limiters.client_rule(client) else {
            return Ok(None);
        };
        let limited = self
            .store
            .limit_client(client, &[rule], self.clock.advanced_ms())
            .await
            .map_err(unavailable)?;
        Ok(limited.map(|(_, retry_after)| Rejection {
            limit: LimitKind::Client,
            rule,
            retry_after,
        }))
    }

    /// Spends one send of the IP's rules (all or nothing); `Some` when one refused.
    pub async fn limit_ip(&self, ip: IpAddr) -> Result<Option<Rejection>, ApiError> {
        let rules = self.limiters.ip_rules();
        if rules.is_empty() {
            return Ok(None);
        }
        let limited = self
            .store
            .limit_ip(ip, &rules, self.clock.advanced_ms())
            .await
            .map_err(unavailable)?;
        Ok(limited.map(|(rule, retry_after)| Rejection {
            limit: LimitKind::Ip,
            rule: rules[rule.min(rules.len() - 1)],
            retry_after,
        }))
    }

    /// Spends one verification of the phone country's and the number prefix's velocity
    /// limits, all or nothing; `Some` when one refused.
    pub async fn limit_destination(
        &self,
        country: &str,
        prefix: &str,
    ) -> Result<Option<Rejection>, ApiError> {
        let country_rules = self.limiters.country_rules();
        let prefix_rules = self.limiters.prefix_rules();
        if country_rules.is_empty() && prefix_rules.is_empty() {
            return Ok(None);
        }
        let limited = self
            .store
            .limit_destination(
                country,
                prefix,
                &country_rules,
                &prefix_rules,
                self.clock.advanced_ms(),
            )
            .await
            .map_err(unavailable)?;
        let Some((rule, retry_after)) = limited else {
            return Ok(None);
        };
        // The index comes from Redis: never trusted to fit this configuration's rules.
        let found = match rule.checked_sub(country_rules.len()) {
            None => country_rules
                .get(rule)
                .map(|rule| (LimitKind::CountryRate, *rule)),
            Some(rule) => prefix_rules
                .get(rule)
                .map(|rule| (LimitKind::PrefixRate, *rule)),
        };
        let Some((limit, rule)) = found else {
            return Err(ApiError::StoreUnavailable);
        };
        Ok(Some(Rejection {
            limit,
            rule,
            retry_after,
        }))
    }

    /// Spends one SMS of every budget in `budgets`, all or nothing, on Redis's clock.
    pub async fn spend_budgets(
        &self,
        budgets: &[crate::budget::BudgetKey],
    ) -> Result<Option<crate::budget::BudgetRefusal>, ApiError> {
        let refused = self
            .store
            .spend_budgets(budgets, self.clock.advanced_ms())
            .await
            .map_err(unavailable)?;
        let Some((index, retry_after)) = refused else {
            return Ok(None);
        };
        // The index comes from Redis: never trusted to fit `budgets`.
        let Some(budget) = budgets.get(index) else {
            return Err(ApiError::StoreUnavailable);
        };
        Ok(Some(crate::budget::BudgetRefusal {
            scope: budget.scope,
            rule: budget.rule,
            retry_after,
        }))
    }

    /// Whether `ip` and `client` may have a code compared (spends nothing); `Some` with the
    /// cap that refuses.
    pub async fn peek_guesses(
        &self,
        ip: Option<IpAddr>,
        client: ClientId,
    ) -> Result<Option<Rejection>, ApiError> {
        for guesser in self.guess_caps.guessers(ip, client) {
            let refused = self
                .store
                .guesses(
                    guesser,
                    self.guess_caps.rules(guesser),
                    GuessOp::Peek,
                    self.clock.advanced_ms(),
                )
                .await
                .map_err(unavailable)?;
            if let Some((rule, retry_after)) = refused {
                return Ok(Some(self.guess_caps.rejection(guesser, rule, retry_after)));
            }
        }
        Ok(None)
    }

    /// Spends one wrong code of the caps of `ip` and `client`.
    pub async fn spend_guess(&self, ip: Option<IpAddr>, client: ClientId) -> Result<(), ApiError> {
        for guesser in self.guess_caps.guessers(ip, client) {
            self.store
                .guesses(
                    guesser,
                    self.guess_caps.rules(guesser),
                    GuessOp::Spend,
                    self.clock.advanced_ms(),
                )
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Whether a start spends a country's or a prefix's limit between its two reads.
    pub fn has_destination_rules(&self) -> bool {
        !self.limiters.country_rules().is_empty() || !self.limiters.prefix_rules().is_empty()
    }

    /// Whether a start must spend the IP's limit between its two reads.
    pub fn has_ip_rules(&self) -> bool {
        !self.limiters.ip_rules().is_empty()
    }

    // --- idempotency keys ---

    pub async fn claim(
        &self,
        client: ClientId,
        key: &str,
        fingerprint: u64,
    ) -> Result<Claim, ApiError> {
        let held = self
            .store
            .claim_idempotency(client, key, fingerprint, self.policy.idempotency_ttl)
            .await
            .map_err(unavailable)?;
        Ok(match held {
            None => Claim::Claimed,
            Some(IdempotencyHolder::Done { fingerprint, id }) => Claim::Done { fingerprint, id },
            Some(IdempotencyHolder::Pending { fingerprint }) => Claim::Pending { fingerprint },
        })
    }

    pub async fn settle(
        &self,
        client: ClientId,
        key: &str,
        fingerprint: u64,
        id: VerificationId,
    ) -> Result<(), StoreError> {
        let ttl = self.policy.idempotency_ttl;
        self.store
            .settle_idempotency(client, key, fingerprint, id, ttl)
            .await
    }

    pub async fn release_key(&self, client: ClientId, key: &str) -> Result<(), StoreError> {
        self.store.release_idempotency(client, key).await
    }

    // --- receipts ---

    pub async fn find_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
    ) -> Result<Option<VerificationId>, ApiError> {
        self.store
            .find_receipt(carrier, id)
            .await
            .map_err(unavailable)
    }

    pub async fn index_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
        verification: VerificationId,
    ) -> Result<(), StoreError> {
        let policy = &self.policy;
        let keep = policy.retention + policy.code_ttl + policy.max_extension;
        self.store
            .index_receipt(carrier, id, verification, keep)
            .await
    }

    pub async fn hold_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
        status: ReceiptStatus,
    ) -> Result<(), ApiError> {
        self.store
            .hold_receipt(
                carrier,
                id,
                receipt_status_code(status),
                EARLY_RECEIPT_HOLD,
                self.clock.now_ms(),
            )
            .await
            .map_err(unavailable)
    }

    pub async fn take_held_receipt(
        &self,
        carrier: CarrierId,
        id: &str,
    ) -> Result<Option<Held>, ApiError> {
        let held = self
            .store
            .take_held_receipt(carrier, id)
            .await
            .map_err(unavailable)?;
        Ok(held.and_then(|(status, id)| {
            Some(Held {
                id: id.into(),
                status: receipt_status_of(status)?,
            })
        }))
    }

    pub async fn expired_receipts(&self, now: Millis) -> Vec<CarrierId> {
        self.store.expired_receipts(now).await.unwrap_or_default()
    }

    // --- the sweep ---

    /// Whether Redis answers; `false` ends a sweep early.
    pub async fn ping(&self) -> bool {
        self.store.ping().await
    }

    /// The verifications whose deadline has come, a batch per group.
    pub async fn due(&self, now: Millis) -> Result<Vec<VerificationId>, ApiError> {
        let mut due = Vec::new();
        for group in 0..GROUPS {
            let batch = self.store.due(group, now, SWEEP_BATCH).await;
            match batch {
                Ok(batch) => due.extend(batch),
                Err(error) => {
                    tracing::warn!(%error, "sweep: redis did not answer");
                    return Err(ApiError::StoreUnavailable);
                }
            }
        }
        Ok(due)
    }

    /// `verification.delayed` watches that are due: `(id, send)`.
    pub async fn due_delays(&self, now: Millis) -> Result<Vec<(VerificationId, u8)>, ApiError> {
        let mut due = Vec::new();
        for group in 0..GROUPS {
            let batch = self.store.due_delays(group, now, SWEEP_BATCH).await;
            due.extend(batch.map_err(unavailable)?);
        }
        Ok(due)
    }

    /// Reads every lane's backlog (the streams' lengths), and keeps it for admission and
    /// `eta_seconds` until the next sweep.
    pub async fn backlog(&self) -> Result<Vec<LaneBacklog>, ApiError> {
        let mut backlog = Vec::new();
        for lane in self.queue.depths() {
            let jobs = self.store.backlog(lane.lane).await.map_err(unavailable)?;
            backlog.push((lane.lane, jobs));
        }
        *lock(&self.backlog) = backlog.clone();
        Ok(backlog
            .into_iter()
            .map(|(lane, jobs)| LaneBacklog {
                lane,
                depth: jobs as usize,
                ahead_of_new: self.backlog_ahead(lane),
            })
            .collect())
    }

    /// Puts a job that is still due back in this instance's queue.
    pub fn requeue(&self, job: Job) {
        self.queue.requeue(job);
    }

    /// Pending verifications in Redis, every instance's.
    pub async fn pending_count(&self) -> Option<u64> {
        self.store.pending_count().await.ok()
    }

    /// Jobs ahead of a new one in `lane` across every instance, as of the last sweep.
    pub fn backlog_ahead(&self, lane: u8) -> usize {
        lock(&self.backlog)
            .iter()
            .filter(|(other, _)| *other >= lane)
            .map(|(_, jobs)| *jobs as usize)
            .sum()
    }

    pub fn queue_is_full(&self) -> bool {
        let backlog = lock(&self.backlog);
        backlog.iter().map(|(_, jobs)| jobs).sum::<u64>() >= self.queue.capacity() as u64
    }
}

fn unavailable(error: StoreError) -> ApiError {
    tracing::warn!(%error, "the store did not answer");
    ApiError::StoreUnavailable
}

fn receipt_status_code(status: ReceiptStatus) -> u8 {
    match status {
        ReceiptStatus::Delivered => 0,
        ReceiptStatus::Undeliverable => 1,
        ReceiptStatus::Expired => 2,
    }
}

fn receipt_status_of(code: u8) -> Option<ReceiptStatus> {
    match code {
        0 => Some(ReceiptStatus::Delivered),
        1 => Some(ReceiptStatus::Undeliverable),
        2 => Some(ReceiptStatus::Expired),
        _ => None,
    }
}

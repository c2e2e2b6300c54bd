//! The verification engine: start, read, check, resend and cancel, and the dispatcher's side of
//! a send (prepare, complete), over the store, the limiters and the queue.
//!
//! Every call runs synchronously under the lock of one store shard (the phone's), so a call sees
//! and changes one verification, its phone's live index and failed-check counter atomically.
//! Lock order is always shard, then queue; nothing here awaits while holding a lock.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::carrier::OutboundSms;
use crate::clock::{Clock, Millis};
use crate::config::{CarrierConfig, ClientConfig, Config, Rule, VerificationPolicy};
use crate::error::ApiError;
use crate::ids::{CarrierId, ClientId, VerificationId};
use crate::metrics::{Checked, Ended, Metrics, QueueDrop, QueueRefusal, Started};
use crate::otp::CodeKeys;
use crate::phone::Phone;
use crate::queue::{Job, PushError, Queue};
use crate::ratelimit::LimitKind;
use crate::ratelimit::Limiters;
use crate::receipt::{ReceiptIndex, ReceiptStatus};
use crate::store::redis::{
    Commit, Committed, FailedChecksOf, IdempotencyHolder, LiveWrite, LoadKeys, RedisStore,
    StoreError,
};
use crate::routing::{CarrierSet, Routes};
use crate::sms::{RenderParams, SmsText, Templates};
use crate::store::{
    DeadlineWrite, Deferred, FailedChecks, IdempotencyEntry, IdempotencyKey, Shard, Store,
};
use crate::sync::lock;
use crate::verification::{
    DeliveryState, EventKind, Extras, FailureReason, Status, Verification, View,
};
use crate::webhook::Webhooks;

/// The engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Verifier {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    policy: VerificationPolicy,
    failed_checks_rule: Rule,
    countries: crate::phone::CountryAllowList,
    limiters: Limiters,
    store: Store,
    queue: Queue,
    keys: CodeKeys,
    clock: Clock,
    metrics: Metrics,
    templates: Templates,
    clients: Clients,
    carriers: Vec<CarrierInfo>,
    /// Which carriers serve which numbers, and their configured paces (the basis of
    /// `eta_seconds` and of the queue's admission).
    routes: Routes,
    /// Events to clients' webhooks.
    webhooks: Webhooks,
    /// Cleared when shutdown begins: new verifications are refused from then on.
    accepting: AtomicBool,
    /// Carrier message ids of accepted SMS, for delivery receipts.
    receipts: ReceiptIndex,
    /// Receipts that came before their submit answer.
    early_receipts: crate::receipt::EarlyReceipts,
    /// When the receipt index was last cleaned of ended verifications (clock time).
    last_receipt_sweep: std::sync::Mutex<Duration>,
    /// The redis back-end, when configured; the embedded store then keeps only long-poll
    /// watchers.
    redis: Option<RedisStore>,
    /// Jobs not yet acknowledged in each lane's streams, by every instance (redis back-end),
    /// as of the last sweep: `(lane, jobs)`.
    backlog: std::sync::Mutex<Vec<(u8, u64)>>,
}

#[derive(Debug)]
struct Clients {
    by_key_hash: HashMap<[u8; 32], ClientId>,
    names: Vec<String>,
    priorities: Vec<u8>,
}

#[derive(Debug)]
struct CarrierInfo {
    name: String,
    from: Arc<str>,
    receipt_url: Arc<str>,
    receipt_token_sha256: Option<[u8; 32]>,
}

/// Early receipts held at most at once; beyond it the oldest count as unmatched.
const EARLY_RECEIPTS_HELD: usize = 100_000;

/// What became of a delivery receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptMatch {
    /// It matched an SMS this carrier accepted.
    Matched,
    /// No SMS has this id yet: held until the carrier's submit answer names it (or counted as
    /// unmatched after a while).
    Held,
    /// The SMS it names is gone (past retention).
    Unmatched,
}

/// A start request, validated by the route.
#[derive(Debug)]
pub struct NewVerification {
    pub phone: Phone,
    pub region: Option<phonenumber::country::Id>,
    /// The citizen's IP (the body's `client_ip`, else the peer address).
    pub ip: IpAddr,
    pub locale: Option<String>,
    pub web_origin_host: Option<String>,
    pub app_hash: Option<String>,
    /// `(key, request fingerprint)` when the request carried an `Idempotency-Key`.
    pub idempotency: Option<(String, u64)>,
}

/// The answer to a check.
#[derive(Debug, serde::Serialize)]
pub struct CheckAnswer {
    pub valid: bool,
    pub status: Status,
    pub attempts_left: u8,
}

/// What the dispatcher does with a job it took from the queue.
#[derive(Debug)]
pub enum Prepared {
    Send(OutboundSms),
    Dropped,
    /// The store did not answer: the job waits and is tried again.
    Later,
}

/// A carrier's answer, as the engine records it.
#[derive(Debug, Clone)]
pub enum Completion {
    Accepted {
        carrier_message_id: Option<String>,
    },
    /// The job goes back in line (throttled or a temporary failure).
    Retry,
    Permanent,
}

// === impl Verifier ===

impl Verifier {
    pub fn new(
        config: &Config,
        clock: Clock,
        metrics: Metrics,
        queue: Queue,
        webhooks: Webhooks,
        redis: Option<RedisStore>,
    ) -> Verifier {
        let secret = config.secret.clone().unwrap_or_else(|| {
            let mut secret = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
            secret
        });
        let clients = Clients::new(&config.clients);
        let anonymous_rate = Rule {
            max: std::num::NonZeroU32::new(100_000).unwrap_or(std::num::NonZeroU32::MIN),
            per: Duration::from_secs(1),
        };
        let carriers = config
            .carriers
            .iter()
            .map(|carrier: &CarrierConfig| CarrierInfo {
                name: carrier.name.clone(),
                from: carrier.from.as_str().into(),
                receipt_url: format!(
                    "{}/v1/carriers/{}/receipts",
                    config.public_url, carrier.name
                )
                .into(),
                receipt_token_sha256: carrier.receipt_token_sha256,
            })
            .collect();
        let routes = Routes::new(&config.carriers);
        Verifier {
            shared: Arc::new(Shared {
                policy: config.verification.clone(),
                failed_checks_rule: config.limits.failed_checks_per_phone,
                countries: config.limits.countries.clone(),
                limiters: Limiters::new(
                    &config.limits,
                    &config.clients,
                    anonymous_rate,
                    clock.clone(),
                ),
                store: Store::new(),
                queue,
                keys: CodeKeys::new(&secret, config.verification.code_length),
                clock,
                metrics,
                templates: config.templates.clone(),
                clients,
                carriers,
                routes,
                webhooks,
                accepting: AtomicBool::new(true),
                receipts: ReceiptIndex::new(),
                early_receipts: crate::receipt::EarlyReceipts::new(EARLY_RECEIPTS_HELD),
                last_receipt_sweep: std::sync::Mutex::new(Duration::ZERO),
                redis,
                backlog: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// The client an API key belongs to; with no clients configured, everyone is the anonymous
    /// client.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<ClientId, ApiError> {
        let clients = &self.shared.clients;
        if clients.by_key_hash.is_empty() {
            return Ok(0);
        }
        let key = bearer.ok_or(ApiError::Unauthorized)?;
        let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()).into();
        clients
            .by_key_hash
            .get(&hash)
            .copied()
            .ok_or(ApiError::Unauthorized)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    /// The redis back-end, when configured.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.shared.redis.as_ref()
    }

    pub fn code_length(&self) -> u8 {
        self.shared.keys.length()
    }

    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// Refuses new verifications from now on (shutdown has begun).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Starts a verification, or returns the live one of this phone and client.
    pub async fn start(
        &self,
        client: ClientId,
        request: NewVerification,
    ) -> Result<(Started, View), ApiError> {
        match &self.shared.redis {
            None => self.start_embedded(client, request),
            // In a task of its own: a client that hangs up must not cancel a start between
            // its write to Redis and its answer (the SMS would go, uncounted).
            Some(_) => {
                let verifier = self.clone();
                tokio::spawn(async move {
                    let Some(redis) = verifier.shared.redis.clone() else {
                        return Err(ApiError::StoreUnavailable);
                    };
                    verifier.start_redis(&redis, client, request).await
                })
                .await
                .unwrap_or(Err(ApiError::StoreUnavailable))
            }
        }
    }

    fn start_embedded(
        &self,
        client: ClientId,
        request: NewVerification,
    ) -> Result<(Started, View), ApiError> {
        let shared = &*self.shared;
        if !self.is_accepting() {
            return Err(ApiError::ShuttingDown);
        }
        shared
            .limiters
            .check_client(client)
            .map_err(|rejection| self.rejected(rejection))?;
        if !shared.countries.allows(request.region) {
            shared.metrics.rejected(LimitKind::Country);
            return Err(ApiError::CountryNotAllowed);
        }
        let carriers = shared.routes.eligible_for(&request.phone);
        if carriers == 0 {
            return Err(ApiError::NumberNotServed);
        }
        let now = shared.clock.now_ms();

        // The idempotency shard stays locked until the verification exists, so two requests with
        // one key cannot both create one.
        let idempotency_key = request.idempotency.as_ref().map(|(key, fingerprint)| {
            (
                IdempotencyKey {
                    client,
                    key: key.as_str().into(),
                },
                *fingerprint,
            )
        });
        let mut idempotency_guard = idempotency_key
            .as_ref()
            .map(|(key, _)| shared.store.idempotency(key));
        if let (Some(guard), Some((key, fingerprint))) =
            (idempotency_guard.as_mut(), idempotency_key.as_ref())
        {
            if let Some(entry) = guard.get(key).copied() {
                let fresh =
                    now < entry.created_ms + shared.policy.idempotency_ttl.as_millis() as Millis;
                if fresh {
                    if entry.fingerprint != *fingerprint {
                        return Err(ApiError::IdempotencyMismatch);
                    }
                    let mut shard = shared.store.shard(&entry.id);
                    if shard.records.contains_key(&entry.id) {
                        self.settle(&mut shard, &entry.id, now);
                        let view = self
                            .view_of(&shard, &entry.id, now)
                            .ok_or(ApiError::NotFound)?;
                        shared.metrics.started(Started::Replayed);
                        return Ok((Started::Replayed, view));
                    }
                }
                guard.remove(key);
            }
        }

        let phone = request.phone;
        let mut shard = shared.store.shard_of_phone(&phone);
        if let Some(id) = shard.live.get(&(phone.as_u64(), client)).copied() {
            self.settle(&mut shard, &id, now);
            if shard
                .records
                .get(&id)
                .is_some_and(|record| record.is_pending())
            {
                self.resend_if_due(&mut shard, &id, now);
                let view = self.view_of(&shard, &id, now).ok_or(ApiError::NotFound)?;
                remember(idempotency_guard.as_mut(), idempotency_key, id, now);
                shared.metrics.started(Started::Existing);
                return Ok((Started::Existing, view));
            }
        }

        // The queue first (it spends nothing), then the IP, then the phone: a limit is spent
        // only when everything before it allowed the send. The phone's budget is the one a
        // citizen feels, so it is spent last; repeated presses for a live verification never
        // get here (they return the existing one above).
        let lane = shared.clients.priority(client);
        self.admit(lane, carriers)?;
        shared
            .limiters
            .check_ip(request.ip)
            .map_err(|rejection| self.rejected(rejection))?;
        let id = self.create_in(&mut shard, client, &request, carriers, lane, now)?;
        remember(idempotency_guard.as_mut(), idempotency_key, id, now);
        let view = self.view_of(&shard, &id, now).ok_or(ApiError::NotFound)?;
        drop(shard);
        shared.metrics.started(Started::Created);
        tracing::debug!(verification = %id, phone = %phone, client = %shared.clients.name(client), "verification started");
        Ok((Started::Created, view))
    }

    /// The verification as it is now, with its version for long-polls.
    pub async fn get(
        &self,
        client: ClientId,
        id: &VerificationId,
    ) -> Result<(View, u32), ApiError> {
        self.with_record(id, false, |this, shard, now| {
            this.owned(shard, client, id)?;
            this.settle(shard, id, now);
            let version = shard.records.get(id).map_or(0, |record| record.version);
            let view = this.view_of(shard, id, now).ok_or(ApiError::NotFound)?;
            Ok((view, version))
        })
        .await
    }

    /// Waits until the verification's version differs from `version`, or `timeout` passes, or
    /// `cancel` fires; then returns it as it is, with its version.
    pub async fn wait_for_change(
        &self,
        client: ClientId,
        id: &VerificationId,
        version: u32,
        timeout: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(View, u32), ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // With the redis back-end another instance may make the change: look again this often.
        let poll = if self.shared.redis.is_some() {
            REDIS_LONG_POLL_EVERY
        } else {
            timeout
        };
        if self.shared.redis.is_some() {
            // Only a verification the client may see gets a watcher.
            self.get(client, id).await?;
        }
        loop {
            let notify = {
                let mut shard = self.shared.store.shard(id);
                if self.shared.redis.is_none() {
                    self.owned(&shard, client, id)?;
                }
                shard.watchers.entry(*id).or_default().clone()
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (view, current) = self.get(client, id).await?;
            if current != version {
                return Ok((view, current));
            }
            // Every change notifies, the sweeper's expiries included; otherwise the poll ends at
            // its deadline or at shutdown.
            let next_look = (tokio::time::Instant::now() + poll).min(deadline);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(next_look) => {
                    if next_look >= deadline {
                        return self.get(client, id).await;
                    }
                }
                _ = cancel.cancelled() => return self.get(client, id).await,
            }
        }
    }

    /// Checks a typed code.
    pub async fn check(
        &self,
        client: ClientId,
        id: &VerificationId,
        typed: &str,
    ) -> Result<CheckAnswer, ApiError> {
        let shared = &*self.shared;
        if !shared.keys.is_well_formed(typed) {
            return Err(ApiError::bad_request(
                "invalid_code",
                format!("code: expected {} digits", shared.keys.length()),
            ));
        }
        self.with_record(id, true, |this, shard, now| {
            this.check_in(shard, client, id, typed, now)
        })
        .await
    }

    fn check_in(
        &self,
        shard: &mut Shard,
        client: ClientId,
        id: &VerificationId,
        typed: &str,
        now: Millis,
    ) -> Result<CheckAnswer, ApiError> {
        let shared = &*self.shared;
        self.owned(shard, client, id)?;
        self.settle(shard, id, now);
        let record = shard.records.get_mut(id).ok_or(ApiError::NotFound)?;
        if !record.is_pending() {
            return Err(not_pending(record.status));
        }
        let phone_key = record.phone.as_u64();
        let rule = shared.failed_checks_rule;
        let window_ms = rule.per.as_millis() as Millis;
        if let Some(failed) = shard.failed_checks.get(&phone_key) {
            if now < failed.window_start_ms + window_ms && failed.count >= rule.max.get() {
                shared.metrics.checked(Checked::Locked);
                shared.metrics.rejected(LimitKind::FailedChecks);
                return Err(ApiError::from(crate::ratelimit::Rejection {
                    limit: LimitKind::FailedChecks,
                    rule,
                    retry_after: Duration::from_millis(failed.window_start_ms + window_ms - now),
                }));
            }
        }
        if shared.keys.matches(id, &record.phone, typed, &record.code) {
            record.end(Status::Approved, None, now);
            let answer = CheckAnswer {
                valid: true,
                status: record.status,
                attempts_left: record.attempts_left,
            };
            let key = (phone_key, record.client);
            forget_live(shard, key, id);
            shard.notify(id);
            self.announce(shard, id, EventKind::Approved, now);
            shared.metrics.checked(Checked::Valid);
            shared.metrics.ended(Ended::Approved);
            return Ok(answer);
        }
        record.attempts_left = record.attempts_left.saturating_sub(1);
        record.touch();
        let failed = shard
            .failed_checks
            .entry(phone_key)
            .or_insert(FailedChecks {
                count: 0,
                window_start_ms: now,
            });
        if now >= failed.window_start_ms + window_ms {
            *failed = FailedChecks {
                count: 0,
                window_start_ms: now,
            };
        }
        failed.count += 1;
        shared.metrics.checked(Checked::Invalid);
        if record.attempts_left == 0 {
            record.end(Status::Failed, Some(FailureReason::TooManyAttempts), now);
            shared.metrics.ended(Ended::TooManyAttempts);
            let key = (phone_key, record.client);
            let answer = CheckAnswer {
                valid: false,
                status: record.status,
                attempts_left: 0,
            };
            forget_live(shard, key, id);
            shard.notify(id);
            self.announce(shard, id, EventKind::Failed, now);
            return Ok(answer);
        }
        let answer = CheckAnswer {
            valid: false,
            status: record.status,
            attempts_left: record.attempts_left,
        };
        shard.notify(id);
        Ok(answer)
    }

    /// Sends the same code again, once the cooldown has passed.
    pub async fn resend(&self, client: ClientId, id: &VerificationId) -> Result<View, ApiError> {
        self.with_record(id, false, |this, shard, now| {
            this.resend_in(shard, client, id, now)
        })
        .await
    }

    fn resend_in(
        &self,
        shard: &mut Shard,
        client: ClientId,
        id: &VerificationId,
        now: Millis,
    ) -> Result<View, ApiError> {
        let shared = &*self.shared;
        self.owned(shard, client, id)?;
        self.settle(shard, id, now);
        let record = shard.records.get(id).ok_or(ApiError::NotFound)?;
        if !record.is_pending() {
            return Err(not_pending(record.status));
        }
        if now < record.resend_after_ms {
            shared.metrics.rejected(LimitKind::ResendCooldown);
            return Err(ApiError::RateLimited {
                code: "resend_cooldown",
                message: "a resend is not allowed yet; see Retry-After",
                retry_after: Duration::from_millis(record.resend_after_ms - now),
                rule: None,
            });
        }
        if record.delivery != DeliveryState::Queued {
            if self.queue_is_full() {
                return Err(self.refused_at_queue(PushError::Full));
            }
            let phone = record.phone;
            self.spend_phone(shard, &phone)?;
            self.queue_resend(shard, id, now)?;
        }
        self.view_of(shard, id, now).ok_or(ApiError::NotFound)
    }

    /// Cancels a pending verification.
    pub async fn cancel(&self, client: ClientId, id: &VerificationId) -> Result<View, ApiError> {
        self.with_record(id, false, |this, shard, now| {
            this.owned(shard, client, id)?;
            this.settle(shard, id, now);
            let record = shard.records.get_mut(id).ok_or(ApiError::NotFound)?;
            if !record.is_pending() {
                return Err(not_pending(record.status));
            }
            record.end(Status::Canceled, None, now);
            let key = (record.phone.as_u64(), record.client);
            forget_live(shard, key, id);
            shard.notify(id);
            this.shared.metrics.ended(Ended::Canceled);
            this.view_of(shard, id, now).ok_or(ApiError::NotFound)
        })
        .await
    }

    /// Turns a job taken from the queue into an SMS for `carrier`, or drops it if its
    /// verification ended or expired.
    pub async fn prepare(&self, job: &Job, carrier: CarrierId) -> Prepared {
        self.prepare_keeping(job, carrier).await.0
    }

    /// [`Verifier::prepare`], also returning (redis back-end) the verification as written and
    /// its revision, for [`Verifier::complete`] to start from (`Job::snapshot`).
    pub async fn prepare_keeping(
        &self,
        job: &Job,
        carrier: CarrierId,
    ) -> (Prepared, Option<Box<(u64, Verification)>>) {
        let mut snapshot = None;
        let body = |this: &Verifier, shard: &mut Shard, now| {
            let prepared = this.prepare_in(shard, job, carrier, now);
            match prepared {
                Prepared::Dropped => this.acknowledge(shard, job),
                // Sent only while the job is still this instance's.
                _ => {
                    if let (Some(deferred), Some(entry)) = (&mut shard.deferred, job.entry) {
                        deferred.owns = Some((job.lane, entry));
                    }
                }
            }
            Ok(prepared)
        };
        let prepared = match &self.shared.redis {
            None => self.with_record(&job.id, false, body).await,
            Some(redis) => {
                let keys = LoadKeys::record(job.id);
                match self.txn_deferring(redis, keys, body).await {
                    Ok((_, deferred)) if deferred.not_owned => {
                        if let Some(entry) = job.entry {
                            redis.release(entry);
                        }
                        tracing::debug!(verification = %job.id, "another instance took this SMS job over; not sending it");
                        return (Prepared::Dropped, None);
                    }
                    Ok((prepared, mut deferred)) => {
                        snapshot = deferred.written.take().map(Box::new);
                        self.apply_deferred(deferred, self.shared.clock.now_ms());
                        Ok(prepared)
                    }
                    Err(error) => Err(error),
                }
            }
        };
        let prepared = match prepared {
            Ok(prepared) => prepared,
            // The store is unreachable: the job stays here (and unacknowledged in its stream)
            // until it answers again.
            Err(_) => Prepared::Later,
        };
        (prepared, snapshot)
    }

    fn prepare_in(
        &self,
        shard: &mut Shard,
        job: &Job,
        carrier: CarrierId,
        now: Millis,
    ) -> Prepared {
        let shared = &*self.shared;
        if job.attempts == 0 {
            shared.metrics.queue_wait(
                job.lane,
                now.saturating_sub(job.enqueued_ms) as f64 / 1000.0,
            );
        }
        let Some(record) = shard.records.get(&job.id) else {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        };
        if record.is_pending() && now >= job.deadline_ms.min(record.send_deadline(&shared.policy)) {
            let reason = self.drop_late(shard, &job.id, now);
            shared.metrics.queue_dropped(reason);
            return Prepared::Dropped;
        }
        self.settle(shard, &job.id, now);
        let Some(record) = shard.records.get_mut(&job.id) else {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        };
        // A carrier already accepted this send: a job taken over from an instance that died
        // after the acceptance was written is not sent twice.
        if record.is_pending()
            && record.sends == job.send_no
            && record.delivery != DeliveryState::Queued
        {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        }
        if !record.is_pending() || record.sends != job.send_no {
            let reason = if record.status == Status::Expired {
                QueueDrop::Expired
            } else {
                QueueDrop::Canceled
            };
            shared.metrics.queue_dropped(reason);
            return Prepared::Dropped;
        }
        record.delivery_attempts = record.delivery_attempts.saturating_add(1);
        record.touch();
        let code = shared.keys.unseal(&job.id, &record.phone, &record.code);
        let extras = record.extras.as_deref();
        let text: SmsText = shared.templates.render(
            extras.and_then(|extras| extras.locale.as_deref()),
            &RenderParams {
                code: code.expose(),
                ttl_minutes: shared.policy.code_ttl.as_secs().div_ceil(60),
                web_origin_host: extras.and_then(|extras| extras.web_origin_host.as_deref()),
                app_hash: extras.and_then(|extras| extras.app_hash.as_deref()),
            },
        );
        let carrier_info = &shared.carriers[carrier as usize];
        let sms = OutboundSms {
            message_id: format!("{}.{}", job.id, job.send_no),
            to: record.phone,
            from: carrier_info.from.clone(),
            text,
            receipt_url: carrier_info.receipt_url.clone(),
        };
        shard.notify(&job.id);
        Prepared::Send(sms)
    }

    /// Records what a carrier answered for `job`.
    pub async fn complete(&self, job: &Job, carrier: CarrierId, completion: Completion) {
        let shared = &*self.shared;
        if let Some(redis) = &shared.redis {
            let ends_job = !matches!(completion, Completion::Retry);
            let keys = LoadKeys::record(job.id);
            // A carrier's answer is what the verification's state and the job's stream entry
            // hang on: while Redis is away, keep trying (holding this submit's window slot, so
            // the carrier slows down rather than sending what cannot be recorded).
            let mut pause = Duration::from_millis(50);
            let mut snapshot = job.snapshot.clone();
            let recorded = loop {
                let preloaded = snapshot.take().map(|snapshot| {
                    let (revision, record) = *snapshot;
                    crate::store::redis::Loaded {
                        live: None,
                        record: Some((revision, record)),
                        failed_checks: None,
                    }
                });
                let recorded = self
                    .txn_from(redis, keys, preloaded, |this, shard, now| {
                        let mut receipt_id = None;
                        this.record_completion_in(
                            shard,
                            job,
                            carrier,
                            completion.clone(),
                            now,
                            &mut receipt_id,
                        );
                        if ends_job {
                            this.acknowledge(shard, job);
                        }
                        Ok(receipt_id)
                    })
                    .await;
                if recorded.is_ok() || pause > COMPLETION_RETRY_MAX || !ends_job {
                    break recorded;
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
            };
            match recorded {
                Ok((Some(receipt_id), deferred)) => {
                    let keep = shared.policy.retention
                        + shared.policy.code_ttl
                        + shared.policy.max_extension;
                    let indexed = redis
                        .index_receipt(carrier, &receipt_id, job.id, keep)
                        .await;
                    if let Err(error) = indexed {
                        tracing::warn!(%error, verification = %job.id, "a carrier message id could not be indexed for receipts");
                    }
                    // Only now may the client hear of the submit, so that a receipt it expects
                    // finds the id.
                    self.apply_deferred(deferred, shared.clock.now_ms());
                    if let Ok(Some((status, early_id))) =
                        redis.take_held_receipt(carrier, &receipt_id).await
                    {
                        if let Some(status) = receipt_status_of(status) {
                            let _ = self.apply_receipt(carrier, job.id, &early_id, status).await;
                        }
                    }
                }
                Ok((None, deferred)) => self.apply_deferred(deferred, shared.clock.now_ms()),
                Err(error) => {
                    // Let go of the job: read again from this instance's pending entries, it
                    // is sent again unless its verification ended meanwhile.
                    if let Some(entry) = job.entry {
                        redis.release(entry);
                    }
                    tracing::warn!(?error, verification = %job.id, "a carrier's answer could not be recorded; the job stays in its stream");
                }
            }
            return;
        }
        let now = shared.clock.now_ms();
        let mut receipt_id: Option<String> = None;
        self.record_completion(job, carrier, completion, now, &mut receipt_id);
        // Indexed after the shard's lock is released: the receipt index is never locked while a
        // shard is (its sweep locks them the other way round).
        if let Some(id) = receipt_id {
            shared.receipts.insert(carrier, &id, job.id);
            // The carrier's receipt may have come before its answer to the submit.
            if let Some((early_id, status)) = shared.early_receipts.take(carrier, &id) {
                let _ = self.apply_receipt(carrier, job.id, &early_id, status).await;
            }
        }
    }

    fn record_completion(
        &self,
        job: &Job,
        carrier: CarrierId,
        completion: Completion,
        now: Millis,
        receipt_id: &mut Option<String>,
    ) {
        let mut shard = self.shared.store.shard(&job.id);
        self.record_completion_in(&mut shard, job, carrier, completion, now, receipt_id);
    }

    fn record_completion_in(
        &self,
        shard: &mut Shard,
        job: &Job,
        carrier: CarrierId,
        completion: Completion,
        now: Millis,
        receipt_id: &mut Option<String>,
    ) {
        let shared = &*self.shared;
        let Some(record) = shard.records.get_mut(&job.id) else {
            return;
        };
        let mut event = None;
        match completion {
            Completion::Accepted { carrier_message_id } => {
                *receipt_id = carrier_message_id.clone();
                let carrier_message_id = carrier_message_id.map(String::into_boxed_str);
                if !record.is_pending() {
                    // Cancelled or ended while the carrier answered: the SMS is out, so keep
                    // its id for receipts, but the verification's state and expiry are final.
                    record.carrier = Some(carrier);
                    record.carrier_message_id = carrier_message_id;
                } else {
                    if let Some(extension_ms) =
                        record.accept(carrier, carrier_message_id, now, &shared.policy)
                    {
                        shared
                            .metrics
                            .session_extended(extension_ms as f64 / 1000.0);
                        // The first acceptance: the user's time to SMS, as far as the gateway
                        // can tell.
                        shared
                            .metrics
                            .carrier(carrier as usize)
                            .first_accepted_after(
                                now.saturating_sub(record.created_ms) as f64 / 1000.0,
                            );
                    }
                    event = Some(EventKind::Submitted);
                }
            }
            Completion::Retry => {}
            Completion::Permanent => {
                if record.is_pending() {
                    record.end(Status::Failed, Some(FailureReason::Undeliverable), now);
                    let key = (record.phone.as_u64(), record.client);
                    forget_live(shard, key, &job.id);
                    shared.metrics.ended(Ended::Undeliverable);
                    event = Some(EventKind::Failed);
                }
            }
        }
        shard.notify(&job.id);
        if let Some(kind) = event {
            self.announce(shard, &job.id, kind, now);
        }
    }

    /// The carrier named `name` in the config.
    pub fn carrier_by_name(&self, name: &str) -> Option<CarrierId> {
        self.shared
            .carriers
            .iter()
            .position(|carrier| carrier.name == name)
            .map(|index| index as CarrierId)
    }

    /// Checks the token a carrier presents with its receipts, in constant time.
    pub fn authenticate_carrier(
        &self,
        carrier: CarrierId,
        bearer: Option<&str>,
    ) -> Result<(), ApiError> {
        let expected = self
            .shared
            .carriers
            .get(carrier as usize)
            .and_then(|carrier| carrier.receipt_token_sha256)
            .ok_or(ApiError::Unauthorized)?;
        let presented: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(
            bearer.ok_or(ApiError::Unauthorized)?.as_bytes(),
        )
        .into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(&presented[..], &expected[..])) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// Applies a delivery receipt.
    ///
    /// A receipt moves `delivery.state` from `submitted` to `delivered` or `undeliverable` for
    /// the SMS the receipt's carrier accepted last. The verification stays pending either way:
    /// after an undeliverable SMS, a resend may go by another carrier. A receipt whose id no
    /// submit answer has named yet is held for a while, in case the answer is still on its way.
    pub async fn receipt(
        &self,
        carrier: CarrierId,
        carrier_message_id: &str,
        status: ReceiptStatus,
    ) -> Result<ReceiptMatch, ApiError> {
        let shared = &*self.shared;
        if let Some(redis) = &shared.redis {
            let unavailable = |error| self.unavailable(error);
            if let Some(id) = redis
                .find_receipt(carrier, carrier_message_id)
                .await
                .map_err(unavailable)?
            {
                return self
                    .apply_receipt(carrier, id, carrier_message_id, status)
                    .await;
            }
            redis
                .hold_receipt(
                    carrier,
                    carrier_message_id,
                    receipt_status_code(status),
                    EARLY_RECEIPT_HOLD,
                    shared.clock.now_ms(),
                )
                .await
                .map_err(unavailable)?;
            // The submit answer may have been recorded between the lookup and the hold;
            // whichever side takes the held receipt applies it.
            if let Some(id) = redis
                .find_receipt(carrier, carrier_message_id)
                .await
                .map_err(unavailable)?
            {
                if redis
                    .take_held_receipt(carrier, carrier_message_id)
                    .await
                    .map_err(unavailable)?
                    .is_some()
                {
                    return self
                        .apply_receipt(carrier, id, carrier_message_id, status)
                        .await;
                }
            }
            return Ok(ReceiptMatch::Held);
        }
        if let Some(id) = shared.receipts.find(carrier, carrier_message_id) {
            return self
                .apply_receipt(carrier, id, carrier_message_id, status)
                .await;
        }
        let now = shared.clock.now_ms();
        for evicted in shared
            .early_receipts
            .hold(carrier, carrier_message_id, status, now)
        {
            shared.metrics.carrier(evicted as usize).receipt_unmatched();
        }
        // The submit answer may have been recorded between the lookup and the hold; whichever
        // side takes the held receipt applies it.
        if let Some(id) = shared.receipts.find(carrier, carrier_message_id) {
            if shared
                .early_receipts
                .take(carrier, carrier_message_id)
                .is_some()
            {
                return self
                    .apply_receipt(carrier, id, carrier_message_id, status)
                    .await;
            }
        }
        Ok(ReceiptMatch::Held)
    }

    /// Applies a receipt to the verification `id` that the index (or the submit answer) named.
    async fn apply_receipt(
        &self,
        carrier: CarrierId,
        id: VerificationId,
        carrier_message_id: &str,
        status: ReceiptStatus,
    ) -> Result<ReceiptMatch, ApiError> {
        self.with_record(&id, false, |this, shard, now| {
            Ok(this.apply_receipt_in(shard, carrier, id, carrier_message_id, status, now))
        })
        .await
    }

    fn apply_receipt_in(
        &self,
        shard: &mut Shard,
        carrier: CarrierId,
        id: VerificationId,
        carrier_message_id: &str,
        status: ReceiptStatus,
        now: Millis,
    ) -> ReceiptMatch {
        let shared = &*self.shared;
        let metrics = shared.metrics.carrier(carrier as usize);
        let Some(record) = shard.records.get_mut(&id) else {
            metrics.receipt_unmatched();
            return ReceiptMatch::Unmatched;
        };
        // The index may point at a verification whose latest SMS went by another carrier or
        // under another id (an earlier send): such a receipt is matched but changes nothing.
        let receipt_readings = crate::receipt::readings(carrier_message_id);
        let latest = record.carrier == Some(carrier)
            && record.carrier_message_id.as_deref().is_some_and(|latest| {
                crate::receipt::readings(latest)
                    .iter()
                    .any(|reading| receipt_readings.contains(reading))
            });
        metrics.receipt(status);
        if latest && record.delivery == DeliveryState::Submitted {
            match status {
                ReceiptStatus::Delivered => {
                    record.delivery = DeliveryState::Delivered;
                    metrics.delivered_after(now.saturating_sub(record.created_ms) as f64 / 1000.0);
                }
                ReceiptStatus::Undeliverable | ReceiptStatus::Expired => {
                    record.delivery = DeliveryState::Undeliverable;
                }
            }
            record.touch();
            shard.notify(&id);
            if status == ReceiptStatus::Delivered {
                self.announce(shard, &id, EventKind::Delivered, now);
            }
        }
        ReceiptMatch::Matched
    }

    /// Puts a job back in line; returns false (and drops it) if its deadline has passed.
    pub fn requeue(&self, job: Job) -> bool {
        let now = self.shared.clock.now_ms();
        if now >= job.deadline_ms && self.shared.redis.is_some() {
            // Settled on Redis in its own task; the job stays in its stream until then.
            let verifier = self.clone();
            tokio::spawn(async move {
                let dropped = verifier
                    .with_record(&job.id, false, |this, shard, now| {
                        let reason = this.drop_late(shard, &job.id, now);
                        this.shared.metrics.queue_dropped(reason);
                        this.acknowledge(shard, &job);
                        Ok(())
                    })
                    .await;
                // Not written: let go of the job, so it is read again (by this instance's
                // look at its own pending entries) and dropped then.
                if let (Err(_), Some(redis), Some(entry)) = (dropped, verifier.redis(), job.entry) {
                    redis.release(entry);
                }
            });
            return false;
        }
        if now >= job.deadline_ms {
            let mut shard = self.shared.store.shard(&job.id);
            let reason = self.drop_late(&mut shard, &job.id, now);
            self.shared.metrics.queue_dropped(reason);
            return false;
        }
        let id = job.id;
        let mut shard = self.shared.store.shard(&id);
        let ticket = self.shared.queue.requeue(job);
        if let Some(record) = shard.records.get_mut(&id) {
            record.queue_ticket = ticket;
        }
        true
    }

    /// Expires what has run out of time, forgets what is past retention, trims limiter memory
    /// and refreshes the gauges. Runs on the sweeper's timer.
    pub async fn sweep(&self) {
        match &self.shared.redis {
            None => {
                let verifier = self.clone();
                // A sweep walks every shard; keep it off the request-serving workers.
                let _ = tokio::task::spawn_blocking(move || verifier.sweep_embedded()).await;
            }
            Some(redis) => self.sweep_redis(redis).await,
        }
    }

    fn sweep_embedded(&self) {
        let shared = &*self.shared;
        let now = shared.clock.now_ms();
        let retention_ms = shared.policy.retention.as_millis() as Millis;
        let failed_window_ms = shared.failed_checks_rule.per.as_millis() as Millis;
        let mut n_live = 0;
        let mut n_expired = 0;
        shared.store.for_each_shard(|shard| {
            // Only what is due is touched: the deadline heap holds each verification's next
            // moment of interest (its earliest possible expiry, then the end of its retention).
            while let Some(&Reverse((deadline, id))) = shard.deadlines.peek() {
                if deadline > now {
                    break;
                }
                shard.deadlines.pop();
                let Some(record) = shard.records.get_mut(&id) else {
                    continue;
                };
                if record.is_expired(now, &shared.policy) {
                    let expires_at = record.expires_at(now, &shared.policy);
                    record.end(Status::Expired, None, expires_at.min(now));
                    let key = (record.phone.as_u64(), record.client);
                    shard.deadlines.push(Reverse((now + retention_ms, id)));
                    forget_live(shard, key, &id);
                    shard.notify(&id);
                    self.announce(shard, &id, EventKind::Expired, now);
                    n_expired += 1;
                    continue;
                }
                match record.ended_ms {
                    Some(ended) if now >= ended + retention_ms => {
                        shard.records.remove(&id);
                    }
                    Some(ended) => shard.deadlines.push(Reverse((ended + retention_ms, id))),
                    // Still pending: its expiry moved (the SMS waited in the queue).
                    None => shard
                        .deadlines
                        .push(Reverse((record.expires_at(now, &shared.policy), id))),
                }
            }
            shard
                .failed_checks
                .retain(|_, failed| now < failed.window_start_ms + failed_window_ms);
            let records = &shard.records;
            shard
                .watchers
                .retain(|id, notify| Arc::strong_count(notify) > 1 && records.contains_key(id));
            n_live += shard.records.len();
        });
        for _ in 0..n_expired {
            shared.metrics.ended(Ended::Expired);
        }
        // Early receipts whose submit answer never named them: unmatched after all.
        for carrier in shared.early_receipts.expire(now) {
            shared.metrics.carrier(carrier as usize).receipt_unmatched();
        }
        // SMS still queued past their clients' thresholds: tell the clients, with an ETA.
        for (id, send_no) in shared.webhooks.due_delays(now) {
            let mut shard = shared.store.shard(&id);
            let still_queued = shard.records.get(&id).is_some_and(|record| {
                record.is_pending()
                    && record.delivery == DeliveryState::Queued
                    && record.sends == send_no
            });
            if still_queued {
                self.announce(&mut shard, &id, EventKind::Delayed, now);
            }
        }
        let idempotency_ttl_ms = shared.policy.idempotency_ttl.as_millis() as Millis;
        shared.store.for_each_idempotency_shard(|map| {
            map.retain(|_, entry| now < entry.created_ms + idempotency_ttl_ms)
        });
        let elapsed = shared.clock.elapsed();
        let receipts_due = {
            let mut last = lock(&shared.last_receipt_sweep);
            let due = elapsed >= *last + RECEIPT_SWEEP_EVERY;
            if due {
                *last = elapsed;
            }
            due
        };
        if receipts_due {
            // Ids of verifications past retention go; one store lock at a time, never with a
            // shard lock held first.
            shared
                .receipts
                .retain(|id| shared.store.shard(id).records.contains_key(id));
        }
        let (n_phone_keys, n_ip_keys) = shared.limiters.housekeep();
        shared.metrics.set_limiter_keys(n_phone_keys, n_ip_keys);
        shared.metrics.set_live(n_live);
        let pace = shared.routes.pace_of(CarrierSet::MAX);
        for lane in shared.queue.depths() {
            shared.metrics.set_queue_depth(lane.lane, lane.depth);
            let ahead = shared.queue.ahead_of_new(lane.lane, CarrierSet::MAX);
            shared
                .metrics
                .set_predicted_wait(lane.lane, ahead as f64 / pace);
        }
        shared.metrics.run_upkeep();
    }

    /// Every lane (client priority) that can hold jobs.
    pub fn lanes(config: &Config) -> Vec<u8> {
        let mut lanes: Vec<u8> = config
            .clients
            .iter()
            .map(|client| client.priority)
            .collect();
        if lanes.is_empty() {
            lanes.push(0);
        }
        lanes.sort_unstable();
        lanes.dedup();
        lanes
    }

    // --- the work shared by both back-ends, on a shard (locked, or a copy of redis keys) ---

    /// Creates a verification and queues its first SMS, spending one send of the phone's limit.
    fn create_in(
        &self,
        shard: &mut Shard,
        client: ClientId,
        request: &NewVerification,
        carriers: CarrierSet,
        lane: u8,
        now: Millis,
    ) -> Result<VerificationId, ApiError> {
        let shared = &*self.shared;
        let phone = request.phone;
        self.spend_phone(shard, &phone)?;
        let id = VerificationId::new_for(&phone);
        let (_code, stored_code) = shared.keys.generate(&id, &phone);
        let extras = (request.locale.is_some()
            || request.web_origin_host.is_some()
            || request.app_hash.is_some())
        .then(|| {
            Box::new(Extras {
                locale: request.locale.as_deref().map(Into::into),
                web_origin_host: request.web_origin_host.as_deref().map(Into::into),
                app_hash: request.app_hash.as_deref().map(Into::into),
            })
        });
        let mut record = Verification {
            phone,
            client,
            status: Status::Pending,
            failure: None,
            delivery: DeliveryState::Queued,
            carrier: None,
            carrier_message_id: None,
            delivery_attempts: 0,
            sends: 1,
            attempts_left: shared.policy.max_attempts,
            code: stored_code,
            created_ms: now,
            fixed_expiry_ms: None,
            resend_after_ms: now + Verification::cooldown_ms(1, &shared.policy),
            ended_ms: None,
            lane,
            queue_ticket: 0,
            extras,
            version: 0,
        };
        let job = Job {
            id,
            send_no: 1,
            lane,
            deadline_ms: record.send_deadline(&shared.policy),
            seq: 0,
            enqueued_ms: now,
            attempts: 0,
            carriers,
            avoid_carrier: None,
            passes: 0,
            entry: None,
            snapshot: None,
        };
        record.queue_ticket = self.enqueue(shard, job)?;
        shard.records.insert(id, Box::new(record));
        shard.live.insert((phone.as_u64(), client), id);
        self.watch_delay(shard, client, id, 1, now);
        if shard.deferred.is_none() {
            shard.deadlines.push(Reverse((
                now + shared.policy.code_ttl.as_millis() as Millis,
                id,
            )));
        }
        Ok(id)
    }

    /// Queues a job: at once in the embedded queue, or in the redis write.
    fn enqueue(&self, shard: &mut Shard, job: Job) -> Result<u64, ApiError> {
        match &mut shard.deferred {
            Some(deferred) => {
                deferred.job = Some(job);
                Ok(0)
            }
            None => self
                .shared
                .queue
                .push(job)
                .map_err(|error| self.refused_at_queue(error)),
        }
    }

    /// Spends one send of the phone's limit: at once with governor, or in the redis write
    /// (which refuses the whole write if the limit does).
    fn spend_phone(&self, shard: &mut Shard, phone: &Phone) -> Result<(), ApiError> {
        match &mut shard.deferred {
            Some(deferred) => match deferred.phone_refused {
                Some(rejection) => Err(self.rejected(rejection)),
                None => {
                    deferred.spends_phone_limit = true;
                    Ok(())
                }
            },
            None => self
                .shared
                .limiters
                .check_phone(phone.as_u64())
                .map_err(|rejection| self.rejected(rejection)),
        }
    }

    fn watch_delay(
        &self,
        shard: &mut Shard,
        client: ClientId,
        id: VerificationId,
        send: u8,
        now: Millis,
    ) {
        match &mut shard.deferred {
            Some(deferred) => deferred.delay_watches.push((client, id, send)),
            None => self.shared.webhooks.watch_delay(client, id, send, now),
        }
    }

    /// Acknowledges a job in its stream with the write (redis back-end): it ended.
    fn acknowledge(&self, shard: &mut Shard, job: &Job) {
        if let (Some(deferred), Some(entry)) = (&mut shard.deferred, job.entry) {
            deferred.ack = Some((job.lane, entry));
        }
    }

    fn queue_is_full(&self) -> bool {
        match &self.shared.redis {
            None => self.shared.queue.len() >= self.shared.queue.capacity(),
            Some(_) => {
                let backlog = lock(&self.shared.backlog);
                backlog.iter().map(|(_, jobs)| jobs).sum::<u64>()
                    >= self.shared.queue.capacity() as u64
            }
        }
    }

    /// Jobs ahead of a new one in `lane` across every instance (redis back-end), as of the
    /// last sweep.
    fn backlog_ahead(&self, lane: u8) -> usize {
        let backlog = lock(&self.shared.backlog);
        backlog
            .iter()
            .filter(|(other, _)| *other >= lane)
            .map(|(_, jobs)| *jobs as usize)
            .sum()
    }

    fn unavailable(&self, error: StoreError) -> ApiError {
        tracing::warn!(%error, "the store did not answer");
        ApiError::StoreUnavailable
    }

    // --- the redis back-end ---

    /// Runs `body` on the record and phone keys `keys` name, the way the embedded back-end runs
    /// it under a shard lock: read, run, write back if nothing changed meanwhile, else again.
    async fn with_record<T>(
        &self,
        id: &VerificationId,
        failed_checks: bool,
        body: impl FnMut(&Verifier, &mut Shard, Millis) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut body = body;
        match &self.shared.redis {
            None => {
                let now = self.shared.clock.now_ms();
                let mut shard = self.shared.store.shard(id);
                body(self, &mut shard, now)
            }
            Some(redis) => {
                let keys = LoadKeys {
                    group: crate::store::redis::group(id),
                    id: Some(*id),
                    live: None,
                    failed_checks: if failed_checks {
                        FailedChecksOf::Record
                    } else {
                        FailedChecksOf::None
                    },
                };
                self.txn(redis, keys, body).await
            }
        }
    }

    async fn txn<T>(
        &self,
        redis: &RedisStore,
        keys: LoadKeys,
        body: impl FnMut(&Verifier, &mut Shard, Millis) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (result, deferred) = self.txn_deferring(redis, keys, body).await?;
        self.apply_deferred(deferred, self.shared.clock.now_ms());
        Ok(result)
    }

    /// [`Verifier::txn`], leaving what the written call does outside the store to the caller.
    async fn txn_deferring<T>(
        &self,
        redis: &RedisStore,
        keys: LoadKeys,
        body: impl FnMut(&Verifier, &mut Shard, Millis) -> Result<T, ApiError>,
    ) -> Result<(T, Deferred), ApiError> {
        self.txn_from(redis, keys, None, body).await
    }

    /// [`Verifier::txn_deferring`], starting from a record already read (and its revision)
    /// instead of reading it; if it changed meanwhile, the second try reads it.
    async fn txn_from<T>(
        &self,
        redis: &RedisStore,
        keys: LoadKeys,
        mut preloaded: Option<crate::store::redis::Loaded>,
        mut body: impl FnMut(&Verifier, &mut Shard, Millis) -> Result<T, ApiError>,
    ) -> Result<(T, Deferred), ApiError> {
        let shared = &*self.shared;
        let retention_ms = shared.policy.retention.as_millis() as Millis;
        let mut phone_refused = None;
        for _ in 0..TXN_ROUNDS {
            let loaded = match preloaded.take() {
                Some(loaded) => loaded,
                None => redis
                    .load(keys)
                    .await
                    .map_err(|error| self.unavailable(error))?,
            };
            let now = shared.clock.now_ms();
            let mut shard = Shard {
                deferred: Some(Deferred {
                    phone_refused,
                    ..Deferred::default()
                }),
                ..Shard::default()
            };
            let loaded_id = keys.id.or(loaded.live);
            let mut before: Option<(u64, Vec<u8>)> = None;
            let mut phone = keys.live.map(|(phone, _)| phone);
            if let (Some(id), Some((revision, record))) = (loaded_id, loaded.record) {
                // Past retention it is gone, as in the embedded store (Redis forgets it on its
                // own clock; a test's clock may run ahead).
                let gone = record
                    .ended_ms
                    .is_some_and(|ended| now >= ended + retention_ms);
                if !gone {
                    let blob = crate::store::redis::encode_record(&record)
                        .map_err(|error| self.unavailable(error))?;
                    before = Some((revision, blob));
                    phone = Some(record.phone.as_u64());
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
            if let (Some(phone), Some(failed)) = (phone, loaded.failed_checks) {
                shard.failed_checks.insert(phone, failed);
            }
            let live_before = shard.live.clone();
            let failed_before = shard.failed_checks.clone();

            let result = body(self, &mut shard, now);

            let deferred = shard.deferred.take().unwrap_or_default();
            let mut commit = Commit {
                group: keys.group,
                id: loaded_id,
                expected_revision: before.as_ref().map(|(revision, _)| *revision),
                check_revision: false,
                clock_offset_ms: shared.clock.advanced_ms(),
                ..Commit::default()
            };
            // The one record the call may write: the one it read, or one it created.
            let mut changed = None;
            for (id, record) in &shard.records {
                let blob = crate::store::redis::encode_record(record)
                    .map_err(|error| self.unavailable(error))?;
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
                    DeadlineWrite::At(record.expires_at(now, &shared.policy))
                } else {
                    DeadlineWrite::Remove
                };
                commit.record = Some(((**record).clone(), self.keep_for(record, now)));
            } else if let Some(deadline) = deferred.deadline {
                commit.deadline = deadline;
            }
            // The live index: what the call set or removed.
            if let Some((key, _)) = keys.live.map(|key| (key, ())) {
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
            if let Some(phone) = phone {
                let after = shard.failed_checks.get(&phone).copied();
                let before = failed_before.get(&phone).copied();
                let differs = match (before, after) {
                    (Some(a), Some(b)) => {
                        a.count != b.count || a.window_start_ms != b.window_start_ms
                    }
                    (None, None) => false,
                    _ => true,
                };
                if differs {
                    let window_ms = shared.failed_checks_rule.per.as_millis() as Millis;
                    let keep = after.map_or(1, |failed| {
                        (failed.window_start_ms + window_ms)
                            .saturating_sub(now)
                            .max(1)
                    });
                    commit.failed_checks = Some((phone, after, Duration::from_millis(keep)));
                    // Two verifications of one phone may count wrong codes at once.
                    commit.expected_failed_checks = Some(before);
                }
            }
            // Webhook events go to the group's outbox stream with the change itself.
            let events: Vec<crate::webhook::RenderedEvent> = deferred
                .events
                .iter()
                .filter_map(|(client, kind, view)| {
                    shared.webhooks.render(*client, *kind, view, now)
                })
                .collect();
            commit.events = events.clone();
            // At most one SMS is queued per call: its delay watch goes with the change.
            commit.watch_delay = deferred
                .delay_watches
                .first()
                .and_then(|(client, _, send)| {
                    Some((shared.webhooks.delay_due(*client, now)?, *send))
                });
            commit.unwatch_delay = deferred.unwatch_delay;
            commit.owns = deferred.owns;
            commit.push = deferred.job.clone();
            commit.ack = deferred.ack;
            if deferred.spends_phone_limit {
                if let Some(phone) = phone.or(commit.record.as_ref().map(|(r, _)| r.phone.as_u64()))
                {
                    commit.phone_limit = Some((phone, shared.limiters.phone_rules()));
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
            if writes {
                match redis
                    .commit(commit)
                    .await
                    .map_err(|error| self.unavailable(error))?
                {
                    Committed::Done { revision, .. } => {
                        if let Some((record, _)) = written_record {
                            written = Some((revision, record));
                        }
                    }
                    Committed::Conflict => continue,
                    Committed::NotOwned => {
                        let mut deferred = deferred;
                        deferred.events.clear();
                        deferred.delay_watches.clear();
                        deferred.not_owned = true;
                        return result.map(|result| (result, deferred));
                    }
                    Committed::Limited { rule, retry_after } => {
                        let rules = shared.limiters.phone_rules();
                        let Some(rule) = rules.get(rule).copied() else {
                            return Err(ApiError::StoreUnavailable);
                        };
                        phone_refused = Some(crate::ratelimit::Rejection {
                            limit: LimitKind::Phone,
                            rule,
                            retry_after,
                        });
                        continue;
                    }
                }
            }
            let mut deferred = deferred;
            deferred.events.clear();
            deferred.delay_watches.clear();
            deferred.written = written;
            for event in &events {
                shared.webhooks.count(event);
            }
            return match result {
                Ok(result) => Ok((result, deferred)),
                Err(error) => {
                    self.apply_deferred(deferred, now);
                    Err(error)
                }
            };
        }
        tracing::warn!(
            group = keys.group,
            "a verification changed under every try; giving up"
        );
        Err(ApiError::StoreUnavailable)
    }

    /// What a written call does outside the store: webhook events, long-polls, delay watches.
    fn apply_deferred(&self, deferred: Deferred, now: Millis) {
        let shared = &*self.shared;
        for (client, kind, view) in deferred.events {
            shared.webhooks.emit(client, kind, &view, now);
        }
        for (client, id, send) in deferred.delay_watches {
            shared.webhooks.watch_delay(client, id, send, now);
        }
        for id in deferred.notified {
            shared.store.shard(&id).notify(&id);
        }
    }

    /// How long Redis keeps a record: past its retention once ended; while pending, past the
    /// latest it could expire plus retention.
    fn keep_for(&self, record: &Verification, now: Millis) -> Duration {
        let policy = &self.shared.policy;
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

    async fn start_redis(
        &self,
        redis: &RedisStore,
        client: ClientId,
        request: NewVerification,
    ) -> Result<(Started, View), ApiError> {
        let shared = &*self.shared;
        if !self.is_accepting() {
            return Err(ApiError::ShuttingDown);
        }
        let offset = shared.clock.advanced_ms();
        let unavailable = |error| self.unavailable(error);
        // Anonymous use (no clients configured) has no client limit worth a round trip.
        if !shared.clients.by_key_hash.is_empty() {
            if let Some(rule) = shared.limiters.client_rule(client) {
                if let Some((_, retry_after)) = redis
                    .limit_client(client, &[rule], offset)
                    .await
                    .map_err(unavailable)?
                {
                    return Err(self.rejected(crate::ratelimit::Rejection {
                        limit: LimitKind::Client,
                        rule,
                        retry_after,
                    }));
                }
            }
        }
        if !shared.countries.allows(request.region) {
            shared.metrics.rejected(LimitKind::Country);
            return Err(ApiError::CountryNotAllowed);
        }
        let carriers = shared.routes.eligible_for(&request.phone);
        if carriers == 0 {
            return Err(ApiError::NumberNotServed);
        }
        let Some((key, fingerprint)) = request.idempotency.clone() else {
            return self
                .start_redis_claimed(redis, client, &request, carriers)
                .await;
        };
        let ttl = shared.policy.idempotency_ttl;
        for _ in 0..IDEMPOTENCY_WAITS {
            match redis
                .claim_idempotency(client, &key, fingerprint, ttl)
                .await
                .map_err(unavailable)?
            {
                None => {
                    let result = self
                        .start_redis_claimed(redis, client, &request, carriers)
                        .await;
                    let recorded = match &result {
                        Ok((_, view)) => match VerificationId::parse(&view.id) {
                            Some(id) => {
                                redis
                                    .settle_idempotency(client, &key, fingerprint, id, ttl)
                                    .await
                            }
                            None => Ok(()),
                        },
                        Err(_) => redis.release_idempotency(client, &key).await,
                    };
                    if let Err(error) = recorded {
                        tracing::warn!(%error, "an Idempotency-Key could not be recorded");
                    }
                    return result;
                }
                Some(IdempotencyHolder::Done {
                    fingerprint: held,
                    id,
                }) => {
                    if held != fingerprint {
                        return Err(ApiError::IdempotencyMismatch);
                    }
                    let view = self
                        .with_record(&id, false, |this, shard, now| {
                            if !shard.records.contains_key(&id) {
                                return Ok(None);
                            }
                            this.settle(shard, &id, now);
                            Ok(this.view_of(shard, &id, now))
                        })
                        .await?;
                    match view {
                        Some(view) => {
                            shared.metrics.started(Started::Replayed);
                            return Ok((Started::Replayed, view));
                        }
                        // Its verification is gone: the key is free again.
                        None => redis
                            .release_idempotency(client, &key)
                            .await
                            .map_err(unavailable)?,
                    }
                }
                Some(IdempotencyHolder::Pending { fingerprint: held }) => {
                    if held != fingerprint {
                        return Err(ApiError::IdempotencyMismatch);
                    }
                    // The first request with this key is still being served, maybe by another
                    // instance: wait for its answer.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(ApiError::Overloaded {
            message: "a request with this Idempotency-Key is still being served; try again",
            retry_after: Duration::from_secs(1),
        })
    }

    async fn start_redis_claimed(
        &self,
        redis: &RedisStore,
        client: ClientId,
        request: &NewVerification,
        carriers: CarrierSet,
    ) -> Result<(Started, View), ApiError> {
        let shared = &*self.shared;
        let phone = request.phone;
        let lane = shared.clients.priority(client);
        let keys = LoadKeys {
            group: crate::store::redis::phone_group(&phone),
            id: None,
            live: Some((phone.as_u64(), client)),
            failed_checks: FailedChecksOf::None,
        };
        let ip_rules = shared.limiters.ip_rules();
        // With no IP rule there is nothing to spend between reading and writing: one round.
        let mut ip_spent = ip_rules.is_empty();
        for _ in 0..TXN_ROUNDS {
            let step = self
                .txn(redis, keys, |this, shard, now| {
                    if let Some(id) = shard.live.get(&(phone.as_u64(), client)).copied() {
                        let was_pending = shard.records.get(&id).is_some_and(|r| r.is_pending());
                        this.settle(shard, &id, now);
                        if shard.records.get(&id).is_some_and(|r| r.is_pending()) {
                            this.resend_if_due(shard, &id, now);
                            let view = this.view_of(shard, &id, now).ok_or(ApiError::NotFound)?;
                            return Ok(StartStep::Existing(view));
                        }
                        if was_pending {
                            // It just expired: that is written first, then the new one.
                            return Ok(StartStep::Again);
                        }
                    }
                    // As in the embedded back-end: the queue, then the IP, then the phone.
                    this.admit(lane, carriers)?;
                    if !ip_spent {
                        return Ok(StartStep::SpendIp);
                    }
                    let id = this.create_in(shard, client, request, carriers, lane, now)?;
                    let view = this.view_of(shard, &id, now).ok_or(ApiError::NotFound)?;
                    Ok(StartStep::Created(view))
                })
                .await?;
            match step {
                StartStep::Existing(view) => {
                    shared.metrics.started(Started::Existing);
                    return Ok((Started::Existing, view));
                }
                StartStep::Created(view) => {
                    shared.metrics.started(Started::Created);
                    tracing::debug!(verification = %view.id, phone = %phone, client = %shared.clients.name(client), "verification started");
                    return Ok((Started::Created, view));
                }
                StartStep::Again => {}
                StartStep::SpendIp => {
                    let rules = &ip_rules;
                    if let Some((rule, retry_after)) = redis
                        .limit_ip(request.ip, rules, shared.clock.advanced_ms())
                        .await
                        .map_err(|error| self.unavailable(error))?
                    {
                        return Err(self.rejected(crate::ratelimit::Rejection {
                            limit: LimitKind::Ip,
                            rule: rules[rule.min(rules.len() - 1)],
                            retry_after,
                        }));
                    }
                    ip_spent = true;
                }
            }
        }
        Err(ApiError::StoreUnavailable)
    }

    /// Expiry and deadlines on Redis, the webhook delay watches, the backlog and the gauges.
    async fn sweep_redis(&self, redis: &RedisStore) {
        let shared = &*self.shared;
        let now = shared.clock.now_ms();
        // Long-poll watchers nobody waits on any more (the embedded sweep prunes them with the
        // records; here the records are in Redis).
        shared.store.for_each_shard(|shard| {
            shard
                .watchers
                .retain(|_, notify| Arc::strong_count(notify) > 1);
        });
        let up = redis.ping().await;
        shared.metrics.set_store_up(up);
        if !up {
            shared.metrics.run_upkeep();
            return;
        }
        for group in 0..crate::store::redis::GROUPS {
            let due = match redis.due(group, now, SWEEP_BATCH).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "sweep: redis did not answer");
                    break;
                }
            };
            for id in due {
                let keys = LoadKeys::record(id);
                let swept = self
                    .txn(redis, keys, |this, shard, now| {
                        this.sweep_one(shard, &id, now);
                        Ok(())
                    })
                    .await;
                if swept.is_err() {
                    return;
                }
            }
        }
        // SMS still queued past their clients' thresholds: tell the clients, with an ETA.
        for group in 0..crate::store::redis::GROUPS {
            let Ok(due) = redis.due_delays(group, now, SWEEP_BATCH).await else {
                return;
            };
            for (id, send_no) in due {
                let keys = LoadKeys::record(id);
                let _ = self
                    .txn(redis, keys, |this, shard, now| {
                        let still_queued = shard.records.get(&id).is_some_and(|record| {
                            record.is_pending()
                                && record.delivery == DeliveryState::Queued
                                && record.sends == send_no
                        });
                        if still_queued {
                            this.announce(shard, &id, EventKind::Delayed, now);
                        }
                        if let Some(deferred) = &mut shard.deferred {
                            deferred.unwatch_delay = Some(send_no);
                        }
                        Ok(())
                    })
                    .await;
            }
        }
        let mut backlog = Vec::new();
        for lane in shared.queue.depths() {
            match redis.backlog(lane.lane).await {
                Ok(jobs) => backlog.push((lane.lane, jobs)),
                Err(_) => return,
            }
        }
        *lock(&shared.backlog) = backlog.clone();
        let pace = shared.routes.pace_of(CarrierSet::MAX);
        for (lane, jobs) in &backlog {
            shared.metrics.set_queue_depth(*lane, *jobs as usize);
            shared
                .metrics
                .set_predicted_wait(*lane, self.backlog_ahead(*lane) as f64 / pace);
        }
        // Receipts held for a submit answer that never named them: unmatched after all.
        if let Ok(carriers) = redis.expired_receipts(now).await {
            for carrier in carriers {
                shared.metrics.carrier(carrier as usize).receipt_unmatched();
            }
        }
        if let Ok(pending) = redis.pending_count().await {
            shared.metrics.set_live(pending as usize);
        }
        shared.metrics.run_upkeep();
    }

    /// One due verification on Redis: expired if its time ran out, else its next deadline.
    fn sweep_one(&self, shard: &mut Shard, id: &VerificationId, now: Millis) {
        let policy = &self.shared.policy;
        let Some(record) = shard.records.get(id) else {
            if let Some(deferred) = &mut shard.deferred {
                deferred.deadline = Some(DeadlineWrite::Remove);
            }
            return;
        };
        if record.is_expired(now, policy) {
            self.expire(shard, id, now);
            return;
        }
        let next = if record.is_pending() {
            DeadlineWrite::At(record.expires_at(now, policy))
        } else {
            DeadlineWrite::Remove
        };
        if let Some(deferred) = &mut shard.deferred {
            deferred.deadline = Some(next);
        }
    }

    // --- helpers, all called with the shard locked ---

    fn owned(&self, shard: &Shard, client: ClientId, id: &VerificationId) -> Result<(), ApiError> {
        // Another client's verification is as unknown as a missing one.
        match shard.records.get(id) {
            Some(record) if record.client == client => Ok(()),
            _ => Err(ApiError::NotFound),
        }
    }

    /// Expires the verification if its time has run out.
    fn settle(&self, shard: &mut Shard, id: &VerificationId, now: Millis) {
        let expired = shard
            .records
            .get(id)
            .is_some_and(|record| record.is_expired(now, &self.shared.policy));
        if expired {
            self.expire(shard, id, now);
        }
    }

    /// A job that missed its send deadline is dropped. If no SMS of its verification was ever
    /// accepted, the user has no code and never will: the verification expires now. A late
    /// resend leaves it pending, since the code of the earlier SMS still works until expiry.
    fn drop_late(&self, shard: &mut Shard, id: &VerificationId, now: Millis) -> QueueDrop {
        match shard.records.get(id) {
            Some(record) if record.is_pending() => {
                if record.fixed_expiry_ms.is_none() {
                    self.expire(shard, id, now);
                }
                QueueDrop::Expired
            }
            Some(record) if record.status == Status::Expired => QueueDrop::Expired,
            _ => QueueDrop::Canceled,
        }
    }

    fn expire(&self, shard: &mut Shard, id: &VerificationId, now: Millis) {
        let Some(record) = shard.records.get_mut(id) else {
            return;
        };
        if !record.is_pending() {
            return;
        }
        let expires_at = record.expires_at(now, &self.shared.policy);
        record.end(Status::Expired, None, expires_at.min(now));
        let key = (record.phone.as_u64(), record.client);
        forget_live(shard, key, id);
        shard.notify(id);
        self.announce(shard, id, EventKind::Expired, now);
        self.shared.metrics.ended(Ended::Expired);
    }

    /// Queues the same code again if the verification's resend cooldown has passed (a start
    /// request for a phone that already has a live verification).
    fn resend_if_due(&self, shard: &mut Shard, id: &VerificationId, now: Millis) {
        let Some(record) = shard.records.get(id) else {
            return;
        };
        if now < record.resend_after_ms || record.delivery == DeliveryState::Queued {
            return;
        }
        // A full queue leaves the verification as it is, and spends no limit.
        if self.queue_is_full() {
            return;
        }
        let phone = record.phone;
        if self.spend_phone(shard, &phone).is_err() {
            return;
        }
        // A full queue leaves the verification as it is; the frontend may resend later.
        let _ = self.queue_resend(shard, id, now);
    }

    fn queue_resend(
        &self,
        shard: &mut Shard,
        id: &VerificationId,
        now: Millis,
    ) -> Result<(), ApiError> {
        let policy = &self.shared.policy;
        let Some(record) = shard.records.get_mut(id) else {
            return Err(ApiError::NotFound);
        };
        let job = Job {
            id: *id,
            send_no: record.sends.saturating_add(1),
            lane: record.lane,
            deadline_ms: record.send_deadline(policy),
            seq: 0,
            enqueued_ms: now,
            attempts: 0,
            carriers: self.shared.routes.eligible_for(&record.phone),
            avoid_carrier: record.carrier,
            passes: 0,
            entry: None,
            snapshot: None,
        };
        let ticket = self.enqueue(shard, job)?;
        let Some(record) = shard.records.get_mut(id) else {
            return Err(ApiError::NotFound);
        };
        record.sends = record.sends.saturating_add(1);
        let (client, sends) = (record.client, record.sends);
        record.queue_ticket = ticket;
        record.delivery = DeliveryState::Queued;
        record.resend_after_ms = now + Verification::cooldown_ms(record.sends, policy);
        record.touch();
        self.watch_delay(shard, client, *id, sends, now);
        shard.notify(id);
        Ok(())
    }

    /// Sends `kind` about `id` to its client's webhook, if the client has one.
    fn announce(&self, shard: &mut Shard, id: &VerificationId, kind: EventKind, now: Millis) {
        let Some(client) = shard.records.get(id).map(|record| record.client) else {
            return;
        };
        if !self.shared.webhooks.enabled_for(client) {
            return;
        }
        if let Some(view) = self.view_of(shard, id, now) {
            match &mut shard.deferred {
                Some(deferred) => deferred.events.push((client, kind, view)),
                None => self.shared.webhooks.emit(client, kind, &view, now),
            }
        }
    }

    fn view_of(&self, shard: &Shard, id: &VerificationId, now: Millis) -> Option<View> {
        let record = shard.records.get(id)?;
        let eta = (record.delivery == DeliveryState::Queued).then(|| {
            let carriers = self.shared.routes.eligible_for(&record.phone);
            let ahead = match &self.shared.redis {
                None => self
                    .shared
                    .queue
                    .ahead_of(record.lane, record.queue_ticket, carriers),
                Some(_) => self.backlog_ahead(record.lane),
            };
            ahead as f64 / self.shared.routes.pace_of(carriers)
        });
        let carriers = &self.shared.carriers;
        Some(record.view(
            id,
            now,
            &self.shared.policy,
            |carrier| {
                carriers
                    .get(carrier as usize)
                    .map_or_else(String::new, |c| c.name.clone())
            },
            eta.map(|secs| (secs * 10.0).round() / 10.0),
        ))
    }

    /// Refuses a new verification whose SMS would wait longer than a session can be extended.
    fn admit(&self, lane: u8, carriers: CarrierSet) -> Result<(), ApiError> {
        let shared = &*self.shared;
        // Refuse a full queue before any limit is spent on a send that cannot happen.
        if self.queue_is_full() {
            return Err(self.refused_at_queue(PushError::Full));
        }
        let ahead = match &shared.redis {
            None => shared.queue.ahead_of_new(lane, carriers),
            Some(_) => self.backlog_ahead(lane),
        } as f64;
        let pace = shared.routes.pace_of(carriers);
        let predicted_wait = ahead / pace;
        let max_wait = shared.policy.max_extension.as_secs_f64().max(1.0);
        if predicted_wait > max_wait {
            shared.metrics.queue_refused(QueueRefusal::PredictedWait);
            let excess = (ahead - max_wait * pace) / pace;
            return Err(ApiError::Overloaded {
                message: "the SMS queue is longer than a code could wait; try again later",
                retry_after: Duration::from_secs_f64(excess.clamp(1.0, 3600.0)),
            });
        }
        Ok(())
    }

    fn refused_at_queue(&self, error: PushError) -> ApiError {
        match error {
            PushError::Full => {
                self.shared.metrics.queue_refused(QueueRefusal::Full);
                ApiError::Overloaded {
                    message: "the SMS queue is full; try again later",
                    retry_after: Duration::from_secs(
                        (self.shared.queue.capacity() as f64
                            / self.shared.routes.pace_of(CarrierSet::MAX)
                            / 10.0)
                            .clamp(1.0, 60.0) as u64,
                    ),
                }
            }
            PushError::Closed => ApiError::ShuttingDown,
        }
    }

    fn rejected(&self, rejection: crate::ratelimit::Rejection) -> ApiError {
        self.shared.metrics.rejected(rejection.limit);
        ApiError::from(rejection)
    }
}

/// Tries of a redis call whose verification another instance keeps changing.
const TXN_ROUNDS: usize = 16;
/// Waits (20 ms each) for a request holding the same `Idempotency-Key` to finish.
const IDEMPOTENCY_WAITS: usize = 250;
/// The longest pause between tries to record a carrier's answer while Redis is away (they
/// double from 50 ms: about a minute in all).
const COMPLETION_RETRY_MAX: Duration = Duration::from_secs(30);
/// Due verifications a sweep takes per group and pass.
const SWEEP_BATCH: usize = 1024;
/// How often a long-poll looks at Redis for changes made by other instances.
const REDIS_LONG_POLL_EVERY: Duration = Duration::from_millis(250);
/// How long a receipt that matches nothing yet waits for its submit answer.
const EARLY_RECEIPT_HOLD: Duration = Duration::from_secs(30);

/// A step of a start on the redis back-end.
#[derive(Debug)]
enum StartStep {
    Existing(View),
    Created(View),
    /// The live verification expired just now; that was written, now start over.
    Again,
    /// No live verification: the IP's limit is spent next, then the phone's with the write.
    SpendIp,
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

/// How often the receipt index forgets the ids of verifications that are gone.
const RECEIPT_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Records what an `Idempotency-Key` was used for, when the request carried one.
fn remember(
    guard: Option<&mut std::sync::MutexGuard<'_, HashMap<IdempotencyKey, IdempotencyEntry>>>,
    key: Option<(IdempotencyKey, u64)>,
    id: VerificationId,
    now: Millis,
) {
    if let (Some(guard), Some((key, fingerprint))) = (guard, key) {
        guard.insert(
            key,
            IdempotencyEntry {
                fingerprint,
                id,
                created_ms: now,
            },
        );
    }
}

fn forget_live(shard: &mut Shard, key: (u64, ClientId), id: &VerificationId) {
    if shard.live.get(&key) == Some(id) {
        shard.live.remove(&key);
    }
}

fn not_pending(status: Status) -> ApiError {
    ApiError::NotPending {
        status: match status {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
            Status::Failed => "failed",
        },
    }
}

// === impl Clients ===

impl Clients {
    fn new(configs: &[ClientConfig]) -> Clients {
        if configs.is_empty() {
            return Clients {
                by_key_hash: HashMap::new(),
                names: vec!["anonymous".to_owned()],
                priorities: vec![0],
            };
        }
        Clients {
            by_key_hash: configs
                .iter()
                .enumerate()
                .map(|(index, client)| (client.api_key_sha256, index as ClientId))
                .collect(),
            names: configs.iter().map(|client| client.name.clone()).collect(),
            priorities: configs.iter().map(|client| client.priority).collect(),
        }
    }

    fn priority(&self, client: ClientId) -> u8 {
        self.priorities.get(client as usize).copied().unwrap_or(0)
    }

    fn name(&self, client: ClientId) -> &str {
        self.names
            .get(client as usize)
            .map_or("unknown", String::as_str)
    }
}

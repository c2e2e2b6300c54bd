//! The verification engine: start, read, check, resend and cancel, the dispatcher's side of a
//! send (prepare, complete), delivery receipts and the sweep.
//!
//! Each call is written once, over the store's [`Backend`]: it names the data it needs
//! ([`Keys`]) and runs one of the rules of `rules.rs` on it; the back-end runs the rule where
//! that data is safe to change (under a shard lock, or on a copy it commits back) and applies
//! what the rule caused ([`crate::store::Effects`]). Nothing here knows which back-end it is.

mod rules;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::carrier::OutboundSms;
use crate::clock::{Clock, Millis};
use crate::config::{CarrierConfig, ClientConfig, Config, Rule, VerificationPolicy};
use crate::delivery::Deliveries;
use crate::error::ApiError;
use crate::fraud_guard::GuardKey;
use crate::ids::{CarrierId, ClientId, VerificationId};
use crate::metrics::{Checked, Ended, Metrics, Started};
use crate::otp::CodeKeys;
use crate::phone::Phone;
use crate::queue::{Job, Queue};
use crate::ratelimit::{LimitKind, Limiters};
use crate::receipt::ReceiptStatus;
use crate::routing::{CarrierSet, Routes};
use crate::sms::Templates;
use crate::store::embedded::{Embedded, EmbeddedParts};
use crate::store::redis::RedisStore;
use crate::store::redis::backend::{RedisBackend, RedisParts};
use crate::store::{Backend, Claim, Keys, Outcome};
use crate::verification::{DeliveryState, EventKind, View};
use crate::webhook::Webhooks;

/// The engine. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Verifier {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    policy: VerificationPolicy,
    /// The adaptive queue policy; `None` under the deadline policy.
    overload: Option<crate::config::OverloadPolicy>,
    failed_checks_rule: Rule,
    countries: crate::phone::CountryAllowList,
    number_types: crate::phone::NumberTypes,
    /// IPv6 citizen addresses are limited by their first this many bits.
    ipv6_prefix: u8,
    /// A number's first this many digits are its prefix (`prefix_sends`).
    prefix_digits: u8,
    /// SMS budgets per client and per country (their buckets too, on the embedded back-end).
    budgets: crate::budget::Budgets,
    /// The conversion monitor: this instance's view of how verifications by country and
    /// prefix end.
    fraud_guard: crate::fraud_guard::FraudGuard,
    backend: Backend,
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
    /// Whether each carrier's receipts come in time.
    deliveries: Deliveries,
    /// Cleared when shutdown begins: new verifications are refused from then on.
    accepting: AtomicBool,
    /// Long-polls each client holds on this instance now (by client id), against
    /// `policy.long_polls_per_client`.
    long_polls: Box<[std::sync::atomic::AtomicUsize]>,
}

#[derive(Debug)]
struct Clients {
    by_key_hash: HashMap<[u8; 32], ClientId>,
    names: Vec<String>,
    priorities: Vec<u8>,
    /// Where each client's citizen addresses come from; empty for the anonymous client.
    citizen_ip: Vec<crate::citizen_ip::CitizenIpSource>,
    /// Whether a client's start without a citizen address was warned about yet (once each).
    warned_without_citizen_ip: Vec<AtomicBool>,
    /// The web origin hosts and app hashes each client's SMS may carry; empty for the
    /// anonymous client, which may name any.
    autofill: Vec<crate::sms::ClientAutofill>,
}

#[derive(Debug)]
struct CarrierInfo {
    name: String,
    from: Arc<str>,
    receipt_url: Arc<str>,
    receipt_token_sha256: Option<[u8; 32]>,
}

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

/// One long-poll's place among its client's; given back when dropped.
struct LongPollSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for LongPollSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A start request, validated by the route.
#[derive(Debug)]
pub struct NewVerification {
    pub phone: Phone,
    pub region: Option<phonenumber::country::Id>,
    pub number_type: crate::phone::NumberType,
    /// The citizen's address, for the per-IP limit (`crate::citizen_ip`); `None` when the
    /// start is not limited per IP.
    pub ip: Option<IpAddr>,
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
    pub status: crate::verification::Status,
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

/// A step of a start.
#[derive(Debug)]
enum StartStep {
    Created(View),
    /// A second caller's verification beside the live one, with its code.
    Sibling(View),
    /// The live verification expired just now; that was written, now start over.
    Again,
    /// No live verification: the IP's limit is spent next, then the phone's with the write.
    SpendIp,
}

/// Tries of a start whose phone another request keeps changing.
const START_ROUNDS: usize = 16;
/// Waits (20 ms each) for a request holding the same `Idempotency-Key` to finish.
const IDEMPOTENCY_WAITS: usize = 250;
/// The longest pause between tries to record a carrier's answer while the store is away (they
/// double from 50 ms: about a minute in all).
const COMPLETION_RETRY_MAX: Duration = Duration::from_secs(30);

// === impl Verifier ===

impl Verifier {
    /// The engine over the embedded store, or over Redis when `redis` is given.
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
        let limiters = Limiters::new(
            &config.limits,
            &config.clients,
            anonymous_rate,
            clock.clone(),
        );
        let guess_caps = crate::guess_caps::GuessCaps {
            per_ip: config.limits.failed_checks_per_ip.clone(),
            per_client: config.limits.failed_checks_per_client.clone(),
        };
        let backend = match redis {
            None => Backend::Embedded(Embedded::new(EmbeddedParts {
                limiters,
                queue: queue.clone(),
                webhooks: webhooks.clone(),
                clock: clock.clone(),
                retention: config.verification.retention,
                idempotency_ttl: config.verification.idempotency_ttl,
                failed_checks_window: config.limits.failed_checks_per_phone.per,
                guess_caps: guess_caps.clone(),
            })),
            Some(store) => Backend::Redis(RedisBackend::new(RedisParts {
                store,
                limiters,
                has_clients: !config.clients.is_empty(),
                queue: queue.clone(),
                webhooks: webhooks.clone(),
                clock: clock.clone(),
                policy: config.verification.clone(),
                failed_checks_rule: config.limits.failed_checks_per_phone,
                guess_caps,
            })),
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
        Verifier {
            shared: Arc::new(Shared {
                policy: config.verification.clone(),
                overload: config.overload,
                failed_checks_rule: config.limits.failed_checks_per_phone,
                countries: config.limits.countries.clone(),
                number_types: config.limits.number_types,
                ipv6_prefix: config.limits.ipv6_prefix,
                prefix_digits: config.limits.prefix_digits,
                budgets: crate::budget::Budgets::new(&config.clients, &config.limits),
                fraud_guard: crate::fraud_guard::FraudGuard::new(
                    config.fraud_guard.clone(),
                    clock.clone(),
                ),
                backend,
                queue,
                keys: CodeKeys::new(&secret, config.verification.code_length),
                clock,
                metrics: metrics.clone(),
                templates: config.templates.clone(),
                clients,
                carriers,
                routes: Routes::new(&config.carriers),
                deliveries: Deliveries::new(&config.carriers, &metrics),
                webhooks,
                accepting: AtomicBool::new(true),
                long_polls: (0..config.clients.len().max(1))
                    .map(|_| std::sync::atomic::AtomicUsize::new(0))
                    .collect(),
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

    /// Whether each carrier's receipts come in time (`delivery.rs`).
    pub fn deliveries(&self) -> &Deliveries {
        &self.shared.deliveries
    }

    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    /// The store's back-end.
    pub fn backend(&self) -> &Backend {
        &self.shared.backend
    }

    /// Whether API keys are configured (otherwise everyone is the anonymous client).
    pub fn has_clients(&self) -> bool {
        !self.shared.clients.by_key_hash.is_empty()
    }

    /// Where `client`'s citizen addresses come from; `None` for the anonymous client of local
    /// development, whose starts fall back to the peer address.
    pub fn citizen_ip_source(
        &self,
        client: ClientId,
    ) -> Option<&crate::citizen_ip::CitizenIpSource> {
        self.shared.clients.citizen_ip.get(client as usize)
    }

    /// The web origins and app hashes `client`'s SMS may carry; `None` for the anonymous
    /// client of local development, which may name any.
    pub fn autofill_of(&self, client: ClientId) -> Option<&crate::sms::ClientAutofill> {
        self.shared.clients.autofill.get(client as usize)
    }

    /// A start of `client` came without the citizen address its source allows to be missing:
    /// it is not limited per IP. Counted, and warned about once per client, since the frontend
    /// most likely forgot `client_ip`.
    pub fn started_without_citizen_ip(&self, client: ClientId) {
        let clients = &self.shared.clients;
        self.shared.metrics.started_without_citizen_ip(client);
        let first = clients
            .warned_without_citizen_ip
            .get(client as usize)
            .is_some_and(|warned| !warned.swap(true, Ordering::Relaxed));
        if first {
            tracing::warn!(
                client = %clients.name(client),
                "a start came without client_ip: it is not limited per citizen IP; send \
                 client_ip, or set this client's citizen_ip (see otpgate_starts_without_citizen_ip_total)"
            );
        }
    }

    /// The regions phone numbers may belong to.
    pub fn countries(&self) -> &crate::phone::CountryAllowList {
        &self.shared.countries
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

    // --- the frontend's calls ---

    /// Starts a verification; beside a live one of this phone and client, a sibling with its
    /// code (`Verifier::create`).
    pub async fn start(
        &self,
        client: ClientId,
        request: NewVerification,
    ) -> Result<(Started, View), ApiError> {
        if !self.shared.backend.is_remote() {
            return self.start_here(client, request).await;
        }
        // In a task of its own: a client that hangs up must not cancel a start between its
        // write and its answer (the SMS would go, uncounted).
        let verifier = self.clone();
        tokio::spawn(async move { verifier.start_here(client, request).await })
            .await
            .unwrap_or(Err(ApiError::StoreUnavailable))
    }

    async fn start_here(
        &self,
        client: ClientId,
        request: NewVerification,
    ) -> Result<(Started, View), ApiError> {
        let shared = &*self.shared;
        if !self.is_accepting() {
            return Err(ApiError::ShuttingDown);
        }
        if let Some(rejection) = shared.backend.limit_client(client).await? {
            return Err(self.rejected(rejection));
        }
        if !shared.countries.allows(request.region) {
            shared.metrics.rejected(LimitKind::Country);
            return Err(ApiError::CountryNotAllowed);
        }
        if !shared.number_types.allows(request.number_type) {
            return Err(ApiError::bad_request(
                "invalid_phone",
                format!(
                    "phone: a {} number; this gateway sends codes only to the number types in limits.number_types",
                    request.number_type.name()
                ),
            ));
        }
        let carriers = shared.routes.eligible_for(&request.phone);
        if carriers == 0 {
            return Err(ApiError::NumberNotServed);
        }
        let Some((key, fingerprint)) = request.idempotency.clone() else {
            return self.start_claimed(client, &request, carriers).await;
        };
        for _ in 0..IDEMPOTENCY_WAITS {
            match shared.backend.claim(client, &key, fingerprint).await? {
                Claim::Claimed => {
                    let result = self.start_claimed(client, &request, carriers).await;
                    match &result {
                        Ok((_, view)) => {
                            if let Some(id) = VerificationId::parse(&view.id) {
                                shared.backend.settle(client, &key, fingerprint, id).await;
                            }
                        }
                        Err(_) => {
                            // The key is free again; if that is not written, its claim runs out.
                            let _ = shared.backend.release_key(client, &key).await;
                        }
                    }
                    return result;
                }
                Claim::Done {
                    fingerprint: held,
                    id,
                } => {
                    if held != fingerprint {
                        return Err(ApiError::IdempotencyMismatch);
                    }
                    let view = shared
                        .backend
                        .run(Keys::record(id), |shard, fx, now| {
                            if !shard.records.contains_key(&id) {
                                return Ok(None);
                            }
                            self.settle(shard, fx, &id, now);
                            Ok(self.view_of(shard, &id, now))
                        })
                        .await?;
                    match view {
                        Some(view) => {
                            shared.metrics.started(Started::Replayed);
                            return Ok((Started::Replayed, view));
                        }
                        // Its verification is gone: the key is free again.
                        None => shared.backend.release_key(client, &key).await?,
                    }
                }
                Claim::Pending { fingerprint: held } => {
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
            code: "overloaded",
            message: "a request with this Idempotency-Key is still being served; try again",
            retry_after: Duration::from_secs(1),
        })
    }

    /// A start that holds its `Idempotency-Key`, if it has one.
    async fn start_claimed(
        &self,
        client: ClientId,
        request: &NewVerification,
        carriers: CarrierSet,
    ) -> Result<(Started, View), ApiError> {
        let shared = &*self.shared;
        let phone = request.phone;
        let lane = shared.clients.priority(client);
        // With no IP rule, or no citizen address to count, there is nothing to spend between
        // reading and writing: one round.
        // The IP's, the country's and the prefix's limits are spent between the start's two
        // rounds, only when nothing before them refused it.
        let country = crate::ratelimit::country_key(request.region);
        let prefix = crate::ratelimit::prefix_key(&phone, shared.prefix_digits);
        let budgets = shared.budgets.keys_for(client, &country);
        let mut ip_spent = (!shared.backend.has_ip_rules() || request.ip.is_none())
            && !shared.backend.has_destination_rules()
            && budgets.is_empty()
            && !shared.fraud_guard.is_enabled();
        for _ in 0..START_ROUNDS {
            let step = shared
                .backend
                .run(Keys::live(&phone, client), |shard, fx, now| {
                    // A phone locked by wrong codes gets no SMS, not even its live
                    // verification's resend.
                    self.unlocked(shard, (phone.as_u64(), client), now)?;
                    let mut live = None;
                    if let Some(id) = shard.live.get(&(phone.as_u64(), client)).copied() {
                        let was_pending = shard.records.get(&id).is_some_and(|r| r.is_pending());
                        self.settle(shard, fx, &id, now);
                        if shard.records.get(&id).is_some_and(|r| r.is_pending()) {
                            // Whoever typed the number is not told the live verification's id
                            // (it could be a stranger): they get one of their own, with the
                            // same code, and the live one is left exactly as it is.
                            live = Some(id);
                        } else if was_pending {
                            // It just expired: that is written first, then the new one.
                            return Ok(StartStep::Again);
                        }
                    }
                    // The queue first (it spends nothing), then the IP, then the phone: a
                    // limit is spent only when everything before it allowed the send. The
                    // phone's budget is the one a citizen feels, so it is spent last.
                    self.admit(lane, carriers)?;
                    if !ip_spent {
                        return Ok(StartStep::SpendIp);
                    }
                    let id = self.create(shard, fx, client, request, carriers, lane, live, now)?;
                    let view = self.view_of(shard, &id, now).ok_or(ApiError::NotFound)?;
                    Ok(match live {
                        Some(_) => StartStep::Sibling(view),
                        None => StartStep::Created(view),
                    })
                })
                .await?;
            match step {
                StartStep::Sibling(view) => {
                    shared.metrics.started(Started::Sibling);
                    shared
                        .metrics
                        .by_country(&country, crate::metrics::CountryEvent::Started);
                    tracing::debug!(verification = %view.id, phone = %phone, client = %shared.clients.name(client), "verification started beside a live one, with its code");
                    return Ok((Started::Sibling, view));
                }
                StartStep::Created(view) => {
                    shared.metrics.started(Started::Created);
                    shared
                        .metrics
                        .by_country(&country, crate::metrics::CountryEvent::Started);
                    tracing::debug!(verification = %view.id, phone = %phone, client = %shared.clients.name(client), "verification started");
                    return Ok((Started::Created, view));
                }
                StartStep::Again => {}
                StartStep::SpendIp => {
                    // A blocked destination spends nothing; a slowed one its slowed limit.
                    let guarded = [
                        GuardKey::Country(country.as_str().into()),
                        GuardKey::Prefix(prefix.as_str().into()),
                    ];
                    if let Err(refusal) = shared.fraud_guard.admit(&guarded, shared.clock.now_ms())
                    {
                        shared.metrics.rejected(LimitKind::FraudGuard);
                        shared
                            .metrics
                            .by_country(&country, crate::metrics::CountryEvent::GuardRefused);
                        return Err(ApiError::RateLimited {
                            code: "fraud_suspected",
                            message: if refusal.blocked {
                                "verifications to numbers of this range are paused: almost \
                                 none are completed; try again later"
                            } else {
                                "verifications to numbers of this range are slowed: few are \
                                 completed; try again later"
                            },
                            retry_after: refusal.retry_after,
                            rule: None,
                        });
                    }
                    if let Some(ip) = request.ip {
                        let key = crate::citizen_ip::limit_key(ip, shared.ipv6_prefix);
                        if let Some(rejection) = shared.backend.limit_ip(key).await? {
                            return Err(self.rejected(rejection));
                        }
                    }
                    if let Some(rejection) =
                        shared.backend.limit_destination(&country, &prefix).await?
                    {
                        return Err(self.rejected(rejection));
                    }
                    // The budgets last: they are money, spent only on an SMS that goes.
                    self.spend_budgets(&budgets, crate::budget::BudgetedSend::First)
                        .await?;
                    ip_spent = true;
                }
            }
        }
        Err(ApiError::StoreUnavailable)
    }

    /// The verification as it is now, with its version for long-polls.
    pub async fn get(
        &self,
        client: ClientId,
        id: &VerificationId,
    ) -> Result<(View, u32), ApiError> {
        self.shared
            .backend
            .run(Keys::record(*id), |shard, fx, now| {
                self.owned(shard, client, id)?;
                self.settle(shard, fx, id, now);
                self.seen(shard, fx, id, now);
                let version = shard.records.get(id).map_or(0, |record| record.version);
                let view = self.view_of(shard, id, now).ok_or(ApiError::NotFound)?;
                Ok((view, version))
            })
            .await
    }

    /// Waits until the verification's version differs from `version`, or `timeout` passes, or
    /// `cancel` fires; then returns it as it is, with its version. A client that already holds
    /// `long_polls_per_client` long-polls on this instance gets the answer at once, as a GET
    /// without `?wait=` would.
    ///
    /// Waiting costs the store nothing: every change wakes the watchers of its verification,
    /// this instance's directly and (on Redis) other instances' through the changes channel.
    pub async fn wait_for_change(
        &self,
        client: ClientId,
        id: &VerificationId,
        version: u32,
        timeout: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(View, u32), ApiError> {
        let Some(_slot) = self.long_poll_slot(client) else {
            self.shared.metrics.long_poll_refused(client);
            return self.get(client, id).await;
        };
        let backend = &self.shared.backend;
        let deadline = tokio::time::Instant::now() + timeout;
        // Only a verification the client may see gets a watcher.
        self.get(client, id).await?;
        loop {
            let notify = backend.watchers().watch(id);
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (view, current) = self.get(client, id).await?;
            if current != version {
                return Ok((view, current));
            }
            // Every change notifies, the sweeper's expiries included; otherwise the poll ends at
            // its deadline or at shutdown.
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return self.get(client, id).await,
                _ = cancel.cancelled() => return self.get(client, id).await,
            }
        }
    }

    /// A place among `client`'s long-polls, held until dropped; `None` when it holds its cap.
    fn long_poll_slot(&self, client: ClientId) -> Option<LongPollSlot<'_>> {
        let held = self.shared.long_polls.get(client as usize)?;
        let cap = self.shared.policy.long_polls_per_client;
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()?;
        Some(LongPollSlot(held))
    }

    /// Checks a typed code, typed by the citizen at `ip` when it is known (`crate::citizen_ip`).
    ///
    /// A check over the guessing caps of its citizen address or its client is refused before
    /// its code is compared; a wrong code spends one of each (`crate::guess_caps`).
    pub async fn check(
        &self,
        client: ClientId,
        id: &VerificationId,
        typed: &str,
        ip: Option<IpAddr>,
    ) -> Result<CheckAnswer, ApiError> {
        let shared = &*self.shared;
        if !shared.keys.is_well_formed(typed) {
            return Err(ApiError::bad_request(
                "invalid_code",
                format!("code: expected {} digits", shared.keys.length()),
            ));
        }
        let ip = ip.map(|ip| crate::citizen_ip::limit_key(ip, shared.ipv6_prefix));
        if let Some(rejection) = shared.backend.peek_guesses(ip, client).await? {
            shared.metrics.checked(Checked::Locked);
            return Err(self.rejected(rejection));
        }
        let answer = shared
            .backend
            .run(Keys::checking(*id), |shard, fx, now| {
                self.check_in(shard, fx, client, id, typed, now)
            })
            .await?;
        if !answer.valid {
            // The code was compared and was wrong (every refusal before comparing is an error).
            if let Err(error) = shared.backend.spend_guess(ip, client).await {
                tracing::warn!(%error, "a wrong code could not be counted against its guessing caps");
            }
        }
        Ok(answer)
    }

    /// Sends the same code again, once the cooldown has passed. With SMS budgets, a resend
    /// that everything else allows spends them between two rounds, then is written.
    pub async fn resend(&self, client: ClientId, id: &VerificationId) -> Result<View, ApiError> {
        let shared = &*self.shared;
        let mut budget_spent = !shared.budgets.is_configured();
        for _ in 0..2 {
            let resent = shared
                .backend
                .run(Keys::checking(*id), |shard, fx, now| {
                    self.resend_in(shard, fx, client, id, budget_spent, now)
                })
                .await?;
            match resent {
                rules::Resent::Done(view) => return Ok(view),
                rules::Resent::NeedsBudget(phone) => {
                    let region = Phone::parse(&phone.e164())
                        .ok()
                        .and_then(|(_, region)| region);
                    let country = crate::ratelimit::country_key(region);
                    let budgets = shared.budgets.keys_for(client, &country);
                    self.spend_budgets(&budgets, crate::budget::BudgetedSend::Resend)
                        .await?;
                    budget_spent = true;
                }
            }
        }
        Err(ApiError::StoreUnavailable)
    }

    /// Spends one SMS of `budgets`; a refusal is counted and becomes `429 budget_exhausted`.
    async fn spend_budgets(
        &self,
        budgets: &[crate::budget::BudgetKey],
        send: crate::budget::BudgetedSend,
    ) -> Result<(), ApiError> {
        let shared = &*self.shared;
        let refused = shared
            .backend
            .spend_budgets(&shared.budgets, budgets, shared.clock.now_ms())
            .await?;
        let Some(refused) = refused else {
            return Ok(());
        };
        shared.metrics.budget_refused(refused.scope, send);
        Err(self.rejected(crate::ratelimit::Rejection {
            limit: LimitKind::Budget,
            rule: refused.rule,
            retry_after: refused.retry_after,
        }))
    }

    /// Cancels a pending verification.
    pub async fn cancel(&self, client: ClientId, id: &VerificationId) -> Result<View, ApiError> {
        self.shared
            .backend
            .run(Keys::record(*id), |shard, fx, now| {
                self.cancel_in(shard, fx, client, id, now)
            })
            .await
    }

    // --- the dispatcher's calls ---

    /// Turns a job taken from the queue into an SMS for `carrier`, or drops it if its
    /// verification ended or expired.
    pub async fn prepare(&self, job: &Job, carrier: CarrierId) -> Prepared {
        self.prepare_keeping(job, carrier).await.0
    }

    /// [`Verifier::prepare`], also returning the verification as written and its revision
    /// when the back-end has one, for [`Verifier::complete`] to start from
    /// (`Job::snapshot`).
    pub async fn prepare_keeping(
        &self,
        job: &Job,
        carrier: CarrierId,
    ) -> (Prepared, Option<crate::store::Snapshot>) {
        let backend = &self.shared.backend;
        let ran = backend
            .run_deferring(Keys::record(job.id), None, |shard, fx, now| {
                let prepared = self.prepare_in(shard, fx, job, carrier, now);
                match prepared {
                    Prepared::Dropped => fx.ack = job.entry.map(|entry| (job.lane, entry)),
                    // Sent only while the job is still this instance's.
                    _ => fx.owns = job.entry.map(|entry| (job.lane, entry)),
                }
                Ok(prepared)
            })
            .await;
        match ran {
            Ok(Outcome::Ran {
                value,
                effects,
                written,
            }) => {
                backend.apply(*effects, self.shared.clock.now_ms());
                (value, written)
            }
            Ok(Outcome::NotOwned) => {
                backend.release(job.entry);
                tracing::debug!(verification = %job.id, "another instance took this SMS job over; not sending it");
                (Prepared::Dropped, None)
            }
            // The store is unreachable: the job stays here (and unacknowledged, on a shared
            // store) until it answers again.
            Err(_) => (Prepared::Later, None),
        }
    }

    /// Records what a carrier answered for `job`.
    pub async fn complete(&self, job: &Job, carrier: CarrierId, completion: Completion) {
        let shared = &*self.shared;
        let backend = &shared.backend;
        let ends_job = !matches!(completion, Completion::Retry);
        // A carrier's answer is what the verification's state and the job's acknowledgement
        // hang on: while the store is away, keep trying (holding this submit's window slot, so
        // the carrier slows down rather than sending what cannot be recorded).
        let mut pause = Duration::from_millis(50);
        let mut snapshot = job.snapshot.clone();
        let recorded = loop {
            let recorded = backend
                .run_deferring(Keys::record(job.id), snapshot.take(), |shard, fx, now| {
                    let receipt_id =
                        self.record_completion(shard, fx, job, carrier, completion.clone(), now);
                    if ends_job {
                        fx.ack = job.entry.map(|entry| (job.lane, entry));
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
            Ok(Outcome::Ran { value, effects, .. }) => {
                if let Some(receipt_id) = &value {
                    backend.index_receipt(carrier, receipt_id, job.id).await;
                }
                // Only now may the client hear of the submit, so that a receipt it expects
                // finds the id.
                backend.apply(*effects, shared.clock.now_ms());
                if let Some(receipt_id) = value {
                    // The carrier's receipt may have come before its answer to the submit.
                    if let Ok(Some(held)) = backend.take_held_receipt(carrier, &receipt_id).await {
                        let _ = self
                            .apply_receipt(carrier, job.id, &held.id, held.status)
                            .await;
                    }
                }
            }
            Ok(Outcome::NotOwned) | Err(_) => {
                // Let go of the job: read again from this instance's pending entries, it is
                // sent again unless its verification ended meanwhile.
                backend.release(job.entry);
                tracing::warn!(verification = %job.id, "a carrier's answer could not be recorded; the job stays in the store");
            }
        }
    }

    /// Puts a job back in line; returns false (and drops it) if its deadline has passed.
    pub fn requeue(&self, job: Job) -> bool {
        let now = self.shared.clock.now_ms();
        if now < job.deadline_ms {
            self.shared.backend.requeue(job);
            return true;
        }
        // Settled in its own task (a shared store's job stays there until then).
        let verifier = self.clone();
        tokio::spawn(async move {
            let backend = &verifier.shared.backend;
            let dropped = backend
                .run(Keys::record(job.id), |shard, fx, now| {
                    let reason = verifier.drop_late(shard, fx, &job.id, now);
                    verifier.shared.metrics.queue_dropped(reason);
                    fx.ack = job.entry.map(|entry| (job.lane, entry));
                    Ok(())
                })
                .await;
            // Not written: let go of the job, so it is read again (by this instance's look at
            // its own pending entries) and dropped then.
            if dropped.is_err() {
                backend.release(job.entry);
            }
        });
        false
    }

    // --- carriers' receipts ---

    /// The carrier named `name` in the config.
    pub fn carrier_by_name(&self, name: &str) -> Option<CarrierId> {
        self.shared
            .carriers
            .iter()
            .position(|carrier| carrier.name == name)
            .map(|index| index as CarrierId)
    }

    /// The carrier named `name`, if the token it presents with its receipts is its own (compared
    /// in constant time). An unknown name, a carrier without a `receipt_token` and a wrong token
    /// are the same `401`, and the token is hashed in every case, so neither the answer nor its
    /// timing tells which carrier names exist.
    pub fn authenticate_carrier(
        &self,
        name: &str,
        bearer: Option<&str>,
    ) -> Result<CarrierId, ApiError> {
        let presented: [u8; 32] =
            <sha2::Sha256 as sha2::Digest>::digest(bearer.unwrap_or_default().as_bytes()).into();
        let carrier = self.carrier_by_name(name);
        let expected = carrier
            .and_then(|carrier| self.shared.carriers.get(carrier as usize))
            .and_then(|carrier| carrier.receipt_token_sha256);
        let (Some(carrier), Some(expected), Some(_)) = (carrier, expected, bearer) else {
            return Err(ApiError::Unauthorized);
        };
        if bool::from(subtle::ConstantTimeEq::ct_eq(&presented[..], &expected[..])) {
            Ok(carrier)
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
        let backend = &self.shared.backend;
        // Any receipt shows that this carrier sends them.
        self.shared.deliveries.heard(carrier);
        if let Some(id) = backend.find_receipt(carrier, carrier_message_id).await? {
            return self
                .apply_receipt(carrier, id, carrier_message_id, status)
                .await;
        }
        for evicted in backend
            .hold_receipt(carrier, carrier_message_id, status)
            .await?
        {
            // Read back from the store: a carrier an earlier configuration had may be gone.
            if let Some(metrics) = self.shared.metrics.carrier_if_known(evicted as usize) {
                metrics.receipt_unmatched();
            }
        }
        // The submit answer may have been recorded between the lookup and the hold; whichever
        // side takes the held receipt applies it.
        if let Some(id) = backend.find_receipt(carrier, carrier_message_id).await? {
            if backend
                .take_held_receipt(carrier, carrier_message_id)
                .await?
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
        let (matched, observation) = self
            .shared
            .backend
            .run(Keys::record(id), |shard, fx, now| {
                Ok(self.apply_receipt_in(shard, fx, carrier, id, carrier_message_id, status, now))
            })
            .await?;
        if let Some(observation) = observation {
            self.shared.deliveries.observe(observation);
        }
        Ok(matched)
    }

    // --- the sweep ---

    /// Expires what has run out of time, forgets what is past retention, trims limiter memory
    /// and refreshes the gauges. Runs on the sweeper's timer.
    pub async fn sweep(&self) {
        let shared = &*self.shared;
        let backend = &shared.backend;
        let now = shared.clock.now_ms();
        // Housekeeping walks the embedded store: keep it off the request-serving workers.
        let verifier = self.clone();
        let kept = tokio::task::spawn_blocking(move || verifier.shared.backend.housekeep(now))
            .await
            .unwrap_or_default();
        shared
            .metrics
            .set_fraud_guard(shared.fraud_guard.housekeep(now));
        if let Some((phone_keys, ip_keys)) = kept.limiter_keys {
            shared.metrics.set_limiter_keys(phone_keys, ip_keys);
        }
        if backend.is_remote() {
            let up = backend.is_up().await;
            shared.metrics.set_store_up(up);
            if !up {
                shared.metrics.run_upkeep();
                return;
            }
        }
        if let Ok(due) = backend.due(now).await {
            for id in due {
                let swept = backend
                    .run(Keys::record(id), |shard, fx, now| {
                        Ok(self.sweep_one(shard, fx, &id, now))
                    })
                    .await;
                match swept {
                    Ok(Some(observation)) => shared.deliveries.observe(observation),
                    Ok(None) => {}
                    Err(_) => return,
                }
            }
        }
        // SMS still queued past their clients' thresholds: tell the clients, with an ETA.
        let Ok(due) = backend.due_delays(now).await else {
            return;
        };
        for (id, send_no) in due {
            let _ = backend
                .run(Keys::record(id), |shard, fx, now| {
                    // Still queued, or accepted by a carrier whose receipts are awaited and
                    // not delivered yet: either way the user has no code.
                    let still_waiting = shard.records.get(&id).is_some_and(|record| {
                        record.is_pending()
                            && record.sends == send_no
                            && (record.delivery == DeliveryState::Queued
                                || (record.delivery == DeliveryState::Submitted
                                    && record.awaits_receipt))
                    });
                    if still_waiting {
                        self.announce(shard, fx, &id, EventKind::Delayed, now);
                    }
                    fx.unwatch_delay = Some(send_no);
                    Ok(())
                })
                .await;
        }
        // Receipts held for a submit answer that never named them: unmatched after all.
        // The ids are read back from the store: a carrier an earlier configuration had (and
        // another instance may still have) is skipped, never looked up out of range.
        for carrier in backend.expired_receipts(now).await {
            if let Some(metrics) = shared.metrics.carrier_if_known(carrier as usize) {
                metrics.receipt_unmatched();
            }
        }
        let Ok(backlog) = backend.backlog().await else {
            return;
        };
        if let Some(reading) = shared.queue.overload() {
            shared.metrics.set_queue_overload(&reading);
        }
        let pace = self.drain_pace(CarrierSet::MAX);
        for lane in backlog {
            shared.metrics.set_queue_depth(lane.lane, lane.depth);
            shared
                .metrics
                .set_predicted_wait(lane.lane, lane.ahead_of_new as f64 / pace);
        }
        match (kept.records, backend.pending_count().await) {
            (Some(records), _) => shared.metrics.set_live(records),
            (None, Some(pending)) => shared.metrics.set_live(pending as usize),
            (None, None) => {}
        }
        shared.metrics.run_upkeep();
    }

    /// A verification ended: counted by country if approved, and told to the fraud guard if
    /// its SMS reached the phone (`reached`), so that a carrier outage judges nothing.
    fn conversion_ended(&self, phone: &Phone, reached: bool, approved: bool, now: Millis) {
        let shared = &*self.shared;
        let judged = reached && shared.fraud_guard.is_enabled();
        if !approved && !judged {
            return;
        }
        let region = Phone::parse(&phone.e164())
            .ok()
            .and_then(|(_, region)| region);
        let country = crate::ratelimit::country_key(region);
        if approved {
            shared
                .metrics
                .by_country(&country, crate::metrics::CountryEvent::Approved);
        }
        if judged {
            let keys = [
                GuardKey::Country(country.into()),
                GuardKey::Prefix(crate::ratelimit::prefix_key(phone, shared.prefix_digits).into()),
            ];
            shared.fraud_guard.ended(&keys, approved, now);
        }
    }

    /// A carrier accepted an SMS to `phone`: counted by country.
    fn sms_sent_to(&self, phone: &Phone) {
        let region = Phone::parse(&phone.e164())
            .ok()
            .and_then(|(_, region)| region);
        self.shared.metrics.by_country(
            &crate::ratelimit::country_key(region),
            crate::metrics::CountryEvent::SmsSent,
        );
    }

    fn rejected(&self, rejection: crate::ratelimit::Rejection) -> ApiError {
        self.shared.metrics.rejected(rejection.limit);
        ApiError::from(rejection)
    }

    fn ended(&self, how: Ended) {
        self.shared.metrics.ended(how);
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
                citizen_ip: Vec::new(),
                warned_without_citizen_ip: Vec::new(),
                autofill: Vec::new(),
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
            citizen_ip: configs
                .iter()
                .map(|client| client.citizen_ip.clone())
                .collect(),
            warned_without_citizen_ip: configs.iter().map(|_| AtomicBool::new(false)).collect(),
            autofill: configs
                .iter()
                .map(|client| crate::sms::ClientAutofill {
                    web_origin_hosts: client.web_origin_hosts.clone(),
                    app_hashes: client.app_hashes.clone(),
                })
                .collect(),
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

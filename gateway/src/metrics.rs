//! The metrics catalogue: every series the gateway exports, registered at start-up.
//!
//! Each gateway owns its own Prometheus recorder (no global one), so several gateways can run in
//! one test process, and every handle is registered once in [`Metrics::new`]: counters start at
//! zero and gauges are set, so dashboards and alerts never meet an absent series on a fresh
//! instance. Labels are closed sets only (route templates, carrier and client names from the
//! config, fixed outcome and reason enums); never a phone number, an IP, a code or error text.

use std::sync::Arc;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Buckets for request handling and carrier submits, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for queue waits and session extensions, in seconds (up to the 15-minute maximum).
const WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0,
];
/// From a carrier's acceptance to its `delivered` receipt: seconds when all is well, up to the
/// half hour of an operator generating its SMS late.
const DELIVERY_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
];

/// The API routes, by template: the closed set behind the `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    StartVerification,
    GetVerification,
    CheckVerification,
    ResendVerification,
    CancelVerification,
    CarrierReceipt,
    OpenApi,
    Unmatched,
}

/// Statuses the API answers with: the closed set behind the `status` label.
pub const STATUSES: &[u16] = &[
    200, 202, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 503,
];

/// Outcomes of a verification that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Approved,
    Expired,
    Canceled,
    TooManyAttempts,
    Undeliverable,
}

/// Outcomes of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Valid,
    Invalid,
    Locked,
}

/// How a start request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A new verification.
    Created,
    /// A second caller's own verification, beside this phone and client's live one and
    /// carrying its code.
    Sibling,
    /// An `Idempotency-Key` replay.
    Replayed,
}

/// Why a queued SMS was dropped or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDrop {
    Expired,
    Canceled,
    /// Held under overload: nobody had read its verification for `unseen_after`.
    Abandoned,
}

/// Why a new verification was refused at the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    Full,
    PredictedWait,
    /// The predicted wait passed the adaptive policy's `max_wait`.
    MaxWait,
}

/// The two listeners, behind the `listener` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Api,
    Admin,
}

/// Why the gateway closed a connection (or, for a late body, answered `408`) before the peer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionClosed {
    /// No complete first request within `prelude_timeout_ms`.
    PreludeTimeout,
    /// No request in flight for `idle_timeout_ms`.
    Idle,
    /// Its address already held `max_connections_per_ip`.
    PerIpCap,
    /// A request body not complete within `body_timeout_ms`.
    BodyTimeout,
}

/// Outcomes of one submit to a carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    Accepted,
    Throttled,
    Temporary,
    Permanent,
}

/// What happened to a webhook event: delivered, an attempt failed and will be retried, given up
/// after the last attempt, or dropped because the outbox was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered,
    Retried,
    GaveUp,
    Dropped,
}

/// The gateway's supervised background tasks (`otpgate_task_restarts_total{task}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The sweeper: expiry, retention, housekeeping, gauges.
    Sweeper,
    /// The webhook sender.
    Webhooks,
    /// The redis back-end's feeder of SMS jobs and webhook events (and its keep-alive).
    Feed,
    /// The redis back-end's subscription to changed verifications, which wakes long-polls.
    Changes,
}

impl Task {
    pub const ALL: [Task; 4] = [Task::Sweeper, Task::Webhooks, Task::Feed, Task::Changes];

    pub fn name(self) -> &'static str {
        match self {
            Task::Sweeper => "sweeper",
            Task::Webhooks => "webhooks",
            Task::Feed => "feed",
            Task::Changes => "changes",
        }
    }
}

/// Every handle the gateway records into. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

struct Shared {
    handle: PrometheusHandle,
    http_requests: Vec<Vec<Counter>>,
    http_duration: Vec<Histogram>,
    started: [Counter; 3],
    checks: [Counter; 3],
    ended: [Counter; 5],
    live: Gauge,
    store_up: Gauge,
    rejections: [Counter; 12],
    /// By scope (client, country), then by send (first, resend).
    budget_refusals: [[Counter; 2]; 2],
    /// By client id; empty for the anonymous client.
    starts_without_citizen_ip: Vec<Counter>,
    /// By client id; empty for the anonymous client.
    long_polls_refused: Vec<Counter>,
    task_restarts: [Counter; 4],
    limiter_keys: [Gauge; 2],
    session_extension: Histogram,
    queue_dropped: [Counter; 3],
    queue_refused: [Counter; 3],
    queue_resumed: Counter,
    queue_out_of_order: Counter,
    queue_overloaded: Gauge,
    queue_oldest_wait: Gauge,
    queue_drain: Gauge,
    lanes: Vec<Lane>,
    carriers: Vec<CarrierMetrics>,
    webhooks: Vec<WebhookMetrics>,
    webhook_outbox: Gauge,
    code_ttl: Gauge,
    max_extension: Gauge,
    listeners: [ListenerMetrics; 2],
    /// Kept to register the series by country once their labels are known.
    recorder: PrometheusRecorder,
    by_country: std::sync::OnceLock<CountryMetrics>,
}

/// Series by phone country (one `country` label, a closed set: see
/// [`Metrics::register_countries`]), and the fraud guard's.
struct CountryMetrics {
    index: std::collections::HashMap<String, usize>,
    /// The `other` label's index: a region outside the set.
    other: usize,
    started: Vec<Counter>,
    sms_sent: Vec<Counter>,
    approved: Vec<Counter>,
    guard_refusals: Vec<Counter>,
    /// By kind: country, prefix.
    guard_slowed: [Gauge; 2],
    guard_blocked: [Gauge; 2],
}

/// What happened to a verification, counted by its phone's country.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountryEvent {
    /// A new verification.
    Started,
    /// A carrier accepted one of its SMS.
    SmsSent,
    Approved,
    /// The fraud guard refused a start.
    GuardRefused,
}

/// Handles for one listener's connections.
#[derive(Clone)]
pub struct ListenerMetrics {
    open: Gauge,
    closed: [Counter; 4],
}

/// Handles for one client's webhook.
#[derive(Clone)]
pub struct WebhookMetrics {
    events: [Counter; 6],
    outcomes: [Counter; 4],
    lag: Histogram,
}

struct Lane {
    priority: u8,
    depth: Gauge,
    predicted_wait: Gauge,
    wait: Histogram,
}

/// Handles for one carrier.
#[derive(Clone)]
pub struct CarrierMetrics {
    submits: [Counter; 4],
    duration: Histogram,
    segments: [Counter; 2],
    in_flight: Gauge,
    pace: Gauge,
    receipts: [Counter; 3],
    receipts_unmatched: Counter,
    delivery: Histogram,
    first_accepted: Histogram,
    delivered_in: Histogram,
    receipts_missing: Counter,
    rerouted: Counter,
    probes: Counter,
    reroutes_skipped: [Counter; 4],
    delivery_health: [Gauge; 3],
    configured_pace: Gauge,
    circuit: Gauge,
    retries: [Counter; 2],
    passed_on: Counter,
    took_over: Counter,
    /// SMPP carriers only.
    sessions_bound: Option<Gauge>,
}

// === impl Route ===

impl Route {
    pub const ALL: [Route; 8] = [
        Route::StartVerification,
        Route::GetVerification,
        Route::CheckVerification,
        Route::ResendVerification,
        Route::CancelVerification,
        Route::CarrierReceipt,
        Route::OpenApi,
        Route::Unmatched,
    ];

    /// The route for a matched path template and method.
    pub fn from_template(method: &http::Method, template: Option<&str>) -> Route {
        match (method.as_str(), template) {
            ("POST", Some("/v1/verifications")) => Route::StartVerification,
            ("GET", Some("/v1/verifications/{id}")) => Route::GetVerification,
            ("POST", Some("/v1/verifications/{id}/check")) => Route::CheckVerification,
            ("POST", Some("/v1/verifications/{id}/resend")) => Route::ResendVerification,
            ("DELETE", Some("/v1/verifications/{id}")) => Route::CancelVerification,
            ("POST", Some("/v1/carriers/{name}/receipts")) => Route::CarrierReceipt,
            ("GET", Some("/v1/openapi.json")) => Route::OpenApi,
            _ => Route::Unmatched,
        }
    }

    /// The route's path template, e.g. `/v1/verifications/{id}/check`.
    pub fn template(self) -> &'static str {
        self.labels().1
    }

    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Route::StartVerification => ("POST", "/v1/verifications"),
            Route::GetVerification => ("GET", "/v1/verifications/{id}"),
            Route::CheckVerification => ("POST", "/v1/verifications/{id}/check"),
            Route::ResendVerification => ("POST", "/v1/verifications/{id}/resend"),
            Route::CancelVerification => ("DELETE", "/v1/verifications/{id}"),
            Route::CarrierReceipt => ("POST", "/v1/carriers/{name}/receipts"),
            Route::OpenApi => ("GET", "/v1/openapi.json"),
            Route::Unmatched => ("other", "unmatched"),
        }
    }

    fn index(self) -> usize {
        Route::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(Route::ALL.len() - 1)
    }
}

// === impl Metrics ===

impl Metrics {
    /// Builds the recorder and registers every series: lanes by priority, carriers by name (and
    /// whether they speak SMPP), clients by name (none for the anonymous client), and webhooks
    /// by the names of the clients that have one.
    pub fn new(
        lane_priorities: &[u8],
        carriers: &[(String, bool)],
        clients: &[String],
        webhook_clients: &[String],
    ) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("wait_seconds".into()), WAIT_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("extension_seconds".into()), WAIT_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("otpgate_sms_delivery_seconds".into()),
                    WAIT_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("otpgate_carrier_delivery_seconds".into()),
                    DELIVERY_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("otpgate_webhook_delivery_seconds".into()),
                    WAIT_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("otpgate_sms_first_accepted_seconds".into()),
                    WAIT_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let r = Registrar {
            recorder: &recorder,
        };

        r.describe_counter(
            "otpgate_http_requests_total",
            "API requests answered, by route template, method and status.",
        );
        r.describe_histogram(
            "otpgate_http_request_duration_seconds",
            Unit::Seconds,
            "Time to answer an API request, by route template and method.",
        );
        r.describe_counter("otpgate_verifications_started_total", "Start requests answered with a verification: created, a sibling (a second caller's own, with the live one's code), or an idempotent replay.");
        r.describe_counter(
            "otpgate_verification_checks_total",
            "Code checks, by outcome (valid, invalid, locked by the failed-checks limit).",
        );
        r.describe_counter(
            "otpgate_verifications_ended_total",
            "Verifications that left pending, by outcome.",
        );
        r.describe_gauge(
            "otpgate_verifications_live",
            "Verifications held in the store: pending or ended within retention (embedded); \
             pending, across every instance (redis).",
        );
        r.describe_gauge(
            "otpgate_store_up",
            "1 when the store answers (always, on the embedded back-end); 0 while Redis is \
             unreachable.",
        );
        r.describe_counter(
            "otpgate_ratelimit_rejections_total",
            "Requests turned away by a limit, by limit (failed_checks: wrong codes per phone \
             and client; failed_checks_ip and failed_checks_client: wrong codes per citizen \
             address and per client).",
        );
        r.describe_gauge(
            "otpgate_ratelimit_keys",
            "Keys held by a keyed rate limiter, by limit.",
        );
        r.describe_histogram("otpgate_session_extension_seconds", Unit::Seconds, "How far queueing pushed a verification's expiry, recorded when a carrier accepts its first SMS.");
        r.describe_gauge(
            "otpgate_queue_depth",
            "SMS jobs waiting for a carrier, by lane (client priority).",
        );
        r.describe_gauge(
            "otpgate_queue_predicted_wait_seconds",
            "How long a new SMS in this lane would wait: the jobs ahead of it over the carriers' configured pace. Starts are refused (503) once it exceeds the session's maximum extension.",
        );
        r.describe_gauge(
            "otpgate_session_max_extension_seconds",
            "Configured max_extension: how far queueing may push a session's expiry; the predicted wait is compared with it.",
        );
        r.describe_gauge(
            "otpgate_code_ttl_seconds",
            "Configured code_ttl: how long a code lives from the carrier's acceptance.",
        );
        r.describe_histogram(
            "otpgate_queue_wait_seconds",
            Unit::Seconds,
            "Time an SMS job waited in the queue before a carrier took it, by lane.",
        );
        r.describe_counter(
            "otpgate_queue_dropped_total",
            "Queued SMS jobs dropped instead of sent late, by reason.",
        );
        r.describe_counter(
            "otpgate_queue_rejected_total",
            "Start requests refused with 503 at the queue, by reason: full, predicted_wait (past max_extension, deadline policy), max_wait (past the adaptive policy's max_wait).",
        );
        r.describe_counter(
            "otpgate_queue_resumed_total",
            "SMS held under overload (dropped as abandoned) and queued again because someone read their verification.",
        );
        r.describe_counter(
            "otpgate_queue_out_of_order_total",
            "SMS jobs taken under overload ahead of a job with an earlier deadline (newest first).",
        );
        r.describe_gauge(
            "otpgate_queue_overloaded",
            "1 while the queue is in overload (the oldest job has waited longer than overload_wait_ms for overload_after_ms) and serves the newest first; 0 otherwise, and always under the deadline policy.",
        );
        r.describe_gauge(
            "otpgate_queue_oldest_wait_seconds",
            "How long the oldest queued SMS job has waited (adaptive policy; 0 under the deadline policy).",
        );
        r.describe_gauge(
            "otpgate_queue_drain_per_second",
            "SMS the carriers accepted per second lately, as the adaptive policy measures it for admission.",
        );
        r.describe_counter(
            "otpgate_sms_submitted_total",
            "Submits to carriers, by carrier and outcome.",
        );
        r.describe_histogram(
            "otpgate_carrier_submit_duration_seconds",
            Unit::Seconds,
            "Time for a carrier to answer a submit, by carrier.",
        );
        r.describe_counter(
            "otpgate_sms_segments_total",
            "SMS segments handed to carriers, by carrier and encoding.",
        );
        r.describe_gauge(
            "otpgate_carrier_window_in_use",
            "Submits in flight, by carrier.",
        );
        r.describe_gauge(
            "otpgate_carrier_pace_per_second",
            "Segments per second the dispatcher allows a carrier now.",
        );
        r.describe_counter(
            "otpgate_sms_retries_total",
            "SMS put back in line after a throttle answer or a temporary failure, by carrier and reason.",
        );
        r.describe_counter(
            "otpgate_sms_failovers_total",
            "SMS a carrier sent in place of another: a retry after the other failed, or a resend after it sent the first SMS.",
        );
        r.describe_counter(
            "otpgate_sms_passed_on_total",
            "Jobs a carrier handed on to the others because it had just failed them (or sent their earlier SMS).",
        );
        r.describe_counter(
            "otpgate_receipts_total",
            "Delivery receipts matched to an SMS, by carrier and state.",
        );
        r.describe_counter(
            "otpgate_receipts_unmatched_total",
            "Delivery receipts that matched no SMS, by carrier.",
        );
        r.describe_histogram(
            "otpgate_sms_delivery_seconds",
            Unit::Seconds,
            "Time from the start request to the delivered receipt, by carrier.",
        );
        r.describe_histogram(
            "otpgate_sms_first_accepted_seconds",
            Unit::Seconds,
            "Time from the start request to a carrier's first acceptance of the verification's SMS (the time to SMS the gateway can see), by carrier.",
        );
        r.describe_histogram(
            "otpgate_carrier_delivery_seconds",
            Unit::Seconds,
            "Time from a carrier's acceptance of an SMS to its delivered receipt, by carrier: the lag acceptance cannot show.",
        );
        r.describe_counter(
            "otpgate_carrier_receipts_missing_total",
            "SMS with no delivered receipt within their carrier's receipt_timeout, by carrier (only carriers whose receipts are awaited).",
        );
        r.describe_counter(
            "otpgate_carrier_rerouted_total",
            "SMS the gateway sent again, the same code through another carrier, because this carrier's receipt was missing; apart from user resends.",
        );
        r.describe_counter(
            "otpgate_carrier_reroutes_skipped_total",
            "SMS with a missing receipt that were not rerouted, by carrier and reason (exhausted, no_other_carrier, limited, no_room).",
        );
        r.describe_counter(
            "otpgate_carrier_probes_total",
            "Jobs a lagging carrier took as probes of its delivery, by carrier.",
        );
        r.describe_gauge(
            "otpgate_carrier_delivery_state",
            "1 for each carrier's delivery state (unknown: receipts not awaited; ok; lagging: its receipts come late or not at all), 0 for the others.",
        );
        r.describe_gauge(
            "otpgate_carrier_configured_pace_per_second",
            "The pace each carrier is configured for, in segments per second; the adaptive pace runs at or below it.",
        );
        r.describe_gauge(
            "otpgate_carrier_sessions_bound",
            "SMPP sessions bound for submits, by carrier (SMPP carriers only).",
        );
        r.describe_gauge(
            "otpgate_carrier_circuit_state",
            "Circuit breaker state by carrier: 0 closed, 1 half-open, 2 open.",
        );
        r.describe_gauge(
            "otpgate_build_info",
            "Always 1; the version label says which build runs.",
        );

        r.gauge(
            "otpgate_build_info",
            vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);

        let http_requests = Route::ALL
            .iter()
            .map(|route| {
                let (method, template) = route.labels();
                STATUSES
                    .iter()
                    .map(|status| {
                        r.counter(
                            "otpgate_http_requests_total",
                            vec![
                                Label::new("route", template),
                                Label::new("method", method),
                                Label::new("status", status.to_string()),
                            ],
                        )
                    })
                    .collect()
            })
            .collect();
        let http_duration = Route::ALL
            .iter()
            .map(|route| {
                let (method, template) = route.labels();
                r.histogram(
                    "otpgate_http_request_duration_seconds",
                    vec![Label::new("route", template), Label::new("method", method)],
                )
            })
            .collect();

        let outcome = |name: &str, values: &[&'static str]| -> Vec<Counter> {
            values
                .iter()
                .map(|value| r.counter(name, vec![Label::new("outcome", *value)]))
                .collect()
        };
        let started = outcome(
            "otpgate_verifications_started_total",
            &["created", "sibling", "replayed"],
        );
        let checks = outcome(
            "otpgate_verification_checks_total",
            &["valid", "invalid", "locked"],
        );
        let ended = outcome(
            "otpgate_verifications_ended_total",
            &[
                "approved",
                "expired",
                "canceled",
                "too_many_attempts",
                "undeliverable",
            ],
        );
        let rejections: Vec<Counter> = [
            "phone",
            "ip",
            "client",
            "failed_checks",
            "resend_cooldown",
            "country",
            "country_rate",
            "prefix_rate",
            "budget",
            "fraud_guard",
            "failed_checks_ip",
            "failed_checks_client",
        ]
        .iter()
        .map(|limit| {
            r.counter(
                "otpgate_ratelimit_rejections_total",
                vec![Label::new("limit", *limit)],
            )
        })
        .collect();
        r.describe_counter(
            "otpgate_sms_budget_refusals_total",
            "SMS an SMS budget refused, by scope (client, country) and send (first: a start \
             got 429 budget_exhausted; resend: a resend did).",
        );
        let budget_refusals = ["client", "country"].map(|scope| {
            ["first", "resend"].map(|send| {
                r.counter(
                    "otpgate_sms_budget_refusals_total",
                    vec![Label::new("scope", scope), Label::new("send", send)],
                )
            })
        });
        r.describe_counter(
            "otpgate_starts_without_citizen_ip_total",
            "Starts that came without the citizen's address (no client_ip) from a client whose \
             citizen_ip is \"optional\", by client: they are not limited per IP. A warning \
             sign: the frontend most likely forgot client_ip.",
        );
        let starts_without_citizen_ip: Vec<Counter> = clients
            .iter()
            .map(|name| {
                r.counter(
                    "otpgate_starts_without_citizen_ip_total",
                    vec![Label::new("client", name.clone())],
                )
            })
            .collect();
        r.describe_counter(
            "otpgate_long_polls_refused_total",
            "GETs with ?wait= answered at once, by client, because the client already held \
             [verification] long_polls_per_client long-polls on this instance.",
        );
        let long_polls_refused: Vec<Counter> = clients
            .iter()
            .map(|name| {
                r.counter(
                    "otpgate_long_polls_refused_total",
                    vec![Label::new("client", name.clone())],
                )
            })
            .collect();
        r.describe_counter(
            "otpgate_task_restarts_total",
            "Background tasks restarted after they ended or panicked, by task: sweeper, \
             webhooks, feed, changes. Any increase is a bug or a lasting outage worth a look.",
        );
        let task_restarts: Vec<Counter> = Task::ALL
            .iter()
            .map(|task| {
                r.counter(
                    "otpgate_task_restarts_total",
                    vec![Label::new("task", task.name())],
                )
            })
            .collect();
        let limiter_keys: Vec<Gauge> = ["phone", "ip"]
            .iter()
            .map(|limit| r.gauge("otpgate_ratelimit_keys", vec![Label::new("limit", *limit)]))
            .collect();
        let reason = |name: &str, values: &[&'static str]| -> Vec<Counter> {
            values
                .iter()
                .map(|value| r.counter(name, vec![Label::new("reason", *value)]))
                .collect()
        };
        let queue_dropped = reason(
            "otpgate_queue_dropped_total",
            &["expired", "canceled", "abandoned"],
        );
        let queue_refused = reason(
            "otpgate_queue_rejected_total",
            &["full", "predicted_wait", "max_wait"],
        );

        let lanes = lane_priorities
            .iter()
            .map(|&priority| {
                let labels = || vec![Label::new("lane", priority.to_string())];
                let depth = r.gauge("otpgate_queue_depth", labels());
                depth.set(0.0);
                let predicted_wait = r.gauge("otpgate_queue_predicted_wait_seconds", labels());
                predicted_wait.set(0.0);
                Lane {
                    priority,
                    predicted_wait,
                    depth,
                    wait: r.histogram("otpgate_queue_wait_seconds", labels()),
                }
            })
            .collect();
        let carriers = carriers
            .iter()
            .map(|(name, smpp)| {
                let carrier = || Label::new("carrier", name.clone());
                let submits: Vec<Counter> = ["accepted", "throttled", "temporary", "permanent"]
                    .iter()
                    .map(|outcome| {
                        r.counter(
                            "otpgate_sms_submitted_total",
                            vec![carrier(), Label::new("outcome", *outcome)],
                        )
                    })
                    .collect();
                let segments: Vec<Counter> = ["gsm7", "ucs2"]
                    .iter()
                    .map(|encoding| {
                        r.counter(
                            "otpgate_sms_segments_total",
                            vec![carrier(), Label::new("encoding", *encoding)],
                        )
                    })
                    .collect();
                let in_flight = r.gauge("otpgate_carrier_window_in_use", vec![carrier()]);
                in_flight.set(0.0);
                let receipts: Vec<Counter> = ["delivered", "undeliverable", "expired"]
                    .iter()
                    .map(|state| {
                        r.counter(
                            "otpgate_receipts_total",
                            vec![carrier(), Label::new("state", *state)],
                        )
                    })
                    .collect();
                let retries: Vec<Counter> = ["throttled", "temporary"]
                    .iter()
                    .map(|reason| {
                        r.counter(
                            "otpgate_sms_retries_total",
                            vec![carrier(), Label::new("reason", *reason)],
                        )
                    })
                    .collect();
                let passed_on = r.counter("otpgate_sms_passed_on_total", vec![carrier()]);
                let took_over = r.counter("otpgate_sms_failovers_total", vec![carrier()]);
                let circuit = r.gauge("otpgate_carrier_circuit_state", vec![carrier()]);
                circuit.set(0.0);
                let sessions_bound = smpp.then(|| {
                    let gauge = r.gauge("otpgate_carrier_sessions_bound", vec![carrier()]);
                    gauge.set(0.0);
                    gauge
                });
                let reroutes_skipped: Vec<Counter> = crate::delivery::Reroute::SKIPPED
                    .iter()
                    .map(|reason| {
                        r.counter(
                            "otpgate_carrier_reroutes_skipped_total",
                            vec![carrier(), Label::new("reason", reason.as_str())],
                        )
                    })
                    .collect();
                let delivery_health: Vec<Gauge> = crate::delivery::Health::ALL
                    .iter()
                    .map(|health| {
                        let gauge = r.gauge(
                            "otpgate_carrier_delivery_state",
                            vec![carrier(), Label::new("state", health.as_str())],
                        );
                        gauge.set(0.0);
                        gauge
                    })
                    .collect();
                CarrierMetrics {
                    delivered_in: r.histogram("otpgate_carrier_delivery_seconds", vec![carrier()]),
                    receipts_missing: r
                        .counter("otpgate_carrier_receipts_missing_total", vec![carrier()]),
                    rerouted: r.counter("otpgate_carrier_rerouted_total", vec![carrier()]),
                    probes: r.counter("otpgate_carrier_probes_total", vec![carrier()]),
                    reroutes_skipped: to_array(reroutes_skipped),
                    delivery_health: to_array(delivery_health),
                    sessions_bound,
                    retries: to_array(retries),
                    passed_on,
                    took_over,
                    circuit,
                    receipts: to_array(receipts),
                    receipts_unmatched: r
                        .counter("otpgate_receipts_unmatched_total", vec![carrier()]),
                    delivery: r.histogram("otpgate_sms_delivery_seconds", vec![carrier()]),
                    first_accepted: r
                        .histogram("otpgate_sms_first_accepted_seconds", vec![carrier()]),
                    configured_pace: r.gauge(
                        "otpgate_carrier_configured_pace_per_second",
                        vec![carrier()],
                    ),
                    submits: to_array(submits),
                    duration: r
                        .histogram("otpgate_carrier_submit_duration_seconds", vec![carrier()]),
                    segments: to_array(segments),
                    in_flight,
                    pace: r.gauge("otpgate_carrier_pace_per_second", vec![carrier()]),
                }
            })
            .collect();
        r.describe_counter(
            "otpgate_webhook_events_total",
            "Webhook events raised, by client and event type.",
        );
        r.describe_counter(
            "otpgate_webhook_deliveries_total",
            "Webhook outcomes, by client: delivered, an attempt failed and is retried, given up \
             after the last attempt, dropped because the outbox was full.",
        );
        r.describe_histogram(
            "otpgate_webhook_delivery_seconds",
            Unit::Seconds,
            "Time from a webhook event being raised to its delivery, by client.",
        );
        r.describe_gauge(
            "otpgate_webhook_outbox_depth",
            "Webhook events queued, waiting out a retry, or being sent.",
        );
        let webhooks = webhook_clients
            .iter()
            .map(|name| {
                let client = || Label::new("client", name.clone());
                let events: Vec<Counter> = crate::verification::EventKind::ALL
                    .iter()
                    .map(|kind| {
                        r.counter(
                            "otpgate_webhook_events_total",
                            vec![client(), Label::new("event", kind.name())],
                        )
                    })
                    .collect();
                let outcomes: Vec<Counter> = ["delivered", "retried", "gave_up", "dropped"]
                    .iter()
                    .map(|outcome| {
                        r.counter(
                            "otpgate_webhook_deliveries_total",
                            vec![client(), Label::new("outcome", *outcome)],
                        )
                    })
                    .collect();
                WebhookMetrics {
                    events: to_array(events),
                    outcomes: to_array(outcomes),
                    lag: r.histogram("otpgate_webhook_delivery_seconds", vec![client()]),
                }
            })
            .collect();
        let webhook_outbox = r.gauge("otpgate_webhook_outbox_depth", vec![]);
        webhook_outbox.set(0.0);
        let live = r.gauge("otpgate_verifications_live", vec![]);
        live.set(0.0);
        let store_up = r.gauge("otpgate_store_up", vec![]);
        store_up.set(1.0);
        let session_extension = r.histogram("otpgate_session_extension_seconds", vec![]);
        let gauge_at_zero = |name: &'static str| {
            let gauge = r.gauge(name, vec![]);
            gauge.set(0.0);
            gauge
        };
        let queue_overloaded = gauge_at_zero("otpgate_queue_overloaded");
        let queue_oldest_wait = gauge_at_zero("otpgate_queue_oldest_wait_seconds");
        let queue_drain = gauge_at_zero("otpgate_queue_drain_per_second");

        r.describe_gauge(
            "otpgate_connections_open",
            "Connections open, by listener (api, admin).",
        );
        r.describe_counter(
            "otpgate_connections_closed_total",
            "Connections the gateway closed before the peer did, by listener and reason: no \
             complete first request in time (prelude_timeout), nothing in flight for too long \
             (idle), over the per-address cap (per_ip_cap); body_timeout counts request bodies \
             not complete in time, answered 408.",
        );
        let listeners: Vec<ListenerMetrics> = ["api", "admin"]
            .iter()
            .map(|listener| {
                let label = || Label::new("listener", *listener);
                let open = r.gauge("otpgate_connections_open", vec![label()]);
                open.set(0.0);
                let closed: Vec<Counter> =
                    ["prelude_timeout", "idle", "per_ip_cap", "body_timeout"]
                        .iter()
                        .map(|reason| {
                            r.counter(
                                "otpgate_connections_closed_total",
                                vec![label(), Label::new("reason", *reason)],
                            )
                        })
                        .collect();
                ListenerMetrics {
                    open,
                    closed: to_array(closed),
                }
            })
            .collect();

        Metrics {
            shared: Arc::new(Shared {
                handle,
                http_requests,
                http_duration,
                started: to_array(started),
                checks: to_array(checks),
                ended: to_array(ended),
                live,
                store_up,
                rejections: to_array(rejections),
                budget_refusals,
                starts_without_citizen_ip,
                long_polls_refused,
                task_restarts: to_array(task_restarts),
                limiter_keys: to_array(limiter_keys),
                session_extension,
                queue_dropped: to_array(queue_dropped),
                queue_refused: to_array(queue_refused),
                queue_resumed: r.counter("otpgate_queue_resumed_total", vec![]),
                queue_out_of_order: r.counter("otpgate_queue_out_of_order_total", vec![]),
                queue_overloaded,
                queue_oldest_wait,
                queue_drain,
                lanes,
                carriers,
                webhooks,
                webhook_outbox,
                code_ttl: r.gauge("otpgate_code_ttl_seconds", vec![]),
                max_extension: r.gauge("otpgate_session_max_extension_seconds", vec![]),
                listeners: to_array(listeners),
                recorder,
                by_country: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.shared.handle.render()
    }

    /// Drains histogram samples into their buckets; run on a timer so memory stays bounded.
    pub fn run_upkeep(&self) {
        self.shared.handle.run_upkeep();
    }

    pub fn http_request(&self, route: Route, status: u16, seconds: f64) {
        let route_index = route.index();
        let status_index = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len() - 1);
        self.shared.http_requests[route_index][status_index].increment(1);
        self.shared.http_duration[route_index].record(seconds);
    }

    pub fn started(&self, how: Started) {
        self.shared.started[how as usize].increment(1);
    }

    pub fn checked(&self, outcome: Checked) {
        self.shared.checks[outcome as usize].increment(1);
    }

    pub fn ended(&self, outcome: Ended) {
        self.shared.ended[outcome as usize].increment(1);
    }

    pub fn set_live(&self, n_live: usize) {
        self.shared.live.set(n_live as f64);
    }

    /// Whether the store answered its last call.
    pub fn set_store_up(&self, up: bool) {
        self.shared.store_up.set(if up { 1.0 } else { 0.0 });
    }

    pub fn rejected(&self, limit: crate::ratelimit::LimitKind) {
        self.shared.rejections[limit as usize].increment(1);
    }

    /// Registers the series by country, labelled by `regions` (region codes, `"001"` for
    /// numbers of no region) and `"other"`; once, at start-up (a second call changes nothing).
    pub fn register_countries(&self, regions: &[String]) {
        let r = Registrar {
            recorder: &self.shared.recorder,
        };
        r.describe_counter(
            "otpgate_country_verifications_started_total",
            "New verifications, by phone country (region code; 001: no region; other: outside the set).",
        );
        r.describe_counter(
            "otpgate_country_sms_sent_total",
            "SMS carriers accepted (first SMS, resends, reroutes), by phone country.",
        );
        r.describe_counter(
            "otpgate_country_verifications_approved_total",
            "Verifications that ended approved, by phone country.",
        );
        r.describe_counter(
            "otpgate_fraud_guard_refusals_total",
            "Starts the fraud guard refused (429 fraud_suspected: blocked or slowed), by phone country.",
        );
        r.describe_gauge(
            "otpgate_fraud_guard_slowed",
            "Countries and number prefixes whose starts the fraud guard slows now, by scope (this instance's view).",
        );
        r.describe_gauge(
            "otpgate_fraud_guard_blocked",
            "Countries and number prefixes whose starts the fraud guard blocks now, by scope (this instance's view).",
        );
        let mut labels: Vec<String> = regions.to_vec();
        labels.sort();
        labels.dedup();
        labels.retain(|label| label != "other");
        labels.push("other".to_owned());
        let series = |name: &str| -> Vec<Counter> {
            labels
                .iter()
                .map(|label| r.counter(name, vec![Label::new("country", label.clone())]))
                .collect()
        };
        let scoped = |name: &str| {
            ["country", "prefix"].map(|scope| {
                let gauge = r.gauge(name, vec![Label::new("scope", scope)]);
                gauge.set(0.0);
                gauge
            })
        };
        let by_country = CountryMetrics {
            index: labels
                .iter()
                .enumerate()
                .map(|(index, label)| (label.clone(), index))
                .collect(),
            other: labels.len() - 1,
            started: series("otpgate_country_verifications_started_total"),
            sms_sent: series("otpgate_country_sms_sent_total"),
            approved: series("otpgate_country_verifications_approved_total"),
            guard_refusals: series("otpgate_fraud_guard_refusals_total"),
            guard_slowed: scoped("otpgate_fraud_guard_slowed"),
            guard_blocked: scoped("otpgate_fraud_guard_blocked"),
        };
        let _ = self.shared.by_country.set(by_country);
    }

    /// Counts `event` for a phone of `country` (a region code, `"001"`, or anything else,
    /// which counts as `other`).
    pub fn by_country(&self, country: &str, event: CountryEvent) {
        let Some(by_country) = self.shared.by_country.get() else {
            return;
        };
        let index = by_country
            .index
            .get(country)
            .copied()
            .unwrap_or(by_country.other);
        let series = match event {
            CountryEvent::Started => &by_country.started,
            CountryEvent::SmsSent => &by_country.sms_sent,
            CountryEvent::Approved => &by_country.approved,
            CountryEvent::GuardRefused => &by_country.guard_refusals,
        };
        if let Some(counter) = series.get(index) {
            counter.increment(1);
        }
    }

    /// How many countries and prefixes the fraud guard slows and blocks now.
    pub fn set_fraud_guard(&self, counts: crate::fraud_guard::GuardCounts) {
        if let Some(by_country) = self.shared.by_country.get() {
            for kind in 0..2 {
                by_country.guard_slowed[kind].set(counts.slowed[kind] as f64);
                by_country.guard_blocked[kind].set(counts.blocked[kind] as f64);
            }
        }
    }

    /// An SMS an SMS budget refused.
    pub fn budget_refused(
        &self,
        scope: crate::budget::BudgetScope,
        send: crate::budget::BudgetedSend,
    ) {
        self.shared.budget_refusals[scope as usize][send as usize].increment(1);
    }

    /// A start of `client` not limited per IP because its citizen address was missing.
    pub fn started_without_citizen_ip(&self, client: crate::ids::ClientId) {
        if let Some(counter) = self.shared.starts_without_citizen_ip.get(client as usize) {
            counter.increment(1);
        }
    }

    /// A long-poll of `client` answered at once: the client held its cap of long-polls.
    pub fn long_poll_refused(&self, client: crate::ids::ClientId) {
        if let Some(counter) = self.shared.long_polls_refused.get(client as usize) {
            counter.increment(1);
        }
    }

    /// A background task ended or panicked and is started again.
    pub fn task_restarted(&self, task: Task) {
        self.shared.task_restarts[task as usize].increment(1);
    }

    pub fn set_limiter_keys(&self, n_phone_keys: usize, n_ip_keys: usize) {
        self.shared.limiter_keys[0].set(n_phone_keys as f64);
        self.shared.limiter_keys[1].set(n_ip_keys as f64);
    }

    pub fn session_extended(&self, seconds: f64) {
        self.shared.session_extension.record(seconds);
    }

    pub fn set_queue_depth(&self, priority: u8, depth: usize) {
        if let Some(lane) = self.lane(priority) {
            lane.depth.set(depth as f64);
        }
    }

    pub fn set_predicted_wait(&self, priority: u8, seconds: f64) {
        if let Some(lane) = self.lane(priority) {
            lane.predicted_wait.set(seconds);
        }
    }

    /// The session policy the predicted wait is judged against.
    pub fn set_policy(&self, code_ttl: std::time::Duration, max_extension: std::time::Duration) {
        self.shared.code_ttl.set(code_ttl.as_secs_f64());
        self.shared.max_extension.set(max_extension.as_secs_f64());
    }

    pub fn queue_wait(&self, priority: u8, seconds: f64) {
        if let Some(lane) = self.lane(priority) {
            lane.wait.record(seconds);
        }
    }

    pub fn queue_dropped(&self, reason: QueueDrop) {
        self.shared.queue_dropped[reason as usize].increment(1);
    }

    pub fn queue_refused(&self, reason: QueueRefusal) {
        self.shared.queue_refused[reason as usize].increment(1);
    }

    /// A held SMS queued again because someone read its verification.
    pub fn queue_resumed(&self) {
        self.shared.queue_resumed.increment(1);
    }

    /// What the adaptive queue policy reads of the queue (`Queue::overload`).
    pub fn set_queue_overload(&self, reading: &crate::queue::OverloadReading) {
        let shared = &self.shared;
        shared
            .queue_overloaded
            .set(if reading.overloaded { 1.0 } else { 0.0 });
        shared
            .queue_oldest_wait
            .set(reading.oldest_wait.as_secs_f64());
        shared
            .queue_drain
            .set(reading.accepted_per_sec.unwrap_or(0.0));
        shared.queue_out_of_order.absolute(reading.out_of_order);
    }

    /// Handles for the carrier at `index` in the config.
    pub fn carrier(&self, index: usize) -> CarrierMetrics {
        self.shared.carriers[index].clone()
    }

    /// Handles for a carrier named by an id read from a shared store, which may come from
    /// another configuration: `None` for a carrier this one does not have.
    pub fn carrier_if_known(&self, index: usize) -> Option<CarrierMetrics> {
        self.shared.carriers.get(index).cloned()
    }

    /// Handles for the `index`th client that has a webhook, in config order.
    pub fn webhook(&self, index: usize) -> WebhookMetrics {
        self.shared.webhooks[index].clone()
    }

    pub fn set_webhook_outbox(&self, depth: usize) {
        self.shared.webhook_outbox.set(depth as f64);
    }

    /// Handles for one listener's connections.
    pub fn listener(&self, listener: Listener) -> ListenerMetrics {
        self.shared.listeners[listener as usize].clone()
    }

    fn lane(&self, priority: u8) -> Option<&Lane> {
        self.shared
            .lanes
            .iter()
            .find(|lane| lane.priority == priority)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

// === impl CarrierMetrics ===

impl CarrierMetrics {
    pub fn submitted(&self, outcome: SubmitOutcome, seconds: f64) {
        self.submits[outcome as usize].increment(1);
        self.duration.record(seconds);
    }

    pub fn segments(&self, encoding: crate::sms::Encoding, n_segments: u16) {
        let index = match encoding {
            crate::sms::Encoding::Gsm7 => 0,
            crate::sms::Encoding::Ucs2 => 1,
        };
        self.segments[index].increment(n_segments as u64);
    }

    pub fn set_in_flight(&self, n_in_flight: usize) {
        self.in_flight.set(n_in_flight as f64);
    }

    pub fn set_pace(&self, per_sec: f64) {
        self.pace.set(per_sec);
    }

    pub fn set_configured_pace(&self, per_sec: f64) {
        self.configured_pace.set(per_sec);
    }

    /// A job put back after a throttle (`throttled`) or a temporary failure.
    pub fn retried(&self, throttled: bool) {
        self.retries[usize::from(!throttled)].increment(1);
    }

    /// A job this carrier passed on to the others.
    pub fn passed_on(&self) {
        self.passed_on.increment(1);
    }

    /// An SMS this carrier sent in place of another.
    pub fn took_over(&self) {
        self.took_over.increment(1);
    }

    /// The SMPP sessions bound for submits now (ignored for other carriers).
    pub fn set_sessions_bound(&self, n_bound: usize) {
        if let Some(gauge) = &self.sessions_bound {
            gauge.set(n_bound as f64);
        }
    }

    pub fn set_circuit(&self, state: crate::breaker::State) {
        self.circuit.set(state.as_gauge());
    }

    /// A receipt matched to an SMS.
    pub fn receipt(&self, status: crate::receipt::ReceiptStatus) {
        use crate::receipt::ReceiptStatus;
        let index = match status {
            ReceiptStatus::Delivered => 0,
            ReceiptStatus::Undeliverable => 1,
            ReceiptStatus::Expired => 2,
        };
        self.receipts[index].increment(1);
    }

    pub fn receipt_unmatched(&self) {
        self.receipts_unmatched.increment(1);
    }

    pub fn delivered_after(&self, seconds: f64) {
        self.delivery.record(seconds);
    }

    pub fn first_accepted_after(&self, seconds: f64) {
        self.first_accepted.record(seconds);
    }

    /// A `delivered` receipt, `seconds` after the carrier accepted the SMS.
    pub fn delivered_in(&self, seconds: f64) {
        self.delivered_in.record(seconds);
    }

    /// An SMS's receipt did not come in time, and what became of it.
    pub fn receipt_missing(&self, reroute: crate::delivery::Reroute) {
        self.receipts_missing.increment(1);
        match crate::delivery::Reroute::SKIPPED
            .iter()
            .position(|skipped| *skipped == reroute)
        {
            Some(index) => self.reroutes_skipped[index].increment(1),
            None => self.rerouted.increment(1),
        }
    }

    /// A lagging carrier took a job as a probe.
    pub fn probed(&self) {
        self.probes.increment(1);
    }

    pub fn set_delivery_health(&self, health: crate::delivery::Health) {
        for (gauge, each) in self
            .delivery_health
            .iter()
            .zip(crate::delivery::Health::ALL)
        {
            gauge.set(if each == health { 1.0 } else { 0.0 });
        }
    }
}

impl std::fmt::Debug for CarrierMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierMetrics").finish_non_exhaustive()
    }
}

// === impl ListenerMetrics ===

impl ListenerMetrics {
    pub fn opened(&self) {
        self.open.increment(1.0);
    }

    /// A connection that was [`opened`](Self::opened) ended, whoever closed it.
    pub fn ended(&self) {
        self.open.decrement(1.0);
    }

    pub fn closed(&self, reason: ConnectionClosed) {
        self.closed[reason as usize].increment(1);
    }
}

impl std::fmt::Debug for ListenerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerMetrics").finish_non_exhaustive()
    }
}

// === impl WebhookMetrics ===

impl WebhookMetrics {
    pub fn event(&self, kind: crate::verification::EventKind) {
        self.events[kind as usize].increment(1);
    }

    pub fn outcome(&self, outcome: WebhookOutcome) {
        self.outcomes[outcome as usize].increment(1);
    }

    pub fn delivered_after(&self, elapsed: std::time::Duration) {
        self.lag.record(elapsed.as_secs_f64());
    }
}

impl std::fmt::Debug for WebhookMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookMetrics").finish_non_exhaustive()
    }
}

/// Registers series on one recorder.
struct Registrar<'a> {
    recorder: &'a PrometheusRecorder,
}

impl Registrar<'_> {
    fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_counter(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
    }

    fn describe_gauge(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_gauge(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
    }

    fn describe_histogram(&self, name: &'static str, unit: Unit, help: &'static str) {
        self.recorder.describe_histogram(
            KeyName::from_const_str(name),
            Some(unit),
            SharedString::const_str(help),
        );
    }

    fn counter(&self, name: &str, labels: Vec<Label>) -> Counter {
        let counter = self
            .recorder
            .register_counter(&Key::from_parts(name.to_owned(), labels), &metadata());
        counter.increment(0);
        counter
    }

    fn gauge(&self, name: &str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name.to_owned(), labels), &metadata())
    }

    fn histogram(&self, name: &str, labels: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name.to_owned(), labels), &metadata())
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn to_array<T, const N: usize>(items: Vec<T>) -> [T; N] {
    items
        .try_into()
        .unwrap_or_else(|items: Vec<T>| panic!("expected {N} handles, built {}", items.len()))
}

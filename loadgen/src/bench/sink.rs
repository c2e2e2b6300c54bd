//! The sink: a fast fake HTTP carrier that accepts every well-formed SMS and counts it.
//!
//! It speaks the carrier side of the HTTP wire format (docs/DESIGN.md section 5):
//! `POST <any path>` with `{"message_id","to","from","text","receipt_url"}` is answered
//! `200 {"carrier_message_id":"sink-N"}` with a fresh `N`, and a malformed body `400`.
//! `GET /stats` returns
//! `{"received","distinct_message_ids","bad_requests","throttled","mean_answer_micros"}`,
//! which the benchmarks compare with the number of verifications the gateway accepted:
//! `received` below it means lost SMS, and `distinct_message_ids` below `received` means duplicates.
//! `GET /ids` lists every SMS accepted, one `UNIX_MICROS MESSAGE_ID` line each in the order they
//! were accepted, so that a benchmark can time the sink's rate and tell which carrier took which
//! SMS.
//!
//! Knobs make it behave like a real carrier in one way each ([`SinkConfig`]): a capacity per
//! second above which it answers `429`, a latency before every answer, and a crash after so many
//! SMS. An SMS counts as accepted when its body has been read and checked, before the latency:
//! a sink that dies has accepted the SMS it was still holding, as a crashed carrier may have.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, Write as _};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::bench::server::{self, ServerArgs};

/// Flags of `loadgen sink`.
#[derive(Debug, Args)]
pub struct SinkArgs {
    #[command(flatten)]
    pub server: ServerArgs,

    /// Accept at most this many SMS in any one second and answer `429` above it, like a
    /// carrier capped at its contracted rate; without it, the sink accepts everything.
    #[arg(long, env = "LOADGEN_CAPACITY_PER_SEC")]
    pub capacity_per_sec: Option<std::num::NonZeroU32>,

    /// Answer every SMS this many milliseconds after it arrived, like a carrier that takes that
    /// long to accept; the wait is a timer, so answers in flight overlap.
    #[arg(long, env = "LOADGEN_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Exit the process at once on accepting this many SMS, like a carrier that crashes: the SMS
    /// accepted but not yet answered at that moment get no answer, and their connections close.
    /// The SMS accepted are written to --ids-file first.
    #[arg(long, env = "LOADGEN_DIE_AFTER", requires = "ids_file")]
    pub die_after: Option<NonZeroU64>,

    /// Write every SMS accepted to this file, one `UNIX_MICROS MESSAGE_ID` line each (as
    /// `GET /ids` serves them), when the sink stops on SIGINT or SIGTERM or dies on --die-after.
    #[arg(long, env = "LOADGEN_IDS_FILE")]
    pub ids_file: Option<PathBuf>,
}

/// Largest SMS request read; a carrier would refuse larger ones too.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How many malformed requests are described on stderr; the rest are only counted.
const N_BAD_REQUESTS_LOGGED: u64 = 10;

/// A cheap-clone handle on the sink's counters, shared by every connection.
#[derive(Clone, Debug)]
pub struct Sink {
    shared: Arc<Shared>,
}

/// How a sink behaves beyond accepting every well-formed SMS at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkConfig {
    /// At most this many SMS accepted in any second, and `429` above it.
    pub capacity_per_sec: Option<NonZeroU32>,
    /// How long every answer to a `POST` waits, like a carrier's processing time.
    pub latency: Duration,
    /// Exit the process on accepting this many SMS, like a carrier that crashes.
    pub die_after: Option<NonZeroU64>,
    /// Where the SMS accepted are written when the sink stops or dies.
    pub ids_file: Option<PathBuf>,
}

/// The sink's counters, as served at `GET /stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Well-formed SMS accepted, duplicates included.
    pub received: u64,
    /// Distinct `message_id`s among them.
    pub distinct_message_ids: u64,
    /// Requests answered 400 or 413 because their body was not a valid SMS.
    pub bad_requests: u64,
    /// SMS answered 429 because the sink was at its capacity.
    #[serde(default)]
    pub throttled: u64,
    /// Mean time from the arrival of a `POST` to its answer, in microseconds: the latency the
    /// sink really imposed, which the timer makes a little longer than the configured one.
    #[serde(default)]
    pub mean_answer_micros: u64,
}

#[derive(Debug)]
struct Shared {
    config: SinkConfig,
    /// Turns `Instant`s into Unix times, so that the times of two sinks can be compared and
    /// those of one sink never go backwards.
    clock: Clock,
    bad_requests: AtomicU64,
    /// Numbers the `carrier_message_id`s, which must be unique like a real carrier's.
    next_carrier_message_id: AtomicU64,
    /// Every SMS accepted. A std mutex suffices: it is held only to record one SMS or to copy
    /// the record out, and never across an await.
    accepted: Mutex<Accepted>,
    /// When the SMS of the last second were accepted, for the capacity.
    accepted_at: Mutex<VecDeque<Instant>>,
    throttled: AtomicU64,
    /// Answers to `POST`s and the sum of their times from arrival, for the mean.
    n_answers: AtomicU64,
    answer_micros_total: AtomicU64,
}

/// Every SMS accepted, in order, and the distinct `message_id`s among them.
#[derive(Debug, Default)]
struct Accepted {
    /// Every `message_id` seen, to tell retries and duplicates from distinct SMS.
    distinct: HashSet<Arc<str>>,
    /// One entry per SMS accepted, duplicates included; the ids are shared with `distinct`.
    log: Vec<Acceptance>,
}

#[derive(Debug)]
struct Acceptance {
    at_unix_micros: u64,
    message_id: Arc<str>,
}

#[derive(Debug)]
struct Clock {
    started: Instant,
    started_unix_micros: u64,
}

/// The request body of the carrier wire format; unknown fields are ignored, as a carrier would.
#[derive(Debug, Deserialize)]
struct SmsRequest {
    message_id: String,
    to: String,
    #[allow(
        dead_code,
        reason = "required by the wire format, but the sink has no use for it"
    )]
    from: String,
    #[allow(
        dead_code,
        reason = "required by the wire format, but the sink has no use for it"
    )]
    text: String,
    #[allow(
        dead_code,
        reason = "required by the wire format; the sink sends no receipts yet"
    )]
    receipt_url: String,
}

#[derive(Debug, Serialize)]
struct SmsAccepted {
    carrier_message_id: String,
}

/// Why a request was not a valid SMS.
#[derive(Debug)]
enum Rejection {
    TooLarge,
    Unreadable,
    NotJson(serde_json::Error),
    EmptyMessageId,
    InvalidMessageId,
    InvalidRecipient,
}

// === impl Sink ===

impl Sink {
    /// Creates a sink that accepts every well-formed SMS at once, with all counters at zero.
    pub fn new() -> Self {
        Self::with_config(SinkConfig::plain())
    }

    /// Creates a sink that accepts at most `capacity_per_sec` SMS in any second and answers
    /// `429` above it.
    pub fn with_capacity(capacity_per_sec: Option<NonZeroU32>) -> Self {
        Self::with_config(SinkConfig {
            capacity_per_sec,
            ..SinkConfig::plain()
        })
    }

    /// Creates a sink that behaves as `config` says.
    pub fn with_config(config: SinkConfig) -> Self {
        Sink {
            shared: Arc::new(Shared {
                config,
                clock: Clock::start(),
                bad_requests: AtomicU64::new(0),
                next_carrier_message_id: AtomicU64::new(0),
                accepted: Mutex::new(Accepted::default()),
                accepted_at: Mutex::new(VecDeque::new()),
                throttled: AtomicU64::new(0),
                n_answers: AtomicU64::new(0),
                answer_micros_total: AtomicU64::new(0),
            }),
        }
    }

    /// Reads the counters.
    pub fn stats(&self) -> Stats {
        let shared = &self.shared;
        let (received, distinct_message_ids) = {
            let accepted = shared.lock_accepted();
            (accepted.log.len(), accepted.distinct.len())
        };
        Stats {
            received: u64::try_from(received).unwrap_or(u64::MAX),
            distinct_message_ids: u64::try_from(distinct_message_ids).unwrap_or(u64::MAX),
            bad_requests: shared.bad_requests.load(Ordering::Relaxed),
            throttled: shared.throttled.load(Ordering::Relaxed),
            mean_answer_micros: shared
                .answer_micros_total
                .load(Ordering::Relaxed)
                .checked_div(shared.n_answers.load(Ordering::Relaxed))
                .unwrap_or(0),
        }
    }

    /// Every SMS accepted so far, one `UNIX_MICROS MESSAGE_ID` line each, in the order they were
    /// accepted (so the times never go down); an id accepted twice appears twice.
    pub fn ids(&self) -> String {
        self.shared.lock_accepted().to_lines()
    }

    /// Writes [`Sink::ids`] to the configured `ids_file`, if there is one.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be written.
    pub fn write_ids_file(&self) -> io::Result<()> {
        match &self.shared.config.ids_file {
            Some(path) => write_atomically(path, &self.ids()),
            None => Ok(()),
        }
    }

    /// Serves the sink on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let service = service_fn(move |request| {
            let sink = self.clone();
            async move { sink.handle(request).await }
        });
        server::serve(listener, service, shutdown).await;
    }

    /// Answers one HTTP request: `GET /stats`, `GET /ids`, or an SMS on any path.
    ///
    /// Every answer to a `POST`, whatever its status, leaves the configured latency after the
    /// request arrived, or as soon after as the timer allows (tokio's has a 1 ms resolution).
    ///
    /// # Errors
    ///
    /// Never fails; the error type is the one hyper's services need.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let response = match (request.method(), request.uri().path()) {
            (&Method::GET, "/stats") => json_response(StatusCode::OK, &self.stats()),
            (&Method::GET, "/ids") => text_response(self.ids()),
            (&Method::POST, _) => {
                let arrived = Instant::now();
                let response = self.accept_sms(request).await;
                let latency = self.shared.config.latency;
                if !latency.is_zero() {
                    tokio::time::sleep_until((arrived + latency).into()).await;
                }
                let shared = &self.shared;
                let micros = u64::try_from(arrived.elapsed().as_micros()).unwrap_or(u64::MAX);
                shared.n_answers.fetch_add(1, Ordering::Relaxed);
                shared
                    .answer_micros_total
                    .fetch_add(micros, Ordering::Relaxed);
                response
            }
            _ => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST, or GET /stats or /ids",
            ),
        };
        Ok(response)
    }

    async fn accept_sms(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.shared.has_room() {
            self.shared.throttled.fetch_add(1, Ordering::Relaxed);
            return error_response(StatusCode::TOO_MANY_REQUESTS, "over capacity");
        }
        match self.record_sms(request).await {
            Ok(carrier_message_id) => {
                json_response(StatusCode::OK, &SmsAccepted { carrier_message_id })
            }
            Err(rejection) => {
                let n_bad_requests = self.shared.bad_requests.fetch_add(1, Ordering::Relaxed) + 1;
                if n_bad_requests <= N_BAD_REQUESTS_LOGGED {
                    eprintln!("sink: bad request {n_bad_requests}: {rejection}");
                }
                error_response(rejection.status(), &rejection.to_string())
            }
        }
    }

    /// Parses and counts one SMS, returning the `carrier_message_id` to answer with.
    async fn record_sms(&self, request: Request<Incoming>) -> Result<String, Rejection> {
        let body = Limited::new(request.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    Rejection::TooLarge
                } else {
                    Rejection::Unreadable
                }
            })?
            .to_bytes();
        let sms: SmsRequest = serde_json::from_slice(&body).map_err(Rejection::NotJson)?;
        if sms.message_id.is_empty() {
            return Err(Rejection::EmptyMessageId);
        }
        // Listed one per line after a space, so it may hold neither.
        if !is_printable_token(&sms.message_id) {
            return Err(Rejection::InvalidMessageId);
        }
        if !is_e164(&sms.to) {
            return Err(Rejection::InvalidRecipient);
        }

        let shared = &self.shared;
        let mut accepted = shared.lock_accepted();
        let at_unix_micros = shared.clock.now_unix_micros();
        accepted.record(&sms.message_id, at_unix_micros);
        let n_accepted = u64::try_from(accepted.log.len()).unwrap_or(u64::MAX);
        if shared
            .config
            .die_after
            .is_some_and(|die_after| n_accepted >= die_after.get())
        {
            // The lock is held to the end, so that no other SMS counts as accepted after the
            // list is written.
            shared.die(&accepted);
        }
        drop(accepted);
        let n = shared
            .next_carrier_message_id
            .fetch_add(1, Ordering::Relaxed);
        Ok(format!("sink-{n}"))
    }
}

impl Default for Sink {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Shared ===

impl Shared {
    /// Takes a place in the last second's capacity, if there is one.
    fn has_room(&self) -> bool {
        let Some(capacity) = self.config.capacity_per_sec else {
            return true;
        };
        let now = Instant::now();
        let mut accepted_at = self
            .accepted_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while accepted_at
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
        {
            accepted_at.pop_front();
        }
        if accepted_at.len() < capacity.get() as usize {
            accepted_at.push_back(now);
            true
        } else {
            false
        }
    }

    fn lock_accepted(&self) -> MutexGuard<'_, Accepted> {
        self.accepted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the SMS accepted to the ids file and exits the process at once, like a carrier
    /// that crashes: answers not yet sent are never sent, and the kernel closes the connections.
    fn die(&self, accepted: &Accepted) -> ! {
        let n_accepted = accepted.log.len();
        let written = match &self.config.ids_file {
            Some(path) => write_atomically(path, &accepted.to_lines()),
            None => Ok(()),
        };
        match written {
            Ok(()) => {
                eprintln!("sink: dying as asked, after accepting {n_accepted} SMS");
                std::process::exit(0);
            }
            Err(error) => {
                eprintln!(
                    "sink: dying after accepting {n_accepted} SMS, but the ids file could not be written: {error}"
                );
                std::process::exit(1);
            }
        }
    }
}

// === impl SinkConfig ===

impl SinkConfig {
    /// A sink that accepts every well-formed SMS at once, never dies and writes no file.
    pub fn plain() -> Self {
        SinkConfig {
            capacity_per_sec: None,
            latency: Duration::ZERO,
            die_after: None,
            ids_file: None,
        }
    }

    /// The configuration `loadgen sink`'s flags ask for.
    pub fn from_args(args: &SinkArgs) -> Self {
        SinkConfig {
            capacity_per_sec: args.capacity_per_sec,
            latency: Duration::from_millis(args.latency_ms),
            die_after: args.die_after,
            ids_file: args.ids_file.clone(),
        }
    }
}

// === impl Accepted ===

impl Accepted {
    fn record(&mut self, message_id: &str, at_unix_micros: u64) {
        let message_id = match self.distinct.get(message_id) {
            Some(seen) => Arc::clone(seen),
            None => {
                let message_id: Arc<str> = Arc::from(message_id);
                self.distinct.insert(Arc::clone(&message_id));
                message_id
            }
        };
        self.log.push(Acceptance {
            at_unix_micros,
            message_id,
        });
    }

    fn to_lines(&self) -> String {
        let mut lines = String::with_capacity(self.log.len() * 48);
        for acceptance in &self.log {
            // Writing to a String cannot fail.
            let _ = writeln!(
                lines,
                "{} {}",
                acceptance.at_unix_micros, acceptance.message_id
            );
        }
        lines
    }
}

// === impl Clock ===

impl Clock {
    fn start() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            started: Instant::now(),
            started_unix_micros: u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// Microseconds since the Unix epoch, counted on the monotonic clock from the start.
    fn now_unix_micros(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.started_unix_micros.saturating_add(elapsed)
    }
}

// === impl Rejection ===

impl Rejection {
    fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => write!(f, "body larger than {MAX_BODY_BYTES} bytes"),
            Self::Unreadable => f.write_str("body could not be read"),
            Self::NotJson(error) => write!(f, "body is not an SMS request: {error}"),
            Self::EmptyMessageId => f.write_str("message_id is empty"),
            Self::InvalidMessageId => {
                f.write_str("message_id has whitespace or control characters")
            }
            Self::InvalidRecipient => f.write_str("to is not an E.164 phone number"),
        }
    }
}

/// Whether `phone` looks like an E.164 number: `+` and 8 to 15 digits, the first not 0.
fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && !digits.starts_with('0')
        && digits.bytes().all(|byte| byte.is_ascii_digit())
}

/// Whether `text` has no whitespace and no control characters, so that it can be listed one per
/// line after a space.
fn is_printable_token(text: &str) -> bool {
    text.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

/// Writes `contents` to a file beside `path` and renames it over `path`, so that a reader never
/// sees a partial list.
fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, path)
}

fn text_response(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    // Serializing these plain structs cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &serde_json::json!({ "error": { "message": message } }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_accepts_international_numbers_only() {
        assert!(is_e164("+393331234567"));
        assert!(is_e164("+12025550123"));
        assert!(!is_e164("393331234567"));
        assert!(!is_e164("+39 333 1234567"));
        assert!(!is_e164("+0393331234567"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
    }
}

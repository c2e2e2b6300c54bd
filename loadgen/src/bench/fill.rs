//! `loadgen fill`: start many verifications, one distinct phone number each,
//! as fast as the gateway takes them.
//!
//! Each of `concurrency` workers holds one keep-alive HTTP/1.1 connection
//! and keeps one `POST /v1/verifications` in flight on it.
//! This is a closed loop on purpose: fill exists to load the gateway with live verifications
//! (for the memory benchmark, say), not to measure latency,
//! which needs the open-loop schedule of the full load generator.
//! A request that is answered with a non-2xx status, times out, or loses its connection
//! counts as failed and is not retried, since a retried POST could start a second verification.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::uri::{Scheme, Uri};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::bench::phone;

/// Flags of `loadgen fill`.
#[derive(Debug, Args)]
pub struct FillArgs {
    /// Base URL of the gateway's API, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "LOADGEN_TARGET")]
    pub target: String,

    /// Verifications to start, one phone number each.
    #[arg(long, env = "LOADGEN_COUNT", default_value_t = 1_000_000)]
    pub count: u64,

    /// Keep-alive connections, each with one request in flight.
    #[arg(long, env = "LOADGEN_CONCURRENCY", default_value_t = NonZeroUsize::new(64).unwrap())]
    pub concurrency: NonZeroUsize,

    /// API key sent as `Authorization: Bearer <key>`; omit it for an unauthenticated gateway.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Index of the first phone number, so that several runs can use disjoint numbers.
    #[arg(long, env = "LOADGEN_PHONE_OFFSET", default_value_t = 0)]
    pub phone_offset: u64,

    /// Time allowed for one request, connecting included, before it counts as failed.
    #[arg(long, env = "LOADGEN_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// The API path verifications are started at (docs/DESIGN.md section 3), relative to the target.
const VERIFICATIONS_PATH: &str = "/v1/verifications";

/// How often progress is printed on stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// A validated `loadgen fill` configuration.
#[derive(Debug)]
pub struct FillConfig {
    target: Target,
    count: u64,
    concurrency: NonZeroUsize,
    authorization: Option<ApiKey>,
    phone_offset: u64,
    /// Bounds each request, connecting included, so that a stuck gateway cannot hang the run.
    timeout: Duration,
}

/// What a fill run did.
#[derive(Debug, Default)]
pub struct FillReport {
    /// Wall-clock time from the first request to the last answer.
    pub elapsed: Duration,
    /// Answers received, by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no answer, by cause.
    pub by_failure: BTreeMap<Failure, u64>,
}

/// Why a request got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The TCP connection or the HTTP handshake failed.
    Connect,
    /// The request did not complete within the timeout.
    Timeout,
    /// The connection failed while the request or its answer was in flight.
    Io,
}

/// Why a fill configuration was refused.
#[derive(Debug)]
pub enum FillConfigError {
    /// The target is not an absolute URL.
    InvalidTarget(http::uri::InvalidUri),
    /// The target is not `http://host[:port][/path]`.
    UnsupportedTarget(String),
    /// The phone numbers would run past the generator's range.
    TooManyPhones { phone_offset: u64, count: u64 },
    /// A zero timeout would fail every request.
    ZeroTimeout,
    /// The API key cannot be sent in a header.
    InvalidApiKey,
}

/// Why a fill run could not start.
#[derive(Debug)]
pub enum FillError {
    /// The target's host name did not resolve.
    Resolve {
        authority: String,
        source: io::Error,
    },
}

/// Where the requests go.
#[derive(Debug)]
struct Target {
    /// `host:port`, also sent as the `Host` header.
    authority: String,
    /// The target's own path joined with [`VERIFICATIONS_PATH`].
    path: String,
}

/// An API key's `Authorization` header value, kept out of `Debug` output.
struct ApiKey(HeaderValue);

/// What the workers share.
#[derive(Debug)]
struct Job {
    config: FillConfig,
    address: SocketAddr,
    host: HeaderValue,
    /// Index of the next verification to start; past `config.count` the workers stop.
    next_index: AtomicU64,
    /// Requests finished, successful or not, for the progress line.
    n_finished: AtomicU64,
}

/// One worker's counts, merged into the report at the end.
#[derive(Debug, Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    by_failure: BTreeMap<Failure, u64>,
}

// === impl FillConfig ===

impl FillConfig {
    /// Validates the command-line flags.
    ///
    /// # Errors
    ///
    /// Fails if the target is not a plain `http://` URL, the timeout is zero,
    /// the API key cannot be sent in a header,
    /// or `phone_offset + count` runs past [`phone::CAPACITY`].
    pub fn from_args(args: &FillArgs) -> Result<Self, FillConfigError> {
        let target = Target::parse(&args.target)?;
        let end = args.phone_offset.checked_add(args.count);
        if end.is_none_or(|end| end > phone::CAPACITY) {
            return Err(FillConfigError::TooManyPhones {
                phone_offset: args.phone_offset,
                count: args.count,
            });
        }
        if args.timeout_ms == 0 {
            return Err(FillConfigError::ZeroTimeout);
        }
        let authorization = match &args.api_key {
            Some(api_key) => Some(ApiKey::new(api_key).ok_or(FillConfigError::InvalidApiKey)?),
            None => None,
        };
        Ok(Self {
            target,
            count: args.count,
            concurrency: args.concurrency,
            authorization,
            phone_offset: args.phone_offset,
            timeout: Duration::from_millis(args.timeout_ms),
        })
    }
}

// === impl FillReport ===

impl FillReport {
    /// Requests answered with a 2xx status.
    pub fn n_succeeded(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(status, _)| (200..300).contains(*status))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests answered with another status, or not answered at all.
    pub fn n_failed(&self) -> u64 {
        let n_answered: u64 = self.by_status.values().sum();
        let n_unanswered: u64 = self.by_failure.values().sum();
        n_answered - self.n_succeeded() + n_unanswered
    }

    /// Requests finished per second of wall-clock time.
    pub fn requests_per_sec(&self) -> f64 {
        let n_finished = self.n_succeeded() + self.n_failed();
        n_finished as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn merge(&mut self, tally: Tally) {
        for (status, n) in tally.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        for (failure, n) in tally.by_failure {
            *self.by_failure.entry(failure).or_default() += n;
        }
    }
}

impl fmt::Display for FillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "done: {} succeeded, {} failed in {:.2} s ({:.0} requests/s)",
            self.n_succeeded(),
            self.n_failed(),
            self.elapsed.as_secs_f64(),
            self.requests_per_sec(),
        )?;
        for (status, n) in &self.by_status {
            writeln!(f, "  status {status}: {n}")?;
        }
        for (failure, n) in &self.by_failure {
            writeln!(f, "  {failure}: {n}")?;
        }
        Ok(())
    }
}

// === impl Failure ===

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect error",
            Self::Timeout => "timeout",
            Self::Io => "connection error",
        })
    }
}

// === impl FillConfigError ===

impl fmt::Display for FillConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidTarget(_) => f.write_str("target is not a valid URL"),
            Self::UnsupportedTarget(reason) => write!(f, "target not supported: {reason}"),
            Self::TooManyPhones {
                phone_offset,
                count,
            } => write!(
                f,
                "phone offset {phone_offset} plus count {count} exceeds the {} phone numbers available",
                phone::CAPACITY
            ),
            Self::ZeroTimeout => f.write_str("timeout must be at least 1 ms"),
            Self::InvalidApiKey => f.write_str("API key has characters not allowed in a header"),
        }
    }
}

impl std::error::Error for FillConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidTarget(source) => Some(source),
            _ => None,
        }
    }
}

// === impl FillError ===

impl fmt::Display for FillError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Resolve { authority, .. } => write!(f, "target {authority}: cannot resolve"),
        }
    }
}

impl std::error::Error for FillError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Resolve { source, .. } => Some(source),
        }
    }
}

// === impl Target ===

impl Target {
    fn parse(url: &str) -> Result<Self, FillConfigError> {
        let uri: Uri = url.parse().map_err(FillConfigError::InvalidTarget)?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(FillConfigError::UnsupportedTarget(
                "only http:// is supported".into(),
            ));
        }
        let Some(authority) = uri.authority() else {
            return Err(FillConfigError::UnsupportedTarget("no host".into()));
        };
        if uri.query().is_some() {
            return Err(FillConfigError::UnsupportedTarget(
                "a query string is not supported".into(),
            ));
        }
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let base_path = uri.path().trim_end_matches('/');
        Ok(Self {
            authority: format!("{host}:{port}"),
            path: format!("{base_path}{VERIFICATIONS_PATH}"),
        })
    }
}

// === impl ApiKey ===

impl ApiKey {
    fn new(api_key: &str) -> Option<Self> {
        let mut value = HeaderValue::try_from(format!("Bearer {api_key}")).ok()?;
        value.set_sensitive(true);
        Some(Self(value))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

// === impl Job ===

impl Job {
    /// Takes the next verification to start, or `None` once all have been taken.
    fn take_index(&self) -> Option<u64> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        (index < self.config.count).then_some(index)
    }

    async fn run_worker(&self) -> Tally {
        let mut tally = Tally::default();
        let mut connection = None;
        while let Some(index) = self.take_index() {
            let outcome = tokio::time::timeout(
                self.config.timeout,
                self.start_verification(&mut connection, index),
            )
            .await
            .unwrap_or(Err(Failure::Timeout));
            match outcome {
                Ok(status) => *tally.by_status.entry(status.as_u16()).or_default() += 1,
                Err(failure) => {
                    // The connection's state is unknown after a failure, so start afresh.
                    connection = None;
                    *tally.by_failure.entry(failure).or_default() += 1;
                }
            }
            self.n_finished.fetch_add(1, Ordering::Relaxed);
        }
        tally
    }

    /// Sends one `POST /v1/verifications`, reusing `connection` while the server keeps it open.
    async fn start_verification(
        &self,
        connection: &mut Option<SendRequest<Full<Bytes>>>,
        index: u64,
    ) -> Result<StatusCode, Failure> {
        // A connection the server has closed in between is replaced: nothing was sent on it yet.
        if let Some(sender) = connection.as_mut() {
            if sender.ready().await.is_err() {
                *connection = None;
            }
        }
        let sender = match connection {
            Some(sender) => sender,
            None => connection.insert(self.connect().await?),
        };
        let response = sender
            .send_request(self.request(index))
            .await
            .map_err(|_| Failure::Io)?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|_| Failure::Io)?;
        Ok(status)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = TcpStream::connect(self.address)
            .await
            .map_err(|_| Failure::Connect)?;
        // A failure here only costs latency.
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            // Its errors reach the sender as failed requests.
            let _ = connection.await;
        });
        sender.ready().await.map_err(|_| Failure::Connect)?;
        Ok(sender)
    }

    fn request(&self, index: u64) -> Request<Full<Bytes>> {
        // The range was checked against phone::CAPACITY when the configuration was built.
        let phone = phone::italian_mobile(self.config.phone_offset + index).unwrap_or_default();
        let body = format!(r#"{{"phone":"{phone}"}}"#);
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        // The path was built from a valid URI, so it parses again.
        *request.uri_mut() = Uri::try_from(self.config.target.path.as_str()).unwrap_or_default();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(ApiKey(authorization)) = &self.config.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        request
    }
}

/// Runs a fill to completion and reports what happened; progress goes to stderr.
///
/// # Errors
///
/// Fails only if the target cannot be resolved; failed requests are counted in the report.
pub async fn run(config: FillConfig) -> Result<FillReport, FillError> {
    let authority = config.target.authority.clone();
    let address = tokio::net::lookup_host(&authority)
        .await
        .and_then(|mut addresses| {
            addresses
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
        })
        .map_err(|source| FillError::Resolve {
            authority: authority.clone(),
            source,
        })?;
    // The authority was parsed from a valid URI, so it is a valid header value.
    let host = HeaderValue::try_from(authority.as_str())
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
    let n_workers = config.concurrency.get();
    let count = config.count;
    let job = Arc::new(Job {
        config,
        address,
        host,
        next_index: AtomicU64::new(0),
        n_finished: AtomicU64::new(0),
    });

    let started = Instant::now();
    let progress = tokio::spawn(print_progress(Arc::clone(&job), started, count));
    let workers: Vec<_> = (0..n_workers)
        .map(|_| {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.run_worker().await })
        })
        .collect();
    let mut report = FillReport::default();
    for worker in workers {
        match worker.await {
            Ok(tally) => report.merge(tally),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    report.elapsed = started.elapsed();
    progress.abort();
    Ok(report)
}

async fn print_progress(job: Arc<Job>, started: Instant, count: u64) {
    let mut interval = tokio::time::interval(PROGRESS_INTERVAL);
    // The first tick is immediate, with nothing to say yet.
    interval.tick().await;
    loop {
        interval.tick().await;
        let n_finished = job.n_finished.load(Ordering::Relaxed);
        let rate = n_finished as f64 / started.elapsed().as_secs_f64();
        eprintln!("fill: {n_finished} of {count} finished ({rate:.0} requests/s)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_joins_its_path() {
        let target = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(target.authority, "127.0.0.1:8080");
        assert_eq!(target.path, "/v1/verifications");
        let target = Target::parse("http://localhost/api/").unwrap();
        assert_eq!(target.authority, "localhost:80");
        assert_eq!(target.path, "/api/v1/verifications");
    }

    #[test]
    fn target_must_be_plain_http() {
        assert!(Target::parse("https://127.0.0.1:8443").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
        assert!(Target::parse("http://127.0.0.1:8080/?x=1").is_err());
    }

    #[test]
    fn report_counts_non_2xx_and_unanswered_as_failed() {
        let report = FillReport {
            elapsed: Duration::from_secs(2),
            by_status: BTreeMap::from([(200, 1), (202, 5), (429, 2), (503, 1)]),
            by_failure: BTreeMap::from([(Failure::Timeout, 1)]),
        };
        assert_eq!(report.n_succeeded(), 6);
        assert_eq!(report.n_failed(), 4);
        assert_eq!(report.requests_per_sec(), 5.0);
    }
}

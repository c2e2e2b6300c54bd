//! The sink: a fast fake HTTP carrier that accepts every well-formed SMS and counts it.
//!
//! It speaks the carrier side of the HTTP wire format (DESIGN.md section 5):
//! `POST <any path>` with `{"message_id","to","from","text","receipt_url"}` is answered
//! `200 {"carrier_message_id":"sink-N"}` with a fresh `N`, and a malformed body `400`.
//! `GET /stats` returns `{"received","distinct_message_ids","bad_requests"}`,
//! which the benchmarks compare with the number of verifications the gateway accepted:
//! `received` below it means lost SMS, and `distinct_message_ids` below `received` means duplicates.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::server;

/// Largest SMS request read; a carrier would refuse larger ones too.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How many malformed requests are described on stderr; the rest are only counted.
const N_BAD_REQUESTS_LOGGED: u64 = 10;

/// A cheap-clone handle on the sink's counters, shared by every connection.
#[derive(Clone, Debug, Default)]
pub struct Sink {
    shared: Arc<Shared>,
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
}

#[derive(Debug, Default)]
struct Shared {
    received: AtomicU64,
    bad_requests: AtomicU64,
    /// Numbers the `carrier_message_id`s, which must be unique like a real carrier's.
    next_carrier_message_id: AtomicU64,
    /// Every `message_id` seen, to tell retries and duplicates from distinct SMS.
    /// A std mutex suffices: it is held only for one insert and never across an await.
    message_ids: Mutex<HashSet<Box<str>>>,
    /// At most this many SMS accepted in any second, when set.
    capacity_per_sec: Option<std::num::NonZeroU32>,
    /// When the SMS of the last second were accepted, for the capacity.
    accepted_at: Mutex<std::collections::VecDeque<std::time::Instant>>,
    throttled: AtomicU64,
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
    InvalidRecipient,
}

// === impl Sink ===

impl Sink {
    /// Creates a sink with all counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a sink that accepts at most `capacity_per_sec` SMS in any second and answers
    /// `429` above it.
    pub fn with_capacity(capacity_per_sec: Option<std::num::NonZeroU32>) -> Self {
        Sink {
            shared: Arc::new(Shared {
                capacity_per_sec,
                ..Shared::default()
            }),
        }
    }

    /// Reads the counters.
    pub fn stats(&self) -> Stats {
        let shared = &self.shared;
        Stats {
            received: shared.received.load(Ordering::Relaxed),
            distinct_message_ids: shared.distinct_message_ids(),
            bad_requests: shared.bad_requests.load(Ordering::Relaxed),
            throttled: shared.throttled.load(Ordering::Relaxed),
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

    /// Answers one HTTP request: `GET /stats`, or an SMS on any path.
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
            (&Method::POST, _) => self.accept_sms(request).await,
            _ => error_response(StatusCode::METHOD_NOT_ALLOWED, "use POST, or GET /stats"),
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
        if !is_e164(&sms.to) {
            return Err(Rejection::InvalidRecipient);
        }

        let shared = &self.shared;
        shared.received.fetch_add(1, Ordering::Relaxed);
        shared
            .message_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(sms.message_id.into_boxed_str());
        let n = shared
            .next_carrier_message_id
            .fetch_add(1, Ordering::Relaxed);
        Ok(format!("sink-{n}"))
    }
}

// === impl Shared ===

impl Shared {
    /// Takes a place in the last second's capacity, if there is one.
    fn has_room(&self) -> bool {
        let Some(capacity) = self.capacity_per_sec else {
            return true;
        };
        let now = std::time::Instant::now();
        let mut accepted_at = self
            .accepted_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while accepted_at
            .front()
            .is_some_and(|at| now.duration_since(*at) >= std::time::Duration::from_secs(1))
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

    fn distinct_message_ids(&self) -> u64 {
        let message_ids = self
            .message_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        u64::try_from(message_ids.len()).unwrap_or(u64::MAX)
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

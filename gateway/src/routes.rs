//! The frontend API v1 (docs/DESIGN.md section 3): routes, request parsing, and responses.
//!
//! Handlers parse and validate input into the engine's types, call the [`Verifier`], and turn
//! its answers into JSON. Bodies are read with a hard cap and parsed here (not by an extractor),
//! so every bad input gets the API's own error shape: a code and a message naming the field.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::citizen_ip::{self, CitizenIp};
use crate::error::ApiError;
use crate::ids::VerificationId;
use crate::metrics::{Route, Started};
use crate::phone::{Phone, PhoneError};
use crate::receipt::ReceiptStatus;
use crate::verifier::{NewVerification, ReceiptMatch, Verifier};

/// Every API route, as `(method, path template)`: the OpenAPI document must list exactly these.
pub const API_ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/verifications"),
    ("GET", "/v1/verifications/{id}"),
    ("DELETE", "/v1/verifications/{id}"),
    ("POST", "/v1/verifications/{id}/check"),
    ("POST", "/v1/verifications/{id}/resend"),
    ("POST", "/v1/carriers/{name}/receipts"),
    ("GET", "/v1/openapi.json"),
];

/// The OpenAPI 3 description of this API.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The longest `?wait=` a long-poll may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// What every handler needs.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    /// Fires when shutdown begins, ending long-polls early.
    pub shutdown: CancellationToken,
}

/// The peer's address, put on each request by the server.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    phone: String,
    client_ip: Option<String>,
    locale: Option<String>,
    web_origin: Option<String>,
    app_hash: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    code: String,
    /// The citizen's address, for the cap on wrong codes per address.
    client_ip: Option<String>,
}

/// A delivery receipt (docs/DESIGN.md section 5). Unknown fields are allowed: carriers add their own.
#[derive(Deserialize)]
struct ReceiptBody {
    carrier_message_id: serde_json::Value,
    status: ReceiptStatus,
    #[allow(dead_code, reason = "accepted for the record; nothing acts on it yet")]
    error_code: Option<serde_json::Value>,
}

/// Builds the API router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/verifications", post(start))
        .route("/v1/verifications/{id}", get(read).delete(cancel))
        .route("/v1/verifications/{id}/check", post(check))
        .route("/v1/verifications/{id}/resend", post(resend))
        .route("/v1/carriers/{name}/receipts", post(receipt))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Records each request's route, status and duration.
async fn observe(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = Route::from_template(
        request.method(),
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    state
        .verifier
        .metrics()
        .http_request(route, status, seconds);
    // The route template, never the path: paths carry verification ids.
    tracing::debug!(
        route = route.template(),
        status,
        ms = seconds * 1000.0,
        "request"
    );
    response
}

async fn start(State(state): State<ApiState>, request: Request) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<PeerAddr>()
        .map(|peer| peer.0.ip());
    let (parts, body) = request.into_parts();
    let client = state.verifier.authenticate(bearer(&parts.headers))?;
    let bytes = read_body(&parts.headers, body, state.max_body_bytes).await?;
    let body: StartBody = parse_json(&bytes)?;

    let (phone, region, number_type) = Phone::parse_typed(&body.phone).map_err(|error| {
        let message = match error {
            PhoneError::NotE164 => "phone: expected an E.164 number such as +393331234567",
            PhoneError::Invalid => "phone: not a valid number for its country",
            PhoneError::NotMobile => "phone: not a number that can receive SMS",
        };
        ApiError::bad_request("invalid_phone", message)
    })?;
    // The client's own source of citizen addresses; only the anonymous client of local
    // development falls back to the peer address (`citizen_ip.rs` says why).
    let citizen_ip = match state.verifier.citizen_ip_source(client) {
        Some(source) => source.resolve(body.client_ip.as_deref(), &parts.headers)?,
        None => citizen_ip::anonymous(body.client_ip.as_deref(), peer)?,
    };
    let ip = match citizen_ip {
        CitizenIp::Address(ip) => Some(ip),
        CitizenIp::Missing => {
            state.verifier.started_without_citizen_ip(client);
            None
        }
        CitizenIp::Unlimited => None,
    };
    let locale = match body.locale {
        Some(locale)
            if locale.len() > 35
                || !locale
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            return Err(ApiError::bad_request(
                "invalid_locale",
                "locale: expected a language tag such as \"it\" or \"en-GB\"",
            ));
        }
        other => other,
    };
    let web_origin_host = body
        .web_origin
        .as_deref()
        .map(crate::sms::web_otp_host)
        .transpose()
        .map_err(|error| {
            ApiError::bad_request("invalid_web_origin", format!("web_origin: {error}"))
        })?;
    if let Some(hash) = &body.app_hash {
        if !crate::sms::is_valid_app_hash(hash) {
            return Err(ApiError::bad_request(
                "invalid_app_hash",
                "app_hash: expected the 11-character Android SMS Retriever hash",
            ));
        }
    }
    // A configured client's SMS bind codes only to its own origins and apps.
    let (web_origin_host, app_hash) = match state.verifier.autofill_of(client) {
        Some(allowed) => allowed
            .choose(web_origin_host, body.app_hash)
            .map_err(|refusal| match refusal {
                crate::sms::NotAllowed::WebOrigin => ApiError::bad_request(
                    "web_origin_not_allowed",
                    "web_origin: not one of this client's web_origins",
                ),
                crate::sms::NotAllowed::AppHash => ApiError::bad_request(
                    "app_hash_not_allowed",
                    "app_hash: not one of this client's app_hashes",
                ),
            })?,
        None => (web_origin_host, body.app_hash),
    };
    let idempotency = idempotency_key(&parts.headers)?.map(|key| {
        let mut hasher = std::hash::DefaultHasher::new();
        bytes.hash(&mut hasher);
        (key, hasher.finish())
    });

    let (started, view) = state
        .verifier
        .start(
            client,
            NewVerification {
                phone,
                region,
                number_type,
                ip,
                locale,
                web_origin_host,
                app_hash,
                idempotency,
            },
        )
        .await?;
    let location = format!("/v1/verifications/{}", view.id);
    let mut response = (StatusCode::ACCEPTED, axum::Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if started == Started::Replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Reads a verification. Every answer carries an `ETag` naming its version; `?wait=N` waits up
/// to N seconds for a version other than the one in `If-None-Match` (or, without it, other than
/// the current one), so a frontend that polls with the ETag it last saw never misses a change
/// made between two polls.
async fn read(
    State(state): State<ApiState>,
    Segment(id): Segment,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let client = state.verifier.authenticate(bearer(&headers))?;
    let id = parse_id(&id)?;
    let wait = wait_secs(request.uri().query())?;
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_etag);
    let (view, version) = state.verifier.get(client, &id).await?;
    if wait.is_zero() || known.is_some_and(|known| known != version) {
        return Ok(with_etag(view, version));
    }
    let (view, version) = state
        .verifier
        .wait_for_change(client, &id, known.unwrap_or(version), wait, &state.shutdown)
        .await?;
    Ok(with_etag(view, version))
}

fn with_etag(view: crate::verification::View, version: u32) -> Response {
    let mut response = axum::Json(view).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"v{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// A path segment (`{id}`, `{name}`) as text. One that does not decode (percent-encoded bytes
/// that are not UTF-8) names no verification and no carrier: it reads as empty, which the
/// handlers answer as an unknown id (`404`) or carrier (`401`) in the API's JSON shape, where
/// axum's own `Path` would answer a plain-text `400`.
struct Segment(String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Segment, Self::Rejection> {
        let text = Path::<String>::from_request_parts(parts, state).await;
        Ok(Segment(text.map(|Path(text)| text).unwrap_or_default()))
    }
}

/// The version in an ETag this gateway gave (`"v12"`, possibly weak).
fn parse_etag(value: &str) -> Option<u32> {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    value.strip_prefix("\"v")?.strip_suffix('"')?.parse().ok()
}

async fn check(
    State(state): State<ApiState>,
    Segment(id): Segment,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let client = state.verifier.authenticate(bearer(&parts.headers))?;
    let id = parse_id(&id)?;
    let bytes = read_body(&parts.headers, body, state.max_body_bytes).await?;
    let body: CheckBody = parse_json(&bytes)?;
    let ip = citizen_ip::of_check(
        state.verifier.citizen_ip_source(client),
        body.client_ip.as_deref(),
        &parts.headers,
    )?;
    let answer = state
        .verifier
        .check(client, &id, body.code.trim(), ip)
        .await?;
    Ok(axum::Json(answer).into_response())
}

async fn resend(
    State(state): State<ApiState>,
    Segment(id): Segment,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let client = state.verifier.authenticate(bearer(&headers))?;
    let id = parse_id(&id)?;
    let view = state.verifier.resend(client, &id).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
}

async fn cancel(
    State(state): State<ApiState>,
    Segment(id): Segment,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let client = state.verifier.authenticate(bearer(&headers))?;
    let id = parse_id(&id)?;
    let view = state.verifier.cancel(client, &id).await?;
    Ok(axum::Json(view).into_response())
}

/// A carrier's delivery receipt, authenticated with the carrier's own token (an unknown carrier
/// name is answered like a wrong token, so names cannot be probed). A receipt that
/// matches no SMS yet is held for a while (its submit answer may still be on the way) and
/// answered `200 {"matched": false, "held": true}`; one that never matches is counted. Either
/// way the answer is `200`, so carriers do not retry it.
async fn receipt(
    State(state): State<ApiState>,
    Segment(name): Segment,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let carrier = state
        .verifier
        .authenticate_carrier(&name, bearer(&parts.headers))?;
    let bytes = read_body(&parts.headers, body, state.max_body_bytes).await?;
    let body: ReceiptBody = parse_json(&bytes)?;
    // Carriers send ids as strings or numbers.
    let carrier_message_id = match &body.carrier_message_id {
        serde_json::Value::String(id) => id.clone(),
        serde_json::Value::Number(id) => id.to_string(),
        _ => String::new(),
    };
    if crate::receipt::readings(&carrier_message_id).is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "carrier_message_id: expected a string or number of 1 to {} characters",
                crate::receipt::MAX_ID_LEN
            ),
        ));
    }
    let outcome = state
        .verifier
        .receipt(carrier, &carrier_message_id, body.status)
        .await?;
    let answer = match outcome {
        ReceiptMatch::Matched => serde_json::json!({ "matched": true }),
        ReceiptMatch::Held => serde_json::json!({ "matched": false, "held": true }),
        ReceiptMatch::Unmatched => serde_json::json!({ "matched": false }),
    };
    Ok(axum::Json(answer).into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

// --- parsing helpers ---

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn parse_id(text: &str) -> Result<VerificationId, ApiError> {
    // A malformed id is as unknown as a well-formed one that does not exist.
    VerificationId::parse(text).ok_or(ApiError::NotFound)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(|key| key.trim().trim_matches('"'))
        .filter(|key| !key.is_empty() && key.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key: expected 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

fn wait_secs(query: Option<&str>) -> Result<Duration, ApiError> {
    let mut wait = Duration::ZERO;
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "wait" {
            let secs: u64 = value
                .parse()
                .ok()
                .filter(|secs| *secs <= MAX_WAIT_SECS)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_wait",
                        format!("wait: expected whole seconds from 0 to {MAX_WAIT_SECS}"),
                    )
                })?;
            wait = Duration::from_secs(secs);
        }
    }
    Ok(wait)
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        let mut causes = std::iter::successors(
            Some(&error as &(dyn std::error::Error + 'static)),
            |cause| cause.source(),
        );
        if too_large {
            ApiError::PayloadTooLarge { limit }
        } else if causes.any(|cause| cause.is::<crate::server::BodyTimedOut>()) {
            ApiError::BodyTimeout
        } else {
            ApiError::bad_request("unreadable_body", "request body could not be read")
        }
    })
}

/// Parses a JSON object body into `T`. Errors name the field at fault and never echo what was
/// sent: a value might be a phone number, and serde's own messages name Rust types.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed = || ApiError::bad_request("malformed_json", "request body is not valid JSON");
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Valid JSON that is not an object (serde would read an array as a struct, by position).
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(ApiError::bad_request(
                "invalid_field",
                "request body: expected a JSON object",
            )),
            Err(_) => Err(malformed()),
        };
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                ApiError::bad_request("invalid_field", field_message(&path, &inner.to_string()))
            }
            _ => malformed(),
        }
    })?;
    deserializer.end().map_err(|_| malformed())?;
    Ok(value)
}

/// A message for a body that is a JSON object but not the request: which field, and what kind
/// of problem, in words of our own.
fn field_message(path: &str, serde_message: &str) -> String {
    let quoted = |message: &str| -> Option<String> {
        let start = message.find('`')? + 1;
        let end = start + message[start..].find('`')?;
        Some(message[start..end].to_owned())
    };
    // Only names that look like field names are repeated back; anything else might be data.
    let safe_name = |name: String| {
        let looks_like_a_field = !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if looks_like_a_field {
            name
        } else {
            "(not shown)".to_owned()
        }
    };
    if serde_message.starts_with("missing field") {
        let name = quoted(serde_message).map_or_else(|| "(unknown)".to_owned(), safe_name);
        return format!("missing field `{name}`");
    }
    if serde_message.starts_with("unknown field") {
        let name = quoted(serde_message).map_or_else(|| "(unknown)".to_owned(), safe_name);
        return format!("unknown field `{name}`");
    }
    let field = if path.is_empty() || path == "." {
        "request body".to_owned()
    } else {
        path.to_owned()
    };
    if serde_message.starts_with("invalid type") {
        let expected = serde_message
            .split_once("expected ")
            .map(|(_, expected)| expected.split(" at line ").next().unwrap_or(expected))
            .filter(|expected| !expected.contains("struct"))
            .unwrap_or("another type");
        return format!("{field}: invalid type, expected {expected}");
    }
    format!("{field}: invalid value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(bearer(&headers), Some("k1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn etags_round_trip() {
        assert_eq!(parse_etag("\"v12\""), Some(12));
        assert_eq!(parse_etag("W/\"v0\""), Some(0));
        assert_eq!(parse_etag("\"12\""), None);
        assert_eq!(parse_etag("*"), None);
    }

    #[test]
    fn wait_is_bounded() {
        assert_eq!(wait_secs(None).unwrap(), Duration::ZERO);
        assert_eq!(wait_secs(Some("wait=5")).unwrap(), Duration::from_secs(5));
        assert!(wait_secs(Some("wait=61")).is_err());
        assert!(wait_secs(Some("wait=-1")).is_err());
        assert!(wait_secs(Some("wait=x")).is_err());
    }

    proptest::proptest! {
        /// Whatever bytes arrive, parsing answers with a value or an API error, never a panic.
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_json::<StartBody>(&bytes).map(|body| Phone::parse(&body.phone).is_ok());
            let _ = parse_json::<CheckBody>(&bytes);
            let text = String::from_utf8_lossy(&bytes);
            let _ = Phone::parse(&text);
            let _ = VerificationId::parse(&text);
            let _ = wait_secs(Some(&text));
        }

        /// Phone-like strings of any shape parse or fail cleanly.
        #[test]
        fn phone_like_input_never_panics(text in "[+]?[0-9 ()./-]{0,40}") {
            if let Ok((phone, _)) = Phone::parse(&text) {
                proptest::prop_assert!(phone.e164().starts_with('+'));
                proptest::prop_assert!(phone.masked().contains('*'));
            }
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let error = parse_json::<StartBody>(b"{}").err().unwrap();
        assert_eq!(error.code(), "invalid_field");
        assert_eq!(error.to_string(), "missing field `phone`");
        let error = parse_json::<StartBody>(br#"{"phone":"+39","phon":1}"#)
            .err()
            .unwrap();
        assert!(
            error.to_string().starts_with("unknown field `phon`"),
            "{error}"
        );
        let error = parse_json::<StartBody>(br#"{"phone": 393331234567}"#)
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "phone: invalid type, expected a string");
        let error = parse_json::<StartBody>(br#"{"+393331234567": 1}"#)
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "unknown field `(not shown)`");
        let error = parse_json::<StartBody>(br#"["+393331234567"]"#)
            .err()
            .unwrap();
        assert_eq!(error.to_string(), "request body: expected a JSON object");
        assert_eq!(error.code(), "invalid_field");
        assert_eq!(
            parse_json::<StartBody>(b"{").err().unwrap().code(),
            "malformed_json"
        );
    }
}

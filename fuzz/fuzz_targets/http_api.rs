//! The HTTP API as a frontend or a carrier calls it: arbitrary bodies, paths, queries and
//! headers (API key, receipt token, `Content-Length`, `Idempotency-Key`, `If-None-Match`) go
//! through the gateway's real router (`gateway::routes::router`, over an embedded store, with
//! no network: each request is one `oneshot` call). Every answer is a success or an error in the
//! API's own shape (`{"error": {"code", "message"}}`), and every error is a 4xx but for the
//! queue's `overloaded`/`come_back_later` 503 (nothing takes SMS off the queue here): never a
//! panic, a 500, or a body that is not JSON.
#![no_main]

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use gateway::clock::Clock;
use gateway::config::{CarrierKind, Config};
use gateway::metrics::Metrics;
use gateway::queue::Queue;
use gateway::verifier::Verifier;
use http::{Method, Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const API_KEY: &str = "fuzz-api-key";
const RECEIPT_TOKEN: &str = "fuzz-receipt-token";
const CONFIG: &str = r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 8192

[[carriers]]
name = "alpha"
kind = "http"
url = "http://127.0.0.1:9/sms"
pace_per_sec = 100
window = 10
from = "otpgate"
receipt_token = "fuzz-receipt-token"

[[clients]]
name = "portal"
# printf '%s' fuzz-api-key | sha256sum
api_key_sha256 = "aed2430447c9832d79beb4115b2b797d98cb57c5f8661f18f81b1c564355d07f"
"#;

struct Api {
    runtime: tokio::runtime::Runtime,
    router: Router,
    /// A verification started at set-up, so that paths can name one that exists.
    existing_id: String,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        // Time stands still but for timers, which fire at once: a long-poll (`?wait=60`) on the
        // verification that exists returns without waiting.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let router = runtime.block_on(async { router(Config::from_toml(CONFIG).expect("CONFIG")) });
        let mut api = Api {
            runtime,
            router,
            existing_id: String::new(),
        };
        let request = Request::post("/v1/verifications")
            .header(header::AUTHORIZATION, format!("Bearer {API_KEY}"))
            .body(Body::from(r#"{"phone": "+393331234567"}"#))
            .expect("a request");
        let (status, body) = api.call(request);
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        api.existing_id = body["id"].as_str().expect("an id").to_owned();
        api
    })
}

/// The API router as `gateway::run` builds it (gateway/src/lib.rs), without its listeners.
fn router(config: Config) -> Router {
    let clock = Clock::system();
    let carriers: Vec<(String, bool)> = config
        .carriers
        .iter()
        .map(|c| (c.name.clone(), matches!(c.kind, CarrierKind::Smpp(_))))
        .collect();
    let webhook_clients: Vec<String> = Vec::new();
    let client_names: Vec<String> = config.clients.iter().map(|c| c.name.clone()).collect();
    let metrics = Metrics::new(
        &Verifier::lanes(&config),
        &carriers,
        &client_names,
        &webhook_clients,
    );
    let weights: Vec<_> = config.carriers.iter().map(|c| c.weight).collect();
    let queue = Queue::with_policy(
        config.queue_capacity,
        &weights,
        config.overload.map(|policy| (policy, clock.clone())),
    );
    let webhooks = gateway::webhook::Webhooks::new(
        &config.clients,
        config.webhooks.clone(),
        clock.clone(),
        metrics.clone(),
    )
    .expect("webhooks");
    let verifier = Verifier::new(&config, clock, metrics, queue, webhooks, None);
    gateway::routes::router(gateway::routes::ApiState {
        verifier,
        max_body_bytes: config.max_body_bytes,
        shutdown: tokio_util::sync::CancellationToken::new(),
    })
}

impl Api {
    /// Sends one request; checks the answer and returns its status and JSON body.
    fn call(&self, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let head = request.method() == Method::HEAD;
        let description = format!("{} {}", request.method(), request.uri());
        let router = self.router.clone();
        let (status, bytes) = self.runtime.block_on(async move {
            let response = router.oneshot(request).await.expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("a body");
            (status, bytes)
        });
        if head && bytes.is_empty() {
            return (status, serde_json::Value::Null);
        }
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            panic!("{description}: {status}: the body is not JSON ({error}): {bytes:?}")
        });
        if status.is_client_error() || status.is_server_error() {
            let code = body["error"]["code"].as_str().unwrap_or_default();
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                !code.is_empty() && !message.is_empty(),
                "{description}: {status}: not the API's error shape: {body}"
            );
            if status.is_server_error() {
                assert!(
                    status == StatusCode::SERVICE_UNAVAILABLE
                        && matches!(code, "overloaded" | "come_back_later"),
                    "{description}: {status}: {body}"
                );
            }
        } else {
            assert!(
                status.is_success() || status == StatusCode::NOT_MODIFIED,
                "{description}: {status}: {body}"
            );
        }
        (status, body)
    }
}

// The input: a byte choosing the route, one the `Authorization` header, one the other headers,
// then the path's text, a newline, the text of the other headers and the query, a newline, and
// the body (corpus/http_api holds examples).
fuzz_target!(|data: &[u8]| {
    let [route, auth, flags, rest @ ..] = data else {
        return;
    };
    let (route, auth, flags) = (*route, *auth, *flags);
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let header_text = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    let (text, header_text) = (text.as_ref(), header_text.as_ref());
    let api = api();
    let id = if flags & 0x20 != 0 {
        api.existing_id.as_str()
    } else {
        text
    };
    let (method, mut path) = match route % 9 {
        0 => (Method::POST, "/v1/verifications".to_owned()),
        1 => (Method::GET, format!("/v1/verifications/{id}")),
        2 => (Method::DELETE, format!("/v1/verifications/{id}")),
        3 => (Method::POST, format!("/v1/verifications/{id}/check")),
        4 => (Method::POST, format!("/v1/verifications/{id}/resend")),
        5 => (Method::POST, "/v1/carriers/alpha/receipts".to_owned()),
        6 => (Method::POST, format!("/v1/carriers/{text}/receipts")),
        7 => (Method::GET, "/v1/openapi.json".to_owned()),
        _ => {
            let methods = [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
                Method::HEAD,
                Method::OPTIONS,
            ];
            (
                methods[usize::from(route / 9) % methods.len()].clone(),
                format!("/{text}"),
            )
        }
    };
    if flags & 0x10 != 0 {
        path = format!("{path}?{header_text}");
    }
    let mut request = Request::builder().method(method).uri(path);
    let authorization = match auth % 5 {
        0 => None,
        1 => Some(format!("Bearer {API_KEY}")),
        2 => Some(format!("Bearer {RECEIPT_TOKEN}")),
        3 => Some(format!("Bearer {header_text}")),
        _ => Some(header_text.to_owned()),
    };
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    if flags & 0x01 != 0 {
        request = request.header(header::CONTENT_LENGTH, body.len());
    }
    if flags & 0x02 != 0 {
        request = request.header(header::CONTENT_LENGTH, header_text);
    }
    if flags & 0x04 != 0 {
        request = request.header("idempotency-key", header_text);
    }
    if flags & 0x08 != 0 {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if flags & 0x40 != 0 {
        request = request.header(header::IF_NONE_MATCH, header_text);
    }
    // What no HTTP parser would let through (a bad path or header value) never reaches the router.
    let Ok(request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    api.call(request);
});

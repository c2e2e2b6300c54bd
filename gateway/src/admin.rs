//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.
//!
//! It runs on its own port so that the API's limits and auth never stand between Prometheus and
//! the numbers, and it keeps serving while the API drains on shutdown.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use serde_json::json;

use crate::verifier::Verifier;

#[derive(Clone, Debug)]
pub struct AdminState {
    pub verifier: Verifier,
    pub carriers: Vec<String>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.verifier.metrics().render(),
    )
        .into_response()
}

/// Alive: the process answers.
async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

/// Ready: accepting new verifications and with room in the queue.
async fn readyz(State(state): State<AdminState>) -> Response {
    let queue = state.verifier.queue();
    let accepting = state.verifier.is_accepting();
    let depth = queue.len();
    let capacity = queue.capacity();
    let queue_ok = depth < capacity;
    let ready = accepting && queue_ok;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "accepting": accepting,
            "queue": {"ok": queue_ok, "depth": depth, "capacity": capacity},
            "carriers": state.carriers,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

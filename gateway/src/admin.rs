//! The admin listener: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.
//!
//! It runs on its own port so that the API's limits and auth never stand between Prometheus and
//! the numbers, and it keeps serving while the API drains on shutdown.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use serde_json::json;

use crate::breaker::{Breaker, State as BreakerState};
use crate::verifier::Verifier;

#[derive(Clone, Debug)]
pub struct AdminState {
    pub verifier: Verifier,
    /// Each carrier's name and circuit breaker, for `/readyz`.
    pub carriers: Vec<(String, Arc<Breaker>)>,
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

/// Ready: accepting new verifications, with room in the queue, and with at least one carrier
/// whose circuit is not open. Each carrier's delivery state is in the detail, and so is an
/// empty country allow-list, which is a risk to point out but no reason to stop serving.
async fn readyz(State(state): State<AdminState>) -> Response {
    let queue = state.verifier.queue();
    let accepting = state.verifier.is_accepting();
    let depth = queue.len();
    let capacity = queue.capacity();
    let queue_ok = depth < capacity;
    let now = Instant::now();
    // Delivery is shown, not judged: a lagging carrier is routed around, and restarting the
    // gateway would not make it deliver sooner.
    let deliveries = state.verifier.deliveries().report();
    let carriers: Vec<serde_json::Value> = state
        .carriers
        .iter()
        .zip(deliveries)
        .map(|((name, breaker), delivery)| {
            json!({
                "name": name,
                "circuit": breaker.state(now).as_str(),
                "delivery": delivery,
            })
        })
        .collect();
    let carriers_ok = state
        .carriers
        .iter()
        .any(|(_, breaker)| breaker.state(now) != BreakerState::Open);
    // Asked now, so readiness follows a store going away and coming back.
    let store_ok = state.verifier.backend().is_up().await;
    let ready = accepting && queue_ok && carriers_ok && store_ok;
    let all_regions_allowed = state.verifier.countries().allows_every_region();
    let mut countries = json!({"ok": true, "all_regions_allowed": all_regions_allowed});
    if all_regions_allowed && state.verifier.has_clients() {
        countries["warning"] = json!(
            "[limits] countries is empty: SMS go to every region, premium-rate and satellite \
             ranges included"
        );
    }
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "accepting": accepting,
            "queue": {"ok": queue_ok, "depth": depth, "capacity": capacity},
            "carriers": {"ok": carriers_ok, "each": carriers},
            "store": {"ok": store_ok, "kind": state.verifier.backend().kind()},
            "countries": countries,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

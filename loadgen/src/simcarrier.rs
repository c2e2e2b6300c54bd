//! Simulated HTTP carriers: they speak DESIGN.md section 5's wire format, behave as the
//! scenario's timeline says (capacity, latency, failures, refusals, outages), post delivery
//! receipts back to the gateway, and hand each SMS to the handset of the user who owns the
//! number.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::handset::{Handsets, standard_normal};
use crate::measure::{Count, Measurements};
use crate::scenario::{Carrier as CarrierSettings, Scenario};

/// The largest submit body read.
const MAX_BODY: usize = 16 * 1024;

/// What the simulated carriers share: the users' handsets, the run's measurements, and which
/// users had an SMS accepted.
#[derive(Debug)]
pub struct Network {
    pub scenario: Arc<Scenario>,
    pub handsets: Handsets,
    pub measurements: Arc<Measurements>,
    /// SMS accepted per user (saturating), by schedule index.
    pub accepted: Box<[AtomicU8]>,
    /// Message ids accepted so far, across carriers: a repeat is a duplicate SMS.
    message_ids: Mutex<HashSet<Box<str>>>,
    /// SMS to numbers outside the scenario.
    pub strangers: AtomicU64,
    receipts: Client<HttpConnector, Full<Bytes>>,
}

/// One simulated carrier, listening.
#[derive(Debug)]
pub struct SimCarrier {
    pub name: String,
    pub addr: SocketAddr,
    /// The token its receipts carry (`Authorization: Bearer`).
    pub receipt_token: String,
    pub counts: Arc<CarrierCounts>,
}

/// What one carrier answered.
#[derive(Debug, Default)]
pub struct CarrierCounts {
    pub accepted: AtomicU64,
    pub throttled: AtomicU64,
    pub failed: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    pub receipts_sent: AtomicU64,
    pub receipts_failed: AtomicU64,
}

#[derive(Deserialize)]
struct Submit {
    message_id: String,
    to: String,
    text: String,
    receipt_url: String,
}

impl Network {
    pub fn new(scenario: Arc<Scenario>, measurements: Arc<Measurements>, n_users: u64) -> Network {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let receipts = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        Network {
            handsets: Handsets::new(scenario.handsets.clone()),
            scenario,
            measurements,
            accepted: (0..n_users).map(|_| AtomicU8::new(0)).collect(),
            message_ids: Mutex::new(HashSet::new()),
            strangers: AtomicU64::new(0),
            receipts,
        }
    }

    /// How many SMS carriers accepted for `user`.
    pub fn accepted_for(&self, user: u64) -> u8 {
        self.accepted
            .get(user as usize)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }
}

/// Starts every carrier of the scenario; they stop when `stop` fires.
pub async fn start_all(
    network: &Arc<Network>,
    started: Instant,
    stop: &CancellationToken,
) -> std::io::Result<Vec<SimCarrier>> {
    let mut carriers = Vec::new();
    for settings in &network.scenario.carriers {
        let listener = TcpListener::bind(settings.listen).await.map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!(
                    "carrier {}: cannot listen on {}: {error}",
                    settings.name, settings.listen
                ),
            )
        })?;
        let addr = listener.local_addr()?;
        let receipt_token = settings.receipt_token.clone().unwrap_or_else(|| {
            format!(
                "loadgen-receipts-{}-{:016x}",
                settings.name,
                rand::random::<u64>()
            )
        });
        let counts = Arc::new(CarrierCounts::default());
        let state = Arc::new(CarrierTask {
            settings: settings.clone(),
            network: network.clone(),
            started,
            receipt_token: receipt_token.clone(),
            counts: counts.clone(),
            next_id: AtomicU64::new(1),
            bucket: Mutex::new(Bucket::new(settings.base.capacity_per_sec)),
        });
        tokio::spawn(serve(listener, state, stop.clone()));
        carriers.push(SimCarrier {
            name: settings.name.clone(),
            addr,
            receipt_token,
            counts,
        });
    }
    Ok(carriers)
}

#[derive(Debug)]
struct CarrierTask {
    settings: CarrierSettings,
    network: Arc<Network>,
    started: Instant,
    receipt_token: String,
    counts: Arc<CarrierCounts>,
    next_id: AtomicU64,
    bucket: Mutex<Bucket>,
}

/// A token bucket holding a tenth of a second of capacity: above its capacity the carrier
/// answers 429.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_sec: f64) -> Bucket {
        Bucket {
            tokens: burst(per_sec),
            last: Instant::now(),
        }
    }

    fn take(&mut self, per_sec: f64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + refill).min(burst(per_sec));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn burst(per_sec: f64) -> f64 {
    (per_sec / 10.0).max(1.0)
}

async fn serve(listener: TcpListener, carrier: Arc<CarrierTask>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let carrier = carrier.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let carrier = carrier.clone();
                async move { carrier.handle(request).await }
            });
            let connection = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Why a carrier drops a connection without answering: it is down.
#[derive(Debug, thiserror::Error)]
#[error("carrier down")]
struct Down;

impl CarrierTask {
    async fn handle(
        &self,
        request: http::Request<Incoming>,
    ) -> Result<http::Response<Full<Bytes>>, Down> {
        let elapsed = self.started.elapsed();
        let state = self.settings.state_at(elapsed).clone();
        if state.down {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(Down);
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return Ok(answer(400, r#"{"error":"unreadable body"}"#)),
        };
        let Ok(submit) = serde_json::from_slice::<Submit>(&body) else {
            return Ok(answer(400, r#"{"error":"not the wire format"}"#));
        };
        let (latency, roll) = {
            let mut rng = rand::rng();
            (
                state.latency.sample_with(standard_normal(&mut rng)),
                rng.random::<f64>(),
            )
        };
        let allowed = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take(state.capacity_per_sec, Instant::now());
        tokio::time::sleep(latency).await;
        if !allowed {
            self.counts.throttled.fetch_add(1, Ordering::Relaxed);
            return Ok(answer(429, r#"{"error":"throttled"}"#));
        }
        if roll < state.failure_rate {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            return Ok(answer(500, r#"{"error":"internal"}"#));
        }
        if roll < state.failure_rate + state.refusal_rate {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(answer(400, r#"{"error":"number refused"}"#));
        }
        self.counts.accepted.fetch_add(1, Ordering::Relaxed);
        let network = &self.network;
        let fresh = network
            .message_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(submit.message_id.into_boxed_str());
        if !fresh {
            network.measurements.count(Count::DuplicateSms);
        }
        // Upper-case hex with leading zeros: the gateway must normalise it to match receipts.
        let carrier_message_id = format!("{:012X}", self.next_id.fetch_add(1, Ordering::Relaxed));
        match network.scenario.user_of(&submit.to) {
            Some(user) => {
                if let Some(count) = network.accepted.get(user as usize) {
                    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(1))
                    });
                }
                network.measurements.count(Count::SmsReceived);
                network.handsets.deliver(user, &submit.text);
            }
            None => {
                network.strangers.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.send_receipt(
            submit.receipt_url,
            carrier_message_id.clone(),
            state
                .receipt_delay
                .sample_with(standard_normal(&mut rand::rng())),
        );
        Ok(answer(
            200,
            &format!(r#"{{"carrier_message_id":"{carrier_message_id}"}}"#),
        ))
    }

    /// Posts a `delivered` receipt after `delay`.
    fn send_receipt(&self, url: String, carrier_message_id: String, delay: Duration) {
        let Ok(uri) = url.parse::<http::Uri>() else {
            self.counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let client = self.network.receipts.clone();
        let token = self.receipt_token.clone();
        let counts = self.counts.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let body =
                format!(r#"{{"carrier_message_id":"{carrier_message_id}","status":"delivered"}}"#);
            let request = http::Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body)));
            let Ok(request) = request else {
                counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let sent = tokio::time::timeout(Duration::from_secs(10), async {
                let response = client.request(request).await.ok()?;
                let ok = response.status().is_success();
                let _ = response.into_body().collect().await;
                Some(ok)
            })
            .await;
            if matches!(sent, Ok(Some(true))) {
                counts.receipts_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

fn answer(status: u16, body: &str) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

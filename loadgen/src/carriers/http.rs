//! Simulated HTTP carriers: they speak docs/DESIGN.md section 5's wire format, behave as the
//! scenario's timeline says (capacity, latency, failures, refusals, outages), post delivery
//! receipts back to the gateway, and hand each SMS to the handset of the user who owns the
//! number. What they share with the SMSC ([`super::smsc`]) is in [`super::network`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::carriers::network::{Bucket, CarrierCounts, Network, SmsKey, Verdict, judge};
use crate::carriers::settings::Carrier as CarrierSettings;

/// The largest submit body read.
const MAX_BODY: usize = 16 * 1024;

#[derive(Deserialize)]
struct Submit {
    message_id: String,
    to: String,
    text: String,
    receipt_url: String,
}

/// An HTTP carrier, listening.
#[derive(Debug)]
pub(crate) struct HttpCarrier {
    pub(crate) addr: SocketAddr,
    /// The token its receipts carry (`Authorization: Bearer`).
    pub(crate) receipt_token: String,
    pub(crate) counts: Arc<CarrierCounts>,
}

/// Starts an HTTP carrier listening on `settings.listen`; it stops when `stop` fires.
pub(crate) async fn start(
    settings: &CarrierSettings,
    network: &Arc<Network>,
    started: Instant,
    stop: &CancellationToken,
) -> std::io::Result<HttpCarrier> {
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
    Ok(HttpCarrier {
        addr,
        receipt_token,
        counts,
    })
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
        let (latency, verdict) = judge(&state, &self.bucket, &self.counts);
        tokio::time::sleep(latency).await;
        let (delivery_delay, receipt_delay, delivered, receipt_lost) = match verdict {
            Verdict::Throttled => return Ok(answer(429, r#"{"error":"throttled"}"#)),
            Verdict::Failed => return Ok(answer(500, r#"{"error":"internal"}"#)),
            Verdict::Refused => return Ok(answer(400, r#"{"error":"number refused"}"#)),
            Verdict::Accepted {
                delivery_delay,
                receipt_delay,
                delivered,
                receipt_lost,
            } => (delivery_delay, receipt_delay, delivered, receipt_lost),
        };
        self.network.hand_over(
            &submit.to,
            &submit.text,
            SmsKey::MessageId(submit.message_id),
            delivered,
            delivery_delay,
        );
        // Upper-case hex with leading zeros: the gateway must normalise it to match receipts.
        let carrier_message_id = format!("{:012X}", self.next_id.fetch_add(1, Ordering::Relaxed));
        if receipt_lost {
            self.counts
                .receipts_withheld
                .fetch_add(1, Ordering::Relaxed);
        } else {
            // The receipt follows the SMS out of the carrier's queue.
            self.send_receipt(
                submit.receipt_url,
                carrier_message_id.clone(),
                delivery_delay.saturating_add(receipt_delay),
                delivered,
            );
        }
        Ok(answer(
            200,
            &format!(r#"{{"carrier_message_id":"{carrier_message_id}"}}"#),
        ))
    }

    /// Posts a `delivered` (or `undeliverable`) receipt after `delay`.
    fn send_receipt(
        &self,
        url: String,
        carrier_message_id: String,
        delay: Duration,
        delivered: bool,
    ) {
        let Ok(uri) = url.parse::<http::Uri>() else {
            self.counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let client = self.network.receipts.clone();
        let token = self.receipt_token.clone();
        let counts = self.counts.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let status = if delivered {
                "delivered"
            } else {
                "undeliverable"
            };
            let body =
                format!(r#"{{"carrier_message_id":"{carrier_message_id}","status":"{status}"}}"#);
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::mpsc;

    use super::*;
    use crate::carriers::network::Unread;
    use crate::carriers::settings::{Dist, HandsetSettings, Phones, Protocol};

    /// A receipt endpoint that notes when each receipt came.
    async fn receipts() -> (String, mpsc::UnboundedReceiver<(Instant, String)>) {
        let (sender, received) = mpsc::unbounded_channel();
        let app = axum::Router::new().route(
            "/receipts",
            axum::routing::post(move |body: String| {
                let sender = sender.clone();
                async move {
                    let _ = sender.send((Instant::now(), body));
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/receipts", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, received)
    }

    #[tokio::test]
    async fn a_late_carrier_answers_at_once_and_sends_the_sms_and_its_receipt_late() {
        let phones = Phones {
            prefix: "+39333".to_owned(),
            digits: 7,
            first: 0,
        };
        let network = Arc::new(Network::new(
            phones,
            HandsetSettings::faultless(),
            Arc::new(Unread),
            10,
        ));
        let delivery = Duration::from_millis(400);
        let mut settings = CarrierSettings::steady(
            "late",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            1000.0,
            Duration::ZERO,
            Duration::from_millis(200),
            Protocol::Http,
        );
        settings.base.delivery_delay = Dist::Constant(delivery);
        let stop = CancellationToken::new();
        let carrier = start(&settings, &network, Instant::now(), &stop)
            .await
            .unwrap();
        let (receipt_url, mut receipts) = receipts().await;
        let user = 4;
        let mut inbox = network.handsets.register(user);
        let body = serde_json::json!({
            "message_id": "m1",
            "to": network.phones.phone(user),
            "text": "Codice: 424242",
            "receipt_url": receipt_url,
        });
        let request = http::Request::post(format!("http://{}/sms", carrier.addr))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = network.receipts.request(request).await.unwrap();
        let accepted = Instant::now();
        assert_eq!(response.status(), 200);
        assert_eq!(network.accepted_for(user), 1);
        let text = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        let on_handset = accepted.elapsed();
        assert_eq!(&*text, "Codice: 424242");
        let (receipted, receipt) = tokio::time::timeout(Duration::from_secs(5), receipts.recv())
            .await
            .unwrap()
            .unwrap();
        let receipted = receipted.duration_since(accepted);
        assert!(receipt.contains(r#""status":"delivered""#), "{receipt}");
        assert!(
            on_handset >= delivery - Duration::from_millis(5),
            "{on_handset:?}"
        );
        assert!(
            receipted >= delivery + Duration::from_millis(195),
            "{receipted:?}"
        );
        assert!(on_handset < receipted, "{on_handset:?} {receipted:?}");
        stop.cancel();
    }
}

//! Webhooks to frontends: signed events as a verification moves, retried while the receiver
//! fails, and a bounded outbox.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{FakeCarrier, Gateway, Reply, WebhookReceiver, phone, sha256_hex};

const KEY: &str = "portal-api-key-0123456789";
const SECRET: &str = "webhook-secret-of-the-portal";
const RECEIPT_TOKEN: &str = "receipt-token-of-alpha-0123456789";

/// A gateway with one client whose webhook is `receiver`, extra `[webhooks]` settings, and the
/// carrier `alpha`.
async fn gateway_with(
    receiver: &WebhookReceiver,
    carrier: &FakeCarrier,
    webhooks: &str,
) -> Gateway {
    let config = format!(
        "sweep_interval_ms = 50\n[webhooks]\nretry_base_ms = 20\nretry_max_ms = 100\n{webhooks}\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nwebhook_url = \"{}\"\n\
         webhook_secret = \"{SECRET}\"\nwebhook_delayed_after_secs = 2\n\n{}receipt_token = \"{RECEIPT_TOKEN}\"\n",
        sha256_hex(KEY),
        receiver.url(),
        carrier.config("alpha", 1000, 4),
    );
    Gateway::start(&config).await.with_api_key(KEY)
}

fn now_secs(gateway: &Gateway) -> u64 {
    gateway.clock.now_ms() / 1000
}

/// Submitted, delivered and approved, each signed, each with its own id, each carrying the
/// verification as GET shows it (masked phone, no code).
#[tokio::test]
async fn events_follow_a_verification_and_are_signed() {
    let receiver = WebhookReceiver::start().await;
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::AcceptWithBody(r#"{"carrier_message_id": "cm-1"}"#)]);
    let gateway = gateway_with(&receiver, &carrier, "").await;
    let number = phone(1);
    let started = gateway.start_verification(&number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();

    let submitted = receiver.wait_for_event("verification.submitted").await;
    assert_eq!(submitted["type"], "verification.submitted");
    assert_eq!(submitted["data"]["id"], id.as_str());
    assert_eq!(submitted["data"]["delivery"]["state"], "submitted");
    assert_eq!(submitted["data"]["status"], "pending");

    let receipt = json!({ "carrier_message_id": "cm-1", "status": "delivered" });
    let answer = gateway
        .request_with_bearer(
            http::Method::POST,
            "/v1/carriers/alpha/receipts",
            receipt.to_string().into_bytes(),
            Some(RECEIPT_TOKEN),
        )
        .await;
    assert_eq!(answer.body, json!({ "matched": true }), "{}", answer.text);
    let delivered = receiver.wait_for_event("verification.delivered").await;
    assert_eq!(delivered["data"]["delivery"]["state"], "delivered");

    let code = carrier.code_for(&number).expect("the SMS carries a code");
    assert_eq!(gateway.check(&id, &code).await.body["valid"], true);
    let approved = receiver.wait_for_event("verification.approved").await;
    assert_eq!(approved["data"]["status"], "approved");

    let posts = receiver.posts();
    assert_eq!(posts.len(), 3, "{posts:?}");
    let mut ids = HashSet::new();
    for post in &posts {
        assert!(post.signed_with(SECRET, now_secs(&gateway)), "{post:?}");
        assert!(!post.signed_with("another-secret-entirely", now_secs(&gateway)));
        let body: Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(post.event_id.as_deref(), body["id"].as_str());
        assert_eq!(post.event_type.as_deref(), body["type"].as_str());
        assert!(ids.insert(post.event_id.clone().unwrap()), "ids are unique");
        let text = String::from_utf8_lossy(&post.body);
        assert!(!text.contains(&code), "no code in an event: {text}");
        assert!(!text.contains(&number), "no full phone in an event: {text}");
        assert!(body["created_at"].as_str().is_some());
    }
    let events = |event: &str| {
        format!(r#"otpgate_webhook_events_total{{client="portal",event="verification.{event}"}}"#)
    };
    for event in ["submitted", "delivered", "approved"] {
        assert_eq!(gateway.metric(&events(event)).await, Some(1.0), "{event}");
    }
    assert_eq!(gateway.metric(&events("expired")).await, Some(0.0));
    let delivered = r#"otpgate_webhook_deliveries_total{client="portal",outcome="delivered"}"#;
    assert_eq!(gateway.metric(delivered).await, Some(3.0));
    gateway.stop().await.unwrap();
}

/// A receiver that fails gets the same event (same id) again until it answers 2xx; one that
/// keeps failing is given up after `max_attempts`.
#[tokio::test]
async fn failed_deliveries_are_retried_with_the_same_event_id() {
    let receiver = WebhookReceiver::start().await;
    receiver.answer(&[500, 503, 200]);
    let carrier = FakeCarrier::start().await;
    let gateway = gateway_with(&receiver, &carrier, "max_attempts = 4").await;
    assert_eq!(gateway.start_verification(&phone(2)).await.status, 202);
    receiver.wait_for_event("verification.submitted").await;
    let posts = receiver.posts();
    let statuses: Vec<u16> = posts.iter().map(|post| post.status).collect();
    assert_eq!(statuses, [500, 503, 200]);
    assert!(posts.iter().all(|post| post.event_id == posts[0].event_id));
    assert!(
        posts
            .iter()
            .all(|post| post.signed_with(SECRET, now_secs(&gateway)))
    );
    let outcome = |outcome: &str| {
        format!(r#"otpgate_webhook_deliveries_total{{client="portal",outcome="{outcome}"}}"#)
    };
    assert_eq!(gateway.metric(&outcome("retried")).await, Some(2.0));
    assert_eq!(gateway.metric(&outcome("delivered")).await, Some(1.0));

    // Now the receiver is down for good: four attempts, then the event is given up.
    receiver.answer(&[500]);
    assert_eq!(gateway.start_verification(&phone(3)).await.status, 202);
    gateway
        .wait_for_metric(&outcome("gave_up"), |n| n == 1.0)
        .await;
    assert_eq!(receiver.posts().len(), 3 + 4);
    assert_eq!(
        gateway.metric("otpgate_webhook_outbox_depth").await,
        Some(0.0)
    );
    gateway.stop().await.unwrap();
}

/// An SMS held in the queue past the threshold is announced as delayed, with its ETA; a
/// verification whose SMS never leaves expires, and that is announced too. A permanent refusal
/// is announced as failed.
#[tokio::test]
async fn delayed_expired_and_failed_are_announced() {
    let receiver = WebhookReceiver::start().await;
    let carrier = FakeCarrier::start().await;
    // The carrier throttles everything: the SMS stays queued.
    carrier.script(&[Reply::Status(429, None)]);
    let gateway = gateway_with(&receiver, &carrier, "").await;
    let started = gateway.start_verification(&phone(4)).await;
    assert_eq!(started.status, 202);
    let id = started.id();
    gateway.clock.advance(Duration::from_secs(3));
    let delayed = receiver.wait_for_event("verification.delayed").await;
    assert_eq!(delayed["data"]["id"], id.as_str());
    assert_eq!(delayed["data"]["delivery"]["state"], "queued");
    assert!(
        delayed["data"]["delivery"]["eta_seconds"].is_number(),
        "{delayed}"
    );

    // Past code_ttl and the whole extension, the verification expires unsent.
    gateway.clock.advance(Duration::from_secs(26 * 60));
    let expired = receiver.wait_for_event("verification.expired").await;
    assert_eq!(expired["data"]["id"], id.as_str());
    assert_eq!(expired["data"]["status"], "expired");
    assert_eq!(
        receiver
            .posts()
            .iter()
            .filter(|post| post.event_type.as_deref() == Some("verification.delayed"))
            .count(),
        1,
        "one delayed event per SMS"
    );

    carrier.script(&[Reply::Status(400, None)]);
    let refused = gateway.start_verification(&phone(5)).await;
    assert_eq!(refused.status, 202);
    let failed = receiver.wait_for_event("verification.failed").await;
    assert_eq!(failed["data"]["id"], refused.id().as_str());
    assert_eq!(failed["data"]["failure_reason"], "undeliverable");
    gateway.stop().await.unwrap();
}

/// The outbox holds at most `outbox_capacity` events (queued, retrying or being sent); more are
/// dropped and counted rather than buffered, on Redis as on the embedded back-end.
#[tokio::test]
async fn a_full_outbox_drops_and_counts() {
    let receiver = WebhookReceiver::start().await;
    receiver.delay(Duration::from_millis(1500));
    let carrier = FakeCarrier::start().await;
    let gateway = gateway_with(
        &receiver,
        &carrier,
        "outbox_capacity = 2\nconcurrency = 1\ntimeout_ms = 5000",
    )
    .await;
    for n in 0..5 {
        assert_eq!(gateway.start_verification(&phone(10 + n)).await.status, 202);
    }
    carrier.wait_for(5, Duration::from_secs(5)).await;
    let dropped = r#"otpgate_webhook_deliveries_total{client="portal",outcome="dropped"}"#;
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "DEBUG {}",
        gateway
            .metrics()
            .await
            .lines()
            .filter(|l| l.contains("webhook"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(gateway.wait_for_metric(dropped, |n| n >= 3.0).await, 3.0);
    assert_eq!(
        gateway.metric("otpgate_webhook_outbox_depth").await,
        Some(2.0)
    );
    gateway.stop().await.unwrap();
}

/// Every webhook event raised for `client` so far, whatever its type.
async fn raised_events(gateway: &Gateway, client: &str) -> f64 {
    let series = format!("otpgate_webhook_events_total{{client=\"{client}\",");
    gateway
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with(&series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client whose endpoint is down fills only its own share: past it, its events are dropped
/// and counted (on Redis too, where they used to pile up, 1,024 of them stopping the feed of
/// every client's events), and another client's events still go out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_stop_other_clients_events() {
    let dead = WebhookReceiver::start().await;
    dead.answer(&[503]);
    let healthy = WebhookReceiver::start().await;
    let carrier = FakeCarrier::start().await;
    let other_key = "pharmacies-api-key-0123456789";
    let config = format!(
        "sweep_interval_ms = 50\nshutdown_grace_secs = 1\nmax_connections_per_ip = 0\n\
         [limits]\nip_sends = []\n\
         [webhooks]\noutbox_capacity = 40\nconcurrency = 4\nmax_attempts = 10\n\
         retry_base_ms = 10000\nretry_max_ms = 60000\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 100000\n\
         webhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\n\
         [[clients]]\nname = \"pharmacies\"\napi_key_sha256 = \"{}\"\nwebhook_url = \"{}\"\n\
         webhook_secret = \"{SECRET}\"\n\n{}",
        sha256_hex(KEY),
        dead.url(),
        sha256_hex(other_key),
        healthy.url(),
        carrier.config("alpha", 10_000, 32),
    );
    let gateway = Gateway::start(&config).await.with_api_key(KEY);
    // More events for the dead endpoint than its share (20) plus the 1,024 a redis feeder
    // used to hold back before it stopped reading.
    let n = 1_100;
    for i in 0..n {
        let answer = gateway.start_verification(&phone(20_000 + i)).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
    }
    carrier.wait_for(n as usize, Duration::from_secs(30)).await;
    // Everything past the client's share (20) is dropped and counted.
    let dropped = r#"otpgate_webhook_deliveries_total{client="portal",outcome="dropped"}"#;
    gateway
        .wait_for_metric(dropped, |dropped| dropped >= f64::from(n - 40))
        .await;
    let raised = raised_events(&gateway, "portal").await;
    assert!(raised >= f64::from(n), "{raised}");
    let depth = "otpgate_webhook_outbox_depth";
    gateway
        .wait_for_metric(dropped, |dropped| dropped >= raised - 20.0)
        .await;
    assert_eq!(gateway.metric(depth).await, Some(20.0));

    let started = std::time::Instant::now();
    let body = json!({ "phone": phone(29_999) }).to_string().into_bytes();
    let answer = gateway
        .request_with_bearer(
            http::Method::POST,
            "/v1/verifications",
            body,
            Some(other_key),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    healthy.wait_for_event("verification.submitted").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the healthy client's event waited {:?} behind the dead endpoint",
        started.elapsed()
    );
    let healthy_dropped =
        r#"otpgate_webhook_deliveries_total{client="pharmacies",outcome="dropped"}"#;
    assert_eq!(gateway.metric(healthy_dropped).await, Some(0.0));
    gateway.stop().await.unwrap();
}

/// One client's endpoint hangs: it holds only its own share of the deliveries in flight, and
/// the other client's events still go out at once.
#[tokio::test]
async fn a_hanging_endpoint_does_not_hold_up_other_clients() {
    let hanging = WebhookReceiver::start().await;
    hanging.delay(Duration::from_secs(3));
    let healthy = WebhookReceiver::start().await;
    let carrier = FakeCarrier::start().await;
    let other_key = "pharmacies-api-key-0123456789";
    let config = format!(
        "sweep_interval_ms = 50\nshutdown_grace_secs = 1\n[limits]\nip_sends = []\n[webhooks]\nconcurrency = 2\ntimeout_ms = 5000\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\n\
         [[clients]]\nname = \"pharmacies\"\napi_key_sha256 = \"{}\"\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n\n{}",
        sha256_hex(KEY),
        hanging.url(),
        sha256_hex(other_key),
        healthy.url(),
        carrier.config("alpha", 1000, 8),
    );
    let portal = Gateway::start(&config).await.with_api_key(KEY);
    for n in 0..4 {
        assert_eq!(portal.start_verification(&phone(60 + n)).await.status, 202);
    }
    carrier.wait_for(4, Duration::from_secs(5)).await;
    let started = std::time::Instant::now();
    let body = json!({ "phone": phone(70) }).to_string().into_bytes();
    let answer = portal
        .request_with_bearer(
            http::Method::POST,
            "/v1/verifications",
            body,
            Some(other_key),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    healthy.wait_for_event("verification.submitted").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the healthy client's event waited {:?} behind the hanging endpoint",
        started.elapsed()
    );
    portal.stop().await.unwrap();
}

/// Webhook settings are checked when the configuration loads, naming the key.
#[test]
fn webhook_config_errors_name_the_key() {
    let client = |extra: &str| {
        format!(
            "[[carriers]]\nname = \"a\"\nkind = \"console\"\n[[clients]]\nname = \"p\"\n\
             api_key_sha256 = \"{}\"\n{extra}\n",
            sha256_hex(KEY)
        )
    };
    for (extra, key) in [
        (
            "webhook_url = \"http://127.0.0.1:1/h\"",
            "clients[0].webhook_secret",
        ),
        (
            "webhook_secret = \"0123456789abcdef\"",
            "clients[0].webhook_url",
        ),
        (
            "webhook_url = \"ftp://x/h\"\nwebhook_secret = \"0123456789abcdef\"",
            "clients[0].webhook_url",
        ),
        (
            "webhook_url = \"http://x/h\"\nwebhook_secret = \"short\"",
            "clients[0].webhook_secret",
        ),
        (
            "webhook_delayed_after_secs = 5",
            "clients[0].webhook_delayed_after_secs",
        ),
        (
            "webhook_url = \"http://x/h\"\nwebhook_secret = \"0123456789abcdef\"\nwebhook_delayed_after_secs = 86400",
            "clients[0].webhook_delayed_after_secs",
        ),
    ] {
        let error = gateway::config::Config::from_toml(&client(extra)).unwrap_err();
        assert!(error.to_string().contains(key), "{extra}: {error}");
    }
    let error = gateway::config::Config::from_toml("[webhooks]\nmax_attempts = 0\n").unwrap_err();
    assert!(
        error.to_string().contains("webhooks.max_attempts"),
        "{error}"
    );
}

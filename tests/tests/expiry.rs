//! Session extension, expiry and the SMS queue of docs/DESIGN.md section 4, end to end.
//!
//! A code lives `code_ttl` from the moment a carrier accepts its SMS: while the SMS waits in the
//! gateway's queue or in retry, `expires_at` moves with the clock, by at most `max_extension`.
//! Expired verifications end lazily on read and on the sweeper's timer, and their queued jobs
//! are dropped instead of sent late. The queue is bounded, refuses work a code could not survive,
//! tells frontends an honest `eta_seconds`, and serves higher-priority clients first.
//!
//! The fake carrier's `Reply::Status(503, None)` is a throttle, retried within milliseconds, so
//! scripting it keeps an SMS in retry for as long as a test needs; time moves with
//! `gateway.clock.advance`.

use std::time::Duration;

use serde_json::json;
use tests::{Answer, FakeCarrier, Gateway, Reply, epoch_ms, phone, sha256_hex};

/// Upper bound on any wait for the gateway to reach a state; never a fixed delay.
const PATIENCE: Duration = Duration::from_secs(10);

/// The config of a gateway with one fake carrier at this pace and window, a sweeper every
/// `sweep_interval_ms`, and `extra` tables. The carrier's timeout is long enough for the slow
/// replies these tests script.
fn config(
    sweep_interval_ms: u64,
    carrier: &FakeCarrier,
    pace_per_sec: u32,
    window: u32,
    extra: &str,
) -> String {
    let carrier = carrier
        .config("alpha", pace_per_sec, window)
        .replace("timeout_ms = 2000", "timeout_ms = 10000");
    format!("sweep_interval_ms = {sweep_interval_ms}\n{extra}\n{carrier}")
}

/// A gateway sweeping every 50 ms, with one fake carrier.
async fn gateway_with(
    carrier: &FakeCarrier,
    pace_per_sec: u32,
    window: u32,
    extra: &str,
) -> Gateway {
    Gateway::start(&config(50, carrier, pace_per_sec, window, extra)).await
}

/// How many start requests the queue refused for `reason`.
async fn queue_rejections(gateway: &Gateway, reason: &str) -> f64 {
    let series = format!("otpgate_queue_rejected_total{{reason=\"{reason}\"}}");
    gateway.registered_metric(&series).await
}

/// Starts a verification with the API key `key` and checks that it was accepted.
async fn start_as(gateway: &Gateway, key: &str, number: &str) {
    let body = json!({ "phone": number }).to_string().into_bytes();
    let bearer = format!("Bearer {key}");
    let answer = gateway
        .request(
            http::Method::POST,
            "/v1/verifications",
            Some(body),
            &[("authorization", bearer.as_str())],
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
}

/// A timestamp field of a verification, in milliseconds since the Unix epoch.
fn time_field(answer: &Answer, field: &str) -> u64 {
    let text = answer.body[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {}", answer.text));
    epoch_ms(text)
}

/// A code's life starts when a carrier accepts its SMS: while the SMS is in retry `expires_at`
/// moves with the clock, and once accepted it is fixed at acceptance + `code_ttl`.
#[tokio::test]
async fn code_ttl_counts_from_carrier_acceptance() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Status(503, None)]);
    let gateway = gateway_with(&carrier, 1000, 10, "[verification]\ncode_ttl_secs = 60").await;
    let id = gateway.start_ok(&phone(1001)).await;
    carrier.wait_for_submits(1, PATIENCE).await;

    let before = gateway.read(&id).await;
    assert_eq!(
        before.body["delivery"]["state"], "queued",
        "{}",
        before.text
    );
    let first_expiry = time_field(&before, "expires_at");
    gateway.clock.advance(Duration::from_secs(10));
    let read_ms = gateway.clock.now_ms();
    let after = gateway.read(&id).await;
    assert_eq!(after.body["status"], "pending", "{}", after.text);
    assert_eq!(after.body["delivery"]["state"], "queued", "{}", after.text);
    let moved_expiry = time_field(&after, "expires_at");
    let moved_by = moved_expiry.saturating_sub(first_expiry);
    assert!(
        (10_000..=12_000).contains(&moved_by),
        "expires_at moved by {moved_by} ms with a 10 s advance"
    );
    assert!(
        moved_expiry.abs_diff(read_ms + 60_000) <= 1000,
        "while queued, expires_at is now + code_ttl"
    );

    let flipped_ms = gateway.clock.now_ms();
    carrier.script(&[Reply::Accept]);
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    let seen_ms = gateway.clock.now_ms();
    assert_eq!(submitted.body["delivery"]["eta_seconds"], json!(null));
    let fixed_expiry = time_field(&submitted, "expires_at");
    assert!(
        flipped_ms + 60_000 - 1000 <= fixed_expiry && fixed_expiry <= seen_ms + 60_000 + 1000,
        "expires_at {fixed_expiry} is not acceptance (between {flipped_ms} and {seen_ms}) + 60 s"
    );

    gateway.clock.advance(Duration::from_secs(10));
    let later = gateway.read(&id).await;
    assert_eq!(later.body["status"], "pending", "{}", later.text);
    assert_eq!(
        later.body["expires_at"], submitted.body["expires_at"],
        "accepted: expiry is fixed"
    );

    gateway
        .wait_for_metric("otpgate_session_extension_seconds_count", |n| n >= 1.0)
        .await;
    let extension = gateway
        .registered_metric("otpgate_session_extension_seconds_sum")
        .await;
    assert!(
        extension >= 10.0,
        "the SMS waited at least 10 s, extension {extension}"
    );
}

/// The extension is capped at `max_extension`: after 45 s in retry with a cap of 30 s, the code
/// expires at created + `code_ttl` + 30 s, before and after the carrier accepts.
#[tokio::test]
async fn session_extension_is_capped() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Status(503, None)]);
    let extra = "[verification]\ncode_ttl_secs = 60\nmax_extension_secs = 30";
    let gateway = gateway_with(&carrier, 1000, 10, extra).await;
    let started = gateway.start_verification(&phone(1101)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    let created = time_field(&started, "created_at");
    assert_eq!(time_field(&started, "expires_at"), created + 60_000);
    carrier.wait_for_submits(1, PATIENCE).await;

    gateway.clock.advance(Duration::from_secs(45));
    let queued = gateway.read(&id).await;
    assert_eq!(queued.body["status"], "pending", "{}", queued.text);
    assert_eq!(queued.body["delivery"]["state"], "queued");
    assert_eq!(
        time_field(&queued, "expires_at"),
        created + 90_000,
        "{}",
        queued.text
    );

    carrier.script(&[Reply::Accept]);
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    assert_eq!(
        time_field(&submitted, "expires_at"),
        created + 90_000,
        "{}",
        submitted.text
    );
    gateway
        .wait_for_metric("otpgate_session_extension_seconds_count", |n| n >= 1.0)
        .await;
    assert_eq!(
        gateway
            .registered_metric("otpgate_session_extension_seconds_sum")
            .await,
        30.0
    );
}

/// The sweeper expires a verification whose code ran out, with no request about it; afterwards
/// it reads as expired and checks and resends get 409.
#[tokio::test]
async fn sweeper_expires_verifications() {
    let carrier = FakeCarrier::start().await;
    let gateway = gateway_with(&carrier, 1000, 10, "[verification]\ncode_ttl_secs = 60").await;
    let number = phone(1201);
    let id = gateway.start_ok(&number).await;
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let series = "otpgate_verifications_ended_total{outcome=\"expired\"}";
    assert_eq!(gateway.registered_metric(series).await, 0.0);

    gateway.clock.advance(Duration::from_secs(61));
    // Scrapes do not touch verifications: only the sweeper can end this one.
    gateway.wait_for_metric(series, |n| n >= 1.0).await;

    let expired = gateway.read(&id).await;
    assert_eq!(expired.body["status"], "expired", "{}", expired.text);
    assert_eq!(expired.body["expires_at"], submitted.body["expires_at"]);
    let check = gateway.check(&id, &code).await;
    assert_eq!(check.status, 409, "{}", check.text);
    assert_eq!(check.error_code(), "not_pending");
    let resend = gateway
        .post(&format!("/v1/verifications/{id}/resend"), json!({}))
        .await;
    assert_eq!(resend.status, 409, "{}", resend.text);
    assert_eq!(
        gateway.registered_metric(series).await,
        1.0,
        "expired once, counted once"
    );
}

/// A verification whose code ran out is expired on read, before any sweep; the sweeper is set
/// to a minute so that only the read can have done it.
#[tokio::test]
async fn expiry_is_noticed_on_read() {
    let carrier = FakeCarrier::start().await;
    let gateway = Gateway::start(&config(
        60_000,
        &carrier,
        1000,
        10,
        "[verification]\ncode_ttl_secs = 60",
    ))
    .await;
    let number = phone(1301);
    let id = gateway.start_ok(&number).await;
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    let code = carrier.code_for(&number).expect("a code in the SMS");

    gateway.clock.advance(Duration::from_secs(61));
    let check = gateway.check(&id, &code).await;
    assert_eq!(
        check.status, 409,
        "the right code, too late: {}",
        check.text
    );
    assert_eq!(check.error_code(), "not_pending");
    let expired = gateway.read(&id).await;
    assert_eq!(expired.body["status"], "expired", "{}", expired.text);
    assert_eq!(expired.body["expires_at"], submitted.body["expires_at"]);
    assert_eq!(
        gateway
            .registered_metric("otpgate_verifications_ended_total{outcome=\"expired\"}")
            .await,
        1.0
    );
}

/// A job whose verification expired while it waited in retry is dropped and counted, never sent
/// late: once the carrier accepts again, only a later verification's SMS arrives.
#[tokio::test]
async fn job_of_an_expired_verification_is_dropped() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Status(503, None)]);
    let extra = "[verification]\ncode_ttl_secs = 60\nmax_extension_secs = 30";
    let gateway = gateway_with(&carrier, 1000, 10, extra).await;
    let late = phone(1401);
    let id = gateway.start_ok(&late).await;
    carrier.wait_for_submits(1, PATIENCE).await;

    // Past created + code_ttl + max_extension.
    gateway.clock.advance(Duration::from_secs(91));
    gateway
        .wait_for_metric("otpgate_queue_dropped_total{reason=\"expired\"}", |n| {
            n >= 1.0
        })
        .await;
    carrier.script(&[Reply::Accept]);

    // The carrier accepts again: a later verification's SMS goes out, and the expired one's never
    // does.
    let on_time = phone(1402);
    gateway.start_ok(&on_time).await;
    let received = carrier.wait_for(1, PATIENCE).await;
    let recipients: Vec<&str> = received.iter().map(|sms| sms.to.as_str()).collect();
    assert_eq!(recipients, [on_time.as_str()], "nothing is sent late");

    let expired = gateway.read(&id).await;
    assert_eq!(expired.body["status"], "expired", "{}", expired.text);
    assert_eq!(expired.body["delivery"]["eta_seconds"], json!(null));
    assert_eq!(
        gateway
            .registered_metric("otpgate_queue_dropped_total{reason=\"canceled\"}")
            .await,
        0.0
    );
}

/// `eta_seconds` is positive for queued SMS and grows with their place in line, and is null once
/// a carrier has accepted the SMS.
#[tokio::test]
async fn eta_grows_with_queue_position() {
    if tests::testing_redis() {
        // Embedded only: on Redis, eta_seconds comes from the
        // backlog of every instance as of the last sweep, not from a position in one queue.
        return;
    }
    let carrier = FakeCarrier::start().await;
    // The first submit holds the carrier's only window slot for 2 s.
    carrier.script(&[Reply::Slow(Duration::from_secs(2)), Reply::Accept]);
    let gateway = gateway_with(&carrier, 1, 1, "").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(gateway.start_ok(&phone(1501 + n)).await);
    }
    carrier.wait_for_submits(1, PATIENCE).await;

    let mut etas = Vec::new();
    for id in &ids[1..] {
        let queued = gateway.read(id).await;
        assert_eq!(
            queued.body["delivery"]["state"], "queued",
            "{}",
            queued.text
        );
        let eta = queued.body["delivery"]["eta_seconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("a queued SMS has an eta: {}", queued.text));
        etas.push(eta);
    }
    assert!(etas[0] > 0.0, "{etas:?}");
    assert!(
        etas.windows(2).all(|pair| pair[0] < pair[1]),
        "eta grows with position: {etas:?}"
    );
    assert!(etas[3] <= 10.0, "4 SMS at 1 per second: {etas:?}");

    let submitted = gateway.wait_for_delivery(&ids[0], "submitted").await;
    assert_eq!(
        submitted.body["delivery"]["eta_seconds"],
        json!(null),
        "{}",
        submitted.text
    );
    let last = gateway.read(&ids[4]).await;
    if last.body["delivery"]["state"] == "queued" {
        let eta = last.body["delivery"]["eta_seconds"]
            .as_f64()
            .unwrap_or(f64::MAX);
        assert!(
            eta <= etas[3],
            "the eta shrinks as the queue drains: {eta} after {etas:?}"
        );
    }
}

/// Under the deadline policy, when the queue holds more than a session can be extended by, new
/// verifications get 503 with `Retry-After`, counted as `predicted_wait`. (The adaptive policy's
/// `max_wait` is `overload::a_start_that_would_wait_past_max_wait_is_refused_at_once`.)
#[tokio::test]
async fn predicted_wait_beyond_the_extension_is_refused() {
    if tests::testing_redis() {
        // Embedded only: on Redis, admission reads the backlog of every
        // instance as of the last sweep; `redis::admission_follows_the_shared_backlog` covers it.
        return;
    }
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_secs(5))]);
    let gateway = gateway_with(
        &carrier,
        1,
        1,
        "[verification]\nmax_extension_secs = 0\n[queue]\npolicy = \"deadline\"",
    )
    .await;
    gateway.start_ok(&phone(1601)).await;
    carrier.wait_for_submits(1, PATIENCE).await;

    let mut statuses = Vec::new();
    let mut n_refused = 0;
    for n in 0..6 {
        let answer = gateway.start_verification(&phone(1602 + n)).await;
        statuses.push(answer.status);
        if answer.status == 503 {
            n_refused += 1;
            assert_eq!(answer.error_code(), "overloaded", "{}", answer.text);
            assert!(
                answer.retry_after().unwrap_or_default() >= 1,
                "{:?}",
                answer.headers
            );
        }
    }
    // About a second of work at 1 SMS per second fits; the rest is refused.
    assert_eq!(statuses.first(), Some(&202), "{statuses:?}");
    assert!(n_refused >= 2, "{statuses:?}");
    let first_refusal = statuses
        .iter()
        .position(|status| *status == 503)
        .unwrap_or_default();
    assert!(
        statuses[first_refusal..]
            .iter()
            .all(|status| *status == 503),
        "{statuses:?}"
    );
    assert_eq!(
        queue_rejections(&gateway, "predicted_wait").await,
        f64::from(n_refused)
    );
    assert_eq!(queue_rejections(&gateway, "full").await, 0.0);
    // The gauges an alert compares: the predicted wait (jobs ahead over 1 SMS/s) against the
    // maximum extension (0 here).
    let predicted = gateway
        .wait_for_metric(
            r#"otpgate_queue_predicted_wait_seconds{lane="0"}"#,
            |wait| wait >= 1.0,
        )
        .await;
    assert!(predicted >= 1.0, "{predicted}");
    assert_eq!(
        gateway
            .registered_metric("otpgate_session_max_extension_seconds")
            .await,
        0.0
    );
    assert_eq!(
        gateway.registered_metric("otpgate_code_ttl_seconds").await,
        600.0
    );
}

/// A full queue refuses new verifications with 503 and `Retry-After`, counted as `full`; the
/// refused start sent nothing, so retrying after `Retry-After` once the queue drained works.
#[tokio::test]
async fn full_queue_is_refused() {
    if tests::testing_redis() {
        // Embedded only: on Redis, the queue is the streams of every
        // instance, measured at each sweep; `redis::admission_follows_the_shared_backlog` covers it.
        return;
    }
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::Slow(Duration::from_secs(2)), Reply::Accept]);
    let gateway = gateway_with(&carrier, 1, 1, "[queue]\ncapacity = 1").await;
    gateway.start_ok(&phone(1701)).await;
    carrier.wait_for_submits(1, PATIENCE).await;
    // The first SMS is with the carrier; the second fills the queue.
    gateway.start_ok(&phone(1702)).await;

    let number = phone(1703);
    let refused = gateway.start_verification(&number).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.error_code(), "overloaded");
    let retry_after = refused.retry_after().expect("a whole-second Retry-After");
    assert!(retry_after >= 1);
    assert_eq!(queue_rejections(&gateway, "full").await, 1.0);
    assert_eq!(queue_rejections(&gateway, "predicted_wait").await, 0.0);

    carrier.wait_for(2, PATIENCE).await;
    gateway.clock.advance(Duration::from_secs(retry_after));
    let retried = gateway.start_verification(&number).await;
    assert_eq!(
        retried.status, 202,
        "retry after Retry-After once the queue drained: {} {:?}",
        retried.text, retried.headers
    );
}

/// Priority lanes: while the carrier is busy, SMS of a priority-5 client queued after those of a
/// priority-1 client still reach the carrier first.
#[tokio::test]
async fn higher_priority_clients_are_served_first() {
    let carrier = FakeCarrier::start().await;
    // The first submit holds the carrier's only window slot while the rest queue up.
    carrier.script(&[Reply::Slow(Duration::from_secs(2)), Reply::Accept]);
    let clients = format!(
        "[[clients]]\nname = \"low\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 1000\npriority = 1\n\
         [[clients]]\nname = \"high\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 1000\npriority = 5\n",
        sha256_hex("k-low"),
        sha256_hex("k-high")
    );
    let gateway = gateway_with(&carrier, 1000, 1, &clients).await;
    let low: Vec<String> = (0..3).map(|n| phone(1801 + n)).collect();
    let high: Vec<String> = (0..3).map(|n| phone(1851 + n)).collect();
    start_as(&gateway, "k-low", &low[0]).await;
    carrier.wait_for_submits(1, PATIENCE).await;
    for number in &low[1..] {
        start_as(&gateway, "k-low", number).await;
    }
    for number in &high {
        start_as(&gateway, "k-high", number).await;
    }

    let received = carrier.wait_for(6, PATIENCE).await;
    let order: Vec<&str> = received.iter().map(|sms| sms.to.as_str()).collect();
    let expected = [&low[0], &high[0], &high[1], &high[2], &low[1], &low[2]].map(String::as_str);
    assert_eq!(
        order, expected,
        "low[0] was in flight; then the high lane, then the low lane"
    );
}

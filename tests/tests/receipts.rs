//! Delivery receipts: carriers post them back, authenticated with their own token; ids match
//! however the carrier spells them, and unmatched receipts are counted, not dropped silently.

use serde_json::{Value, json};
use tests::{Answer, FakeCarrier, Gateway, Reply, phone};

const TOKEN: &str = "receipt-token-of-alpha-0123456789";

/// A gateway whose carrier `alpha` answers every submit with `answer` and takes receipts with
/// [`TOKEN`]; a second carrier `beta`, which serves none of the test numbers, has no receipt
/// token.
async fn gateway_with(answer: &'static str) -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::AcceptWithBody(answer)]);
    let unused = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}receipt_token = \"{TOKEN}\"\n{}prefixes = [\"+44\"]\n",
        carrier.config("alpha", 1000, 10),
        unused.config("beta", 1, 1)
    );
    (Gateway::start(&config).await, carrier)
}

/// Starts a verification and waits until its SMS is submitted; returns its id.
async fn submitted(gateway: &Gateway, n: u32) -> String {
    let started = gateway.start_verification(&phone(n)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    gateway.wait_for_delivery(&id, "submitted").await;
    id
}

async fn post_receipt(
    gateway: &Gateway,
    carrier: &str,
    token: Option<&str>,
    body: &[u8],
) -> Answer {
    gateway
        .request_with_bearer(
            http::Method::POST,
            &format!("/v1/carriers/{carrier}/receipts"),
            body.to_vec(),
            token,
        )
        .await
}

async fn receipt(gateway: &Gateway, id: Value, status: &str) -> Answer {
    let body = json!({ "carrier_message_id": id, "status": status, "error_code": null });
    post_receipt(gateway, "alpha", Some(TOKEN), body.to_string().as_bytes()).await
}

/// A delivered receipt moves the SMS to `delivered`, even when the carrier spells its id
/// differently than in its submit answer (case and leading zeros), and is measured.
#[tokio::test]
async fn delivered_receipt_matches_an_odd_spelling() {
    let (gateway, _carrier) = gateway_with(r#"{"carrier_message_id": "00A1F3"}"#).await;
    let id = submitted(&gateway, 1).await;
    let answer = receipt(&gateway, json!("a1f3"), "delivered").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body, json!({ "matched": true }));
    let read = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(read.body["delivery"]["state"], "delivered", "{}", read.text);
    assert_eq!(
        read.body["status"], "pending",
        "delivery says nothing about the code"
    );
    let delivered = r#"otpgate_receipts_total{carrier="alpha",state="delivered"}"#;
    assert_eq!(gateway.metric(delivered).await, Some(1.0));
    let histogram = r#"otpgate_sms_delivery_seconds_count{carrier="alpha"}"#;
    assert_eq!(gateway.metric(histogram).await, Some(1.0));
    let first = r#"otpgate_sms_first_accepted_seconds_count{carrier="alpha"}"#;
    assert_eq!(gateway.metric(first).await, Some(1.0));
    let pace = r#"otpgate_carrier_configured_pace_per_second{carrier="alpha"}"#;
    assert_eq!(gateway.metric(pace).await, Some(1000.0));
    gateway.stop().await.unwrap();
}

/// Hex in the submit answer, a decimal number in the receipt: 0x1F4 is 500.
#[tokio::test]
async fn hex_and_decimal_spellings_match() {
    let (gateway, _carrier) = gateway_with(r#"{"carrier_message_id": "0x1F4"}"#).await;
    let id = submitted(&gateway, 2).await;
    let answer = receipt(&gateway, json!(500), "undeliverable").await;
    assert_eq!(answer.body, json!({ "matched": true }), "{}", answer.text);
    let read = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(read.body["delivery"]["state"], "undeliverable");
    // The verification stays pending: a resend may go by another carrier.
    assert_eq!(read.body["status"], "pending");
    gateway.stop().await.unwrap();
}

/// A receipt for an id nobody sent is answered (so the carrier does not retry it), held in
/// case its submit answer is still on the way, and counted as unmatched once that wait is over.
#[tokio::test]
async fn unmatched_receipts_are_counted() {
    let (gateway, _carrier) = gateway_with(r#"{"carrier_message_id": "abc-1"}"#).await;
    let unmatched = r#"otpgate_receipts_unmatched_total{carrier="alpha"}"#;
    assert_eq!(gateway.metric(unmatched).await, Some(0.0));
    let answer = receipt(&gateway, json!("no-such-id"), "delivered").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, json!({ "matched": false, "held": true }));
    assert_eq!(
        gateway.metric(unmatched).await,
        Some(0.0),
        "held, not yet unmatched"
    );
    gateway.clock.advance(std::time::Duration::from_secs(31));
    gateway.wait_for_metric(unmatched, |n| n == 1.0).await;
    gateway.stop().await.unwrap();
}

/// A fast carrier's receipt can arrive before its answer to the submit: it is held, and
/// applied when the answer names the id.
#[tokio::test]
async fn a_receipt_before_the_submit_answer_is_applied_when_the_answer_comes() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::SlowAnswer(std::time::Duration::from_millis(500))]);
    let config = format!(
        "sweep_interval_ms = 50\n{}receipt_token = \"{TOKEN}\"\n",
        carrier.config("alpha", 1000, 10)
    );
    let gateway = Gateway::start(&config).await;
    let started = gateway.start_verification(&phone(40)).await;
    let id = started.id();
    let sms = carrier.wait_for(1, std::time::Duration::from_secs(5)).await;
    // The carrier answers `cm-<message_id>`; its receipt goes out before that answer.
    let carrier_id = format!("cm-{}", sms[0].message_id);
    let answer = receipt(&gateway, json!(carrier_id), "delivered").await;
    assert_eq!(answer.body, json!({ "matched": false, "held": true }));
    let read = gateway.wait_for_delivery(&id, "delivered").await;
    assert_eq!(read.body["delivery"]["carrier"], "alpha");
    let delivered = r#"otpgate_receipts_total{carrier="alpha",state="delivered"}"#;
    assert_eq!(gateway.metric(delivered).await, Some(1.0));
    let unmatched = r#"otpgate_receipts_unmatched_total{carrier="alpha"}"#;
    assert_eq!(gateway.metric(unmatched).await, Some(0.0));
    gateway.stop().await.unwrap();
}

/// Only the carrier's own token will do, and an unknown carrier name is answered exactly like a
/// known one with a wrong token (same status, same body), so carrier names cannot be probed.
#[tokio::test]
async fn receipts_need_the_carriers_token() {
    let (gateway, _carrier) = gateway_with(r#"{"carrier_message_id": "abc-2"}"#).await;
    let id_2 = submitted(&gateway, 3).await;
    let body = br#"{"carrier_message_id": "abc-2", "status": "delivered"}"#;
    for (carrier, token, status, code) in [
        ("alpha", None, 401, "unauthorized"),
        (
            "alpha",
            Some("receipt-token-of-alpha-wrong"),
            401,
            "unauthorized",
        ),
        ("beta", Some(TOKEN), 401, "unauthorized"),
        ("gamma", Some(TOKEN), 401, "unauthorized"),
        ("gamma", None, 401, "unauthorized"),
    ] {
        let answer = post_receipt(&gateway, carrier, token, body).await;
        assert_eq!(
            answer.status, status,
            "{carrier} {token:?}: {}",
            answer.text
        );
        assert_eq!(answer.error_code(), code);
    }
    let wrong_token = post_receipt(&gateway, "alpha", Some("wrong"), body).await;
    let unknown_name = post_receipt(&gateway, "gamma", Some("wrong"), body).await;
    assert_eq!(
        (unknown_name.status, &unknown_name.body),
        (wrong_token.status, &wrong_token.body),
        "an unknown carrier name is answered like a wrong token"
    );
    let read = gateway.get(&format!("/v1/verifications/{id_2}")).await;
    assert_eq!(
        read.body["delivery"]["state"], "submitted",
        "refused receipts change nothing"
    );
    gateway.stop().await.unwrap();
}

/// Carrier garbage gets a clear 400.
#[tokio::test]
async fn malformed_receipts_are_400() {
    let (gateway, _carrier) = gateway_with(r#"{"carrier_message_id": "abc-3"}"#).await;
    for (body, code) in [
        (&b"{"[..], "malformed_json"),
        (b"not json", "malformed_json"),
        (br#"{"status": "delivered"}"#, "invalid_field"),
        (
            br#"{"carrier_message_id": "abc-3", "status": "lost"}"#,
            "invalid_field",
        ),
        (
            br#"{"carrier_message_id": "", "status": "delivered"}"#,
            "invalid_field",
        ),
        (
            br#"{"carrier_message_id": {"x": 1}, "status": "delivered"}"#,
            "invalid_field",
        ),
        (br#"["abc-3", "delivered"]"#, "invalid_field"),
    ] {
        let answer = post_receipt(&gateway, "alpha", Some(TOKEN), body).await;
        assert_eq!(
            answer.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            answer.text
        );
        assert_eq!(
            answer.error_code(),
            code,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    gateway.stop().await.unwrap();
}

//! The API v1 end to end: a frontend starts a verification, the SMS reaches the carrier in the
//! exact wire format, and the user's code checks out.

use std::time::Duration;

use serde_json::json;
use tests::{FakeCarrier, Gateway, phone};

async fn gateway_with_carrier() -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    let config = format!("sweep_interval_ms = 50\n{}", carrier.config("alpha", 1000, 10));
    (Gateway::start(&config).await, carrier)
}

#[tokio::test]
async fn start_send_check_end_to_end() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(1);
    let started = gateway.start_verification(&number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    assert_eq!(started.body["status"], "pending");
    assert_eq!(started.body["phone"], "+39333****001");
    assert_eq!(started.body["attempts_left"], 5);
    assert_eq!(started.header("location"), Some(format!("/v1/verifications/{id}").as_str()));

    let sms = carrier.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(sms[0].to, number);
    assert_eq!(sms[0].from, "SaluteRL");
    assert_eq!(sms[0].message_id, format!("{id}.1"));
    assert!(sms[0].receipt_url.ends_with("/v1/carriers/alpha/receipts"), "{}", sms[0].receipt_url);
    assert!(carrier.violations().is_empty(), "{:?}", carrier.violations());
    let code = carrier.code_for(&number).expect("a code in the SMS");

    let wrong = if code == "000000" { "111111" } else { "000000" };
    let answer = gateway.check(&id, wrong).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, json!({"valid": false, "status": "pending", "attempts_left": 4}));

    let answer = gateway.check(&id, &code).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, json!({"valid": true, "status": "approved", "attempts_left": 4}));

    let read = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_eq!(read.body["status"], "approved");
    assert_eq!(read.body["delivery"]["state"], "submitted");
    assert_eq!(read.body["delivery"]["carrier"], "alpha");
    assert_eq!(read.body["delivery"]["attempts"], 1);

    let again = gateway.check(&id, &code).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code(), "not_pending");
    gateway.stop().await.unwrap();
}

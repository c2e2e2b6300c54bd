//! The API v1 end to end (docs/DESIGN.md section 3): a frontend starts a verification, the SMS reaches
//! the carrier in the exact wire format, and the user's code checks out; and around that, what
//! frontends rely on: dedup per phone and client, resends of the same code with growing
//! cooldowns, cancel, the attempt limit, idempotency keys, long-polls, API keys and per-client
//! isolation, and the SMS text (locale, app hash, WebOTP line, UCS-2).

use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use tests::{
    Answer, FakeCarrier, Gateway, ReceivedSms, Reply, epoch_ms, extract_code, phone, sha256_hex,
};

use crate::errors::{UNKNOWN_ID, assert_error};

const TIMEOUT: Duration = Duration::from_secs(5);

const KEY_A: &str = "portal-key-0123456789";
const KEY_B: &str = "pharmacies-key-9876543210";

async fn gateway_with_carrier() -> (Gateway, FakeCarrier) {
    gateway_with("").await
}

/// A gateway with one carrier, plus `extra_tables` (TOML tables such as `[limits]`).
///
/// The carrier's window is one, so SMS reach it in queue order; [`assert_no_more_sms`] relies
/// on that.
async fn gateway_with(extra_tables: &str) -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\nshutdown_grace_secs = 5\n{}\n{extra_tables}",
        carrier.config("alpha", 1000, 1)
    );
    (Gateway::start(&config).await, carrier)
}

/// Two clients, A and B, and a per-phone limit loose enough that both may send to one phone.
fn two_clients() -> String {
    format!(
        "[limits]\nphone_sends = [{{ max = 10, per_secs = 30 }}]\n\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\n\n\
         [[clients]]\nname = \"pharmacies\"\napi_key_sha256 = \"{}\"\n",
        sha256_hex(KEY_A),
        sha256_hex(KEY_B)
    )
}

fn path_of(id: &str) -> String {
    format!("/v1/verifications/{id}")
}

/// A six-digit code that is not `code`.
fn wrong_code(code: &str) -> String {
    code.chars()
        .map(|digit| {
            if digit == '9' {
                '0'
            } else {
                char::from(digit as u8 + 1)
            }
        })
        .collect()
}

/// The SMS of one send of a verification (`{id}.{send}` is its message id).
fn sms_of(received: &[ReceivedSms], id: &str, send: u32) -> ReceivedSms {
    let message_id = format!("{id}.{send}");
    received
        .iter()
        .find(|sms| sms.message_id == message_id)
        .unwrap_or_else(|| panic!("no SMS {message_id} among {received:?}"))
        .clone()
}

/// Proves that the carrier got exactly `n_sent` SMS so far and nothing more is on its way: with
/// a window of one, SMS reach the carrier in queue order, so once the SMS of a verification
/// started now arrives, anything queued before it has arrived too.
async fn assert_no_more_sms(
    gateway: &Gateway,
    carrier: &FakeCarrier,
    n_sent: usize,
    barrier: &str,
) {
    let answer = gateway.start_verification(barrier).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let received = carrier.wait_for(n_sent + 1, TIMEOUT).await;
    assert_eq!(received.len(), n_sent + 1, "{received:?}");
    assert_eq!(
        received[n_sent].to, barrier,
        "an SMS arrived that should not have: {received:?}"
    );
}

/// Polls the carrier until it has answered `n` submits, whatever it answered.
async fn wait_for_requests(carrier: &FakeCarrier, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while carrier.n_requests() < n {
        assert!(
            Instant::now() < deadline,
            "carrier saw {} submits, expected {n}",
            carrier.n_requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `body` as a start request with an `Idempotency-Key`.
async fn start_with_key(gateway: &Gateway, key: &str, body: &Value) -> Answer {
    gateway
        .request(
            Method::POST,
            "/v1/verifications",
            Some(body.to_string().into_bytes()),
            &[("idempotency-key", key)],
        )
        .await
}

/// The happy path: 202 at once, one SMS in the wire format, a wrong code costs an attempt, the
/// right one approves, and an approved verification takes no more checks.
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
    assert_eq!(
        started.header("location"),
        Some(format!("/v1/verifications/{id}").as_str())
    );

    let sms = carrier.wait_for(1, TIMEOUT).await;
    assert_eq!(sms[0].to, number);
    assert_eq!(sms[0].from, "SaluteRL");
    assert_eq!(sms[0].message_id, format!("{id}.1"));
    assert!(
        sms[0].receipt_url.ends_with("/v1/carriers/alpha/receipts"),
        "{}",
        sms[0].receipt_url
    );
    assert!(
        carrier.violations().is_empty(),
        "{:?}",
        carrier.violations()
    );
    let code = carrier.code_for(&number).expect("a code in the SMS");

    let wrong = if code == "000000" { "111111" } else { "000000" };
    let answer = gateway.check(&id, wrong).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        json!({"valid": false, "status": "pending", "attempts_left": 4})
    );

    let answer = gateway.check(&id, &code).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        json!({"valid": true, "status": "approved", "attempts_left": 4})
    );

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

/// A second start for a phone with a live verification (the owner in a second tab, or a
/// stranger who typed the number) never learns the live one's id: it gets a verification of its
/// own, carrying the same code, once the phone's send limit allows another SMS. Wrong codes
/// and a cancel through it leave the first exactly as it was, and the first SMS's code works
/// in both.
#[tokio::test]
async fn a_second_caller_gets_its_own_verification_with_the_same_code() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(10);
    let first = gateway.start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let sent = carrier.wait_for(1, TIMEOUT).await;
    let code = extract_code(&sent[0].text).expect("a code in the SMS");

    // At once: the phone had its SMS less than 30 s ago.
    let early = gateway.start_verification(&number).await;
    assert_error(&early, 429, "rate_limited_phone");
    assert!(!early.text.contains(&first.id()), "{}", early.text);

    gateway.clock.advance(Duration::from_secs(31));
    let second = gateway.start_verification(&number).await;
    assert_eq!(second.status, 202, "{}", second.text);
    assert_ne!(second.id(), first.id());
    assert_eq!(second.body["status"], "pending");
    assert_eq!(
        gateway
            .metric(r#"otpgate_verifications_started_total{outcome="sibling"}"#)
            .await,
        Some(1.0)
    );
    let sent = carrier.wait_for(2, TIMEOUT).await;
    let again = sms_of(&sent, &second.id(), 1);
    assert_eq!(extract_code(&again.text).as_deref(), Some(code.as_str()));

    // Its caller can use up its own attempts and cancel it; the first does not notice.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for left in (0..5).rev() {
        let answer = gateway.check(&second.id(), wrong).await;
        assert_eq!(answer.body["attempts_left"], left, "{}", answer.text);
    }
    let canceled = gateway.delete(&path_of(&second.id())).await;
    assert_eq!(canceled.status, 409, "{}", canceled.text);
    let read = gateway.get(&path_of(&first.id())).await;
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    let checked = gateway.check(&first.id(), &code).await;
    assert_eq!(
        checked.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    gateway.stop().await.unwrap();
}

/// A second caller's cancel ends only its own verification, and the first SMS's code approves
/// the second one too.
#[tokio::test]
async fn a_second_callers_cancel_leaves_the_first_and_the_code_works_in_both() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(12);
    let first = gateway.start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let sent = carrier.wait_for(1, TIMEOUT).await;
    let code = extract_code(&sent[0].text).expect("a code in the SMS");
    gateway.clock.advance(Duration::from_secs(31));
    let second = gateway.start_verification(&number).await;
    assert_eq!(second.status, 202, "{}", second.text);
    let third_caller = {
        gateway.clock.advance(Duration::from_secs(31));
        gateway.start_verification(&number).await
    };
    assert_eq!(third_caller.status, 202, "{}", third_caller.text);

    let canceled = gateway.delete(&path_of(&first.id())).await;
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    assert_eq!(canceled.body["status"], "canceled");
    let checked = gateway.check(&second.id(), &code).await;
    assert_eq!(checked.body["valid"], true, "{}", checked.text);
    let read = gateway.get(&path_of(&third_caller.id())).await;
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    gateway.stop().await.unwrap();
}

/// A resend before the cooldown is `429 resend_cooldown` with Retry-After; after it, the
/// verification goes back to `queued`, the same code arrives again, and the next cooldown is
/// twice as long (60 s).
#[tokio::test]
async fn resend_waits_for_its_cooldown_and_sends_the_same_code() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(20);
    let started = gateway.start_verification(&number).await;
    let id = started.id();
    let first = carrier.wait_for(1, TIMEOUT).await;
    let code = extract_code(&first[0].text).expect("a code in the SMS");
    // Received by the carrier is not yet recorded by the gateway: a resend before that finds
    // the SMS still queued and sends nothing new.
    gateway.wait_for_delivery(&id, "submitted").await;
    let resend_path = format!("{}/resend", path_of(&id));

    let early = gateway.post(&resend_path, json!({})).await;
    assert_error(&early, 429, "resend_cooldown");
    let retry_after = early.retry_after().expect("a 429 carries Retry-After");
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        early.header("ratelimit-limit"),
        None,
        "no RateLimit-* for resend_cooldown"
    );

    gateway.clock.advance(Duration::from_secs(31));
    let before_ms = gateway.clock.now_ms();
    let resent = gateway.post(&resend_path, json!({})).await;
    let after_ms = gateway.clock.now_ms();
    assert_eq!(resent.status, 202, "{}", resent.text);
    assert_eq!(resent.id(), id);
    assert_eq!(resent.body["status"], "pending");
    assert_eq!(
        resent.body["delivery"]["state"], "queued",
        "{}",
        resent.text
    );
    let resend_after = epoch_ms(resent.body["resend_after"].as_str().expect("resend_after"));
    assert!(
        (before_ms + 60_000..=after_ms + 60_000).contains(&resend_after),
        "the second cooldown is 60 s: resend_after {resend_after}, now {before_ms}..{after_ms}"
    );

    let received = carrier.wait_for(2, TIMEOUT).await;
    let second = sms_of(&received, &id, 2);
    assert_eq!(second.to, number);
    assert_eq!(
        extract_code(&second.text).as_deref(),
        Some(code.as_str()),
        "the same code again"
    );
    assert_eq!(second.text, first[0].text);

    let again = gateway.post(&resend_path, json!({})).await;
    assert_error(&again, 429, "resend_cooldown");
    let retry_after = again.retry_after().expect("a 429 carries Retry-After");
    assert!(
        (31..=60).contains(&retry_after),
        "the cooldown grew: Retry-After {retry_after}"
    );

    let answer = gateway.check(&id, &code).await;
    assert_eq!(
        answer.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    let read = gateway.get(&path_of(&id)).await;
    assert_eq!(read.body["delivery"]["state"], "submitted", "{}", read.text);
    assert_eq!(read.body["delivery"]["attempts"], 2, "{}", read.text);
    gateway.stop().await.unwrap();
}

/// Starting again once the phone may have another SMS sends the same code, for a verification
/// of the second caller's own; the code approves both.
#[tokio::test]
async fn starting_again_sends_the_same_code_for_a_verification_of_its_own() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(30);
    let first = gateway.start_verification(&number).await;
    let id = first.id();
    carrier.wait_for(1, TIMEOUT).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    // Received by the carrier is not yet recorded by the gateway: a start before that finds
    // the SMS still queued and sends nothing new.
    gateway.wait_for_delivery(&id, "submitted").await;

    gateway.clock.advance(Duration::from_secs(31));
    let again = gateway.start_verification(&number).await;
    assert_eq!(again.status, 202, "{}", again.text);
    assert_ne!(again.id(), id);
    assert_eq!(again.body["delivery"]["state"], "queued", "{}", again.text);

    let received = carrier.wait_for(2, TIMEOUT).await;
    let second = sms_of(&received, &again.id(), 1);
    assert_eq!(
        extract_code(&second.text).as_deref(),
        Some(code.as_str()),
        "the same code again"
    );
    for id in [id, again.id()] {
        let answer = gateway.check(&id, &code).await;
        assert_eq!(answer.body["valid"], true, "{}", answer.text);
    }
    gateway.stop().await.unwrap();
}

/// Cancel answers 200 with `canceled`; from then on check, resend and cancel are
/// `409 not_pending`, and the code no longer works.
#[tokio::test]
async fn cancel_ends_the_verification_for_good() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(40);
    let id = gateway.start_verification(&number).await.id();
    carrier.wait_for(1, TIMEOUT).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");

    let canceled = gateway.delete(&path_of(&id)).await;
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    assert_eq!(canceled.body["id"], id.as_str());
    assert_eq!(canceled.body["status"], "canceled");

    let check = gateway.check(&id, &code).await;
    assert_error(&check, 409, "not_pending");
    assert!(
        check.text.contains("canceled"),
        "the message names the status: {}",
        check.text
    );
    gateway.clock.advance(Duration::from_secs(31));
    let resend = gateway
        .post(&format!("{}/resend", path_of(&id)), json!({}))
        .await;
    assert_error(&resend, 409, "not_pending");
    assert_error(&gateway.delete(&path_of(&id)).await, 409, "not_pending");

    let read = gateway.get(&path_of(&id)).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["status"], "canceled");
    assert_eq!(
        read.body["attempts_left"], 5,
        "a refused check costs nothing: {}",
        read.text
    );

    // A new start for the phone is a new verification, not the canceled one.
    let fresh = gateway.start_verification(&number).await;
    assert_eq!(fresh.status, 202, "{}", fresh.text);
    assert_ne!(fresh.id(), id);
    gateway.stop().await.unwrap();
}

/// A verification canceled while its SMS waits in retry is never sent, even once the carrier
/// would accept it; the dropped job is counted.
#[tokio::test]
async fn a_canceled_verification_whose_sms_is_still_queued_is_never_sent() {
    let (gateway, carrier) = gateway_with_carrier().await;
    // Throttled with Retry-After: 1, so the job sits out a second before its next submit: ample
    // time to cancel between two submits.
    carrier.script(&[Reply::Status(503, Some(1))]);
    let id = gateway.start_verification(&phone(50)).await.id();
    wait_for_requests(&carrier, 1).await;

    let canceled = gateway.delete(&path_of(&id)).await;
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    assert_eq!(
        canceled.body["delivery"]["state"], "queued",
        "{}",
        canceled.text
    );
    carrier.script(&[Reply::Accept]);

    gateway
        .wait_for_metric(
            r#"otpgate_queue_dropped_total{reason="canceled"}"#,
            |value| value >= 1.0,
        )
        .await;
    assert!(carrier.received().is_empty(), "{:?}", carrier.received());
    let read = gateway.get(&path_of(&id)).await;
    assert_eq!(read.body["status"], "canceled", "{}", read.text);
    assert_eq!(
        read.body["delivery"]["carrier"],
        Value::Null,
        "{}",
        read.text
    );
    // The carrier works again, and only the next verification's SMS reaches it.
    assert_no_more_sms(&gateway, &carrier, 0, &phone(51)).await;
    gateway.stop().await.unwrap();
}

/// Five wrong codes fail the verification: the fifth answer is
/// `{"valid":false,"status":"failed","attempts_left":0}`, then checks are 409 and the
/// verification shows `failure_reason: too_many_attempts`.
#[tokio::test]
async fn five_wrong_codes_fail_the_verification() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(60);
    let id = gateway.start_verification(&number).await.id();
    carrier.wait_for(1, TIMEOUT).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let wrong = wrong_code(&code);

    for attempts_left in (1..=4).rev() {
        let answer = gateway.check(&id, &wrong).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(
            answer.body,
            json!({"valid": false, "status": "pending", "attempts_left": attempts_left})
        );
    }
    let last = gateway.check(&id, &wrong).await;
    assert_eq!(last.status, 200, "{}", last.text);
    assert_eq!(
        last.body,
        json!({"valid": false, "status": "failed", "attempts_left": 0})
    );

    // Not even the right code helps now.
    let late = gateway.check(&id, &code).await;
    assert_error(&late, 409, "not_pending");
    assert!(late.text.contains("failed"), "{}", late.text);

    let read = gateway.get(&path_of(&id)).await;
    assert_eq!(read.body["status"], "failed", "{}", read.text);
    assert_eq!(
        read.body["failure_reason"], "too_many_attempts",
        "{}",
        read.text
    );
    assert_eq!(read.body["attempts_left"], 0, "{}", read.text);
    gateway.stop().await.unwrap();
}

/// The same `Idempotency-Key` with the same body replays the verification (same id,
/// `idempotent-replayed: true`) and sends one SMS; with another body it is
/// `422 idempotency_key_reused`.
#[tokio::test]
async fn an_idempotency_key_replays_the_same_request_only() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let body = json!({"phone": phone(70), "locale": "it"});
    let first = start_with_key(&gateway, "order-7", &body).await;
    assert_eq!(first.status, 202, "{}", first.text);
    assert_eq!(first.header("idempotent-replayed"), None);
    carrier.wait_for(1, TIMEOUT).await;

    let replay = start_with_key(&gateway, "order-7", &body).await;
    assert_eq!(replay.status, 202, "{}", replay.text);
    assert_eq!(replay.id(), first.id());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("location"), first.header("location"));

    let other_body = json!({"phone": phone(71)});
    let reused = start_with_key(&gateway, "order-7", &other_body).await;
    assert_error(&reused, 422, "idempotency_key_reused");
    let same_phone_other_locale = json!({"phone": phone(70), "locale": "en"});
    let reused = start_with_key(&gateway, "order-7", &same_phone_other_locale).await;
    assert_error(&reused, 422, "idempotency_key_reused");

    // Neither the replay nor the refusals sent anything, nor started phone 71.
    assert_no_more_sms(&gateway, &carrier, 1, &phone(72)).await;
    assert!(carrier.received().iter().all(|sms| sms.to != phone(71)));
    gateway.stop().await.unwrap();
}

/// Idempotency keys belong to a client: another client using the same key (and body) gets a
/// verification of its own, not a replay and not a 422.
#[tokio::test]
async fn idempotency_keys_are_per_client() {
    let (mut gateway, carrier) = gateway_with(&two_clients()).await;
    let body = json!({"phone": phone(80)});
    gateway.api_key = Some(KEY_A.to_owned());
    let of_a = start_with_key(&gateway, "signup-1", &body).await;
    assert_eq!(of_a.status, 202, "{}", of_a.text);

    gateway.api_key = Some(KEY_B.to_owned());
    let of_b = start_with_key(&gateway, "signup-1", &body).await;
    assert_eq!(of_b.status, 202, "{}", of_b.text);
    assert_ne!(of_b.id(), of_a.id());
    assert_eq!(of_b.header("idempotent-replayed"), None);
    let other = start_with_key(&gateway, "signup-2", &json!({"phone": phone(81)})).await;
    assert_eq!(other.status, 202, "{}", other.text);
    let replay_b = start_with_key(&gateway, "signup-1", &body).await;
    assert_eq!(replay_b.id(), of_b.id());
    assert_eq!(replay_b.header("idempotent-replayed"), Some("true"));

    // B's use of the key did not touch A's.
    gateway.api_key = Some(KEY_A.to_owned());
    let replay_a = start_with_key(&gateway, "signup-1", &body).await;
    assert_eq!(replay_a.id(), of_a.id());
    assert_eq!(replay_a.header("idempotent-replayed"), Some("true"));
    let reused = start_with_key(&gateway, "signup-1", &json!({"phone": phone(82)})).await;
    assert_error(&reused, 422, "idempotency_key_reused");

    let received = carrier.wait_for(3, TIMEOUT).await;
    sms_of(&received, &of_a.id(), 1);
    sms_of(&received, &of_b.id(), 1);
    gateway.stop().await.unwrap();
}

/// `GET …?wait=5` answers as soon as the carrier accepts the SMS, well before the 5 s.
#[tokio::test]
async fn a_long_poll_returns_when_the_sms_is_submitted() {
    let (gateway, carrier) = gateway_with_carrier().await;
    // The carrier holds the submit for a while, so the poll starts while the SMS is in flight.
    carrier.script(&[Reply::Slow(Duration::from_millis(1500))]);
    let id = gateway.start_verification(&phone(90)).await.id();
    wait_for_requests(&carrier, 1).await;

    let started = Instant::now();
    let answer = gateway.get(&format!("{}?wait=5", path_of(&id))).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.body["delivery"]["state"], "submitted",
        "{}",
        answer.text
    );
    assert_eq!(
        answer.body["delivery"]["carrier"], "alpha",
        "{}",
        answer.text
    );
    assert!(
        waited < Duration::from_millis(3500),
        "the poll returned after {waited:?}"
    );
    assert_eq!(carrier.received().len(), 1);
    gateway.stop().await.unwrap();
}

/// `GET …?wait=5` answers as soon as another request cancels the verification.
#[tokio::test]
async fn a_long_poll_returns_when_the_verification_is_canceled() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let id = gateway.start_verification(&phone(100)).await.id();
    carrier.wait_for(1, TIMEOUT).await;
    // Once submitted, nothing changes the verification but the cancel below.
    gateway.wait_for_delivery(&id, "submitted").await;

    let poll = async {
        let started = Instant::now();
        let answer = gateway.get(&format!("{}?wait=5", path_of(&id))).await;
        (answer, started.elapsed())
    };
    let cancel = async {
        // No signal tells that the poll has begun waiting, so give it a head start; a poll that
        // started late would only see the cancel already done and wait out its 5 s, failing the
        // test rather than passing it wrongly.
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateway.delete(&path_of(&id)).await
    };
    let ((answer, waited), canceled) = tokio::join!(poll, cancel);
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["status"], "canceled", "{}", answer.text);
    assert!(
        waited < Duration::from_millis(3500),
        "the poll returned after {waited:?}"
    );
    gateway.stop().await.unwrap();
}

/// A client holds at most `long_polls_per_client` long-polls on an instance: one more is
/// answered at once, as a GET without `?wait=` would, and counted; once they end, a long-poll
/// waits again.
#[tokio::test]
async fn long_polls_are_capped_per_client() {
    let (gateway, carrier) = gateway_with(&format!(
        "[verification]\nlong_polls_per_client = 2\n{}",
        two_clients()
    ))
    .await;
    let gateway = gateway.with_api_key(KEY_A);
    let started = gateway.start_verification(&phone(105)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    carrier.wait_for(1, TIMEOUT).await;
    gateway.wait_for_delivery(&id, "submitted").await;
    let path = format!("{}?wait=3", path_of(&id));
    let poll = || async {
        let started = Instant::now();
        let answer = gateway.get(&path).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        started.elapsed()
    };
    let third = async {
        // The first two have begun waiting by then.
        tokio::time::sleep(Duration::from_millis(500)).await;
        poll().await
    };
    let (first, second, third) = tokio::join!(poll(), poll(), third);
    assert!(first >= Duration::from_millis(2900), "{first:?}");
    assert!(second >= Duration::from_millis(2900), "{second:?}");
    assert!(third < Duration::from_secs(1), "over the cap: {third:?}");
    let refused = r#"otpgate_long_polls_refused_total{client="portal"}"#;
    assert_eq!(gateway.metric(refused).await, Some(1.0));
    assert_eq!(
        gateway
            .metric(r#"otpgate_long_polls_refused_total{client="pharmacies"}"#)
            .await,
        Some(0.0)
    );
    // The slots were given back.
    assert!(poll().await >= Duration::from_millis(2900));
    assert_eq!(gateway.metric(refused).await, Some(1.0));
    gateway.stop().await.unwrap();
}

/// `GET …?wait=1` with nothing changing answers after about a second, unchanged.
#[tokio::test]
async fn a_long_poll_without_a_change_returns_after_its_wait() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let id = gateway.start_verification(&phone(110)).await.id();
    carrier.wait_for(1, TIMEOUT).await;
    let before = gateway.wait_for_delivery(&id, "submitted").await;

    let started = Instant::now();
    let answer = gateway.get(&format!("{}?wait=1", path_of(&id))).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        waited >= Duration::from_millis(900),
        "the poll returned early, after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "the poll returned late, after {waited:?}"
    );
    assert_eq!(answer.body, before.body, "nothing changed");
    gateway.stop().await.unwrap();
}

/// With `[[clients]]` configured, a missing, unknown or malformed API key is `401 unauthorized`
/// on every route, and a valid one works.
#[tokio::test]
async fn api_keys_are_required_when_clients_are_configured() {
    let (mut gateway, carrier) = gateway_with(&two_clients()).await;
    let number = phone(120);
    let unknown = path_of(UNKNOWN_ID);
    for key in [
        None,
        Some("wrong-key"),
        Some(""),
        Some(&KEY_A[..KEY_A.len() - 1]),
    ] {
        gateway.api_key = key.map(str::to_owned);
        assert_error(
            &gateway.start_verification(&number).await,
            401,
            "unauthorized",
        );
        assert_error(&gateway.get(&unknown).await, 401, "unauthorized");
        assert_error(
            &gateway.check(UNKNOWN_ID, "123456").await,
            401,
            "unauthorized",
        );
        assert_error(&gateway.delete(&unknown).await, 401, "unauthorized");
        let resend = gateway.post(&format!("{unknown}/resend"), json!({})).await;
        assert_error(&resend, 401, "unauthorized");
    }
    gateway.api_key = None;
    let basic = format!("Basic {KEY_A}");
    let answer = gateway
        .request(
            Method::POST,
            "/v1/verifications",
            Some(json!({"phone": number}).to_string().into_bytes()),
            &[("authorization", basic.as_str())],
        )
        .await;
    assert_error(&answer, 401, "unauthorized");

    gateway.api_key = Some(KEY_A.to_owned());
    let started = gateway.start_verification(&number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let received = carrier.wait_for(1, TIMEOUT).await;
    assert_eq!(
        received.len(),
        1,
        "only the authenticated start sent an SMS"
    );
    gateway.stop().await.unwrap();
}

/// Client B cannot read, check, resend or cancel client A's verification: each is a 404 with the
/// very body of a truly unknown id, and A's verification is untouched.
#[tokio::test]
async fn a_client_cannot_touch_another_clients_verification() {
    let (mut gateway, carrier) = gateway_with(&two_clients()).await;
    let number = phone(130);
    gateway.api_key = Some(KEY_A.to_owned());
    let id = gateway.start_verification(&number).await.id();
    carrier.wait_for(1, TIMEOUT).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");

    gateway.api_key = Some(KEY_B.to_owned());
    let unknown = gateway.get(&path_of(UNKNOWN_ID)).await;
    assert_error(&unknown, 404, "not_found");
    let answers = [
        gateway.get(&path_of(&id)).await,
        gateway.get(&format!("{}?wait=1", path_of(&id))).await,
        gateway.check(&id, &code).await,
        gateway
            .post(&format!("{}/resend", path_of(&id)), json!({}))
            .await,
        gateway.delete(&path_of(&id)).await,
    ];
    for answer in answers {
        assert_error(&answer, 404, "not_found");
        assert_eq!(
            answer.text, unknown.text,
            "indistinguishable from an unknown id"
        );
    }

    gateway.api_key = Some(KEY_A.to_owned());
    let read = gateway.get(&path_of(&id)).await;
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    assert_eq!(read.body["attempts_left"], 5, "{}", read.text);
    let answer = gateway.check(&id, &code).await;
    assert_eq!(
        answer.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    gateway.stop().await.unwrap();
}

/// The same phone gets a separate verification, SMS and code per client.
#[tokio::test]
async fn the_same_phone_gets_a_verification_per_client() {
    let (mut gateway, carrier) = gateway_with(&two_clients()).await;
    let number = phone(140);
    gateway.api_key = Some(KEY_A.to_owned());
    let of_a = gateway.start_verification(&number).await;
    assert_eq!(of_a.status, 202, "{}", of_a.text);
    gateway.api_key = Some(KEY_B.to_owned());
    let of_b = gateway.start_verification(&number).await;
    assert_eq!(of_b.status, 202, "{}", of_b.text);
    assert_ne!(of_a.id(), of_b.id(), "each client has its own verification");
    // B starting again gets a verification of its own, with B's code, never A's.
    let again_b = gateway.start_verification(&number).await;
    assert_eq!(again_b.status, 202, "{}", again_b.text);
    assert_ne!(again_b.id(), of_b.id());

    let received = carrier.wait_for(3, TIMEOUT).await;
    let code_a = extract_code(&sms_of(&received, &of_a.id(), 1).text).expect("code of A");
    let code_b = extract_code(&sms_of(&received, &of_b.id(), 1).text).expect("code of B");
    let code_again = extract_code(&sms_of(&received, &again_b.id(), 1).text).expect("code");
    assert_eq!(code_again, code_b);
    assert!(received.iter().all(|sms| sms.to == number));

    // Each client approves its own verification with its own code.
    let answer = gateway.check(&of_b.id(), &code_b).await;
    assert_eq!(answer.body["valid"], true, "{}", answer.text);
    gateway.api_key = Some(KEY_A.to_owned());
    let answer = gateway.check(&of_a.id(), &code_a).await;
    assert_eq!(answer.body["valid"], true, "{}", answer.text);
    assert_no_more_sms(&gateway, &carrier, 3, &phone(141)).await;
    gateway.stop().await.unwrap();
}

/// `locale: it` with a web origin and an app hash gives the Italian text, then the app hash on
/// its own line, then the WebOTP line `@portal.example.it #<code>` last.
#[tokio::test]
async fn the_sms_speaks_the_locale_and_carries_app_hash_and_web_otp_lines() {
    let (gateway, carrier) = gateway_with_carrier().await;
    let number = phone(150);
    let body = json!({
        "phone": number,
        "locale": "it",
        "web_origin": "https://portal.example.it",
        "app_hash": "FA+9qCX9VSu",
    });
    let started = gateway.post("/v1/verifications", body).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let received = carrier.wait_for(1, TIMEOUT).await;
    let text = &received[0].text;
    let code = extract_code(text).expect("a code in the SMS");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text:?}");
    assert!(
        lines[0].starts_with(&format!("Il tuo codice di verifica è {code}.")),
        "Italian text: {text:?}"
    );
    assert_eq!(lines[1], "FA+9qCX9VSu", "{text:?}");
    assert_eq!(lines[2], format!("@portal.example.it #{code}"), "{text:?}");
    assert!(
        carrier.violations().is_empty(),
        "{:?}",
        carrier.violations()
    );
    let answer = gateway.check(&started.id(), &code).await;
    assert_eq!(answer.body["valid"], true, "{}", answer.text);
    gateway.stop().await.unwrap();
}

/// With API keys configured, a client's SMS carry only its own web origin and app hash: naming
/// another is refused (the code would bind to someone else's site or app), naming none takes the
/// client's only one, and a client with none configured may name none.
#[tokio::test]
async fn a_client_binds_codes_only_to_its_own_origin_and_app() {
    let clients = format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\n\
         web_origins = [\"https://portal.example.it\"]\napp_hashes = [\"FA+9qCX9VSu\"]\n\n\
         [[clients]]\nname = \"pharmacies\"\napi_key_sha256 = \"{}\"\n",
        sha256_hex(KEY_A),
        sha256_hex(KEY_B)
    );
    let (gateway, carrier) = gateway_with(&clients).await;
    let mut gateway = gateway.with_api_key(KEY_A);
    for (field, value, code) in [
        (
            "web_origin",
            "https://evil.example",
            "web_origin_not_allowed",
        ),
        ("app_hash", "ZZZZZZZZZZZ", "app_hash_not_allowed"),
    ] {
        let refused = gateway
            .post(
                "/v1/verifications",
                json!({ "phone": phone(170), field: value }),
            )
            .await;
        assert_eq!(refused.status, 400, "{}", refused.text);
        assert_eq!(refused.error_code(), code, "{}", refused.text);
    }
    // Naming nothing takes the portal's own: the hash line, then the WebOTP line.
    let started = gateway
        .post("/v1/verifications", json!({ "phone": phone(171) }))
        .await;
    assert_eq!(started.status, 202, "{}", started.text);
    let received = carrier.wait_for(1, TIMEOUT).await;
    let code = extract_code(&received[0].text).expect("a code in the SMS");
    let lines: Vec<&str> = received[0].text.lines().collect();
    assert_eq!(
        lines[1..],
        [
            "FA+9qCX9VSu".to_owned(),
            format!("@portal.example.it #{code}")
        ],
        "{:?}",
        received[0].text
    );
    // The pharmacies' client has none: it may name none.
    gateway.api_key = Some(KEY_B.to_owned());
    let refused = gateway
        .post(
            "/v1/verifications",
            json!({ "phone": phone(172), "web_origin": "https://portal.example.it" }),
        )
        .await;
    assert_eq!(
        refused.error_code(),
        "web_origin_not_allowed",
        "{}",
        refused.text
    );
    assert_eq!(carrier.received().len(), 1, "no SMS for a refused start");
    gateway.stop().await.unwrap();
}

/// A `[templates]` entry that needs UCS-2 (an emoji) reaches the carrier intact and is counted as
/// a UCS-2 segment.
#[tokio::test]
async fn a_ucs2_template_is_sent_intact() {
    let (gateway, carrier) = gateway_with("[templates]\nfr = \"Votre code: {code} 🙂\"\n").await;
    let number = phone(160);
    let started = gateway
        .post(
            "/v1/verifications",
            json!({"phone": number, "locale": "fr"}),
        )
        .await;
    assert_eq!(started.status, 202, "{}", started.text);
    let received = carrier.wait_for(1, TIMEOUT).await;
    let code = extract_code(&received[0].text).expect("a code in the SMS");
    assert_eq!(received[0].text, format!("Votre code: {code} 🙂"));
    assert_eq!(
        gateway
            .metric(r#"otpgate_sms_segments_total{carrier="alpha",encoding="ucs2"}"#)
            .await,
        Some(1.0)
    );
    // Another locale still gets the default English text.
    gateway.start_verification(&phone(161)).await;
    let received = carrier.wait_for(2, TIMEOUT).await;
    assert!(
        received[1].text.starts_with("Your verification code is "),
        "{:?}",
        received[1].text
    );
    gateway.stop().await.unwrap();
}

/// A carrier's 2xx is an acceptance even when its body is garbage: the SMS is not sent again
/// (that would be a duplicate), and the verification moves to `submitted`.
#[tokio::test]
async fn a_2xx_with_a_garbage_body_is_an_acceptance() {
    let carrier = FakeCarrier::start().await;
    carrier.script(&[Reply::AcceptWithBody("<html>ok</html>")]);
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let gateway = Gateway::start(&config).await;
    let started = gateway.start_verification(&phone(900)).await;
    let id = started.id();
    gateway.wait_for_delivery(&id, "submitted").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(carrier.n_requests(), 1, "the SMS was submitted again");
    assert_eq!(
        gateway
            .metric(r#"otpgate_sms_submitted_total{carrier="alpha",outcome="accepted"}"#)
            .await,
        Some(1.0)
    );
    gateway.stop().await.unwrap();
}

/// Reads carry an `ETag`; a long-poll with a stale `If-None-Match` answers at once (the change
/// it would wait for already happened), and one with the current ETag waits for the next.
#[tokio::test]
async fn long_polls_with_an_etag_never_miss_a_change() {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        carrier.config("alpha", 1000, 10)
    );
    let gateway = Gateway::start(&config).await;
    let started = gateway.start_verification(&phone(950)).await;
    let id = started.id();
    let path = format!("/v1/verifications/{id}");
    let first = gateway.get(&path).await;
    let first_etag = first.header("etag").expect("an ETag").to_owned();
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    let current_etag = submitted.header("etag").expect("an ETag").to_owned();
    assert_ne!(first_etag, current_etag, "the version moved with the state");

    let began = Instant::now();
    let stale = gateway
        .request(
            Method::GET,
            &format!("{path}?wait=5"),
            None,
            &[("if-none-match", &first_etag)],
        )
        .await;
    assert_eq!(stale.status, 200);
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a stale ETag answers at once"
    );
    assert_eq!(stale.header("etag"), Some(current_etag.as_str()));

    let began = Instant::now();
    let waited = gateway
        .request(
            Method::GET,
            &format!("{path}?wait=1"),
            None,
            &[("if-none-match", &current_etag)],
        )
        .await;
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "the current ETag waits for a change"
    );
    assert_eq!(waited.header("etag"), Some(current_etag.as_str()));
    gateway.stop().await.unwrap();
}

/// SMS pumping's favourite numbers get no code by default: a UK personal number (070, priced by
/// its owner) is refused as a type, a satellite phone (+881) as belonging to no country; both
/// are allowed when configured.
#[tokio::test]
async fn personal_and_satellite_numbers_get_codes_only_when_configured() {
    const PERSONAL: &str = "+447012345678";
    const SATELLITE: &str = "+881631234567";
    let (gateway, _carrier) = gateway_with_carrier().await;
    let personal = gateway.start_verification(PERSONAL).await;
    assert_error(&personal, 400, "invalid_phone");
    assert!(personal.text.contains("personal"), "{}", personal.text);
    let satellite = gateway.start_verification(SATELLITE).await;
    assert_error(&satellite, 403, "country_not_allowed");
    let mobile = gateway.start_verification("+447911123456").await;
    assert_eq!(mobile.status, 202, "{}", mobile.text);
    gateway.stop().await.unwrap();

    let (gateway, carrier) =
        gateway_with("[limits]\nnon_geographic = true\nnumber_types = [\"mobile\", \"personal\"]")
            .await;
    for number in [PERSONAL, SATELLITE] {
        let started = gateway.start_verification(number).await;
        assert_eq!(started.status, 202, "{number}: {}", started.text);
    }
    carrier.wait_for(2, TIMEOUT).await;
    gateway.stop().await.unwrap();
}

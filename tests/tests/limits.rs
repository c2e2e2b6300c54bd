//! The limits of docs/DESIGN.md section 4, end to end: sends per phone (1 per 30 s and 5 per 10
//! minutes by default, resends included), verifications per citizen IP, requests per client,
//! wrong codes per phone across verifications, and the country allow-list.
//!
//! Every refusal is checked as a frontend sees it (status, error code, `Retry-After` and the
//! `RateLimit-*` headers) and as a dashboard sees it (`otpgate_ratelimit_rejections_total` by
//! limit). Time moves with `gateway.clock.advance`, which governor's limiters follow too.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{Answer, FakeCarrier, Gateway, phone, sha256_hex};

/// Upper bound on any wait for the gateway to reach a state; never a fixed delay.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway with a fast fake carrier, a 50 ms sweeper and `extra` config (top-level tables
/// such as `[limits]` or `[[clients]]`).
pub(crate) async fn gateway_with(extra: &str) -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{extra}\n{}",
        carrier.config("alpha", 1000, 10)
    );
    (Gateway::start(&config).await, carrier)
}

/// Starts a verification with this body and, if given, this API key.
async fn start(gateway: &Gateway, body: Value, key: Option<&str>) -> Answer {
    let bearer = key.map(|key| format!("Bearer {key}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect();
    gateway
        .request(
            http::Method::POST,
            "/v1/verifications",
            Some(body.to_string().into_bytes()),
            &headers,
        )
        .await
}

/// Starts a verification for `number` on behalf of the citizen at `client_ip`.
async fn start_from_ip(gateway: &Gateway, number: &str, client_ip: &str) -> Answer {
    start(
        gateway,
        json!({ "phone": number, "client_ip": client_ip }),
        None,
    )
    .await
}

/// Sends a request with the API key `key`.
pub(crate) async fn send_as(
    gateway: &Gateway,
    method: http::Method,
    path: &str,
    body: Option<Value>,
    key: &str,
) -> Answer {
    let bearer = format!("Bearer {key}");
    let body = body.map(|body| body.to_string().into_bytes());
    gateway
        .request(method, path, body, &[("authorization", bearer.as_str())])
        .await
}

/// Cancels a verification and checks that it worked.
async fn cancel(gateway: &Gateway, id: &str) {
    let answer = gateway.delete(&format!("/v1/verifications/{id}")).await;
    assert_eq!(answer.status, 200, "cancel: {}", answer.text);
    assert_eq!(answer.body["status"], "canceled");
}

/// How many requests `limit` has turned away.
pub(crate) async fn rejections(gateway: &Gateway, limit: &str) -> f64 {
    gateway
        .registered_metric(&format!(
            "otpgate_ratelimit_rejections_total{{limit=\"{limit}\"}}"
        ))
        .await
}

/// A code of the right length that differs from `code`.
pub(crate) fn wrong_code(code: &str) -> &'static str {
    if code == "000000" { "111111" } else { "000000" }
}

/// Asserts a 429 from `code` whose `RateLimit-*` headers name the rule `policy` ("max;w=secs").
pub(crate) fn assert_rate_limited(answer: &Answer, code: &str, policy: &str) {
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.error_code(), code, "{}", answer.text);
    let retry_after = answer.retry_after().expect("a whole-second Retry-After");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert_eq!(
        answer.header("ratelimit-policy"),
        Some(policy),
        "{:?}",
        answer.headers
    );
    let max = policy.split(';').next().unwrap_or_default();
    assert_eq!(answer.header("ratelimit-limit"), Some(max));
    assert_eq!(answer.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        answer.header("ratelimit-reset"),
        Some(retry_after.to_string().as_str())
    );
}

/// A phone gets one send per 30 s: a restart after a cancel is refused with the 30-second rule
/// and its headers, another phone is unaffected, and 30 s later the phone may send again.
#[tokio::test]
async fn phone_gets_one_send_per_30_seconds() {
    let (gateway, _carrier) = gateway_with("").await;
    let number = phone(101);
    let first = gateway.start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    cancel(&gateway, &first.id()).await;

    let refused = gateway.start_verification(&number).await;
    assert_rate_limited(&refused, "rate_limited_phone", "1;w=30");
    let retry_after = refused.retry_after().unwrap_or_default();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(rejections(&gateway, "phone").await, 1.0);

    let other = gateway.start_verification(&phone(102)).await;
    assert_eq!(
        other.status, 202,
        "another phone is not limited: {}",
        other.text
    );

    gateway.clock.advance(Duration::from_secs(30));
    let again = gateway.start_verification(&number).await;
    assert_eq!(again.status, 202, "30 s later: {}", again.text);
    assert_ne!(again.id(), first.id());
}

/// The 10-minute rule is a bucket of five sends that refills one every two minutes (GCRA, as
/// governor and the redis back-end define a quota): five sends 30 s apart empty it, the one that
/// refilled at 120 s allows a sixth at 150 s, and a seventh at 180 s is refused by the 10-minute
/// rule until the next refill at 240 s.
#[tokio::test]
async fn phone_gets_a_bucket_of_five_sends_per_10_minutes() {
    let (gateway, _carrier) = gateway_with("").await;
    let number = phone(111);
    for send in 1..=6 {
        let started = gateway.start_verification(&number).await;
        assert_eq!(started.status, 202, "send {send}: {}", started.text);
        cancel(&gateway, &started.id()).await;
        gateway.clock.advance(Duration::from_secs(30));
    }

    // 180 s after the first send: the 30-second rule allows it, the 10-minute bucket is empty.
    let seventh = gateway.start_verification(&number).await;
    assert_eq!(
        seventh.status, 429,
        "a seventh send at 180 s: {}",
        seventh.text
    );
    assert_rate_limited(&seventh, "rate_limited_phone", "5;w=600");
    let retry_after = seventh.retry_after().unwrap_or_default();
    assert!(
        (31..=60).contains(&retry_after),
        "the bucket refills at 240 s: Retry-After {retry_after}"
    );

    // At the refill, the phone may send again.
    gateway.clock.advance(Duration::from_secs(retry_after));
    let later = gateway.start_verification(&number).await;
    assert_eq!(later.status, 202, "after the refill: {}", later.text);
}

/// A refused start is not a send: hammering a rate-limited phone does not use up its 10-minute
/// budget, so the next send 30 s later goes through.
#[tokio::test]
async fn refused_starts_do_not_use_up_the_phone_budget() {
    let (gateway, _carrier) = gateway_with("").await;
    let number = phone(121);
    let first = gateway.start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    cancel(&gateway, &first.id()).await;
    for attempt in 1..=5 {
        let refused = gateway.start_verification(&number).await;
        assert_eq!(refused.status, 429, "attempt {attempt}: {}", refused.text);
        assert_eq!(refused.error_code(), "rate_limited_phone");
    }

    gateway.clock.advance(Duration::from_secs(30));
    let second = gateway.start_verification(&number).await;
    assert_eq!(
        second.status, 202,
        "one SMS was sent 30 s ago and the refused attempts sent nothing: {} {:?}",
        second.text, second.headers
    );
}

/// A resend counts against the phone's limit like a first SMS: after a resend, a new
/// verification for the same phone is refused by the 30-second rule. The resend carries the
/// same code.
#[tokio::test]
async fn resends_count_against_the_phone_limit() {
    let (gateway, carrier) = gateway_with("").await;
    let number = phone(131);
    let started = gateway.start_verification(&number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    gateway.wait_for_delivery(&id, "submitted").await;
    let code = carrier.code_for(&number).expect("a code in the first SMS");

    // The resend cooldown and the 30-second rule have both passed.
    gateway.clock.advance(Duration::from_secs(30));
    let resent = gateway
        .post(&format!("/v1/verifications/{id}/resend"), json!({}))
        .await;
    assert_eq!(resent.status, 202, "{}", resent.text);
    carrier.wait_for(2, PATIENCE).await;
    assert_eq!(
        carrier.code_for(&number),
        Some(code),
        "a resend sends the same code"
    );

    cancel(&gateway, &id).await;
    let refused = gateway.start_verification(&number).await;
    assert_rate_limited(&refused, "rate_limited_phone", "1;w=30");
}

/// Verifications per citizen IP with no clients configured (local development): the body's
/// `client_ip` is the key, another IP is unaffected, and without `client_ip` the peer address
/// (127.0.0.1) is the key.
#[tokio::test]
async fn citizen_ip_is_limited() {
    let (gateway, _carrier) =
        gateway_with("[limits]\nip_sends = [{ max = 3, per_secs = 3600 }]").await;
    for n in 1..=3 {
        let started = start_from_ip(&gateway, &phone(200 + n), "203.0.113.7").await;
        assert_eq!(started.status, 202, "phone {n}: {}", started.text);
    }
    let refused = start_from_ip(&gateway, &phone(204), "203.0.113.7").await;
    assert_rate_limited(&refused, "rate_limited_ip", "3;w=3600");

    // Another citizen is unaffected, and the refused start did not charge the phone.
    let other_ip = start_from_ip(&gateway, &phone(204), "203.0.113.8").await;
    assert_eq!(other_ip.status, 202, "{}", other_ip.text);

    for n in 5..=7 {
        let started = gateway.start_verification(&phone(200 + n)).await;
        assert_eq!(
            started.status, 202,
            "phone {n} from the peer address: {}",
            started.text
        );
    }
    let refused = gateway.start_verification(&phone(208)).await;
    assert_rate_limited(&refused, "rate_limited_ip", "3;w=3600");
    let same_key = start_from_ip(&gateway, &phone(208), "127.0.0.1").await;
    assert_rate_limited(&same_key, "rate_limited_ip", "3;w=3600");

    assert_eq!(rejections(&gateway, "ip").await, 3.0);
    assert_eq!(rejections(&gateway, "phone").await, 0.0);
}

/// A client's config with its API key `k-<name>` and `extra` keys (such as `citizen_ip`).
pub(crate) fn client(name: &str, extra: &str) -> String {
    format!(
        "[[clients]]\nname = \"{name}\"\napi_key_sha256 = \"{}\"\n{extra}\n",
        sha256_hex(&format!("k-{name}"))
    )
}

/// Starts a verification as the client with API key `key`, with this body and these headers.
pub(crate) async fn start_as(
    gateway: &Gateway,
    key: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> Answer {
    let bearer = format!("Bearer {key}");
    let mut all = vec![("authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    gateway
        .request(
            http::Method::POST,
            "/v1/verifications",
            Some(body.to_string().into_bytes()),
            &all,
        )
        .await
}

/// How many starts of `client` came without a citizen address.
async fn starts_without_citizen_ip(gateway: &Gateway, client: &str) -> f64 {
    gateway
        .registered_metric(&format!(
            "otpgate_starts_without_citizen_ip_total{{client=\"{client}\"}}"
        ))
        .await
}

/// A frontend that omits `client_ip` does not get all its citizens throttled together under its
/// own address (the sign-up failure this gateway exists to prevent): by default such starts are
/// not limited per IP, and are counted by client. Those that send `client_ip` are limited by it.
#[tokio::test]
async fn a_client_that_omits_client_ip_does_not_throttle_its_citizens_together() {
    let config = format!(
        "[limits]\nip_sends = [{{ max = 3, per_secs = 3600 }}]\n{}{}",
        client("portal", ""),
        client("doctors", "")
    );
    let (gateway, _carrier) = gateway_with(&config).await;
    for n in 1..=10 {
        let started = start_as(
            &gateway,
            "k-portal",
            json!({ "phone": phone(1100 + n) }),
            &[],
        )
        .await;
        assert_eq!(started.status, 202, "start {n}: {}", started.text);
    }
    assert_eq!(starts_without_citizen_ip(&gateway, "portal").await, 10.0);
    assert_eq!(starts_without_citizen_ip(&gateway, "doctors").await, 0.0);
    assert_eq!(rejections(&gateway, "ip").await, 0.0);

    for n in 1..=3 {
        let body = json!({ "phone": phone(1120 + n), "client_ip": "203.0.113.20" });
        let started = start_as(&gateway, "k-portal", body, &[]).await;
        assert_eq!(started.status, 202, "start {n}: {}", started.text);
    }
    let body = json!({ "phone": phone(1124), "client_ip": "203.0.113.20" });
    let refused = start_as(&gateway, "k-portal", body, &[]).await;
    assert_rate_limited(&refused, "rate_limited_ip", "3;w=3600");
    assert_eq!(starts_without_citizen_ip(&gateway, "portal").await, 10.0);
}

/// A client with `citizen_ip = "body"` must send `client_ip`: without it a start is a clear 400
/// that starts nothing.
#[tokio::test]
async fn a_client_with_citizen_ip_body_must_send_client_ip() {
    let (gateway, carrier) = gateway_with(&client("portal", "citizen_ip = \"body\"")).await;
    let refused = start_as(&gateway, "k-portal", json!({ "phone": phone(1201) }), &[]).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.error_code(), "missing_client_ip");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("client_ip")),
        "{}",
        refused.text
    );
    let body = json!({ "phone": phone(1201), "client_ip": "203.0.113.30" });
    let started = start_as(&gateway, "k-portal", body, &[]).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let received = carrier.wait_for(1, PATIENCE).await;
    assert_eq!(received.len(), 1, "the refused start sent nothing");
}

/// A client with `citizen_ip = "header"` is limited by the right-most address of its header that
/// is not a trusted proxy; the body's `client_ip` does not stand in for it, and another client
/// sending the same header is not limited by it.
#[tokio::test]
async fn a_client_with_citizen_ip_header_is_limited_by_its_proxy_header() {
    let config = format!(
        "[limits]\nip_sends = [{{ max = 3, per_secs = 3600 }}]\n{}{}",
        client(
            "portal",
            "citizen_ip = \"header\"\ncitizen_ip_header = \"X-Forwarded-For\"\n\
             citizen_ip_trusted_proxies = [\"10.0.0.0/8\"]"
        ),
        client("doctors", "")
    );
    let (gateway, _carrier) = gateway_with(&config).await;
    // The left-most entry is the citizen's side's to write: it changes nothing.
    for (n, spoofed) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .iter()
        .enumerate()
    {
        let forwarded = format!("{spoofed}, 203.0.113.40, 10.1.2.3");
        let started = start_as(
            &gateway,
            "k-portal",
            json!({ "phone": phone(1301 + n as u32) }),
            &[("x-forwarded-for", forwarded.as_str())],
        )
        .await;
        assert_eq!(started.status, 202, "start {n}: {}", started.text);
    }
    let refused = start_as(
        &gateway,
        "k-portal",
        json!({ "phone": phone(1304), "client_ip": "192.0.2.99" }),
        &[("x-forwarded-for", "203.0.113.40, 10.9.9.9")],
    )
    .await;
    assert_rate_limited(&refused, "rate_limited_ip", "3;w=3600");
    let other = start_as(
        &gateway,
        "k-portal",
        json!({ "phone": phone(1304) }),
        &[("x-forwarded-for", "203.0.113.41, 10.9.9.9")],
    )
    .await;
    assert_eq!(other.status, 202, "{}", other.text);

    let missing = start_as(
        &gateway,
        "k-portal",
        json!({ "phone": phone(1305), "client_ip": "192.0.2.99" }),
        &[],
    )
    .await;
    assert_eq!(missing.status, 400, "{}", missing.text);
    assert_eq!(missing.error_code(), "missing_client_ip");

    // Only the portal's header is read: the doctors' client sends none of its own.
    let doctors = start_as(
        &gateway,
        "k-doctors",
        json!({ "phone": phone(1306) }),
        &[("x-forwarded-for", "203.0.113.40")],
    )
    .await;
    assert_eq!(doctors.status, 202, "{}", doctors.text);
    assert_eq!(starts_without_citizen_ip(&gateway, "doctors").await, 1.0);
    assert_eq!(rejections(&gateway, "ip").await, 1.0);
}

/// A client with `citizen_ip = "none"` is not limited per IP, whatever `client_ip` it sends, and
/// its starts are not counted as missing an address.
#[tokio::test]
async fn a_client_with_citizen_ip_none_is_not_limited_per_ip() {
    let config = format!(
        "[limits]\nip_sends = [{{ max = 2, per_secs = 3600 }}]\n{}",
        client("callcenter", "citizen_ip = \"none\"")
    );
    let (gateway, _carrier) = gateway_with(&config).await;
    for n in 1..=5 {
        let body = json!({ "phone": phone(1400 + n), "client_ip": "203.0.113.50" });
        let started = start_as(&gateway, "k-callcenter", body, &[]).await;
        assert_eq!(started.status, 202, "start {n}: {}", started.text);
    }
    assert_eq!(rejections(&gateway, "ip").await, 0.0);
    assert_eq!(starts_without_citizen_ip(&gateway, "callcenter").await, 0.0);
}

/// IPv6 citizens are limited by their /64 (`ipv6_prefix`): a fresh address in the same /64 is
/// refused once the /64 has used its starts, another /64 is unaffected.
#[tokio::test]
async fn ipv6_addresses_are_limited_by_their_64() {
    let (gateway, _carrier) =
        gateway_with("[limits]\nip_sends = [{ max = 3, per_secs = 3600 }]").await;
    for n in 1..=3 {
        let address = format!("2001:db8:1:2::{n}");
        let started = start_from_ip(&gateway, &phone(1500 + n), &address).await;
        assert_eq!(started.status, 202, "{address}: {}", started.text);
    }
    let refused = start_from_ip(&gateway, &phone(1504), "2001:db8:1:2:ffff:1:2:3").await;
    assert_rate_limited(&refused, "rate_limited_ip", "3;w=3600");
    let other = start_from_ip(&gateway, &phone(1504), "2001:db8:1:3::1").await;
    assert_eq!(other.status, 202, "another /64: {}", other.text);
}

/// `ipv6_prefix = 128` limits each IPv6 address on its own.
#[tokio::test]
async fn ipv6_prefix_sets_how_addresses_are_grouped() {
    let (gateway, _carrier) =
        gateway_with("[limits]\nip_sends = [{ max = 1, per_secs = 3600 }]\nipv6_prefix = 128")
            .await;
    for n in 1..=3 {
        let address = format!("2001:db8:1:2::{n}");
        let started = start_from_ip(&gateway, &phone(1600 + n), &address).await;
        assert_eq!(started.status, 202, "{address}: {}", started.text);
    }
    let refused = start_from_ip(&gateway, &phone(1604), "2001:db8:1:2::1").await;
    assert_rate_limited(&refused, "rate_limited_ip", "1;w=3600");
}

/// A client (API key) is held to its `rate_per_sec`: a burst is refused with 429 and
/// `Retry-After`, and a second later the client may start again.
#[tokio::test]
async fn client_is_held_to_its_rate() {
    let clients = format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 2\n",
        sha256_hex("k-portal")
    );
    let (gateway, _carrier) = gateway_with(&clients).await;
    let portal = Some("k-portal");

    let mut refused = None;
    let mut n_accepted = 0;
    for n in 1..=40 {
        let answer = start(&gateway, json!({ "phone": phone(300 + n) }), portal).await;
        match answer.status {
            202 => n_accepted += 1,
            429 => {
                refused = Some(answer);
                break;
            }
            other => panic!("unexpected {other}: {}", answer.text),
        }
    }
    assert!(
        n_accepted >= 2,
        "a burst of the rate is allowed, got {n_accepted}"
    );
    let refused = refused.expect("a burst over 2 per second is refused");
    assert_rate_limited(&refused, "rate_limited_client", "2;w=1");
    assert_eq!(rejections(&gateway, "client").await, 1.0);

    gateway.clock.advance(Duration::from_secs(1));
    let later = start(&gateway, json!({ "phone": phone(399) }), portal).await;
    assert_eq!(later.status, 202, "a second later: {}", later.text);

    // A missing or unknown key is a 401, not a rate limit.
    let unknown = start(&gateway, json!({ "phone": phone(398) }), Some("k-nobody")).await;
    assert_eq!(unknown.status, 401, "{}", unknown.text);
    let missing = gateway.start_verification(&phone(398)).await;
    assert_eq!(missing.status, 401, "{}", missing.text);
    assert_eq!(rejections(&gateway, "client").await, 1.0);
}

/// Wrong codes are limited per phone across verifications: after 3 wrong codes even the right
/// code is refused without being compared, and the phone gets no SMS (no resend, no new
/// verification) until the window passes.
#[tokio::test]
async fn failed_checks_lock_the_phone_across_verifications() {
    let extra = "[verification]\nmax_attempts = 5\ncode_ttl_secs = 7200\n\
                 [limits]\nfailed_checks_per_phone = { max = 3, per_secs = 3600 }";
    let (gateway, carrier) = gateway_with(extra).await;
    let number = phone(401);
    let first = gateway.start_verification(&number).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let first_id = first.id();
    carrier.wait_for(1, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let wrong = wrong_code(&code);
    for attempts_left in [4, 3, 2] {
        let answer = gateway.check(&first_id, wrong).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(
            answer.body,
            json!({"valid": false, "status": "pending", "attempts_left": attempts_left})
        );
    }

    let locked = gateway.check(&first_id, &code).await;
    assert_rate_limited(&locked, "too_many_failed_checks", "3;w=3600");
    assert!(locked.retry_after().unwrap_or_default() <= 3600);
    // The code was never compared: the verification is still pending, no attempt was used.
    let read = gateway.get(&format!("/v1/verifications/{first_id}")).await;
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    assert_eq!(read.body["attempts_left"], 2);
    assert_eq!(
        gateway
            .registered_metric("otpgate_verification_checks_total{outcome=\"locked\"}")
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .registered_metric("otpgate_verification_checks_total{outcome=\"valid\"}")
            .await,
        0.0
    );

    // While the phone is locked it gets no SMS: a new verification is refused, and so is a
    // resend of a live one.
    // (Past the resend cooldown, so that only the lock can refuse it.)
    gateway.clock.advance(Duration::from_secs(31));
    let resend = gateway
        .post(&format!("/v1/verifications/{first_id}/resend"), json!({}))
        .await;
    assert_rate_limited(&resend, "too_many_failed_checks", "3;w=3600");
    cancel(&gateway, &first_id).await;
    let refused = gateway.start_verification(&number).await;
    assert_rate_limited(&refused, "too_many_failed_checks", "3;w=3600");
    assert!(refused.retry_after().unwrap_or_default() <= 3600);
    assert_eq!(carrier.received().len(), 1, "no SMS to a locked phone");

    // Past the window, a new verification is sent, and its code works.
    gateway.clock.advance(Duration::from_secs(3600));
    let second = gateway.start_verification(&number).await;
    assert_eq!(second.status, 202, "{}", second.text);
    let second_id = second.id();
    carrier.wait_for(2, PATIENCE).await;
    let second_code = carrier.code_for(&number).expect("a code in the second SMS");
    let approved = gateway.check(&second_id, &second_code).await;
    assert_eq!(approved.status, 200, "{}", approved.text);
    assert_eq!(
        approved.body,
        json!({"valid": true, "status": "approved", "attempts_left": 5})
    );
    // The locked check, the resend and the start.
    assert_eq!(rejections(&gateway, "failed_checks").await, 3.0);

    // An unknown id gets the same 404 whatever it looks like, even one in the phone's shard.
    let tail = if second_id.ends_with("00") {
        "11"
    } else {
        "00"
    };
    let same_shard = format!("{}{tail}", &second_id[..30]);
    let unknown_ids = [
        "00000000000000000000000000000000".to_owned(),
        "0123456789abcdef0123456789abcdef".to_owned(),
        same_shard,
        format!("{second_id}0"),
        "not-an-id".to_owned(),
    ];
    let mut bodies = Vec::new();
    for unknown in &unknown_ids {
        let answer = gateway.check(unknown, &second_code).await;
        assert_eq!(answer.status, 404, "{unknown}: {}", answer.text);
        assert_eq!(answer.error_code(), "not_found");
        bodies.push(answer.text);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );
}

/// The country allow-list refuses numbers of other countries with 403 and counts them.
#[tokio::test]
async fn country_allow_list_refuses_other_countries() {
    let (gateway, _carrier) = gateway_with("[limits]\ncountries = [\"IT\"]").await;
    let refused = gateway.start_verification("+12015550123").await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert_eq!(refused.error_code(), "country_not_allowed");
    assert_eq!(rejections(&gateway, "country").await, 1.0);

    let allowed = gateway.start_verification(&phone(501)).await;
    assert_eq!(allowed.status, 202, "{}", allowed.text);
    assert_eq!(rejections(&gateway, "country").await, 1.0);
}

/// With clients configured and no country allow-list, `/readyz` points out that every region is
/// allowed (the SMS pumping risk) and stays ready; with a list it does not.
#[tokio::test]
async fn readyz_points_out_that_every_region_is_allowed() {
    let clients = format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\n",
        sha256_hex("k-portal")
    );
    let (open, _carrier) = gateway_with(&clients).await;
    let ready = open.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let countries = &ready.body["checks"]["countries"];
    assert_eq!(countries["ok"], true, "{}", ready.text);
    assert_eq!(countries["all_regions_allowed"], true, "{}", ready.text);
    assert!(countries["warning"].is_string(), "{}", ready.text);

    let (listed, _carrier) =
        gateway_with(&format!("[limits]\ncountries = [\"IT\"]\n{clients}")).await;
    let ready = listed.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let countries = &ready.body["checks"]["countries"];
    assert_eq!(countries["all_regions_allowed"], false, "{}", ready.text);
    assert!(countries.get("warning").is_none(), "{}", ready.text);
}

/// Limiter memory stays bounded: the sweeper drops per-phone limiter keys once their limits
/// have fully recovered.
#[tokio::test]
async fn limiter_keys_are_swept() {
    if tests::testing_redis() {
        // Embedded only: on Redis, limit keys expire on their own (PX) and
        // the gateway keeps no limiter keys to sweep.
        return;
    }
    let (gateway, _carrier) = gateway_with("").await;
    let n_phones = 50;
    for n in 0..n_phones {
        let started = gateway.start_verification(&phone(600 + n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
    }
    let series = "otpgate_ratelimit_keys{limit=\"phone\"}";
    // One key per phone in each of the two default phone rules.
    gateway
        .wait_for_metric(series, |keys| keys == f64::from(2 * n_phones))
        .await;

    gateway.clock.advance(Duration::from_secs(11 * 60));
    gateway.wait_for_metric(series, |keys| keys == 0.0).await;
}

/// Wrong codes lock a phone only while they are consecutive: the right code resets the count,
/// so the owner's typos spread over several sign-ups never add up to a lock-out.
#[tokio::test]
async fn the_right_code_resets_the_phones_wrong_codes() {
    let extra = "[limits]\nfailed_checks_per_phone = { max = 3, per_secs = 3600 }";
    let (gateway, carrier) = gateway_with(extra).await;
    let number = phone(451);
    for round in 1..=3 {
        let started = gateway.start_verification(&number).await;
        assert_eq!(started.status, 202, "{}", started.text);
        let id = started.id();
        carrier.wait_for(round, PATIENCE).await;
        let code = carrier.code_for(&number).expect("a code in the SMS");
        // Two typos each time: six in all, twice the limit, but never three in a row.
        for _ in 0..2 {
            let typo = gateway.check(&id, wrong_code(&code)).await;
            assert_eq!(typo.body["valid"], false, "{}", typo.text);
        }
        let approved = gateway.check(&id, &code).await;
        assert_eq!(approved.status, 200, "round {round}: {}", approved.text);
        assert_eq!(
            approved.body["valid"], true,
            "round {round}: {}",
            approved.text
        );
        gateway.clock.advance(Duration::from_secs(31));
    }
    assert_eq!(rejections(&gateway, "failed_checks").await, 0.0);
}

/// `country_sends` caps the verifications started to one country's numbers, whatever the
/// client or citizen (a velocity limit against SMS pumping); other countries are not touched.
#[tokio::test]
async fn a_country_velocity_limit_caps_starts_to_its_numbers() {
    let extra = "[limits]\ncountry_sends = [{ max = 2, per_secs = 3600 }]";
    let (gateway, carrier) = gateway_with(extra).await;
    for n in 0..2 {
        let started = start_from_ip(&gateway, &phone(461 + n), &format!("198.51.100.{n}")).await;
        assert_eq!(started.status, 202, "{}", started.text);
    }
    let refused = start_from_ip(&gateway, &phone(463), "198.51.100.9").await;
    assert_rate_limited(&refused, "rate_limited_country", "2;w=3600");
    // A British number is another country's.
    let british = start_from_ip(&gateway, "+447911123456", "198.51.100.10").await;
    assert_eq!(british.status, 202, "{}", british.text);
    carrier.wait_for(3, PATIENCE).await;
    assert_eq!(carrier.received().len(), 3, "no SMS for the refused start");
    assert_eq!(rejections(&gateway, "country_rate").await, 1.0);
}

/// Rejections are counted by the limit that refused, each in its own series.
#[tokio::test]
async fn rejections_are_counted_by_limit() {
    let clients = format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 1000\n\
         [[clients]]\nname = \"tiny\"\napi_key_sha256 = \"{}\"\nrate_per_sec = 1\n",
        sha256_hex("k-portal"),
        sha256_hex("k-tiny")
    );
    let extra = format!(
        "[limits]\nip_sends = [{{ max = 2, per_secs = 3600 }}]\ncountries = [\"IT\"]\n\
         failed_checks_per_phone = {{ max = 1, per_secs = 3600 }}\n{clients}"
    );
    let (gateway, carrier) = gateway_with(&extra).await;
    let limits = [
        "phone",
        "ip",
        "client",
        "failed_checks",
        "resend_cooldown",
        "country",
    ];
    for limit in limits {
        assert_eq!(
            rejections(&gateway, limit).await,
            0.0,
            "{limit} on a fresh gateway"
        );
    }
    let portal = Some("k-portal");

    let answer = start(&gateway, json!({ "phone": "+12015550123" }), portal).await;
    assert_eq!(answer.status, 403, "country: {}", answer.text);

    let number = phone(701);
    let first = start(
        &gateway,
        json!({ "phone": number, "client_ip": "198.51.100.1" }),
        portal,
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.text);
    let id = first.id();
    let resend_path = format!("/v1/verifications/{id}/resend");
    let answer = send_as(&gateway, http::Method::POST, &resend_path, None, "k-portal").await;
    assert_eq!(answer.status, 429, "resend cooldown: {}", answer.text);
    assert_eq!(answer.error_code(), "resend_cooldown");
    assert!(answer.retry_after().unwrap_or_default() >= 1);

    carrier.wait_for(1, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let check_path = format!("/v1/verifications/{id}/check");
    let answer = send_as(
        &gateway,
        http::Method::POST,
        &check_path,
        Some(json!({ "code": wrong_code(&code) })),
        "k-portal",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = send_as(
        &gateway,
        http::Method::POST,
        &check_path,
        Some(json!({ "code": code })),
        "k-portal",
    )
    .await;
    assert_eq!(answer.status, 429, "failed checks: {}", answer.text);

    let answer = send_as(
        &gateway,
        http::Method::DELETE,
        &format!("/v1/verifications/{id}"),
        None,
        "k-portal",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    // Another phone, sent to once, cancelled and started again within 30 s.
    let sent_once = phone(705);
    let answer = start(
        &gateway,
        json!({ "phone": sent_once, "client_ip": "198.51.100.2" }),
        portal,
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let cancel_path = format!("/v1/verifications/{}", answer.id());
    let answer = send_as(
        &gateway,
        http::Method::DELETE,
        &cancel_path,
        None,
        "k-portal",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = start(
        &gateway,
        json!({ "phone": sent_once, "client_ip": "198.51.100.4" }),
        portal,
    )
    .await;
    assert_eq!(answer.status, 429, "phone: {}", answer.text);
    assert_eq!(answer.error_code(), "rate_limited_phone");

    for n in [702, 703] {
        let answer = start(
            &gateway,
            json!({ "phone": phone(n), "client_ip": "198.51.100.3" }),
            portal,
        )
        .await;
        assert_eq!(answer.status, 202, "{}", answer.text);
    }
    let answer = start(
        &gateway,
        json!({ "phone": phone(704), "client_ip": "198.51.100.3" }),
        portal,
    )
    .await;
    assert_eq!(answer.error_code(), "rate_limited_ip", "{}", answer.text);

    // A burst from the client allowed 1 per second; each from its own citizen IP.
    let mut statuses = Vec::new();
    for n in 0..10 {
        let body =
            json!({ "phone": phone(710 + n), "client_ip": format!("198.51.100.{}", 10 + n) });
        let answer = start(&gateway, body, Some("k-tiny")).await;
        statuses.push(answer.status);
        if answer.status == 429 {
            assert_eq!(
                answer.error_code(),
                "rate_limited_client",
                "{}",
                answer.text
            );
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&202), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");

    for limit in limits {
        assert_eq!(rejections(&gateway, limit).await, 1.0, "{limit}");
    }
}

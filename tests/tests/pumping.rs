//! Defences against SMS pumping (toll fraud), end to end: velocity limits per number prefix,
//! SMS budgets per client and per country, the conversion monitor (fraud guard), and the
//! counts by country on `/metrics`.
//!
//! Test numbers are Italian mobiles from `tests::phone` (`+39333` and seven digits), so with
//! the default 7-digit prefix `phone(0)` … `phone(99_999)` share the prefix `3933300`.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{Answer, FakeCarrier, Gateway, phone};

/// Upper bound on any wait for the gateway to reach a state; never a fixed delay.
const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway with a fast fake carrier, a 50 ms sweeper and `extra` config.
async fn gateway_with(extra: &str) -> (Gateway, FakeCarrier) {
    let carrier = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{extra}\n{}",
        carrier.config("alpha", 1000, 10)
    );
    (Gateway::start(&config).await, carrier)
}

/// Starts a verification for `number` on behalf of the citizen at `client_ip`, with `key`.
async fn start(gateway: &Gateway, number: &str, client_ip: &str, key: Option<&str>) -> Answer {
    let body: Value = json!({ "phone": number, "client_ip": client_ip });
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

/// How many requests `limit` has turned away.
async fn rejections(gateway: &Gateway, limit: &str) -> f64 {
    gateway
        .registered_metric(&format!(
            "otpgate_ratelimit_rejections_total{{limit=\"{limit}\"}}"
        ))
        .await
}

/// A 429 with this code and a `Retry-After`.
fn assert_refused(answer: &Answer, code: &str) {
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.error_code(), code, "{}", answer.text);
    assert!(
        answer.retry_after().is_some_and(|secs| secs >= 1),
        "{:?}",
        answer.headers
    );
}

/// Walking a range (`+39 333 00…`) meets `prefix_sends`, while a number of another range of the
/// same country still starts; an hour later the range may send again.
#[tokio::test]
async fn walking_a_prefix_is_rate_limited_and_its_neighbours_are_not() {
    let extra = "[limits]\nprefix_sends = [{ max = 3, per_secs = 3600 }]";
    let (gateway, carrier) = gateway_with(extra).await;
    for n in 0..3 {
        let started = start(&gateway, &phone(501 + n), &format!("198.51.100.{n}"), None).await;
        assert_eq!(started.status, 202, "{}", started.text);
    }
    let refused = start(&gateway, &phone(504), "198.51.100.9", None).await;
    assert_refused(&refused, "rate_limited_prefix");
    assert_eq!(refused.header("ratelimit-policy"), Some("3;w=3600"));
    // Another range of the same country: +39 333 12…
    let neighbour = start(&gateway, "+393331234567", "198.51.100.10", None).await;
    assert_eq!(neighbour.status, 202, "{}", neighbour.text);
    carrier.wait_for(4, PATIENCE).await;
    assert_eq!(carrier.received().len(), 4, "no SMS for the refused start");
    assert_eq!(rejections(&gateway, "prefix_rate").await, 1.0);

    gateway.clock.advance(Duration::from_secs(1200));
    let later = start(&gateway, &phone(505), "198.51.100.11", None).await;
    assert_eq!(
        later.status, 202,
        "a third of an hour later: {}",
        later.text
    );
}

/// Two clients, `portal` with an SMS budget of `budget` (TOML) and `other` without one.
fn two_clients(budget: &str) -> String {
    format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\nsms_budget = {budget}\n\
         [[clients]]\nname = \"other\"\napi_key_sha256 = \"{}\"\n",
        tests::sha256_hex("k-portal"),
        tests::sha256_hex("k-other"),
    )
}

/// A client's budget refuses its starts once spent, and its resends too, while another client
/// still sends; each refusal is counted by scope and send.
#[tokio::test]
async fn a_clients_sms_budget_refuses_once_spent_and_spares_other_clients() {
    let (gateway, carrier) = gateway_with(&two_clients("{ max = 2, per_secs = 86400 }")).await;
    let first = start(&gateway, &phone(601), "198.51.100.1", Some("k-portal")).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let second = start(&gateway, &phone(602), "198.51.100.2", Some("k-portal")).await;
    assert_eq!(second.status, 202, "{}", second.text);
    let refused = start(&gateway, &phone(603), "198.51.100.3", Some("k-portal")).await;
    assert_refused(&refused, "budget_exhausted");
    assert_eq!(refused.header("ratelimit-policy"), Some("2;w=86400"));
    let other = start(&gateway, &phone(604), "198.51.100.4", Some("k-other")).await;
    assert_eq!(
        other.status, 202,
        "another client still sends: {}",
        other.text
    );
    carrier.wait_for(3, PATIENCE).await;

    // A resend of the portal's verification, past its cooldown, is an SMS too.
    gateway.clock.advance(Duration::from_secs(31));
    let path = format!("/v1/verifications/{}/resend", first.id());
    let bearer = "Bearer k-portal";
    let resend = gateway
        .request(
            http::Method::POST,
            &path,
            None,
            &[("authorization", bearer)],
        )
        .await;
    assert_refused(&resend, "budget_exhausted");
    assert_eq!(
        carrier.received().len(),
        3,
        "no SMS for the refused start or resend"
    );
    let refusals = |send: &str| {
        format!("otpgate_sms_budget_refusals_total{{scope=\"client\",send=\"{send}\"}}")
    };
    assert_eq!(gateway.registered_metric(&refusals("first")).await, 1.0);
    assert_eq!(gateway.registered_metric(&refusals("resend")).await, 1.0);
    assert_eq!(rejections(&gateway, "budget").await, 2.0);

    // The budget refills one SMS every 12 hours.
    gateway.clock.advance(Duration::from_secs(43_200));
    let later = start(&gateway, &phone(605), "198.51.100.5", Some("k-portal")).await;
    assert_eq!(later.status, 202, "{}", later.text);
    carrier.wait_for(4, PATIENCE).await;
}

/// A country's budget counts every client's SMS to its numbers; other countries are spared.
#[tokio::test]
async fn a_countrys_sms_budget_counts_every_clients_sms() {
    let extra = format!(
        "[limits]\ncountry_budgets = {{ IT = {{ max = 1, per_secs = 3600 }} }}\n{}",
        two_clients("{ max = 100, per_secs = 3600 }")
    );
    let (gateway, carrier) = gateway_with(&extra).await;
    let first = start(&gateway, &phone(611), "198.51.100.1", Some("k-portal")).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let refused = start(&gateway, &phone(612), "198.51.100.2", Some("k-other")).await;
    assert_refused(&refused, "budget_exhausted");
    let british = start(&gateway, "+447911123456", "198.51.100.3", Some("k-other")).await;
    assert_eq!(british.status, 202, "{}", british.text);
    carrier.wait_for(2, PATIENCE).await;
    let series = "otpgate_sms_budget_refusals_total{scope=\"country\",send=\"first\"}";
    assert_eq!(gateway.registered_metric(series).await, 1.0);
}

/// A fraud guard that judges after five endings, blocks under 10% for ten minutes and slows
/// under 30%.
const GUARD: &str = "[fraud_guard]\nmin_volume = 5\nblock_below = 0.1\nslow_below = 0.3\n\
                     cool_off_secs = 600\nslowed_sends = { max = 1, per_secs = 600 }\n";

/// Starts `number` and waits for its SMS to be accepted; returns the verification id.
async fn sent(gateway: &Gateway, carrier: &FakeCarrier, number: &str, n: usize) -> String {
    let started = start(gateway, number, &format!("198.51.100.{n}"), None).await;
    assert_eq!(started.status, 202, "{}", started.text);
    carrier.wait_for(n + 1, PATIENCE).await;
    started.id()
}

/// A prefix whose delivered codes are never typed is blocked (`429 fraud_suspected`, with the
/// cool-off as `Retry-After`) while the rest of the country, which converts, still starts; after
/// the cool-off it is slowed, not blocked. Country counts follow on `/metrics`.
#[tokio::test]
async fn the_fraud_guard_blocks_a_prefix_whose_codes_are_never_typed() {
    let (gateway, carrier) = gateway_with(GUARD).await;
    // The country converts: five approvals in +39 333 12…
    for n in 0..5 {
        let number = format!("+3933312000{n:02}");
        let id = sent(&gateway, &carrier, &number, n).await;
        let code = carrier.code_for(&number).expect("a code");
        let checked = gateway.check(&id, &code).await;
        assert_eq!(checked.body["valid"], true, "{}", checked.text);
    }
    // Five SMS to +39 333 00… that nobody types: canceled unused.
    for n in 0..5 {
        let id = sent(&gateway, &carrier, &phone(701 + n as u32), 5 + n).await;
        let canceled = gateway.delete(&format!("/v1/verifications/{id}")).await;
        assert_eq!(canceled.status, 200, "{}", canceled.text);
    }
    let refused = start(&gateway, &phone(710), "198.51.100.50", None).await;
    assert_refused(&refused, "fraud_suspected");
    let retry_after = refused.retry_after().unwrap_or_default();
    assert!(
        (590..=600).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let elsewhere = start(&gateway, "+39333120099", "198.51.100.51", None).await;
    assert_eq!(
        elsewhere.status, 202,
        "the rest of the country: {}",
        elsewhere.text
    );
    gateway
        .wait_for_metric("otpgate_fraud_guard_blocked{scope=\"prefix\"}", |v| {
            v == 1.0
        })
        .await;
    let country = |name: &str| format!("{name}{{country=\"IT\"}}");
    assert_eq!(
        gateway
            .registered_metric(&country("otpgate_fraud_guard_refusals_total"))
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .registered_metric(&country("otpgate_country_verifications_started_total"))
            .await,
        11.0
    );
    assert_eq!(
        gateway
            .registered_metric(&country("otpgate_country_verifications_approved_total"))
            .await,
        5.0
    );
    carrier.wait_for(11, PATIENCE).await;
    gateway
        .wait_for_metric(&country("otpgate_country_sms_sent_total"), |v| v == 11.0)
        .await;
    assert_eq!(
        gateway
            .registered_metric("otpgate_country_sms_sent_total{country=\"GB\"}")
            .await,
        0.0
    );

    // After the cool-off: slowed to one start per ten minutes, then refused again.
    gateway.clock.advance(Duration::from_secs(600));
    let probation = start(&gateway, &phone(711), "198.51.100.52", None).await;
    assert_eq!(probation.status, 202, "{}", probation.text);
    let slowed = start(&gateway, &phone(712), "198.51.100.53", None).await;
    assert_refused(&slowed, "fraud_suspected");
}

/// A carrier outage collapses conversion too, but nobody received a code: those endings are
/// not judged, and starts to the country go on.
#[tokio::test]
async fn the_fraud_guard_does_not_block_when_the_carrier_never_delivers() {
    let (gateway, carrier) = gateway_with(GUARD).await;
    carrier.script(&[tests::Reply::Status(500, None)]);
    let mut ids = Vec::new();
    for n in 0..8 {
        let started = start(&gateway, &phone(801 + n), &format!("198.51.100.{n}"), None).await;
        assert_eq!(started.status, 202, "{}", started.text);
        ids.push(started.id());
    }
    carrier.wait_for_submits(5, PATIENCE).await;
    // Their codes run out unsent (past the code's time and the longest queueing extension).
    gateway.clock.advance(Duration::from_secs(1600));
    for id in &ids {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while gateway.read(id).await.body["status"] != "expired" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} did not expire"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    carrier.script(&[tests::Reply::Accept]);
    let after = start(&gateway, &phone(820), "198.51.100.60", None).await;
    assert_eq!(after.status, 202, "{}", after.text);
    assert_eq!(rejections(&gateway, "fraud_guard").await, 0.0);
}

/// A second caller's start for a phone with a live verification sends an SMS of its own: that
/// spends the budgets too, and a spent budget refuses it, sending nothing.
#[tokio::test]
async fn a_second_callers_start_spends_the_budget() {
    let (gateway, carrier) = gateway_with(&two_clients("{ max = 1, per_secs = 86400 }")).await;
    let number = phone(901);
    let first = start(&gateway, &number, "198.51.100.1", Some("k-portal")).await;
    assert_eq!(first.status, 202, "{}", first.text);
    carrier.wait_for(1, PATIENCE).await;
    gateway.clock.advance(Duration::from_secs(31));
    let again = start(&gateway, &number, "198.51.100.1", Some("k-portal")).await;
    assert_eq!(again.status, 429, "{}", again.text);
    assert_eq!(again.error_code(), "budget_exhausted", "{}", again.text);
    let series = "otpgate_sms_budget_refusals_total{scope=\"client\",send=\"first\"}";
    assert_eq!(gateway.registered_metric(series).await, 1.0);
    // Another client's start is sent, and only then is the count of SMS read.
    let other = start(&gateway, &phone(902), "198.51.100.2", Some("k-other")).await;
    assert_eq!(other.status, 202, "{}", other.text);
    carrier.wait_for(2, PATIENCE).await;
    let to_number = carrier
        .received()
        .iter()
        .filter(|sms| sms.to == number)
        .count();
    assert_eq!(to_number, 1, "no second SMS past the budget");
}

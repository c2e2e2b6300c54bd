//! Delivery-aware dispatch: receipts, not acceptance, decide whether a citizen got the code.
//!
//! Real fake carriers over HTTP that accept at once and deliver late, or never, posting their
//! `delivered` receipts back to the gateway when the SMS reaches the handset, and an SMSC
//! nobody on this team wrote (the npm SMSC, tests/src/npm_smsc.rs) that does the same over
//! SMPP; users who read their code on the handset and type it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tests::npm_smsc::{NpmSmsc, NpmSmscOptions, require_npm_smsc};
use tests::{FakeCarrier, Gateway, phone};

const LATE_TOKEN: &str = "receipt-token-of-the-late-carrier";
const PROMPT_TOKEN: &str = "receipt-token-of-the-prompt-carrier";

/// A user: starts a verification for `phone(n)`, waits for the code on the handset
/// (`handset(phone)`, the code that has reached it, if one has), types it, and says whether it
/// was accepted; a failure says which step failed (`start:`, `handset:` or `check:`).
async fn user(
    gateway: &Gateway,
    handset: impl Fn(&str) -> Option<String>,
    n: u32,
) -> Result<(), String> {
    let started = gateway.start_verification(&phone(n)).await;
    if started.status != 202 {
        return Err(format!("start: {} {}", started.status, started.text));
    }
    let id = started.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let code = loop {
        if let Some(code) = handset(&phone(n)) {
            break code;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("handset: no SMS reached it".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let checked = gateway.check(&id, &code).await;
    if checked.status == 200 && checked.body["valid"] == true {
        Ok(())
    } else {
        Err(format!("check: {} {}", checked.status, checked.text))
    }
}

/// Two carriers as in the case that found the failure: the busier one (weight 3) accepts at
/// once and delivers 45 s later; codes live 20 s, sessions stretch by up to 40 s.
async fn late_and_prompt(verification: &str) -> (Arc<Gateway>, FakeCarrier, FakeCarrier) {
    let late = FakeCarrier::start().await;
    late.deliver(Duration::from_secs(45), LATE_TOKEN);
    let prompt = FakeCarrier::start().await;
    prompt.deliver(Duration::ZERO, PROMPT_TOKEN);
    let config = format!(
        "sweep_interval_ms = 100\n[verification]\ncode_ttl_secs = 20\nmax_extension_secs = 40\n\
         {verification}\n\
         {}receipt_token = \"{LATE_TOKEN}\"\nweight = 3\n\
         {}receipt_token = \"{PROMPT_TOKEN}\"\nweight = 1\n",
        late.config("late", 100, 20),
        prompt.config("prompt", 100, 20),
    );
    (Arc::new(Gateway::start(&config).await), late, prompt)
}

/// The code on `phone`'s handset from either carrier.
fn either(late: &FakeCarrier, prompt: &FakeCarrier) -> impl HandsetOf {
    let (late, prompt) = (late.clone(), prompt.clone());
    move |phone: &str| {
        late.handset_code_for(phone)
            .or_else(|| prompt.handset_code_for(phone))
    }
}

/// Where users read their codes: the code that has reached a phone's handset, if any has.
trait HandsetOf: Fn(&str) -> Option<String> + Clone + Send + Sync + 'static {}
impl<F: Fn(&str) -> Option<String> + Clone + Send + Sync + 'static> HandsetOf for F {}

/// Forty users arrive over four seconds; each must be able to verify with the first code it
/// gets, though most of them get it from a late carrier 45 s after the request, when a code
/// counted from acceptance would have been dead for 25 s. Returns the failures.
async fn forty_users(gateway: &Arc<Gateway>, handset: impl HandsetOf) -> Vec<String> {
    let mut users = tokio::task::JoinSet::new();
    for n in 0..40u32 {
        let (gateway, handset) = (gateway.clone(), handset.clone());
        users.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100) * n).await;
            user(&gateway, handset, n).await
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = users.join_next().await {
        if let Err(failure) = done.expect("user task") {
            failures.push(failure);
        }
    }
    failures
}

#[tokio::test]
async fn codes_a_carrier_delivers_late_still_work() {
    let (gateway, late, prompt) = late_and_prompt("").await;
    let failures = forty_users(&gateway, either(&late, &prompt)).await;
    let by_late = late.received().len();
    assert!(
        by_late >= 15,
        "the late carrier sent {by_late} SMS: the test needs it to carry most"
    );
    assert!(
        failures.len() <= 2,
        "{} of 40 users could not verify with their first code: {failures:?}",
        failures.len()
    );
    // The gateway saw the lag: acceptance to delivered receipt, per carrier.
    let all = r#"otpgate_carrier_delivery_seconds_count{carrier="late"}"#;
    gateway.wait_for_metric(all, |n| n >= by_late as f64).await;
    let slow = gateway
        .metric(r#"otpgate_carrier_delivery_seconds_bucket{carrier="late",le="30"}"#)
        .await;
    assert_eq!(
        slow,
        Some(0.0),
        "no late-carrier SMS was delivered within 30 s"
    );
    assert!(late.violations().is_empty(), "{:?}", late.violations());
    stop(gateway).await;
}

/// The same day with the code's clock fixed at acceptance and no reroutes: the codes the late
/// carrier delivers arrive dead. This is the failure the defence above prevents.
#[tokio::test]
async fn with_the_clock_fixed_at_acceptance_late_codes_arrive_dead() {
    let (gateway, late, prompt) =
        late_and_prompt("expiry_follows_delivery = false\nreroutes = 0\n").await;
    let failures = forty_users(&gateway, either(&late, &prompt)).await;
    let by_late = late.received().len();
    assert!(by_late >= 15, "the late carrier sent {by_late} SMS");
    assert!(
        failures.len() >= by_late - 2,
        "only {} of the {by_late} users served by the late carrier failed",
        failures.len()
    );
    stop(gateway).await;
}

async fn stop(gateway: Arc<Gateway>) {
    let Ok(gateway) = Arc::try_unwrap(gateway) else {
        panic!("a user still holds the gateway");
    };
    gateway.stop().await.unwrap();
}

/// An SMPP carrier as late as the HTTP one above, on the npm SMSC: it answers every submit_sm at
/// once, and the SMS reaches the handset 45 s later, its `deliver_sm` receipt 20 ms after that
/// (within the default 60 s receipt timeout, set here all the same: no receipt goes missing, no
/// SMS is rerouted). It is the only carrier, so every user depends on it. Codes live 20 s,
/// sessions stretch by up to 40 s.
async fn late_smsc(verification: &str) -> (Arc<Gateway>, Arc<NpmSmsc>) {
    let smsc = Arc::new(NpmSmsc::start(NpmSmscOptions {
        delivery_delay: Duration::from_secs(45),
        ..NpmSmscOptions::default()
    }));
    let config = format!(
        "sweep_interval_ms = 100\n[verification]\ncode_ttl_secs = 20\nmax_extension_secs = 40\n\
         {verification}\n\
         [[carriers]]\nname = \"late-smsc\"\nkind = \"smpp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         system_id = \"otpgate\"\npassword = \"secret12\"\npace_per_sec = 100\nwindow = 10\n\
         timeout_ms = 2000\nenquire_link_secs = 5\nreceipt_timeout_ms = 60000\n",
        smsc.port()
    );
    (Arc::new(Gateway::start(&config).await), smsc)
}

/// The code on `phone`'s handset from the npm SMSC.
fn from_smsc(smsc: &Arc<NpmSmsc>) -> impl HandsetOf {
    let smsc = smsc.clone();
    move |phone: &str| smsc.handset_code_for(phone)
}

/// Over SMPP, an SMSC that accepts at once and delivers 45 s later: the codes, on the handsets
/// 25 s after a code counted from acceptance would have died, still work, and the gateway
/// measured the lag from the `deliver_sm` receipts.
#[tokio::test]
async fn codes_an_smsc_delivers_late_still_work() {
    if !require_npm_smsc() {
        return;
    }
    let (gateway, smsc) = late_smsc("").await;
    let failures = forty_users(&gateway, from_smsc(&smsc)).await;
    assert!(
        failures.len() <= 2,
        "{} of 40 users could not verify with their first code: {failures:?}\n{}",
        failures.len(),
        smsc.dump()
    );
    // One SMS each, none rerouted or resent, each on its handset 45 s after acceptance.
    assert_eq!(smsc.messages().len(), 40, "{}", smsc.dump());
    assert_eq!(smsc.handsets().len(), 40, "{}", smsc.dump());
    // The gateway saw the lag: acceptance to the deliver_sm receipt, every SMS, none within 30 s.
    let all = r#"otpgate_carrier_delivery_seconds_count{carrier="late-smsc"}"#;
    gateway.wait_for_metric(all, |n| n == 40.0).await;
    let slow = gateway
        .metric(r#"otpgate_carrier_delivery_seconds_bucket{carrier="late-smsc",le="30"}"#)
        .await;
    assert_eq!(slow, Some(0.0), "no SMS was delivered within 30 s");
    let missing = r#"otpgate_carrier_receipts_missing_total{carrier="late-smsc"}"#;
    assert_eq!(gateway.metric(missing).await, Some(0.0));
    let acked = smsc.events_of("receipt_acked");
    assert_eq!(acked.len(), 40, "{}", smsc.dump());
    assert!(acked.iter().all(|event| event["status"] == 0), "{acked:#?}");
    assert!(smsc.errors().is_empty(), "{}", smsc.dump());
    stop(gateway).await;
}

/// The same SMSC with the code's clock fixed at acceptance and no reroutes: every code reaches
/// its handset dead, and every user fails at the check. This is the failure the defence above
/// prevents over SMPP.
#[tokio::test]
async fn with_the_clock_fixed_at_acceptance_an_smsc_delivers_late_codes_dead() {
    if !require_npm_smsc() {
        return;
    }
    let (gateway, smsc) = late_smsc("expiry_follows_delivery = false\nreroutes = 0\n").await;
    let failures = forty_users(&gateway, from_smsc(&smsc)).await;
    assert_eq!(smsc.handsets().len(), 40, "{}", smsc.dump());
    assert_eq!(
        failures.len(),
        40,
        "{} of 40 users failed: a code 45 s old, dead at 20 s, was accepted",
        failures.len()
    );
    assert!(
        failures
            .iter()
            .all(|failure| failure.starts_with("check: ")),
        "every code reached its handset and was refused: {failures:?}"
    );
    stop(gateway).await;
}

/// A carrier that accepts and never delivers: after its receipt timeout the same code goes by
/// the other carrier, without spending the user's resend cooldown; after enough missing
/// receipts the carrier is `lagging`, and new SMS go to the carrier that delivers.
#[tokio::test]
async fn missing_receipts_reroute_the_same_code_and_route_away() {
    let silent = FakeCarrier::start().await;
    silent.deliver(Duration::from_secs(3600), LATE_TOKEN);
    let prompt = FakeCarrier::start().await;
    prompt.deliver(Duration::ZERO, PROMPT_TOKEN);
    // A reroute spends a send of the phone's limits: with a receipt timeout of a second, the
    // default one-per-30-s rule would refuse it (see `reroutes_respect_the_phone_limits`).
    let config = format!(
        "sweep_interval_ms = 50\n[limits]\nphone_sends = [{{ max = 10, per_secs = 600 }}]\n\
         {}receipt_token = \"{LATE_TOKEN}\"\nreceipt_timeout_ms = 1000\nweight = 1000\n\
         {}receipt_token = \"{PROMPT_TOKEN}\"\nweight = 1\n",
        silent.config("silent", 100, 20),
        prompt.config("prompt", 100, 20),
    );
    let gateway = Gateway::start(&config).await;

    // One verification, sent by the silent carrier (a thousand to one): rerouted.
    let started = gateway.start_verification(&phone(1)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    let id = started.id();
    silent.wait_for(1, Duration::from_secs(5)).await;
    let submitted = gateway.wait_for_delivery(&id, "submitted").await;
    let resend_after = submitted.body["resend_after"].clone();
    assert_eq!(submitted.body["delivery"]["carrier"], "silent");
    assert!(submitted.body["delivery"]["lag_seconds"].is_number());
    let delivered = gateway.wait_for_delivery(&id, "delivered").await;
    assert_eq!(delivered.body["delivery"]["carrier"], "prompt");
    assert_eq!(
        delivered.body["resend_after"], resend_after,
        "a reroute does not spend the user's resend cooldown"
    );
    let sent_first = tests::extract_code(&silent.received()[0].text);
    let code = prompt.handset_code_for(&phone(1));
    assert!(
        code.is_some() && code == sent_first,
        "the same code goes again"
    );
    let checked = gateway.check(&id, &code.unwrap()).await;
    assert_eq!(checked.body["valid"], true, "{}", checked.text);
    let rerouted = r#"otpgate_carrier_rerouted_total{carrier="silent"}"#;
    assert_eq!(gateway.metric(rerouted).await, Some(1.0));
    let missing = r#"otpgate_carrier_receipts_missing_total{carrier="silent"}"#;
    assert_eq!(gateway.metric(missing).await, Some(1.0));

    // Seven more missing receipts in a row: the silent carrier is lagging.
    for n in 2..=8 {
        let started = gateway.start_verification(&phone(n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        gateway.wait_for_delivery(&started.id(), "delivered").await;
    }
    let lagging = r#"otpgate_carrier_delivery_state{carrier="silent",state="lagging"}"#;
    gateway.wait_for_metric(lagging, |v| v == 1.0).await;
    let ready = gateway.admin_get("/readyz").await;
    assert_eq!(
        ready.status, 200,
        "a lagging carrier does not make the gateway unready"
    );
    let each = &ready.body["checks"]["carriers"]["each"];
    assert_eq!(each[0]["delivery"]["state"], "lagging", "{}", ready.text);
    assert_eq!(each[1]["delivery"]["state"], "ok", "{}", ready.text);

    // New SMS now go to the carrier that delivers, a thousand-to-one weight notwithstanding
    // (but for a probe now and then, one in twenty, and the one it may have been waiting for
    // when it started lagging).
    let sent_by_silent = silent.received().len();
    for n in 9..=18 {
        let started = gateway.start_verification(&phone(n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        gateway.wait_for_delivery(&started.id(), "delivered").await;
    }
    let probes = silent.received().len() - sent_by_silent;
    assert!(
        probes <= 2,
        "the lagging carrier took {probes} of 10 new SMS"
    );
    gateway.stop().await.unwrap();
}

/// A reroute is an SMS to the phone like any other: when the phone's send limits refuse it, it
/// is not sent, and counted.
#[tokio::test]
async fn reroutes_respect_the_phone_limits() {
    let silent = FakeCarrier::start().await;
    silent.deliver(Duration::from_secs(3600), LATE_TOKEN);
    let prompt = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n\
         {}receipt_token = \"{LATE_TOKEN}\"\nreceipt_timeout_ms = 500\nweight = 1000\n{}",
        silent.config("silent", 100, 20),
        prompt.config("prompt", 100, 20),
    );
    let gateway = Gateway::start(&config).await;
    let started = gateway.start_verification(&phone(1)).await;
    assert_eq!(started.status, 202, "{}", started.text);
    silent.wait_for(1, Duration::from_secs(5)).await;
    let limited = r#"otpgate_carrier_reroutes_skipped_total{carrier="silent",reason="limited"}"#;
    gateway.wait_for_metric(limited, |n| n == 1.0).await;
    let read = gateway
        .get(&format!("/v1/verifications/{}", started.id()))
        .await;
    assert_eq!(read.body["delivery"]["state"], "submitted", "{}", read.text);
    assert!(
        prompt.received().is_empty(),
        "nothing went by the other carrier"
    );
    let rerouted = r#"otpgate_carrier_rerouted_total{carrier="silent"}"#;
    assert_eq!(gateway.metric(rerouted).await, Some(0.0));
    gateway.stop().await.unwrap();
}

/// A carrier without a receipt token cannot send receipts: it is `unknown` from the start, and
/// its SMS have no lag to show. (One whose receipts never come at all turns `unknown` after
/// enough are missing: `delivery.rs`'s tests.)
#[tokio::test]
async fn carriers_without_receipts_are_unknown() {
    let tokenless = FakeCarrier::start().await;
    let config = format!(
        "sweep_interval_ms = 50\n{}",
        tokenless.config("plain", 100, 10)
    );
    let gateway = Gateway::start(&config).await;
    let unknown = r#"otpgate_carrier_delivery_state{carrier="plain",state="unknown"}"#;
    assert_eq!(gateway.metric(unknown).await, Some(1.0));
    let started = gateway.start_verification(&phone(1)).await;
    let submitted = gateway.wait_for_delivery(&started.id(), "submitted").await;
    assert!(
        submitted.body["delivery"].get("lag_seconds").is_none(),
        "{}",
        submitted.text
    );
    let ready = gateway.admin_get("/readyz").await;
    assert_eq!(
        ready.body["checks"]["carriers"]["each"][0]["delivery"],
        json!({ "state": "unknown", "late_share": 0.0, "receipt_timeout_ms": null })
    );
    gateway.stop().await.unwrap();
}

/// A carrier on standby (a backup) sends nothing while its primary serves, however idle it is;
/// it takes the reroutes away from the primary, then every new SMS while the primary lags, and
/// the jobs of a primary whose circuit is open.
#[tokio::test]
async fn a_standby_carrier_sends_only_what_its_primary_cannot() {
    let silent = FakeCarrier::start().await;
    silent.deliver(Duration::from_secs(3600), LATE_TOKEN);
    let backup = FakeCarrier::start().await;
    backup.deliver(Duration::ZERO, PROMPT_TOKEN);
    let config = format!(
        "sweep_interval_ms = 50\n[limits]\nphone_sends = [{{ max = 10, per_secs = 600 }}]\n\
         {}receipt_token = \"{LATE_TOKEN}\"\nreceipt_timeout_ms = 1500\n\
         {}receipt_token = \"{PROMPT_TOKEN}\"\nstandby = true\n",
        silent.config("silent", 100, 20),
        backup.config("backup", 100, 20),
    );
    let gateway = Gateway::start(&config).await;

    // The primary serves: every first SMS is its, though the backup is idle and as fast.
    let mut ids = Vec::new();
    for n in 1..=4 {
        let started = gateway.start_verification(&phone(n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        ids.push(started.id());
    }
    silent.wait_for(4, Duration::from_secs(5)).await;
    assert!(
        backup.received().is_empty(),
        "the backup sent while the primary served"
    );
    // Their receipts go missing: the same codes go by the backup.
    for id in &ids {
        let delivered = gateway.wait_for_delivery(id, "delivered").await;
        assert_eq!(delivered.body["delivery"]["carrier"], "backup");
    }
    // Four more missing receipts: the primary is lagging, and new SMS go by the backup at once
    // (but for a probe now and then).
    for n in 5..=8 {
        let started = gateway.start_verification(&phone(n)).await;
        gateway.wait_for_delivery(&started.id(), "delivered").await;
    }
    let lagging = r#"otpgate_carrier_delivery_state{carrier="silent",state="lagging"}"#;
    gateway.wait_for_metric(lagging, |v| v == 1.0).await;
    let sent_by_silent = silent.received().len();
    for n in 9..=18 {
        let started = gateway.start_verification(&phone(n)).await;
        gateway.wait_for_delivery(&started.id(), "delivered").await;
    }
    let probes = silent.received().len() - sent_by_silent;
    assert!(
        probes <= 2,
        "the lagging primary took {probes} of 10 new SMS"
    );
    gateway.stop().await.unwrap();
}

/// A primary that fails opens its circuit; its jobs then go by the standby carrier.
#[tokio::test]
async fn a_standby_carrier_takes_over_from_an_open_circuit() {
    let failing = FakeCarrier::start().await;
    failing.script(&[tests::Reply::Status(500, None)]);
    let backup = FakeCarrier::start().await;
    let config = format!(
        "{}breaker_failures = 3\nbreaker_open_ms = 60000\n{}standby = true\n",
        failing.config("failing", 100, 20),
        backup.config("backup", 100, 20),
    );
    let gateway = Gateway::start(&config).await;
    let mut ids = Vec::new();
    for n in 1..=10 {
        let started = gateway.start_verification(&phone(n)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        ids.push(started.id());
    }
    for id in &ids {
        let submitted = gateway.wait_for_delivery(id, "submitted").await;
        assert_eq!(submitted.body["delivery"]["carrier"], "backup");
    }
    let open = r#"otpgate_carrier_circuit_state{carrier="failing"}"#;
    assert_eq!(gateway.metric(open).await, Some(2.0));
    gateway.stop().await.unwrap();
}

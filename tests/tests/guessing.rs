//! The guessing budget of docs/DESIGN.md section 4, *Limits*, end to end: consecutive wrong
//! codes per phone counted apart for each client (one tenant's attacker cannot lock a citizen
//! out of every other tenant), and the caps on wrong codes per citizen address and per client,
//! which refuse a check before its code is compared and are spent only by wrong codes.

use serde_json::{Value, json};
use tests::{Answer, Gateway, phone};

use crate::limits::{
    PATIENCE, assert_rate_limited, client, gateway_with, rejections, send_as, start_as, wrong_code,
};

/// Checks `code` for verification `id` as the client with API key `key`, with `client_ip` when
/// given.
async fn check_as(
    gateway: &Gateway,
    key: &str,
    id: &str,
    code: &str,
    client_ip: Option<&str>,
) -> Answer {
    let mut body = json!({ "code": code });
    if let Some(ip) = client_ip {
        body["client_ip"] = Value::from(ip);
    }
    let path = format!("/v1/verifications/{id}/check");
    send_as(gateway, http::Method::POST, &path, Some(body), key).await
}

/// Checks `code` for verification `id` (no API keys configured) from the citizen at `client_ip`.
async fn check_from(gateway: &Gateway, id: &str, code: &str, client_ip: &str) -> Answer {
    let body = json!({ "code": code, "client_ip": client_ip });
    gateway
        .post(&format!("/v1/verifications/{id}/check"), body)
        .await
}

/// Asserts a check answered `200` with a wrong code.
fn assert_wrong(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["valid"], false, "{}", answer.text);
}

/// Wrong codes typed through one client lock the phone for that client only: the same citizen
/// still gets its SMS and checks its code through another client, while the first stays locked.
#[tokio::test]
async fn a_wrong_code_flood_through_one_client_does_not_lock_the_phone_for_another() {
    let config = format!(
        "[verification]\nmax_attempts = 5\ncode_ttl_secs = 7200\n\
         [limits]\nfailed_checks_per_phone = {{ max = 3, per_secs = 3600 }}\n{}{}",
        client("portal", ""),
        client("pharmacies", "")
    );
    let (gateway, carrier) = gateway_with(&config).await;
    let number = phone(1501);
    let first = start_as(&gateway, "k-portal", json!({ "phone": number }), &[]).await;
    assert_eq!(first.status, 202, "{}", first.text);
    carrier.wait_for(1, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    for _ in 0..3 {
        assert_wrong(&check_as(&gateway, "k-portal", &first.id(), wrong_code(&code), None).await);
    }
    let locked = check_as(&gateway, "k-portal", &first.id(), &code, None).await;
    assert_rate_limited(&locked, "too_many_failed_checks", "3;w=3600");

    // Past the phone's 30-second send limit, so that only the lock could refuse it.
    gateway.clock.advance(std::time::Duration::from_secs(31));
    let other = start_as(&gateway, "k-pharmacies", json!({ "phone": number }), &[]).await;
    assert_eq!(
        other.status, 202,
        "another client's start is not locked: {}",
        other.text
    );
    carrier.wait_for(2, PATIENCE).await;
    let other_code = carrier.code_for(&number).expect("a code in the second SMS");
    let approved = check_as(&gateway, "k-pharmacies", &other.id(), &other_code, None).await;
    assert_eq!(approved.status, 200, "{}", approved.text);
    assert_eq!(approved.body["valid"], true, "{}", approved.text);

    // The first client's lock stands, for checks and for new SMS alike.
    let still_locked = check_as(&gateway, "k-portal", &first.id(), &code, None).await;
    assert_rate_limited(&still_locked, "too_many_failed_checks", "3;w=3600");
    assert_eq!(rejections(&gateway, "failed_checks").await, 2.0);
}

/// The cap per citizen address refuses the check after `max` wrong codes from one address,
/// before comparing its code (even a right one); another address still checks; a right code
/// spends nothing; IPv6 addresses count by their /64.
#[tokio::test]
async fn the_per_ip_cap_refuses_wrong_codes_from_one_address_while_another_still_checks() {
    let extra = "[verification]\nmax_attempts = 5\n\
                 [limits]\nfailed_checks_per_ip = [{ max = 3, per_secs = 3600 }]";
    let (gateway, carrier) = gateway_with(extra).await;
    let citizen = "198.51.100.7";

    // A right code spends nothing of the address's cap.
    let right_first = gateway.start_verification(&phone(1601)).await;
    carrier.wait_for(1, PATIENCE).await;
    let code = carrier.code_for(&phone(1601)).expect("a code in the SMS");
    let approved = check_from(&gateway, &right_first.id(), &code, citizen).await;
    assert_eq!(approved.body["valid"], true, "{}", approved.text);

    let number = phone(1602);
    let started = gateway.start_verification(&number).await;
    assert_eq!(started.status, 202, "{}", started.text);
    carrier.wait_for(2, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    for _ in 0..3 {
        assert_wrong(&check_from(&gateway, &started.id(), wrong_code(&code), citizen).await);
    }
    let refused = check_from(&gateway, &started.id(), &code, citizen).await;
    assert_rate_limited(&refused, "too_many_failed_checks_ip", "3;w=3600");
    // One wrong code comes back every 20 minutes.
    let retry_after = refused.retry_after().unwrap_or_default();
    assert!(
        (1..=1200).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    // Not compared: no attempt was used.
    let read = gateway.read(&started.id()).await;
    assert_eq!(read.body["status"], "pending", "{}", read.text);
    assert_eq!(read.body["attempts_left"], 2, "{}", read.text);

    // Another citizen's address checks the same code.
    let other = check_from(&gateway, &started.id(), &code, "198.51.100.8").await;
    assert_eq!(other.status, 200, "{}", other.text);
    assert_eq!(other.body["valid"], true, "{}", other.text);

    // Fresh addresses in one /64 are one citizen.
    let number = phone(1603);
    let started = gateway.start_verification(&number).await;
    carrier.wait_for(3, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    for n in 1..=3 {
        let ip = format!("2001:db8:5:6::{n}");
        assert_wrong(&check_from(&gateway, &started.id(), wrong_code(&code), &ip).await);
    }
    let refused = check_from(&gateway, &started.id(), &code, "2001:db8:5:6::99").await;
    assert_rate_limited(&refused, "too_many_failed_checks_ip", "3;w=3600");
    assert_eq!(rejections(&gateway, "failed_checks_ip").await, 2.0);
    assert_eq!(rejections(&gateway, "failed_checks").await, 0.0);
    assert_eq!(
        gateway
            .registered_metric("otpgate_verification_checks_total{outcome=\"locked\"}")
            .await,
        2.0
    );
}

/// A client with `citizen_ip = "header"` is capped by the address its proxy's header names,
/// whatever `client_ip` the body says.
#[tokio::test]
async fn a_header_clients_checks_are_capped_by_its_proxy_header() {
    let config = format!(
        "[limits]\nfailed_checks_per_ip = [{{ max = 2, per_secs = 3600 }}]\n{}",
        client(
            "portal",
            "citizen_ip = \"header\"\ncitizen_ip_header = \"X-Forwarded-For\"\n\
             citizen_ip_trusted_proxies = [\"10.0.0.0/8\"]"
        ),
    );
    let (gateway, carrier) = gateway_with(&config).await;
    let number = phone(1651);
    let forwarded = [("x-forwarded-for", "203.0.113.50, 10.0.0.1")];
    let started = start_as(&gateway, "k-portal", json!({ "phone": number }), &forwarded).await;
    assert_eq!(started.status, 202, "{}", started.text);
    carrier.wait_for(1, PATIENCE).await;
    let code = carrier.code_for(&number).expect("a code in the SMS");
    let check = async |code: &str, client_ip: &str, header: &str| {
        let path = format!("/v1/verifications/{}/check", started.id());
        let body = json!({ "code": code, "client_ip": client_ip }).to_string();
        gateway
            .request(
                http::Method::POST,
                &path,
                Some(body.into_bytes()),
                &[
                    ("authorization", "Bearer k-portal"),
                    ("x-forwarded-for", header),
                ],
            )
            .await
    };
    // The body's address changes every time; the header's does not.
    assert_wrong(&check(wrong_code(&code), "192.0.2.1", "203.0.113.50").await);
    assert_wrong(&check(wrong_code(&code), "192.0.2.2", "203.0.113.50, 10.1.1.1").await);
    let refused = check(&code, "192.0.2.3", "203.0.113.50").await;
    assert_rate_limited(&refused, "too_many_failed_checks_ip", "2;w=3600");
    let other = check(&code, "192.0.2.3", "203.0.113.51").await;
    assert_eq!(other.body["valid"], true, "{}", other.text);
}

/// The cap per client (a credential-stuffing ceiling) refuses that client's checks past `max`
/// wrong codes, whichever phones and addresses they were for; another client still checks.
#[tokio::test]
async fn the_per_client_cap_refuses_a_clients_checks_past_its_wrong_codes() {
    let config = format!(
        "[limits]\nfailed_checks_per_ip = []\n\
         failed_checks_per_client = [{{ max = 2, per_secs = 3600 }}]\n{}{}",
        client("portal", ""),
        client("pharmacies", "")
    );
    let (gateway, carrier) = gateway_with(&config).await;
    let mut ids = Vec::new();
    for (n, key) in [
        (1701, "k-portal"),
        (1702, "k-portal"),
        (1703, "k-pharmacies"),
    ] {
        let started = start_as(&gateway, key, json!({ "phone": phone(n) }), &[]).await;
        assert_eq!(started.status, 202, "{}", started.text);
        ids.push(started.id());
    }
    carrier.wait_for(3, PATIENCE).await;
    let codes: Vec<String> = (1701..=1703)
        .map(|n| carrier.code_for(&phone(n)).expect("a code in the SMS"))
        .collect();
    assert_wrong(
        &check_as(
            &gateway,
            "k-portal",
            &ids[0],
            wrong_code(&codes[0]),
            Some("198.51.100.1"),
        )
        .await,
    );
    assert_wrong(
        &check_as(
            &gateway,
            "k-portal",
            &ids[1],
            wrong_code(&codes[1]),
            Some("198.51.100.2"),
        )
        .await,
    );
    let refused = check_as(&gateway, "k-portal", &ids[1], &codes[1], None).await;
    assert_rate_limited(&refused, "too_many_failed_checks_client", "2;w=3600");
    let other = check_as(&gateway, "k-pharmacies", &ids[2], &codes[2], None).await;
    assert_eq!(other.body["valid"], true, "{}", other.text);
    assert_eq!(rejections(&gateway, "failed_checks_client").await, 1.0);
}

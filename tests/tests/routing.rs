//! Carrier choice: prefix rules decide which carriers may send to a number, and weights share
//! out a light load among the eligible carriers that are idle.

use std::time::Duration;

use tests::{FakeCarrier, Gateway, phone};

/// Each number goes only to a carrier whose prefixes take it; a number no carrier serves is
/// refused before anything is spent.
#[tokio::test]
async fn prefix_rules_pick_the_carrier() {
    let italy = FakeCarrier::start().await;
    let uk = FakeCarrier::start().await;
    let config = format!(
        "{}prefixes = [\"+39\"]\nexclude_prefixes = [\"+39320\"]\n{}prefixes = [\"+44\", \"+39320\"]\n",
        italy.config("italy", 1000, 4),
        uk.config("uk", 1000, 4),
    );
    let gateway = Gateway::start(&config).await;

    let italian = phone(7);
    let british = "+447911123456";
    let carved_out = "+393201234567";
    for number in [italian.as_str(), british, carved_out] {
        let started = gateway.start_verification(number).await;
        assert_eq!(started.status, 202, "{number}: {}", started.text);
    }
    let to = |carrier: &FakeCarrier| -> Vec<String> {
        carrier.received().into_iter().map(|sms| sms.to).collect()
    };
    italy.wait_for(1, Duration::from_secs(5)).await;
    uk.wait_for(2, Duration::from_secs(5)).await;
    // Give a wrongly routed SMS the time to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(to(&italy), [italian]);
    let mut british_side = to(&uk);
    british_side.sort();
    assert_eq!(british_side, [carved_out, british]);

    let french = gateway.start_verification("+33612345678").await;
    assert_eq!(french.status, 403, "{}", french.text);
    assert_eq!(french.error_code(), "number_not_served");
    assert_eq!(
        gateway
            .registered_metric(r#"otpgate_verifications_started_total{outcome="created"}"#)
            .await,
        3.0
    );
}

/// With both carriers idle, a weight of 3 against 1 sends about three SMS in four by the first.
#[tokio::test]
async fn weights_share_a_light_load() {
    let heavy = FakeCarrier::start().await;
    let light = FakeCarrier::start().await;
    let config = format!(
        "[limits]\nip_sends = []\n{}weight = 3\n{}weight = 1\n",
        heavy.config("heavy", 1000, 4),
        light.config("light", 1000, 4),
    );
    let gateway = Gateway::start(&config).await;
    let n = 200;
    for i in 0..n {
        let started = gateway.start_verification(&phone(i)).await;
        assert_eq!(started.status, 202, "{}", started.text);
        // One at a time, so that both carriers are idle when each job arrives.
        gateway.wait_for_delivery(&started.id(), "submitted").await;
    }
    let (n_heavy, n_light) = (heavy.received().len(), light.received().len());
    assert_eq!(n_heavy + n_light, n as usize);
    // Expected 150 : 50, with a binomial standard deviation of about 6.
    assert!(
        (120..=180).contains(&n_heavy),
        "heavy {n_heavy}, light {n_light}"
    );
}

/// Prefix rules are checked when the configuration loads.
#[tokio::test]
async fn bad_prefixes_are_refused_with_the_key() {
    for (rules, key) in [
        ("prefixes = [\"39\"]", "carriers[0].prefixes"),
        ("prefixes = [\"+3a\"]", "carriers[0].prefixes"),
        ("exclude_prefixes = [\"+\"]", "carriers[0].exclude_prefixes"),
        ("weight = 0", "carriers[0].weight"),
    ] {
        let toml = format!("[[carriers]]\nname = \"a\"\nkind = \"console\"\n{rules}\n");
        let error = gateway::config::Config::from_toml(&toml).unwrap_err();
        assert!(
            error.to_string().contains(key),
            "{rules}: {error} should name {key}"
        );
    }
}

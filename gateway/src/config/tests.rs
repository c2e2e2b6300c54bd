use super::*;
use crate::citizen_ip::CitizenIpSource;

#[test]
fn an_smpp_carrier_has_a_window_per_bind_and_a_secret_password() {
    let config = Config::from_toml(
        "[[carriers]]\nname = \"smsc\"\nkind = \"smpp\"\nhost = \"smsc.example\"\n\
         system_id = \"otpgate\"\npassword = \"pa55word\"\nbinds = 3\nwindow = 50\n\
         bind = \"transmitter_receiver\"\ngsm7_packed = true\nucs2_data_coding = 24\n",
    )
    .unwrap();
    let carrier = &config.carriers[0];
    assert_eq!(carrier.window.get(), 150, "the window across binds");
    let CarrierKind::Smpp(smpp) = &carrier.kind else {
        panic!("not smpp: {carrier:?}");
    };
    assert_eq!(smpp.port, 2775);
    assert_eq!(smpp.window_per_bind.get(), 50);
    assert_eq!(smpp.bind, BindMode::TransmitterReceiver);
    assert!(smpp.coding.gsm7_packed);
    assert_eq!(smpp.coding.gsm7_data_coding, 0);
    assert_eq!(smpp.coding.ucs2_data_coding, 24);
    assert_eq!(smpp.enquire_link, Duration::from_secs(30));
    assert!(!format!("{config:?}").contains("pa55word"));
}

#[test]
fn empty_file_gives_the_documented_defaults() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.admin_listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(config.verification.code_ttl, Duration::from_secs(600));
    assert_eq!(config.verification.max_extension, Duration::from_secs(900));
    assert_eq!(config.limits.phone_sends.len(), 2);
    assert!(config.is_unauthenticated());
    assert!(config.carriers.is_empty());
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../../otpgate.example.toml");
    let config = Config::from_toml(text).unwrap();
    assert_eq!(config.carriers[0].name, "alpha");
    assert_eq!(config.clients[0].priority, 1);
}

#[test]
fn unknown_keys_are_refused_with_their_name() {
    let error = Config::from_toml("listne = \"127.0.0.1:1\"").unwrap_err();
    assert!(error.to_string().contains("listne"), "{error}");
    let error = Config::from_toml("[verification]\ncode_tll_secs = 3").unwrap_err();
    assert!(error.to_string().contains("code_tll_secs"), "{error}");
}

#[test]
fn refuses_unauthenticated_on_a_public_address() {
    let error = Config::from_toml("listen = \"0.0.0.0:8080\"").unwrap_err();
    assert!(
        error.to_string().starts_with("config key clients:"),
        "{error}"
    );
    let key = "00".repeat(32);
    let with_key = format!(
        "listen = \"0.0.0.0:8080\"\n[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\""
    );
    // Clients without a carrier would fall back to the console carrier, which prints codes.
    let error = Config::from_toml(&with_key).unwrap_err();
    assert!(
        error.to_string().starts_with("config key carriers:"),
        "{error}"
    );
    let ok = format!(
        "{with_key}\n[[carriers]]\nname = \"alpha\"\nkind = \"http\"\nurl = \"https://sms.example\""
    );
    assert!(Config::from_toml(&ok).is_ok());
}

#[test]
fn names_the_key_at_fault() {
    let cases = [
        (
            "[verification]\ncode_length = 3",
            "verification.code_length",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"http\"",
            "carriers[0].url",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"pigeon\"",
            "carriers[0].kind",
        ),
        (
            "[[carriers]]\nname = \"A B\"\nkind = \"console\"",
            "carriers[0].name",
        ),
        (
            "[[clients]]\nname = \"a\"\napi_key_sha256 = \"zz\"",
            "clients[0].api_key_sha256",
        ),
        ("[limits]\ncountries = [\"XX\"]", "limits.countries"),
        ("[limits]\nnumber_types = []", "limits.number_types"),
        (
            "[limits]\nnumber_types = [\"landline\"]",
            "limits.number_types",
        ),
        (
            "[limits]\nphone_sends = [{ max = 0, per_secs = 1 }]",
            "limits.phone_sends[0].max",
        ),
        ("secret = \"abcd\"", "secret"),
        (
            "[verification]\nretention_secs = 60\nidempotency_ttl_secs = 61",
            "verification.idempotency_ttl_secs",
        ),
        ("shutdown_grace_secs = 3601", "shutdown_grace_secs"),
        ("store = \"mongo\"", "store"),
        ("[templates]\nen = \"no code here\"", "templates"),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nsystem_id = \"x\"\npassword = \"y\"",
            "carriers[0].host",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\npassword = \"y\"",
            "carriers[0].system_id",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"123456789\"",
            "carriers[0].password",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\nbind = \"sideways\"",
            "carriers[0].bind",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\nwindow = 1000\nbinds = 11",
            "carriers[0].window",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\ntls_ca_file = \"ca.pem\"",
            "carriers[0].tls_ca_file",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\nurl = \"http://a\"",
            "carriers[0].url",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://a\"\nsystem_id = \"x\"",
            "carriers[0].system_id",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\nfrom = \"Caffè\"",
            "carriers[0].from",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\ngsm7_data_coding = 3",
            "carriers[0].gsm7_data_coding",
        ),
        (
            "[[carriers]]\nname = \"a\"\nkind = \"smpp\"\nhost = \"h\"\nsystem_id = \"x\"\npassword = \"y\"\nucs2_data_coding = 0",
            "carriers[0].ucs2_data_coding",
        ),
    ];
    for (text, key) in cases {
        let error = Config::from_toml(text).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("config key {key}:")),
            "{text:?} gave {error}"
        );
    }
}

#[test]
fn the_queue_policy_is_adaptive_by_default_and_can_be_the_deadline_one() {
    let config = Config::from_toml("").unwrap();
    let overload = config.overload.expect("adaptive by default");
    assert_eq!(overload.max_wait, Duration::from_secs(300));
    assert_eq!(overload.target, Duration::from_secs(5));
    assert_eq!(overload.after, Duration::from_secs(30));
    assert_eq!(overload.unseen_after, Some(Duration::from_secs(300)));
    let never = Config::from_toml("[queue]\nunseen_after_ms = 0\nmax_wait_ms = 1500").unwrap();
    let overload = never.overload.unwrap();
    assert_eq!(overload.unseen_after, None);
    assert_eq!(overload.max_wait, Duration::from_millis(1500));
    let deadline = Config::from_toml("[queue]\npolicy = \"deadline\"").unwrap();
    assert_eq!(deadline.overload, None);
    for (text, key) in [
        ("[queue]\npolicy = \"lifo\"", "queue.policy"),
        ("[queue]\nmax_wait_ms = 0", "queue.max_wait_ms"),
        ("[queue]\noverload_wait_ms = 0", "queue.overload_wait_ms"),
        (
            "[queue]\nunseen_after_ms = 90000000",
            "queue.unseen_after_ms",
        ),
        (
            "[queue]\npolicy = \"deadline\"\noverload_after_ms = 4000000",
            "queue.overload_after_ms",
        ),
    ] {
        let error = Config::from_toml(text).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("config key {key}:")),
            "{text:?} gave {error}"
        );
    }
}

#[test]
fn codes_shorter_than_six_digits_are_refused() {
    for length in [4, 5] {
        let error =
            Config::from_toml(&format!("[verification]\ncode_length = {length}")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("config key verification.code_length:"),
            "{length}: {error}"
        );
    }
    for length in [6, 9] {
        let config = Config::from_toml(&format!("[verification]\ncode_length = {length}")).unwrap();
        assert_eq!(config.verification.code_length, length);
    }
}

#[test]
fn citizen_ip_defaults_to_optional_and_ipv6_to_a_64() {
    let key = "00".repeat(32);
    let carrier = "[[carriers]]\nname = \"alpha\"\nkind = \"http\"\nurl = \"https://sms.example\"";
    let config = Config::from_toml(&format!(
        "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\"\n{carrier}"
    ))
    .unwrap();
    assert_eq!(config.clients[0].citizen_ip, CitizenIpSource::Optional);
    assert_eq!(config.limits.ipv6_prefix, 64);

    let config = Config::from_toml(&format!(
        "[limits]\nipv6_prefix = 56\n[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\"\n\
         citizen_ip = \"header\"\ncitizen_ip_header = \"X-Real-IP\"\n\
         citizen_ip_trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::1\"]\n{carrier}"
    ))
    .unwrap();
    assert_eq!(config.limits.ipv6_prefix, 56);
    let CitizenIpSource::Header(header) = &config.clients[0].citizen_ip else {
        panic!("not a header: {:?}", config.clients[0].citizen_ip);
    };
    assert_eq!(header.name, "x-real-ip");
    assert_eq!(header.trusted_proxies.len(), 2);
}

#[test]
fn citizen_ip_keys_are_checked_and_named() {
    let key = "00".repeat(32);
    let client = |extra: &str| {
        format!("[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\"\n{extra}")
    };
    let cases = [
        (client("citizen_ip = \"peer\""), "clients[0].citizen_ip"),
        (
            client("citizen_ip = \"header\""),
            "clients[0].citizen_ip_header",
        ),
        (
            client("citizen_ip = \"header\"\ncitizen_ip_header = \"bad header\""),
            "clients[0].citizen_ip_header",
        ),
        (
            client("citizen_ip_header = \"X-Forwarded-For\""),
            "clients[0].citizen_ip_header",
        ),
        (
            client("citizen_ip = \"body\"\ncitizen_ip_trusted_proxies = [\"10.0.0.0/8\"]"),
            "clients[0].citizen_ip_trusted_proxies",
        ),
        (
            client(
                "citizen_ip = \"header\"\ncitizen_ip_header = \"X-Forwarded-For\"\n\
                 citizen_ip_trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/40\"]",
            ),
            "clients[0].citizen_ip_trusted_proxies[1]",
        ),
        (
            "[limits]\nipv6_prefix = 16".to_owned(),
            "limits.ipv6_prefix",
        ),
        (
            "[limits]\nipv6_prefix = 129".to_owned(),
            "limits.ipv6_prefix",
        ),
    ];
    for (toml, expected) in cases {
        let error = Config::from_toml(&toml).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("config key {expected}:")),
            "{toml}: {error}"
        );
    }
}

#[test]
fn connection_guards_default_to_the_documented_values() {
    let connections = Config::from_toml("").unwrap().connections;
    assert_eq!(connections.max_connections, 10_000);
    assert_eq!(connections.max_per_ip, Some(256));
    assert_eq!(connections.prelude_timeout, Duration::from_secs(10));
    assert_eq!(connections.idle_timeout, Duration::from_secs(60));
    assert_eq!(connections.body_timeout, Duration::from_secs(10));
    let ping = connections.ping.expect("pings on by default");
    assert_eq!(ping.interval, Duration::from_secs(30));
    assert_eq!(ping.timeout, Duration::from_secs(10));
    let admin = connections.for_admin();
    assert_eq!((admin.max_connections, admin.max_per_ip), (64, Some(16)));
}

#[test]
fn zero_turns_the_per_address_cap_and_pings_off() {
    let connections = Config::from_toml("max_connections_per_ip = 0\nping_interval_ms = 0\n")
        .unwrap()
        .connections;
    assert_eq!(connections.max_per_ip, None);
    assert_eq!(connections.for_admin().max_per_ip, None);
    assert_eq!(connections.ping, None);
}

#[test]
fn connection_guards_out_of_range_name_their_key() {
    for (toml, key) in [
        ("max_connections_per_ip = 2000000", "max_connections_per_ip"),
        ("prelude_timeout_ms = 0", "prelude_timeout_ms"),
        ("idle_timeout_ms = 99", "idle_timeout_ms"),
        ("body_timeout_ms = 600001", "body_timeout_ms"),
        ("ping_interval_ms = 50", "ping_interval_ms"),
        (
            "ping_interval_ms = 0\nping_timeout_ms = 0",
            "ping_timeout_ms",
        ),
        ("max_connections = 0", "max_connections"),
    ] {
        let error = Config::from_toml(toml).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("config key {key}:")),
            "{toml}: {error}"
        );
    }
}

#[test]
fn a_clients_web_origins_and_app_hashes_are_checked() {
    let client = |extra: &str| {
        format!(
            "[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{}\"\n{extra}\n[[carriers]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/sms\"\nfrom = \"Otp\"\n",
            "ab".repeat(32)
        )
    };
    let config = Config::from_toml(&client(
        "web_origins = [\"https://portal.example.it\"]\napp_hashes = [\"FA+9qCX9VSu\"]",
    ))
    .unwrap();
    assert_eq!(config.clients[0].web_origin_hosts, ["portal.example.it"]);
    assert_eq!(config.clients[0].app_hashes, ["FA+9qCX9VSu"]);
    for (extra, key) in [
        (
            "web_origins = [\"https://portal.example.it/path\"]",
            "clients[0].web_origins[0]",
        ),
        ("app_hashes = [\"short\"]", "clients[0].app_hashes[0]"),
    ] {
        let error = Config::from_toml(&client(extra)).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("config key {key}:")),
            "{extra:?} gave {error}"
        );
    }
}

#[test]
fn anti_pumping_keys_default_and_are_checked_by_name() {
    const CARRIER: &str = "[[carriers]]\nname = \"a\"\nkind = \"http\"\n\
                           url = \"http://127.0.0.1:9/sms\"\nfrom = \"Otp\"\n";
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.limits.prefix_digits, 7);
    assert!(config.limits.prefix_sends.is_empty());
    assert!(config.limits.country_budgets.is_empty());
    let key = "0".repeat(64);
    let config = Config::from_toml(&format!(
        "[limits]\nprefix_sends = [{{ max = 600, per_secs = 3600 }}]\nprefix_digits = 9\n\
         country_budgets = {{ IT = {{ max = 5, per_secs = 60 }}, \"001\" = {{ max = 1, per_secs = 60 }} }}\n\
         [[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\"\n\
         sms_budget = {{ max = 10, per_secs = 3600 }}\n{CARRIER}"
    ))
    .unwrap();
    assert_eq!(config.limits.prefix_sends[0].max.get(), 600);
    assert_eq!(config.limits.prefix_digits, 9);
    assert_eq!(config.limits.country_budgets.len(), 2);
    assert_eq!(
        config.clients[0].sms_budget.map(|rule| rule.max.get()),
        Some(10)
    );
    let client = format!("[[clients]]\nname = \"portal\"\napi_key_sha256 = \"{key}\"\n");
    for (toml, named) in [
        (
            "[limits]\nprefix_digits = 3".to_owned(),
            "limits.prefix_digits",
        ),
        (
            "[limits]\nprefix_digits = 13".to_owned(),
            "limits.prefix_digits",
        ),
        (
            "[limits]\nprefix_sends = [{ max = 0, per_secs = 60 }]".to_owned(),
            "limits.prefix_sends[0].max",
        ),
        (
            "[limits]\ncountry_budgets = { XX = { max = 1, per_secs = 60 } }".to_owned(),
            "limits.country_budgets.XX",
        ),
        (
            "[limits]\ncountry_budgets = { it = { max = 1, per_secs = 60 } }".to_owned(),
            "limits.country_budgets.it",
        ),
        (
            "[limits]\ncountry_budgets = { IT = { max = 1, per_secs = 0 } }".to_owned(),
            "limits.country_budgets.IT.per_secs",
        ),
        (
            format!("{client}sms_budget = {{ max = 0, per_secs = 60 }}\n{CARRIER}"),
            "clients[0].sms_budget.max",
        ),
    ] {
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(error.contains(named), "{toml}: {error}");
    }
}

#[test]
fn the_fraud_guard_is_on_by_default_and_its_keys_are_checked() {
    let config = Config::from_toml("").unwrap();
    let guard = &config.fraud_guard;
    assert!(guard.enabled);
    assert_eq!(guard.window, Duration::from_secs(3600));
    assert_eq!(guard.min_volume, 50);
    assert_eq!(guard.cool_off, Duration::from_secs(1800));
    assert_eq!(guard.slowed_sends.max.get(), 10);
    let config = Config::from_toml("[fraud_guard]\nenabled = false\nmin_volume = 20").unwrap();
    assert!(!config.fraud_guard.enabled);
    assert_eq!(config.fraud_guard.min_volume, 20);
    for (toml, named) in [
        ("[fraud_guard]\nmin_volume = 1", "fraud_guard.min_volume"),
        ("[fraud_guard]\nslow_below = 1.5", "fraud_guard.slow_below"),
        (
            "[fraud_guard]\nblock_below = -0.1",
            "fraud_guard.block_below",
        ),
        (
            "[fraud_guard]\nblock_below = 0.5\nslow_below = 0.2",
            "fraud_guard.block_below",
        ),
        ("[fraud_guard]\nwindow_secs = 10", "fraud_guard.window_secs"),
        (
            "[fraud_guard]\ncool_off_secs = 0",
            "fraud_guard.cool_off_secs",
        ),
        (
            "[fraud_guard]\nslowed_sends = { max = 0, per_secs = 60 }",
            "fraud_guard.slowed_sends.max",
        ),
        ("[fraud_guard]\nthreshold = 1", "threshold"),
    ] {
        let error = Config::from_toml(toml).unwrap_err().to_string();
        assert!(error.contains(named), "{toml}: {error}");
    }
}

#[test]
fn guessing_caps_default_to_50_an_hour_per_ip_and_none_per_client() {
    let config = Config::from_toml("").unwrap();
    let rule = |max, secs| Rule {
        max: std::num::NonZeroU32::new(max).unwrap(),
        per: Duration::from_secs(secs),
    };
    assert_eq!(config.limits.failed_checks_per_ip, vec![rule(50, 3600)]);
    assert!(config.limits.failed_checks_per_client.is_empty());
    assert_eq!(config.limits.failed_checks_per_phone, rule(100, 86_400));

    let config = Config::from_toml(
        "[limits]\nfailed_checks_per_ip = []\n\
         failed_checks_per_client = [{ max = 5000, per_secs = 3600 }, { max = 20000, per_secs = 86400 }]",
    )
    .unwrap();
    assert!(config.limits.failed_checks_per_ip.is_empty());
    assert_eq!(
        config.limits.failed_checks_per_client,
        vec![rule(5000, 3600), rule(20000, 86_400)]
    );
}

#[test]
fn guessing_caps_out_of_range_name_their_key() {
    let cases = [
        (
            "[limits]\nfailed_checks_per_ip = [{ max = 0, per_secs = 3600 }]",
            "limits.failed_checks_per_ip[0].max",
        ),
        (
            "[limits]\nfailed_checks_per_client = [{ max = 10, per_secs = 0 }]",
            "limits.failed_checks_per_client[0].per_secs",
        ),
        (
            "[limits]\nfailed_checks_per_ip = { max = 10, per_secs = 60 }",
            "failed_checks_per_ip",
        ),
    ];
    for (text, key) in cases {
        let error = Config::from_toml(text).unwrap_err();
        assert!(error.to_string().contains(key), "{text}: {error}");
    }
}

#[test]
fn long_polls_per_client_defaults_to_1000_and_is_bounded() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.verification.long_polls_per_client, 1000);
    let config = Config::from_toml("[verification]\nlong_polls_per_client = 0").unwrap();
    assert_eq!(config.verification.long_polls_per_client, 0);
    let error = Config::from_toml("[verification]\nlong_polls_per_client = 1000001")
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("config key verification.long_polls_per_client:"),
        "{error}"
    );
}

//! The SMPP connector against an SMSC nobody on this team wrote: the npm `smpp` package's server,
//! run by tests/interop/npm-smsc/smsc.js, which decodes what the gateway sends with the package's
//! own GSM 03.38 and UCS-2 decoders and reassembles concatenated parts by their UDH.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::npm_smsc::{IdFormat, NpmSmsc, NpmSmscOptions, Receipts, require_npm_smsc};
use tests::{Gateway, capture_logs, extract_code, phone};

const WAIT: Duration = Duration::from_secs(15);

/// GSM-7 with extension characters; Russian (UCS-2); and a GSM-7 text of two parts whose split
/// falls inside a `€` (an escape pair) if split naively at 153 septets.
const EN: &str = "Codice {code}: costo 0 € [ok] ~ | ^ \\\\ fine";
const RU: &str = "Ваш код {code} ✓";
fn long_template() -> String {
    format!(
        "{}€ Il tuo codice è {{code}}. {}",
        "x".repeat(152),
        "y".repeat(40)
    )
}

fn smsc_config(smsc: &NpmSmsc, extra: &str) -> String {
    format!(
        "sweep_interval_ms = 50\n\
         [templates]\nen = \"{EN}\"\nru = \"{RU}\"\nde = \"{}\"\n\
         [[carriers]]\nname = \"smsc\"\nkind = \"smpp\"\nhost = \"127.0.0.1\"\nport = {}\n\
         system_id = \"otpgate\"\npassword = \"secret12\"\npace_per_sec = 500\nwindow = 10\n\
         from = \"SaluteRL\"\ntimeout_ms = 2000\nenquire_link_secs = 1\n{extra}",
        long_template(),
        smsc.port()
    )
}

async fn start(gateway: &Gateway, n: u32, locale: &str) -> String {
    let body = serde_json::json!({ "phone": phone(n), "locale": locale });
    let answer = gateway.post("/v1/verifications", body).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    answer.id()
}

/// The SMSC's reassembled message to `phone(n)`.
fn message_to(events: &[Value], n: u32) -> Value {
    let number = phone(n);
    let number = number.trim_start_matches('+');
    events
        .iter()
        .find(|event| event["event"] == "message" && event["destination_addr"] == number)
        .cloned()
        .unwrap_or_else(|| panic!("no message to {number} in {events:#?}"))
}

/// GSM-7 with extension characters, UCS-2 and a concatenated text all arrive as written, and
/// the receipts (TLVs, ids spelled differently than in the submit answers) mark them delivered.
#[tokio::test]
async fn gsm7_ucs2_and_concatenated_texts_arrive_whole_and_are_receipted() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start_default();
    let gateway = Gateway::start(&smsc_config(&smsc, "")).await;
    let ids = [
        start(&gateway, 1, "en").await,
        start(&gateway, 2, "ru").await,
        start(&gateway, 3, "de").await,
    ];
    let events = smsc.wait_for_messages_async(3, WAIT).await;

    for (n, template, data_coding, parts) in [
        (1, EN.replace("\\\\", "\\"), 0, 1),
        (2, RU.to_owned(), 8, 1),
        (3, long_template(), 0, 2),
    ] {
        let message = message_to(&events, n);
        let text = message["text"].as_str().expect("text");
        let code = extract_code(text).expect("a code");
        assert_eq!(text, template.replace("{code}", &code), "{message}");
        assert_eq!(message["data_coding"], data_coding, "{message}");
        assert_eq!(message["parts"], parts, "{message}");
    }
    // The long text's parts: UDHI set, one reference, 1 of 2 and 2 of 2, and the `€` whole in
    // the second part.
    let number = phone(3);
    let parts: Vec<Value> = smsc
        .submits()
        .into_iter()
        .filter(|submit| submit["destination_addr"] == number.trim_start_matches('+'))
        .collect();
    assert_eq!(parts.len(), 2, "{parts:#?}");
    for (index, part) in parts.iter().enumerate() {
        assert_eq!(part["esm_class"].as_u64().unwrap() & 0x40, 0x40, "{part}");
        assert_eq!(part["udh"]["total"], 2);
        assert_eq!(part["udh"]["seq"], index + 1);
        assert_eq!(part["udh"]["ref"], parts[0]["udh"]["ref"]);
        assert_eq!(part["source_addr"], "SaluteRL");
        assert_eq!(part["dest_addr_ton"], 1);
    }
    assert!(parts[1]["text"].as_str().unwrap().starts_with('€'));
    // Only the last part asks for a receipt.
    assert_eq!(parts[0]["registered_delivery"], 0);
    assert_eq!(parts[1]["registered_delivery"], 1);

    for id in &ids {
        gateway.wait_for_delivery(id, "delivered").await;
    }
    let acked = smsc
        .wait_for_async(
            |events| tests::npm_smsc::events_of(events, "receipt_acked").len() == 3,
            WAIT,
        )
        .await;
    let acked = tests::npm_smsc::events_of(&acked, "receipt_acked");
    assert!(acked.iter().all(|event| event["status"] == 0), "{acked:#?}");
    assert!(smsc.errors().is_empty(), "{}", smsc.dump());
}

/// Receipts with only the text (`id:… stat:DELIVRD`) and decimal ids are matched too.
#[tokio::test]
async fn receipts_without_tlvs_are_read_from_their_text() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start(NpmSmscOptions {
        receipts: Receipts::Text,
        id_format: IdFormat::Decimal,
        ..NpmSmscOptions::default()
    });
    let gateway = Gateway::start(&smsc_config(&smsc, "")).await;
    let id = start(&gateway, 10, "en").await;
    gateway.wait_for_delivery(&id, "delivered").await;
}

/// Throttle answers (`ESME_RTHROTTLED`, then `ESME_RMSGQFUL`) are retried within milliseconds,
/// and every SMS gets through once.
#[tokio::test]
async fn throttle_answers_are_retried_at_once() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start(NpmSmscOptions {
        throttle_first: 6,
        qfull_first: 4,
        ..NpmSmscOptions::default()
    });
    let gateway = Gateway::start(&smsc_config(&smsc, "")).await;
    // Bound first, so the time below is the throttles' alone.
    smsc.wait_for_async(
        |events| tests::npm_smsc::events_of(events, "bind").len() == 1,
        WAIT,
    )
    .await;
    let began = Instant::now();
    let mut ids = Vec::new();
    for n in 20..25 {
        ids.push(start(&gateway, n, "en").await);
    }
    let messages = smsc.wait_for_messages_async(5, WAIT).await;
    let took = began.elapsed();
    let statuses: Vec<u64> = smsc
        .submits()
        .iter()
        .map(|submit| submit["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 0x58).count(),
        6,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 0x14).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 0).count(),
        5,
        "{statuses:?}"
    );
    // Ten throttles cost pauses of milliseconds, not the seconds of a failure's back-off.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    for id in &ids {
        gateway.wait_for_delivery(id, "delivered").await;
    }
    assert_eq!(smsc.messages().len(), 5, "one SMS each: {messages:#?}");
}

/// An SMSC that goes away is bound again when it is back, and SMS flow again; on shutdown the
/// gateway unbinds. Transmitter and receiver sessions, two binds.
#[tokio::test]
async fn sessions_rebind_after_the_smsc_restarts_and_unbind_on_shutdown() {
    if !require_npm_smsc() {
        return;
    }
    let mut smsc = NpmSmsc::start_default();
    let gateway = Gateway::start(&smsc_config(
        &smsc,
        "bind = \"transmitter_receiver\"\nbinds = 2\n",
    ))
    .await;
    let first = start(&gateway, 30, "en").await;
    gateway.wait_for_delivery(&first, "delivered").await;
    let binds = smsc.binds();
    for command in ["bind_transmitter", "bind_receiver"] {
        assert_eq!(
            binds
                .iter()
                .filter(|bind| bind["command"] == command)
                .count(),
            2,
            "{binds:#?}"
        );
    }

    let bound = "otpgate_carrier_sessions_bound{carrier=\"smsc\"}";
    gateway.wait_for_metric(bound, |n| n == 2.0).await;
    smsc.kill();
    gateway.wait_for_metric(bound, |n| n == 0.0).await;
    smsc.restart();
    // Four binds before the restart, four after (the events run on across it).
    smsc.wait_for_async(
        |events| tests::npm_smsc::events_of(events, "bind").len() == 8,
        WAIT,
    )
    .await;
    gateway.wait_for_metric(bound, |n| n == 2.0).await;
    let second = start(&gateway, 31, "en").await;
    gateway.wait_for_delivery(&second, "delivered").await;

    gateway.stop().await.expect("clean stop");
    smsc.wait_for_async(
        |events| tests::npm_smsc::events_of(events, "unbind").len() == 4,
        // The four sessions bound since the restart.
        WAIT,
    )
    .await;
}

/// A wrong password is refused by the SMSC; the gateway keeps trying with back-off, never logs
/// the password, and the SMS waits rather than being lost.
#[tokio::test]
async fn a_refused_bind_is_retried_and_the_password_stays_secret() {
    if !require_npm_smsc() {
        return;
    }
    let (logs, _guard) = capture_logs();
    let smsc = NpmSmsc::start(NpmSmscOptions {
        password: "right123".to_owned(),
        ..NpmSmscOptions::default()
    });
    let gateway = Gateway::start(&smsc_config(&smsc, "")).await;
    let id = start(&gateway, 40, "en").await;
    smsc.wait_for_async(
        |events| tests::npm_smsc::events_of(events, "bind").len() >= 2,
        WAIT,
    )
    .await;
    let binds = smsc.binds();
    assert!(
        binds.iter().all(|bind| bind["status"] == 0x0E),
        "{binds:#?}"
    );
    let view = gateway.get(&format!("/v1/verifications/{id}")).await;
    assert_ne!(view.body["delivery"]["state"], "submitted", "{}", view.text);
    let text = logs.text();
    assert!(text.contains("SMPP bind failed"), "{text}");
    let leaks: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("secret12"))
        .collect();
    assert!(leaks.is_empty(), "the password was logged: {leaks:#?}");
}

/// Over TLS, trusting a private CA (`tls_ca_file`): the gateway binds through a TLS terminator in
/// front of the SMSC, and the SMS and its receipt go through it.
#[tokio::test]
async fn tls_with_a_private_ca() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start_default();
    let pki = Pki::issue();
    let terminator = tls_terminator(&pki, smsc.addr()).await;
    let config = smsc_config(&smsc, "").replace(
        &format!("port = {}\n", smsc.port()),
        &format!(
            "port = {}\ntls = true\ntls_ca_file = \"{}\"\n",
            terminator.port(),
            pki.ca.display()
        ),
    );
    let config = config.replace("host = \"127.0.0.1\"", "host = \"localhost\"");
    let gateway = Gateway::start(&config).await;
    let id = start(&gateway, 50, "ru").await;
    gateway.wait_for_delivery(&id, "delivered").await;
    let message = message_to(&smsc.wait_for_messages_async(1, WAIT).await, 50);
    assert!(message["text"].as_str().unwrap().starts_with("Ваш код"));
}

/// A CA and a certificate it signed for `localhost`, made with the openssl command, in a
/// directory removed on drop.
struct Pki {
    dir: std::path::PathBuf,
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Pki {
    fn issue() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "otpgate-pki-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=otpgate test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "smsc.key",
                "-out",
                "smsc.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "smsc.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "smsc.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("smsc.pem"),
            key: dir.join("smsc.key"),
            dir,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts TLS on a free loopback port and relays each connection to `backend` in plain TCP.
/// The relay ends with the test's runtime.
async fn tls_terminator(pki: &Pki, backend: std::net::SocketAddr) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

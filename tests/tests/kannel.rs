//! Kannel (Debian's `kannel`: bearerbox and smsbox), an ESME nobody on this team wrote, against
//! the load generator's SMSC simulator, fed through Kannel's HTTP `sendsms`: the simulator
//! decodes what Kannel sends (GSM-7 with extension characters, UCS-2, a concatenated text) and
//! Kannel matches the receipts the simulator sends back, which it reports on its DLR URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loadgen::carriers::smsc::{self, SmscMessage, SmscSettings};
use loadgen::carriers::{Carrier, Network, Protocol, Smpp};
use tests::kannel::{Coding, DlrReceiver, Kannel, KannelOptions, require_kannel};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_sends_through_the_simulator_and_matches_its_receipts() {
    if !require_kannel() {
        return;
    }
    let smpp = Smpp {
        system_id: Some("kannel".to_owned()),
        password: Some("secret".to_owned()),
        ..Smpp::default()
    };
    let carrier = Carrier::steady(
        "smsc",
        "127.0.0.1:0".parse().unwrap(),
        1000.0,
        Duration::from_millis(5),
        Duration::from_millis(50),
        Protocol::Smpp(smpp),
    );
    let (messages_tx, mut messages) = tokio::sync::mpsc::channel::<SmscMessage>(64);
    let mut settings = SmscSettings::from_carrier(&carrier, Instant::now());
    settings.messages = Some(messages_tx);
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let smsc = smsc::start(settings, Arc::new(Network::without_users()), stop)
        .await
        .expect("the simulator starts");
    let port = smsc.local_addr().port();

    let (kannel, dlr) = tokio::task::spawn_blocking(move || {
        let mut options = KannelOptions::new(port);
        options.system_id = "kannel".to_owned();
        options.password = "secret".to_owned();
        (Kannel::start(options), DlrReceiver::start())
    })
    .await
    .unwrap();

    let long = format!(
        "Il tuo codice è 482913. {}€ fine del messaggio lungo",
        "x".repeat(160)
    );
    let cases = [
        (
            "+393330000001",
            "Codice 123456 € [ok] {x} ~|^\\",
            Coding::Gsm7,
            0,
            1,
        ),
        ("+393330000002", "Ваш код 654321 ✓", Coding::Ucs2, 8, 1),
        ("+393330000003", long.as_str(), Coding::Gsm7, 0, 2),
    ];
    let sends: Vec<(String, String, Coding, Option<String>)> = cases
        .iter()
        .enumerate()
        .map(|(index, &(to, text, coding, _, _))| {
            (
                to.to_owned(),
                text.to_owned(),
                coding,
                Some(dlr.url(&format!("m{index}"))),
            )
        })
        .collect();
    let kannel = Arc::new(kannel);
    {
        let kannel = kannel.clone();
        tokio::task::spawn_blocking(move || {
            for (to, text, coding, url) in &sends {
                kannel
                    .send(to, text, *coding, url.as_deref())
                    .expect("sendsms takes it");
            }
        })
        .await
        .unwrap();
    }

    let mut received = Vec::new();
    while received.len() < cases.len() {
        let message = tokio::time::timeout(WAIT, messages.recv())
            .await
            .unwrap_or_else(|_| panic!("only {received:?} arrived; {}", kannel.logs()))
            .expect("the simulator runs");
        received.push(message);
    }
    for (to, text, _, data_coding, parts) in cases {
        let message = received
            .iter()
            .find(|message| message.destination.trim_start_matches('+') == &to[1..])
            .unwrap_or_else(|| panic!("nothing to {to} in {received:?}"));
        assert_eq!(message.text, text, "{message:?}");
        assert_eq!(message.data_coding, data_coding, "{message:?}");
        assert_eq!(message.parts, parts, "{message:?}");
    }

    // Kannel reports each message delivered (type 1) once the simulator's receipt matched it.
    let n_cases = cases.len();
    let callbacks = tokio::task::spawn_blocking(move || dlr.wait_for(n_cases, WAIT))
        .await
        .unwrap();
    let mut delivered: Vec<String> = callbacks
        .iter()
        .filter(|callback| callback.dlr_type() == Some(1))
        .filter_map(|callback| callback.tag().map(str::to_owned))
        .collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered, ["m0", "m1", "m2"], "{callbacks:?}");
    let summary = smsc.summary();
    assert_eq!(summary.decode_errors, 0, "{summary:?}");
}

//! The Kannel harness itself (tests/src/kannel.rs): bearerbox and smsbox start with their own
//! config on free loopback ports, take SMS over `sendsms` (queueing them while no SMSC answers),
//! and are gone with their directory once dropped; the delivery-report receiver records what it
//! is sent. What Kannel sends to an SMSC is the interop tests' business, not this file's.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use tests::kannel::{Coding, DlrReceiver, Kannel, KannelOptions, require_kannel};

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

/// With no SMSC to bind to, Kannel still starts: its status page answers with the link down,
/// `sendsms` queues what it is given, and dropping it kills both boxes and removes its files.
#[test]
fn kannel_starts_queues_while_the_smsc_is_down_and_is_gone_once_dropped() {
    if !require_kannel() {
        return;
    }
    let smsc_port = dead_port();
    let kannel = Kannel::launch(KannelOptions {
        window: 20,
        throughput: Some(200),
        ..KannelOptions::new(smsc_port)
    });
    let status = kannel.status().expect("the status page answers");
    assert!(status.contains("Status: running"), "{status}");
    assert!(status.contains("smsbox:"), "smsbox is connected: {status}");
    assert!(
        status.contains(&format!("SMPP:127.0.0.1:{smsc_port}/{smsc_port}:otpgate:")),
        "the one SMPP link, to our port as our system_id: {status}"
    );
    assert!(!kannel.is_online(), "nothing listens on {smsc_port}");

    let answer = kannel
        .sendsms(&[("to", "+393330000001"), ("text", "Code 1234 €")])
        .expect("sendsms answers");
    assert!(answer.accepted(), "{answer:?}");
    assert!(
        answer.body.starts_with("3:"),
        "queued for later while the link is down: {answer:?}"
    );
    let dlr = DlrReceiver::start();
    kannel
        .send(
            "+393330000002",
            "Код 1234 😀",
            Coding::Ucs2,
            Some(&dlr.url("queued")),
        )
        .expect("a UCS-2 SMS with a delivery report is queued too");
    kannel
        .send("+393330000003", &"x".repeat(300), Coding::Gsm7, None)
        .expect("a long SMS is queued too");
    let status = kannel.status().expect("status");
    assert!(
        status.contains("sent 0 (3 queued)"),
        "the three SMS wait for the link: {status}"
    );
    let refused = kannel
        .sendsms(&[("text", "no receiver")])
        .expect("sendsms answers");
    assert!(!refused.accepted(), "no receiver: {refused:?}");

    let pids = kannel.pids();
    assert_eq!(pids.len(), 2, "bearerbox and smsbox");
    let dir = kannel.dir().to_owned();
    let (admin, sendsms) = (kannel.admin_port(), kannel.sendsms_port());
    assert!(dir.join("kannel.conf").exists());
    drop(kannel);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived the harness"
        );
    }
    assert!(!dir.exists(), "{dir:?} outlived the harness");
    for port in [admin, sendsms] {
        assert!(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
            "port {port} still answers"
        );
    }
}

/// The receiver records a callback fetched the way Kannel fills in the URL's escapes, decodes
/// it, and `wait_for` returns once enough have come.
#[tokio::test]
async fn the_dlr_receiver_records_callbacks() {
    let dlr = DlrReceiver::start();
    let template = dlr.url("sms-1");
    assert!(template.contains("type=%d"), "{template}");
    let url = template
        .replace("%d", "1")
        .replace("%i", "sim")
        .replace("%F", "107184")
        .replace("%p", "%2B393330000001")
        .replace("%A", "id%3A1a2b0+stat%3ADELIVRD");
    let response = reqwest::get(&url).await.expect("the receiver answers");
    assert_eq!(response.status(), 200);
    let callbacks = dlr.wait_for(1, Duration::from_secs(5));
    assert_eq!(callbacks.len(), 1);
    let callback = &callbacks[0];
    assert_eq!(callback.tag(), Some("sms-1"));
    assert_eq!(callback.dlr_type(), Some(1));
    assert_eq!(callback.param("smsc"), Some("sim"));
    assert_eq!(callback.param("fid"), Some("107184"));
    assert_eq!(callback.param("to"), Some("+393330000001"));
    assert_eq!(callback.param("reply"), Some("id:1a2b0 stat:DELIVRD"));
    assert_eq!(dlr.callbacks(), callbacks);
}

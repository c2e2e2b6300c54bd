//! The npm SMSC harness itself (tests/src/npm_smsc.rs): the SMSC built on the npm `smpp`
//! package, spoken to with hand-built PDUs over a plain TcpStream. This proves the harness and
//! the script, not the gateway.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::npm_smsc::{IdFormat, NpmSmsc, NpmSmscOptions, Receipts, require_npm_smsc};

const WAIT: Duration = Duration::from_secs(10);

const BIND_TRANSCEIVER: u32 = 0x0000_0009;
const SUBMIT_SM: u32 = 0x0000_0004;
const DELIVER_SM: u32 = 0x0000_0005;
const UNBIND: u32 = 0x0000_0006;
const RESP: u32 = 0x8000_0000;

/// One PDU as read: command_id, command_status, sequence_number, body.
#[derive(Debug)]
struct Pdu {
    id: u32,
    status: u32,
    seq: u32,
    body: Vec<u8>,
}

fn connect(smsc: &NpmSmsc) -> TcpStream {
    let stream = TcpStream::connect(smsc.addr()).expect("connect to the npm SMSC");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

fn send(stream: &mut TcpStream, id: u32, seq: u32, body: &[u8]) {
    let mut pdu = Vec::with_capacity(16 + body.len());
    pdu.extend_from_slice(&(16 + body.len() as u32).to_be_bytes());
    pdu.extend_from_slice(&id.to_be_bytes());
    pdu.extend_from_slice(&0u32.to_be_bytes());
    pdu.extend_from_slice(&seq.to_be_bytes());
    pdu.extend_from_slice(body);
    stream.write_all(&pdu).expect("write a PDU");
}

fn read(stream: &mut TcpStream) -> Pdu {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).expect("read a PDU header");
    let word = |i: usize| u32::from_be_bytes(header[i..i + 4].try_into().unwrap());
    let mut body = vec![0u8; word(0) as usize - 16];
    stream.read_exact(&mut body).expect("read a PDU body");
    Pdu {
        id: word(4),
        status: word(8),
        seq: word(12),
        body,
    }
}

/// A C-Octet String.
fn cstr(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn bind_transceiver(system_id: &str, password: &str) -> Vec<u8> {
    [
        cstr(system_id),
        cstr(password),
        cstr(""),
        vec![0x34, 0, 0],
        cstr(""),
    ]
    .concat()
}

/// A submit_sm from alphanumeric `OTPGATE` to international `to`, receipt requested.
fn submit_sm(to: &str, data_coding: u8, esm_class: u8, short_message: &[u8]) -> Vec<u8> {
    [
        cstr(""),
        vec![5, 0],
        cstr("OTPGATE"),
        vec![1, 1],
        cstr(to),
        // esm_class, protocol_id, priority_flag
        vec![esm_class, 0, 0],
        cstr(""),
        cstr(""),
        // registered_delivery, replace_if_present_flag, data_coding, sm_default_msg_id
        vec![1, 0, data_coding, 0],
        vec![short_message.len() as u8],
        short_message.to_vec(),
    ]
    .concat()
}

fn ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

fn by_event<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["event"] == kind)
        .collect()
}

/// Bind, GSM-7 with extension characters, UCS-2, a two-part concatenated message, a receipt
/// with TLVs answered, unbind: the SMSC reports each as the npm package decoded it.
#[test]
fn npm_smsc_decodes_submits_and_sends_receipts() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start(NpmSmscOptions::default());
    assert_ne!(smsc.port(), 0);
    let mut stream = connect(&smsc);

    send(
        &mut stream,
        BIND_TRANSCEIVER,
        1,
        &bind_transceiver("otpgate", "secret12"),
    );
    let bound = read(&mut stream);
    assert_eq!(
        (bound.id, bound.status, bound.seq),
        (BIND_TRANSCEIVER | RESP, 0, 1)
    );
    assert_eq!(bound.body, cstr("npm-smsc"));

    // GSM 03.38, unpacked: "Code 123456 €{}" with € as 0x1B 0x65, { as 0x1B 0x28, } as 0x1B 0x29.
    let gsm = [
        b"Code 123456 ".as_slice(),
        &[0x1B, 0x65, 0x1B, 0x28, 0x1B, 0x29],
    ]
    .concat();
    send(
        &mut stream,
        SUBMIT_SM,
        2,
        &submit_sm("393331234567", 0, 0, &gsm),
    );
    let answer = read(&mut stream);
    assert_eq!(
        (answer.id, answer.status, answer.seq),
        (SUBMIT_SM | RESP, 0, 2)
    );
    assert_eq!(answer.body, cstr("0000A1F3"), "hex ids, zero-padded");

    // Its receipt: a deliver_sm with esm_class 0x04, the id in its other form.
    let receipt = read(&mut stream);
    assert_eq!(receipt.id, DELIVER_SM);
    let text = String::from_utf8_lossy(&receipt.body);
    assert!(text.contains("id:a1f3 sub:001 dlvrd:001"), "{text:?}");
    assert!(text.contains("stat:DELIVRD err:000"), "{text:?}");
    assert!(
        receipt
            .body
            .windows(9)
            .any(|w| w == [0x00, 0x1E, 0x00, 0x05, b'a', b'1', b'f', b'3', 0]),
        "a receipted_message_id TLV: {:02x?}",
        receipt.body
    );
    send(&mut stream, DELIVER_SM | RESP, receipt.seq, &cstr(""));

    send(
        &mut stream,
        SUBMIT_SM,
        3,
        &submit_sm("393331234568", 8, 0, &ucs2("Код 123456 ✓")),
    );
    assert_eq!(read(&mut stream).status, 0);

    // Two parts, UDH 05 00 03 ref total seq, sent second part first.
    let udh = |seq: u8| vec![0x05, 0x00, 0x03, 0x2A, 0x02, seq];
    send(
        &mut stream,
        SUBMIT_SM,
        4,
        &submit_sm(
            "393331234569",
            0,
            0x40,
            &[udh(2), b"part two".to_vec()].concat(),
        ),
    );
    send(
        &mut stream,
        SUBMIT_SM,
        5,
        &submit_sm(
            "393331234569",
            0,
            0x40,
            &[udh(1), b"part one, ".to_vec()].concat(),
        ),
    );
    // Answers and receipts interleave; take PDUs until both answers are in, acking receipts.
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let pdu = read(&mut stream);
        if pdu.id == DELIVER_SM {
            send(&mut stream, DELIVER_SM | RESP, pdu.seq, &cstr(""));
        } else {
            assert_eq!((pdu.id, pdu.status), (SUBMIT_SM | RESP, 0));
            answered.push(pdu.seq);
        }
    }

    let events = smsc.wait_for(
        |events| {
            by_event(events, "message").len() == 3
                && by_event(events, "receipt_acked")
                    .iter()
                    .any(|acked| acked["message_id"] == "0000A1F3")
        },
        WAIT,
    );
    let bind = &by_event(&events, "bind")[0];
    assert_eq!(bind["command"], "bind_transceiver");
    assert_eq!(bind["system_id"], "otpgate");
    assert_eq!(bind["status"], 0);

    let submits = by_event(&events, "submit");
    assert_eq!(submits.len(), 4, "{}", smsc.dump());
    let first = submits[0];
    assert_eq!(first["destination_addr"], "393331234567");
    assert_eq!(first["source_addr"], "OTPGATE");
    assert_eq!(first["source_addr_ton"], 5);
    assert_eq!(first["dest_addr_ton"], 1);
    assert_eq!(first["data_coding"], 0);
    assert_eq!(first["registered_delivery"], 1);
    assert_eq!(first["status"], 0);
    assert_eq!(first["message_id"], "0000A1F3");
    assert_eq!(first["short_message_hex"], hex::encode(&gsm));
    assert_eq!(first["text"], "Code 123456 €{}");
    assert_eq!(first["udh"], Value::Null);
    assert_eq!(submits[1]["text"], "Код 123456 ✓");
    assert_eq!(
        submits[2]["udh"],
        serde_json::json!({"ref": 42, "total": 2, "seq": 2})
    );
    assert_eq!(submits[2]["text"], "part two");

    let messages = by_event(&events, "message");
    assert_eq!(messages[0]["destination_addr"], "393331234567");
    assert_eq!(messages[0]["text"], "Code 123456 €{}");
    assert_eq!(messages[0]["parts"], 1);
    assert_eq!(messages[1]["text"], "Код 123456 ✓");
    assert_eq!(messages[1]["data_coding"], 8);
    assert_eq!(messages[2]["destination_addr"], "393331234569");
    assert_eq!(messages[2]["text"], "part one, part two");
    assert_eq!(messages[2]["parts"], 2);

    let sent = by_event(&events, "receipt_sent");
    assert_eq!(sent[0]["message_id"], "0000A1F3");
    assert_eq!(sent[0]["receipt_id"], "a1f3");
    assert_eq!(
        by_event(&events, "receipt_acked")[0]["status"],
        0,
        "{}",
        smsc.dump()
    );

    send(&mut stream, UNBIND, 6, &[]);
    loop {
        let pdu = read(&mut stream);
        if pdu.id == UNBIND | RESP {
            break;
        }
        // Late receipts of the last parts.
        assert_eq!(pdu.id, DELIVER_SM);
    }
    // The SMSC ends its side after unbind_resp; the session closes once ours is closed too.
    assert_eq!(stream.read(&mut [0u8; 1]).expect("end of stream"), 0);
    drop(stream);
    smsc.wait_for(|events| !by_event(events, "close").is_empty(), WAIT);
    assert_eq!(smsc.events_of("unbind").len(), 1);
    assert!(smsc.errors().is_empty(), "{}", smsc.dump());
    assert_eq!(smsc.messages().len(), 3);
    assert_eq!(smsc.submits().len(), 4);
    assert!(
        !smsc.dump().contains("secret12"),
        "the password is never printed"
    );
}

/// Wrong credentials are refused with their own statuses; the first submits are throttled and
/// then refused for a full queue, as configured; decimal ids; no receipts asked, none sent.
#[test]
fn npm_smsc_refuses_binds_and_throttles_as_told() {
    if !require_npm_smsc() {
        return;
    }
    let smsc = NpmSmsc::start(NpmSmscOptions {
        system_id: "carrier1".to_owned(),
        password: "pw".to_owned(),
        throttle_first: 2,
        qfull_first: 1,
        receipts: Receipts::None,
        id_format: IdFormat::Decimal,
        delivery_delay: Duration::ZERO,
    });
    let mut stream = connect(&smsc);
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        1,
        &bind_transceiver("carrier1", "nope"),
    );
    assert_eq!(read(&mut stream).status, 0x0E, "ESME_RINVPASWD");
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        2,
        &bind_transceiver("otpgate", "pw"),
    );
    assert_eq!(read(&mut stream).status, 0x0F, "ESME_RINVSYSID");
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        3,
        &bind_transceiver("carrier1", "pw"),
    );
    assert_eq!(read(&mut stream).status, 0);

    let statuses: Vec<u32> = (0..4)
        .map(|n| {
            send(
                &mut stream,
                SUBMIT_SM,
                10 + n,
                &submit_sm("39333", 0, 0, b"hi"),
            );
            let answer = read(&mut stream);
            assert_eq!(answer.seq, 10 + n);
            answer.status
        })
        .collect();
    assert_eq!(statuses, [0x58, 0x58, 0x14, 0]);

    let events = smsc.wait_for(|events| by_event(events, "message").len() == 1, WAIT);
    let submits = by_event(&events, "submit");
    let answers: Vec<&Value> = submits.iter().map(|submit| &submit["status"]).collect();
    assert_eq!(answers, [88, 88, 20, 0]);
    assert_eq!(submits[0]["message_id"], Value::Null);
    assert_eq!(submits[3]["message_id"], "4711001");
    assert_eq!(
        by_event(&events, "message")[0]["message_ids"],
        serde_json::json!(["4711001"])
    );
    let binds: Vec<&Value> = by_event(&events, "bind")
        .into_iter()
        .map(|bind| &bind["status"])
        .collect();
    assert_eq!(binds, [14, 15, 0]);
    // registered_delivery 1, but receipts are off.
    std::thread::sleep(Duration::from_millis(100));
    assert!(smsc.events_of("receipt_sent").is_empty(), "{}", smsc.dump());
}

/// With a delivery delay, a submit is answered at once, but its message reaches the handset
/// only after the delay, and its receipt after that; without one, at once.
#[test]
fn npm_smsc_delivers_late_when_told() {
    if !require_npm_smsc() {
        return;
    }
    const DELAY: Duration = Duration::from_millis(1500);
    let smsc = NpmSmsc::start(NpmSmscOptions {
        delivery_delay: DELAY,
        ..NpmSmscOptions::default()
    });
    let mut stream = connect(&smsc);
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        1,
        &bind_transceiver("otpgate", "secret12"),
    );
    assert_eq!(read(&mut stream).status, 0);
    let submitted = Instant::now();
    send(
        &mut stream,
        SUBMIT_SM,
        2,
        &submit_sm("393331234567", 0, 0, b"Code 123456"),
    );
    let answer = read(&mut stream);
    assert_eq!((answer.id, answer.status), (SUBMIT_SM | RESP, 0));
    assert!(submitted.elapsed() < DELAY / 2, "answered at once");
    smsc.wait_for(|events| by_event(events, "message").len() == 1, WAIT);
    assert_eq!(smsc.handset_code_for("+393331234567"), None, "not yet");
    assert!(smsc.handsets().is_empty(), "{}", smsc.dump());

    let receipt = read(&mut stream);
    let took = submitted.elapsed();
    assert_eq!(receipt.id, DELIVER_SM);
    assert!(took >= DELAY, "the receipt came after {took:?}");
    send(&mut stream, DELIVER_SM | RESP, receipt.seq, &cstr(""));
    let events = smsc.wait_for(|events| by_event(events, "receipt_acked").len() == 1, WAIT);
    assert_eq!(
        smsc.handset_code_for("+393331234567").as_deref(),
        Some("123456")
    );
    assert_eq!(smsc.handset_code_for("+393331234568"), None);
    let order: Vec<&str> = events
        .iter()
        .filter_map(|event| event["event"].as_str())
        .filter(|kind| ["message", "handset", "receipt_sent"].contains(kind))
        .collect();
    assert_eq!(order, ["message", "handset", "receipt_sent"]);
    let handset = &by_event(&events, "handset")[0];
    assert_eq!(handset["text"], "Code 123456");
    assert_eq!(handset["message_ids"], serde_json::json!(["0000A1F3"]));
    assert!(smsc.errors().is_empty(), "{}", smsc.dump());

    // By default the message is on the handset at once.
    let prompt = NpmSmsc::start_default();
    let mut stream = connect(&prompt);
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        1,
        &bind_transceiver("otpgate", "secret12"),
    );
    assert_eq!(read(&mut stream).status, 0);
    send(
        &mut stream,
        SUBMIT_SM,
        2,
        &submit_sm("393331234567", 0, 0, b"Code 654321"),
    );
    assert_eq!(read(&mut stream).status, 0);
    prompt.wait_for(|events| by_event(events, "handset").len() == 1, DELAY / 2);
    assert_eq!(
        prompt.handset_code_for("+393331234567").as_deref(),
        Some("654321")
    );
}

/// Dropped, the SMSC's process is gone and its port refuses connections; a killed one restarts
/// on the same port.
#[test]
fn npm_smsc_restarts_on_its_port_and_is_gone_once_dropped() {
    if !require_npm_smsc() {
        return;
    }
    let mut smsc = NpmSmsc::start_default();
    let port = smsc.port();
    assert!(smsc.is_running());
    smsc.kill();
    assert!(!smsc.is_running());
    assert!(TcpStream::connect(smsc.addr()).is_err());

    smsc.restart();
    assert_eq!(smsc.port(), port);
    assert_eq!(smsc.events_of("listening").len(), 2);
    let mut stream = connect(&smsc);
    send(
        &mut stream,
        BIND_TRANSCEIVER,
        1,
        &bind_transceiver("otpgate", "secret12"),
    );
    assert_eq!(read(&mut stream).status, 0);

    let addr = smsc.addr();
    drop(smsc);
    assert!(TcpStream::connect(addr).is_err());
}

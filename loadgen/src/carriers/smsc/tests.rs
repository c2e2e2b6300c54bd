//! The simulator driven over real TCP by a tiny ESME on the same rusmpp codec.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway::sms::SmsText;
use gateway::sms_wire::{self, Coding};
use rusmpp::pdus::{BindTransceiver, BindTransmitter, DeliverSmResp, SubmitSm};
use rusmpp::tlvs::TlvValue;
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::OctetString;
use rusmpp::values::{DataCoding, EsmClass, MessageState, RegisteredDelivery};
use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::carriers::network::Unread;
use crate::carriers::settings::{Dist, HandsetSettings, Phones, TimelineEntry};

const SYSTEM_ID: &str = "otpgate";
const PASSWORD: &str = "secret1";

struct Sim {
    smsc: SimSmsc,
    network: Arc<Network>,
    messages: mpsc::Receiver<SmscMessage>,
    stop: CancellationToken,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A simulator with 100 users (`+39333` and 7 digits, handsets without delay) and a capacity of
/// 1,000 a second; `tune` adjusts its settings first.
async fn sim(tune: impl FnOnce(&mut SmscSettings)) -> Sim {
    let phones = Phones {
        prefix: "+39333".to_owned(),
        digits: 7,
        first: 0,
    };
    let network = Arc::new(Network::new(
        phones,
        HandsetSettings::faultless(),
        Arc::new(Unread),
        100,
    ));
    let carrier = CarrierSettings::steady(
        "smsc",
        SocketAddr::from(([127, 0, 0, 1], 0)),
        1000.0,
        Duration::ZERO,
        Duration::ZERO,
        Protocol::Smpp(Smpp::default()),
    );
    let mut settings = SmscSettings::from_carrier(&carrier, Instant::now());
    settings.login = Login {
        system_id: SYSTEM_ID.to_owned(),
        password: PASSWORD.to_owned(),
    };
    let (sender, messages) = mpsc::channel(64);
    settings.messages = Some(sender);
    tune(&mut settings);
    let stop = CancellationToken::new();
    let smsc = start(settings, network.clone(), stop.clone())
        .await
        .unwrap();
    Sim {
        smsc,
        network,
        messages,
        stop,
    }
}

/// A tiny ESME.
struct Esme {
    read: FramedRead<OwnedReadHalf, CommandCodec>,
    write: OwnedWriteHalf,
    sequence: u32,
}

impl Esme {
    async fn connect(addr: SocketAddr) -> Esme {
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        Esme {
            read: FramedRead::new(read, CommandCodec::new()),
            write,
            sequence: 0,
        }
    }

    async fn send(&mut self, pdu: impl Into<Pdu>) -> u32 {
        self.sequence += 1;
        let command = Command::new(CommandStatus::EsmeRok, self.sequence, pdu);
        self.send_command(command).await;
        self.sequence
    }

    async fn send_command(&mut self, command: Command) {
        let mut buffer = bytes::BytesMut::new();
        CommandCodec::new().encode(command, &mut buffer).unwrap();
        self.write.write_all(&buffer).await.unwrap();
    }

    /// The next PDU, or `None` once the SMSC closed the connection.
    async fn recv(&mut self) -> Option<Command> {
        tokio::time::timeout(Duration::from_secs(2), self.read.next())
            .await
            .expect("an answer within 2 s")
            .and_then(Result::ok)
    }

    async fn bind(&mut self, system_id: &str, password: &str) -> CommandStatus {
        let bind = BindTransceiver::builder()
            .system_id(system_id.parse().unwrap())
            .password(password.parse().unwrap())
            .build();
        let sequence = self.send(bind).await;
        let answer = self.recv().await.expect("a bind answer");
        assert_eq!(answer.id(), CommandId::BindTransceiverResp);
        assert_eq!(answer.sequence_number(), sequence);
        answer.status()
    }

    async fn bound(addr: SocketAddr) -> Esme {
        let mut esme = Esme::connect(addr).await;
        assert_eq!(esme.bind(SYSTEM_ID, PASSWORD).await, CommandStatus::EsmeRok);
        esme
    }
}

fn submit(to: &str, part: &sms_wire::Part, receipt: bool) -> SubmitSm {
    SubmitSm::builder()
        .source_addr("OTPGATE".parse().unwrap())
        .destination_addr(to.parse().unwrap())
        .esm_class(EsmClass::from(part.esm_class))
        .data_coding(DataCoding::from(part.data_coding))
        .registered_delivery(RegisteredDelivery::from(u8::from(receipt)))
        .short_message(OctetString::from_slice(&part.short_message).unwrap())
        .build()
}

fn parts(text: &str, coding: &Coding) -> Vec<sms_wire::Part> {
    sms_wire::encode(&SmsText::new(text.to_owned()), coding, 7)
}

/// Waits (at most 2 s) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[tokio::test]
async fn binds_are_checked_and_the_session_answered() {
    let sim = sim(|_| {}).await;
    let addr = sim.smsc.local_addr();
    let mut esme = Esme::connect(addr).await;
    // A submit before any bind.
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    let sequence = esme.send(submit("+393330000001", part, false)).await;
    let answer = esme.recv().await.unwrap();
    assert_eq!(answer.id(), CommandId::SubmitSmResp);
    assert_eq!(answer.sequence_number(), sequence);
    assert_eq!(answer.status(), CommandStatus::EsmeRinvbndsts);
    assert_eq!(
        esme.bind(SYSTEM_ID, "wrong").await,
        CommandStatus::EsmeRinvpaswd
    );
    assert_eq!(
        esme.bind("someone", PASSWORD).await,
        CommandStatus::EsmeRinvsysid
    );
    assert_eq!(esme.bind(SYSTEM_ID, PASSWORD).await, CommandStatus::EsmeRok);
    assert_eq!(
        esme.bind(SYSTEM_ID, PASSWORD).await,
        CommandStatus::EsmeRalybnd
    );
    let sequence = esme.send(Pdu::EnquireLink).await;
    let answer = esme.recv().await.unwrap();
    assert_eq!(answer.id(), CommandId::EnquireLinkResp);
    assert_eq!(answer.sequence_number(), sequence);
    esme.send(Pdu::Unbind).await;
    assert_eq!(esme.recv().await.unwrap().id(), CommandId::UnbindResp);
    assert!(esme.recv().await.is_none(), "closed after unbind");
    let counts = &sim.smsc.counts().smpp;
    assert_eq!(load(&counts.binds), 1);
    assert_eq!(load(&counts.binds_refused), 3);
    assert_eq!(sim.smsc.summary().binds, 1);
}

#[tokio::test]
async fn a_submit_is_answered_with_an_id_and_reaches_the_handset() {
    let mut sim = sim(|_| {}).await;
    let user = 3;
    let phone = sim.network.phones.phone(user);
    let mut inbox = sim.network.handsets.register(user);
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    let sequence = esme.send(submit(&phone, part, false)).await;
    let answer = esme.recv().await.unwrap();
    assert_eq!(answer.status(), CommandStatus::EsmeRok);
    assert_eq!(answer.sequence_number(), sequence);
    let Some(Pdu::SubmitSmResp(resp)) = answer.pdu() else {
        panic!("{answer:?}");
    };
    assert_eq!(resp.message_id().as_str(), "00000001");
    let text = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*text, "Il tuo codice: 123456");
    let message = sim.messages.recv().await.unwrap();
    assert_eq!(
        message,
        SmscMessage {
            destination: phone.clone(),
            text: "Il tuo codice: 123456".to_owned(),
            data_coding: 0,
            parts: 1,
        }
    );
    assert_eq!(sim.network.accepted_for(user), 1);
    // The same text to the same number again is a duplicate, beyond the user's resends.
    sim.network.resend_pressed(user);
    for _ in 0..3 {
        esme.send(submit(&phone, part, false)).await;
        esme.recv().await.unwrap();
    }
    let counts = sim.smsc.counts();
    eventually("four messages", || load(&counts.smpp.messages) == 4).await;
    assert_eq!(load(&counts.smpp.duplicates), 2);
    assert_eq!(load(&counts.accepted), 4);
}

#[tokio::test]
async fn a_sliding_second_takes_a_seconds_capacity_at_once_and_no_more() {
    let sim = sim(|settings| {
        settings.carrier.base.capacity_per_sec = 20.0;
        settings.capacity_rule = CapacityRule::SlidingSecond;
    })
    .await;
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    for n in 0..50 {
        esme.send(submit(&format!("+4470000{n:05}"), part, false))
            .await;
    }
    let mut accepted = 0u32;
    for _ in 0..50 {
        if esme.recv().await.unwrap().status() == CommandStatus::EsmeRok {
            accepted += 1;
        }
    }
    // The whole second's capacity at once (the bucket would take 2), and nothing more within
    // the second.
    assert_eq!(accepted, 20);
}

#[tokio::test]
async fn the_summary_says_how_long_answers_took() {
    let sim = sim(|settings| {
        settings.carrier.base.latency = Dist::Constant(Duration::from_millis(30));
    })
    .await;
    assert_eq!(sim.smsc.summary().mean_answer_micros, None);
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    for n in 0..5 {
        esme.send(submit(&format!("+4470000{n:05}"), part, false))
            .await;
    }
    for _ in 0..5 {
        esme.recv().await.unwrap();
    }
    let summary = sim.smsc.summary();
    let (mean, max) = (
        summary.mean_answer_micros.unwrap(),
        summary.max_answer_micros.unwrap(),
    );
    assert!((30_000..2_000_000).contains(&mean), "{mean}");
    assert!(max >= mean, "{max} < {mean}");
}

#[tokio::test]
async fn above_capacity_submits_are_throttled() {
    let sim = sim(|settings| settings.carrier.base.capacity_per_sec = 20.0).await;
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    let started = Instant::now();
    for n in 0..100 {
        esme.send(submit(&format!("+4470000{n:05}"), part, false))
            .await;
    }
    let (mut accepted, mut throttled) = (0u32, 0u32);
    for _ in 0..100 {
        let answer = esme.recv().await.unwrap();
        match answer.status() {
            CommandStatus::EsmeRok => accepted += 1,
            CommandStatus::EsmeRthrottled => throttled += 1,
            other => panic!("{other:?}"),
        }
    }
    // A tenth of a second's capacity at once, then 20/s.
    let allowed = 2.0 + 20.0 * started.elapsed().as_secs_f64() + 1.0;
    assert!(
        accepted >= 2 && f64::from(accepted) <= allowed,
        "{accepted}"
    );
    assert_eq!(accepted + throttled, 100);
    let counts = sim.smsc.counts();
    assert_eq!(load(&counts.throttled), u64::from(throttled));
    assert_eq!(sim.smsc.summary().submit_sm, 100);
    // Strangers: numbers outside the scenario.
    eventually("strangers", || {
        sim.network.strangers.load(Ordering::Relaxed) == u64::from(accepted)
    })
    .await;
}

#[tokio::test]
async fn a_concatenated_message_is_reassembled_for_the_handset() {
    for packed in [false, true] {
        let mut sim = sim(|settings| settings.smpp.gsm7_packed = packed).await;
        let user = 7;
        let phone = sim.network.phones.phone(user);
        let mut inbox = sim.network.handsets.register(user);
        let mut esme = Esme::bound(sim.smsc.local_addr()).await;
        let text = format!(
            "Il tuo codice di verifica per la prenotazione è 654321. {}Fine.",
            "Non condividerlo con nessuno. ".repeat(5)
        );
        let coding = Coding {
            gsm7_packed: packed,
            ..Coding::default()
        };
        let parts = parts(&text, &coding);
        assert_eq!(parts.len(), 2);
        // The second part first: reassembly goes by sequence, not arrival.
        for part in parts.iter().rev() {
            esme.send(submit(&phone, part, false)).await;
            assert_eq!(esme.recv().await.unwrap().status(), CommandStatus::EsmeRok);
        }
        let received = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&*received, text);
        let message = sim.messages.recv().await.unwrap();
        assert_eq!((message.parts, message.data_coding), (2, 0));
        let counts = sim.smsc.counts();
        assert_eq!(load(&counts.smpp.parts), 2);
        assert_eq!(load(&counts.smpp.messages), 1);
        assert_eq!(load(&counts.accepted), 2);
        assert_eq!(sim.network.accepted_for(user), 1);
    }
}

#[tokio::test]
async fn ucs2_and_the_carriers_own_data_codings_are_read() {
    let mut sim = sim(|settings| {
        settings.smpp.gsm7_data_coding = 0xF0;
        settings.smpp.ucs2_data_coding = 0x18;
    })
    .await;
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let coding = Coding {
        gsm7_packed: false,
        gsm7_data_coding: 0xF0,
        ucs2_data_coding: 0x18,
    };
    let ucs2 = "Ваш код: 246810 ✓";
    for text in [ucs2, "Codice: 135790"] {
        let part = &parts(text, &coding)[0];
        esme.send(submit("+4470000001", part, false)).await;
        assert_eq!(esme.recv().await.unwrap().status(), CommandStatus::EsmeRok);
        let message = sim.messages.recv().await.unwrap();
        assert_eq!(message.text, text);
        assert_eq!(message.data_coding, part.data_coding);
    }
    // A text in message_payload instead of short_message.
    let part = &parts(ucs2, &coding)[0];
    let mut payload = submit("+4470000002", part, false);
    payload.set_short_message(OctetString::empty());
    payload.push_tlv(
        rusmpp::tlvs::MessageSubmissionRequestTlvValue::MessagePayload(
            rusmpp::values::MessagePayload::new(rusmpp::types::AnyOctetString::from_slice(
                &part.short_message,
            )),
        ),
    );
    esme.send(payload).await;
    assert_eq!(esme.recv().await.unwrap().status(), CommandStatus::EsmeRok);
    assert_eq!(sim.messages.recv().await.unwrap().text, ucs2);
    // A data_coding the simulator does not read.
    let mut binary = submit("+4470000003", part, false);
    binary.data_coding = DataCoding::from(0x04);
    esme.send(binary).await;
    assert_eq!(
        esme.recv().await.unwrap().status(),
        CommandStatus::EsmeRsubmitfail
    );
    assert_eq!(load(&sim.smsc.counts().smpp.decode_errors), 1);
}

#[tokio::test]
async fn a_receipt_comes_as_deliver_sm_and_its_answer_is_counted() {
    for format in [ReceiptFormat::Both, ReceiptFormat::Text, ReceiptFormat::Tlv] {
        let sim = sim(|settings| {
            settings.smpp.receipt_format = format;
            settings.carrier.base.undeliverable_rate = 0.0;
        })
        .await;
        let mut esme = Esme::bound(sim.smsc.local_addr()).await;
        // Move the ids on so that the first has leading zeros and a letter: 0000000A.
        let part = &parts("Codice: 112233", &Coding::default())[0];
        for _ in 0..9 {
            esme.send(submit("+4470000001", part, false)).await;
            esme.recv().await.unwrap();
        }
        esme.send(submit("+4470000001", part, true)).await;
        let answer = esme.recv().await.unwrap();
        let Some(Pdu::SubmitSmResp(resp)) = answer.pdu() else {
            panic!("{answer:?}");
        };
        assert_eq!(resp.message_id().as_str(), "0000000A");
        let receipt = esme.recv().await.unwrap();
        let Some(Pdu::DeliverSm(deliver)) = receipt.pdu() else {
            panic!("{receipt:?}");
        };
        assert_eq!(u8::from(deliver.esm_class), 0x04);
        assert_eq!(deliver.source_addr.as_str(), "+4470000001");
        assert_eq!(deliver.destination_addr.as_str(), "OTPGATE");
        let text = String::from_utf8(deliver.short_message().to_vec()).unwrap();
        let tlvs: Vec<_> = deliver
            .tlvs()
            .iter()
            .filter_map(|tlv| tlv.value())
            .collect();
        if format == ReceiptFormat::Tlv {
            assert!(text.is_empty(), "{text}");
        } else {
            assert!(
                text.starts_with("id:a sub:001 dlvrd:001 submit date:"),
                "{text}"
            );
            assert!(
                text.ends_with(" stat:DELIVRD err:000 text:Codice: 112233"),
                "{text}"
            );
        }
        if format == ReceiptFormat::Text {
            assert!(tlvs.is_empty(), "{tlvs:?}");
        } else {
            assert!(tlvs.iter().any(|tlv| matches!(tlv,
                TlvValue::ReceiptedMessageId(id) if id.as_str() == "a")));
            assert!(
                tlvs.iter()
                    .any(|tlv| matches!(tlv, TlvValue::MessageState(MessageState::Delivered)))
            );
        }
        esme.send_command(Command::new(
            CommandStatus::EsmeRok,
            receipt.sequence_number(),
            DeliverSmResp::default(),
        ))
        .await;
        let counts = sim.smsc.counts();
        eventually("the receipt's answer", || load(&counts.receipts_sent) == 1).await;
        assert_eq!(load(&counts.smpp.deliver_sm), 1);
        assert_eq!(sim.smsc.summary().receipts_acked, 1);
    }
}

#[tokio::test]
async fn a_receipt_waits_for_a_receiver_and_says_undeliverable() {
    let sim = sim(|settings| settings.carrier.base.undeliverable_rate = 1.0).await;
    let addr = sim.smsc.local_addr();
    let mut transmitter = Esme::connect(addr).await;
    let bind = BindTransmitter::builder()
        .system_id(SYSTEM_ID.parse().unwrap())
        .password(PASSWORD.parse().unwrap())
        .build();
    transmitter.send(bind).await;
    assert_eq!(
        transmitter.recv().await.unwrap().status(),
        CommandStatus::EsmeRok
    );
    let part = &parts("Codice: 445566", &Coding::default())[0];
    transmitter.send(submit("+4470000001", part, true)).await;
    assert_eq!(
        transmitter.recv().await.unwrap().status(),
        CommandStatus::EsmeRok
    );
    let counts = sim.smsc.counts();
    eventually("a held receipt", || {
        Smsc::lock(&sim.smsc.smsc.held).len() == 1
    })
    .await;
    assert_eq!(load(&counts.undeliverable), 1);
    let mut receiver = Esme::bound(addr).await;
    let receipt = receiver.recv().await.unwrap();
    let Some(Pdu::DeliverSm(deliver)) = receipt.pdu() else {
        panic!("{receipt:?}");
    };
    let text = String::from_utf8(deliver.short_message().to_vec()).unwrap();
    assert!(text.contains(" stat:UNDELIV err:001 "), "{text}");
    assert!(deliver.tlvs().iter().any(|tlv| matches!(
        tlv.value(),
        Some(TlvValue::MessageState(MessageState::Undeliverable))
    )));
    // An error answer is counted as a failed receipt.
    receiver
        .send_command(Command::new(
            CommandStatus::EsmeRsyserr,
            receipt.sequence_number(),
            DeliverSmResp::default(),
        ))
        .await;
    eventually("the receipt's refusal", || {
        load(&counts.smpp.receipts_nacked) == 1
    })
    .await;
    assert_eq!(load(&counts.receipts_failed), 1);
}

#[tokio::test]
async fn garbage_gets_a_generic_nack_or_a_close_never_a_panic() {
    let sim = sim(|_| {}).await;
    let addr = sim.smsc.local_addr();
    // A well-framed PDU of an unknown command: generic_nack with its sequence number, and the
    // connection goes on.
    let mut esme = Esme::bound(addr).await;
    for (command_id, sequence_number, status) in [
        (0x0000_0777, 4242, CommandStatus::EsmeRinvcmdid),
        // A submit_sm whose body is cut short.
        (0x0000_0004, 77, CommandStatus::EsmeRinvcmdlen),
    ] {
        let mut pdu = Vec::new();
        for word in [20u32, command_id, 0, sequence_number] {
            pdu.extend(word.to_be_bytes());
        }
        pdu.extend([0xFF, 0xFF, 0xFF, 0xFF]);
        esme.write.write_all(&pdu).await.unwrap();
        let nack = esme.recv().await.unwrap();
        assert_eq!(nack.id(), CommandId::GenericNack);
        assert_eq!(nack.sequence_number(), sequence_number);
        assert_eq!(nack.status(), status);
    }
    esme.send(Pdu::EnquireLink).await;
    assert_eq!(esme.recv().await.unwrap().id(), CommandId::EnquireLinkResp);

    // Not SMPP at all: a generic_nack, then the connection closes.
    let mut http = Esme::connect(addr).await;
    http.write
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let nack = http.recv().await.unwrap();
    assert_eq!(nack.id(), CommandId::GenericNack);
    assert_eq!(nack.status(), CommandStatus::EsmeRinvcmdlen);
    assert!(http.recv().await.is_none());
    // A length over the maximum too.
    let mut huge = Esme::connect(addr).await;
    huge.write
        .write_all(&[0, 1, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9])
        .await
        .unwrap();
    assert_eq!(huge.recv().await.unwrap().id(), CommandId::GenericNack);
    assert!(huge.recv().await.is_none());
    // Random octets, many times over: whatever the answers, the simulator still serves.
    for seed in 0..20u32 {
        let mut noise = Esme::connect(addr).await;
        let octets: Vec<u8> = (0..64u32)
            .map(|n| (n.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 13) as u8)
            .collect();
        let _ = noise.write.write_all(&octets).await;
        drop(noise);
    }
    let mut after = Esme::bound(addr).await;
    after.send(Pdu::EnquireLink).await;
    assert_eq!(after.recv().await.unwrap().id(), CommandId::EnquireLinkResp);
    assert!(load(&sim.smsc.counts().smpp.decode_errors) >= 4);
}

#[tokio::test]
async fn an_outage_on_the_timeline_drops_connections() {
    let sim = sim(|settings| {
        let mut down = settings.carrier.base.clone();
        down.down = true;
        settings.carrier.timeline = vec![TimelineEntry {
            from: Duration::ZERO,
            until: Duration::from_secs(600),
            state: down,
        }];
    })
    .await;
    let mut esme = Esme::connect(sim.smsc.local_addr()).await;
    let bind = BindTransceiver::builder()
        .system_id(SYSTEM_ID.parse().unwrap())
        .password(PASSWORD.parse().unwrap())
        .build();
    // The connection is closed at once: the bind may not even be written.
    let mut buffer = bytes::BytesMut::new();
    CommandCodec::new()
        .encode(Command::new(CommandStatus::EsmeRok, 1, bind), &mut buffer)
        .unwrap();
    let _ = esme.write.write_all(&buffer).await;
    assert!(esme.recv().await.is_none(), "no answer while down");
    assert!(load(&sim.smsc.counts().dropped) >= 1);
}

#[tokio::test]
async fn an_outage_drops_a_bound_connection() {
    let sim = sim(|settings| {
        let mut down = settings.carrier.base.clone();
        down.down = true;
        settings.carrier.timeline = vec![TimelineEntry {
            from: Duration::from_millis(300),
            until: Duration::from_secs(600),
            state: down,
        }];
    })
    .await;
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    tokio::time::sleep_until((sim.smsc.smsc.settings.started + Duration::from_millis(300)).into())
        .await;
    esme.send(Pdu::EnquireLink).await;
    assert!(esme.recv().await.is_none(), "dropped without an answer");
}

#[test]
fn the_steady_rate_leaves_out_the_first_and_last_tenth() {
    // 100 messages: ten slow ones at each end, eighty a millisecond apart in between.
    let mut at: Vec<u64> = (0..10).map(|n| n * 100_000).collect();
    let middle_start = 1_000_000;
    at.extend((0..80).map(|n| middle_start + n * 1_000));
    let end_start = middle_start + 80_000;
    at.extend((0..10).map(|n| end_start + n * 100_000));
    // Marks 10 and 90: from the first middle message to the first of the last ten.
    let rate = super::steady_rate(&at).unwrap();
    assert!((rate - 1_000.0).abs() < 1.0, "{rate}");
    assert_eq!(super::steady_rate(&at[..9]), None);
}

#[tokio::test]
async fn a_late_carrier_answers_at_once_and_sends_the_sms_and_its_receipt_late() {
    let delivery = Duration::from_millis(400);
    let sim = sim(|settings| {
        settings.carrier.base.delivery_delay = Dist::Constant(delivery);
        settings.carrier.base.receipt_delay = Dist::Constant(Duration::from_millis(200));
    })
    .await;
    let user = 5;
    let phone = sim.network.phones.phone(user);
    let mut inbox = sim.network.handsets.register(user);
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Codice: 778899", &Coding::default())[0];
    esme.send(submit(&phone, part, true)).await;
    let answer = esme.recv().await.unwrap();
    let accepted = Instant::now();
    assert_eq!(answer.status(), CommandStatus::EsmeRok);
    // Accepted at once: counted for the user before the SMS leaves the carrier.
    assert_eq!(sim.network.accepted_for(user), 1);
    let text = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    let on_handset = accepted.elapsed();
    assert_eq!(&*text, "Codice: 778899");
    let receipt = tokio::time::timeout(Duration::from_secs(5), esme.recv())
        .await
        .unwrap()
        .unwrap();
    let receipted = accepted.elapsed();
    assert_eq!(receipt.id(), CommandId::DeliverSm);
    // Handset at acceptance + delivery delay (+ no handset delay), the receipt 200 ms later.
    assert!(
        on_handset >= delivery - Duration::from_millis(5),
        "{on_handset:?}"
    );
    assert!(
        receipted >= delivery + Duration::from_millis(195),
        "{receipted:?}"
    );
    assert!(on_handset < receipted, "{on_handset:?} {receipted:?}");
}

#[tokio::test]
async fn a_lost_receipt_is_never_sent_but_the_sms_arrives() {
    let sim = sim(|settings| settings.carrier.base.receipt_loss = 1.0).await;
    let user = 6;
    let phone = sim.network.phones.phone(user);
    let mut inbox = sim.network.handsets.register(user);
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Codice: 101010", &Coding::default())[0];
    esme.send(submit(&phone, part, true)).await;
    assert_eq!(esme.recv().await.unwrap().status(), CommandStatus::EsmeRok);
    let text = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*text, "Codice: 101010");
    let counts = sim.smsc.counts();
    eventually("the receipt withheld", || {
        load(&counts.receipts_withheld) == 1
    })
    .await;
    // The receipt delay is zero: a receipt would be here by now.
    let next = tokio::time::timeout(Duration::from_millis(300), esme.recv()).await;
    assert!(next.is_err(), "{next:?}");
    assert_eq!(load(&counts.smpp.deliver_sm), 0);
}

#[tokio::test]
async fn the_messages_file_lists_each_destination_without_the_text() {
    let (sender, receiver) = mpsc::channel(MESSAGES_FILE_QUEUE);
    let sim = sim(|settings| settings.messages = Some(sender)).await;
    let path = std::env::temp_dir().join(format!(
        "loadgen-smsc-messages-{}-{}.txt",
        std::process::id(),
        rand::random::<u32>()
    ));
    let file = tokio::fs::File::create(&path).await.unwrap();
    let done = CancellationToken::new();
    let writer = tokio::spawn(write_messages_file(file, receiver, done.clone()));
    let first = sim.network.phones.phone(1);
    let second = sim.network.phones.phone(2);
    let mut esme = Esme::bound(sim.smsc.local_addr()).await;
    let part = &parts("Il tuo codice: 123456", &Coding::default())[0];
    for to in [&first, &second, &first] {
        esme.send(submit(to, part, false)).await;
        assert_eq!(esme.recv().await.unwrap().status(), CommandStatus::EsmeRok);
    }
    // Each line is flushed as it comes, so a reader sees it before the writer stops.
    eventually("three lines in the file", || {
        std::fs::read_to_string(&path).is_ok_and(|listed| listed.lines().count() == 3)
    })
    .await;
    done.cancel();
    assert_eq!(writer.await.unwrap().unwrap(), 3);
    let listed = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let destinations: Vec<&str> = listed
        .lines()
        .map(|line| {
            let (micros, destination) = line.split_once(' ').unwrap();
            assert!(micros.parse::<u64>().unwrap() > 0, "{line}");
            destination
        })
        .collect();
    assert_eq!(destinations, [&first, &second, &first]);
    assert!(!listed.contains("123456"), "the code is never written");
}

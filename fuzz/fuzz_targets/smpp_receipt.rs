//! A `deliver_sm` made from its parts, as an SMSC could send it (`esm_class`, the text, the
//! `receipted_message_id` and `message_state` TLVs), read by the gateway's receipt reader
//! (`gateway::carrier::read_receipt`): never a panic; a handset's message (no receipt bits in
//! `esm_class`, no `receipted_message_id`) is not a receipt; a `receipted_message_id` is taken
//! before the text's `id:`, and a `message_state` maps to the status gateway/src/carrier/smpp.rs
//! gives it; and the PDU, encoded and decoded by the SMPP codec, comes back the same.
#![no_main]

use bytes::BytesMut;
use gateway::receipt::ReceiptStatus;
use libfuzzer_sys::fuzz_target;
use rusmpp::Command;
use rusmpp::pdus::DeliverSm;
use rusmpp::tlvs::MessageDeliveryRequestTlvValue;
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{EsmClass, MessageState};
use tokio_util::codec::{Decoder, Encoder};

type Receipt = Option<(String, Option<ReceiptStatus>)>;

fuzz_target!(|input: (u8, &[u8], Option<&[u8]>, Option<u8>)| {
    let (esm_class, text, tlv_id, tlv_state) = input;
    read_parts(esm_class, text, tlv_id, tlv_state);
});

fn read_parts(esm_class: u8, text: &[u8], tlv_id: Option<&[u8]>, tlv_state: Option<u8>) {
    let Ok(short_message) = OctetString::<0, 255>::from_slice(text) else {
        return;
    };
    let mut builder = DeliverSm::builder()
        .esm_class(EsmClass::from(esm_class))
        .short_message(short_message);
    // A C-octet string holds no NUL but its last octet.
    let tlv_id = tlv_id.map(|id| {
        let mut id: Vec<u8> = id.iter().copied().filter(|&b| b != 0).take(64).collect();
        id.push(0);
        id
    });
    // Whether a receipted_message_id went in (ASCII only), and whether it names an id.
    let (mut id_pushed, mut id_given) = (false, false);
    if let Some(Ok(id)) = tlv_id.as_deref().map(COctetString::<1, 65>::from_slice) {
        (id_pushed, id_given) = (true, !id.is_empty());
        builder = builder.push_tlv(MessageDeliveryRequestTlvValue::ReceiptedMessageId(id));
    }
    if let Some(state) = tlv_state {
        builder = builder.push_tlv(MessageDeliveryRequestTlvValue::MessageState(
            MessageState::from(state),
        ));
    }
    let deliver = builder.build();
    let receipt = read_receipt(&deliver);
    check_receipt(receipt.clone());

    // The gateway's own reading of what it was given (gateway/src/carrier/smpp.rs, receipt_of).
    let marked = matches!(esm_class & 0x3C, 0x04 | 0x20);
    if !marked && !id_pushed {
        assert_eq!(receipt, None, "a handset's message is not a receipt");
    }
    if id_given {
        let (id, status) = receipt.expect("a receipted_message_id makes a receipt");
        let expected: Vec<u8> = tlv_id.expect("given").split_last().expect("NUL").1.to_vec();
        assert_eq!(
            id.as_bytes(),
            expected.as_slice(),
            "the TLV's id is taken first"
        );
        match tlv_state {
            Some(2) => assert_eq!(status, Some(ReceiptStatus::Delivered)),
            Some(3) => assert_eq!(status, Some(ReceiptStatus::Expired)),
            Some(4 | 5 | 8) => assert_eq!(status, Some(ReceiptStatus::Undeliverable)),
            Some(_) => assert_eq!(status, None, "an intermediate state"),
            None => {}
        }
    }

    // Round trip through the codec: what the gateway reads off the wire is what was built.
    let command = Command::builder()
        .status(rusmpp::CommandStatus::EsmeRok)
        .sequence_number(1)
        .pdu(deliver);
    round_trip(&command);
}

/// A decoded command encodes, and what it encodes to decodes to the same header and encodes to
/// the same octets again. (Not always to an equal command: rusmpp reads a PDU that has no body,
/// such as `enquire_link`, sent with octets after its header, as a header with no PDU, and
/// encodes that as the bare header, which reads back with its PDU.)
fn round_trip(command: &Command) {
    let mut codec = CommandCodec::new().without_max_length();
    let mut encoded = BytesMut::new();
    codec
        .encode(command, &mut encoded)
        .expect("a decoded command encodes");
    let octets = encoded.clone();
    let decoded = codec
        .decode(&mut encoded)
        .expect("an encoded command decodes")
        .expect("an encoded command is whole");
    assert!(encoded.is_empty(), "{} octets left over", encoded.len());
    assert_eq!(
        (decoded.id(), decoded.status(), decoded.sequence_number()),
        (command.id(), command.status(), command.sequence_number())
    );
    if command.pdu().is_some() {
        assert_eq!(&decoded, command);
    }
    let mut again = BytesMut::new();
    codec
        .encode(&decoded, &mut again)
        .expect("a decoded command encodes");
    assert_eq!(
        again, octets,
        "{command:?} encodes to other octets once read back"
    );
}

fn read_receipt(deliver: &DeliverSm) -> Receipt {
    gateway::carrier::read_receipt(deliver)
}

fn check_receipt(receipt: Receipt) {
    if let Some((id, _status)) = receipt {
        assert!(!id.is_empty(), "a receipt names its message id");
    }
}

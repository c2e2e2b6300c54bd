//! What an SMSC sends over a bound session, read as the gateway reads it: any bytes, arriving in
//! two reads split anywhere, go through the codec its SMPP client frames PDUs with (rusmpp's
//! `CommandCodec`, with the gateway's limit on a PDU's length) to commands or an error, never a
//! panic; and every `deliver_sm` goes through the gateway's receipt reader (`gateway::carrier::read_receipt`), whose receipts
//! always name a message id. The input is a byte placing the split, then the octets
//! (corpus/smpp_pdu holds a `deliver_sm` receipt, with and without TLVs, and an `enquire_link`).
//!
//! Commands read here are not encoded again: the gateway never sends back what it reads, and
//! rusmpp does not always encode a command decoded from arbitrary octets into octets it can
//! decode (a `replace_sm` with a short `message_payload` TLV, found by this target); the
//! `smpp_receipt` target round-trips the `deliver_sm` an SMSC (such as loadgen's) builds.
#![no_main]

use bytes::BytesMut;
use gateway::receipt::ReceiptStatus;
use libfuzzer_sys::fuzz_target;
use rusmpp::Pdu;
use rusmpp::pdus::DeliverSm;
use rusmpp::tokio_codec::CommandCodec;
use tokio_util::codec::Decoder;

/// The largest PDU the gateway reads from an SMSC (`MAX_PDU` in gateway/src/carrier/smpp.rs).
const MAX_PDU: usize = 64 * 1024;

type Receipt = Option<(String, Option<ReceiptStatus>)>;

fuzz_target!(|data: &[u8]| {
    let Some((&split, frames)) = data.split_first() else {
        return;
    };
    read_frames(frames, frames.len() * usize::from(split) / 255);
});

fn read_frames(frames: &[u8], split: usize) {
    let mut codec = CommandCodec::new().with_max_length(MAX_PDU);
    let (first, second) = frames.split_at(split.min(frames.len()));
    let mut buffer = BytesMut::from(first);
    let mut second = Some(second);
    loop {
        match codec.decode(&mut buffer) {
            Ok(Some(command)) => {
                if let Some(Pdu::DeliverSm(deliver)) = command.pdu() {
                    check_receipt(read_receipt(deliver));
                }
            }
            Ok(None) => match second.take() {
                Some(bytes) => buffer.extend_from_slice(bytes),
                None => break,
            },
            // The client drops the link on a frame it cannot decode.
            Err(_) => break,
        }
    }
}

fn read_receipt(deliver: &DeliverSm) -> Receipt {
    gateway::carrier::read_receipt(deliver)
}

fn check_receipt(receipt: Receipt) {
    if let Some((id, _status)) = receipt {
        assert!(!id.is_empty(), "a receipt names its message id");
    }
}

//! How the redis back-end writes what it keeps: records, SMS jobs, failed checks, and the
//! stream entry ids it reads them back by.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::StoreError;
use crate::clock::Millis;
use crate::ids::{AckToken, CarrierId, ClientId, VerificationId};
use crate::otp::StoredCode;
use crate::phone::Phone;
use crate::queue::Job;
use crate::store::effects::FailedChecks;
use crate::verification::{DeliveryState, EarlierSms, Extras, FailureReason, Status, Verification};

/// A stream entry id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamEntry(pub u64, pub u64);

// === impl StreamEntry ===

impl From<StreamEntry> for AckToken {
    fn from(entry: StreamEntry) -> AckToken {
        AckToken(entry.0, entry.1)
    }
}

impl From<AckToken> for StreamEntry {
    fn from(token: AckToken) -> StreamEntry {
        StreamEntry(token.0, token.1)
    }
}

impl StreamEntry {
    pub fn parse(text: &str) -> Option<StreamEntry> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamEntry(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl fmt::Display for StreamEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

// --- failed checks ---

/// Failed checks as Redis keeps them: `count:window_start`.
pub(crate) fn encode_failed(failed: &FailedChecks) -> String {
    format!("{}:{}", failed.count, failed.window_start_ms)
}

/// Decodes failed checks written by [`encode_failed`].
pub(crate) fn decode_failed(text: &str) -> Option<FailedChecks> {
    let (count, start) = text.split_once(':')?;
    Some(FailedChecks {
        count: count.parse().ok()?,
        window_start_ms: start.parse().ok()?,
    })
}

// --- jobs in streams ---

pub(crate) fn encode_job(job: &Job) -> String {
    format!(
        "{}:{}:{}:{}:{}:{}:{}",
        job.id,
        job.send_no,
        job.lane,
        job.deadline_ms,
        job.enqueued_ms,
        job.carriers,
        job.avoid_carrier.map_or(-1, i16::from),
    )
}

pub(crate) fn decode_job(text: &str) -> Option<Job> {
    let mut parts = text.split(':');
    let id = VerificationId::parse(parts.next()?)?;
    let send_no = parts.next()?.parse().ok()?;
    let lane = parts.next()?.parse().ok()?;
    let deadline_ms = parts.next()?.parse().ok()?;
    let enqueued_ms = parts.next()?.parse().ok()?;
    let carriers = parts.next()?.parse().ok()?;
    let avoid: i16 = parts.next()?.parse().ok()?;
    if carriers == 0 || parts.next().is_some() {
        return None;
    }
    Some(Job {
        id,
        send_no,
        lane,
        deadline_ms,
        seq: 0,
        enqueued_ms,
        attempts: 0,
        carriers,
        avoid_carrier: u8::try_from(avoid).ok(),
        passes: 0,
        entry: None,
        snapshot: None,
        check_presence: false,
    })
}

// --- records ---

/// A verification as Redis keeps it (JSON with short names: readable with `redis-cli`, and
/// small).
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    p: u64,
    pc: u8,
    cl: ClientId,
    s: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fr: Option<u8>,
    d: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<CarrierId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    /// The latest SMS's acceptance, its receipt's due moment, whether its carrier awaited
    /// receipts; the first delivery; reroutes; earlier SMS (`delivery.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    am: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rd: Option<Millis>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    aw: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dm: Option<Millis>,
    #[serde(default, skip_serializing_if = "is_zero")]
    rr: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    es: Vec<StoredEarlier>,
    da: u16,
    n: u8,
    al: u8,
    tag: String,
    sl: u32,
    cr: Millis,
    /// When the frontend was last seen, if later than the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sn: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fx: Option<Millis>,
    ra: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<Millis>,
    ln: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ah: Option<String>,
    v: u32,
}

/// An earlier SMS: `[carrier, message id, accepted, receipt due]`.
#[derive(Serialize, Deserialize)]
struct StoredEarlier(CarrierId, String, Millis, Option<Millis>);

fn is_zero(n: &u8) -> bool {
    *n == 0
}

const STATUSES: [Status; 5] = [
    Status::Pending,
    Status::Approved,
    Status::Expired,
    Status::Canceled,
    Status::Failed,
];
const DELIVERIES: [DeliveryState; 5] = [
    DeliveryState::Queued,
    DeliveryState::Submitted,
    DeliveryState::Delivered,
    DeliveryState::Undeliverable,
    DeliveryState::Held,
];
const FAILURES: [FailureReason; 2] = [FailureReason::TooManyAttempts, FailureReason::Undeliverable];

fn index_of<T: PartialEq>(all: &[T], value: &T) -> u8 {
    all.iter().position(|item| item == value).unwrap_or(0) as u8
}

/// Encodes a record for Redis.
pub fn encode_record(record: &Verification) -> Result<Vec<u8>, StoreError> {
    let (p, pc) = record.phone.to_parts();
    let (tag, sl) = record.code.to_parts();
    let extras = record.extras.as_deref();
    let stored = StoredRecord {
        p,
        pc,
        cl: record.client,
        s: index_of(&STATUSES, &record.status),
        fr: record.failure.map(|failure| index_of(&FAILURES, &failure)),
        d: index_of(&DELIVERIES, &record.delivery),
        c: record.carrier,
        m: record.carrier_message_id.as_deref().map(str::to_owned),
        am: record.accepted_ms,
        rd: record.receipt_due_ms,
        aw: record.awaits_receipt,
        dm: record.delivered_ms,
        rr: record.reroutes,
        es: record
            .earlier
            .as_deref()
            .map(|earlier| {
                earlier
                    .iter()
                    .map(|sms| {
                        StoredEarlier(
                            sms.carrier,
                            sms.message_id.to_string(),
                            sms.accepted_ms,
                            sms.receipt_due_ms,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        da: record.delivery_attempts,
        n: record.sends,
        al: record.attempts_left,
        tag: hex::encode(tag),
        sl,
        cr: record.created_ms,
        sn: (record.seen_ms != record.created_ms).then_some(record.seen_ms),
        fx: record.fixed_expiry_ms,
        ra: record.resend_after_ms,
        e: record.ended_ms,
        ln: record.lane,
        lo: extras.and_then(|x| x.locale.as_deref().map(str::to_owned)),
        wo: extras.and_then(|x| x.web_origin_host.as_deref().map(str::to_owned)),
        ah: extras.and_then(|x| x.app_hash.as_deref().map(str::to_owned)),
        v: record.version,
    };
    serde_json::to_vec(&stored).map_err(|error| StoreError::Protocol(error.to_string()))
}

/// Decodes a record written by [`encode_record`].
pub fn decode_record(bytes: &[u8]) -> Result<Verification, StoreError> {
    let stored: StoredRecord = serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Protocol(format!("a record does not parse: {error}")))?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(&stored.tag, &mut tag)
        .map_err(|_| StoreError::Protocol("a record's code tag".to_owned()))?;
    let pick = |all_len: usize, index: u8| -> Result<usize, StoreError> {
        let index = usize::from(index);
        if index < all_len {
            Ok(index)
        } else {
            Err(StoreError::Protocol(format!("a record's enum {index}")))
        }
    };
    let extras = (stored.lo.is_some() || stored.wo.is_some() || stored.ah.is_some()).then(|| {
        Box::new(Extras {
            locale: stored.lo.map(String::into_boxed_str),
            web_origin_host: stored.wo.map(String::into_boxed_str),
            app_hash: stored.ah.map(String::into_boxed_str),
        })
    });
    Ok(Verification {
        phone: Phone::from_parts(stored.p, stored.pc),
        client: stored.cl,
        status: STATUSES[pick(STATUSES.len(), stored.s)?],
        failure: match stored.fr {
            Some(index) => Some(FAILURES[pick(FAILURES.len(), index)?]),
            None => None,
        },
        delivery: DELIVERIES[pick(DELIVERIES.len(), stored.d)?],
        carrier: stored.c,
        carrier_message_id: stored.m.map(String::into_boxed_str),
        accepted_ms: stored.am,
        receipt_due_ms: stored.rd,
        awaits_receipt: stored.aw,
        delivered_ms: stored.dm,
        reroutes: stored.rr,
        earlier: (!stored.es.is_empty()).then(|| {
            Box::new(
                stored
                    .es
                    .into_iter()
                    .map(
                        |StoredEarlier(carrier, message_id, accepted_ms, receipt_due_ms)| {
                            EarlierSms {
                                carrier,
                                message_id: message_id.into_boxed_str(),
                                accepted_ms,
                                receipt_due_ms,
                            }
                        },
                    )
                    .collect(),
            )
        }),
        delivery_attempts: stored.da,
        sends: stored.n,
        attempts_left: stored.al,
        code: StoredCode::from_parts(tag, stored.sl),
        created_ms: stored.cr,
        seen_ms: stored.sn.unwrap_or(stored.cr),
        fixed_expiry_ms: stored.fx,
        resend_after_ms: stored.ra,
        ended_ms: stored.e,
        lane: stored.ln,
        queue_ticket: 0,
        extras,
        version: stored.v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_through_their_stream_form() {
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        let job = Job {
            id: VerificationId::new_for(&phone),
            send_no: 2,
            lane: 3,
            deadline_ms: 1_700_000_000_123,
            seq: 9,
            enqueued_ms: 1_700_000_000_000,
            attempts: 4,
            carriers: 0b101,
            avoid_carrier: Some(2),
            passes: 1,
            entry: None,
            snapshot: None,
            check_presence: false,
        };
        let back = decode_job(&encode_job(&job)).unwrap();
        assert_eq!(back.id, job.id);
        assert_eq!(
            (back.send_no, back.lane, back.deadline_ms, back.enqueued_ms),
            (2, 3, job.deadline_ms, job.enqueued_ms)
        );
        assert_eq!((back.carriers, back.avoid_carrier), (0b101, Some(2)));
        assert!(decode_job("garbage").is_none());
        assert!(decode_job(&encode_job(&job).replace(":5:", ":0:")).is_none());
    }
    #[test]
    fn stream_entries_parse_and_print() {
        assert_eq!(StreamEntry::parse("17-3"), Some(StreamEntry(17, 3)));
        assert_eq!(StreamEntry(17, 3).to_string(), "17-3");
        assert_eq!(StreamEntry::parse("17"), None);
    }
}

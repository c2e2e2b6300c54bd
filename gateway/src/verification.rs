//! A verification: its record, its two state machines, and how it is shown to frontends.
//!
//! `status`: `pending` → `approved` | `expired` | `canceled` | `failed`. Only a pending
//! verification changes; every other status is final.
//! `delivery.state`: `queued` → `submitted` → `delivered` | `undeliverable`; a resend puts a
//! submitted (or delivered) verification back to `queued`.
//!
//! Expiry follows docs/DESIGN.md section 4: the code lives `code_ttl` from the moment a carrier first
//! accepts its SMS, or, for a carrier whose receipts are awaited (`delivery.rs`), from its
//! `delivered` receipt. Until then the verification's expiry moves forward with the clock, by at
//! most `max_extension`, so time spent in the gateway's queue, or in a carrier's, never eats into
//! the user's session.

use serde::Serialize;

use crate::clock::{Millis, rfc3339};
use crate::config::VerificationPolicy;
use crate::ids::{CarrierId, ClientId, VerificationId};
use crate::otp::StoredCode;
use crate::phone::Phone;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Expired,
    Canceled,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Queued,
    Submitted,
    Delivered,
    Undeliverable,
    /// Its SMS was taken out of an overloaded queue because nobody had read the verification
    /// for `unseen_after`: it is queued again when someone reads it (or asks for a resend).
    Held,
}

/// Why a verification failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    TooManyAttempts,
    Undeliverable,
}

/// The kinds of webhook event a verification's changes raise, in the order of the `event` label's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Delayed,
    Submitted,
    Delivered,
    Failed,
    Approved,
    Expired,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Delayed,
        EventKind::Submitted,
        EventKind::Delivered,
        EventKind::Failed,
        EventKind::Approved,
        EventKind::Expired,
    ];

    /// The event's `type`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Delayed => "verification.delayed",
            EventKind::Submitted => "verification.submitted",
            EventKind::Delivered => "verification.delivered",
            EventKind::Failed => "verification.failed",
            EventKind::Approved => "verification.approved",
            EventKind::Expired => "verification.expired",
        }
    }
}

/// Optional, rarely used request details, boxed so that most records pay one pointer for them.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub locale: Option<Box<str>>,
    pub web_origin_host: Option<Box<str>>,
    pub app_hash: Option<Box<str>>,
}

/// One verification as the embedded store keeps it.
#[derive(Debug, Clone)]
pub struct Verification {
    pub phone: Phone,
    pub client: ClientId,
    pub status: Status,
    pub failure: Option<FailureReason>,
    pub delivery: DeliveryState,
    /// The carrier that accepted the latest SMS.
    pub carrier: Option<CarrierId>,
    /// The carrier's id for the latest accepted SMS, for receipts.
    pub carrier_message_id: Option<Box<str>>,
    /// When a carrier accepted the latest SMS (never cleared once set: `None` means no SMS of
    /// this verification was ever accepted).
    pub accepted_ms: Option<Millis>,
    /// The latest SMS's carrier awaits receipts: its `delivered` receipt is due by this moment,
    /// and the SMS has no verdict yet (`delivery.rs`).
    pub receipt_due_ms: Option<Millis>,
    /// The latest SMS's carrier awaited receipts when it accepted it.
    pub awaits_receipt: bool,
    /// When a `delivered` receipt came for an SMS of this verification.
    pub delivered_ms: Option<Millis>,
    /// SMS the gateway sent again by itself after a missing receipt (counted in `sends` too).
    pub reroutes: u8,
    /// Earlier accepted SMS of this verification, for their late receipts.
    pub earlier: Option<Box<Vec<EarlierSms>>>,
    /// Submits tried for this verification, across sends.
    pub delivery_attempts: u16,
    /// SMS sends asked for: 1 for the first, plus one per resend.
    pub sends: u8,
    pub attempts_left: u8,
    pub code: StoredCode,
    pub created_ms: Millis,
    /// When the frontend last showed that its citizen is there: the start, or a later read,
    /// long-poll, resend or start again (kept only under the adaptive queue policy).
    pub seen_ms: Millis,
    /// Set when a carrier first accepts an SMS: the code's real expiry.
    pub fixed_expiry_ms: Option<Millis>,
    pub resend_after_ms: Millis,
    /// When the verification left pending.
    pub ended_ms: Option<Millis>,
    /// The queue lane of the latest job and its ticket in it, for `eta_seconds`.
    pub lane: u8,
    pub queue_ticket: u64,
    pub extras: Option<Box<Extras>>,
    /// Bumped on every change, so long-polls can tell.
    pub version: u32,
}

/// An SMS of a verification that a later one replaced, kept so that its receipt still counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierSms {
    pub carrier: CarrierId,
    pub message_id: Box<str>,
    pub accepted_ms: Millis,
    /// Its receipt's due moment while it has no verdict.
    pub receipt_due_ms: Option<Millis>,
}

/// How many earlier SMS a verification remembers (the phone's send limits keep the real number
/// lower).
const MAX_EARLIER: usize = 8;

/// A verification as frontends see it (docs/DESIGN.md section 3).
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub id: String,
    pub status: Status,
    pub phone: String,
    pub delivery: DeliveryView,
    pub created_at: String,
    pub expires_at: String,
    pub resend_after: String,
    pub attempts_left: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<FailureReason>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub state: DeliveryState,
    pub carrier: Option<String>,
    pub attempts: u16,
    pub eta_seconds: Option<f64>,
    /// Seconds from the carrier's acceptance of the latest SMS to its `delivered` receipt, or
    /// until now while that receipt is awaited; absent when the carrier's receipts are not
    /// awaited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
}

// === impl Verification ===

impl Verification {
    /// A new pending verification whose first SMS is queued.
    pub fn new(
        phone: Phone,
        client: ClientId,
        code: StoredCode,
        lane: u8,
        extras: Option<Box<Extras>>,
        now: Millis,
        policy: &VerificationPolicy,
    ) -> Verification {
        Verification {
            phone,
            client,
            status: Status::Pending,
            failure: None,
            delivery: DeliveryState::Queued,
            carrier: None,
            carrier_message_id: None,
            accepted_ms: None,
            receipt_due_ms: None,
            awaits_receipt: false,
            delivered_ms: None,
            reroutes: 0,
            earlier: None,
            delivery_attempts: 0,
            sends: 1,
            attempts_left: policy.max_attempts,
            code,
            created_ms: now,
            seen_ms: now,
            fixed_expiry_ms: None,
            resend_after_ms: now + Verification::cooldown_ms(1, policy),
            ended_ms: None,
            lane,
            queue_ticket: 0,
            extras,
            version: 0,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.status == Status::Pending
    }

    /// When the code stops being valid, as of `now`.
    pub fn expires_at(&self, now: Millis, policy: &VerificationPolicy) -> Millis {
        match self.fixed_expiry_ms {
            Some(fixed) => fixed,
            None => {
                let waited = now.saturating_sub(self.created_ms);
                let extension = waited.min(policy.max_extension.as_millis() as Millis);
                self.created_ms + policy.code_ttl.as_millis() as Millis + extension
            }
        }
    }

    /// The latest moment an SMS for this verification may still leave: its expiry (fixed, or
    /// the cap of the extension) less a useful lifetime, the smaller of a minute and half the
    /// code's lifetime, so that no code arrives with seconds to live.
    pub fn send_deadline(&self, policy: &VerificationPolicy) -> Millis {
        let useful = (policy.code_ttl.as_millis() as Millis / 2).min(60_000);
        let expiry = match self.fixed_expiry_ms {
            Some(fixed) => fixed,
            None => {
                self.created_ms
                    + policy.code_ttl.as_millis() as Millis
                    + policy.max_extension.as_millis() as Millis
            }
        };
        expiry.saturating_sub(useful)
    }

    /// When the sweep must next look at a pending verification: its expiry as it stands at
    /// `now`, or its latest SMS's receipt due moment if that comes first.
    pub fn next_deadline(&self, now: Millis, policy: &VerificationPolicy) -> Millis {
        let expires = self.expires_at(now, policy);
        self.receipt_due_ms.map_or(expires, |due| due.min(expires))
    }

    /// Whether a pending verification has run out of time at `now`.
    pub fn is_expired(&self, now: Millis, policy: &VerificationPolicy) -> bool {
        self.is_pending() && now >= self.expires_at(now, policy)
    }

    /// Records a carrier's acceptance; returns the session extension it earned, in ms, when it
    /// fixes the code's expiry: at the first acceptance, unless the carrier's receipts are
    /// awaited (`receipt_timeout_ms`, some) and the policy lets expiry follow delivery, in which
    /// case [`Verification::deliver`] fixes it.
    pub fn accept(
        &mut self,
        carrier: CarrierId,
        carrier_message_id: Option<Box<str>>,
        receipt_timeout_ms: Option<Millis>,
        now: Millis,
        policy: &VerificationPolicy,
    ) -> Option<Millis> {
        if let (Some(previous_carrier), Some(previous_id), Some(accepted_ms)) = (
            self.carrier,
            self.carrier_message_id.take(),
            self.accepted_ms,
        ) {
            let earlier = self.earlier.get_or_insert_with(Default::default);
            if earlier.len() == MAX_EARLIER {
                earlier.remove(0);
            }
            earlier.push(EarlierSms {
                carrier: previous_carrier,
                message_id: previous_id,
                accepted_ms,
                receipt_due_ms: self.receipt_due_ms,
            });
        }
        self.carrier = Some(carrier);
        self.carrier_message_id = carrier_message_id;
        self.accepted_ms = Some(now);
        self.awaits_receipt = receipt_timeout_ms.is_some();
        self.receipt_due_ms = receipt_timeout_ms.map(|timeout| now + timeout);
        if self.delivery == DeliveryState::Queued {
            self.delivery = DeliveryState::Submitted;
        }
        self.touch();
        if self.fixed_expiry_ms.is_some() || (self.awaits_receipt && policy.expiry_follows_delivery)
        {
            return None;
        }
        Some(self.fix_expiry(now, policy))
    }

    /// Records a `delivered` receipt for any SMS of this verification (they all carry the same
    /// code, so the user has it); returns the session extension, in ms, if this fixes the
    /// code's expiry.
    pub fn deliver(&mut self, now: Millis, policy: &VerificationPolicy) -> Option<Millis> {
        self.delivery = DeliveryState::Delivered;
        self.delivered_ms.get_or_insert(now);
        self.touch();
        if self.fixed_expiry_ms.is_some() {
            return None;
        }
        Some(self.fix_expiry(now, policy))
    }

    /// Fixes the code's expiry where it stands at `now`; returns the extension it earned.
    fn fix_expiry(&mut self, now: Millis, policy: &VerificationPolicy) -> Millis {
        let expiry = self.expires_at(now, policy);
        self.fixed_expiry_ms = Some(expiry);
        expiry - self.created_ms - policy.code_ttl.as_millis() as Millis
    }

    /// The SMS sent at the user's request: the first and each resend, not the reroutes.
    pub fn user_sends(&self) -> u8 {
        self.sends.saturating_sub(self.reroutes).max(1)
    }

    /// The earlier SMS a receipt of `carrier` with these readings names, if any.
    pub fn earlier_sms_mut(
        &mut self,
        carrier: CarrierId,
        readings: &[crate::receipt::Reading],
    ) -> Option<&mut EarlierSms> {
        self.earlier.as_mut()?.iter_mut().rev().find(|sms| {
            sms.carrier == carrier
                && crate::receipt::readings(&sms.message_id)
                    .iter()
                    .any(|reading| readings.contains(reading))
        })
    }

    /// Ends a pending verification; the sealed copy of the code is wiped, since it can never be
    /// resent again.
    pub fn end(&mut self, status: Status, failure: Option<FailureReason>, now: Millis) {
        debug_assert!(status != Status::Pending);
        self.status = status;
        self.failure = failure;
        self.ended_ms = Some(now);
        self.code.wipe_sealed();
        if failure == Some(FailureReason::Undeliverable) {
            self.delivery = DeliveryState::Undeliverable;
        }
        self.touch();
    }

    /// The cooldown before the resend after `sends` sends: 30 s, 60 s, 120 s … with the default.
    pub fn cooldown_ms(sends: u8, policy: &VerificationPolicy) -> Millis {
        let base = policy.resend_cooldown.as_millis() as Millis;
        let doublings = sends.saturating_sub(1).min(16) as u32;
        base.saturating_mul(1 << doublings)
    }

    /// From the latest SMS's acceptance to its delivery (or to `now`, or to the end, while
    /// awaited), when its carrier's receipts are awaited.
    pub fn lag_ms(&self, now: Millis) -> Option<Millis> {
        if !self.awaits_receipt
            || !matches!(
                self.delivery,
                DeliveryState::Submitted | DeliveryState::Delivered
            )
        {
            return None;
        }
        let accepted = self.accepted_ms?;
        let until = match (self.delivered_ms, self.ended_ms) {
            (Some(delivered), _) => delivered,
            (None, Some(ended)) => ended,
            (None, None) => now,
        };
        Some(until.saturating_sub(accepted))
    }

    pub fn touch(&mut self) {
        self.version = self.version.wrapping_add(1);
    }

    /// The frontend's view of this verification.
    pub fn view(
        &self,
        id: &VerificationId,
        now: Millis,
        policy: &VerificationPolicy,
        carrier_name: impl Fn(CarrierId) -> String,
        eta_seconds: Option<f64>,
    ) -> View {
        View {
            id: id.to_string(),
            status: self.status,
            phone: self.phone.masked(),
            delivery: DeliveryView {
                state: self.delivery,
                carrier: self.carrier.map(carrier_name),
                attempts: self.delivery_attempts,
                eta_seconds: if self.delivery == DeliveryState::Queued && self.is_pending() {
                    eta_seconds
                } else {
                    None
                },
                lag_seconds: self.lag_ms(now).map(|ms| ms as f64 / 1000.0),
            },
            created_at: rfc3339(self.created_ms),
            expires_at: rfc3339(match self.ended_ms {
                Some(ended) if self.status != Status::Expired => {
                    self.expires_at(ended, policy).min(ended)
                }
                _ => self.expires_at(now, policy),
            }),
            resend_after: rfc3339(self.resend_after_ms),
            attempts_left: self.attempts_left,
            failure_reason: self.failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::otp::CodeKeys;

    fn policy() -> VerificationPolicy {
        VerificationPolicy {
            code_length: 6,
            code_ttl: Duration::from_secs(600),
            max_extension: Duration::from_secs(900),
            max_attempts: 5,
            resend_cooldown: Duration::from_secs(30),
            retention: Duration::from_secs(3600),
            idempotency_ttl: Duration::from_secs(86_400),
            reroutes: 1,
            expiry_follows_delivery: true,
            long_polls_per_client: 1000,
        }
    }

    fn pending(created_ms: Millis) -> Verification {
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        let id = VerificationId::new_for(&phone);
        let (_, code) = CodeKeys::new(&[7; 32], 6).generate(&id, &phone);
        Verification::new(phone, 0, code, 0, None, created_ms, &policy())
    }

    #[test]
    fn expiry_moves_with_queue_time_up_to_the_maximum() {
        let policy = policy();
        let v = pending(1_000_000);
        assert_eq!(v.expires_at(1_000_000, &policy), 1_000_000 + 600_000);
        assert_eq!(v.expires_at(1_060_000, &policy), 1_060_000 + 600_000);
        assert_eq!(
            v.expires_at(1_000_000 + 2_000_000, &policy),
            1_000_000 + 600_000 + 900_000
        );
    }

    #[test]
    fn acceptance_fixes_expiry_and_reports_the_extension() {
        let policy = policy();
        let mut v = pending(1_000_000);
        assert_eq!(v.accept(0, None, None, 1_045_000, &policy), Some(45_000));
        assert_eq!(v.delivery, DeliveryState::Submitted);
        assert_eq!(v.expires_at(2_000_000, &policy), 1_045_000 + 600_000);
        // A second acceptance (a resend) does not move expiry again.
        assert_eq!(v.accept(1, None, None, 1_200_000, &policy), None);
        assert_eq!(v.expires_at(2_000_000, &policy), 1_045_000 + 600_000);
    }

    #[test]
    fn with_receipts_awaited_the_clock_starts_at_delivery() {
        let policy = policy();
        let mut v = pending(1_000_000);
        // Accepted after 10 s by a carrier whose receipts are awaited: expiry keeps moving.
        assert_eq!(
            v.accept(0, Some("a1".into()), Some(60_000), 1_010_000, &policy),
            None
        );
        assert_eq!(v.receipt_due_ms, Some(1_070_000));
        assert_eq!(v.expires_at(1_300_000, &policy), 1_300_000 + 600_000);
        assert_eq!(v.lag_ms(1_300_000), Some(290_000));
        // Delivered 5 minutes after acceptance: the code lives its whole ttl from there.
        assert_eq!(v.deliver(1_310_000, &policy), Some(310_000));
        assert_eq!(v.delivery, DeliveryState::Delivered);
        assert_eq!(v.expires_at(2_000_000, &policy), 1_310_000 + 600_000);
        assert_eq!(v.lag_ms(2_000_000), Some(300_000));
        // A later delivery moves nothing.
        assert_eq!(v.deliver(1_400_000, &policy), None);
        // Never delivered: the cap of the extension still bounds the code's life.
        let mut v = pending(1_000_000);
        v.accept(0, None, Some(60_000), 1_010_000, &policy);
        assert_eq!(
            v.expires_at(9_000_000, &policy),
            1_000_000 + 600_000 + 900_000
        );
        // With the policy off, acceptance fixes expiry as before.
        let off = VerificationPolicy {
            expiry_follows_delivery: false,
            ..policy.clone()
        };
        let mut v = pending(1_000_000);
        assert_eq!(
            v.accept(0, None, Some(60_000), 1_010_000, &off),
            Some(10_000)
        );
        assert_eq!(v.expires_at(9_000_000, &off), 1_010_000 + 600_000);
    }

    #[test]
    fn a_later_sms_keeps_the_earlier_for_its_receipt() {
        let policy = policy();
        let mut v = pending(1_000_000);
        v.accept(0, Some("00A1".into()), Some(60_000), 1_010_000, &policy);
        v.delivery = DeliveryState::Queued;
        v.sends = 2;
        v.reroutes = 1;
        v.accept(1, Some("b7".into()), Some(60_000), 1_080_000, &policy);
        assert_eq!(v.user_sends(), 1);
        let readings = crate::receipt::readings("a1");
        let earlier = v.earlier_sms_mut(0, &readings).unwrap();
        assert_eq!(earlier.accepted_ms, 1_010_000);
        assert_eq!(earlier.receipt_due_ms, Some(1_070_000));
        assert!(v.earlier_sms_mut(1, &readings).is_none());
        assert_eq!(v.carrier, Some(1));
        assert_eq!(v.receipt_due_ms, Some(1_140_000));
    }

    #[test]
    fn an_sms_leaves_only_with_a_useful_lifetime_left() {
        let policy = policy();
        let mut v = pending(1_000_000);
        // Never accepted: the cap of the extension, less a minute.
        assert_eq!(
            v.send_deadline(&policy),
            1_000_000 + 600_000 + 900_000 - 60_000
        );
        v.accept(0, None, None, 1_010_000, &policy);
        assert_eq!(v.send_deadline(&policy), 1_010_000 + 600_000 - 60_000);
        // A short-lived code keeps half its lifetime.
        let short = VerificationPolicy {
            code_ttl: Duration::from_secs(60),
            ..policy.clone()
        };
        assert_eq!(pending(0).send_deadline(&short), 60_000 + 900_000 - 30_000);
    }

    #[test]
    fn cooldown_doubles() {
        let policy = policy();
        let cooldowns: Vec<Millis> = (1..=4)
            .map(|sends| Verification::cooldown_ms(sends, &policy))
            .collect();
        assert_eq!(cooldowns, [30_000, 60_000, 120_000, 240_000]);
    }

    proptest! {
        /// Whatever the queue time, a code is never valid longer than code_ttl + max_extension
        /// after the request, nor less than code_ttl after acceptance within the extension.
        #[test]
        fn expiry_stays_within_bounds(created in 0u64..1_000_000_000, waited in 0u64..10_000_000) {
            let policy = policy();
            let mut v = pending(created);
            let accepted_at = created + waited;
            v.accept(0, None, None, accepted_at, &policy);
            let expiry = v.expires_at(accepted_at, &policy);
            prop_assert!(expiry <= created + 600_000 + 900_000);
            prop_assert!(expiry >= created + 600_000);
            if waited <= 900_000 {
                prop_assert_eq!(expiry, accepted_at + 600_000);
            }
        }

        #[test]
        fn cooldown_never_shrinks(sends in 1u8..=255) {
            let policy = policy();
            prop_assert!(Verification::cooldown_ms(sends, &policy) >= Verification::cooldown_ms(sends - 1, &policy));
        }
    }
}

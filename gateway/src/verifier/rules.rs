//! The rules: what each call does to one verification, on the [`Shard`] its back-end gave it,
//! with everything it causes beyond that shard recorded in [`Effects`]. They never await and
//! never know which back-end runs them.

use std::time::Duration;

use super::{CheckAnswer, Completion, NewVerification, Prepared, ReceiptMatch, Verifier};
use crate::carrier::OutboundSms;
use crate::clock::Millis;
use crate::delivery::{Observation, Reroute};
use crate::error::ApiError;
use crate::ids::{CarrierId, ClientId, VerificationId};
use crate::metrics::{Checked, Ended, QueueDrop, QueueRefusal};
use crate::queue::{Job, PushError};
use crate::ratelimit::LimitKind;
use crate::receipt::ReceiptStatus;
use crate::routing::CarrierSet;
use crate::sms::{RenderParams, SmsText};
use crate::store::{DeadlineWrite, Effects, FailedChecks, Shard};
use crate::verification::{
    DeliveryState, EventKind, Extras, FailureReason, Status, Verification, View,
};

/// What a resend did.
#[derive(Debug)]
pub(super) enum Resent {
    Done(View),
    /// Everything allows the resend but the SMS budgets, not spent yet: spend them, then run
    /// again. Nothing was written.
    NeedsBudget(crate::phone::Phone),
}

impl Verifier {
    /// Creates a verification and queues its first SMS, spending one send of the phone's limit.
    ///
    /// With `same_code_as`, the phone's live verification of this client, the new one is a
    /// second caller's: its own id, status and attempts, carrying the live one's code, so
    /// whichever of their SMS arrives works in both, and neither caller can cancel or use up
    /// the other's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        client: ClientId,
        request: &NewVerification,
        carriers: CarrierSet,
        lane: u8,
        same_code_as: Option<VerificationId>,
        now: Millis,
    ) -> Result<VerificationId, ApiError> {
        let shared = &*self.shared;
        let phone = request.phone;
        self.spend_phone(fx, phone.as_u64())?;
        let id = VerificationId::new_for(&phone);
        let live = same_code_as.and_then(|live| Some((live, shard.records.get(&live)?)));
        let stored_code = match live {
            Some((live, record)) if record.is_pending() => {
                let code = shared.keys.unseal(&live, &phone, &record.code);
                shared.keys.store(&id, &phone, &code)
            }
            _ => shared.keys.generate(&id, &phone).1,
        };
        let extras = (request.locale.is_some()
            || request.web_origin_host.is_some()
            || request.app_hash.is_some())
        .then(|| {
            Box::new(Extras {
                locale: request.locale.as_deref().map(Into::into),
                web_origin_host: request.web_origin_host.as_deref().map(Into::into),
                app_hash: request.app_hash.as_deref().map(Into::into),
            })
        });
        let mut record = Verification::new(
            phone,
            client,
            stored_code,
            lane,
            extras,
            now,
            &shared.policy,
        );
        let job = Job::first(
            id,
            lane,
            record.send_deadline(&shared.policy),
            carriers,
            now,
        );
        record.queue_ticket = self.enqueue(fx, job)?;
        shard.records.insert(id, Box::new(record));
        shard.live.insert((phone.as_u64(), client), id);
        fx.delay_watches.push((client, id, 1));
        fx.deadline = Some((
            id,
            DeadlineWrite::At(now + shared.policy.code_ttl.as_millis() as Millis),
        ));
        Ok(id)
    }

    pub(super) fn check_in(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        client: ClientId,
        id: &VerificationId,
        typed: &str,
        now: Millis,
    ) -> Result<CheckAnswer, ApiError> {
        let shared = &*self.shared;
        self.owned(shard, client, id)?;
        self.settle(shard, fx, id, now);
        let record = shard.records.get(id).ok_or(ApiError::NotFound)?;
        if !record.is_pending() {
            return Err(not_pending(record.status));
        }
        let phone_key = record.phone.as_u64();
        // Counted per phone *and client*: an attacker typing codes through one client locks the
        // phone out of that client only, never out of every other tenant.
        let failed_key = (phone_key, record.client);
        let rule = shared.failed_checks_rule;
        let window_ms = rule.per.as_millis() as Millis;
        if let Err(locked) = self.unlocked(shard, failed_key, now) {
            shared.metrics.checked(Checked::Locked);
            return Err(locked);
        }
        let record = shard.records.get_mut(id).ok_or(ApiError::NotFound)?;
        if shared.keys.matches(id, &record.phone, typed, &record.code) {
            record.end(Status::Approved, None, now);
            // Failures count while consecutive: the owner typing the right code resets them,
            // so a few typos never add up to a lock-out across the day.
            shard.failed_checks.remove(&failed_key);
            let Some(record) = shard.records.get_mut(id) else {
                return Err(ApiError::NotFound);
            };
            let answer = CheckAnswer {
                valid: true,
                status: record.status,
                attempts_left: record.attempts_left,
            };
            let key = (phone_key, record.client);
            forget_live(shard, key, id);
            fx.notify(id);
            self.announce(shard, fx, id, EventKind::Approved, now);
            shared.metrics.checked(Checked::Valid);
            self.ended(Ended::Approved);
            if let Some(record) = shard.records.get(id) {
                self.conversion_ended(&record.phone, true, true, now);
            }
            return Ok(answer);
        }
        record.attempts_left = record.attempts_left.saturating_sub(1);
        record.touch();
        let failed = shard
            .failed_checks
            .entry(failed_key)
            .or_insert(FailedChecks {
                count: 0,
                window_start_ms: now,
            });
        if now >= failed.window_start_ms + window_ms {
            *failed = FailedChecks {
                count: 0,
                window_start_ms: now,
            };
        }
        failed.count += 1;
        shared.metrics.checked(Checked::Invalid);
        let answer = CheckAnswer {
            valid: false,
            status: record.status,
            attempts_left: record.attempts_left,
        };
        if record.attempts_left == 0 {
            record.end(Status::Failed, Some(FailureReason::TooManyAttempts), now);
            self.ended(Ended::TooManyAttempts);
            self.conversion_ended(&record.phone, reached_phone(record), false, now);
            let key = (phone_key, record.client);
            let answer = CheckAnswer {
                status: record.status,
                ..answer
            };
            forget_live(shard, key, id);
            fx.notify(id);
            self.announce(shard, fx, id, EventKind::Failed, now);
            return Ok(answer);
        }
        fx.notify(id);
        Ok(answer)
    }

    /// Refuses (`429 too_many_failed_checks`, counted) anything for a phone that a client
    /// locked by too many wrong codes: no check of that client is compared, and no SMS is sent
    /// to the phone for that client, until its window passes. Other clients are not affected.
    pub(super) fn unlocked(
        &self,
        shard: &Shard,
        phone_and_client: (u64, ClientId),
        now: Millis,
    ) -> Result<(), ApiError> {
        let shared = &*self.shared;
        let rule = shared.failed_checks_rule;
        let window_ms = rule.per.as_millis() as Millis;
        let Some(failed) = shard.failed_checks.get(&phone_and_client) else {
            return Ok(());
        };
        if now >= failed.window_start_ms + window_ms || failed.count < rule.max.get() {
            return Ok(());
        }
        shared.metrics.rejected(LimitKind::FailedChecks);
        Err(ApiError::from(crate::ratelimit::Rejection {
            limit: LimitKind::FailedChecks,
            rule,
            retry_after: Duration::from_millis(failed.window_start_ms + window_ms - now),
        }))
    }

    pub(super) fn resend_in(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        client: ClientId,
        id: &VerificationId,
        budget_spent: bool,
        now: Millis,
    ) -> Result<Resent, ApiError> {
        let shared = &*self.shared;
        self.owned(shard, client, id)?;
        self.settle(shard, fx, id, now);
        // A resend shows the citizen is there: a held SMS goes back in line at once.
        self.seen(shard, fx, id, now);
        let record = shard.records.get(id).ok_or(ApiError::NotFound)?;
        if !record.is_pending() {
            return Err(not_pending(record.status));
        }
        if now < record.resend_after_ms {
            shared.metrics.rejected(LimitKind::ResendCooldown);
            return Err(ApiError::RateLimited {
                code: "resend_cooldown",
                message: "a resend is not allowed yet; see Retry-After",
                retry_after: Duration::from_millis(record.resend_after_ms - now),
                rule: None,
            });
        }
        if record.delivery != DeliveryState::Queued {
            if shared.backend.queue_is_full() {
                return Err(self.refused_at_queue(PushError::Full));
            }
            let phone = record.phone.as_u64();
            self.unlocked(shard, (phone, record.client), now)?;
            if !budget_spent {
                return Ok(Resent::NeedsBudget(record.phone));
            }
            self.spend_phone(fx, phone)?;
            self.queue_resend(shard, fx, id, now)?;
        }
        let view = self.view_of(shard, id, now).ok_or(ApiError::NotFound)?;
        Ok(Resent::Done(view))
    }

    pub(super) fn cancel_in(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        client: ClientId,
        id: &VerificationId,
        now: Millis,
    ) -> Result<View, ApiError> {
        self.owned(shard, client, id)?;
        self.settle(shard, fx, id, now);
        let record = shard.records.get_mut(id).ok_or(ApiError::NotFound)?;
        if !record.is_pending() {
            return Err(not_pending(record.status));
        }
        record.end(Status::Canceled, None, now);
        self.conversion_ended(&record.phone, reached_phone(record), false, now);
        let key = (record.phone.as_u64(), record.client);
        forget_live(shard, key, id);
        fx.notify(id);
        self.ended(Ended::Canceled);
        self.view_of(shard, id, now).ok_or(ApiError::NotFound)
    }

    pub(super) fn prepare_in(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        job: &Job,
        carrier: CarrierId,
        now: Millis,
    ) -> Prepared {
        let shared = &*self.shared;
        if job.attempts == 0 {
            shared.metrics.queue_wait(
                job.lane,
                now.saturating_sub(job.enqueued_ms) as f64 / 1000.0,
            );
        }
        let Some(record) = shard.records.get(&job.id) else {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        };
        if record.is_pending() && now >= job.deadline_ms.min(record.send_deadline(&shared.policy)) {
            let reason = self.drop_late(shard, fx, &job.id, now);
            shared.metrics.queue_dropped(reason);
            return Prepared::Dropped;
        }
        self.settle(shard, fx, &job.id, now);
        let Some(record) = shard.records.get_mut(&job.id) else {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        };
        // A carrier already accepted this send: a job taken over from an instance that died
        // after the acceptance was written is not sent twice.
        if record.is_pending()
            && record.sends == job.send_no
            && record.delivery != DeliveryState::Queued
        {
            shared.metrics.queue_dropped(QueueDrop::Canceled);
            return Prepared::Dropped;
        }
        if !record.is_pending() || record.sends != job.send_no {
            let reason = if record.status == Status::Expired {
                QueueDrop::Expired
            } else {
                QueueDrop::Canceled
            };
            shared.metrics.queue_dropped(reason);
            return Prepared::Dropped;
        }
        // Taken from an overloaded queue: sent only if someone has looked at it lately; held
        // otherwise, until someone does (`seen`).
        let unseen_after = shared.overload.and_then(|overload| overload.unseen_after);
        if let Some(unseen_after) = unseen_after.filter(|_| job.check_presence) {
            if now.saturating_sub(record.seen_ms) > unseen_after.as_millis() as Millis {
                record.delivery = DeliveryState::Held;
                record.touch();
                fx.notify(&job.id);
                shared.metrics.queue_dropped(QueueDrop::Abandoned);
                return Prepared::Dropped;
            }
        }
        record.delivery_attempts = record.delivery_attempts.saturating_add(1);
        record.touch();
        let code = shared.keys.unseal(&job.id, &record.phone, &record.code);
        let extras = record.extras.as_deref();
        let text: SmsText = shared.templates.render(
            extras.and_then(|extras| extras.locale.as_deref()),
            &RenderParams {
                code: code.expose(),
                ttl_minutes: shared.policy.code_ttl.as_secs().div_ceil(60),
                web_origin_host: extras.and_then(|extras| extras.web_origin_host.as_deref()),
                app_hash: extras.and_then(|extras| extras.app_hash.as_deref()),
            },
        );
        let carrier_info = &shared.carriers[carrier as usize];
        let sms = OutboundSms {
            message_id: format!("{}.{}", job.id, job.send_no),
            to: record.phone,
            from: carrier_info.from.clone(),
            text,
            receipt_url: carrier_info.receipt_url.clone(),
        };
        fx.notify(&job.id);
        Prepared::Send(sms)
    }

    /// Records a carrier's answer; returns the carrier's message id to index for receipts.
    pub(super) fn record_completion(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        job: &Job,
        carrier: CarrierId,
        completion: Completion,
        now: Millis,
    ) -> Option<String> {
        let shared = &*self.shared;
        let record = shard.records.get_mut(&job.id)?;
        let mut receipt_id = None;
        let mut event = None;
        match completion {
            Completion::Accepted { carrier_message_id } => {
                self.sms_sent_to(&record.phone);
                receipt_id = carrier_message_id.clone();
                let carrier_message_id = carrier_message_id.map(String::into_boxed_str);
                if !record.is_pending() {
                    // Cancelled or ended while the carrier answered: the SMS is out, so keep
                    // its id for receipts, but the verification's state and expiry are final.
                    record.carrier = Some(carrier);
                    record.carrier_message_id = carrier_message_id;
                } else {
                    let first = record.accepted_ms.is_none();
                    let awaited = shared.deliveries.awaited(carrier);
                    if let Some(extension_ms) =
                        record.accept(carrier, carrier_message_id, awaited, now, &shared.policy)
                    {
                        shared
                            .metrics
                            .session_extended(extension_ms as f64 / 1000.0);
                    }
                    if first {
                        // The first acceptance: the user's time to SMS, as far as acceptance
                        // can tell.
                        shared
                            .metrics
                            .carrier(carrier as usize)
                            .first_accepted_after(
                                now.saturating_sub(record.created_ms) as f64 / 1000.0,
                            );
                    }
                    // The sweep looks again when the receipt is due.
                    if record.receipt_due_ms.is_some() {
                        let next = record.next_deadline(now, &shared.policy);
                        fx.deadline = Some((job.id, DeadlineWrite::At(next)));
                    }
                    event = Some(EventKind::Submitted);
                }
            }
            Completion::Retry => {}
            Completion::Permanent => {
                if record.is_pending() {
                    record.end(Status::Failed, Some(FailureReason::Undeliverable), now);
                    let key = (record.phone.as_u64(), record.client);
                    forget_live(shard, key, &job.id);
                    self.ended(Ended::Undeliverable);
                    event = Some(EventKind::Failed);
                }
            }
        }
        fx.notify(&job.id);
        if let Some(kind) = event {
            self.announce(shard, fx, &job.id, kind, now);
        }
        receipt_id
    }

    /// Applies a receipt to the SMS of `id` it names: the latest one, or an earlier one (a
    /// rerouted or resent SMS whose receipt comes late). Returns what it says about the
    /// carrier's delivery, for [`crate::delivery::Deliveries`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_receipt_in(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        carrier: CarrierId,
        id: VerificationId,
        carrier_message_id: &str,
        status: ReceiptStatus,
        now: Millis,
    ) -> (ReceiptMatch, Option<Observation>) {
        let shared = &*self.shared;
        let metrics = shared.metrics.carrier(carrier as usize);
        let Some(record) = shard.records.get_mut(&id) else {
            metrics.receipt_unmatched();
            return (ReceiptMatch::Unmatched, None);
        };
        // The index may point at a verification whose latest SMS went by another carrier or
        // under another id (an earlier send).
        let receipt_readings = crate::receipt::readings(carrier_message_id);
        let latest = record.carrier == Some(carrier)
            && record.carrier_message_id.as_deref().is_some_and(|latest| {
                crate::receipt::readings(latest)
                    .iter()
                    .any(|reading| receipt_readings.contains(reading))
            });
        metrics.receipt(status);
        // The SMS it names: when it was accepted and when its receipt was due (its verdict
        // pending), taken so that it is judged once.
        let named = if latest {
            record
                .accepted_ms
                .map(|accepted| (accepted, record.receipt_due_ms.take()))
        } else {
            record
                .earlier_sms_mut(carrier, &receipt_readings)
                .map(|sms| (sms.accepted_ms, sms.receipt_due_ms.take()))
        };
        let Some((accepted_ms, due_ms)) = named else {
            return (ReceiptMatch::Matched, None);
        };
        let mut observation = None;
        let mut changed = due_ms.is_some();
        match status {
            ReceiptStatus::Delivered => {
                observation = Some(Observation::Delivered {
                    carrier,
                    after_ms: now.saturating_sub(accepted_ms),
                    on_time: due_ms.map(|due| now <= due),
                });
                // Every SMS of a verification carries the same code: whichever is delivered
                // first, the user has it. An SMS still queued for it is then not sent.
                if record.is_pending()
                    && matches!(
                        record.delivery,
                        DeliveryState::Submitted | DeliveryState::Queued
                    )
                {
                    metrics.delivered_after(now.saturating_sub(record.created_ms) as f64 / 1000.0);
                    if let Some(extension_ms) = record.deliver(now, &shared.policy) {
                        shared
                            .metrics
                            .session_extended(extension_ms as f64 / 1000.0);
                    }
                    changed = true;
                    fx.notify(&id);
                    fx.deadline = Some((
                        id,
                        DeadlineWrite::At(record.next_deadline(now, &shared.policy)),
                    ));
                    self.announce(shard, fx, &id, EventKind::Delivered, now);
                }
            }
            ReceiptStatus::Undeliverable | ReceiptStatus::Expired => {
                if latest && record.delivery == DeliveryState::Submitted {
                    record.delivery = DeliveryState::Undeliverable;
                    changed = true;
                    fx.notify(&id);
                }
            }
        }
        if changed {
            if let Some(record) = shard.records.get_mut(&id) {
                record.touch();
            }
        }
        (ReceiptMatch::Matched, observation)
    }

    /// A due verification: expired if its time ran out; its latest SMS judged late, and
    /// perhaps rerouted, if its receipt is overdue; then its next deadline.
    pub(super) fn sweep_one(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) -> Option<Observation> {
        let policy = &self.shared.policy;
        let Some(record) = shard.records.get(id) else {
            fx.deadline = Some((*id, DeadlineWrite::Remove));
            return None;
        };
        if record.is_expired(now, policy) {
            self.expire(shard, fx, id, now);
        }
        let observation = self.receipt_overdue(shard, fx, id, now);
        let next = match shard.records.get(id) {
            Some(record) if record.is_pending() => {
                DeadlineWrite::At(record.next_deadline(now, policy))
            }
            _ => DeadlineWrite::Remove,
        };
        fx.deadline = Some((*id, next));
        observation
    }

    /// The latest SMS's receipt is overdue: it is judged late and, while the verification is
    /// pending and the user has no code, sent again (the same code) through another carrier,
    /// if its reroutes, the other carriers, the phone's send limits and the queue allow.
    fn receipt_overdue(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) -> Option<Observation> {
        let shared = &*self.shared;
        let record = shard.records.get_mut(id)?;
        let due = record.receipt_due_ms?;
        if now < due {
            return None;
        }
        let carrier = record.carrier?;
        record.receipt_due_ms = None;
        record.touch();
        if !record.is_pending() || record.delivery != DeliveryState::Submitted {
            // Ended, or the user already has the code: only the verdict.
            return Some(Observation::Missing {
                carrier,
                reroute: Reroute::Exhausted,
            });
        }
        let reroute = self.reroute(shard, fx, id, carrier, now);
        if reroute == Reroute::Queued {
            let name = shared
                .carriers
                .get(carrier as usize)
                .map_or("(not configured here)", |info| info.name.as_str());
            tracing::info!(verification = %id, carrier = %name, "no delivery receipt in time; the same code goes again by another carrier");
        }
        Some(Observation::Missing { carrier, reroute })
    }

    fn reroute(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        carrier: CarrierId,
        now: Millis,
    ) -> Reroute {
        let shared = &*self.shared;
        let policy = &shared.policy;
        let Some(record) = shard.records.get(id) else {
            return Reroute::Exhausted;
        };
        if record.reroutes >= policy.reroutes {
            return Reroute::Exhausted;
        }
        let others = shared.routes.eligible_for(&record.phone) & !(1 << carrier);
        if others == 0 {
            return Reroute::NoOtherCarrier;
        }
        let deadline = record.send_deadline(policy);
        if now >= deadline || shared.backend.queue_is_full() {
            return Reroute::NoRoom;
        }
        let phone = record.phone.as_u64();
        let job = Job::resend(
            *id,
            record.sends.saturating_add(1),
            record.lane,
            deadline,
            others,
            Some(carrier),
            now,
        );
        // The phone's send limits count a reroute like any SMS to that phone: they protect its
        // owner, whoever asked for the SMS.
        if self.spend_phone(fx, phone).is_err() {
            return Reroute::Limited;
        }
        let Ok(ticket) = self.enqueue(fx, job) else {
            return Reroute::NoRoom;
        };
        let Some(record) = shard.records.get_mut(id) else {
            return Reroute::Exhausted;
        };
        record.sends = record.sends.saturating_add(1);
        record.reroutes = record.reroutes.saturating_add(1);
        record.queue_ticket = ticket;
        record.delivery = DeliveryState::Queued;
        record.touch();
        fx.notify(id);
        Reroute::Queued
    }

    // --- helpers ---

    pub(super) fn owned(
        &self,
        shard: &Shard,
        client: ClientId,
        id: &VerificationId,
    ) -> Result<(), ApiError> {
        // Another client's verification is as unknown as a missing one.
        match shard.records.get(id) {
            Some(record) if record.client == client => Ok(()),
            _ => Err(ApiError::NotFound),
        }
    }

    /// Expires the verification if its time has run out.
    pub(super) fn settle(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) {
        let expired = shard
            .records
            .get(id)
            .is_some_and(|record| record.is_expired(now, &self.shared.policy));
        if expired {
            self.expire(shard, fx, id, now);
        }
    }

    /// A job that missed its send deadline is dropped. If no SMS of its verification was ever
    /// accepted, the user has no code and never will: the verification expires now. A late
    /// resend leaves it pending, since the code of the earlier SMS still works until expiry.
    pub(super) fn drop_late(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) -> QueueDrop {
        match shard.records.get(id) {
            Some(record) if record.is_pending() => {
                if record.accepted_ms.is_none() {
                    self.expire(shard, fx, id, now);
                }
                QueueDrop::Expired
            }
            Some(record) if record.status == Status::Expired => QueueDrop::Expired,
            _ => QueueDrop::Canceled,
        }
    }

    fn expire(&self, shard: &mut Shard, fx: &mut Effects, id: &VerificationId, now: Millis) {
        let Some(record) = shard.records.get_mut(id) else {
            return;
        };
        if !record.is_pending() {
            return;
        }
        let expires_at = record.expires_at(now, &self.shared.policy);
        record.end(Status::Expired, None, expires_at.min(now));
        self.conversion_ended(&record.phone, reached_phone(record), false, now);
        let key = (record.phone.as_u64(), record.client);
        forget_live(shard, key, id);
        fx.notify(id);
        self.announce(shard, fx, id, EventKind::Expired, now);
        self.ended(Ended::Expired);
    }

    fn queue_resend(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) -> Result<(), ApiError> {
        let policy = &self.shared.policy;
        let Some(record) = shard.records.get_mut(id) else {
            return Err(ApiError::NotFound);
        };
        let job = Job::resend(
            *id,
            record.sends.saturating_add(1),
            record.lane,
            record.send_deadline(policy),
            self.shared.routes.eligible_for(&record.phone),
            record.carrier,
            now,
        );
        let ticket = self.enqueue(fx, job)?;
        let Some(record) = shard.records.get_mut(id) else {
            return Err(ApiError::NotFound);
        };
        record.sends = record.sends.saturating_add(1);
        let (client, sends) = (record.client, record.sends);
        record.queue_ticket = ticket;
        record.delivery = DeliveryState::Queued;
        record.resend_after_ms = now + Verification::cooldown_ms(record.user_sends(), policy);
        record.touch();
        fx.delay_watches.push((client, *id, sends));
        fx.notify(id);
        Ok(())
    }

    /// Queues a job through the back-end (at once, or with the call's commit).
    fn enqueue(&self, fx: &mut Effects, job: Job) -> Result<u64, ApiError> {
        self.shared
            .backend
            .enqueue(fx, job)
            .map_err(|error| self.refused_at_queue(error))
    }

    /// Spends one send of the phone's limit through the back-end.
    fn spend_phone(&self, fx: &mut Effects, phone: u64) -> Result<(), ApiError> {
        self.shared
            .backend
            .spend_phone(fx, phone)
            .map_err(|rejection| self.rejected(rejection))
    }

    /// Sends `kind` about `id` to its client's webhook, if the client has one.
    pub(super) fn announce(
        &self,
        shard: &Shard,
        fx: &mut Effects,
        id: &VerificationId,
        kind: EventKind,
        now: Millis,
    ) {
        let Some(client) = shard.records.get(id).map(|record| record.client) else {
            return;
        };
        if !self.shared.webhooks.enabled_for(client) {
            return;
        }
        if let Some(view) = self.view_of(shard, id, now) {
            fx.events.push((client, kind, view));
        }
    }

    pub(super) fn view_of(&self, shard: &Shard, id: &VerificationId, now: Millis) -> Option<View> {
        let shared = &*self.shared;
        let record = shard.records.get(id)?;
        let eta = (record.delivery == DeliveryState::Queued).then(|| {
            let carriers = shared.routes.eligible_for(&record.phone);
            let ahead = shared
                .backend
                .ahead_of(record.lane, record.queue_ticket, carriers);
            ahead as f64 / shared.routes.pace_of(carriers)
        });
        let carriers = &shared.carriers;
        Some(record.view(
            id,
            now,
            &shared.policy,
            |carrier| {
                carriers
                    .get(carrier as usize)
                    .map_or_else(String::new, |c| c.name.clone())
            },
            eta.map(|secs| (secs * 10.0).round() / 10.0),
        ))
    }

    /// Refuses a new verification whose SMS would wait too long: longer than the adaptive
    /// policy's `max_wait` (`come_back_later`), or under the deadline policy longer than a
    /// session can be extended (`overloaded`).
    pub(super) fn admit(&self, lane: u8, carriers: CarrierSet) -> Result<(), ApiError> {
        let shared = &*self.shared;
        // Refuse a full queue before any limit is spent on a send that cannot happen.
        if shared.backend.queue_is_full() {
            return Err(self.refused_at_queue(PushError::Full));
        }
        let ahead = shared.backend.ahead_of_new(lane, carriers) as f64;
        let pace = self.drain_pace(carriers);
        let predicted_wait = ahead / pace;
        let (max_wait, reason, code, message) = match &shared.overload {
            Some(overload) => (
                overload.max_wait.as_secs_f64(),
                QueueRefusal::MaxWait,
                "come_back_later",
                "the SMS would wait longer than a citizen should; there is no rush, come back \
                 later (see Retry-After)",
            ),
            None => (
                shared.policy.max_extension.as_secs_f64().max(1.0),
                QueueRefusal::PredictedWait,
                "overloaded",
                "the SMS queue is longer than a code could wait; try again later",
            ),
        };
        if predicted_wait > max_wait {
            shared.metrics.queue_refused(reason);
            // When the queue should have room for this start again; never so soon that
            // refused citizens come straight back.
            let excess = (ahead - max_wait * pace) / pace;
            let floor = if shared.overload.is_some() {
                (max_wait / 4.0).max(1.0)
            } else {
                1.0
            };
            return Err(ApiError::Overloaded {
                code,
                message,
                retry_after: Duration::from_secs_f64(excess.clamp(floor, 3600.0)),
            });
        }
        Ok(())
    }

    /// The SMS per second the queue can count on for `carriers`: their configured pace, and
    /// under overload no more than the carriers have really accepted lately.
    pub(super) fn drain_pace(&self, carriers: CarrierSet) -> f64 {
        let shared = &*self.shared;
        let pace = shared.routes.pace_of(carriers);
        match shared.queue.overload() {
            Some(reading) if reading.overloaded => reading
                .accepted_per_sec
                .map_or(pace, |accepted| pace.min(accepted.max(0.1))),
            _ => pace,
        }
    }

    /// The frontend showed its citizen is there (a read, a long-poll, a resend, a start
    /// again): remember when, and queue again an SMS held while nobody was looking. Kept
    /// only under the adaptive policy, and written at most a few times per `unseen_after`.
    pub(super) fn seen(
        &self,
        shard: &mut Shard,
        fx: &mut Effects,
        id: &VerificationId,
        now: Millis,
    ) {
        let shared = &*self.shared;
        let Some(unseen_after) = shared.overload.and_then(|overload| overload.unseen_after) else {
            return;
        };
        let Some(record) = shard.records.get_mut(id) else {
            return;
        };
        if !record.is_pending() {
            return;
        }
        let step = (unseen_after.as_millis() as Millis / 8).max(1);
        if now.saturating_sub(record.seen_ms) >= step {
            record.seen_ms = now;
        }
        if record.delivery != DeliveryState::Held {
            return;
        }
        let job = Job::resend(
            *id,
            record.sends,
            record.lane,
            record.send_deadline(&shared.policy),
            shared.routes.eligible_for(&record.phone),
            None,
            now,
        );
        // A full queue keeps it held; the next look tries again.
        let Ok(ticket) = shared.backend.enqueue(fx, job) else {
            return;
        };
        let Some(record) = shard.records.get_mut(id) else {
            return;
        };
        record.delivery = DeliveryState::Queued;
        record.queue_ticket = ticket;
        record.touch();
        fx.notify(id);
        shared.metrics.queue_resumed();
    }

    fn refused_at_queue(&self, error: PushError) -> ApiError {
        match error {
            PushError::Full => {
                self.shared.metrics.queue_refused(QueueRefusal::Full);
                ApiError::Overloaded {
                    code: "overloaded",
                    message: "the SMS queue is full; try again later",
                    retry_after: Duration::from_secs(
                        (self.shared.queue.capacity() as f64
                            / self.shared.routes.pace_of(CarrierSet::MAX)
                            / 10.0)
                            .clamp(1.0, 60.0) as u64,
                    ),
                }
            }
            PushError::Closed => ApiError::ShuttingDown,
        }
    }
}

/// Whether a verification's SMS reached the phone promptly, as far as the gateway knows:
/// delivered by a receipt, or accepted by a carrier whose receipts were not awaited, within
/// [`crate::fraud_guard::PROMPT_SMS`] of the start. The fraud guard judges only these: SMS a
/// carrier never delivered (an outage) or delivered late (a lagging carrier, whose citizens
/// had left) say nothing about fraud, and must block nothing.
fn reached_phone(record: &Verification) -> bool {
    let reached_ms = match record.delivery {
        DeliveryState::Delivered => record.delivered_ms.or(record.accepted_ms),
        DeliveryState::Undeliverable => None,
        _ if record.awaits_receipt => None,
        _ => record.accepted_ms,
    };
    let prompt_ms = crate::fraud_guard::PROMPT_SMS.as_millis() as Millis;
    reached_ms.is_some_and(|at| at.saturating_sub(record.created_ms) <= prompt_ms)
}

fn forget_live(shard: &mut Shard, key: (u64, ClientId), id: &VerificationId) {
    if shard.live.get(&key) == Some(id) {
        shard.live.remove(&key);
    }
}

fn not_pending(status: Status) -> ApiError {
    ApiError::NotPending {
        status: match status {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
            Status::Failed => "failed",
        },
    }
}

//! The seam between the engine's rules and the back-ends.
//!
//! A rule (a function of the engine on one [`Shard`]) changes the data it was given and records
//! everything else it causes in an [`Effects`] value: the SMS job it queues, the webhook events
//! it raises, the long-polls to wake, the delay watch, the job it acknowledges, the phone-limit
//! send it spends, the verification's next deadline. The back-end then applies them at once
//! (embedded) or writes them with the data in one commit and applies the rest once that commit
//! stood (Redis). A rule never knows which.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::clock::Millis;
use crate::ids::{AckToken, ClientId, VerificationId, shard_byte};
use crate::phone::Phone;
use crate::queue::Job;
use crate::ratelimit::Rejection;
use crate::receipt::ReceiptStatus;
use crate::store::watchers::Watchers;
use crate::verification::{EventKind, Verification, View};
use crate::webhook::Webhooks;

/// What an engine call reads and may write: one verification, by id or as the live one of a
/// phone and client, and (when asked) the failed checks of its phone and client.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    /// The phone's shard byte (see [`crate::ids::shard_byte`]): where all of it lives.
    pub shard_byte: u8,
    pub id: Option<VerificationId>,
    /// `(phone, client)`: the live verification of this phone and client.
    pub live: Option<(u64, ClientId)>,
    /// Whether the call needs the failed checks of the phone and client (a check of a code).
    pub failed_checks: bool,
}

/// The data a rule sees: the records, live index and failed checks of the phones of one shard
/// (embedded: the shard itself, under its lock; Redis: just what the call's [`Keys`] read).
#[derive(Default, Debug)]
pub struct Shard {
    /// Boxed so the table's slots stay small: hash tables double, and a slot is paid for twice
    /// over at the worst moment.
    pub records: HashMap<VerificationId, Box<Verification>, BuildHasherDefault<IdHasher>>,
    /// The live (pending) verification of each phone and client.
    pub live: HashMap<(u64, ClientId), VerificationId>,
    /// Wrong codes per phone and client, in a fixed window: one client's wrong codes never
    /// lock the phone out of another client's verifications.
    pub failed_checks: HashMap<(u64, ClientId), FailedChecks>,
    /// When the embedded sweep should next look at each verification: its earliest possible
    /// expiry while pending, the end of its retention once ended. A min-heap, so a sweep touches
    /// only what is due instead of every record. Rules never touch it; they say what they want
    /// in [`Effects::deadline`].
    pub deadlines: BinaryHeap<Reverse<(Millis, VerificationId)>>,
}

/// Wrong codes typed for one phone through one client since `window_start_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedChecks {
    pub count: u32,
    pub window_start_ms: Millis,
}

/// What a call does to its verification's next deadline (the sweep's moment to look at it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineWrite {
    #[default]
    Keep,
    /// Look again at this time (a pending verification's expiry as it now stands).
    At(Millis),
    /// It ended: nothing to expire any more (the embedded store then only waits for the end of
    /// its retention to forget it).
    Remove,
}

/// Everything a rule caused outside its shard's data.
#[derive(Default, Debug)]
pub struct Effects {
    /// The SMS job to queue (one per call at most). Only a back-end that commits it with the
    /// data records it here; the embedded back-end pushes it at once, as the rule asks.
    pub job: Option<Job>,
    /// Webhook events to raise.
    pub events: Vec<(ClientId, EventKind, View)>,
    /// Verifications whose long-polls to wake.
    pub notified: Vec<VerificationId>,
    /// `verification.delayed` watches to start: `(client, id, send)`.
    pub delay_watches: Vec<(ClientId, VerificationId, u8)>,
    /// The call spends one send of the phone's limit with its commit (Redis).
    pub spends_phone_limit: bool,
    /// The phone's limit refused this call's commit once: the answer to give when the call
    /// runs again (Redis).
    pub phone_refused: Option<Rejection>,
    /// The job this call ended, to acknowledge with its lane.
    pub ack: Option<(u8, AckToken)>,
    /// The job whose send this call prepares: it must still be this instance's for the call to
    /// stand (Redis: another instance may have taken it over).
    pub owns: Option<(u8, AckToken)>,
    /// A due `verification.delayed` watch the call dealt with: the send it watched.
    pub unwatch_delay: Option<u8>,
    /// The verification's next deadline.
    pub deadline: Option<(VerificationId, DeadlineWrite)>,
}

/// The answer of a call run by a back-end that can lose a job to another instance.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The call ran and its data stands. Its effects are still to apply (see
    /// [`crate::store::Backend::apply`]); `written` is the record as written, with its
    /// revision, for a later call on it to start from without reading it again.
    Ran {
        value: T,
        effects: Box<Effects>,
        written: Option<Snapshot>,
    },
    /// The job the call prepared is no longer this instance's: nothing was written.
    NotOwned,
}

/// A verification as a back-end wrote it, with its revision.
pub type Snapshot = Box<(u64, Verification)>;

/// Who holds an `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody did: this request now does, until it settles or releases it.
    Claimed,
    /// A request with this key created or found `id`.
    Done {
        fingerprint: u64,
        id: VerificationId,
    },
    /// A request with this key is still being served.
    Pending { fingerprint: u64 },
}

/// A receipt that came before the submit answer naming its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The id as the receipt spelt it.
    pub id: Box<str>,
    pub status: ReceiptStatus,
}

/// A lane's backlog: jobs in it, and jobs ahead of a new one for any carrier.
#[derive(Debug, Clone, Copy)]
pub struct LaneBacklog {
    pub lane: u8,
    pub depth: usize,
    pub ahead_of_new: usize,
}

// === impl Keys ===

impl Keys {
    /// The verification `id`, nothing else.
    pub fn record(id: VerificationId) -> Keys {
        Keys {
            shard_byte: id.shard_byte(),
            id: Some(id),
            live: None,
            failed_checks: false,
        }
    }

    /// The verification `id` and the failed checks of its phone and client.
    pub fn checking(id: VerificationId) -> Keys {
        Keys {
            failed_checks: true,
            ..Keys::record(id)
        }
    }

    /// The live verification of `phone` for `client`, if any, and the failed checks of the
    /// phone and client (a phone locked for this client gets no SMS through it).
    pub fn live(phone: &Phone, client: ClientId) -> Keys {
        Keys {
            shard_byte: shard_byte(phone),
            id: None,
            live: Some((phone.as_u64(), client)),
            failed_checks: true,
        }
    }
}

// === impl Effects ===

impl Effects {
    /// Raises what is left for after the data stands: webhook events and delay watches (those
    /// a commit did not write itself), and long-poll wake-ups.
    pub fn apply(self, webhooks: &Webhooks, watchers: &Watchers, now: Millis) {
        for (client, kind, view) in self.events {
            webhooks.emit(client, kind, &view, now);
        }
        for (client, id, send) in self.delay_watches {
            webhooks.watch_delay(client, id, send, now);
        }
        for id in self.notified {
            watchers.notify(&id);
        }
    }

    /// Wakes the long-polls waiting on `id`.
    pub fn notify(&mut self, id: &VerificationId) {
        self.notified.push(*id);
    }
}

/// Hashes a verification id by taking 8 of its random bytes: ids are drawn from a CSPRNG, so
/// they are already uniform and cannot be chosen by a client to collide.
#[derive(Default, Debug)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

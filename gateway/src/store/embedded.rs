//! The embedded store: verifications, the live-per-phone index, failed-check counters,
//! idempotency keys and long-poll watchers, all in process memory.
//!
//! The store is split into shards, each behind a `std::sync::Mutex` (no lock is ever held across
//! an `.await`). A verification lives in the shard of its phone number, and its id carries that
//! shard in its first byte, so one lock covers everything a call touches: the verification, the
//! phone's live index and its failed-check counter. The redis back-end will use the same idea
//! for its hash tags.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::clock::Millis;
use crate::ids::{AckToken, ClientId, VerificationId, shard_byte};
use crate::phone::Phone;
use crate::sync::lock;
use crate::verification::Verification;

/// Shards in the embedded store: enough that two cores rarely meet on one lock.
const N_SHARDS: usize = 64;

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    shards: Box<[Mutex<Shard>]>,
    idempotency: Box<[Mutex<HashMap<IdempotencyKey, IdempotencyEntry>>]>,
}

/// Everything about the phones that hash to one shard.
#[derive(Default, Debug)]
pub struct Shard {
    /// Boxed so the table's slots stay small: hash tables double, and a slot is paid for twice
    /// over at the worst moment.
    pub records: HashMap<VerificationId, Box<Verification>, BuildHasherDefault<IdHasher>>,
    /// The live (pending) verification of each phone and client.
    pub live: HashMap<(u64, ClientId), VerificationId>,
    /// Wrong codes per phone, in a fixed window.
    pub failed_checks: HashMap<u64, FailedChecks>,
    /// Long-polls waiting for a verification to change.
    pub watchers: HashMap<VerificationId, Arc<Notify>>,
    /// When the sweeper should next look at each verification: its earliest possible expiry
    /// while pending, the end of its retention once ended. A min-heap, so a sweep touches only
    /// what is due instead of every record.
    pub deadlines: BinaryHeap<Reverse<(Millis, VerificationId)>>,
    /// Set while a call of the redis back-end runs on a copy of the keys it read: what the call
    /// would do outside the shard waits here until the copy is written back.
    pub deferred: Option<Deferred>,
}

/// What a call on a copy of redis keys does once its changes are written (and never if they
/// are not).
#[derive(Default, Debug)]
pub struct Deferred {
    /// The SMS job to add to the stream (one per call at most).
    pub job: Option<crate::queue::Job>,
    /// Webhook events to raise.
    pub events: Vec<(
        ClientId,
        crate::verification::EventKind,
        crate::verification::View,
    )>,
    /// Verifications whose long-polls to wake.
    pub notified: Vec<VerificationId>,
    /// `verification.delayed` watches to start: `(client, id, send)`.
    pub delay_watches: Vec<(ClientId, VerificationId, u8)>,
    /// The call spends one send of the phone's limit: taken by the write itself.
    pub spends_phone_limit: bool,
    /// The phone's limit already refused this call once: the answer to give it.
    pub phone_refused: Option<crate::ratelimit::Rejection>,
    /// The job's stream entry to acknowledge: `(lane, entry)`.
    pub ack: Option<(u8, AckToken)>,
    /// A due `verification.delayed` watch the call dealt with: the send it watched.
    pub unwatch_delay: Option<u8>,
    /// The job's stream entry, which must still be this instance's for the write to happen.
    pub owns: Option<(u8, AckToken)>,
    /// Set after the write: the entry in `owns` was no longer this instance's (nothing was
    /// written; another instance has the job).
    pub not_owned: bool,
    /// Set after the write: the record as written, and its new revision.
    pub written: Option<(u64, crate::verification::Verification)>,
    /// The verification's next deadline, when the call changed nothing else.
    pub deadline: Option<DeadlineWrite>,
}

/// What a call does to a verification's next deadline (the sweep's moment to look at it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineWrite {
    #[default]
    Keep,
    At(Millis),
    Remove,
}

/// Wrong codes typed for one phone since `window_start_ms`.
#[derive(Debug, Clone, Copy)]
pub struct FailedChecks {
    pub count: u32,
    pub window_start_ms: Millis,
}

/// An `Idempotency-Key` as sent by one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub client: ClientId,
    pub key: Box<str>,
}

/// What a key was first used for.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyEntry {
    /// A hash of the request it came with; the same key with another request is refused.
    pub fingerprint: u64,
    pub id: VerificationId,
    pub created_ms: Millis,
}

// === impl Store ===

impl Store {
    pub fn new() -> Store {
        Store {
            shared: Arc::new(Shared {
                shards: (0..N_SHARDS)
                    .map(|_| Mutex::new(Shard::default()))
                    .collect(),
                idempotency: (0..N_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            }),
        }
    }

    /// The shard holding `id`.
    pub fn shard(&self, id: &VerificationId) -> MutexGuard<'_, Shard> {
        lock(&self.shared.shards[id.shard_byte() as usize % N_SHARDS])
    }

    /// The shard holding every verification of `phone`.
    pub fn shard_of_phone(&self, phone: &Phone) -> MutexGuard<'_, Shard> {
        lock(&self.shared.shards[shard_byte(phone) as usize % N_SHARDS])
    }

    /// The idempotency map shard for `key`.
    pub fn idempotency(
        &self,
        key: &IdempotencyKey,
    ) -> MutexGuard<'_, HashMap<IdempotencyKey, IdempotencyEntry>> {
        let mut stable = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(key, &mut stable);
        lock(&self.shared.idempotency[stable.finish() as usize % N_SHARDS])
    }

    /// Visits every shard in turn, one lock at a time.
    pub fn for_each_shard(&self, mut visit: impl FnMut(&mut Shard)) {
        for shard in self.shared.shards.iter() {
            visit(&mut lock(shard));
        }
    }

    /// Visits every idempotency shard in turn.
    pub fn for_each_idempotency_shard(
        &self,
        mut visit: impl FnMut(&mut HashMap<IdempotencyKey, IdempotencyEntry>),
    ) {
        for shard in self.shared.idempotency.iter() {
            visit(&mut lock(shard));
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("shards", &N_SHARDS)
            .finish_non_exhaustive()
    }
}

// === impl Shard ===

impl Shard {
    /// Wakes long-polls waiting on `id`.
    pub fn notify(&mut self, id: &VerificationId) {
        if let Some(deferred) = &mut self.deferred {
            deferred.notified.push(*id);
        } else if let Some(notify) = self.watchers.get(id) {
            notify.notify_waiters();
        }
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

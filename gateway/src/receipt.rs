//! Delivery receipts: carriers' message ids, normalised so that a receipt finds its SMS however
//! the carrier spells the id, and the index from those ids to verifications.
//!
//! Carriers are inconsistent about their own ids: the submit answer may say `00A1F3` and the
//! receipt `a1f3`, or hex in one and decimal in the other (SMPP carriers commonly do both). An
//! id is therefore reduced to its possible *readings*: a number when it is all digits (decimal)
//! or all hex digits (optionally `0x`-prefixed), leading zeros and case aside; otherwise its
//! lowercased text.
//!
//! [`index_readings`] is the one matching rule, which both back-ends keep: an accepted id is
//! indexed under every reading; its *own* reading (the first, most likely one) replaces whatever
//! held that key, while its other readings only fill keys nobody holds. A receipt tries its own
//! readings in turn, most likely first, and takes the first key it finds. So a receipt finds its
//! SMS however the carrier spells the id, and of two SMS whose ids share a reading (`"256"`, and
//! `"100"` read as hex) each keeps the reading that is its own.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use crate::clock::Millis;
use crate::ids::{CarrierId, VerificationId};
use crate::sync::lock;

/// Shards of the index: receipts arrive from many carrier connections at once.
const N_SHARDS: usize = 16;

/// One reading of a carrier message id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reading {
    Number(u128),
    Text(Box<str>),
}

impl std::fmt::Display for Reading {
    /// A reading as a store key: `n` and the number in decimal, or `t` and the text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reading::Number(number) => write!(f, "n{number}"),
            Reading::Text(text) => write!(f, "t{text}"),
        }
    }
}

/// Which carrier message ids belong to which verification.
#[derive(Debug)]
pub struct ReceiptIndex {
    shards: Box<[Mutex<Shard>]>,
}

/// Keyed by a 64-bit hash of (carrier, reading), not the reading itself: an index entry then
/// costs 24 bytes, which matters at a million live verifications. A collision could only point
/// a receipt at another verification, and the engine checks the verification's own carrier and
/// message id before it applies a receipt.
/// The value says whether the key is the verification's own reading (see [`index_readings`]).
type Shard = HashMap<u64, (VerificationId, bool)>;

/// What a carrier said about an SMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    Delivered,
    Undeliverable,
    Expired,
}

/// The longest carrier message id accepted: longer ones are nobody's ids.
pub const MAX_ID_LEN: usize = 128;

/// The readings of a carrier message id, most likely first; empty for an id that is empty or
/// too long.
pub fn readings(id: &str) -> Vec<Reading> {
    let id = id.trim();
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Vec::new();
    }
    let mut readings = Vec::with_capacity(2);
    let hex_digits = id
        .strip_prefix("0x")
        .or_else(|| id.strip_prefix("0X"))
        .unwrap_or(id);
    if id.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(value) = id.parse::<u128>() {
            readings.push(Reading::Number(value));
        }
    }
    if !hex_digits.is_empty() && hex_digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(value) = u128::from_str_radix(hex_digits, 16) {
            let reading = Reading::Number(value);
            if !readings.contains(&reading) {
                readings.push(reading);
            }
        }
    }
    if readings.is_empty() {
        readings.push(Reading::Text(id.to_ascii_lowercase().into_boxed_str()));
    }
    readings
}

/// The readings an accepted id is indexed under, each with whether it is the id's own (its
/// first, most likely reading). The rule both back-ends keep: an own reading replaces whatever
/// held its key; another reading only fills a key nobody holds.
pub fn index_readings(id: &str) -> impl Iterator<Item = (Reading, bool)> {
    readings(id)
        .into_iter()
        .enumerate()
        .map(|(index, reading)| (reading, index == 0))
}

// === impl ReceiptIndex ===

impl ReceiptIndex {
    pub fn new() -> ReceiptIndex {
        ReceiptIndex {
            shards: (0..N_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Remembers that `carrier` accepted an SMS of `verification` under `id`, by the rule of
    /// [`index_readings`].
    pub fn insert(&self, carrier: CarrierId, id: &str, verification: VerificationId) {
        for (reading, own) in index_readings(id) {
            let key = key(carrier, &reading);
            let mut shard = self.shard(key);
            if own {
                shard.insert(key, (verification, true));
            } else {
                shard.entry(key).or_insert((verification, false));
            }
        }
    }

    /// The verification a receipt from `carrier` for `id` may belong to.
    pub fn find(&self, carrier: CarrierId, id: &str) -> Option<VerificationId> {
        readings(id).into_iter().find_map(|reading| {
            let key = key(carrier, &reading);
            self.shard(key)
                .get(&key)
                .map(|(verification, _)| *verification)
        })
    }

    /// Forgets the ids of verifications that `keep` no longer wants; returns how many remain.
    pub fn retain(&self, mut keep: impl FnMut(&VerificationId) -> bool) -> usize {
        let mut n_left = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.retain(|_, (verification, _)| keep(verification));
            n_left += shard.len();
        }
        n_left
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(key >> 32) as usize % N_SHARDS])
    }
}

impl Default for ReceiptIndex {
    fn default() -> Self {
        ReceiptIndex::new()
    }
}

/// Receipts that came before the carrier's answer to the submit they are about: a fast carrier
/// may post the receipt while its `200` is still on the way. They are held for a while, and
/// applied when the submit answer names the id; those that find no SMS by then are unmatched.
#[derive(Debug)]
pub struct EarlyReceipts {
    state: Mutex<EarlyState>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct EarlyState {
    /// Every reading's key, to the receipt held under it.
    by_key: HashMap<u64, u64>,
    /// Held receipts by arrival number.
    held: HashMap<u64, Early>,
    /// Arrival numbers in order, for expiry and eviction (some may be taken already).
    order: std::collections::VecDeque<u64>,
    next: u64,
}

#[derive(Debug)]
struct Early {
    carrier: CarrierId,
    id: Box<str>,
    status: ReceiptStatus,
    at: Millis,
    keys: Vec<u64>,
}

/// How long an early receipt waits for its submit answer.
pub const EARLY_RECEIPT_HOLD_MS: Millis = 30_000;

impl EarlyReceipts {
    pub fn new(capacity: usize) -> EarlyReceipts {
        EarlyReceipts {
            state: Mutex::new(EarlyState::default()),
            capacity,
        }
    }

    /// Holds a receipt that matched nothing yet; returns the carriers of receipts it evicted to
    /// make room (they count as unmatched).
    pub fn hold(
        &self,
        carrier: CarrierId,
        id: &str,
        status: ReceiptStatus,
        now: Millis,
    ) -> Vec<CarrierId> {
        let keys: Vec<u64> = readings(id)
            .iter()
            .map(|reading| key(carrier, reading))
            .collect();
        if keys.is_empty() {
            return Vec::new();
        }
        let mut state = lock(&self.state);
        let mut evicted = Vec::new();
        while state.held.len() >= self.capacity {
            let Some(oldest) = state.order.pop_front() else {
                break;
            };
            if let Some(early) = state.remove(oldest) {
                evicted.push(early.carrier);
            }
        }
        let number = state.next;
        state.next += 1;
        for key in &keys {
            // A repeated receipt replaces the one held before it.
            if let Some(previous) = state.by_key.get(key).copied() {
                state.remove(previous);
            }
            state.by_key.insert(*key, number);
        }
        state.held.insert(
            number,
            Early {
                carrier,
                id: id.into(),
                status,
                at: now,
                keys,
            },
        );
        state.order.push_back(number);
        evicted
    }

    /// The receipt held for this carrier and id, if one came early.
    pub fn take(&self, carrier: CarrierId, id: &str) -> Option<(Box<str>, ReceiptStatus)> {
        let mut state = lock(&self.state);
        if state.held.is_empty() {
            return None;
        }
        let number = readings(id)
            .iter()
            .find_map(|reading| state.by_key.get(&key(carrier, reading)).copied())?;
        state.remove(number).map(|early| (early.id, early.status))
    }

    /// Drops receipts held longer than [`EARLY_RECEIPT_HOLD_MS`]; returns their carriers.
    pub fn expire(&self, now: Millis) -> Vec<CarrierId> {
        let mut state = lock(&self.state);
        let mut expired = Vec::new();
        while let Some(&oldest) = state.order.front() {
            match state.held.get(&oldest) {
                Some(early) if now < early.at + EARLY_RECEIPT_HOLD_MS => break,
                Some(_) => {
                    if let Some(early) = state.remove(oldest) {
                        expired.push(early.carrier);
                    }
                }
                None => {}
            }
            state.order.pop_front();
        }
        expired
    }

    pub fn len(&self) -> usize {
        lock(&self.state).held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EarlyState {
    fn remove(&mut self, number: u64) -> Option<Early> {
        let early = self.held.remove(&number)?;
        for key in &early.keys {
            if self.by_key.get(key) == Some(&number) {
                self.by_key.remove(key);
            }
        }
        Some(early)
    }
}

/// The index key of one reading of a carrier's id.
fn key(carrier: CarrierId, reading: &Reading) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    (carrier, reading).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::phone::Phone;

    fn verification() -> VerificationId {
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        VerificationId::new_for(&phone)
    }

    #[test]
    fn the_same_id_matches_however_it_is_spelt() {
        let index = ReceiptIndex::new();
        let (hex_id, decimal_id, text_id) = (verification(), verification(), verification());
        index.insert(0, "00A1F3", hex_id);
        index.insert(0, "000123", decimal_id);
        index.insert(0, "MSG-42-x", text_id);
        // Case, leading zeros and a 0x prefix do not matter.
        for spelling in ["a1f3", "A1F3", "0xa1f3", "0x00A1F3", " a1f3 "] {
            assert_eq!(index.find(0, spelling), Some(hex_id), "{spelling}");
        }
        // Hex in the answer, decimal in the receipt: 0xA1F3 is 41459.
        assert_eq!(index.find(0, "41459"), Some(hex_id));
        // Decimal in the answer, hex in the receipt: 123 is 0x7B.
        assert_eq!(index.find(0, "123"), Some(decimal_id));
        assert_eq!(index.find(0, "7b"), Some(decimal_id));
        assert_eq!(index.find(0, "0x7B"), Some(decimal_id));
        assert_eq!(index.find(0, "msg-42-X"), Some(text_id));
        // Another carrier's ids are another namespace.
        assert_eq!(index.find(1, "a1f3"), None);
        assert_eq!(index.find(0, "unknown"), None);
        assert_eq!(index.find(0, ""), None);
    }

    #[test]
    fn two_ids_never_claim_one_key() {
        let index = ReceiptIndex::new();
        let (first, second) = (verification(), verification());
        index.insert(0, "256", first);
        index.insert(0, "100", second);
        // "256" is read as decimal first: the first SMS, not the second's 0x100.
        assert_eq!(index.find(0, "256"), Some(first));
        assert_eq!(index.find(0, "100"), Some(second));
        // In the other order too: an own reading takes its key from another id's other reading.
        let index = ReceiptIndex::new();
        index.insert(0, "100", second);
        index.insert(0, "256", first);
        assert_eq!(index.find(0, "256"), Some(first));
        assert_eq!(index.find(0, "0x100"), Some(first));
        assert_eq!(index.find(0, "100"), Some(second));
        assert_eq!(index.find(0, "0100"), Some(second));
    }

    #[test]
    fn an_id_read_both_ways_is_found_by_either_reading() {
        let index = ReceiptIndex::new();
        let sms = verification();
        // All digits, so also hex: 0x1234 is 4660, which a receipt may send in decimal.
        index.insert(0, "1234", sms);
        assert_eq!(index.find(0, "1234"), Some(sms));
        assert_eq!(index.find(0, "4660"), Some(sms));
    }

    #[test]
    fn retain_forgets_ended_verifications() {
        let index = ReceiptIndex::new();
        let (kept, dropped) = (verification(), verification());
        index.insert(0, "abc", kept);
        index.insert(0, "xyz-1", dropped);
        assert_eq!(index.retain(|id| *id == kept), 1);
        assert_eq!(index.find(0, "xyz-1"), None);
        assert_eq!(index.find(0, "ABC"), Some(kept));
    }

    proptest! {
        /// Any spelling of a number (case, zeros, 0x) reads as the same number.
        #[test]
        fn spellings_of_a_number_agree(value in any::<u64>(), zeros in 0usize..5, upper in any::<bool>()) {
            let hex = format!("{}{value:x}", "0".repeat(zeros));
            let hex = if upper { hex.to_uppercase() } else { hex };
            prop_assert!(readings(&hex).contains(&Reading::Number(value as u128)));
            let prefixed = format!("0x{hex}");
            prop_assert!(readings(&prefixed).contains(&Reading::Number(value as u128)));
            let decimal = format!("{}{value}", "0".repeat(zeros));
            prop_assert_eq!(readings(&decimal)[0].clone(), Reading::Number(value as u128));
        }

        /// Nothing a carrier sends makes reading panic, and nothing too long is kept.
        #[test]
        fn reading_never_panics(text in ".{0,200}") {
            let found = readings(&text);
            prop_assert!(found.len() <= 2);
            if text.trim().len() > MAX_ID_LEN {
                prop_assert!(found.is_empty());
            }
        }
    }

    #[test]
    fn early_receipts_wait_for_their_submit_answer() {
        let early = EarlyReceipts::new(2);
        assert!(early.hold(1, "500", ReceiptStatus::Delivered, 0).is_empty());
        // Another carrier's answer with the same id does not take it.
        assert_eq!(early.take(2, "500"), None);
        // The submit answer spells it in hex.
        assert_eq!(
            early.take(1, "0x1F4"),
            Some(("500".into(), ReceiptStatus::Delivered))
        );
        assert_eq!(early.take(1, "500"), None, "taken once");

        early.hold(1, "a", ReceiptStatus::Delivered, 0);
        early.hold(1, "b", ReceiptStatus::Delivered, 10);
        assert_eq!(
            early.hold(3, "c", ReceiptStatus::Expired, 20),
            [1],
            "the oldest makes room"
        );
        assert_eq!(early.expire(EARLY_RECEIPT_HOLD_MS + 10), [1]);
        assert_eq!(early.len(), 1);
        assert_eq!(early.expire(EARLY_RECEIPT_HOLD_MS + 20), [3]);
        assert!(early.is_empty());
    }
}

//! The names every layer shares: verification, client and carrier ids, and the opaque token a
//! back-end hands out with a job or an event so it can acknowledge it later.
//!
//! Nothing here knows how a back-end stores or groups them: an id only says which *shard byte*
//! its phone has, and each back-end reduces that byte to its own shards or hash-tag groups.

use std::fmt;

use rand::RngCore;

use crate::phone::Phone;

/// Index of a client in the config (0 is the anonymous client when none is configured).
pub type ClientId = u16;

/// Index of a carrier in the config.
pub type CarrierId = u8;

/// A verification's id: 16 random bytes, the first of which is its phone's shard byte.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerificationId([u8; 16]);

/// What a back-end needs to acknowledge a job or an event it handed out (on Redis, its stream
/// entry); the queue and the webhook outbox carry it without looking inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AckToken(pub(crate) u64, pub(crate) u64);

// === impl VerificationId ===

impl VerificationId {
    /// A fresh random id whose shard byte is `phone`'s.
    pub fn new_for(phone: &Phone) -> VerificationId {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        bytes[0] = shard_byte(phone);
        VerificationId(bytes)
    }

    /// Parses the 32 lowercase hex digits of an id.
    pub fn parse(text: &str) -> Option<VerificationId> {
        let mut bytes = [0u8; 16];
        if text.len() != 32 || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(VerificationId(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The shard byte of the verification's phone (see [`shard_byte`]).
    pub fn shard_byte(&self) -> u8 {
        self.0[0]
    }
}

impl fmt::Display for VerificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 32];
        hex::encode_to_slice(self.0, &mut out).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for VerificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerificationId({self})")
    }
}

/// The shard byte of a phone: a fixed mix of its digits. Every verification of the phone
/// carries it as its id's first byte, so a back-end finds the phone's data and the
/// verification's in the same place.
pub fn shard_byte(phone: &Phone) -> u8 {
    (phone.as_u64().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_and_carries_the_phone_shard_byte() {
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        let id = VerificationId::new_for(&phone);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(VerificationId::parse(&text), Some(id));
        assert_eq!(id.shard_byte(), shard_byte(&phone));
        assert_ne!(VerificationId::new_for(&phone), id);
    }

    #[test]
    fn refuses_malformed_ids() {
        for text in [
            "",
            "abc",
            &"g".repeat(32),
            &"A".repeat(32),
            &"0".repeat(31),
            &"0".repeat(33),
        ] {
            assert_eq!(VerificationId::parse(text), None, "{text:?}");
        }
    }
}

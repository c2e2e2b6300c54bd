//! One-time codes: drawing them, and keeping them secret.
//!
//! A code is drawn from the operating system's CSPRNG. What the store keeps of it is:
//! - its **tag**, `HMAC-SHA256(check_key, id ‖ phone ‖ code)`, which a check compares in constant
//!   time, so a code typed for one verification or phone never matches another;
//! - a **sealed** copy, the code's number XOR a pad `HMAC-SHA256(seal_key, id ‖ phone)` reduced to
//!   32 bits, which exists only so that a resend carries the *same* code (docs/DESIGN.md section 3).
//!   It is wiped when the verification ends.
//!
//! Both keys are derived from the server secret, which never leaves this module. [`Code`] prints
//! as `**REDACTED**`; the only way to read its digits is [`Code::expose`], called when the SMS text
//! is rendered for a carrier.
//!
//! A third key, [`PhoneKeys`], names phones where a shared store's key names would otherwise
//! spell them out (Redis): `HMAC-SHA256(phone_key, phone)`, its first 16 bytes in hex.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ids::VerificationId;
use crate::phone::Phone;

type HmacSha256 = Hmac<Sha256>;

/// The keys that protect codes at rest.
#[derive(Clone)]
pub struct CodeKeys {
    check_key: [u8; 32],
    seal_key: [u8; 32],
    length: u8,
}

/// Phones as a shared store's key names spell them: a keyed hash, so that whoever can list the
/// keys (a Redis `KEYS` or `SCAN`) learns no phone number from their names.
/// Every instance derives the same key from the shared secret, so they agree on the names.
#[derive(Clone)]
pub struct PhoneKeys {
    key: [u8; 32],
}

/// A one-time code in clear: only ever held briefly, and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

/// What the store keeps of a code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoredCode {
    tag: [u8; 32],
    sealed: u32,
}

impl StoredCode {
    /// The tag and the sealed copy, for a store that writes records out.
    pub fn to_parts(&self) -> ([u8; 32], u32) {
        (self.tag, self.sealed)
    }

    /// A stored code back from [`StoredCode::to_parts`].
    pub fn from_parts(tag: [u8; 32], sealed: u32) -> StoredCode {
        StoredCode { tag, sealed }
    }
}

// === impl CodeKeys ===

impl CodeKeys {
    /// Derives the keys from the server secret; `length` is the number of digits (6 to 9).
    pub fn new(secret: &[u8], length: u8) -> CodeKeys {
        CodeKeys {
            check_key: derive(secret, b"otpgate code check v1"),
            seal_key: derive(secret, b"otpgate code seal v1"),
            length,
        }
    }

    /// Digits per code.
    pub fn length(&self) -> u8 {
        self.length
    }

    /// Draws a new code from the CSPRNG and returns it with what the store keeps of it.
    pub fn generate(&self, id: &VerificationId, phone: &Phone) -> (Code, StoredCode) {
        let modulus = 10u32.pow(self.length as u32);
        // ThreadRng is a CSPRNG (ChaCha12, reseeded from the OS); see rand's `rngs` docs.
        let value = rand::rng().random_range(0..modulus);
        let code = Code(format!("{value:0width$}", width = self.length as usize));
        let stored = self.store(id, phone, &code);
        (code, stored)
    }

    /// What the store keeps of `code` for the verification `id`: a second caller's verification
    /// carries the live one's code, tagged and sealed for its own id.
    pub fn store(&self, id: &VerificationId, phone: &Phone, code: &Code) -> StoredCode {
        let value: u32 = code.0.parse().unwrap_or(0);
        StoredCode {
            tag: self.tag(id, phone, &code.0),
            sealed: value ^ self.pad(id, phone),
        }
    }

    /// Compares a typed code with the stored tag in constant time.
    pub fn matches(
        &self,
        id: &VerificationId,
        phone: &Phone,
        typed: &str,
        stored: &StoredCode,
    ) -> bool {
        let tag = self.tag(id, phone, typed);
        tag.ct_eq(&stored.tag).into()
    }

    /// Recovers the code for a resend.
    pub fn unseal(&self, id: &VerificationId, phone: &Phone, stored: &StoredCode) -> Code {
        let value = stored.sealed ^ self.pad(id, phone);
        Code(format!("{value:0width$}", width = self.length as usize))
    }

    /// Whether `typed` looks like a code at all (the right number of ASCII digits).
    pub fn is_well_formed(&self, typed: &str) -> bool {
        typed.len() == self.length as usize && typed.bytes().all(|b| b.is_ascii_digit())
    }

    fn tag(&self, id: &VerificationId, phone: &Phone, code: &str) -> [u8; 32] {
        let mut mac =
            HmacSha256::new_from_slice(&self.check_key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(&phone.as_u64().to_be_bytes());
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn pad(&self, id: &VerificationId, phone: &Phone) -> u32 {
        let mut mac =
            HmacSha256::new_from_slice(&self.seal_key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(&phone.as_u64().to_be_bytes());
        let out = mac.finalize().into_bytes();
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }
}

impl fmt::Debug for CodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeKeys")
            .field("keys", &"**REDACTED**")
            .field("length", &self.length)
            .finish()
    }
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().into()
}

// === impl PhoneKeys ===

impl PhoneKeys {
    /// Derives the key from the server secret, apart from the codes' keys.
    pub fn new(secret: &[u8]) -> PhoneKeys {
        PhoneKeys {
            key: derive(secret, b"otpgate phone key name v1"),
        }
    }

    /// The name of `phone` (its E.164 digits as [`Phone::as_u64`] holds them) in key names:
    /// 16 bytes of its HMAC in hex (128 bits: collisions between numbers are out of reach, and
    /// without the secret the name cannot be tied back to a number by trying them all).
    pub fn name(&self, phone: u64) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&phone.to_be_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

impl fmt::Debug for PhoneKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhoneKeys(**REDACTED**)")
    }
}

// === impl Code ===

impl Code {
    /// The digits, for the SMS text only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

// === impl StoredCode ===

impl StoredCode {
    /// Forgets the sealed copy: after this, the code can be checked but never resent.
    pub fn wipe_sealed(&mut self) {
        self.sealed = 0;
    }
}

impl fmt::Debug for StoredCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredCode(**REDACTED**)")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fixture() -> (CodeKeys, VerificationId, Phone) {
        let keys = CodeKeys::new(b"0123456789abcdef0123456789abcdef", 6);
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        (keys, VerificationId::new_for(&phone), phone)
    }

    #[test]
    fn right_code_matches_and_wrong_ones_do_not() {
        let (keys, id, phone) = fixture();
        let (code, stored) = keys.generate(&id, &phone);
        assert_eq!(code.expose().len(), 6);
        assert!(keys.matches(&id, &phone, code.expose(), &stored));
        let wrong = format!(
            "{:06}",
            (code.expose().parse::<u32>().unwrap() + 1) % 1_000_000
        );
        assert!(!keys.matches(&id, &phone, &wrong, &stored));
    }

    #[test]
    fn tag_is_bound_to_id_and_phone() {
        let (keys, id, phone) = fixture();
        let (code, stored) = keys.generate(&id, &phone);
        let other_id = VerificationId::new_for(&phone);
        let (other_phone, _) = Phone::parse("+393331234568").unwrap();
        assert!(!keys.matches(&other_id, &phone, code.expose(), &stored));
        assert!(!keys.matches(&id, &other_phone, code.expose(), &stored));
    }

    #[test]
    fn unseal_gives_back_the_same_code() {
        let (keys, id, phone) = fixture();
        let (code, stored) = keys.generate(&id, &phone);
        assert_eq!(keys.unseal(&id, &phone, &stored), code);
    }

    #[test]
    fn a_code_stored_again_for_another_id_matches_there_only() {
        let (keys, id, phone) = fixture();
        let (code, stored) = keys.generate(&id, &phone);
        let second = VerificationId::new_for(&phone);
        let again = keys.store(&second, &phone, &code);
        assert!(keys.matches(&second, &phone, code.expose(), &again));
        assert_eq!(keys.unseal(&second, &phone, &again), code);
        assert!(!keys.matches(&second, &phone, code.expose(), &stored));
        assert!(!keys.matches(&id, &phone, code.expose(), &again));
    }

    #[test]
    fn secrets_never_print() {
        let (keys, id, phone) = fixture();
        let (code, stored) = keys.generate(&id, &phone);
        for printed in [
            format!("{code}"),
            format!("{code:?}"),
            format!("{stored:?}"),
            format!("{keys:?}"),
        ] {
            assert!(!printed.contains(code.expose()), "{printed}");
        }
    }

    #[test]
    fn phone_names_are_keyed_and_spell_no_digits() {
        let (_, _, phone) = fixture();
        let keys = PhoneKeys::new(b"0123456789abcdef0123456789abcdef");
        let name = keys.name(phone.as_u64());
        assert_eq!(name.len(), 32);
        assert_eq!(
            name,
            keys.name(phone.as_u64()),
            "the same for every instance"
        );
        assert!(!name.contains("3331234567"), "{name}");
        let (other, _) = Phone::parse("+393331234568").unwrap();
        assert_ne!(name, keys.name(other.as_u64()));
        let other_secret = PhoneKeys::new(b"another secret of enough length!");
        assert_ne!(name, other_secret.name(phone.as_u64()));
        assert_eq!(format!("{keys:?}"), "PhoneKeys(**REDACTED**)");
    }

    proptest! {
        #[test]
        fn codes_are_well_formed_for_every_length(length in 6u8..=9) {
            let (_, id, phone) = fixture();
            let keys = CodeKeys::new(b"another secret of enough length!", length);
            let (code, stored) = keys.generate(&id, &phone);
            prop_assert!(keys.is_well_formed(code.expose()));
            prop_assert!(keys.matches(&id, &phone, code.expose(), &stored));
            prop_assert_eq!(keys.unseal(&id, &phone, &stored), code);
        }
    }
}

//! Valid, distinct phone numbers generated from a counter.
//!
//! Index `i` maps to the Italian mobile number `+39` followed by `3_200_000_000 + i`,
//! so indices `0..CAPACITY` give `+39 320 0000000` to `+39 399 9999999`.
//! libphonenumber's metadata (which the gateway validates with) describes Italian mobile
//! numbers as `3[2-9]\d{7,8}`, so every one of them is valid,
//! and distinct indices give distinct numbers.

/// How many distinct numbers there are.
pub const CAPACITY: u64 = 800_000_000;

/// The first national number, `320 0000000`.
const FIRST_NATIONAL_NUMBER: u64 = 3_200_000_000;

/// The Italian mobile number with this index, in E.164, or `None` past [`CAPACITY`].
pub fn italian_mobile(index: u64) -> Option<String> {
    (index < CAPACITY).then(|| format!("+39{}", FIRST_NATIONAL_NUMBER + index))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Checks libphonenumber's pattern for Italian mobiles, `3[2-9]\d{8}` at ten digits.
    fn is_italian_mobile(phone: &str) -> bool {
        let Some(national) = phone.strip_prefix("+39") else {
            return false;
        };
        let bytes = national.as_bytes();
        bytes.len() == 10
            && bytes[0] == b'3'
            && (b'2'..=b'9').contains(&bytes[1])
            && bytes.iter().all(u8::is_ascii_digit)
    }

    #[test]
    fn range_ends_are_valid() {
        assert_eq!(italian_mobile(0).as_deref(), Some("+393200000000"));
        assert_eq!(
            italian_mobile(CAPACITY - 1).as_deref(),
            Some("+393999999999")
        );
        assert_eq!(italian_mobile(CAPACITY), None);
        assert_eq!(italian_mobile(u64::MAX), None);
    }

    #[test]
    fn numbers_are_valid_and_distinct() {
        let indices = (0..100_000).chain((0..1_000).map(|i| i * 797_003 % CAPACITY));
        let mut seen = HashSet::new();
        for index in indices {
            let phone = italian_mobile(index).unwrap();
            assert!(
                is_italian_mobile(&phone),
                "{phone} is not an Italian mobile"
            );
            seen.insert((index, phone));
        }
        let distinct_phones: HashSet<_> = seen.iter().map(|(_, phone)| phone).collect();
        let distinct_indices: HashSet<_> = seen.iter().map(|(index, _)| index).collect();
        assert_eq!(distinct_phones.len(), distinct_indices.len());
    }
}

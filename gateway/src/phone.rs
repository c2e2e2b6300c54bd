//! Phone numbers: parsing and validation as E.164, the country allow-list, and masking.
//!
//! A [`Phone`] is stored as its E.164 digits in a `u64` (15 digits at most fit), which keeps a
//! live verification small. Its `Display` and `Debug` are masked (`+39333****567`), so a phone
//! number can be logged or returned without care; the full number is only reachable through
//! [`Phone::e164`], which the carrier connectors call.

use std::fmt;

use phonenumber::{Mode, PhoneNumber};

/// A validated phone number that can receive SMS.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Phone {
    /// The E.164 digits without the `+`, e.g. `393331234567`.
    digits: u64,
    /// Digits in the country calling code (1 to 3), for masking.
    country_code_len: u8,
}

/// Why a phone number was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhoneError {
    #[error("phone: expected an E.164 number such as +393331234567")]
    NotE164,
    #[error("phone: not a valid number for its country")]
    Invalid,
    #[error("phone: not a number that can receive SMS")]
    NotMobile,
}

/// ISO 3166 alpha-2 regions that phone numbers may belong to; empty allows all.
#[derive(Clone, Debug, Default)]
pub struct CountryAllowList {
    regions: Vec<phonenumber::country::Id>,
}

// === impl Phone ===

impl Phone {
    /// Parses and validates a number given in E.164 (`+` and 8 to 15 digits; spaces, dashes, dots
    /// and brackets are tolerated) and returns it with its region.
    pub fn parse(input: &str) -> Result<(Phone, Option<phonenumber::country::Id>), PhoneError> {
        let trimmed = input.trim();
        if !trimmed.starts_with('+') || trimmed.len() > 32 {
            return Err(PhoneError::NotE164);
        }
        let allowed = |c: char| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')');
        if !trimmed[1..].chars().all(allowed) {
            return Err(PhoneError::NotE164);
        }
        let number: PhoneNumber =
            phonenumber::parse(None, trimmed).map_err(|_| PhoneError::NotE164)?;
        if number.extension().is_some() {
            return Err(PhoneError::NotE164);
        }
        if !number.is_valid() {
            return Err(PhoneError::Invalid);
        }
        use phonenumber::Type;
        match number.number_type(&phonenumber::metadata::DATABASE) {
            Type::Mobile
            | Type::FixedLineOrMobile
            | Type::PersonalNumber
            | Type::Pager
            | Type::Voip => {}
            _ => return Err(PhoneError::NotMobile),
        }
        let e164 = number.format().mode(Mode::E164).to_string();
        let digits: u64 = e164
            .strip_prefix('+')
            .and_then(|d| d.parse().ok())
            .ok_or(PhoneError::NotE164)?;
        let country_code_len = number.code().value().to_string().len() as u8;
        Ok((
            Phone {
                digits,
                country_code_len,
            },
            number.country().id(),
        ))
    }

    /// The full number in E.164, for carriers only.
    pub fn e164(&self) -> String {
        format!("+{}", self.digits)
    }

    /// The E.164 digits as a number: a compact key for maps and limiters.
    pub fn as_u64(&self) -> u64 {
        self.digits
    }

    /// The number with its middle hidden: the country code, then up to three leading and three
    /// trailing digits of the national number, never more than a third of it each, so at least
    /// a third is always hidden (`+39333****567`).
    pub fn masked(&self) -> String {
        let digits = self.digits.to_string();
        let country_code_len = (self.country_code_len as usize).min(digits.len());
        let (country_code, national) = digits.split_at(country_code_len);
        let shown = (national.len() / 3).min(3);
        let hidden = national.len() - 2 * shown;
        let mut out = String::with_capacity(digits.len() + 1);
        out.push('+');
        out.push_str(country_code);
        out.push_str(&national[..shown]);
        out.extend(std::iter::repeat_n('*', hidden));
        out.push_str(&national[national.len() - shown..]);
        out
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone({})", self.masked())
    }
}

// === impl CountryAllowList ===

impl CountryAllowList {
    /// Builds the list from ISO 3166 alpha-2 codes such as `"IT"`.
    pub fn new(codes: &[String]) -> Result<CountryAllowList, String> {
        let mut regions = Vec::with_capacity(codes.len());
        for code in codes {
            let id = code
                .to_ascii_uppercase()
                .parse::<phonenumber::country::Id>()
                .map_err(|_| format!("unknown ISO 3166 alpha-2 region {code:?}"))?;
            regions.push(id);
        }
        Ok(CountryAllowList { regions })
    }

    /// Whether a number from `region` may be sent to.
    pub fn allows(&self, region: Option<phonenumber::country::Id>) -> bool {
        if self.regions.is_empty() {
            return true;
        }
        region.is_some_and(|region| self.regions.contains(&region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_italian_mobile_and_masks_it() {
        let (phone, region) = Phone::parse("+393331234567").unwrap();
        assert_eq!(phone.e164(), "+393331234567");
        assert_eq!(phone.masked(), "+39333****567");
        assert_eq!(format!("{phone}"), "+39333****567");
        assert_eq!(format!("{phone:?}"), "Phone(+39333****567)");
        assert_eq!(region, Some(phonenumber::country::Id::IT));
    }

    #[test]
    fn tolerates_separators() {
        let (phone, _) = Phone::parse(" +39 333-123.4567 ").unwrap();
        assert_eq!(phone.e164(), "+393331234567");
    }

    #[test]
    fn masks_other_country_code_lengths() {
        let (us, _) = Phone::parse("+12015550123").unwrap();
        assert_eq!(us.masked(), "+1201****123");
        let (ie, _) = Phone::parse("+353851234567").unwrap();
        assert_eq!(ie.masked(), "+353851***567");
        // A four-digit national number: one digit shown at each end, two hidden.
        let short = Phone {
            digits: 2905123,
            country_code_len: 3,
        };
        assert_eq!(short.masked(), "+2905**3");
    }

    #[test]
    fn refuses_bad_numbers() {
        for input in [
            "",
            "+",
            "393331234567",
            "+39abc",
            "+39333123456789012345",
            "+0000",
            "++39333",
        ] {
            assert_eq!(
                Phone::parse(input).unwrap_err(),
                PhoneError::NotE164,
                "{input:?}"
            );
        }
        assert_eq!(Phone::parse("+39333").unwrap_err(), PhoneError::Invalid);
        // A Rome landline cannot receive SMS.
        assert_eq!(
            Phone::parse("+390612345678").unwrap_err(),
            PhoneError::NotMobile
        );
        // An Italian premium-rate number: a classic SMS pumping target.
        assert!(Phone::parse("+39899123456").is_err());
    }

    #[test]
    fn allow_list_filters_regions() {
        let all = CountryAllowList::new(&[]).unwrap();
        let it_only = CountryAllowList::new(&["it".to_string()]).unwrap();
        let (it, it_region) = Phone::parse("+393331234567").unwrap();
        let (_, us_region) = Phone::parse("+12015550123").unwrap();
        let _ = it;
        assert!(all.allows(us_region));
        assert!(it_only.allows(it_region));
        assert!(!it_only.allows(us_region));
        assert!(CountryAllowList::new(&["XX".to_string()]).is_err());
    }
}

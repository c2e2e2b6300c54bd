//! Phone numbers: parsing and validation as E.164, the country allow-list, and masking.
//!
//! A [`Phone`] is stored as its E.164 digits in a `u64` (15 digits at most fit), which keeps a
//! live verification small. Its `Display` and `Debug` are masked (`+39333****567`), so a phone
//! number can be logged or returned without care; the full number is only reachable through
//! [`Phone::e164`], which the carrier connectors call.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use regex::{Regex, RegexBuilder};

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

/// ISO 3166 alpha-2 regions that phone numbers may belong to; empty allows all. Non-geographic
/// numbers (+881 satellite phones, +882 and +883 international networks, and the like), which
/// belong to no region, are allowed only when configured so.
#[derive(Clone, Debug, Default)]
pub struct CountryAllowList {
    regions: Vec<phonenumber::country::Id>,
    non_geographic: bool,
}

/// What kind of number that can take SMS a phone is, by libphonenumber's types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberType {
    Mobile,
    Pager,
    /// A personal number that forwards elsewhere (the UK's 070 range): a favourite of SMS
    /// pumping, as its owner sets its price.
    Personal,
    Voip,
}

/// The number types a gateway sends codes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumberTypes(u8);

// === impl Phone ===

/// Loads libphonenumber's metadata and compiles the patterns of a common region, which
/// otherwise happens in the first request that parses a number.
pub fn warm_up() {
    let _ = Phone::parse("+393331234567");
}

impl Phone {
    /// Parses and validates a number given in E.164 (`+` and 8 to 15 digits; spaces, dashes, dots
    /// and brackets are tolerated) and returns it with its region.
    pub fn parse(input: &str) -> Result<(Phone, Option<phonenumber::country::Id>), PhoneError> {
        Phone::parse_typed(input).map(|(phone, region, _)| (phone, region))
    }

    /// [`Phone::parse`], with the number's type.
    pub fn parse_typed(
        input: &str,
    ) -> Result<(Phone, Option<phonenumber::country::Id>, NumberType), PhoneError> {
        let trimmed = input.trim();
        let Some(rest) = trimmed.strip_prefix('+') else {
            return Err(PhoneError::NotE164);
        };
        if trimmed.len() > 32 {
            return Err(PhoneError::NotE164);
        }
        let mut digits = String::with_capacity(16);
        for c in rest.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '-' | '.' | '(' | ')' => {}
                _ => return Err(PhoneError::NotE164),
            }
        }
        // E.164: a country code that does not start with 0, and 15 digits at most.
        if !(4..=15).contains(&digits.len()) || digits.starts_with('0') {
            return Err(PhoneError::NotE164);
        }
        // Country calling codes are prefix-free (ITU-T E.164), so the first of the one-, two-
        // and three-digit prefixes that is a code is the code.
        let (country_code_len, regions) = (1..=3)
            .find_map(|len| {
                let code: u16 = digits[..len].parse().ok()?;
                let regions = phonenumber::metadata::DATABASE.by_code(&code)?;
                Some((len, regions))
            })
            .ok_or(PhoneError::Invalid)?;
        // The national number keeps its leading zeros (Italian landlines start with 0).
        let (region, kind) = classify(&regions, &digits[country_code_len..])?;
        let Kind::Sms(number_type) = kind else {
            return Err(PhoneError::NotMobile);
        };
        let digits: u64 = digits.parse().map_err(|_| PhoneError::NotE164)?;
        let country_code_len = country_code_len as u8;
        Ok((
            Phone {
                digits,
                country_code_len,
            },
            region,
            number_type,
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

    /// What a store keeps of a number: its digits and the length of its country code.
    pub fn to_parts(&self) -> (u64, u8) {
        (self.digits, self.country_code_len)
    }

    /// A number back from [`Phone::to_parts`], as stored by the gateway itself.
    pub fn from_parts(digits: u64, country_code_len: u8) -> Phone {
        Phone {
            digits,
            country_code_len: country_code_len.clamp(1, 3),
        }
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

/// What a valid number is, as far as SMS is concerned.
enum Kind {
    /// Mobile, pager, personal or VoIP: can receive SMS.
    Sms(NumberType),
    /// Fixed line, premium rate, toll free and the rest.
    Other,
}

/// Finds the region whose numbering plan the number belongs to and whether it takes SMS, with
/// as few regular-expression matches as possible: two for a mobile. `phonenumber::parse` with
/// `is_valid`, `number_type` and `country().id()` each looked the region up again, which made
/// phone parsing the costliest part of a request.
fn classify(
    regions: &[&phonenumber::metadata::Metadata],
    national: &str,
) -> Result<(Option<phonenumber::country::Id>, Kind), PhoneError> {
    for meta in regions {
        let descriptors = meta.descriptors();
        if !is_match(descriptors.general(), national) {
            continue;
        }
        let matches = |descriptor: Option<&phonenumber::metadata::Descriptor>| {
            descriptor.is_some_and(|descriptor| is_match(descriptor, national))
        };
        // libphonenumber's types do not overlap (but for fixed lines that may be mobiles), so
        // the common case, a mobile, costs two matches. Premium-rate, toll-free and shared-cost
        // numbers never match here and never get a code: sending to them is how SMS pumping
        // fraud makes money.
        let takes_sms = if matches(descriptors.mobile()) {
            Some(NumberType::Mobile)
        } else if matches(descriptors.pager()) {
            Some(NumberType::Pager)
        } else if matches(descriptors.personal_number()) {
            Some(NumberType::Personal)
        } else if matches(descriptors.voip()) {
            Some(NumberType::Voip)
        } else {
            None
        };
        if let Some(number_type) = takes_sms {
            return Ok((meta.id().parse().ok(), Kind::Sms(number_type)));
        }
        let known = matches(descriptors.fixed_line())
            || matches(descriptors.premium_rate())
            || matches(descriptors.toll_free())
            || matches(descriptors.shared_cost())
            || matches(descriptors.uan())
            || matches(descriptors.voicemail());
        if known {
            return Ok((meta.id().parse().ok(), Kind::Other));
        }
    }
    Err(PhoneError::Invalid)
}

/// Whether a national number fits a numbering-plan descriptor: one of its possible lengths, and
/// a full match of its pattern.
///
/// The patterns are compiled once here and shared: libphonenumber's own `is_match` goes through
/// a process-wide LRU cache behind one mutex, which two cores under load contend for.
fn is_match(descriptor: &phonenumber::metadata::Descriptor, national: &str) -> bool {
    let lengths = descriptor.possible_length();
    if !lengths.is_empty() && !lengths.contains(&(national.len() as u16)) {
        return false;
    }
    static COMPILED: OnceLock<RwLock<HashMap<usize, Option<Arc<Regex>>>>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(Default::default);
    // Descriptors live in libphonenumber's static database, so their address names them.
    let key = descriptor as *const phonenumber::metadata::Descriptor as usize;
    let known = compiled
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&key)
        .cloned();
    let regex = match known {
        Some(regex) => regex,
        None => {
            let source = descriptor.national_number().as_str();
            let regex = RegexBuilder::new(&format!("^(?:{source})$"))
                .ignore_whitespace(true)
                .build()
                .ok()
                .map(Arc::new);
            compiled
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(key, regex.clone());
            regex
        }
    };
    regex.is_some_and(|regex| regex.is_match(national))
}

// === impl CountryAllowList ===

impl CountryAllowList {
    /// Builds the list from ISO 3166 alpha-2 codes such as `"IT"`.
    pub fn new(codes: &[String], non_geographic: bool) -> Result<CountryAllowList, String> {
        let mut regions = Vec::with_capacity(codes.len());
        for code in codes {
            let id = code
                .to_ascii_uppercase()
                .parse::<phonenumber::country::Id>()
                .map_err(|_| format!("unknown ISO 3166 alpha-2 region {code:?}"))?;
            regions.push(id);
        }
        Ok(CountryAllowList {
            regions,
            non_geographic,
        })
    }

    /// The labels of the metrics by country: the allowed regions, or with no list every
    /// region libphonenumber knows; `"001"` (numbers of no region) either way.
    pub fn metric_labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = if self.regions.is_empty() {
            phonenumber::metadata::DATABASE
                .iter()
                .map(|metadata| metadata.id().to_owned())
                .collect()
        } else {
            self.regions.iter().map(|id| format!("{id:?}")).collect()
        };
        labels.push("001".to_owned());
        labels
    }

    /// Whether every region is allowed (no list configured): premium-rate and satellite ranges
    /// included, which is what SMS pumping feeds on.
    pub fn allows_every_region(&self) -> bool {
        self.regions.is_empty()
    }

    /// Whether a number from `region` (`None`: non-geographic) may be sent to.
    pub fn allows(&self, region: Option<phonenumber::country::Id>) -> bool {
        match region {
            None => self.non_geographic,
            Some(_) if self.regions.is_empty() => true,
            Some(region) => self.regions.contains(&region),
        }
    }
}

// === impl NumberTypes ===

impl NumberTypes {
    /// Mobile numbers only.
    pub const MOBILE: NumberTypes = NumberTypes(1);

    /// The types named in `names` (`mobile`, `pager`, `personal`, `voip`).
    pub fn parse(names: &[String]) -> Result<NumberTypes, String> {
        let mut bits = 0;
        for name in names {
            bits |= match name.as_str() {
                "mobile" => NumberTypes::bit(NumberType::Mobile),
                "pager" => NumberTypes::bit(NumberType::Pager),
                "personal" => NumberTypes::bit(NumberType::Personal),
                "voip" => NumberTypes::bit(NumberType::Voip),
                other => {
                    return Err(format!(
                        "unknown number type {other:?} (mobile, pager, personal or voip)"
                    ));
                }
            };
        }
        if bits == 0 {
            return Err("name at least one number type".to_owned());
        }
        Ok(NumberTypes(bits))
    }

    /// Whether codes go to numbers of this type.
    pub fn allows(self, number_type: NumberType) -> bool {
        self.0 & NumberTypes::bit(number_type) != 0
    }

    fn bit(number_type: NumberType) -> u8 {
        match number_type {
            NumberType::Mobile => 1,
            NumberType::Pager => 2,
            NumberType::Personal => 4,
            NumberType::Voip => 8,
        }
    }
}

impl NumberType {
    /// Its name in `limits.number_types` and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            NumberType::Mobile => "mobile",
            NumberType::Pager => "pager",
            NumberType::Personal => "personal",
            NumberType::Voip => "voip",
        }
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
        assert_eq!(
            Phone::parse("+39899123456").unwrap_err(),
            PhoneError::NotMobile
        );
        assert_eq!(
            Phone::parse("+39800123456").unwrap_err(),
            PhoneError::NotMobile
        );
    }

    /// The fast E.164 path agrees with libphonenumber's own parser and validator.
    #[test]
    fn agrees_with_libphonenumber() {
        let samples = [
            "+393331234567",
            "+393471234567",
            "+390612345678",
            "+39061234567",
            "+39899123456",
            "+12015550123",
            "+14155552671",
            "+447911123456",
            "+442071838750",
            "+4915123456789",
            "+33612345678",
            "+34612345678",
            "+353851234567",
            "+8613812345678",
            "+819012345678",
            "+61412345678",
            "+5511961234567",
            "+27821234567",
            "+79161234567",
            "+3790123456",
            "+39333",
            "+1555",
            "+999123456789",
            "+88212345678",
        ];
        for sample in samples {
            let ours = Phone::parse(sample);
            let theirs = phonenumber::parse(None, sample)
                .ok()
                .filter(|number| number.is_valid());
            match (&ours, &theirs) {
                (Ok((phone, region)), Some(number)) => {
                    assert_eq!(
                        phone.e164(),
                        number.format().mode(phonenumber::Mode::E164).to_string(),
                        "{sample}"
                    );
                    assert_eq!(*region, number.country().id(), "{sample}");
                }
                (Err(PhoneError::NotMobile), Some(_)) => {}
                (Err(_), None) => {}
                _ => panic!(
                    "{sample}: ours {ours:?}, libphonenumber valid: {}",
                    theirs.is_some()
                ),
            }
        }
    }

    #[test]
    fn allow_list_filters_regions() {
        let all = CountryAllowList::new(&[], false).unwrap();
        let it_only = CountryAllowList::new(&["it".to_string()], false).unwrap();
        let (it, it_region) = Phone::parse("+393331234567").unwrap();
        let (_, us_region) = Phone::parse("+12015550123").unwrap();
        let _ = it;
        assert!(all.allows(us_region));
        assert!(it_only.allows(it_region));
        assert!(!it_only.allows(us_region));
        assert!(CountryAllowList::new(&["XX".to_string()], false).is_err());
    }

    /// Satellite phones (+881) belong to no region: refused unless non-geographic numbers are
    /// allowed, even with no country list.
    #[test]
    fn non_geographic_numbers_need_their_own_permission() {
        let (_, region, number_type) = Phone::parse_typed(SATELLITE).unwrap();
        assert_eq!(region, None);
        assert_eq!(number_type, NumberType::Mobile);
        assert!(!CountryAllowList::new(&[], false).unwrap().allows(region));
        assert!(CountryAllowList::new(&[], true).unwrap().allows(region));
        let it_only = CountryAllowList::new(&["IT".to_string()], true).unwrap();
        assert!(it_only.allows(region));
    }

    /// A UK personal number (070) is told apart from a UK mobile (07[1-9]), and only the types
    /// configured are allowed.
    #[test]
    fn number_types_tell_personal_numbers_from_mobiles() {
        let (_, _, personal) = Phone::parse_typed("+447012345678").unwrap();
        let (_, _, mobile) = Phone::parse_typed("+447911123456").unwrap();
        assert_eq!(personal, NumberType::Personal);
        assert_eq!(mobile, NumberType::Mobile);
        assert!(NumberTypes::MOBILE.allows(mobile));
        assert!(!NumberTypes::MOBILE.allows(personal));
        let both = NumberTypes::parse(&["mobile".into(), "personal".into()]).unwrap();
        assert!(both.allows(personal) && both.allows(mobile));
        assert!(!both.allows(NumberType::Voip));
        assert!(NumberTypes::parse(&[]).is_err());
        assert!(NumberTypes::parse(&["landline".into()]).is_err());
    }

    /// An Iridium satellite phone.
    const SATELLITE: &str = "+881631234567";
}

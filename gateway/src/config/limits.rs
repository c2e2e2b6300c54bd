//! `[verification]` and `[limits]`: how verifications behave, and the limits on sends and checks.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, invalid, secs};
use crate::phone::{CountryAllowList, NumberTypes};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerification {
    pub code_length: Option<u8>,
    pub code_ttl_secs: Option<u64>,
    pub max_extension_secs: Option<u64>,
    pub max_attempts: Option<u8>,
    pub resend_cooldown_secs: Option<u64>,
    pub retention_secs: Option<u64>,
    pub idempotency_ttl_secs: Option<u64>,
    pub reroutes: Option<u8>,
    pub expiry_follows_delivery: Option<bool>,
    pub long_polls_per_client: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub phone_sends: Option<Vec<RawRule>>,
    pub ip_sends: Option<Vec<RawRule>>,
    pub country_sends: Option<Vec<RawRule>>,
    pub prefix_sends: Option<Vec<RawRule>>,
    pub prefix_digits: Option<u8>,
    pub country_budgets: Option<std::collections::BTreeMap<String, RawRule>>,
    pub ipv6_prefix: Option<u8>,
    pub failed_checks_per_phone: Option<RawRule>,
    pub failed_checks_per_ip: Option<Vec<RawRule>>,
    pub failed_checks_per_client: Option<Vec<RawRule>>,
    pub countries: Option<Vec<String>>,
    pub non_geographic: Option<bool>,
    pub number_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub max: u32,
    pub per_secs: u64,
}

/// How verifications behave (docs/DESIGN.md section 4).
#[derive(Debug, Clone)]
pub struct VerificationPolicy {
    pub code_length: u8,
    pub code_ttl: Duration,
    pub max_extension: Duration,
    pub max_attempts: u8,
    pub resend_cooldown: Duration,
    pub retention: Duration,
    pub idempotency_ttl: Duration,
    /// How often the gateway itself sends a verification's SMS again, the same code through
    /// another carrier, when the carrier that accepted it sent no `delivered` receipt within its
    /// `receipt_timeout` (0: never).
    pub reroutes: u8,
    /// For a carrier whose receipts are awaited, the code's clock starts at the `delivered`
    /// receipt rather than at acceptance (within the same `max_extension` cap).
    pub expiry_follows_delivery: bool,
    /// `GET …?wait=` long-polls one client may hold at once on one instance; past it, a
    /// long-poll is answered at once, as a plain GET.
    pub long_polls_per_client: usize,
}

/// Limits on sends and checks.
#[derive(Debug, Clone)]
pub struct Limits {
    pub phone_sends: Vec<Rule>,
    pub ip_sends: Vec<Rule>,
    /// Verifications started per phone country (region), whatever the client: a velocity limit
    /// against SMS pumping, where a fraudster sends codes to ranges that pay them back.
    pub country_sends: Vec<Rule>,
    /// Verifications started per number prefix ([`Limits::prefix_digits`]), whatever the client:
    /// slows a fraudster walking a premium range while the rest of the country is untouched.
    pub prefix_sends: Vec<Rule>,
    /// How many leading digits of the E.164 number (country code included) make its prefix for
    /// `prefix_sends`; never more than all but the last four digits of a number.
    pub prefix_digits: u8,
    /// SMS budgets per phone country (region code, or `"001"`): at most this many SMS to its
    /// numbers, first SMS and resends, whatever the client (`crate::budget`).
    pub country_budgets: Vec<(String, Rule)>,
    /// IPv6 addresses count against `ip_sends` by their first this many bits: a subscriber
    /// commonly holds a whole /64 and can pick a fresh address in it for every request.
    pub ipv6_prefix: u8,
    /// Consecutive wrong codes per phone, counted apart for each client.
    pub failed_checks_per_phone: Rule,
    /// Wrong codes per citizen address (IPv6 grouped by `ipv6_prefix`); empty: no cap.
    pub failed_checks_per_ip: Vec<Rule>,
    /// Wrong codes per client, a ceiling against credential stuffing; empty (the default): no
    /// cap.
    pub failed_checks_per_client: Vec<Rule>,
    /// The regions codes go to, and whether non-geographic numbers (+881, +882, +883) do.
    pub countries: CountryAllowList,
    /// The types of number codes go to: mobile only by default, since personal numbers and the
    /// like are where SMS pumping makes its money.
    pub number_types: NumberTypes,
}

/// At most `max` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub max: NonZeroU32,
    pub per: Duration,
}

impl RawVerification {
    pub(crate) fn validate(self) -> Result<VerificationPolicy, ConfigError> {
        let code_length = self.code_length.unwrap_or(6);
        // Four or five digits fall to guessing: the 100 wrong codes a phone may take a day
        // through each client (by default) find a 4-digit code one time in a hundred, on each
        // phone an attacker tries.
        if !(6..=9).contains(&code_length) {
            return invalid(
                "verification.code_length",
                "must be between 6 and 9 (shorter codes can be guessed)",
            );
        }
        let code_ttl = secs(
            "verification.code_ttl_secs",
            self.code_ttl_secs,
            600,
            10,
            86_400,
        )?;
        let max_extension = secs(
            "verification.max_extension_secs",
            self.max_extension_secs,
            900,
            0,
            86_400,
        )?;
        let max_attempts = self.max_attempts.unwrap_or(5);
        if !(1..=20).contains(&max_attempts) {
            return invalid("verification.max_attempts", "must be between 1 and 20");
        }
        let resend_cooldown = secs(
            "verification.resend_cooldown_secs",
            self.resend_cooldown_secs,
            30,
            1,
            3600,
        )?;
        let retention = secs(
            "verification.retention_secs",
            self.retention_secs,
            3600,
            0,
            604_800,
        )?;
        let idempotency_ttl = secs(
            "verification.idempotency_ttl_secs",
            self.idempotency_ttl_secs,
            retention.as_secs().max(1),
            1,
            604_800,
        )?;
        if idempotency_ttl > retention {
            // A key must never outlive the verification it names, or a late retry would start
            // a second one and send a second SMS.
            return invalid(
                "verification.idempotency_ttl_secs",
                "must not exceed verification.retention_secs",
            );
        }
        let reroutes = self.reroutes.unwrap_or(1);
        if reroutes > 5 {
            return invalid("verification.reroutes", "must be between 0 and 5");
        }
        let long_polls_per_client = self.long_polls_per_client.unwrap_or(1000);
        if long_polls_per_client > 1_000_000 {
            return invalid(
                "verification.long_polls_per_client",
                "must be between 0 and 1000000",
            );
        }
        Ok(VerificationPolicy {
            long_polls_per_client,
            reroutes,
            expiry_follows_delivery: self.expiry_follows_delivery.unwrap_or(true),
            code_length,
            code_ttl,
            max_extension,
            max_attempts,
            resend_cooldown,
            retention,
            idempotency_ttl,
        })
    }
}

impl RawLimits {
    pub(crate) fn validate(self) -> Result<Limits, ConfigError> {
        let default_phone = vec![
            RawRule {
                max: 1,
                per_secs: 30,
            },
            RawRule {
                max: 5,
                per_secs: 600,
            },
        ];
        let default_ip = vec![RawRule {
            max: 150,
            per_secs: 3600,
        }];
        let phone_sends = rules(
            "limits.phone_sends",
            self.phone_sends.unwrap_or(default_phone),
        )?;
        let ip_sends = rules("limits.ip_sends", self.ip_sends.unwrap_or(default_ip))?;
        let country_sends = rules(
            "limits.country_sends",
            self.country_sends.unwrap_or_default(),
        )?;
        // Off by default: how many numbers a prefix holds depends on the country's numbering
        // (a 7-digit prefix is 10,000 numbers in one country, 1,000,000 in another), so no one
        // cap fits every range; the fraud guard, on by default, judges ranges by conversion.
        let prefix_sends = rules("limits.prefix_sends", self.prefix_sends.unwrap_or_default())?;
        let prefix_digits = self.prefix_digits.unwrap_or(7);
        if !(4..=12).contains(&prefix_digits) {
            return invalid("limits.prefix_digits", "must be between 4 and 12");
        }
        let mut country_budgets = Vec::new();
        for (region, rule) in self.country_budgets.unwrap_or_default() {
            let key = format!("limits.country_budgets.{region}");
            let known = region == "001"
                || (region.len() == 2
                    && region.bytes().all(|byte| byte.is_ascii_uppercase())
                    && region.parse::<phonenumber::country::Id>().is_ok());
            if !known {
                return invalid(
                    key,
                    "must be an upper-case ISO 3166 alpha-2 region, or \"001\" for numbers of no region",
                );
            }
            country_budgets.push((region, rule.validate(&key)?));
        }
        let ipv6_prefix = self.ipv6_prefix.unwrap_or(64);
        if !(32..=128).contains(&ipv6_prefix) {
            return invalid("limits.ipv6_prefix", "must be between 32 and 128");
        }
        let failed_checks_per_phone = self
            .failed_checks_per_phone
            .unwrap_or(RawRule {
                max: 100,
                per_secs: 86_400,
            })
            .validate("limits.failed_checks_per_phone")?;
        let failed_checks_per_ip = rules(
            "limits.failed_checks_per_ip",
            self.failed_checks_per_ip.unwrap_or(vec![RawRule {
                max: 50,
                per_secs: 3600,
            }]),
        )?;
        let failed_checks_per_client = rules(
            "limits.failed_checks_per_client",
            self.failed_checks_per_client.unwrap_or_default(),
        )?;
        let countries = CountryAllowList::new(
            &self.countries.unwrap_or_default(),
            self.non_geographic.unwrap_or(false),
        )
        .or_else(|message| invalid("limits.countries", message))?;
        let number_types = match self.number_types {
            None => NumberTypes::MOBILE,
            Some(names) => NumberTypes::parse(&names)
                .or_else(|message| invalid("limits.number_types", message))?,
        };
        Ok(Limits {
            phone_sends,
            ip_sends,
            country_sends,
            prefix_sends,
            prefix_digits,
            country_budgets,
            ipv6_prefix,
            failed_checks_per_phone,
            failed_checks_per_ip,
            failed_checks_per_client,
            countries,
            number_types,
        })
    }
}

fn rules(key: &str, raw: Vec<RawRule>) -> Result<Vec<Rule>, ConfigError> {
    if raw.len() > 8 {
        return invalid(key, "at most 8 rules");
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, rule)| rule.validate(&format!("{key}[{index}]")))
        .collect()
}

impl RawRule {
    pub(crate) fn validate(self, key: &str) -> Result<Rule, ConfigError> {
        let Some(max) = NonZeroU32::new(self.max) else {
            return invalid(format!("{key}.max"), "must be at least 1");
        };
        if !(1..=30 * 86_400).contains(&self.per_secs) {
            return invalid(format!("{key}.per_secs"), "must be between 1 and 2592000");
        }
        Ok(Rule {
            max,
            per: Duration::from_secs(self.per_secs),
        })
    }
}

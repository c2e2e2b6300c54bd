//! Rate limits on sends: per phone, per citizen IP, and per client (API key), with governor's
//! GCRA limiters on the gateway's [`Clock`].
//!
//! Keyed limiters grow by one entry per phone or IP they have seen; [`Limiters::housekeep`] runs
//! on the sweeper's timer and drops the entries whose limits have fully recovered, so memory
//! stays bounded by the traffic of one limit period. Wrong codes are limited elsewhere: per
//! verification in its record, per phone and client in the store's shard (they must count
//! exactly, and are cleared with the verification's own lock), and per citizen address and per
//! client in `guess_caps.rs`.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::config::{ClientConfig, Limits, Rule};
use crate::ids::ClientId;

/// The limits that can turn a request away: the closed set behind the `limit` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Phone,
    Ip,
    Client,
    FailedChecks,
    ResendCooldown,
    Country,
    /// A country's velocity limit (`country_sends`).
    CountryRate,
    /// A number prefix's velocity limit (`prefix_sends`).
    PrefixRate,
    /// A client's or a country's SMS budget (`crate::budget`).
    Budget,
    /// The conversion monitor's block or slow-down of a prefix or country (`crate::fraud_guard`).
    FraudGuard,
    /// Wrong codes from one citizen address (`failed_checks_per_ip`, `guess_caps.rs`).
    FailedChecksIp,
    /// Wrong codes through one client (`failed_checks_per_client`).
    FailedChecksClient,
}

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, Clock, NoOpMiddleware<Nanos>>;
type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, NoOpMiddleware<Nanos>>;

/// Every send limiter of the gateway.
#[derive(Debug)]
pub struct Limiters {
    clock: Clock,
    phone: Vec<(Rule, Keyed<u64>)>,
    ip: Vec<(Rule, Keyed<IpAddr>)>,
    /// Keyed by the phone's region code, or `"001"` for numbers of no region (satellite and
    /// other non-geographic ranges).
    country: Vec<(Rule, Keyed<Box<str>>)>,
    /// Keyed by the number's prefix ([`prefix_key`]).
    prefix: Vec<(Rule, Keyed<Box<str>>)>,
    /// One per client, indexed by [`ClientId`].
    clients: Vec<(Rule, Direct)>,
    /// When housekeeping last walked the keys, and last shrank the maps (clock time).
    last_retain: Mutex<Option<Duration>>,
    last_shrink: Mutex<Option<Duration>>,
}

/// A request turned away by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub limit: LimitKind,
    /// The rule that refused; for the `RateLimit-*` headers.
    pub rule: Rule,
    /// When to try again.
    pub retry_after: Duration,
}

// === impl Limiters ===

impl Limiters {
    pub fn new(
        limits: &Limits,
        clients: &[ClientConfig],
        anonymous_rate: Rule,
        clock: Clock,
    ) -> Limiters {
        let phone = sorted(&limits.phone_sends)
            .iter()
            .map(|rule| {
                (
                    *rule,
                    RateLimiter::new(quota(rule), DashMapStateStore::default(), clock.clone()),
                )
            })
            .collect();
        let ip = sorted(&limits.ip_sends)
            .iter()
            .map(|rule| {
                (
                    *rule,
                    RateLimiter::new(quota(rule), DashMapStateStore::default(), clock.clone()),
                )
            })
            .collect();
        let country = sorted(&limits.country_sends)
            .iter()
            .map(|rule| {
                (
                    *rule,
                    RateLimiter::new(quota(rule), DashMapStateStore::default(), clock.clone()),
                )
            })
            .collect();
        let prefix = sorted(&limits.prefix_sends)
            .iter()
            .map(|rule| {
                (
                    *rule,
                    RateLimiter::new(quota(rule), DashMapStateStore::default(), clock.clone()),
                )
            })
            .collect();
        let client_rules: Vec<Rule> = if clients.is_empty() {
            vec![anonymous_rate]
        } else {
            clients
                .iter()
                .map(|client| Rule {
                    max: client.rate_per_sec,
                    per: Duration::from_secs(1),
                })
                .collect()
        };
        let clients = client_rules
            .into_iter()
            .map(|rule| {
                (
                    rule,
                    RateLimiter::new(quota(&rule), InMemoryState::default(), clock.clone()),
                )
            })
            .collect();
        Limiters {
            clock,
            phone,
            ip,
            country,
            prefix,
            clients,
            last_retain: Mutex::new(None),
            last_shrink: Mutex::new(None),
        }
    }

    /// The phone's rules, in the order they are checked.
    pub fn phone_rules(&self) -> Vec<Rule> {
        self.phone.iter().map(|(rule, _)| *rule).collect()
    }

    /// The IP's rules, in the order they are checked.
    pub fn ip_rules(&self) -> Vec<Rule> {
        self.ip.iter().map(|(rule, _)| *rule).collect()
    }

    /// The country rules, in the order they are checked.
    pub fn country_rules(&self) -> Vec<Rule> {
        self.country.iter().map(|(rule, _)| *rule).collect()
    }

    /// Counts one verification to a phone of `country` (a region code, see
    /// [`country_key`]) against every country rule.
    pub fn check_country(&self, country: &str) -> Result<(), Rejection> {
        check_all(
            &self.country,
            &Box::from(country),
            LimitKind::CountryRate,
            &self.clock,
        )
    }

    /// The prefix rules, in the order they are checked.
    pub fn prefix_rules(&self) -> Vec<Rule> {
        self.prefix.iter().map(|(rule, _)| *rule).collect()
    }

    /// Counts one verification to a number of `prefix` (see [`prefix_key`]) against every
    /// prefix rule.
    pub fn check_prefix(&self, prefix: &str) -> Result<(), Rejection> {
        check_all(
            &self.prefix,
            &Box::from(prefix),
            LimitKind::PrefixRate,
            &self.clock,
        )
    }

    /// A client's rate.
    pub fn client_rule(&self, client: ClientId) -> Option<Rule> {
        self.clients.get(client as usize).map(|(rule, _)| *rule)
    }

    /// Counts one request of `client` against its rate.
    pub fn check_client(&self, client: ClientId) -> Result<(), Rejection> {
        let Some((rule, limiter)) = self.clients.get(client as usize) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| Rejection {
            limit: LimitKind::Client,
            rule: *rule,
            retry_after: not_until.wait_time_from(governor::clock::Clock::now(&self.clock)),
        })
    }

    /// Counts one send to a citizen IP against every IP rule.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Rejection> {
        check_all(&self.ip, &ip, LimitKind::Ip, &self.clock)
    }

    /// Counts one SMS to `phone` against every phone rule.
    pub fn check_phone(&self, phone: u64) -> Result<(), Rejection> {
        check_all(&self.phone, &phone, LimitKind::Phone, &self.clock)
    }

    /// Drops limiter entries that have fully recovered and reports how many keys remain
    /// (phones, IPs). Walking every key costs time in proportion to the keys, so the walk runs
    /// at most every [`RETAIN_EVERY`] and the maps give memory back at most every
    /// [`SHRINK_EVERY`]; in between only the counts are read.
    pub fn housekeep(&self) -> (usize, usize) {
        let now = self.clock.elapsed();
        let due = |last: &Mutex<Option<Duration>>, every: Duration| {
            let mut last = crate::sync::lock(last);
            let is_due = last.is_none_or(|last| now >= last + every);
            if is_due {
                *last = Some(now);
            }
            is_due
        };
        let retain = due(&self.last_retain, RETAIN_EVERY);
        let shrink = retain && due(&self.last_shrink, SHRINK_EVERY);
        let mut n_phone_keys = 0;
        for (_, limiter) in &self.phone {
            if retain {
                limiter.retain_recent();
            }
            if shrink {
                limiter.shrink_to_fit();
            }
            n_phone_keys += limiter.len();
        }
        let mut n_ip_keys = 0;
        for (_, limiter) in self.country.iter().chain(&self.prefix) {
            if retain {
                limiter.retain_recent();
            }
            if shrink {
                limiter.shrink_to_fit();
            }
        }
        for (_, limiter) in &self.ip {
            if retain {
                limiter.retain_recent();
            }
            if shrink {
                limiter.shrink_to_fit();
            }
            n_ip_keys += limiter.len();
        }
        (n_phone_keys, n_ip_keys)
    }
}

/// How often keyed limiters forget recovered keys.
pub const RETAIN_EVERY: Duration = Duration::from_secs(10);
/// How often keyed limiters give memory back.
pub const SHRINK_EVERY: Duration = Duration::from_secs(60);

/// Checks the rules in order (shortest period first) and stops at the first that refuses, so a
/// refused request does not use up the longer rules: governor has no "peek", and a request that
/// one rule turns away must not count against another.
fn check_all<K>(
    rules: &[(Rule, Keyed<K>)],
    key: &K,
    limit: LimitKind,
    clock: &Clock,
) -> Result<(), Rejection>
where
    K: std::hash::Hash + Eq + Clone,
{
    for (rule, limiter) in rules {
        if let Err(not_until) = limiter.check_key(key) {
            return Err(Rejection {
                limit,
                rule: *rule,
                retry_after: not_until.wait_time_from(governor::clock::Clock::now(clock)),
            });
        }
    }
    Ok(())
}

/// The key a phone's region counts under for `country_sends`: its region code, or `"001"`
/// (libphonenumber's name for them) for numbers of no region.
pub fn country_key(region: Option<phonenumber::country::Id>) -> String {
    region.map_or_else(|| "001".to_owned(), |region| format!("{region:?}"))
}

/// The key a number counts under for `prefix_sends`: its first `digits` digits (country code
/// included), but never more than all of them save the last four, so that a key never names a
/// whole number (a short number's prefix may be just its country code).
pub fn prefix_key(phone: &crate::phone::Phone, digits: u8) -> String {
    let e164 = phone.e164();
    let number = e164.trim_start_matches('+');
    let n_digits = usize::from(digits).min(number.len().saturating_sub(4));
    number[..n_digits].to_owned()
}

/// Rules in the order [`check_all`] wants them: shortest period first.
fn sorted(rules: &[Rule]) -> Vec<Rule> {
    let mut rules = rules.to_vec();
    rules.sort_by_key(|rule| rule.per);
    rules
}

/// The GCRA quota of a rule "`max` per `per`": a bucket of `max` sends that refills evenly, one
/// every `per / max`. This is governor's meaning of a quota and the redis back-end's (GCRA on
/// Redis's clock) too; over a long run it allows `max` per `per`, and a full bucket spent at once
/// waits `per / max` for the next send.
fn quota(rule: &Rule) -> Quota {
    Quota::with_period(rule.per / rule.max.get())
        .unwrap_or_else(|| Quota::per_second(rule.max))
        .allow_burst(rule.max)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::phone::CountryAllowList;

    fn rule(max: u32, per_secs: u64) -> Rule {
        Rule {
            max: NonZeroU32::new(max).unwrap(),
            per: Duration::from_secs(per_secs),
        }
    }

    fn limiters(clock: &Clock) -> Limiters {
        let limits = Limits {
            phone_sends: vec![rule(1, 30), rule(5, 600)],
            ip_sends: vec![rule(3, 3600)],
            country_sends: Vec::new(),
            prefix_sends: vec![rule(2, 3600)],
            prefix_digits: 7,
            country_budgets: Vec::new(),
            ipv6_prefix: 64,
            failed_checks_per_phone: rule(100, 86_400),
            failed_checks_per_ip: Vec::new(),
            failed_checks_per_client: Vec::new(),
            countries: CountryAllowList::default(),
            number_types: crate::phone::NumberTypes::MOBILE,
        };
        Limiters::new(&limits, &[], rule(2, 1), clock.clone())
    }

    #[test]
    fn phone_allows_one_per_30s_and_a_bucket_of_five_per_10min() {
        let clock = Clock::system();
        let limiters = limiters(&clock);
        assert!(limiters.check_phone(1).is_ok());
        let refused = limiters.check_phone(1).unwrap_err();
        assert_eq!(refused.limit, LimitKind::Phone);
        assert_eq!(refused.rule, rule(1, 30));
        assert!(refused.retry_after <= Duration::from_secs(30));
        assert!(refused.retry_after > Duration::from_secs(25));
        // Another phone is unaffected.
        assert!(limiters.check_phone(2).is_ok());
        // Every 31 s: sends at 31, 62, 93 and 124 s empty the bucket of five, and the send at
        // 155 s uses the one that refilled at 120 s.
        for _ in 0..5 {
            clock.advance(Duration::from_secs(31));
            assert!(limiters.check_phone(1).is_ok());
        }
        clock.advance(Duration::from_secs(31));
        let refused = limiters.check_phone(1).unwrap_err();
        assert_eq!(refused.rule, rule(5, 600));
        // The next one refills at 240 s; this is 186 s.
        assert!(
            refused.retry_after > Duration::from_secs(50),
            "{:?}",
            refused.retry_after
        );
        assert!(
            refused.retry_after <= Duration::from_secs(54),
            "{:?}",
            refused.retry_after
        );
    }

    #[test]
    fn a_refusal_does_not_use_up_the_longer_rules() {
        let clock = Clock::system();
        let limiters = limiters(&clock);
        assert!(limiters.check_phone(7).is_ok());
        // Many refusals by the 30 s rule leave the 10-minute bucket alone.
        for _ in 0..20 {
            assert_eq!(limiters.check_phone(7).unwrap_err().rule, rule(1, 30));
        }
        for _ in 0..4 {
            clock.advance(Duration::from_secs(30));
            assert!(limiters.check_phone(7).is_ok());
        }
    }

    #[test]
    fn ip_and_client_limits_hold() {
        let clock = Clock::system();
        let limiters = limiters(&clock);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(limiters.check_ip(ip).is_ok());
        }
        assert_eq!(limiters.check_ip(ip).unwrap_err().limit, LimitKind::Ip);
        assert!(limiters.check_client(0).is_ok());
        assert!(limiters.check_client(0).is_ok());
        assert_eq!(
            limiters.check_client(0).unwrap_err().limit,
            LimitKind::Client
        );
    }

    #[test]
    fn housekeeping_forgets_recovered_keys() {
        let clock = Clock::system();
        let limiters = limiters(&clock);
        for phone in 0..100 {
            limiters.check_phone(phone).unwrap();
        }
        assert_eq!(limiters.housekeep().0, 200);
        clock.advance(Duration::from_secs(601));
        assert_eq!(limiters.housekeep(), (0, 0));
    }

    #[test]
    fn a_number_counts_under_its_prefix_never_its_whole_number() {
        let british = crate::phone::Phone::from_parts(447_700_900_123, 2);
        assert_eq!(prefix_key(&british, 7), "4477009");
        assert_eq!(prefix_key(&british, 12), "44770090");
        // Saint Helena's numbers are 7 digits: only the country code is a prefix.
        let short = crate::phone::Phone::from_parts(2_905_123, 3);
        assert_eq!(prefix_key(&short, 7), "290");
    }

    #[test]
    fn a_prefix_is_limited_apart_from_its_neighbours() {
        let clock = Clock::system();
        let limiters = limiters(&clock);
        assert!(limiters.check_prefix("4477009").is_ok());
        assert!(limiters.check_prefix("4477009").is_ok());
        let refused = limiters.check_prefix("4477009").unwrap_err();
        assert_eq!(refused.limit, LimitKind::PrefixRate);
        assert_eq!(refused.rule, rule(2, 3600));
        assert!(limiters.check_prefix("4477008").is_ok());
    }

    #[test]
    fn a_phone_counts_under_its_region_code() {
        let (_, italian) = crate::phone::Phone::parse("+393331234567").unwrap();
        assert_eq!(country_key(italian), "IT");
        assert_eq!(country_key(None), "001");
    }
}

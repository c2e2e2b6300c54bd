//! Caps on wrong codes per citizen address and per client (`[limits] failed_checks_per_ip` and
//! `failed_checks_per_client`, docs/DESIGN.md section 4, *Limits*): the guessing budget of
//! whoever types codes, beside the per-phone count the store keeps with each phone.
//!
//! Only a wrong code spends a cap; a check over a cap is refused before its code is compared.
//! So a cap is *peeked* before the check and *spent* after a wrong code, each rule a GCRA
//! bucket (`max` wrong codes refilled evenly over `per`), the same arithmetic as the send limits
//! (`ratelimit.rs`, and the redis back-end's `lua/gcra.lua`). Two wrong codes checked at the
//! same moment may both pass the peek: a cap can be overrun by the checks in flight at once,
//! never more.
//!
//! [`GuessLimiter`] holds the buckets in process memory for the embedded back-end; the redis
//! back-end keeps them in Redis (`store/redis/guess_caps.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::Millis;
use crate::config::Rule;
use crate::ids::ClientId;
use crate::ratelimit::{LimitKind, Rejection};
use crate::sync::lock;

/// The caps' rules, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuessCaps {
    /// Per citizen address (IPv6 grouped by `ipv6_prefix`); empty: none.
    pub per_ip: Vec<Rule>,
    /// Per client, whatever the citizen; empty: none.
    pub per_client: Vec<Rule>,
}

/// Whose wrong codes a cap counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Guesser {
    /// A citizen address, already grouped into its limit key (`citizen_ip::limit_key`).
    Ip(IpAddr),
    Client(ClientId),
}

/// The embedded back-end's buckets: each guesser's theoretical arrival time per rule.
#[derive(Debug)]
pub struct GuessLimiter {
    caps: GuessCaps,
    tats: Mutex<HashMap<Guesser, Vec<Millis>>>,
}

// === impl GuessCaps ===

impl GuessCaps {
    /// The rules that count `guesser`'s wrong codes.
    pub fn rules(&self, guesser: Guesser) -> &[Rule] {
        match guesser {
            Guesser::Ip(_) => &self.per_ip,
            Guesser::Client(_) => &self.per_client,
        }
    }

    /// The guessers a check from `ip` (if known) through `client` answers to: those with rules.
    pub fn guessers(&self, ip: Option<IpAddr>, client: ClientId) -> Vec<Guesser> {
        ip.map(Guesser::Ip)
            .into_iter()
            .chain([Guesser::Client(client)])
            .filter(|guesser| !self.rules(*guesser).is_empty())
            .collect()
    }

    /// The refusal of `guesser`'s `rule` (an index into its rules), to come back after
    /// `retry_after`.
    pub fn rejection(&self, guesser: Guesser, rule: usize, retry_after: Duration) -> Rejection {
        let rules = self.rules(guesser);
        Rejection {
            limit: match guesser {
                Guesser::Ip(_) => LimitKind::FailedChecksIp,
                Guesser::Client(_) => LimitKind::FailedChecksClient,
            },
            rule: rules[rule.min(rules.len().saturating_sub(1))],
            retry_after: retry_after.max(Duration::from_millis(1)),
        }
    }
}

// === impl GuessLimiter ===

impl GuessLimiter {
    pub fn new(caps: GuessCaps) -> GuessLimiter {
        GuessLimiter {
            caps,
            tats: Mutex::new(HashMap::new()),
        }
    }

    pub fn caps(&self) -> &GuessCaps {
        &self.caps
    }

    /// Whether `guesser` may have a code compared now: `Err` with the rule that refuses when
    /// one more wrong code would be over it. Spends nothing.
    pub fn peek(&self, guesser: Guesser, now: Millis) -> Result<(), Rejection> {
        let tats = lock(&self.tats);
        self.next_tats(guesser, tats.get(&guesser), now)
            .map(drop)
            .map_err(|(rule, retry_ms)| {
                self.caps
                    .rejection(guesser, rule, Duration::from_millis(retry_ms))
            })
    }

    /// Spends one wrong code of every rule of `guesser`, or none when one is already full (a
    /// wrong code checked at the same moment as another got there first).
    pub fn spend(&self, guesser: Guesser, now: Millis) {
        let mut tats = lock(&self.tats);
        if let Ok(next) = self.next_tats(guesser, tats.get(&guesser), now) {
            tats.insert(guesser, next);
        }
    }

    /// Forgets the guessers whose buckets are full again; returns how many are left.
    pub fn housekeep(&self, now: Millis) -> usize {
        let mut tats = lock(&self.tats);
        tats.retain(|_, tats| tats.iter().any(|tat| *tat > now));
        tats.len()
    }

    /// Every rule's arrival time after one more wrong code, or the first rule that refuses it
    /// and how long until it would not (ms).
    fn next_tats(
        &self,
        guesser: Guesser,
        held: Option<&Vec<Millis>>,
        now: Millis,
    ) -> Result<Vec<Millis>, (usize, Millis)> {
        let rules = self.caps.rules(guesser);
        let mut next = Vec::with_capacity(rules.len());
        for (index, rule) in rules.iter().enumerate() {
            let (emission, tolerance) = gcra_params(rule);
            let tat = held
                .and_then(|held| held.get(index).copied())
                .unwrap_or(now)
                .max(now);
            if now + tolerance < tat {
                return Err((index, tat - tolerance - now));
            }
            next.push(tat + emission);
        }
        Ok(next)
    }
}

/// GCRA's emission interval and tolerance in ms for `max` per `per`: a bucket of `max` that
/// gives one back every `per / max` (as `lua/gcra.lua` reads a rule).
fn gcra_params(rule: &Rule) -> (Millis, Millis) {
    let per = (rule.per.as_millis() as Millis).max(1);
    let max = Millis::from(rule.max.get());
    let emission = (per / max).max(1);
    (emission, emission * (max - 1))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn rule(max: u32, per_secs: u64) -> Rule {
        Rule {
            max: NonZeroU32::new(max).unwrap(),
            per: Duration::from_secs(per_secs),
        }
    }

    fn limiter() -> GuessLimiter {
        GuessLimiter::new(GuessCaps {
            per_ip: vec![rule(3, 60)],
            per_client: vec![rule(2, 10), rule(4, 3600)],
        })
    }

    #[test]
    fn peeking_spends_nothing_and_the_cap_refuses_the_wrong_code_after_max() {
        let limiter = limiter();
        let ip = Guesser::Ip("192.0.2.1".parse().unwrap());
        for _ in 0..10 {
            assert!(limiter.peek(ip, 0).is_ok());
        }
        for _ in 0..3 {
            assert!(limiter.peek(ip, 0).is_ok());
            limiter.spend(ip, 0);
        }
        let refused = limiter.peek(ip, 0).unwrap_err();
        assert_eq!(refused.limit, LimitKind::FailedChecksIp);
        assert_eq!(refused.rule, rule(3, 60));
        // One wrong code comes back every 20 s.
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        assert!(limiter.peek(ip, 20_000).is_ok());
        // Another address is not touched.
        assert!(
            limiter
                .peek(Guesser::Ip("192.0.2.2".parse().unwrap()), 0)
                .is_ok()
        );
    }

    #[test]
    fn a_refused_spend_uses_up_no_rule_and_every_rule_must_allow() {
        let limiter = limiter();
        let client = Guesser::Client(1);
        limiter.spend(client, 0);
        limiter.spend(client, 0);
        assert_eq!(limiter.peek(client, 0).unwrap_err().rule, rule(2, 10));
        // Refused spends leave the hourly rule alone.
        for _ in 0..10 {
            limiter.spend(client, 0);
        }
        for now in [10_000, 20_000] {
            assert!(limiter.peek(client, now).is_ok(), "at {now} ms");
            limiter.spend(client, now);
        }
        let refused = limiter.peek(client, 20_000).unwrap_err();
        assert_eq!(refused.limit, LimitKind::FailedChecksClient);
        assert_eq!(refused.rule, rule(4, 3600));
        assert!(limiter.peek(Guesser::Client(2), 20_000).is_ok());
    }

    #[test]
    fn guessers_are_those_with_rules_and_housekeeping_forgets_full_buckets() {
        let only_ip = GuessCaps {
            per_ip: vec![rule(3, 60)],
            per_client: Vec::new(),
        };
        let ip: IpAddr = "2001:db8::".parse().unwrap();
        assert_eq!(only_ip.guessers(Some(ip), 0), vec![Guesser::Ip(ip)]);
        assert!(only_ip.guessers(None, 0).is_empty());
        assert_eq!(
            limiter().caps().guessers(Some(ip), 3),
            vec![Guesser::Ip(ip), Guesser::Client(3)]
        );
        let limiter = limiter();
        limiter.spend(Guesser::Ip(ip), 0);
        limiter.spend(Guesser::Client(3), 0);
        assert_eq!(limiter.housekeep(0), 2);
        assert_eq!(limiter.housekeep(20_000), 1, "the address's bucket is full");
        assert_eq!(limiter.housekeep(900_000), 0);
    }
}

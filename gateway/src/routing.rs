//! Which carriers may send to a number: each carrier's prefix rules, reduced to a bit mask of
//! carrier ids per job.
//!
//! A carrier with no `prefixes` serves every number; otherwise a number must start with one of
//! them. `exclude_prefixes` take numbers away again, whatever matched. The mask travels with the
//! job, so the queue hands a job only to a carrier whose bit is set (`Queue::pop`), and weights
//! decide which idle carrier is woken for it.

use crate::config::CarrierConfig;

/// A set of carriers, one bit per carrier id (at most 64 carriers).
pub type CarrierSet = u64;

/// The prefix rules of every carrier, in carrier-id order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    carriers: Vec<Rules>,
    /// Every carrier, when none has prefix rules: the common case needs no matching.
    unrestricted: Option<CarrierSet>,
}

#[derive(Debug, Clone)]
struct Rules {
    /// E.164 prefixes with their `+`; empty means every number.
    prefixes: Vec<Box<str>>,
    exclude: Vec<Box<str>>,
    pace_per_sec: f64,
    /// A backup carrier: its pace counts only where no primary may send.
    standby: bool,
}

impl Routes {
    pub fn new(carriers: &[CarrierConfig]) -> Routes {
        let carriers: Vec<Rules> = carriers
            .iter()
            .map(|carrier| Rules {
                prefixes: carrier.prefixes.clone(),
                exclude: carrier.exclude_prefixes.clone(),
                pace_per_sec: f64::from(carrier.pace_per_sec.get()),
                standby: carrier.standby,
            })
            .collect();
        let unrestricted = carriers
            .iter()
            .all(|rules| rules.prefixes.is_empty() && rules.exclude.is_empty())
            .then(|| all(carriers.len()));
        Routes {
            carriers,
            unrestricted,
        }
    }

    /// The carriers that may send to `phone`.
    pub fn eligible_for(&self, phone: &crate::phone::Phone) -> CarrierSet {
        self.unrestricted
            .unwrap_or_else(|| self.eligible(&phone.e164()))
    }

    /// The carriers that may send to `e164` (a number with its `+`).
    pub fn eligible(&self, e164: &str) -> CarrierSet {
        let mut set = 0;
        for (id, rules) in self.carriers.iter().enumerate() {
            let included =
                rules.prefixes.is_empty() || rules.prefixes.iter().any(|p| e164.starts_with(&**p));
            let excluded = rules.exclude.iter().any(|p| e164.starts_with(&**p));
            if included && !excluded {
                set |= 1 << id;
            }
        }
        set
    }

    /// SMS per second the carriers in `set` are configured for together (at least 1), the basis
    /// of a job's `eta_seconds` and of admission. Carriers on standby count only for a set with
    /// no primary: they send while the primaries fail or lag, not beside them.
    pub fn pace_of(&self, set: CarrierSet) -> f64 {
        let in_set = || {
            self.carriers
                .iter()
                .enumerate()
                .filter(move |(id, _)| set & (1 << id) != 0)
                .map(|(_, rules)| rules)
        };
        let any_primary = in_set().any(|rules| !rules.standby);
        in_set()
            .filter(|rules| !any_primary || !rules.standby)
            .map(|rules| rules.pace_per_sec)
            .sum::<f64>()
            .max(1.0)
    }
}

/// The set of carriers `0..n`.
fn all(n: usize) -> CarrierSet {
    if n >= 64 { u64::MAX } else { (1 << n) - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(prefixes: &[&str], exclude: &[&str]) -> Rules {
        Rules {
            prefixes: prefixes.iter().map(|p| (*p).into()).collect(),
            exclude: exclude.iter().map(|p| (*p).into()).collect(),
            pace_per_sec: 10.0,
            standby: false,
        }
    }

    #[test]
    fn prefixes_include_and_exclusions_win() {
        let routes = Routes {
            carriers: vec![
                rules(&[], &[]),
                rules(&["+39"], &["+39333"]),
                rules(&["+44", "+393"], &[]),
            ],
            unrestricted: None,
        };
        assert_eq!(routes.eligible("+393331234567"), 0b101);
        assert_eq!(routes.eligible("+393401234567"), 0b111);
        assert_eq!(routes.eligible("+390612345678"), 0b011);
        assert_eq!(routes.eligible("+447700900123"), 0b101);
        assert_eq!(routes.eligible("+33612345678"), 0b001);
        assert_eq!(routes.pace_of(0b101), 20.0);
        assert_eq!(routes.pace_of(0), 1.0);
    }

    #[test]
    fn a_standby_carriers_pace_counts_only_without_a_primary() {
        let mut backup = rules(&[], &[]);
        backup.standby = true;
        backup.pace_per_sec = 4.0;
        let routes = Routes {
            carriers: vec![rules(&[], &[]), backup],
            unrestricted: None,
        };
        assert_eq!(routes.pace_of(0b11), 10.0);
        assert_eq!(routes.pace_of(0b10), 4.0);
    }
}

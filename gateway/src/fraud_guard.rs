//! The conversion monitor ("fraud guard"): per phone country and per number prefix, the share
//! of verifications that end approved; where it collapses, new starts are slowed, then
//! blocked for a cool-off.
//!
//! SMS pumping sends codes nobody types: a fraudster's numbers pay per SMS received, so their
//! verifications never end approved. A real rush of sign-ups converts well. What counts is
//! only a verification whose SMS reached the phone promptly: delivered by a receipt, or accepted by a
//! carrier whose receipts are not awaited. A carrier outage (SMS refused, or accepted and never
//! delivered) therefore counts nothing and blocks nothing: nobody could have typed the code.
//!
//! A late SMS (reaching the phone more than [`PROMPT_SMS`] after its start) does not count
//! either: under a lagging carrier citizens give up, and conversion falls for no fraud.
//!
//! Over a sliding window (`window`, kept as [`SLICES`] slices), once at least `min_volume`
//! such verifications of a key have ended: a conversion below `block_below` blocks new starts
//! to the key for `cool_off` (`429 fraud_suspected`, `Retry-After` the cool-off left), and
//! one below `slow_below` slows them to `slowed_sends`. A block forgets the key's window; after
//! the cool-off the key is slowed until `min_volume` fresh endings convert again. It recovers
//! by itself.
//!
//! Only a prefix is ever slowed or blocked. A country is judged the same way, and its standing
//! is reported (the gauges, a warning in the log), but it never refuses a start: a hundred
//! starts to random numbers of a country in a quiet hour, never typed, would otherwise stop
//! every citizen of that country from signing up, which is the failure this gateway exists to
//! prevent.
//!
//! The state is this instance's own: on Redis each instance judges the endings it recorded
//! (the checks and expiries it ran), a share of the traffic, with the same thresholds.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::clock::{Clock, Millis};
use crate::config::FraudGuardPolicy;

/// An SMS that reached the phone later than this after its start does not count: its
/// citizen may have left, which says nothing about fraud (a lagging carrier's SMS).
pub const PROMPT_SMS: Duration = Duration::from_secs(60);
/// Slices a window is kept in: an ending leaves the window at most a twelfth of it late.
pub const SLICES: u64 = 12;
/// Keys tracked at most; past it new keys are not judged until old ones are forgotten.
pub const MAX_KEYS: usize = 100_000;

/// What the guard judges: a phone country (region code) or a number prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GuardKey {
    Country(Box<str>),
    Prefix(Box<str>),
}

/// A start the guard refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardRefusal {
    /// Blocked (true) or slowed (false).
    pub blocked: bool,
    pub retry_after: Duration,
}

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Normal,
    Slowed,
    Blocked { until: Millis },
}

/// The conversion monitor of one instance.
#[derive(Debug)]
pub struct FraudGuard {
    policy: FraudGuardPolicy,
    trackers: Mutex<HashMap<GuardKey, Tracker>>,
    slowed: RateLimiter<GuardKey, DashMapStateStore<GuardKey>, Clock, NoOpMiddleware<Nanos>>,
}

/// One key's endings over the window, and its standing.
#[derive(Debug, Clone)]
struct Tracker {
    /// `(slice start, ended, approved)`, oldest first.
    slices: VecDeque<(Millis, u32, u32)>,
    standing: Standing,
}

/// How many keys stand slowed and blocked, by kind (country, prefix).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuardCounts {
    pub slowed: [usize; 2],
    pub blocked: [usize; 2],
}

// === impl FraudGuard ===

impl FraudGuard {
    pub fn new(policy: FraudGuardPolicy, clock: Clock) -> FraudGuard {
        let rule = policy.slowed_sends;
        let quota = Quota::with_period(rule.per / rule.max.get())
            .unwrap_or_else(|| Quota::per_second(rule.max))
            .allow_burst(rule.max);
        FraudGuard {
            policy,
            trackers: Mutex::new(HashMap::new()),
            slowed: RateLimiter::new(quota, DashMapStateStore::default(), clock),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.policy.enabled
    }

    /// Lets a start to `keys` through, or refuses it: blocked prefixes first, then slowed ones
    /// (each spends one start of its slowed limit). Countries are only reported, never refused.
    pub fn admit(&self, keys: &[GuardKey], now: Millis) -> Result<(), GuardRefusal> {
        if !self.policy.enabled {
            return Ok(());
        }
        let keys: Vec<&GuardKey> = keys
            .iter()
            .filter(|key| matches!(key, GuardKey::Prefix(_)))
            .collect();
        let standings: Vec<Standing> = {
            let mut trackers = crate::sync::lock(&self.trackers);
            keys.iter()
                .map(|key| match trackers.get_mut(*key) {
                    Some(tracker) => tracker.standing_at(now),
                    None => Standing::Normal,
                })
                .collect()
        };
        for standing in &standings {
            if let Standing::Blocked { until } = standing {
                return Err(GuardRefusal {
                    blocked: true,
                    retry_after: Duration::from_millis(until.saturating_sub(now).max(1)),
                });
            }
        }
        for (key, standing) in keys.iter().zip(&standings) {
            if *standing == Standing::Slowed {
                if let Err(not_until) = self.slowed.check_key(*key) {
                    let retry_after =
                        not_until.wait_time_from(governor::clock::Clock::now(self.slowed.clock()));
                    return Err(GuardRefusal {
                        blocked: false,
                        retry_after,
                    });
                }
            }
        }
        Ok(())
    }

    /// Records a verification that ended, approved or not, whose SMS reached the phone.
    pub fn ended(&self, keys: &[GuardKey], approved: bool, now: Millis) {
        if !self.policy.enabled {
            return;
        }
        let policy = &self.policy;
        let window = policy.window.as_millis() as Millis;
        let slice = (window / SLICES).max(1);
        let mut trackers = crate::sync::lock(&self.trackers);
        for key in keys {
            if !trackers.contains_key(key) && trackers.len() >= MAX_KEYS {
                continue;
            }
            let tracker = trackers.entry(key.clone()).or_insert_with(|| Tracker {
                slices: VecDeque::new(),
                standing: Standing::Normal,
            });
            tracker.forget_before(now.saturating_sub(window));
            let start = now - now % slice;
            match tracker.slices.back_mut() {
                Some((at, ended, approvals)) if *at == start => {
                    *ended += 1;
                    *approvals += u32::from(approved);
                }
                _ => tracker.slices.push_back((start, 1, u32::from(approved))),
            }
            let standing = tracker.standing_at(now);
            if let Standing::Blocked { .. } = standing {
                continue;
            }
            let (ended, approvals) = tracker.totals();
            tracker.standing = judge(policy, ended, approvals, standing, now);
            if let Standing::Blocked { .. } = tracker.standing {
                // Judged afresh after the cool-off.
                tracker.slices.clear();
                match key {
                    GuardKey::Country(country) => {
                        tracing::warn!(%country, ended, approvals, "fraud guard: almost no verifications to this country are completed; its prefixes are judged one by one, the country is never blocked");
                    }
                    GuardKey::Prefix(prefix) => {
                        tracing::warn!(%prefix, ended, approvals, "fraud guard: almost no verifications to this number prefix are completed; new starts are blocked for the cool-off");
                    }
                }
            }
        }
    }

    /// Forgets keys with nothing in the window and nothing to hold against them; returns how
    /// many keys stand slowed and blocked. Runs on the sweeper's timer.
    pub fn housekeep(&self, now: Millis) -> GuardCounts {
        let window = self.policy.window.as_millis() as Millis;
        let mut counts = GuardCounts::default();
        let mut trackers = crate::sync::lock(&self.trackers);
        trackers.retain(|key, tracker| {
            tracker.forget_before(now.saturating_sub(window));
            let kind = usize::from(matches!(key, GuardKey::Prefix(_)));
            match tracker.standing_at(now) {
                Standing::Normal => !tracker.slices.is_empty(),
                Standing::Slowed => {
                    counts.slowed[kind] += 1;
                    true
                }
                Standing::Blocked { .. } => {
                    counts.blocked[kind] += 1;
                    true
                }
            }
        });
        drop(trackers);
        self.slowed.retain_recent();
        counts
    }
}

/// The standing `ended` endings with `approvals` among them give a key that stood `was`.
pub fn judge(
    policy: &FraudGuardPolicy,
    ended: u32,
    approvals: u32,
    was: Standing,
    now: Millis,
) -> Standing {
    if ended < policy.min_volume {
        // Too few to judge: a key stays as it stood (slowed on probation after a block).
        return was;
    }
    let conversion = f64::from(approvals) / f64::from(ended);
    if conversion < policy.block_below {
        Standing::Blocked {
            until: now + policy.cool_off.as_millis() as Millis,
        }
    } else if conversion < policy.slow_below {
        Standing::Slowed
    } else {
        Standing::Normal
    }
}

// === impl Tracker ===

impl Tracker {
    /// The standing now: a block whose cool-off has passed becomes slowed (on probation).
    fn standing_at(&mut self, now: Millis) -> Standing {
        if let Standing::Blocked { until } = self.standing {
            if now >= until {
                self.standing = Standing::Slowed;
            }
        }
        self.standing
    }

    fn forget_before(&mut self, oldest: Millis) {
        while self.slices.front().is_some_and(|(at, _, _)| *at < oldest) {
            self.slices.pop_front();
        }
    }

    fn totals(&self) -> (u32, u32) {
        self.slices
            .iter()
            .fold((0, 0), |(ended, approved), (_, e, a)| {
                (ended + e, approved + a)
            })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::Rule;

    fn policy() -> FraudGuardPolicy {
        FraudGuardPolicy {
            enabled: true,
            window: Duration::from_secs(3600),
            min_volume: 10,
            slow_below: 0.3,
            block_below: 0.1,
            cool_off: Duration::from_secs(600),
            slowed_sends: Rule {
                max: NonZeroU32::new(2).unwrap(),
                per: Duration::from_secs(60),
            },
        }
    }

    #[test]
    fn judging_needs_volume_and_compares_the_conversion_with_both_floors() {
        let policy = policy();
        assert_eq!(judge(&policy, 9, 0, Standing::Normal, 0), Standing::Normal);
        assert_eq!(judge(&policy, 9, 0, Standing::Slowed, 0), Standing::Slowed);
        assert_eq!(
            judge(&policy, 10, 0, Standing::Normal, 1000),
            Standing::Blocked { until: 601_000 }
        );
        // 1 in 10 is not below a 10% floor: slowed, not blocked.
        assert_eq!(judge(&policy, 10, 1, Standing::Normal, 0), Standing::Slowed);
        assert_eq!(judge(&policy, 10, 2, Standing::Normal, 0), Standing::Slowed);
        assert_eq!(judge(&policy, 10, 3, Standing::Normal, 0), Standing::Normal);
        assert_eq!(
            judge(&policy, 100, 90, Standing::Slowed, 0),
            Standing::Normal
        );
    }

    #[test]
    fn a_collapsed_prefix_is_blocked_then_slowed_then_recovers() {
        let clock = Clock::system();
        let guard = FraudGuard::new(policy(), clock);
        let prefix = [GuardKey::Prefix("4477009".into())];
        let other = [GuardKey::Prefix("4479111".into())];
        let t0: Millis = 1_000_000;
        for _ in 0..9 {
            guard.ended(&prefix, false, t0);
        }
        assert!(guard.admit(&prefix, t0).is_ok(), "too few to judge");
        guard.ended(&prefix, false, t0);
        let refused = guard.admit(&prefix, t0 + 1000).unwrap_err();
        assert!(refused.blocked);
        assert_eq!(refused.retry_after, Duration::from_secs(599));
        assert!(
            guard.admit(&other, t0).is_ok(),
            "another prefix is not touched"
        );
        assert_eq!(guard.housekeep(t0).blocked, [0, 1]);
        // After the cool-off: slowed, two starts a minute.
        let later = t0 + 600_000;
        assert_eq!(guard.housekeep(later).slowed, [0, 1]);
        assert!(guard.admit(&prefix, later).is_ok());
        assert!(guard.admit(&prefix, later).is_ok());
        let slowed = guard.admit(&prefix, later).unwrap_err();
        assert!(!slowed.blocked);
        // Fresh endings that convert lift it.
        for approved in [true, true, true, true, false, true, true, true, true, true] {
            guard.ended(&prefix, approved, later);
        }
        assert_eq!(guard.housekeep(later).slowed, [0, 0]);
    }

    #[test]
    fn endings_leave_the_window_and_idle_keys_are_forgotten() {
        let guard = FraudGuard::new(policy(), Clock::system());
        let prefix = [GuardKey::Prefix("4470123".into())];
        for _ in 0..9 {
            guard.ended(&prefix, false, 0);
        }
        // An hour later those nine are out of the window: one more does not make ten.
        guard.ended(&prefix, false, 3_700_000);
        assert!(guard.admit(&prefix, 3_700_000).is_ok());
        guard.housekeep(3_700_000);
        assert_eq!(crate::sync::lock(&guard.trackers).len(), 1);
        guard.housekeep(7_400_000);
        assert!(crate::sync::lock(&guard.trackers).is_empty());
    }

    /// A country whose verifications collapse is reported, never refused: an attacker could
    /// otherwise stop a whole country's sign-ups with a few dozen starts.
    #[test]
    fn a_collapsed_country_is_reported_and_never_refused() {
        let guard = FraudGuard::new(policy(), Clock::system());
        let country = [GuardKey::Country("IT".into())];
        for _ in 0..20 {
            guard.ended(&country, false, 0);
        }
        assert_eq!(guard.housekeep(0).blocked, [1, 0]);
        assert!(guard.admit(&country, 0).is_ok());
    }

    #[test]
    fn a_disabled_guard_counts_and_refuses_nothing() {
        let guard = FraudGuard::new(
            FraudGuardPolicy {
                enabled: false,
                ..policy()
            },
            Clock::system(),
        );
        let prefix = [GuardKey::Prefix("4477009".into())];
        for _ in 0..50 {
            guard.ended(&prefix, false, 0);
        }
        assert!(guard.admit(&prefix, 0).is_ok());
    }
}

//! A circuit breaker per carrier: a carrier that keeps failing is taken out of rotation, so the
//! other carriers (which pull from the same queue) take its traffic, and it is probed back in.
//!
//! - **Closed**: submits flow. It opens after `failures` consecutive temporary failures, or when
//!   at least half of the last [`RATIO_WINDOW`] submits failed (`error_ratio`).
//! - **Open**: no submits for `open_for`.
//! - **Half-open**: up to `probes` submits at a time. A failed probe opens it again; `probes`
//!   successes close it.
//!
//! Only temporary failures (5xx, timeouts, refused connections) count. A throttle answer is the
//! carrier working as designed, and a permanent refusal is about one number, not the carrier.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many recent outcomes the error ratio looks at.
pub const RATIO_WINDOW: usize = 20;

/// When a breaker opens and how it comes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Consecutive temporary failures that open the circuit.
    pub failures: u32,
    /// Share of failures among the last [`RATIO_WINDOW`] outcomes that opens it (once the
    /// window is full).
    pub error_ratio: f64,
    /// How long it stays open before probing.
    pub open_for: Duration,
    /// Probes allowed at once when half-open, and successes needed to close.
    pub probes: u32,
}

/// The state, as metrics and `/readyz` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

/// One carrier's breaker.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Phase,
    consecutive_failures: u32,
    /// Recent outcomes, `true` for a failure.
    recent: VecDeque<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// Permission to submit, from [`Breaker::try_acquire`]; hand it back with the outcome.
#[derive(Debug)]
#[must_use = "report the submit's outcome with Breaker::record"]
pub struct Permit {
    probe: bool,
}

// === impl Permit ===

impl Permit {
    /// Whether this permit is one of the half-open circuit's probes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

// === impl State ===

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

// === impl Breaker ===

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            inner: Mutex::new(Inner {
                state: Phase::Closed,
                consecutive_failures: 0,
                recent: VecDeque::with_capacity(RATIO_WINDOW),
            }),
        }
    }

    /// A permit to submit now, or how long to wait before asking again.
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, Duration> {
        let mut inner = self.lock();
        match inner.state {
            Phase::Closed => Ok(Permit { probe: false }),
            Phase::Open { until } if now < until => Err(until - now),
            Phase::Open { .. } => {
                inner.state = Phase::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                Ok(Permit { probe: true })
            }
            Phase::HalfOpen {
                in_flight,
                successes,
            } => {
                if in_flight < self.policy.probes {
                    inner.state = Phase::HalfOpen {
                        in_flight: in_flight + 1,
                        successes,
                    };
                    Ok(Permit { probe: true })
                } else {
                    // Ask again soon: a probe's answer decides.
                    Err(Duration::from_millis(10))
                }
            }
        }
    }

    /// Records how a submit went. `failed` is a temporary failure; `None` is an outcome that
    /// says nothing about the carrier's health (a throttle, a permanent refusal, a submit that
    /// never happened).
    pub fn record(&self, permit: Permit, failed: Option<bool>, now: Instant) {
        let mut inner = self.lock();
        if let Phase::HalfOpen {
            in_flight,
            successes,
        } = inner.state
        {
            if permit.probe {
                let in_flight = in_flight.saturating_sub(1);
                inner.state = match failed {
                    Some(true) => Phase::Open {
                        until: now + self.policy.open_for,
                    },
                    Some(false) if successes + 1 >= self.policy.probes => {
                        inner.consecutive_failures = 0;
                        inner.recent.clear();
                        Phase::Closed
                    }
                    Some(false) => Phase::HalfOpen {
                        in_flight,
                        successes: successes + 1,
                    },
                    None => Phase::HalfOpen {
                        in_flight,
                        successes,
                    },
                };
            }
            return;
        }
        let Some(failed) = failed else {
            return;
        };
        if inner.recent.len() == RATIO_WINDOW {
            inner.recent.pop_front();
        }
        inner.recent.push_back(failed);
        inner.consecutive_failures = if failed {
            inner.consecutive_failures + 1
        } else {
            0
        };
        if matches!(inner.state, Phase::Closed) {
            let n_failed = inner.recent.iter().filter(|failed| **failed).count();
            let ratio_tripped = inner.recent.len() == RATIO_WINDOW
                && n_failed as f64 >= self.policy.error_ratio * RATIO_WINDOW as f64;
            if inner.consecutive_failures >= self.policy.failures || ratio_tripped {
                inner.state = Phase::Open {
                    until: now + self.policy.open_for,
                };
            }
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.lock().state {
            Phase::Closed => State::Closed,
            Phase::Open { until } if now < until => State::Open,
            // Past its open time, the next submit is a probe.
            Phase::Open { .. } | Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerPolicy {
            failures: 3,
            error_ratio: 0.5,
            open_for: Duration::from_secs(10),
            probes: 2,
        })
    }

    fn submit(breaker: &Breaker, failed: Option<bool>, now: Instant) {
        let permit = breaker.try_acquire(now).expect("a permit");
        breaker.record(permit, failed, now);
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_back() {
        let breaker = breaker();
        let t0 = Instant::now();
        submit(&breaker, Some(true), t0);
        submit(&breaker, Some(true), t0);
        // A throttle or a permanent refusal neither counts nor resets.
        submit(&breaker, None, t0);
        assert_eq!(breaker.state(t0), State::Closed);
        submit(&breaker, Some(true), t0);
        assert_eq!(breaker.state(t0), State::Open);
        let wait = breaker.try_acquire(t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));

        // After the open time: two probes at once, no third.
        let t1 = t0 + Duration::from_secs(10);
        let probe_a = breaker.try_acquire(t1).unwrap();
        let probe_b = breaker.try_acquire(t1).unwrap();
        assert!(breaker.try_acquire(t1).is_err());
        assert_eq!(breaker.state(t1), State::HalfOpen);
        breaker.record(probe_a, Some(false), t1);
        assert_eq!(breaker.state(t1), State::HalfOpen);
        breaker.record(probe_b, Some(false), t1);
        assert_eq!(breaker.state(t1), State::Closed);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let breaker = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            submit(&breaker, Some(true), t0);
        }
        let t1 = t0 + Duration::from_secs(11);
        submit(&breaker, Some(true), t1);
        assert_eq!(breaker.state(t1), State::Open);
        assert!(breaker.try_acquire(t1 + Duration::from_secs(9)).is_err());
    }

    #[test]
    fn opens_on_the_error_ratio_without_a_run_of_failures() {
        let breaker = breaker();
        let t0 = Instant::now();
        // Alternate: never three in a row, but half of the window fails.
        for n in 0..RATIO_WINDOW {
            assert_eq!(breaker.state(t0), State::Closed, "after {n}");
            submit(&breaker, Some(n % 2 == 0), t0);
        }
        assert_eq!(breaker.state(t0), State::Open);
    }

    #[test]
    fn successes_keep_it_closed() {
        let breaker = breaker();
        let t0 = Instant::now();
        for n in 0..100 {
            submit(&breaker, Some(n % 5 == 0), t0);
        }
        assert_eq!(breaker.state(t0), State::Closed);
    }
}

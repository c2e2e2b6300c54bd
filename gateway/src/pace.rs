//! A carrier's pace that adapts to its throttle answers. When the carrier says "too fast" the
//! pace drops at once to 95% of what the carrier actually accepted over the last second
//! (or to half, when it accepted nothing); it waits out any `Retry-After`; and it climbs back
//! towards the configured pace as submits succeed, by 3% of that pace per second. The carrier
//! is kept as busy as it allows and no busier.
//!
//! The pacing itself is governor's GCRA; a pace change swaps in a limiter with the new quota.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The lowest pace a throttled carrier is slowed to, in segments per second.
const MIN_PACE: f64 = 1.0;
/// Throttle answers closer together than this are one signal: the submits in flight when the
/// carrier started refusing all come back throttled, and halving for each would stall it.
const DECREASE_SPACING: Duration = Duration::from_millis(250);
/// Recovery speed: 3% of the configured pace per second of successes: slow enough near the
/// carrier's real capacity to probe it gently, since each overshoot costs throttle answers
/// (`bench/throttle.sh` measured 10% as faster to recover but ten times the throttles).
const RECOVERY_PER_SEC: f64 = 0.03;
/// After a throttle, the share of the carrier's accepted rate the pace drops to. The accepted
/// rate is already the carrier's real capacity, so a small margin suffices: `bench/throttle.sh`
/// measured 1.06x the ideal with 0.9 and 1.03x with 0.95 (at twice the throttle answers, each
/// retried within milliseconds).
const BACKOFF_SHARE: f64 = 0.95;
/// The longest a `Retry-After` pauses a carrier: beyond it, the carrier is asked again (and its
/// circuit breaker, not its pace, decides whether it is out).
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A change smaller than this share of the current pace keeps the current limiter.
const SWAP_THRESHOLD: f64 = 0.05;

/// One carrier's adaptive pace.
#[derive(Debug)]
pub struct AdaptivePace {
    configured: f64,
    state: Mutex<State>,
    limiter: RwLock<Arc<DefaultDirectRateLimiter>>,
}

#[derive(Debug)]
struct State {
    /// The pace aimed at now, in segments per second.
    target: f64,
    /// The pace the current limiter enforces.
    enforced: f64,
    last_decrease: Option<Instant>,
    last_increase: Instant,
    paused_until: Option<Instant>,
    /// When the last second's accepted submits were accepted, and their segments: the
    /// carrier's real rate, in the pace's own unit.
    accepted: std::collections::VecDeque<(Instant, u16)>,
    /// The segments in `accepted`.
    accepted_segments: u64,
}

// === impl AdaptivePace ===

impl AdaptivePace {
    pub fn new(configured: NonZeroU32) -> AdaptivePace {
        let configured = f64::from(configured.get());
        AdaptivePace {
            configured,
            state: Mutex::new(State {
                target: configured,
                enforced: configured,
                last_decrease: None,
                last_increase: Instant::now(),
                paused_until: None,
                accepted: std::collections::VecDeque::new(),
                accepted_segments: 0,
            }),
            limiter: RwLock::new(Arc::new(limiter(configured))),
        }
    }

    /// Waits for a pause to end and for the pace to allow one segment.
    pub async fn until_ready(&self) {
        self.wait_out_pause().await;
        self.current_limiter().until_ready().await;
    }

    /// How much longer a `Retry-After` pause lasts, if one is on.
    pub fn paused_for(&self, now: Instant) -> Option<Duration> {
        self.lock()
            .paused_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Waits for the pace to allow `n` more segments.
    pub async fn until_n_ready(&self, n: NonZeroU32) {
        let limiter = self.current_limiter();
        if limiter.until_n_ready(n).await.is_err() {
            // More than one burst's worth: they go one at a time, at the pace.
            for _ in 0..n.get() {
                limiter.until_ready().await;
            }
        }
    }

    /// The carrier answered "throttled": slow down at once, and pause for `retry_after`.
    pub fn on_throttle(&self, retry_after: Option<Duration>, now: Instant) {
        let mut state = self.lock();
        if let Some(pause) = retry_after.filter(|pause| !pause.is_zero()) {
            let until = now + pause.min(MAX_PAUSE);
            state.paused_until = Some(
                state
                    .paused_until
                    .map_or(until, |current| current.max(until)),
            );
        }
        let spaced = state
            .last_decrease
            .is_none_or(|last| now.duration_since(last) >= DECREASE_SPACING);
        if spaced {
            let accepted_rate = state.accepted_in_last_second(now) as f64;
            let lowered = if accepted_rate >= MIN_PACE {
                (accepted_rate * BACKOFF_SHARE).min(state.target)
            } else {
                state.target / 2.0
            };
            state.target = lowered.max(MIN_PACE);
            state.last_decrease = Some(now);
            state.last_increase = now;
            self.swap_if_needed(&mut state);
        }
    }

    /// The carrier accepted a submit of `segments`: recover towards the configured pace.
    pub fn on_success(&self, segments: u16, now: Instant) {
        let mut state = self.lock();
        state.accepted_in_last_second(now);
        // At most a second's worth at the configured pace is kept.
        if state.accepted.len() < self.configured as usize + 1 {
            state.accepted.push_back((now, segments));
            state.accepted_segments += u64::from(segments);
        }
        if state.target >= self.configured {
            state.last_increase = now;
            return;
        }
        let elapsed = now.duration_since(state.last_increase).as_secs_f64();
        state.target =
            (state.target + elapsed * RECOVERY_PER_SEC * self.configured).min(self.configured);
        state.last_increase = now;
        self.swap_if_needed(&mut state);
    }

    /// The pace enforced now, in segments per second.
    pub fn current(&self) -> f64 {
        self.lock().enforced
    }

    async fn wait_out_pause(&self) {
        loop {
            let until = self.lock().paused_until;
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                }
                _ => return,
            }
        }
    }

    fn swap_if_needed(&self, state: &mut State) {
        let reached_configured =
            state.target >= self.configured && state.enforced < self.configured;
        if (state.target - state.enforced).abs() >= SWAP_THRESHOLD * state.enforced
            || reached_configured
        {
            state.enforced = state.target;
            let mut current = self
                .limiter
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *current = Arc::new(limiter(state.target));
        }
    }

    fn current_limiter(&self) -> Arc<DefaultDirectRateLimiter> {
        self.limiter
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

// === impl State ===

impl State {
    /// Forgets acceptances older than a second and counts the segments of the rest.
    fn accepted_in_last_second(&mut self, now: Instant) -> u64 {
        while let Some(&(at, segments)) = self.accepted.front() {
            if now.duration_since(at) < Duration::from_secs(1) {
                break;
            }
            self.accepted.pop_front();
            self.accepted_segments -= u64::from(segments);
        }
        self.accepted_segments
    }
}

/// A limiter for `per_sec` segments a second, with a burst of a twentieth of a second's worth:
/// smooth enough that the carrier never sees more than its pace over any window it is likely to
/// measure.
fn limiter(per_sec: f64) -> DefaultDirectRateLimiter {
    let per_sec = per_sec.max(MIN_PACE);
    let period = Duration::from_secs_f64(1.0 / per_sec);
    let burst = NonZeroU32::new((per_sec / 20.0) as u32).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(per_sec: u32) -> AdaptivePace {
        AdaptivePace::new(NonZeroU32::new(per_sec).unwrap())
    }

    #[test]
    fn halves_once_per_burst_of_throttles_when_nothing_was_accepted_and_recovers() {
        let pace = pace(200);
        let t0 = Instant::now();
        // A burst of throttles from the submits in flight is one signal.
        for _ in 0..10 {
            pace.on_throttle(None, t0);
        }
        assert_eq!(pace.current(), 100.0);
        pace.on_throttle(None, t0 + DECREASE_SPACING);
        assert_eq!(pace.current(), 50.0);
        // Successes bring it back by 3% of the configured 200 per second.
        let t1 = t0 + DECREASE_SPACING;
        pace.on_success(1, t1 + Duration::from_secs(1));
        assert_eq!(pace.current(), 56.0);
        pace.on_success(1, t1 + Duration::from_secs(3));
        assert_eq!(pace.current(), 68.0);
        pace.on_success(1, t1 + Duration::from_secs(100));
        assert_eq!(pace.current(), 200.0, "never above the configured pace");
    }

    #[test]
    fn drops_to_the_rate_the_carrier_accepted() {
        let pace = pace(200);
        let t0 = Instant::now();
        for n in 0..30 {
            pace.on_success(1, t0 + Duration::from_millis(n * 10));
        }
        pace.on_throttle(None, t0 + Duration::from_millis(400));
        assert_eq!(
            pace.current(),
            28.5,
            "95% of the 30 accepted in the last second, not half of 200"
        );
    }

    #[test]
    fn never_below_the_minimum() {
        let pace = pace(4);
        let mut now = Instant::now();
        for _ in 0..20 {
            pace.on_throttle(None, now);
            now += DECREASE_SPACING;
        }
        assert_eq!(pace.current(), MIN_PACE);
    }

    #[tokio::test]
    async fn retry_after_pauses_the_carrier() {
        let pace = pace(1000);
        pace.on_throttle(Some(Duration::from_millis(200)), Instant::now());
        let started = Instant::now();
        pace.until_ready().await;
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
    }
}

//! The arrival schedule, computed before the run starts (an open model): a Poisson process
//! whose rate follows the scenario's piecewise-linear profile, drawn from the scenario's seed.
//!
//! Arrival `k` happens where the integral of the rate reaches the sum of `k` unit exponential
//! draws, so the schedule has the profile's shape and Poisson's burstiness, and the same seed
//! gives the same schedule. Shards (`--shard i/n`) take every n-th arrival of the one schedule.

use std::time::Duration;

use rand::{Rng, SeedableRng};

/// A point of the arrival rate's profile: `per_sec` arrivals a second at `at`.
#[derive(Debug, Clone, Copy)]
pub struct RatePoint {
    pub at: Duration,
    pub per_sec: f64,
}

/// One user's arrival: when, relative to the run's start, and its index in the whole schedule
/// (which names its phone number).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    pub at: Duration,
    pub user: u64,
}

/// The rate at `t`: linear between points, the last point's rate after it, the first's before.
pub fn rate_at(points: &[RatePoint], t: Duration) -> f64 {
    match points.iter().position(|point| point.at > t) {
        None => points.last().map_or(0.0, |point| point.per_sec),
        Some(0) => points[0].per_sec,
        Some(next) => {
            let (a, b) = (&points[next - 1], &points[next]);
            let span = (b.at - a.at).as_secs_f64();
            let into = (t - a.at).as_secs_f64();
            a.per_sec + (b.per_sec - a.per_sec) * into / span
        }
    }
}

/// The integral of the rate from 0 to `until`: the expected number of arrivals.
pub fn integral(points: &[RatePoint], until: Duration) -> f64 {
    let mut total = 0.0;
    let mut t = Duration::ZERO;
    for boundary in points.iter().map(|point| point.at).chain([until]) {
        let end = boundary.min(until);
        if end > t {
            let width = (end - t).as_secs_f64();
            total += width * (rate_at(points, t) + rate_at(points, end)) / 2.0;
            t = end;
        }
    }
    total
}

/// Every arrival in `[0, duration)`, for shard `shard` of `n_shards`.
pub fn arrivals(
    points: &[RatePoint],
    duration: Duration,
    seed: u64,
    shard: u64,
    n_shards: u64,
) -> Vec<Arrival> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let expected = integral(points, duration);
    let mut schedule = Vec::with_capacity((expected / n_shards as f64 * 1.1) as usize + 16);
    // Walk the profile in small steps, integrating the rate, and emit an arrival each time the
    // integral passes the next exponential target.
    // Half a millisecond, or coarser for very long runs: at most 20 million steps.
    let step = Duration::from_micros(500).max(duration / 20_000_000);
    let mut target: f64 = -(1.0 - rng.random::<f64>()).ln();
    let mut integrated = 0.0;
    let mut t = Duration::ZERO;
    let mut user = 0u64;
    while t < duration {
        let next = (t + step).min(duration);
        let (rate_start, rate_end) = (rate_at(points, t), rate_at(points, next));
        let width = (next - t).as_secs_f64();
        let area = width * (rate_start + rate_end) / 2.0;
        while integrated + area >= target {
            // Place the arrival inside the step by linear interpolation of the integral.
            let fraction = ((target - integrated) / area).clamp(0.0, 1.0);
            let at = t + Duration::from_secs_f64(width * fraction);
            if user % n_shards == shard {
                schedule.push(Arrival { at, user });
            }
            user += 1;
            target += -(1.0 - rng.random::<f64>()).ln();
        }
        integrated += area;
        t = next;
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(pairs: &[(f64, f64)]) -> Vec<RatePoint> {
        pairs
            .iter()
            .map(|&(at, per_sec)| RatePoint {
                at: Duration::from_secs_f64(at),
                per_sec,
            })
            .collect()
    }

    #[test]
    fn rate_is_piecewise_linear() {
        let profile = points(&[(0.0, 0.0), (10.0, 100.0), (20.0, 100.0)]);
        assert_eq!(rate_at(&profile, Duration::from_secs(5)), 50.0);
        assert_eq!(rate_at(&profile, Duration::from_secs(15)), 100.0);
        assert_eq!(rate_at(&profile, Duration::from_secs(99)), 100.0);
        assert_eq!(integral(&profile, Duration::from_secs(20)), 1500.0);
    }

    #[test]
    fn arrivals_follow_the_profile_and_the_seed() {
        let profile = points(&[(0.0, 0.0), (10.0, 1000.0)]);
        let all = arrivals(&profile, Duration::from_secs(10), 7, 0, 1);
        // Expected 5,000; Poisson's standard deviation is about 71.
        assert!((4700..=5300).contains(&all.len()), "{}", all.len());
        // A ramp: the second half holds about three times the first.
        let first_half = all.iter().filter(|a| a.at < Duration::from_secs(5)).count();
        let ratio = (all.len() - first_half) as f64 / first_half as f64;
        assert!((2.6..=3.4).contains(&ratio), "{ratio}");
        assert!(all.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(all, arrivals(&profile, Duration::from_secs(10), 7, 0, 1));
        assert_ne!(all, arrivals(&profile, Duration::from_secs(10), 8, 0, 1));
    }

    #[test]
    fn shards_split_one_schedule() {
        let profile = points(&[(0.0, 500.0)]);
        let all = arrivals(&profile, Duration::from_secs(4), 1, 0, 1);
        let a = arrivals(&profile, Duration::from_secs(4), 1, 0, 2);
        let b = arrivals(&profile, Duration::from_secs(4), 1, 1, 2);
        assert_eq!(a.len() + b.len(), all.len());
        let mut merged: Vec<Arrival> = a.into_iter().chain(b).collect();
        merged.sort_by_key(|arrival| arrival.user);
        assert_eq!(merged, all);
    }
}

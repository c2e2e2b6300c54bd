//! The gateway's one source of time.
//!
//! Every deadline in the gateway (code expiry, session extension, resend cooldowns, rate limits)
//! reads this clock, so tests can move time forward without sleeping: [`Clock::advance`] shifts
//! both the wall clock and the monotonic clock by the same amount. In production the offset stays
//! zero and the clock is the system's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

/// Milliseconds since the Unix epoch: how the gateway stores points in time.
pub type Millis = u64;

/// A cheap-clone handle to the gateway's clock.
#[derive(Clone, Debug)]
pub struct Clock {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The monotonic instant at which `origin_wall_ms` was read; all readings are offsets from it,
    /// so wall time never goes backwards inside the gateway even if the system clock does.
    origin: Instant,
    origin_wall_ms: Millis,
    /// Time added by tests through [`Clock::advance`]; zero in production.
    offset_ns: AtomicU64,
}

// === impl Clock ===

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        let origin_wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0);
        Clock {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                origin_wall_ms,
                offset_ns: AtomicU64::new(0),
            }),
        }
    }

    /// Moves this clock (and every handle cloned from it) forward.
    pub fn advance(&self, by: Duration) {
        self.shared
            .offset_ns
            .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Time added by [`Clock::advance`], in ms: zero in production. Limits kept on another
    /// clock (Redis's) add it, so tests that move time move them too.
    pub fn advanced_ms(&self) -> i64 {
        (self.shared.offset_ns.load(Ordering::SeqCst) / 1_000_000) as i64
    }

    /// Time since this clock was created, including any advance.
    pub fn elapsed(&self) -> Duration {
        self.shared.origin.elapsed()
            + Duration::from_nanos(self.shared.offset_ns.load(Ordering::SeqCst))
    }

    /// Now, as milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> Millis {
        self.shared.origin_wall_ms + self.elapsed().as_millis() as Millis
    }
}

/// Lets governor's limiters run on the same (advanceable) time as everything else.
impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.elapsed())
    }
}

/// Formats a point in time as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_wall_and_monotonic_time_together() {
        let clock = Clock::system();
        let wall = clock.now_ms();
        let mono = governor::clock::Clock::now(&clock);
        clock.advance(Duration::from_secs(60));
        assert!(clock.now_ms() >= wall + 60_000);
        let mono_after = governor::clock::Clock::now(&clock);
        assert!(mono_after.as_u64() >= mono.as_u64() + 60_000_000_000);
    }

    #[test]
    fn formats_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}

//! What a run measures: HDR histograms per API call and per journey step, counters of what
//! happened to users and SMS, and a per-second timeline (for progress, the picture, and the
//! load generator's watch over itself).
//!
//! Latencies are recorded from each action's *intended* start: a start from the user's
//! scheduled arrival, a check from the moment the user decided to type. A stalled gateway, or a
//! load generator that fell behind, therefore shows up in the high percentiles instead of
//! silently thinning the load (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::carriers::Tally;

/// Everything latency-like the run records, in the order of [`Series::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// `POST /v1/verifications`, from the scheduled arrival.
    Start,
    /// `POST /v1/verifications/{id}/check`, from the decision to type.
    Check,
    /// `POST /v1/verifications/{id}/resend`.
    Resend,
    /// From the scheduled arrival to the first SMS on the handset.
    TimeToSms,
    /// From the scheduled arrival to a valid check.
    TimeToVerified,
    /// How late users started against their schedule (the load generator's own lag).
    SchedulerLag,
    /// `GET /v1/verifications/{id}`, the frontend's poll while its user waits
    /// (`users.poll_secs`), from the moment it was due.
    Read,
}

impl Series {
    pub const ALL: [Series; 7] = [
        Series::Start,
        Series::Check,
        Series::Resend,
        Series::TimeToSms,
        Series::TimeToVerified,
        Series::SchedulerLag,
        Series::Read,
    ];

    /// The name in reports and thresholds.
    pub fn name(self) -> &'static str {
        match self {
            Series::Start => "start",
            Series::Check => "check",
            Series::Resend => "resend",
            Series::TimeToSms => "time_to_sms",
            Series::TimeToVerified => "time_to_verified",
            Series::SchedulerLag => "scheduler_lag",
            Series::Read => "read",
        }
    }

    pub fn from_name(name: &str) -> Option<Series> {
        Series::ALL.into_iter().find(|series| series.name() == name)
    }
}

/// What happened to users and SMS: the counters of a report, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Users whose arrival came.
    Arrived,
    /// Starts answered 202.
    Started,
    /// Checks answered valid.
    Verified,
    /// Users whose verification expired before a usable code reached them: the SMS never came
    /// in time. The gateway's failure, which a rehearsal wants at zero.
    ExpiredSessions,
    /// Users whose code reached them while valid but who typed it after it expired.
    ExpiredWhileTyping,
    /// Users who waited for an SMS longer than they would, and left.
    GaveUp,
    /// Users who got the SMS and never typed it (the scenario's `never_type`).
    NeverTyped,
    /// Checks answered `valid: false`.
    WrongCodes,
    /// Resends pressed.
    Resends,
    /// SMS the carriers accepted with a message id they had accepted before.
    DuplicateSms,
    /// Verifications the gateway reported sent that no carrier ever received.
    LostSms,
    /// SMS handed to handsets.
    SmsReceived,
    /// Requests that failed without an HTTP answer (connect, timeout).
    TransportErrors,
    /// Users still in their journey when the run ended.
    Unfinished,
    /// Users who came back after a failed sign-up and started again (the scenario's
    /// `users.retry`).
    Retries,
    /// SMS that reached the handset of a user who had left without a code (gave up, saw the
    /// session expire, or was refused): SMS the carriers spent on nobody. SMS arriving after a
    /// user verified, or got its code and left, are not counted.
    SmsToAbsent,
    /// Starts answered `503`, whatever the error code (each attempt of a user who comes back
    /// counts).
    RefusedAtStart,
    /// Of those, the ones whose error code was `come_back_later` (the predicted wait passed the
    /// gateway's patience, `max_wait_ms`)…
    RefusedComeBackLater,
    /// …and `overloaded` (the queue was full, or the wait passed `max_extension`).
    RefusedOverloaded,
    /// Reads of a verification by the frontend while its user waits (`users.poll_secs`).
    Polls,
}

impl Count {
    pub const ALL: [Count; 20] = [
        Count::Arrived,
        Count::Started,
        Count::Verified,
        Count::ExpiredSessions,
        Count::ExpiredWhileTyping,
        Count::GaveUp,
        Count::NeverTyped,
        Count::WrongCodes,
        Count::Resends,
        Count::DuplicateSms,
        Count::LostSms,
        Count::SmsReceived,
        Count::TransportErrors,
        Count::Unfinished,
        Count::Retries,
        Count::SmsToAbsent,
        Count::RefusedAtStart,
        Count::RefusedComeBackLater,
        Count::RefusedOverloaded,
        Count::Polls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Count::Arrived => "arrived",
            Count::Started => "started",
            Count::Verified => "verified",
            Count::ExpiredSessions => "expired_sessions",
            Count::ExpiredWhileTyping => "expired_while_typing",
            Count::GaveUp => "gave_up",
            Count::NeverTyped => "never_typed",
            Count::WrongCodes => "wrong_codes",
            Count::Resends => "resends",
            Count::DuplicateSms => "duplicate_sms",
            Count::LostSms => "lost_sms",
            Count::SmsReceived => "sms_received",
            Count::TransportErrors => "transport_errors",
            Count::Unfinished => "unfinished",
            Count::Retries => "retries",
            Count::SmsToAbsent => "sms_to_absent",
            Count::RefusedAtStart => "refused_at_start",
            Count::RefusedComeBackLater => "refused_come_back_later",
            Count::RefusedOverloaded => "refused_overloaded",
            Count::Polls => "polls",
        }
    }

    pub fn from_name(name: &str) -> Option<Count> {
        Count::ALL.into_iter().find(|count| count.name() == name)
    }
}

/// One second of the run: what the report's timeline holds, filled in as the run goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Second {
    pub second: u64,
    pub scheduled: u64,
    pub arrived: u64,
    pub requests: u64,
    pub errors: u64,
    pub sms: u64,
    pub verified: u64,
    pub in_flight: u64,
    pub start_p99_ms: Option<f64>,
    /// 99th percentile of the time to SMS of the SMS that reached handsets in this second.
    pub time_to_sms_p99_ms: Option<f64>,
    /// Share of one core the load generator's process used.
    pub cpu: f64,
    pub rss_bytes: u64,
}

/// The run's measurements. Shared by every user task.
#[derive(Debug)]
pub struct Measurements {
    started: Instant,
    /// Moments of the run (from `started`) by which the users verified are counted.
    marks: Vec<Duration>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    histograms: Vec<Histogram<u64>>,
    counts: [u64; Count::ALL.len()],
    /// Answers with a status other than the expected one, by call and status.
    statuses: BTreeMap<(&'static str, u16), u64>,
    timeline: Vec<Second>,
    in_flight: u64,
    /// Start latencies answered since the last second closed: one histogram, reused, so a long
    /// run's memory does not grow with its seconds.
    current_start: Histogram<u64>,
    /// Likewise for the time to SMS.
    current_sms: Histogram<u64>,
    /// Users verified before each of the marks.
    verified_by: Vec<u64>,
}

/// Microseconds up to an hour, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds are valid")
}

impl Measurements {
    pub fn new(started: Instant) -> Measurements {
        Measurements::with_marks(started, Vec::new())
    }

    /// Measurements that also count the users verified before each of `marks` (moments from
    /// `started`).
    pub fn with_marks(started: Instant, marks: Vec<Duration>) -> Measurements {
        let verified_by = vec![0; marks.len()];
        Measurements {
            started,
            marks,
            inner: Mutex::new(Inner {
                histograms: Series::ALL.iter().map(|_| new_histogram()).collect(),
                counts: [0; Count::ALL.len()],
                statuses: BTreeMap::new(),
                timeline: Vec::new(),
                in_flight: 0,
                current_start: new_histogram(),
                current_sms: new_histogram(),
                verified_by,
            }),
        }
    }

    /// When the run started: the zero of the schedule.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records a latency from `intended` to now.
    pub fn latency_since(&self, series: Series, intended: Instant) -> Duration {
        let elapsed = intended.elapsed();
        self.record(series, elapsed);
        elapsed
    }

    pub fn record(&self, series: Series, value: Duration) {
        let micros = (value.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut inner = self.lock();
        let _ = inner.histograms[series as usize].record(micros);
        match series {
            Series::Start => {
                let _ = inner.current_start.record(micros);
            }
            Series::TimeToSms => {
                let _ = inner.current_sms.record(micros);
            }
            _ => {}
        }
    }

    pub fn count(&self, count: Count) {
        self.add(count, 1);
    }

    pub fn add(&self, count: Count, n: u64) {
        let at = Instant::now();
        let now = self.second_of(at);
        let mut inner = self.lock();
        inner.counts[count as usize] += n;
        if count == Count::Verified {
            let elapsed = at.saturating_duration_since(self.started);
            for (mark, verified) in self.marks.iter().zip(inner.verified_by.iter_mut()) {
                if elapsed < *mark {
                    *verified += n;
                }
            }
        }
        match count {
            Count::Arrived => inner.second(now).arrived += n,
            Count::SmsReceived => inner.second(now).sms += n,
            Count::Verified => inner.second(now).verified += n,
            _ => {}
        }
    }

    /// An API answer: `ok` says whether it was the expected one.
    pub fn answered(&self, call: &'static str, status: Option<u16>, ok: bool) {
        let now = self.second_of(Instant::now());
        let mut inner = self.lock();
        let second = inner.second(now);
        second.requests += 1;
        if !ok {
            second.errors += 1;
        }
        match status {
            Some(status) if !ok => *inner.statuses.entry((call, status)).or_default() += 1,
            None => inner.counts[Count::TransportErrors as usize] += 1,
            Some(_) => {}
        }
    }

    pub fn schedule(&self, at: Duration) {
        let index = at.as_secs() as usize;
        self.lock().second(index).scheduled += 1;
    }

    pub fn user_entered(&self) {
        self.lock().in_flight += 1;
    }

    pub fn user_left(&self) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }

    /// Closes a second: users in flight, CPU and memory at its end.
    pub fn close_second(&self, index: usize, cpu: f64, rss_bytes: u64) {
        let mut inner = self.lock();
        let in_flight = inner.in_flight;
        let start_p99_ms = (!inner.current_start.is_empty())
            .then(|| inner.current_start.value_at_quantile(0.99) as f64 / 1000.0);
        inner.current_start.reset();
        let sms_p99_ms = (!inner.current_sms.is_empty())
            .then(|| inner.current_sms.value_at_quantile(0.99) as f64 / 1000.0);
        inner.current_sms.reset();
        let second = inner.second(index);
        second.in_flight = in_flight;
        second.start_p99_ms = start_p99_ms;
        second.time_to_sms_p99_ms = sms_p99_ms;
        second.cpu = cpu;
        second.rss_bytes = rss_bytes;
    }

    /// API requests answered during second `index` of the run.
    pub fn requests_in(&self, index: usize) -> u64 {
        self.lock()
            .timeline
            .get(index)
            .map_or(0, |second| second.requests)
    }

    pub fn get(&self, count: Count) -> u64 {
        self.lock().counts[count as usize]
    }

    /// A percentile of a series so far, in microseconds (0 when empty).
    pub fn percentile(&self, series: Series, quantile: f64) -> u64 {
        let inner = self.lock();
        let histogram = &inner.histograms[series as usize];
        if histogram.is_empty() {
            0
        } else {
            histogram.value_at_quantile(quantile)
        }
    }

    /// Everything measured, for the report.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            histograms: inner.histograms.clone(),
            counts: inner.counts,
            statuses: inner
                .statuses
                .iter()
                .map(|(&(call, status), &n)| (call, status, n))
                .collect(),
            timeline: inner.timeline.clone(),
            verified_by_marks: inner.verified_by.clone(),
        }
    }

    fn second_of(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.started).as_secs() as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The simulated network counts into the run's measurements.
impl Tally for Measurements {
    fn duplicate_sms(&self) {
        self.count(Count::DuplicateSms);
    }

    fn sms_received(&self) {
        self.count(Count::SmsReceived);
    }

    fn sms_to_absent(&self) {
        self.count(Count::SmsToAbsent);
    }
}

impl Inner {
    fn second(&mut self, index: usize) -> &mut Second {
        // A bounded timeline: a run longer than a week folds its tail into the last second.
        let index = index.min(7 * 86_400);
        while self.timeline.len() <= index {
            let second = self.timeline.len() as u64;
            self.timeline.push(Second {
                second,
                ..Second::default()
            });
        }
        &mut self.timeline[index]
    }
}

/// A copy of the measurements at the end of a run.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub histograms: Vec<Histogram<u64>>,
    pub counts: [u64; Count::ALL.len()],
    /// `(call, status, how many)` for answers other than the expected one.
    pub statuses: Vec<(&'static str, u16, u64)>,
    pub timeline: Vec<Second>,
    /// Users verified before each mark, in the order of the marks given.
    pub verified_by_marks: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_users_are_counted_by_the_marks_after_them() {
        let started = Instant::now();
        let marks = vec![Duration::ZERO, Duration::from_secs(3600), Duration::MAX];
        let measurements = Measurements::with_marks(started, marks);
        measurements.count(Count::Verified);
        measurements.add(Count::Verified, 2);
        measurements.count(Count::GaveUp);
        let snapshot = measurements.snapshot();
        assert_eq!(snapshot.verified_by_marks, [0, 3, 3]);
        assert_eq!(snapshot.counts[Count::Verified as usize], 3);
        assert!(
            Measurements::new(started)
                .snapshot()
                .verified_by_marks
                .is_empty()
        );
    }
}

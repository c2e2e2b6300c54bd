//! Pass/fail thresholds: `p99(check)<50ms`, `expired_sessions==0`, `max(time_to_sms)<=2m`,
//! `rate(verified)>=0.95`.
//!
//! A threshold is `SUBJECT OP VALUE`:
//! - a latency statistic of a series (`start`, `check`, `resend`, `time_to_sms`,
//!   `time_to_verified`, `scheduler_lag`, `read`): `p50(…)`, `p90(…)`, `p95(…)`, `p99(…)`,
//!   `p999(…)`, `max(…)`, `mean(…)`, compared with a duration (`250ms`, `1.5s`, `2m`, or plain
//!   milliseconds);
//! - a counter (`expired_sessions`, `lost_sms`, `gave_up`, …), compared with a number;
//! - `rate(COUNTER)`: the counter divided by users arrived, compared with a number;
//! - `verified_per_capacity`: users verified per SMS the carriers could have accepted, compared
//!   with a number (no capacity breaks the threshold).
//!
//! `OP` is one of `<`, `<=`, `>`, `>=`, `==`, `!=`.

use std::fmt;

use crate::rehearsal::measure::{Count, Series};
use crate::rehearsal::report::{Report, Verdict};

/// A parsed threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub text: String,
    subject: Subject,
    op: Op,
    /// Milliseconds for latency subjects, a plain number otherwise.
    value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Subject {
    Latency(Stat, Series),
    Count(Count),
    Rate(Count),
    VerifiedPerCapacity,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stat {
    Quantile(f64),
    Max,
    Mean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// A threshold that does not parse, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("threshold {text:?}: {message}")]
pub struct ThresholdError {
    pub text: String,
    pub message: String,
}

impl std::str::FromStr for Threshold {
    type Err = ThresholdError;

    fn from_str(text: &str) -> Result<Threshold, ThresholdError> {
        let fail = |message: &str| ThresholdError {
            text: text.to_owned(),
            message: message.to_owned(),
        };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (position, op, width) = ["<=", ">=", "==", "!=", "<", ">"]
            .iter()
            .filter_map(|op| compact.find(op).map(|at| (at, *op)))
            .min_by_key(|(at, op)| (*at, std::cmp::Reverse(op.len())))
            .map(|(at, op)| (at, op, op.len()))
            .ok_or_else(|| fail("no comparison (<, <=, >, >=, ==, !=)"))?;
        let (left, right) = (&compact[..position], &compact[position + width..]);
        let op = match op {
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "==" => Op::Eq,
            _ => Op::Ne,
        };
        let subject = if let Some((function, argument)) = left
            .strip_suffix(')')
            .and_then(|inner| inner.split_once('('))
        {
            if function == "rate" {
                let count = Count::from_name(argument)
                    .ok_or_else(|| fail(&format!("unknown counter {argument:?}")))?;
                Subject::Rate(count)
            } else {
                let series = Series::from_name(argument).ok_or_else(|| {
                    fail(&format!(
                        "unknown series {argument:?}; expected one of {}",
                        Series::ALL.map(Series::name).join(", ")
                    ))
                })?;
                let stat = match function {
                    "max" => Stat::Max,
                    "mean" | "avg" => Stat::Mean,
                    _ => {
                        let digits = function
                            .strip_prefix('p')
                            .ok_or_else(|| fail(&format!("unknown statistic {function:?}")))?;
                        // p5 → 0.05, p50 → 0.5, p99 → 0.99; p999 → 0.999, p9999 → 0.9999.
                        let quantile = quantile_of(digits)
                            .ok_or_else(|| fail(&format!("unknown statistic {function:?}")))?;
                        Stat::Quantile(quantile)
                    }
                };
                Subject::Latency(stat, series)
            }
        } else if left == "verified_per_capacity" {
            Subject::VerifiedPerCapacity
        } else {
            let count = Count::from_name(left).ok_or_else(|| {
                fail(&format!(
                    "unknown counter {left:?}; expected one of {}",
                    Count::ALL.map(Count::name).join(", ")
                ))
            })?;
            Subject::Count(count)
        };
        let value = match subject {
            Subject::Latency(..) => parse_millis(right)
                .ok_or_else(|| fail("the value must be a duration like 50ms, 1.5s or 2m"))?,
            Subject::Count(_) | Subject::Rate(_) | Subject::VerifiedPerCapacity => right
                .parse::<f64>()
                .ok()
                .filter(|value| value.is_finite())
                .ok_or_else(|| fail("the value must be a number"))?,
        };
        Ok(Threshold {
            text: text.to_owned(),
            subject,
            op,
            value,
        })
    }
}

/// The quantile a `pNN` statistic names: one or two digits are a percentage, longer runs of
/// nines are 99.9%, 99.99%… (`p100` and `p0` name nothing useful).
fn quantile_of(digits: &str) -> Option<f64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let quantile = if digits.len() <= 2 {
        digits.parse::<f64>().ok()? / 100.0
    } else if digits.starts_with("99") {
        format!("0.{digits}").parse::<f64>().ok()?
    } else {
        return None;
    };
    (quantile > 0.0 && quantile < 1.0).then_some(quantile)
}

/// `50ms`, `1.5s`, `2m`, `1h`, `250us` or `250µs`, or plain milliseconds.
fn parse_millis(text: &str) -> Option<f64> {
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "ms"),
    };
    let number: f64 = number.parse().ok().filter(|n: &f64| n.is_finite())?;
    let factor = match unit {
        "us" | "µs" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(number * factor)
}

impl Threshold {
    /// Evaluates the threshold against a report.
    pub fn evaluate(&self, report: &Report) -> Verdict {
        // A latency threshold on a series with no samples proves nothing: it is broken, not met
        // (`max(time_to_verified)<1s` must not pass a run in which nobody was verified).
        if let Subject::Latency(_, series) = self.subject {
            if report.latency(series).count == 0 {
                return Verdict {
                    threshold: self.text.clone(),
                    value: None,
                    passed: false,
                };
            }
        }
        let value = match self.subject {
            Subject::VerifiedPerCapacity => match report.verified_per_capacity {
                Some(share) => share,
                None => {
                    return Verdict {
                        threshold: self.text.clone(),
                        value: None,
                        passed: false,
                    };
                }
            },
            Subject::Latency(stat, series) => {
                let summary = report.latency(series);
                match stat {
                    Stat::Max => summary.max_ms,
                    Stat::Mean => summary.mean_ms,
                    Stat::Quantile(q) => report.quantile_ms(series, q),
                }
            }
            Subject::Count(count) => report.count(count) as f64,
            Subject::Rate(count) => {
                let arrived = report.count(Count::Arrived).max(1);
                report.count(count) as f64 / arrived as f64
            }
        };
        let passed = match self.op {
            Op::Lt => value < self.value,
            Op::Le => value <= self.value,
            Op::Gt => value > self.value,
            Op::Ge => value >= self.value,
            Op::Eq => value == self.value,
            Op::Ne => value != self.value,
        };
        Verdict {
            threshold: self.text.clone(),
            value: Some(value),
            passed,
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_docs_promise() {
        let t: Threshold = "p99(check)<50ms".parse().unwrap();
        assert_eq!(
            t.subject,
            Subject::Latency(Stat::Quantile(0.99), Series::Check)
        );
        assert_eq!((t.op, t.value), (Op::Lt, 50.0));
        let t: Threshold = "expired_sessions == 0".parse().unwrap();
        assert_eq!(
            (t.subject, t.op, t.value),
            (Subject::Count(Count::ExpiredSessions), Op::Eq, 0.0)
        );
        let t: Threshold = "p999(time_to_sms)<=1.5s".parse().unwrap();
        assert_eq!(
            t.subject,
            Subject::Latency(Stat::Quantile(0.999), Series::TimeToSms)
        );
        assert_eq!((t.op, t.value), (Op::Le, 1500.0));
        let t: Threshold = "rate(verified)>=0.9".parse().unwrap();
        assert_eq!((t.subject, t.op), (Subject::Rate(Count::Verified), Op::Ge));
        let t: Threshold = "max(start)<2m".parse().unwrap();
        assert_eq!(t.value, 120_000.0);
    }

    #[test]
    fn percentiles_and_units() {
        let quantile = |text: &str| match text.parse::<Threshold>().unwrap().subject {
            Subject::Latency(Stat::Quantile(q), _) => q,
            other => panic!("{other:?}"),
        };
        assert_eq!(quantile("p5(start)<1s"), 0.05);
        assert_eq!(quantile("p50(start)<1s"), 0.5);
        assert_eq!(quantile("p9999(start)<1s"), 0.9999);
        assert!("p100(start)<1s".parse::<Threshold>().is_err());
        assert!("p0(start)<1s".parse::<Threshold>().is_err());
        assert_eq!("p99(start)<250µs".parse::<Threshold>().unwrap().value, 0.25);
        assert_eq!("p99(start)<250us".parse::<Threshold>().unwrap().value, 0.25);
    }

    #[test]
    fn refuses_nonsense_with_a_reason() {
        for (text, reason) in [
            ("p99(check)", "no comparison"),
            ("p99(chek)<5ms", "unknown series"),
            ("q99(check)<5ms", "unknown statistic"),
            ("p99(check)<fast", "duration"),
            ("expired<1", "unknown counter"),
            ("lost_sms<=few", "number"),
        ] {
            let error = text.parse::<Threshold>().unwrap_err();
            assert!(error.message.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn a_latency_threshold_on_no_samples_is_broken() {
        let mut report = Report {
            schema_version: crate::rehearsal::report::SCHEMA_VERSION,
            loadgen_version: String::new(),
            scenario: crate::rehearsal::report::ScenarioInfo {
                name: "empty".to_owned(),
                seed: 0,
                time_compression: 1.0,
                duration_secs: 1.0,
                scheduled_arrivals: 0,
            },
            target: "in-process".to_owned(),
            started_at: String::new(),
            elapsed_secs: 1.0,
            shards: vec![0],
            shard_count: 1,
            counts: Default::default(),
            marks: Vec::new(),
            rejections: Vec::new(),
            latency: Default::default(),
            histograms: Default::default(),
            carriers: Vec::new(),
            sms_capacity: 0.0,
            verified_per_capacity: None,
            handsets: Default::default(),
            gateway: None,
            timeline: Vec::new(),
            self_watch: Default::default(),
            thresholds: Vec::new(),
            result: String::new(),
        };
        report.fill_from(
            &crate::rehearsal::measure::Measurements::new(std::time::Instant::now()).snapshot(),
        );
        let verdict = "max(time_to_verified)<1s"
            .parse::<Threshold>()
            .unwrap()
            .evaluate(&report);
        assert_eq!((verdict.value, verdict.passed), (None, false));
        let verdict = "verified==0"
            .parse::<Threshold>()
            .unwrap()
            .evaluate(&report);
        assert_eq!((verdict.value, verdict.passed), (Some(0.0), true));
        // Without capacity, a share of it proves nothing either.
        let verdict = "verified_per_capacity>=0"
            .parse::<Threshold>()
            .unwrap()
            .evaluate(&report);
        assert_eq!((verdict.value, verdict.passed), (None, false));
        report.counts.insert("verified".to_owned(), 300);
        report.counts.insert("arrived".to_owned(), 1000);
        report.counts.insert("sms_to_absent".to_owned(), 20);
        report.set_capacity(1000.0);
        for (text, value, passed) in [
            ("verified_per_capacity>=0.25", 0.3, true),
            ("verified_per_capacity>0.5", 0.3, false),
            ("sms_to_absent<100", 20.0, true),
            ("rate(sms_to_absent)<0.01", 0.02, false),
            ("refused_at_start==0", 0.0, true),
        ] {
            let verdict = text.parse::<Threshold>().unwrap().evaluate(&report);
            assert_eq!(
                (verdict.value, verdict.passed),
                (Some(value), passed),
                "{text}"
            );
        }
    }
}

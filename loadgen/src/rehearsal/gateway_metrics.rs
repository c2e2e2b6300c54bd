//! What the gateway itself says about a run, read from its Prometheus `/metrics` at the end:
//! how far sessions were stretched while SMS waited, starts it refused, jobs it dropped, and
//! how verifications ended. The users see the lag; this says what the gateway did about it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The gateway's side of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayReport {
    /// First SMS accepted, each with the session extension the gateway granted then.
    pub session_extensions: u64,
    pub session_extension_mean_secs: f64,
    /// Upper bounds of the histogram buckets holding the 50th and 99th percentiles.
    pub session_extension_p50_secs: f64,
    pub session_extension_p99_secs: f64,
    /// Starts refused at the queue, by reason (`full`, `predicted_wait`).
    pub queue_rejected: BTreeMap<String, u64>,
    /// Jobs dropped unsent, by reason (`expired`, `canceled`).
    pub queue_dropped: BTreeMap<String, u64>,
    /// Verifications ended, by outcome.
    pub verifications_ended: BTreeMap<String, u64>,
    /// Submits carriers answered "throttled".
    pub throttled_submits: u64,
    /// SMS the gateway sent again through another carrier because the `delivered` receipt did
    /// not come in time (`otpgate_carrier_rerouted_total`, all carriers), apart from the
    /// resends users pressed.
    #[serde(default)]
    pub rerouted_sms: u64,
    /// Receipts the gateway waited for in vain (`otpgate_carrier_receipts_missing_total`).
    #[serde(default)]
    pub receipts_missing: u64,
}

/// Reads the figures from the Prometheus text exposition; `None` if it holds no otpgate series.
pub fn from_exposition(text: &str) -> Option<GatewayReport> {
    let mut report = GatewayReport::default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let mut extension_sum = 0.0;
    let mut seen = false;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let count = value.max(0.0) as u64;
        match name {
            "otpgate_session_extension_seconds_bucket" => {
                let upper = label(labels, "le").and_then(|le| le.parse::<f64>().ok());
                if let Some(upper) = upper {
                    buckets.push((upper, value));
                }
            }
            "otpgate_session_extension_seconds_count" => report.session_extensions = count,
            "otpgate_session_extension_seconds_sum" => extension_sum = value,
            "otpgate_queue_rejected_total" => {
                add(&mut report.queue_rejected, label(labels, "reason"), count);
            }
            "otpgate_queue_dropped_total" => {
                add(&mut report.queue_dropped, label(labels, "reason"), count);
            }
            "otpgate_verifications_ended_total" => {
                add(
                    &mut report.verifications_ended,
                    label(labels, "outcome"),
                    count,
                );
            }
            "otpgate_sms_submitted_total" if label(labels, "outcome") == Some("throttled") => {
                report.throttled_submits += count;
            }
            // Labelled by the carrier whose receipt was missing.
            "otpgate_carrier_rerouted_total" => report.rerouted_sms += count,
            "otpgate_carrier_receipts_missing_total" => report.receipts_missing += count,
            _ => {}
        }
        seen |= name.starts_with("otpgate_");
    }
    if !seen {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = report.session_extensions as f64;
    if total > 0.0 {
        report.session_extension_mean_secs = extension_sum / total;
        let at = |quantile: f64| {
            buckets
                .iter()
                .find(|(_, cumulative)| *cumulative >= quantile * total)
                .map_or(0.0, |(upper, _)| *upper)
        };
        report.session_extension_p50_secs = at(0.5);
        report.session_extension_p99_secs = at(0.99);
    }
    Some(report)
}

fn add(map: &mut BTreeMap<String, u64>, key: Option<&str>, count: u64) {
    if let Some(key) = key {
        *map.entry(key.to_owned()).or_default() += count;
    }
}

/// The value of label `key` in `a="x",b="y"` (values without escapes, as the gateway's are).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.trim_end_matches('}').split(',').find_map(|pair| {
        pair.strip_prefix(key)?
            .strip_prefix("=\"")?
            .strip_suffix('"')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_gateway_exports() {
        let text = r#"# HELP otpgate_session_extension_seconds How far …
otpgate_session_extension_seconds_bucket{le="1"} 60
otpgate_session_extension_seconds_bucket{le="60"} 90
otpgate_session_extension_seconds_bucket{le="900"} 100
otpgate_session_extension_seconds_bucket{le="+Inf"} 100
otpgate_session_extension_seconds_sum 2500
otpgate_session_extension_seconds_count 100
otpgate_queue_rejected_total{reason="predicted_wait"} 7
otpgate_queue_rejected_total{reason="full"} 0
otpgate_verifications_ended_total{outcome="expired"} 3
otpgate_sms_submitted_total{carrier="a",outcome="throttled"} 5
otpgate_sms_submitted_total{carrier="b",outcome="throttled"} 6
otpgate_sms_submitted_total{carrier="b",outcome="accepted"} 600
# TYPE otpgate_carrier_rerouted_total counter
otpgate_carrier_rerouted_total{carrier="a"} 40
otpgate_carrier_rerouted_total{carrier="b"} 2
otpgate_carrier_receipts_missing_total{carrier="a"} 45
otpgate_carrier_receipts_missing_total{carrier="b"} 3
otpgate_carrier_rerouted_totals{carrier="a"} 1000
"#;
        let report = from_exposition(text).unwrap();
        assert_eq!(report.session_extensions, 100);
        assert_eq!(report.session_extension_mean_secs, 25.0);
        assert_eq!(report.session_extension_p50_secs, 1.0);
        assert_eq!(report.session_extension_p99_secs, 900.0);
        assert_eq!(report.queue_rejected["predicted_wait"], 7);
        assert_eq!(report.verifications_ended["expired"], 3);
        assert_eq!(report.throttled_submits, 11);
        assert_eq!(report.rerouted_sms, 42);
        assert_eq!(report.receipts_missing, 48);
        assert_eq!(from_exposition("no metrics here"), None);
        // A gateway without the counters: zero, not absent.
        let before = from_exposition("otpgate_queue_rejected_total{reason=\"full\"} 1\n").unwrap();
        assert_eq!((before.rerouted_sms, before.receipts_missing), (0, 0));
    }
}

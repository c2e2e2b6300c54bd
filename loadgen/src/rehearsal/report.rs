//! The run's report: a summary table for people, and a JSON document for machines whose schema
//! is versioned and documented in `loadgen/report.schema.json`.
//!
//! A report carries every latency histogram in full (HDR, V2 serialization, base64), so
//! `loadgen merge` can combine the reports of several shards by adding histograms, never by
//! averaging percentiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::rehearsal::measure::{Count, Second, Series, Snapshot, new_histogram};

/// The version of the report's JSON schema; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// A run's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub schema_version: u32,
    pub loadgen_version: String,
    pub scenario: ScenarioInfo,
    /// `in-process` or the gateway's URL.
    pub target: String,
    pub started_at: String,
    pub elapsed_secs: f64,
    /// The shards of the run this report covers, by index (one for a single process).
    pub shards: Vec<u64>,
    /// How many shards the run was split into (`--shard INDEX/COUNT`).
    pub shard_count: u64,
    pub counts: BTreeMap<String, u64>,
    /// Completed sign-ups (users verified) by the scenario's `[[marks]]`, in their order.
    #[serde(default)]
    pub marks: Vec<MarkReport>,
    /// Answers other than the expected one.
    pub rejections: Vec<Rejection>,
    /// Summaries of every series, by name.
    pub latency: BTreeMap<String, LatencySummary>,
    /// Every series as an HDR histogram (V2 serialization, base64), for merging.
    pub histograms: BTreeMap<String, String>,
    pub carriers: Vec<CarrierReport>,
    /// SMS the carriers could have accepted over the scenario's duration: each carrier's
    /// capacity per second integrated over it, following its timeline (none while down).
    #[serde(default)]
    pub sms_capacity: f64,
    /// Users verified per SMS of `sms_capacity`: how much of what the carriers could send
    /// became sign-ups. `None` without capacity.
    #[serde(default)]
    pub verified_per_capacity: Option<f64>,
    pub handsets: HandsetReport,
    /// What the gateway's own metrics said at the end of the run: session extensions, refused
    /// starts, dropped jobs. `null` when they were not read (`--target` without
    /// `--gateway-admin`).
    pub gateway: Option<crate::rehearsal::gateway_metrics::GatewayReport>,
    pub timeline: Vec<Second>,
    pub self_watch: SelfWatch,
    pub thresholds: Vec<Verdict>,
    /// `passed`, `thresholds_broken` or `invalid`.
    pub result: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioInfo {
    pub name: String,
    pub seed: u64,
    pub time_compression: f64,
    /// Real seconds over which arrivals were scheduled.
    pub duration_secs: f64,
    /// Arrivals scheduled for this report's shards.
    pub scheduled_arrivals: u64,
}

/// Users verified by a moment of the scenario.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MarkReport {
    pub label: String,
    /// Scenario seconds from the start.
    pub at_secs: f64,
    /// Users verified before it.
    pub verified: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    pub call: String,
    pub status: u16,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CarrierReport {
    pub name: String,
    pub accepted: u64,
    pub throttled: u64,
    pub failed: u64,
    pub refused: u64,
    /// Connections dropped while the carrier was down.
    pub dropped: u64,
    pub receipts_sent: u64,
    pub receipts_failed: u64,
    /// Receipts the carrier never sent on purpose (`receipt_loss`).
    #[serde(default)]
    pub receipts_withheld: u64,
    /// Accepted, and drawn undeliverable (`undeliverable_rate`).
    #[serde(default)]
    pub undeliverable: u64,
    /// What an SMPP carrier (a simulated SMSC) saw besides submits' answers; absent for HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smpp: Option<SmppReport>,
}

/// An SMSC's own counts (see `carriers::SmppCounts`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SmppReport {
    pub binds: u64,
    pub binds_refused: u64,
    pub submit_sm: u64,
    pub parts: u64,
    pub messages: u64,
    pub duplicates: u64,
    pub incomplete: u64,
    pub decode_errors: u64,
    pub deliver_sm: u64,
    pub receipts_nacked: u64,
    pub receipts_lost: u64,
}

impl SmppReport {
    fn add(&mut self, other: &SmppReport) {
        self.binds += other.binds;
        self.binds_refused += other.binds_refused;
        self.submit_sm += other.submit_sm;
        self.parts += other.parts;
        self.messages += other.messages;
        self.duplicates += other.duplicates;
        self.incomplete += other.incomplete;
        self.decode_errors += other.decode_errors;
        self.deliver_sm += other.deliver_sm;
        self.receipts_nacked += other.receipts_nacked;
        self.receipts_lost += other.receipts_lost;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HandsetReport {
    pub received: u64,
    pub lost_on_purpose: u64,
    pub duplicated_on_purpose: u64,
    pub to_absent_users: u64,
    /// SMS to numbers that belong to no user of the scenario.
    pub to_strangers: u64,
}

/// Whether the load generator itself kept up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelfWatch {
    pub valid: bool,
    /// Why the run is invalid, if it is.
    pub problems: Vec<String>,
    pub scheduler_lag_p99_ms: f64,
    pub scheduler_lag_max_ms: f64,
    /// Requests that waited for a free connection of the pool.
    pub waited_for_connection: u64,
    pub peak_rss_bytes: u64,
    pub peak_cpu: f64,
    pub peak_in_flight: u64,
    /// Whether a gateway ran in the same process (its CPU and memory are in the figures).
    pub gateway_in_process: bool,
}

/// A threshold evaluated against a report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    pub threshold: String,
    /// The measured value (milliseconds for latencies); `None` for a latency series with no
    /// samples, which breaks the threshold.
    pub value: Option<f64>,
    pub passed: bool,
}

impl Report {
    /// The counters, histograms and timeline of a run.
    pub fn fill_from(&mut self, snapshot: &Snapshot) {
        for count in Count::ALL {
            self.counts
                .insert(count.name().to_owned(), snapshot.counts[count as usize]);
        }
        self.rejections = snapshot
            .statuses
            .iter()
            .map(|&(call, status, count)| Rejection {
                call: call.to_owned(),
                status,
                count,
            })
            .collect();
        for series in Series::ALL {
            let histogram = &snapshot.histograms[series as usize];
            self.latency
                .insert(series.name().to_owned(), summarize(histogram));
            self.histograms
                .insert(series.name().to_owned(), encode(histogram));
        }
        self.timeline = snapshot.timeline.clone();
    }

    /// Sets the carriers' capacity over the run, and the users verified per SMS of it.
    pub fn set_capacity(&mut self, sms_capacity: f64) {
        self.sms_capacity = sms_capacity;
        self.verified_per_capacity =
            (sms_capacity > 0.0).then(|| self.count(Count::Verified) as f64 / sms_capacity);
    }

    pub fn count(&self, count: Count) -> u64 {
        self.counts.get(count.name()).copied().unwrap_or(0)
    }

    pub fn latency(&self, series: Series) -> LatencySummary {
        self.latency.get(series.name()).cloned().unwrap_or_default()
    }

    /// Any quantile of a series, from its full histogram.
    pub fn quantile_ms(&self, series: Series, quantile: f64) -> f64 {
        match self.histogram(series) {
            Some(histogram) if !histogram.is_empty() => {
                histogram.value_at_quantile(quantile) as f64 / 1000.0
            }
            _ => 0.0,
        }
    }

    pub fn histogram(&self, series: Series) -> Option<Histogram<u64>> {
        decode(self.histograms.get(series.name())?)
    }

    /// The table printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nscenario {} (seed {}, time compression {}x), target {}, {:.1} s{}",
            self.scenario.name,
            self.scenario.seed,
            self.scenario.time_compression,
            self.target,
            self.elapsed_secs,
            if self.shards.len() > 1 {
                format!(", {} shards merged", self.shards.len())
            } else if self.shard_count > 1 {
                format!(
                    ", shard {} of {}",
                    self.shards.first().copied().unwrap_or(0),
                    self.shard_count
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "\n{:<18} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for series in Series::ALL {
            let s = self.latency(series);
            let _ = writeln!(
                out,
                "{:<18} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
                series.name(),
                s.count,
                millis(s.p50_ms),
                millis(s.p90_ms),
                millis(s.p99_ms),
                millis(s.p999_ms),
                millis(s.max_ms)
            );
        }
        let _ = writeln!(out, "\n{:<18} {:>9}", "users and SMS", "count");
        for count in Count::ALL {
            let _ = writeln!(out, "{:<18} {:>9}", count.name(), self.count(count));
        }
        let _ = writeln!(
            out,
            "{:<18} {:>9}  ({} verified of {:.0} SMS the carriers could accept)",
            "verified/capacity",
            self.verified_per_capacity
                .map_or_else(|| "-".to_owned(), |share| format!("{share:.3}")),
            self.count(Count::Verified),
            self.sms_capacity,
        );
        if !self.marks.is_empty() {
            let _ = writeln!(out, "\n{:<18} {:>9}", "verified by", "users");
            for mark in &self.marks {
                let _ = writeln!(
                    out,
                    "{:<18} {:>9}",
                    format!("{} ({} s)", mark.label, mark.at_secs),
                    mark.verified
                );
            }
        }
        if !self.rejections.is_empty() {
            let _ = writeln!(out, "\n{:<18} {:>9}", "unexpected answers", "count");
            for rejection in &self.rejections {
                let _ = writeln!(
                    out,
                    "{:<18} {:>9}",
                    format!("{} {}", rejection.call, rejection.status),
                    rejection.count
                );
            }
        }
        let _ = writeln!(
            out,
            "\n{:<12} {:>9} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9}",
            "carrier",
            "accepted",
            "throttled",
            "failed",
            "refused",
            "dropped",
            "receipts",
            "withheld"
        );
        for carrier in &self.carriers {
            let _ = writeln!(
                out,
                "{:<12} {:>9} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9}",
                carrier.name,
                carrier.accepted,
                carrier.throttled,
                carrier.failed,
                carrier.refused,
                carrier.dropped,
                carrier.receipts_sent,
                carrier.receipts_withheld
            );
        }
        if let Some(gateway) = &self.gateway {
            let _ = writeln!(
                out,
                "\ngateway: {} first SMS accepted, each session extended by the time its SMS waited (mean {:.1} s, p50 <= {} s, p99 <= {} s); starts refused {:?}; jobs dropped {:?}; verifications ended {:?}; {} throttled submits; {} receipts missing, {} SMS rerouted (apart from user resends)",
                gateway.session_extensions,
                gateway.session_extension_mean_secs,
                gateway.session_extension_p50_secs,
                gateway.session_extension_p99_secs,
                gateway.queue_rejected,
                gateway.queue_dropped,
                gateway.verifications_ended,
                gateway.throttled_submits,
                gateway.receipts_missing,
                gateway.rerouted_sms,
            );
        }
        let watch = &self.self_watch;
        let _ = writeln!(
            out,
            "\nload generator: scheduler lag p99 {}, max {}; peak {} users in flight; peak RSS {:.0} MiB{}; peak CPU {:.0}% of a core; {} requests waited for a connection",
            millis(watch.scheduler_lag_p99_ms),
            millis(watch.scheduler_lag_max_ms),
            watch.peak_in_flight,
            watch.peak_rss_bytes as f64 / 1_048_576.0,
            if watch.gateway_in_process {
                " (gateway included)"
            } else {
                ""
            },
            watch.peak_cpu * 100.0,
            watch.waited_for_connection,
        );
        for problem in &watch.problems {
            let _ = writeln!(out, "INVALID RUN: {problem}");
        }
        for verdict in &self.thresholds {
            let _ = writeln!(
                out,
                "threshold {:<32} {:>12}  {}",
                verdict.threshold,
                verdict
                    .value
                    .map_or_else(|| "no data".to_owned(), |value| format!("{value:.3}")),
                if verdict.passed { "ok" } else { "BROKEN" }
            );
        }
        let _ = writeln!(out, "result: {}", self.result);
        out
    }
}

fn millis(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        format!("{ms:.1}ms")
    }
}

/// The summary of a histogram of microseconds, in milliseconds.
pub fn summarize(histogram: &Histogram<u64>) -> LatencySummary {
    if histogram.is_empty() {
        return LatencySummary::default();
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    LatencySummary {
        count: histogram.len(),
        min_ms: ms(histogram.min()),
        mean_ms: histogram.mean() / 1000.0,
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p90_ms: ms(histogram.value_at_quantile(0.9)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        p999_ms: ms(histogram.value_at_quantile(0.999)),
        max_ms: ms(histogram.max()),
    }
}

pub fn encode(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    if V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .is_err()
    {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .ok()
}

/// Why reports cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("no reports to merge")]
    Empty,
    #[error("report {index}: schema version {found}, expected {SCHEMA_VERSION}")]
    Version { index: usize, found: u32 },
    #[error("report {index}: scenario {found:?} (seed {seed}) differs from {expected:?}")]
    Scenario {
        index: usize,
        found: String,
        seed: u64,
        expected: String,
    },
    #[error("report {index}: its marks differ from the first report's")]
    Marks { index: usize },
    #[error("report {index}: histogram {series} is unreadable")]
    Histogram { index: usize, series: String },
    #[error("report {index}: a run split in {found} shards, not {expected}")]
    ShardCount {
        index: usize,
        found: u64,
        expected: u64,
    },
    #[error("report {index}: shard {shard} is in another report already")]
    DuplicateShard { index: usize, shard: u64 },
    #[error("shards {missing:?} of {count} are missing: merge every shard's report")]
    MissingShards { missing: Vec<u64>, count: u64 },
}

/// The larger of two per-second percentiles: they cannot be merged from summaries.
fn worst(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Combines shard reports of one run: counters and timelines add up, histograms are merged.
/// Thresholds and the result are left for the caller to evaluate again.
pub fn merge(reports: &[Report]) -> Result<Report, MergeError> {
    let first = reports.first().ok_or(MergeError::Empty)?;
    let mut merged = first.clone();
    merged.shards = Vec::new();
    merged.counts.clear();
    merged.marks = first
        .marks
        .iter()
        .map(|mark| MarkReport {
            verified: 0,
            ..mark.clone()
        })
        .collect();
    merged.rejections.clear();
    merged.carriers.clear();
    merged.timeline.clear();
    merged.handsets = HandsetReport::default();
    merged.gateway = None;
    merged.thresholds.clear();
    merged.scenario.scheduled_arrivals = 0;
    merged.sms_capacity = 0.0;
    merged.elapsed_secs = 0.0;
    merged.self_watch = SelfWatch {
        valid: true,
        gateway_in_process: first.self_watch.gateway_in_process,
        ..SelfWatch::default()
    };
    let mut histograms: BTreeMap<String, Histogram<u64>> = Series::ALL
        .iter()
        .map(|series| (series.name().to_owned(), new_histogram()))
        .collect();
    let mut rejections: BTreeMap<(String, u16), u64> = BTreeMap::new();
    let mut carriers: BTreeMap<String, CarrierReport> = BTreeMap::new();
    for (index, report) in reports.iter().enumerate() {
        if report.schema_version != SCHEMA_VERSION {
            return Err(MergeError::Version {
                index,
                found: report.schema_version,
            });
        }
        if report.scenario.name != first.scenario.name
            || report.scenario.seed != first.scenario.seed
        {
            return Err(MergeError::Scenario {
                index,
                found: report.scenario.name.clone(),
                seed: report.scenario.seed,
                expected: first.scenario.name.clone(),
            });
        }
        if report.shard_count != first.shard_count {
            return Err(MergeError::ShardCount {
                index,
                found: report.shard_count,
                expected: first.shard_count,
            });
        }
        for &shard in &report.shards {
            if merged.shards.contains(&shard) {
                return Err(MergeError::DuplicateShard { index, shard });
            }
            merged.shards.push(shard);
        }
        merged.scenario.scheduled_arrivals += report.scenario.scheduled_arrivals;
        // Each shard runs carriers of its own.
        merged.sms_capacity += report.sms_capacity;
        merged.elapsed_secs = merged.elapsed_secs.max(report.elapsed_secs);
        for (name, value) in &report.counts {
            *merged.counts.entry(name.clone()).or_default() += value;
        }
        let same_marks = report.marks.len() == merged.marks.len()
            && report
                .marks
                .iter()
                .zip(&merged.marks)
                .all(|(mark, kept)| mark.label == kept.label && mark.at_secs == kept.at_secs);
        if !same_marks {
            return Err(MergeError::Marks { index });
        }
        for (mark, total) in report.marks.iter().zip(merged.marks.iter_mut()) {
            total.verified += mark.verified;
        }
        for rejection in &report.rejections {
            *rejections
                .entry((rejection.call.clone(), rejection.status))
                .or_default() += rejection.count;
        }
        for (name, text) in &report.histograms {
            let histogram = decode(text).ok_or_else(|| MergeError::Histogram {
                index,
                series: name.clone(),
            })?;
            let target = histograms.entry(name.clone()).or_insert_with(new_histogram);
            target.add(&histogram).map_err(|_| MergeError::Histogram {
                index,
                series: name.clone(),
            })?;
        }
        for carrier in &report.carriers {
            let total = carriers
                .entry(carrier.name.clone())
                .or_insert_with(|| CarrierReport {
                    name: carrier.name.clone(),
                    ..CarrierReport::default()
                });
            total.accepted += carrier.accepted;
            total.throttled += carrier.throttled;
            total.failed += carrier.failed;
            total.refused += carrier.refused;
            total.dropped += carrier.dropped;
            total.receipts_sent += carrier.receipts_sent;
            total.receipts_failed += carrier.receipts_failed;
            total.receipts_withheld += carrier.receipts_withheld;
            total.undeliverable += carrier.undeliverable;
            if let Some(smpp) = &carrier.smpp {
                total.smpp.get_or_insert_with(SmppReport::default).add(smpp);
            }
        }
        let h = &report.handsets;
        merged.handsets.received += h.received;
        merged.handsets.lost_on_purpose += h.lost_on_purpose;
        merged.handsets.duplicated_on_purpose += h.duplicated_on_purpose;
        merged.handsets.to_absent_users += h.to_absent_users;
        merged.handsets.to_strangers += h.to_strangers;
        for second in &report.timeline {
            let index = second.second as usize;
            if merged.timeline.len() <= index {
                merged.timeline.resize_with(index + 1, Second::default);
            }
            let total = &mut merged.timeline[index];
            total.second = second.second;
            total.scheduled += second.scheduled;
            total.arrived += second.arrived;
            total.requests += second.requests;
            total.errors += second.errors;
            total.sms += second.sms;
            total.verified += second.verified;
            total.in_flight += second.in_flight;
            // Per-second percentiles cannot be merged from summaries: keep the worst shard's.
            total.start_p99_ms = worst(total.start_p99_ms, second.start_p99_ms);
            total.time_to_sms_p99_ms = worst(total.time_to_sms_p99_ms, second.time_to_sms_p99_ms);
            total.cpu += second.cpu;
            total.rss_bytes += second.rss_bytes;
        }
        // Shards of one run read the same gateway: keep the latest reading, never a sum.
        if let Some(gateway) = &report.gateway {
            let later = merged
                .gateway
                .as_ref()
                .is_none_or(|kept| gateway.session_extensions >= kept.session_extensions);
            if later {
                merged.gateway = Some(gateway.clone());
            }
        }
        let watch = &report.self_watch;
        merged.self_watch.valid &= watch.valid;
        merged.self_watch.problems.extend(
            watch
                .problems
                .iter()
                .map(|problem| format!("shard {index}: {problem}")),
        );
        merged.self_watch.scheduler_lag_max_ms = merged
            .self_watch
            .scheduler_lag_max_ms
            .max(watch.scheduler_lag_max_ms);
        merged.self_watch.waited_for_connection += watch.waited_for_connection;
        merged.self_watch.peak_rss_bytes =
            merged.self_watch.peak_rss_bytes.max(watch.peak_rss_bytes);
        merged.self_watch.peak_cpu = merged.self_watch.peak_cpu.max(watch.peak_cpu);
        merged.self_watch.peak_in_flight += watch.peak_in_flight;
    }
    for (name, histogram) in &histograms {
        merged.latency.insert(name.clone(), summarize(histogram));
        merged.histograms.insert(name.clone(), encode(histogram));
    }
    if let Some(lag) = histograms.get(Series::SchedulerLag.name()) {
        merged.self_watch.scheduler_lag_p99_ms = summarize(lag).p99_ms;
    }
    merged.rejections = rejections
        .into_iter()
        .map(|((call, status), count)| Rejection {
            call,
            status,
            count,
        })
        .collect();
    merged.carriers = carriers.into_values().collect();
    merged.set_capacity(merged.sms_capacity);
    merged.shards.sort_unstable();
    let missing: Vec<u64> = (0..merged.shard_count)
        .filter(|shard| !merged.shards.contains(shard))
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::MissingShards {
            missing,
            count: merged.shard_count,
        });
    }
    Ok(merged)
}

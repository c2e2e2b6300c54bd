//! The command-line flags of the `loadgen` binary. The benchmark tools' flags live with them in
//! [`crate::bench`], so the tools need nothing from here.
//!
//! Every flag can also be set from a `LOADGEN_*` environment variable.

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use clap::{Args, Parser, Subcommand};

use crate::bench::fill::FillArgs;
use crate::bench::server::ServerArgs;
use crate::bench::sink::SinkArgs;

/// otpgate's load generator and simulated carriers.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub struct Cli {
    /// Tokio worker threads; defaults to one per CPU core.
    #[arg(long, global = true, env = "LOADGEN_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,

    #[command(subcommand)]
    pub command: Command,
}

/// What `loadgen` does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rehearse a scenario: virtual users against a gateway, with simulated carriers and
    /// handsets.
    ///
    /// Without --target, a gateway starts in this process on the embedded back-end, wired to
    /// the simulated carriers. Exit codes: 0 passed, 1 thresholds broken, 2 bad configuration,
    /// 3 invalid run (the load generator could not keep its schedule).
    Run(RunArgs),
    /// Merge the JSON reports of the shards of one run into one report.
    ///
    /// Counters and timelines add up; latency histograms are merged, not averaged. Thresholds
    /// are judged again on the merged report; the exit codes are those of `run`.
    Merge(MergeArgs),
    /// Run a fast fake HTTP carrier that accepts every well-formed SMS and counts it.
    ///
    /// It accepts `POST <any path>` in the carrier wire format (docs/DESIGN.md section 5),
    /// serves its counters at `GET /stats` and the SMS it accepted at `GET /ids`.
    Sink(SinkArgs),
    /// Run a bare HTTP server that answers every request 202 and does no work.
    Bare(ServerArgs),
    /// Start many verifications with distinct phone numbers, as fast as the gateway takes them.
    Fill(FillArgs),
    /// Run one simulated SMSC (SMPP 3.4) on its own, for benchmarks and interop tests.
    ///
    /// It accepts binds with --system-id and --password, answers ESME_RTHROTTLED above
    /// --capacity-per-sec (counted per submit_sm), reassembles concatenated messages and sends
    /// receipts as deliver_sm. It prints `listening on ADDR` first and, when it stops (after
    /// --duration-secs, or on SIGINT or SIGTERM), one JSON line of counts: binds, submit_sm,
    /// accepted, throttled, messages, duplicates, receipts_sent, receipts_acked, decode_errors,
    /// first_submit_ms and last_message_ms (milliseconds from the first bind, null if none).
    Smsc(SmscArgs),
}

/// Flags of `loadgen run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The scenario file (TOML); see scenarios/README.md.
    pub scenario: std::path::PathBuf,

    /// Override a scenario key before validation, as KEY=VALUE: a dotted path into the scenario
    /// (`users.resend`, `carriers[0].timeline[0].delivery_delay_ms`) and a TOML value (`0.2`,
    /// `true`, `'"text"'`, `'{ min = 1, max = 2 }'`). Repeatable; applied in order.
    #[arg(
        long = "set",
        value_name = "KEY=VALUE",
        env = "LOADGEN_SET",
        value_delimiter = ';'
    )]
    pub set: Vec<crate::rehearsal::scenario::Override>,

    /// Base URL of a gateway to drive (e.g. http://127.0.0.1:8080); without it, one starts in
    /// this process. The scenario's carriers then listen on the `listen` addresses the gateway
    /// is configured with, and its clients' `api_key`s are used.
    #[arg(long, env = "LOADGEN_TARGET")]
    pub target: Option<String>,

    /// With --target: the gateway's admin listener (e.g. http://127.0.0.1:9464), whose /metrics
    /// are read at the end of the run for the report's `gateway` section (session extensions,
    /// refused starts, dropped jobs).
    #[arg(long, env = "LOADGEN_GATEWAY_ADMIN", requires = "target")]
    pub gateway_admin: Option<String>,

    /// This process's share of the run, as INDEX/COUNT (0/2 and 1/2 for two processes): it
    /// plays every COUNT-th user of the schedule, starting at INDEX.
    #[arg(long, env = "LOADGEN_SHARD", default_value = "0/1", value_parser = parse_shard)]
    pub shard: (u64, u64),

    /// Keep-alive connections to the gateway, shared by all users; overrides the scenario's
    /// `connections` (256 by default).
    #[arg(long, env = "LOADGEN_CONNECTIONS")]
    pub connections: Option<NonZeroUsize>,

    /// A local address to open connections from (repeat it: connections take them in turn).
    #[arg(long = "source-ip", env = "LOADGEN_SOURCE_IPS", value_delimiter = ',')]
    pub source_ips: Vec<std::net::IpAddr>,

    /// Time allowed for one API request.
    #[arg(long, env = "LOADGEN_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,

    /// A pass/fail threshold, e.g. 'p99(check)<50ms' or 'expired_sessions==0' (repeatable).
    #[arg(long = "threshold", env = "LOADGEN_THRESHOLDS", value_delimiter = ';')]
    pub thresholds: Vec<crate::rehearsal::threshold::Threshold>,

    /// Write the JSON report here (schema: loadgen/report.schema.json).
    #[arg(long, env = "LOADGEN_REPORT")]
    pub report: Option<std::path::PathBuf>,

    /// Draw the run (latency percentiles and throughput over time) as an SVG here.
    #[arg(long, env = "LOADGEN_PLOT")]
    pub plot: Option<std::path::PathBuf>,

    /// How to show progress.
    #[arg(long, env = "LOADGEN_PROGRESS", value_enum, default_value = "auto")]
    pub progress: crate::rehearsal::progress::Progress,

    /// Scheduler lag (99th percentile, in milliseconds) beyond which the run is invalid: the
    /// load generator, not the gateway, was the bottleneck.
    #[arg(long, env = "LOADGEN_MAX_LAG_MS", default_value_t = 100)]
    pub max_lag_ms: u64,
}

/// Flags of `loadgen merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard reports.
    #[arg(required = true)]
    pub reports: Vec<std::path::PathBuf>,

    /// Write the merged report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,

    /// Draw the merged run as an SVG here.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,

    /// Thresholds to judge on the merged report.
    #[arg(long = "threshold", value_delimiter = ';')]
    pub thresholds: Vec<crate::rehearsal::threshold::Threshold>,
}

/// `INDEX/COUNT` with INDEX < COUNT.
fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let (index, count) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not INDEX/COUNT, like 0/2"))?;
    let index: u64 = index
        .parse()
        .map_err(|_| format!("bad shard index in {text:?}"))?;
    let count: u64 = count
        .parse()
        .map_err(|_| format!("bad shard count in {text:?}"))?;
    if count == 0 || index >= count {
        return Err(format!(
            "shard {text:?}: INDEX must be below COUNT, and COUNT at least 1"
        ));
    }
    Ok((index, count))
}

/// Flags of `loadgen smsc`.
#[derive(Debug, Args)]
pub struct SmscArgs {
    /// Address to listen on; port 0 picks a free port, printed on the first line of stdout.
    #[arg(long, env = "LOADGEN_LISTEN", default_value = "127.0.0.1:2775")]
    pub listen: SocketAddr,

    /// The system_id binds must carry (at most 15 characters).
    #[arg(long, env = "LOADGEN_SYSTEM_ID")]
    pub system_id: String,

    /// The password binds must carry (at most 8 characters).
    #[arg(long, env = "LOADGEN_PASSWORD", hide_env_values = true)]
    pub password: String,

    /// submit_sm accepted per second (counted as --capacity-rule says); above it,
    /// ESME_RTHROTTLED.
    #[arg(long, env = "LOADGEN_CAPACITY_PER_SEC", default_value_t = 200.0)]
    pub capacity_per_sec: f64,

    /// How the capacity is counted: `bucket` (a token bucket holding a tenth of a second) or
    /// `sliding-second` (at most the capacity in any second, as `loadgen sink` counts it).
    #[arg(
        long,
        env = "LOADGEN_CAPACITY_RULE",
        value_enum,
        default_value = "bucket"
    )]
    pub capacity_rule: crate::carriers::CapacityRule,

    /// Every submit_sm is answered this many milliseconds after it arrived (answers overlap).
    #[arg(long, env = "LOADGEN_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// A receipt (deliver_sm) follows an accepted submit_sm that asked for one after this long.
    #[arg(long, env = "LOADGEN_RECEIPT_DELAY_MS", default_value_t = 100)]
    pub receipt_delay_ms: u64,

    /// Stop after this long.
    #[arg(long, env = "LOADGEN_DURATION_SECS", default_value_t = 600)]
    pub duration_secs: u64,

    /// GSM-7 short_messages are packed (8 septets in 7 octets).
    #[arg(long, env = "LOADGEN_GSM7_PACKED")]
    pub gsm7_packed: bool,

    /// The data_coding read as GSM-7 (0xF0-0xF3 always are).
    #[arg(long, env = "LOADGEN_GSM7_DATA_CODING", default_value_t = 0)]
    pub gsm7_data_coding: u8,

    /// The data_coding read as UCS-2.
    #[arg(long, env = "LOADGEN_UCS2_DATA_CODING", default_value_t = 8)]
    pub ucs2_data_coding: u8,

    /// Where receipts carry the message id and state.
    #[arg(
        long,
        env = "LOADGEN_RECEIPT_FORMAT",
        value_enum,
        default_value = "both"
    )]
    pub receipt_format: crate::carriers::ReceiptFormat,

    /// How receipts quote the message id: `short` (lower case, no leading zeros) or `same`.
    #[arg(long, env = "LOADGEN_RECEIPT_IDS", value_enum, default_value = "short")]
    pub receipt_ids: crate::carriers::ReceiptIds,

    /// Appends one line `UNIX_MICROS DESTINATION` to this file for every whole message, as
    /// it arrives (a message that arrives twice is listed twice), so a benchmark can tell
    /// which numbers got their SMS; the text (which holds the code) is not written.
    #[arg(long, env = "LOADGEN_MESSAGES_FILE")]
    pub messages_file: Option<std::path::PathBuf>,
}

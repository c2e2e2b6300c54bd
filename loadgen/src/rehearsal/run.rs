//! `loadgen run`: one rehearsal, from scenario file to report.
//!
//! 1. The scenario's arrivals are scheduled in advance (this shard's share of them).
//! 2. The simulated carriers start listening.
//! 3. Without `--target`, a gateway starts in this process on the embedded back-end, configured
//!    from the scenario and wired to the simulated carriers; with it, the users call that URL.
//! 4. A scheduler starts each user at its arrival time; a ticker closes each second (progress,
//!    CPU, memory); after the last arrival, journeys get the scenario's drain time to finish.
//! 5. The report is built, thresholds are judged, and the run's own validity is checked.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::carriers::{self, Network, SimCarrier};
use crate::rehearsal::api::Api;
use crate::rehearsal::connect::Connector;
use crate::rehearsal::measure::{Count, Measurements, Series};
use crate::rehearsal::progress::Progress;
use crate::rehearsal::report::{
    CarrierReport, HandsetReport, MarkReport, Report, ScenarioInfo, SelfWatch, SmppReport,
};
use crate::rehearsal::scenario::Scenario;
use crate::rehearsal::schedule;
use crate::rehearsal::threshold::Threshold;
use crate::rehearsal::user::{self, World};

/// How a run is set up, beyond its scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The gateway's base URL; `None` starts one in this process.
    pub target: Option<String>,
    /// This process's shard: `(index, count)`.
    pub shard: (u64, u64),
    /// Keep-alive connections to the gateway.
    pub connections: usize,
    /// Local addresses to spread connections over.
    pub source_ips: Vec<IpAddr>,
    pub request_timeout: Duration,
    pub thresholds: Vec<Threshold>,
    pub progress: Progress,
    /// Scheduler lag (p99) beyond which the run is marked invalid.
    pub max_scheduler_lag: Duration,
    /// The external gateway's admin listener (`http://host:port`), whose `/metrics` are read at
    /// the end of the run; the in-process gateway's is known.
    pub gateway_admin: Option<String>,
}

/// The outcome of a run, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    ThresholdsBroken,
    Invalid,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::ThresholdsBroken => "thresholds_broken",
            Verdict::Invalid => "invalid",
        }
    }

    /// The process exit code: 0 passed, 1 thresholds broken, 3 invalid run (2 is bad
    /// configuration, decided before a run starts).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Passed => 0,
            Verdict::ThresholdsBroken => 1,
            Verdict::Invalid => 3,
        }
    }
}

/// A problem found before the run starts: bad configuration (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

/// File descriptors a run needs beyond its connections: listeners, the gateway's carrier
/// connections, receipts, and some slack.
const FD_SLACK: u64 = 512;

/// Checks the open-file and port limits before the run starts.
pub fn check_limits(scenario: &Scenario, options: &RunOptions) -> Result<(), SetupError> {
    let (_, n_shards) = options.shard;
    if options.target.is_some() && n_shards > 1 && 10 % n_shards != 0 {
        return Err(SetupError(format!(
            "--shard …/{n_shards} with --target: the shards' users must own whole number \
             prefixes for the gateway to route their SMS to each shard's carriers, so the shard \
             count must divide 10 (1, 2, 5 or 10)"
        )));
    }
    let carrier_windows: u64 = scenario
        .carriers
        .iter()
        .map(|carrier| u64::from(carrier.window))
        .sum();
    let in_process = options.target.is_none();
    // Both ends of each connection are ours when the gateway runs in this process.
    let per_connection = if in_process { 2 } else { 1 };
    let needed =
        options.connections as u64 * per_connection + carrier_windows * per_connection + FD_SLACK;
    if let Some(limit) = crate::rehearsal::connect::raise_open_files_limit() {
        if needed > limit {
            return Err(SetupError(format!(
                "this run needs about {needed} open files ({} connections{}, carrier windows of {carrier_windows}) \
                 but the limit is {limit}: lower --connections or raise `ulimit -n`",
                options.connections,
                if in_process {
                    " counted at both ends, gateway in process"
                } else {
                    ""
                },
            )));
        }
    }
    if let Some(ports) = crate::rehearsal::connect::ephemeral_ports() {
        let sources = options.source_ips.len().max(1) as u64;
        if options.connections as u64 > ports * sources {
            return Err(SetupError(format!(
                "{} connections need more local ports than the {ports} ephemeral ports of {sources} \
                 source address(es): add --source-ip addresses (127.0.0.2, 127.0.0.3, …)",
                options.connections
            )));
        }
    }
    Ok(())
}

/// Runs the scenario; returns its report (thresholds judged) and verdict.
pub async fn run(scenario: Scenario, options: RunOptions) -> anyhow::Result<(Report, Verdict)> {
    let scenario = Arc::new(scenario);
    let (shard, n_shards) = options.shard;
    if options.target.is_some() && n_shards > 1 {
        eprintln!(
            "loadgen: shard {shard}/{n_shards}: the gateway must route numbers starting with {} to this \
             process's carriers",
            scenario.shard_prefixes(shard, n_shards).join(", ")
        );
    }
    let arrivals = schedule::arrivals(
        &scenario.arrivals,
        scenario.duration,
        scenario.seed,
        shard,
        n_shards,
    );
    let n_users = arrivals.last().map_or(0, |arrival| arrival.user + 1);
    let stop = CancellationToken::new();
    // The phone-number metadata takes a moment to load: not in the first second of the run.
    let first_phone = scenario.phone(0);
    let _ = tokio::task::spawn_blocking(move || gateway::phone::Phone::parse(&first_phone)).await;

    // The run starts a moment from now, once everything is listening.
    let lead = Duration::from_millis(300);
    let started = Instant::now() + lead;
    let marks = scenario.marks.iter().map(|mark| mark.at).collect();
    let measurements = Arc::new(Measurements::with_marks(started, marks));
    for arrival in &arrivals {
        measurements.schedule(arrival.at);
    }
    let network = Arc::new(Network::new(
        scenario.phones.clone(),
        scenario.handsets.clone(),
        measurements.clone(),
        n_users,
    ));
    let carriers = carriers::start(&scenario.carriers, &network, started, &stop)
        .await
        .context("cannot start the simulated carriers")?;

    let (base_url, api_keys, gateway, admin_url) = match &options.target {
        Some(url) => {
            let keys = scenario
                .clients
                .iter()
                .map(|client| client.api_key.clone())
                .collect();
            (url.clone(), keys, None, options.gateway_admin.clone())
        }
        None => {
            let (url, admin, keys, handle) =
                start_gateway(&scenario, &carriers, &options, stop.clone())
                    .await
                    .context("cannot start the in-process gateway")?;
            (url, keys, Some(handle), Some(admin))
        }
    };
    let api = Api::new(
        &base_url,
        Connector::new(options.source_ips.clone()),
        options.connections,
        options.request_timeout,
    );
    let world = Arc::new(World {
        scenario: scenario.clone(),
        api: api.clone(),
        measurements: measurements.clone(),
        network: network.clone(),
        api_keys,
    });

    let ticker = tokio::spawn(tick(
        measurements.clone(),
        options.progress,
        arrivals.len() as u64,
        stop.clone(),
    ));

    // The scheduler: each user starts at its arrival, whatever happened to the others.
    let mut journeys = JoinSet::new();
    let client_shares: Vec<f64> = scenario.clients.iter().map(|client| client.share).collect();
    for arrival in &arrivals {
        let due = started + arrival.at;
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let client = pick_client(&client_shares, scenario.seed, arrival.user);
        journeys.spawn(user::journey(
            world.clone(),
            arrival.user,
            client,
            started + arrival.at,
        ));
        // Reap finished journeys as we go, so the set holds only users in flight.
        while journeys.try_join_next().is_some() {}
    }
    let drain_deadline = Instant::now() + scenario.drain.min(user::longest_journey(&scenario));
    let drained = tokio::time::timeout_at(drain_deadline.into(), async {
        while journeys.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        measurements.add(Count::Unfinished, journeys.len() as u64);
        journeys.abort_all();
    }
    let elapsed = started.elapsed();
    // What the gateway says about the run, read before it stops.
    let gateway_report = match &admin_url {
        Some(admin) => {
            let admin_api = Api::new(admin, Connector::default(), 1, Duration::from_secs(10));
            match admin_api.get_text("/metrics").await {
                Some((200, text)) => crate::rehearsal::gateway_metrics::from_exposition(&text),
                _ => {
                    eprintln!("loadgen: could not read {admin}/metrics");
                    None
                }
            }
        }
        None => None,
    };
    stop.cancel();
    let _ = ticker.await;
    if let Some(gateway) = gateway {
        match tokio::time::timeout(Duration::from_secs(10), gateway).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => eprintln!("loadgen: the in-process gateway failed: {error:#}"),
            Ok(Err(error)) => eprintln!("loadgen: the in-process gateway panicked: {error}"),
            Err(_) => eprintln!("loadgen: the in-process gateway did not stop within 10 s"),
        }
    }

    let mut report = build_report(
        &scenario,
        &options,
        &measurements,
        &network,
        &carriers,
        &api,
        arrivals.len() as u64,
        elapsed,
    );
    report.gateway = gateway_report;
    let verdict = judge(&mut report, &options.thresholds);
    Ok((report, verdict))
}

/// Evaluates thresholds and validity into the report; returns the verdict.
pub fn judge(report: &mut Report, thresholds: &[Threshold]) -> Verdict {
    report.thresholds = thresholds
        .iter()
        .map(|threshold| threshold.evaluate(report))
        .collect();
    let verdict = if !report.self_watch.valid {
        Verdict::Invalid
    } else if report.thresholds.iter().any(|verdict| !verdict.passed) {
        Verdict::ThresholdsBroken
    } else {
        Verdict::Passed
    };
    report.result = verdict.name().to_owned();
    verdict
}

/// The client a user belongs to, by the scenario's shares (stable per user and seed).
fn pick_client(shares: &[f64], seed: u64, user: u64) -> usize {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ user.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut draw: f64 = rng.random();
    for (index, share) in shares.iter().enumerate() {
        if draw < *share {
            return index;
        }
        draw -= share;
    }
    shares.len().saturating_sub(1)
}

/// Starts a gateway in this process, configured from the scenario; returns its URL, its admin
/// URL, the API key of each client, and the task running it (which ends once `stop` fires).
async fn start_gateway(
    scenario: &Scenario,
    carriers: &[SimCarrier],
    options: &RunOptions,
    stop: CancellationToken,
) -> anyhow::Result<(
    String,
    String,
    Vec<Option<String>>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let api = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let admin = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let api_addr = api.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let keys: Vec<String> = scenario
        .clients
        .iter()
        .map(|client| {
            client.api_key.clone().unwrap_or_else(|| {
                format!("loadgen-{}-{:016x}", client.name, rand::random::<u64>())
            })
        })
        .collect();
    if scenario.gateway.code_ttl < Duration::from_secs(10) {
        eprintln!(
            "loadgen: warning: the compressed code lifetime ({:.1} s) is below the gateway's \
             minimum of 10 s; the in-process gateway uses 10 s, so codes outlive the scenario's \
             proportions",
            scenario.gateway.code_ttl.as_secs_f64()
        );
    }
    let toml = gateway_config(scenario, carriers, options, api_addr, &keys);
    let config = gateway::config::Config::from_toml(&toml)
        .map_err(|error| anyhow::anyhow!("generated gateway config: {error}"))?;
    let handle = tokio::spawn(gateway::run(
        gateway::Listeners { api, admin },
        config,
        gateway::clock::Clock::system(),
        async move { stop.cancelled().await },
    ));
    Ok((
        format!("http://{api_addr}"),
        format!("http://{admin_addr}"),
        keys.into_iter().map(Some).collect(),
        handle,
    ))
}

/// The in-process gateway's configuration: the scenario's clients and carriers, and its
/// policy with time compression applied.
pub fn gateway_config(
    scenario: &Scenario,
    carriers: &[SimCarrier],
    options: &RunOptions,
    api_addr: SocketAddr,
    keys: &[String],
) -> String {
    use std::fmt::Write as _;
    let c = scenario.time_compression;
    let secs = |scenario_secs: f64, min: u64| ((scenario_secs / c).round() as u64).max(min);
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\npublic_url = \"http://{api_addr}\"\n\
         max_connections = {}\nmax_connections_per_ip = 0\nshutdown_grace_secs = 5\nsweep_interval_ms = {}\n\n\
         [verification]\ncode_ttl_secs = {}\nmax_extension_secs = {}\nresend_cooldown_secs = {}\n\
         reroutes = {}\nexpiry_follows_delivery = {}\n\n\
         [limits]\nphone_sends = [{{ max = 1, per_secs = {} }}, {{ max = 5, per_secs = {} }}]\n\n\
         [queue]\ncapacity = {}\npolicy = \"{}\"\nmax_wait_ms = {}\noverload_wait_ms = {}\n\
         overload_after_ms = {}\nunseen_after_ms = {}\n",
        options.connections * 2 + 1024,
        // The sweep finds expired codes and overdue receipts. Its default second of real time
        // is 40 s of the day at 40x: run it every second of scenario time, but no more often
        // than every 50 ms, since each sweep also walks the store's housekeeping.
        ((1000.0 / c).round() as u64).clamp(50, 1000),
        (scenario.gateway.code_ttl.as_secs_f64().round() as u64).max(10),
        scenario.gateway.max_extension.as_secs_f64().round() as u64,
        secs(30.0, 1),
        scenario.gateway.reroutes,
        scenario.gateway.expiry_follows_delivery,
        secs(30.0, 1),
        secs(600.0, 1),
        scenario.gateway.queue_capacity,
        scenario.gateway.queue_policy.as_str(),
        millis(scenario.gateway.max_wait),
        millis(scenario.gateway.overload_wait),
        millis(scenario.gateway.overload_after),
        scenario.gateway.unseen_after.map_or(0, millis),
    );
    for (client, key) in scenario.clients.iter().zip(keys) {
        let _ = write!(
            toml,
            "\n[[clients]]\nname = \"{}\"\napi_key_sha256 = \"{}\"\nrate_per_sec = {}\npriority = {}\n",
            client.name,
            sha256_hex(key),
            client.rate_per_sec,
            client.priority
        );
    }
    for (settings, carrier) in scenario.carriers.iter().zip(carriers) {
        toml.push_str(&gateway_carrier(settings, carrier));
        let millis = (scenario.gateway.receipt_timeout.as_secs_f64() * 1000.0).round() as u64;
        let _ = writeln!(toml, "receipt_timeout_ms = {millis}");
    }
    toml
}

/// One `[[carriers]]` entry of the in-process gateway's configuration: an HTTP carrier, or an
/// SMPP one (`kind = "smpp"`) bound to the simulated SMSC with its login.
fn gateway_carrier(settings: &crate::carriers::Carrier, carrier: &SimCarrier) -> String {
    let prefixes: Vec<String> = settings
        .prefixes
        .iter()
        .map(|prefix| format!("\"{prefix}\""))
        .collect();
    let common = format!(
        "\n[[carriers]]\nname = \"{}\"\npace_per_sec = {}\nwindow = {}\nweight = {}\nstandby = {}\n\
         prefixes = [{}]\ntimeout_ms = 5000\n",
        settings.name,
        settings.pace_per_sec,
        settings.window,
        settings.weight,
        settings.standby,
        prefixes.join(", "),
    );
    match (&settings.protocol, &carrier.smpp_login) {
        (crate::carriers::Protocol::Smpp(smpp), Some(login)) => format!(
            "{common}kind = \"smpp\"\nhost = \"{}\"\nport = {}\nsystem_id = \"{}\"\npassword = \"{}\"\n\
             bind = \"{}\"\nbinds = {}\nenquire_link_secs = 30\ngsm7_packed = {}\n\
             gsm7_data_coding = {}\nucs2_data_coding = {}\n",
            carrier.addr.ip(),
            carrier.addr.port(),
            login.system_id,
            login.password,
            smpp.bind.as_str(),
            smpp.binds,
            smpp.gsm7_packed,
            smpp.gsm7_data_coding,
            smpp.ucs2_data_coding,
        ),
        _ => format!(
            "{common}kind = \"http\"\nurl = \"http://{}/sms\"\nhttp_version = \"1.1\"\nreceipt_token = \"{}\"\n",
            carrier.addr, carrier.receipt_token,
        ),
    }
}

/// A real duration in whole milliseconds for the gateway's configuration, at least 1.
fn millis(duration: Duration) -> u64 {
    ((duration.as_secs_f64() * 1000.0).round() as u64).max(1)
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Closes a second every second: users in flight, CPU and memory; shows progress.
async fn tick(
    measurements: Arc<Measurements>,
    progress: Progress,
    scheduled: u64,
    stop: CancellationToken,
) {
    let started = measurements.started();
    let mut second = 0usize;
    let mut cpu = crate::rehearsal::progress::CpuMeter::new();
    let mut display = progress.start(scheduled);
    loop {
        let next = started + Duration::from_secs(second as u64 + 1);
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = stop.cancelled() => break,
        }
        let (cpu_share, rss) = (
            cpu.share_since_last(),
            crate::rehearsal::progress::rss_bytes(),
        );
        measurements.close_second(second, cpu_share, rss);
        display.update(&measurements, second, cpu_share, rss);
        second += 1;
    }
    display.finish();
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    scenario: &Scenario,
    options: &RunOptions,
    measurements: &Measurements,
    network: &Network,
    carriers: &[SimCarrier],
    api: &Api,
    scheduled: u64,
    elapsed: Duration,
) -> Report {
    let snapshot = measurements.snapshot();
    let counts = &network.handsets.counts;
    let mut report = Report {
        schema_version: crate::rehearsal::report::SCHEMA_VERSION,
        loadgen_version: env!("CARGO_PKG_VERSION").to_owned(),
        scenario: ScenarioInfo {
            name: scenario.name.clone(),
            seed: scenario.seed,
            time_compression: scenario.time_compression,
            duration_secs: scenario.duration.as_secs_f64(),
            scheduled_arrivals: scheduled,
        },
        target: options
            .target
            .clone()
            .unwrap_or_else(|| "in-process".to_owned()),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now() - elapsed)
            .to_string(),
        elapsed_secs: elapsed.as_secs_f64(),
        shards: vec![options.shard.0],
        shard_count: options.shard.1,
        counts: Default::default(),
        marks: scenario
            .marks
            .iter()
            .zip(&snapshot.verified_by_marks)
            .map(|(mark, &verified)| MarkReport {
                label: mark.label.clone(),
                at_secs: mark.at_secs,
                verified,
            })
            .collect(),
        rejections: Vec::new(),
        latency: Default::default(),
        histograms: Default::default(),
        carriers: carriers.iter().map(carrier_report).collect(),
        sms_capacity: 0.0,
        verified_per_capacity: None,
        gateway: None,
        handsets: HandsetReport {
            received: counts.received.load(Ordering::Relaxed),
            lost_on_purpose: counts.lost_on_purpose.load(Ordering::Relaxed),
            duplicated_on_purpose: counts.duplicated_on_purpose.load(Ordering::Relaxed),
            to_absent_users: counts.to_absent_users.load(Ordering::Relaxed),
            to_strangers: network.strangers.load(Ordering::Relaxed),
        },
        timeline: Vec::new(),
        self_watch: SelfWatch::default(),
        thresholds: Vec::new(),
        result: String::new(),
    };
    report.fill_from(&snapshot);
    report.set_capacity(
        scenario
            .carriers
            .iter()
            .map(|carrier| carrier.capacity_over(scenario.duration))
            .sum(),
    );
    let lag = report.latency(Series::SchedulerLag);
    let mut problems = Vec::new();
    let max_lag_ms = options.max_scheduler_lag.as_secs_f64() * 1000.0;
    if lag.p99_ms > max_lag_ms {
        problems.push(format!(
            "the load generator fell behind its schedule: scheduler lag p99 {:.1} ms > {max_lag_ms:.0} ms",
            lag.p99_ms
        ));
    }
    // Scheduled against achieved arrivals, second by second: the users due by the end of each
    // second should have started by then (a little slack for users due in its last moments).
    // A user may start up to the allowed lag after its time, so the arrivals due by a second
    // are compared with those started by that second plus the allowed lag.
    let slack = options.max_scheduler_lag.as_secs_f64().ceil() as usize;
    let due_by: Vec<u64> = report
        .timeline
        .iter()
        .scan(0u64, |due, second| {
            *due += second.scheduled;
            Some(*due)
        })
        .collect();
    let started_by: Vec<u64> = report
        .timeline
        .iter()
        .scan(0u64, |started, second| {
            *started += second.arrived;
            Some(*started)
        })
        .collect();
    let behind: Vec<usize> = (0..due_by.len())
        .filter(|&second| {
            let due = due_by[second];
            let started = started_by[(second + slack).min(started_by.len() - 1)];
            due > 20 && (started as f64) < 0.95 * due as f64 - 10.0
        })
        .collect();
    if let (Some(first), Some(last)) = (behind.first(), behind.last()) {
        problems.push(format!(
            "arrivals fell behind the schedule in {} second(s), from second {first} to {last}",
            behind.len()
        ));
    }
    let arrived = report.count(Count::Arrived);
    if arrived < scheduled {
        problems.push(format!(
            "only {arrived} of {scheduled} scheduled users started"
        ));
    }
    let peak_cpu = report.timeline.iter().map(|s| s.cpu).fold(0.0, f64::max);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if options.target.is_some() && peak_cpu > 0.95 * cores {
        problems.push(format!(
            "the load generator used {:.0}% of {cores} cores at its peak: it may have been the bottleneck",
            peak_cpu * 100.0
        ));
    }
    report.self_watch = SelfWatch {
        valid: problems.is_empty(),
        problems,
        scheduler_lag_p99_ms: lag.p99_ms,
        scheduler_lag_max_ms: lag.max_ms,
        waited_for_connection: api.waited_for_connection(),
        peak_rss_bytes: report
            .timeline
            .iter()
            .map(|s| s.rss_bytes)
            .max()
            .unwrap_or(0),
        peak_cpu,
        peak_in_flight: report
            .timeline
            .iter()
            .map(|s| s.in_flight)
            .max()
            .unwrap_or(0),
        gateway_in_process: options.target.is_none(),
    };
    report
}

/// What a carrier did, for the report (with the SMPP section for an SMSC).
fn carrier_report(carrier: &SimCarrier) -> CarrierReport {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let counts = &carrier.counts;
    let s = &counts.smpp;
    CarrierReport {
        name: carrier.name.clone(),
        accepted: load(&counts.accepted),
        throttled: load(&counts.throttled),
        failed: load(&counts.failed),
        refused: load(&counts.refused),
        dropped: load(&counts.dropped),
        receipts_sent: load(&counts.receipts_sent),
        receipts_failed: load(&counts.receipts_failed),
        receipts_withheld: load(&counts.receipts_withheld),
        undeliverable: load(&counts.undeliverable),
        smpp: carrier.smpp_login.is_some().then(|| SmppReport {
            binds: load(&s.binds),
            binds_refused: load(&s.binds_refused),
            submit_sm: load(&s.submit_sm),
            parts: load(&s.parts),
            messages: load(&s.messages),
            duplicates: load(&s.duplicates),
            incomplete: load(&s.incomplete),
            decode_errors: load(&s.decode_errors),
            deliver_sm: load(&s.deliver_sm),
            receipts_nacked: load(&s.receipts_nacked),
            receipts_lost: load(&s.receipts_lost),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = r#"
name = "config"
duration_secs = 60
time_compression = 40
[phones]
prefix = "+39333"
[[arrivals]]
at_secs = 0
per_sec = 1
[[clients]]
name = "portal"
share = 1
[[carriers]]
name = "a"
capacity_per_sec = 25
[[carriers]]
name = "b"
capacity_per_sec = 8
protocol = "smpp"
"#;

    fn config(extra: &str) -> String {
        let scenario = Scenario::parse(&format!("{SCENARIO}{extra}")).unwrap();
        let carriers: Vec<SimCarrier> = scenario
            .carriers
            .iter()
            .enumerate()
            .map(|(index, carrier)| SimCarrier {
                name: carrier.name.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + index as u16)),
                receipt_token: "receipt-token-0123456789".to_owned(),
                smpp_login: (index == 1).then(|| carriers::smsc::Login {
                    system_id: "b".to_owned(),
                    password: "pw".to_owned(),
                }),
                counts: Arc::default(),
            })
            .collect();
        let options = RunOptions {
            target: None,
            shard: (0, 1),
            connections: 8,
            source_ips: Vec::new(),
            request_timeout: Duration::from_secs(1),
            thresholds: Vec::new(),
            progress: crate::rehearsal::progress::Progress::Off,
            max_scheduler_lag: Duration::from_millis(100),
            gateway_admin: None,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        gateway_config(&scenario, &carriers, &options, addr, &["key".to_owned()])
    }

    #[test]
    fn the_gateway_defences_are_passed_as_the_scenario_sets_them() {
        let plain: toml::Table = config("").parse().unwrap();
        assert_eq!(plain["verification"]["reroutes"].as_integer(), Some(1));
        assert_eq!(
            plain["verification"]["expiry_follows_delivery"].as_bool(),
            Some(true)
        );
        // The gateway's 60 s receipt timeout in scenario time is 1,500 real ms at 40x, and the
        // sweep runs every 50 ms (two seconds of the scenario, at its floor).
        assert_eq!(
            plain["carriers"][0]["receipt_timeout_ms"].as_integer(),
            Some(1500)
        );
        assert_eq!(plain["sweep_interval_ms"].as_integer(), Some(50));
        let text = config(
            "[gateway]\nreceipt_timeout_secs = 90\nreroutes = 2\nexpiry_follows_delivery = true\n",
        );
        let on: toml::Table = text.parse().unwrap();
        let verification = on["verification"].as_table().unwrap();
        assert_eq!(verification["reroutes"].as_integer(), Some(2));
        assert_eq!(
            verification["expiry_follows_delivery"].as_bool(),
            Some(true)
        );
        assert_eq!(verification["code_ttl_secs"].as_integer(), Some(15));
        let carriers = on["carriers"].as_array().unwrap();
        assert_eq!(carriers.len(), 2);
        for carrier in carriers {
            // 90 s of scenario time at 40x: 2,250 real milliseconds, on every carrier.
            assert_eq!(
                carrier["receipt_timeout_ms"].as_integer(),
                Some(2250),
                "{carrier}"
            );
        }
        assert_eq!(carriers[1]["kind"].as_str(), Some("smpp"));
        let off = config("[gateway]\nreceipt_timeout_secs = 0\nexpiry_follows_delivery = false\n");
        let off: toml::Table = off.parse().unwrap();
        assert_eq!(
            off["verification"]["expiry_follows_delivery"].as_bool(),
            Some(false)
        );
        assert_eq!(off["verification"]["reroutes"].as_integer(), Some(1));
        assert_eq!(
            off["carriers"][0]["receipt_timeout_ms"].as_integer(),
            Some(0)
        );
    }

    #[test]
    fn the_queue_policy_defaults_to_the_gateways_own() {
        // The gateway's defaults in scenario time, compressed 40x: 300 s of patience is 7,500
        // real ms, overload is a job waiting 5 s (125 ms) for 30 s (750 ms).
        let plain: toml::Table = config("").parse().unwrap();
        let queue = plain["queue"].as_table().unwrap();
        assert_eq!(queue["policy"].as_str(), Some("adaptive"));
        assert_eq!(queue["max_wait_ms"].as_integer(), Some(7500));
        assert_eq!(queue["overload_wait_ms"].as_integer(), Some(125));
        assert_eq!(queue["overload_after_ms"].as_integer(), Some(750));
        assert_eq!(queue["unseen_after_ms"].as_integer(), Some(7500));
        assert_eq!(queue["capacity"].as_integer(), Some(200_000));
    }

    #[test]
    fn the_queue_policy_is_passed_as_the_scenario_sets_it() {
        let set: toml::Table = config(
            "[gateway]\nqueue_policy = \"deadline\"\nmax_wait_secs = 61\noverload_wait_secs = 0\n\
             overload_after_secs = 0.01\nunseen_after_secs = 0\n",
        )
        .parse()
        .unwrap();
        let queue = set["queue"].as_table().unwrap();
        assert_eq!(queue["policy"].as_str(), Some("deadline"));
        // 61 s at 40x is 1,525 ms; zero and a hundredth of a second round up to the floor of
        // 1 ms; an unseen time of 0 stays 0 (never drop).
        assert_eq!(queue["max_wait_ms"].as_integer(), Some(1525));
        assert_eq!(queue["overload_wait_ms"].as_integer(), Some(1));
        assert_eq!(queue["overload_after_ms"].as_integer(), Some(1));
        assert_eq!(queue["unseen_after_ms"].as_integer(), Some(0));
        let unseen: toml::Table = config("[gateway]\nunseen_after_secs = 90\n")
            .parse()
            .unwrap();
        assert_eq!(unseen["queue"]["unseen_after_ms"].as_integer(), Some(2250));
    }

    #[test]
    fn the_generated_config_is_one_the_gateway_accepts() {
        for extra in ["", "[gateway]\nqueue_policy = \"deadline\"\n"] {
            let text = config(extra);
            let gateway = gateway::config::Config::from_toml(&text);
            assert!(gateway.is_ok(), "{extra:?}: {:?}", gateway.err());
        }
    }
}

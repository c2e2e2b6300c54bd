//! The `loadgen` binary: parses flags, starts the runtime and runs one subcommand.

use std::num::NonZeroUsize;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use loadgen::bench::fill::{self, FillArgs, FillConfig};
use loadgen::bench::server::{self, ServerArgs};
use loadgen::bench::sink::{Sink, SinkArgs, SinkConfig};
use loadgen::cli::{Cli, Command, MergeArgs, RunArgs, SmscArgs};
use loadgen::shutdown::Signals;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(exit_code) => exit_code,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(worker_threads) = cli.worker_threads {
        runtime.worker_threads(worker_threads.get());
    }
    let runtime = runtime.build().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Sink(args) => run_sink(args).await,
            Command::Bare(args) => run_bare(args).await,
            Command::Fill(args) => run_fill(args).await,
            Command::Run(args) => Ok(rehearse(args).await),
            Command::Merge(args) => Ok(merge(args)),
            Command::Smsc(args) => run_smsc(args).await,
        }
    })
}

/// Exit code for a configuration that cannot run (bad scenario, flags or limits).
const BAD_CONFIGURATION: u8 = 2;
/// Exit code for a run that failed for another reason (a port taken, a file unwritable).
const FAILED: u8 = 4;

async fn rehearse(args: RunArgs) -> ExitCode {
    let scenario =
        match loadgen::rehearsal::scenario::Scenario::load_with(&args.scenario, &args.set) {
            Ok(scenario) => scenario,
            Err(error) => {
                eprintln!("loadgen: {error}");
                return ExitCode::from(BAD_CONFIGURATION);
            }
        };
    let options = loadgen::rehearsal::run::RunOptions {
        target: args.target.clone(),
        shard: args.shard,
        connections: args
            .connections
            .map_or(scenario.connections, NonZeroUsize::get),
        source_ips: args.source_ips.clone(),
        request_timeout: std::time::Duration::from_millis(args.timeout_ms.max(1)),
        thresholds: args.thresholds.clone(),
        progress: args.progress,
        max_scheduler_lag: std::time::Duration::from_millis(args.max_lag_ms),
        gateway_admin: args.gateway_admin.clone(),
    };
    if let Err(error) = loadgen::rehearsal::run::check_limits(&scenario, &options) {
        eprintln!("loadgen: {error}");
        return ExitCode::from(BAD_CONFIGURATION);
    }
    let (report, verdict) = match loadgen::rehearsal::run::run(scenario, options).await {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            return ExitCode::from(FAILED);
        }
    };
    finish(
        &report,
        verdict,
        args.report.as_deref(),
        args.plot.as_deref(),
    )
}

fn merge(args: MergeArgs) -> ExitCode {
    let mut reports = Vec::with_capacity(args.reports.len());
    for path in &args.reports {
        let parsed = std::fs::read(path)
            .map_err(|error| error.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<loadgen::rehearsal::report::Report>(&bytes)
                    .map_err(|error| error.to_string())
            });
        match parsed {
            Ok(report) => reports.push(report),
            Err(error) => {
                eprintln!("loadgen: report {}: {error}", path.display());
                return ExitCode::from(BAD_CONFIGURATION);
            }
        }
    }
    let mut merged = match loadgen::rehearsal::report::merge(&reports) {
        Ok(merged) => merged,
        Err(error) => {
            eprintln!("loadgen: {error}");
            return ExitCode::from(BAD_CONFIGURATION);
        }
    };
    let verdict = loadgen::rehearsal::run::judge(&mut merged, &args.thresholds);
    finish(
        &merged,
        verdict,
        args.report.as_deref(),
        args.plot.as_deref(),
    )
}

/// Prints the summary, writes the report and the picture, and returns the verdict's exit code.
fn finish(
    report: &loadgen::rehearsal::report::Report,
    verdict: loadgen::rehearsal::run::Verdict,
    report_path: Option<&std::path::Path>,
    plot_path: Option<&std::path::Path>,
) -> ExitCode {
    print!("{}", report.summary());
    if let Some(path) = report_path {
        let written = serde_json::to_vec_pretty(report)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(path, json));
        if let Err(error) = written {
            eprintln!(
                "loadgen: cannot write the report {}: {error}",
                path.display()
            );
            return ExitCode::from(FAILED);
        }
    }
    if let Some(path) = plot_path {
        if let Err(error) = loadgen::rehearsal::plot::draw(report, path) {
            eprintln!("loadgen: cannot draw {}: {error}", path.display());
            return ExitCode::from(FAILED);
        }
    }
    ExitCode::from(verdict.exit_code())
}

async fn run_sink(args: SinkArgs) -> anyhow::Result<ExitCode> {
    let signals = Signals::install().context("cannot install signal handlers")?;
    let listen = args.server.listen;
    let listener = server::bind_and_announce(listen)
        .await
        .with_context(|| format!("sink: cannot listen on {listen}"))?;
    let sink = Sink::with_config(SinkConfig::from_args(&args));
    sink.clone().serve(listener, signals.received()).await;
    sink.write_ids_file()
        .context("sink: cannot write the ids file")?;
    let stats = sink.stats();
    eprintln!(
        "sink: received {}, distinct message ids {}, bad requests {}, throttled {}",
        stats.received, stats.distinct_message_ids, stats.bad_requests, stats.throttled
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_bare(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let signals = Signals::install().context("cannot install signal handlers")?;
    let listener = server::bind_and_announce(args.listen)
        .await
        .with_context(|| format!("bare: cannot listen on {}", args.listen))?;
    loadgen::bench::bare::serve(listener, signals.received()).await;
    Ok(ExitCode::SUCCESS)
}

async fn run_fill(args: FillArgs) -> anyhow::Result<ExitCode> {
    let config = FillConfig::from_args(&args).context("fill")?;
    let report = fill::run(config).await.context("fill")?;
    print!("{report}");
    Ok(if report.n_failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_smsc(args: SmscArgs) -> anyhow::Result<ExitCode> {
    use loadgen::carriers::smsc::{self, SmscSettings};
    use loadgen::carriers::{Carrier, Protocol, Smpp};
    if args.system_id.is_empty() || args.system_id.len() > 15 {
        anyhow::bail!("smsc: --system-id must be 1 to 15 characters");
    }
    if args.password.is_empty() || args.password.len() > 8 {
        anyhow::bail!("smsc: --password must be 1 to 8 characters");
    }
    if !(args.capacity_per_sec.is_finite() && args.capacity_per_sec > 0.0) {
        anyhow::bail!("smsc: --capacity-per-sec must be positive");
    }
    let signals = Signals::install().context("cannot install signal handlers")?;
    let smpp = Smpp {
        system_id: Some(args.system_id.clone()),
        password: Some(args.password.clone()),
        gsm7_packed: args.gsm7_packed,
        gsm7_data_coding: args.gsm7_data_coding,
        ucs2_data_coding: args.ucs2_data_coding,
        receipt_format: args.receipt_format,
        receipt_ids: args.receipt_ids,
        ..Smpp::default()
    };
    let carrier = Carrier::steady(
        "smsc",
        args.listen,
        args.capacity_per_sec,
        std::time::Duration::from_millis(args.latency_ms),
        std::time::Duration::from_millis(args.receipt_delay_ms),
        Protocol::Smpp(smpp),
    );
    let mut settings = SmscSettings::from_carrier(&carrier, std::time::Instant::now());
    settings.capacity_rule = args.capacity_rule;
    let written_done = tokio_util::sync::CancellationToken::new();
    let writer = match &args.messages_file {
        Some(path) => {
            let file = tokio::fs::File::create(path)
                .await
                .with_context(|| format!("smsc: cannot create {}", path.display()))?;
            let (sender, receiver) = tokio::sync::mpsc::channel(smsc::MESSAGES_FILE_QUEUE);
            settings.messages = Some(sender);
            Some(tokio::spawn(smsc::write_messages_file(
                file,
                receiver,
                written_done.clone(),
            )))
        }
        None => None,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let network = std::sync::Arc::new(loadgen::carriers::Network::without_users());
    let smsc = smsc::start(settings, network, stop.clone())
        .await
        .context("smsc")?;
    println!("listening on {}", smsc.local_addr());
    tokio::select! {
        () = signals.received() => {}
        () = tokio::time::sleep(std::time::Duration::from_secs(args.duration_secs)) => {}
    }
    stop.cancel();
    let summary = smsc.summary();
    if let Some(writer) = writer {
        written_done.cancel();
        let written = writer
            .await
            .context("smsc: the messages file writer failed")?
            .context("smsc: cannot write the messages file")?;
        if written != summary.messages {
            eprintln!(
                "smsc: the messages file lists {written} of {} messages (its queue was full)",
                summary.messages
            );
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

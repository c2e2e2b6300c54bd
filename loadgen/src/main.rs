//! The `loadgen` binary: parses flags, starts the runtime and runs one subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use loadgen::cli::{Cli, Command, FillArgs, ServerArgs, SinkArgs};
use loadgen::fill::{self, FillConfig};
use loadgen::server;
use loadgen::shutdown::Signals;
use loadgen::sink::{Sink, SinkConfig};

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
        }
    })
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
    loadgen::bare::serve(listener, signals.received()).await;
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

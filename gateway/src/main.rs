//! The `otpgate` binary: parse flags, install logging, bind, and run the gateway.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Cli, Config, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_tracing(cli.log_format);
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("otpgate: {error:#}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "config ok: listen {} admin {}, {} carrier(s), {} client(s){}",
            config.listen,
            config.admin_listen,
            config.carriers.len(),
            config.clients.len(),
            if config.is_unauthenticated() {
                ", UNAUTHENTICATED (loopback only)"
            } else {
                ""
            },
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("otpgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otpgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let api = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| anyhow::anyhow!("listen {}: {error}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|error| anyhow::anyhow!("admin_listen {}: {error}", config.admin_listen))?;
    gateway::run(
        gateway::Listeners { api, admin },
        config,
        gateway::clock::Clock::system(),
        gateway::shutdown::signal(),
    )
    .await
}

/// Logs go to standard error (standard output belongs to the console carrier).
///
/// `RUST_LOG` picks what is logged, except the targets in `gateway::SILENCED_LOG_TARGETS`:
/// they are dropped by a filter of their own, which no `RUST_LOG` directive can widen.
fn install_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let silenced = tracing_subscriber::filter::filter_fn(|metadata| {
        gateway::log_target_allowed(metadata.target())
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Json => layer.json().boxed(),
        LogFormat::Text => layer.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer.with_filter(silenced))
        .init();
}

//! The `otpgate` binary: parse flags, install logging, bind, and run the gateway.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Cli, Config, LogFormat};
use tracing_subscriber::EnvFilter;

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
fn install_tracing(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for target in gateway::SILENCED_LOG_TARGETS {
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

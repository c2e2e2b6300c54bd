//! The command-line flags of the `loadgen` binary.
//!
//! Every flag can also be set from a `LOADGEN_*` environment variable.

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Run a fast fake HTTP carrier that accepts every well-formed SMS and counts it.
    ///
    /// It accepts `POST <any path>` in the carrier wire format (DESIGN.md section 5),
    /// serves its counters at `GET /stats` and the SMS it accepted at `GET /ids`.
    Sink(SinkArgs),
    /// Run a bare HTTP server that answers every request 202 and does no work.
    Bare(ServerArgs),
    /// Start many verifications with distinct phone numbers, as fast as the gateway takes them.
    Fill(FillArgs),
}

/// Flags shared by the subcommands that run a server.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port, printed on the first line of stdout.
    #[arg(long, env = "LOADGEN_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// Flags of `loadgen sink`.
#[derive(Debug, Args)]
pub struct SinkArgs {
    #[command(flatten)]
    pub server: ServerArgs,

    /// Accept at most this many SMS in any one second and answer `429` above it, like a
    /// carrier capped at its contracted rate; without it, the sink accepts everything.
    #[arg(long, env = "LOADGEN_CAPACITY_PER_SEC")]
    pub capacity_per_sec: Option<std::num::NonZeroU32>,

    /// Answer every SMS this many milliseconds after it arrived, like a carrier that takes that
    /// long to accept; the wait is a timer, so answers in flight overlap.
    #[arg(long, env = "LOADGEN_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Exit the process at once on accepting this many SMS, like a carrier that crashes: the SMS
    /// accepted but not yet answered at that moment get no answer, and their connections close.
    /// The SMS accepted are written to --ids-file first.
    #[arg(long, env = "LOADGEN_DIE_AFTER", requires = "ids_file")]
    pub die_after: Option<NonZeroU64>,

    /// Write every SMS accepted to this file, one `UNIX_MICROS MESSAGE_ID` line each (as
    /// `GET /ids` serves them), when the sink stops on SIGINT or SIGTERM or dies on --die-after.
    #[arg(long, env = "LOADGEN_IDS_FILE")]
    pub ids_file: Option<PathBuf>,
}

/// Flags of `loadgen fill`.
#[derive(Debug, Args)]
pub struct FillArgs {
    /// Base URL of the gateway's API, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "LOADGEN_TARGET")]
    pub target: String,

    /// Verifications to start, one phone number each.
    #[arg(long, env = "LOADGEN_COUNT", default_value_t = 1_000_000)]
    pub count: u64,

    /// Keep-alive connections, each with one request in flight.
    #[arg(long, env = "LOADGEN_CONCURRENCY", default_value_t = NonZeroUsize::new(64).unwrap())]
    pub concurrency: NonZeroUsize,

    /// API key sent as `Authorization: Bearer <key>`; omit it for an unauthenticated gateway.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Index of the first phone number, so that several runs can use disjoint numbers.
    #[arg(long, env = "LOADGEN_PHONE_OFFSET", default_value_t = 0)]
    pub phone_offset: u64,

    /// Time allowed for one request, connecting included, before it counts as failed.
    #[arg(long, env = "LOADGEN_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
}

//! otpgate's load generator and simulated carriers.
//!
//! For now this crate holds the tools the benchmarks under `bench/` need:
//! a fast fake HTTP carrier (the sink), a bare hyper server to compare the gateway with,
//! and a filler that starts many verifications as fast as the gateway takes them.
//! A later issue grows it into the full load generator of DESIGN.md section 6.
//!
//! # Layout
//!
//! - [`cli`]: the command-line flags of the `loadgen` binary.
//! - [`server`]: the accept loop shared by every server this crate runs.
//! - [`sink`]: the fake HTTP carrier that counts what the gateway sends it.
//! - [`bare`]: the server that does no work, the baseline for API throughput.
//! - [`fill`]: the client that starts verifications over keep-alive connections.
//! - [`phone`]: valid, distinct phone numbers generated from a counter.
//! - [`shutdown`]: the signals that stop a server.

pub mod api;
pub mod bare;
pub mod cli;
pub mod connect;
pub mod fill;
pub mod gateway_metrics;
pub mod handset;
pub mod measure;
pub mod phone;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod server;
pub mod shutdown;
pub mod simcarrier;
pub mod simsmsc;
pub mod sink;
pub mod threshold;
pub mod user;

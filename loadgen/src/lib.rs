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
//! - [`rehearsal`]: `loadgen run` and `loadgen merge`.
//! - [`carriers`]: the simulated carriers (HTTP and SMPP) and handsets.
//! - [`bench`](mod@bench): the benchmark tools: the sink, the bare server and the filler.
//! - [`shutdown`]: the signals that stop a server.

pub mod bench;
pub mod carriers;
pub mod cli;
pub mod rehearsal;
pub mod shutdown;

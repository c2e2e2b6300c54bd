//! otpgate's load generator and simulated carriers, in three wings:
//!
//! - [`rehearsal`]: `loadgen run` and `loadgen merge`, the load generator of docs/DESIGN.md
//!   section 6: a scenario's users against a gateway, measured, reported and judged.
//! - [`carriers`]: the simulated carriers (HTTP, and SMPP SMSCs, also run alone by
//!   `loadgen smsc`) and the handsets they deliver to.
//! - [`bench`](mod@bench): the tools the benchmarks under `bench/` run: the sink, the bare server
//!   and the filler.
//!
//! The wings import downward only: the rehearsal starts and reads the carriers through what
//! [`carriers`] exports; the carriers and the benchmark tools import nothing of the rehearsal,
//! nor of each other.
//!
//! Above them, [`cli`] holds the binary's flags and [`shutdown`] the signals that stop a server.

pub mod bench;
pub mod carriers;
pub mod cli;
pub mod rehearsal;
pub mod shutdown;

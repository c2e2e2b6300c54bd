//! The benchmark tools that `bench/*.sh` run: a fast fake HTTP carrier (the sink), a bare hyper
//! server to compare the gateway with, and a filler that starts many verifications as fast as the
//! gateway takes them.
//!
//! - [`sink`]: the fake HTTP carrier that counts what the gateway sends it.
//! - [`bare`]: the server that does no work, the baseline for API throughput.
//! - [`fill`]: the client that starts verifications over keep-alive connections.
//! - [`server`]: the accept loop of the sink and the bare server.
//! - [`phone`]: valid, distinct phone numbers generated from a counter.

pub mod bare;
pub mod fill;
pub mod phone;
pub mod server;
pub mod sink;

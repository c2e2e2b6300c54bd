//! End-to-end tests: the real gateway on port 0, over HTTP, with fake carriers.
//!
//! One test binary of modules (like ripgrep's), so the harness compiles once.

mod api;
mod connections;
mod delivery;
mod engine;
mod errors;
mod expiry;
mod failover;
mod guessing;
mod kannel;
mod kannel_harness;
mod limits;
mod npm_smsc_harness;
mod openapi;
mod overload;
mod pumping;
mod receipts;
mod redis;
mod redis_harness;
mod routing;
mod secrecy;
mod shutdown;
mod smpp;
mod webhooks;

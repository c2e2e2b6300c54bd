//! `loadgen run` and `loadgen merge`: the rehearsal of docs/DESIGN.md section 6. Virtual users arrive
//! on a schedule drawn in advance from a scenario and go through their journey against a gateway,
//! while the simulated carriers and handsets ([`crate::carriers`]) deliver their SMS; what they
//! see is measured, reported, judged against thresholds and drawn.
//!
//! - [`scenario`]: the scenario file, validated, with time compression applied.
//! - [`schedule`]: the arrival rate's profile and the arrivals drawn from it.
//! - [`run`]: one rehearsal, from scenario to report and verdict.
//! - `user`: one user's journey; `api` and `connect`: the users' HTTP client.
//! - [`measure`]: histograms, counters and the per-second record.
//! - [`report`]: the JSON report, its summary and the merging of shard reports.
//! - [`threshold`]: pass/fail thresholds judged on a report.
//! - [`plot`], [`progress`], [`gateway_metrics`]: the SVG, live progress, the gateway's metrics.

pub(crate) mod api;
pub(crate) mod connect;
pub mod gateway_metrics;
pub mod measure;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod threshold;
pub(crate) mod user;

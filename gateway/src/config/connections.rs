//! The connection guards (top-level keys): how many connections a listener and one address may
//! hold, and the deadlines that close a connection a silent or slow peer would otherwise hold
//! for ever (docs/DESIGN.md section 3, *Connections*).

use std::time::Duration;

use super::error::{ConfigError, invalid};

/// The admin listener's connections: Prometheus and the orchestrator's probes need a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The most admin connections one address may hold, so that one peer never takes them all.
const ADMIN_MAX_PER_IP: usize = 16;

/// The top-level keys that guard connections, as written.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawConnections {
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub prelude_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub ping_interval_ms: Option<u64>,
    pub ping_timeout_ms: Option<u64>,
}

/// How a listener guards its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionPolicy {
    /// Connections open at once; a permit is taken before `accept`.
    pub max_connections: usize,
    /// Connections open at once from one address (an IPv6 /64 counts as one); `None`: no cap.
    /// A connection over it is closed at once.
    pub max_per_ip: Option<usize>,
    /// A connection whose first request's headers (HTTP/1), or whose preface, settings and
    /// first request's headers (HTTP/2), have not arrived within this long is closed.
    pub prelude_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 with a GOAWAY).
    pub idle_timeout: Duration,
    /// A request body not complete within this long of its headers is answered `408`.
    pub body_timeout: Duration,
    /// HTTP/2 keep-alive pings; `None`: none are sent.
    pub ping: Option<Ping>,
}

/// HTTP/2 keep-alive pings: one after each `interval` of silence from the peer, and the
/// connection is closed if its answer has not come within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub interval: Duration,
    pub timeout: Duration,
}

// === impl RawConnections ===

impl RawConnections {
    pub fn validate(self) -> Result<ConnectionPolicy, ConfigError> {
        let max_connections = self.max_connections.unwrap_or(10_000);
        if !(1..=1_000_000).contains(&max_connections) {
            return invalid("max_connections", "must be between 1 and 1000000");
        }
        let max_per_ip = self.max_connections_per_ip.unwrap_or(256);
        if max_per_ip > 1_000_000 {
            return invalid(
                "max_connections_per_ip",
                "must be between 0 (no cap) and 1000000",
            );
        }
        let prelude_timeout = millis(
            "prelude_timeout_ms",
            self.prelude_timeout_ms,
            10_000,
            600_000,
        )?;
        let idle_timeout = millis("idle_timeout_ms", self.idle_timeout_ms, 60_000, 3_600_000)?;
        let body_timeout = millis("body_timeout_ms", self.body_timeout_ms, 10_000, 600_000)?;
        // Checked whether or not pings are on, so that a typo shows before anyone turns them on.
        let ping_timeout = millis("ping_timeout_ms", self.ping_timeout_ms, 10_000, 600_000)?;
        let ping = match self.ping_interval_ms.unwrap_or(30_000) {
            0 => None,
            interval @ 100..=3_600_000 => Some(Ping {
                interval: Duration::from_millis(interval),
                timeout: ping_timeout,
            }),
            _ => {
                return invalid(
                    "ping_interval_ms",
                    "must be 0 (no pings) or between 100 and 3600000",
                );
            }
        };
        Ok(ConnectionPolicy {
            max_connections,
            max_per_ip: (max_per_ip > 0).then_some(max_per_ip),
            prelude_timeout,
            idle_timeout,
            body_timeout,
            ping,
        })
    }
}

// === impl ConnectionPolicy ===

impl ConnectionPolicy {
    /// The admin listener's policy: the same deadlines, 64 connections, at most 16 from one
    /// address (fewer if `max_connections_per_ip` says so), so that `/readyz` stays reachable.
    pub fn for_admin(&self) -> ConnectionPolicy {
        ConnectionPolicy {
            max_connections: ADMIN_MAX_CONNECTIONS,
            max_per_ip: self.max_per_ip.map(|cap| cap.min(ADMIN_MAX_PER_IP)),
            ..*self
        }
    }
}

/// `value` milliseconds (`default` when unset) as a duration, if between 100 and `max`.
fn millis(key: &str, value: Option<u64>, default: u64, max: u64) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if !(100..=max).contains(&value) {
        return invalid(key, format!("must be between 100 and {max}"));
    }
    Ok(Duration::from_millis(value))
}

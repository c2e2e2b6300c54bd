//! Configuration: command-line flags and `OTPGATE_*` variables over an optional TOML file,
//! validated into a typed [`Config`].
//!
//! The file is read into [`RawConfig`] (every key optional, unknown keys refused), the flags are
//! laid over it, and [`RawConfig::validate`] turns the result into a [`Config`] of durations,
//! non-zero numbers and parsed addresses, or a [`ConfigError`] naming the key at fault.
//! `otpgate.example.toml` at the repository root documents every key.

mod carriers;
mod clients;
mod connections;
mod error;
mod fraud_guard;
mod limits;
mod redis;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sms::Templates;

pub use self::carriers::{
    BindMode, CarrierConfig, CarrierKind, HttpVersion, RawCarrier, SmppSettings,
};
pub use self::clients::{ClientConfig, RawClient, RawWebhooks, WebhookPolicy, WebhookTarget};
pub use self::connections::{ConnectionPolicy, Ping, RawConnections};
pub use self::error::ConfigError;
use self::error::{invalid, is_absolute_http, secs};
pub use self::fraud_guard::{FraudGuardPolicy, RawFraudGuard};
pub use self::limits::{Limits, RawLimits, RawRule, RawVerification, Rule, VerificationPolicy};
use self::redis::validate_redis;
pub use self::redis::{RawRedis, RedisConfig, StoreKind};

/// Command-line flags. Each one overrides the same key of the config file.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "otpgate", version, about = "SMS one-time-passcode gateway")]
pub struct Cli {
    /// TOML config file; see otpgate.example.toml. Without it, embedded defaults apply.
    #[arg(long, short = 'c', env = "OTPGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address of the frontend API listener.
    #[arg(long, env = "OTPGATE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "OTPGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Storage back-end: "embedded" (in process memory) or "redis" (shared by instances).
    #[arg(long, env = "OTPGATE_STORE")]
    pub store: Option<String>,

    /// Redis URL for the redis back-end, e.g. redis://127.0.0.1:6379/ (a comma-separated list
    /// of nodes with `[redis] cluster = true`).
    #[arg(long, env = "OTPGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Hex server secret (32 bytes or more) keying the code HMACs. Prefer the variable.
    #[arg(long, env = "OTPGATE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Base URL carriers use to reach this gateway (for receipt_url).
    #[arg(long, env = "OTPGATE_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Seconds to finish requests and hand queued SMS to carriers after SIGTERM or SIGINT.
    #[arg(long, env = "OTPGATE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,

    /// Log format: "text" or "json".
    #[arg(long, env = "OTPGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Validate the configuration, print a summary and exit (0 when valid, 2 when not).
    #[arg(long)]
    pub check_config: bool,
}

/// How logs are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The config file as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub store: Option<String>,
    pub secret: Option<String>,
    pub public_url: Option<String>,
    pub default_locale: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub prelude_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub ping_interval_ms: Option<u64>,
    pub ping_timeout_ms: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub sweep_interval_ms: Option<u64>,
    #[serde(default)]
    pub verification: RawVerification,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub fraud_guard: RawFraudGuard,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub webhooks: RawWebhooks,
    #[serde(default)]
    pub redis: RawRedis,
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    #[serde(default)]
    pub carriers: Vec<RawCarrier>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub capacity: Option<usize>,
    pub policy: Option<String>,
    pub max_wait_ms: Option<u64>,
    pub overload_wait_ms: Option<u64>,
    pub overload_after_ms: Option<u64>,
    pub unseen_after_ms: Option<u64>,
}

/// The adaptive queue policy (`[queue] policy = "adaptive"`, docs/DESIGN.md section 4,
/// *Overload*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadPolicy {
    /// A new start whose SMS would wait longer than this is refused at once (`503`,
    /// `come_back_later`).
    pub max_wait: Duration,
    /// The oldest job's wait above which the queue counts as congested.
    pub target: Duration,
    /// How long it must stay congested to be in overload (newest first).
    pub after: Duration,
    /// Under overload, an SMS whose verification nobody has read for this long is held until
    /// someone does; `None`: never.
    pub unseen_after: Option<Duration>,
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where verifications, limits and the SMS queue live.
    pub store: StoreKind,
    /// Server secret keying code HMACs; `None` draws a random one at start-up.
    pub secret: Option<Vec<u8>>,
    /// Base URL put in each SMS's `receipt_url`.
    pub public_url: String,
    pub templates: Templates,
    pub max_body_bytes: usize,
    /// The API listener's connection guards (the admin listener's: [`ConnectionPolicy::for_admin`]).
    pub connections: ConnectionPolicy,
    pub shutdown_grace: Duration,
    pub sweep_interval: Duration,
    pub verification: VerificationPolicy,
    pub limits: Limits,
    /// The conversion monitor (`crate::fraud_guard`).
    pub fraud_guard: FraudGuardPolicy,
    pub queue_capacity: usize,
    /// `None`: the deadline policy (earliest deadline first always, and starts refused only
    /// when the predicted wait passes `max_extension`).
    pub overload: Option<OverloadPolicy>,
    pub webhooks: WebhookPolicy,
    pub carriers: Vec<CarrierConfig>,
    pub clients: Vec<ClientConfig>,
}

// === impl Config ===

impl Config {
    /// Reads the file named by `cli` (if any), lays the flags over it and validates the result.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut raw = match &cli.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        raw.apply_cli(cli);
        raw.validate()
    }

    /// Parses and validates a TOML document (for tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        RawConfig::from_toml(text, Path::new("<inline>"))?.validate()
    }

    /// Whether the API is open to anyone on the listener (no clients configured).
    pub fn is_unauthenticated(&self) -> bool {
        self.clients.is_empty()
    }
}

// === impl RawConfig ===

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        RawConfig::from_toml(&text, path)
    }

    fn from_toml(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Lays command-line flags (and their variables) over the file.
    pub fn apply_cli(&mut self, cli: &Cli) {
        if let Some(listen) = cli.listen {
            self.listen = Some(listen);
        }
        if let Some(admin_listen) = cli.admin_listen {
            self.admin_listen = Some(admin_listen);
        }
        if let Some(store) = &cli.store {
            self.store = Some(store.clone());
        }
        if let Some(url) = &cli.redis_url {
            self.redis.url = Some(url.clone());
            self.redis.urls = None;
        }
        if let Some(secret) = &cli.secret {
            self.secret = Some(secret.clone());
        }
        if let Some(public_url) = &cli.public_url {
            self.public_url = Some(public_url.clone());
        }
        if let Some(grace) = cli.shutdown_grace_secs {
            self.shutdown_grace_secs = Some(grace);
        }
    }

    /// Checks every key and builds the typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen = self.listen.unwrap_or(([127, 0, 0, 1], 8080).into());
        let admin_listen = self.admin_listen.unwrap_or(([127, 0, 0, 1], 9464).into());
        if listen == admin_listen && listen.port() != 0 {
            return invalid("admin_listen", "must differ from listen");
        }
        let store = match self.store.as_deref().unwrap_or("embedded") {
            "embedded" => StoreKind::Embedded,
            "redis" => StoreKind::Redis(validate_redis(self.redis, self.secret.is_some())?),
            other => {
                return invalid(
                    "store",
                    format!("unknown back-end {other:?}; use \"embedded\" or \"redis\""),
                );
            }
        };
        let secret = match self.secret {
            None => None,
            Some(hex_secret) => {
                let bytes =
                    hex::decode(hex_secret.trim()).or_else(|_| invalid("secret", "must be hex"))?;
                if bytes.len() < 32 {
                    return invalid("secret", "must be at least 32 bytes (64 hex digits)");
                }
                Some(bytes)
            }
        };
        let public_url = self
            .public_url
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        if !is_absolute_http(&public_url) {
            return invalid("public_url", "must be an absolute URL");
        }

        let default_locale = self.default_locale.unwrap_or_else(|| "en".to_owned());
        let templates = if self.templates.is_empty() {
            let builtin = Templates::builtin();
            if !builtin.has_locale(&default_locale) {
                return invalid("default_locale", "no built-in template for it (en, it)");
            }
            Templates::new(builtin_pairs(), &default_locale)
                .or_else(|error| invalid("templates", error.to_string()))?
        } else {
            let mut pairs: BTreeMap<String, String> = builtin_pairs().collect();
            // Keys are compared the way templates match locales, so `IT` replaces `it`.
            pairs.extend(
                self.templates
                    .into_iter()
                    .map(|(locale, text)| (locale.to_ascii_lowercase().replace('_', "-"), text)),
            );
            Templates::new(pairs, &default_locale)
                .or_else(|error| invalid("templates", error.to_string()))?
        };

        let max_body_bytes = self.max_body_bytes.unwrap_or(8 * 1024);
        if !(256..=1024 * 1024).contains(&max_body_bytes) {
            return invalid("max_body_bytes", "must be between 256 and 1048576");
        }
        let connections = RawConnections {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            prelude_timeout_ms: self.prelude_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            body_timeout_ms: self.body_timeout_ms,
            ping_interval_ms: self.ping_interval_ms,
            ping_timeout_ms: self.ping_timeout_ms,
        }
        .validate()?;
        let shutdown_grace = secs("shutdown_grace_secs", self.shutdown_grace_secs, 30, 0, 3600)?;
        let sweep_interval = Duration::from_millis(self.sweep_interval_ms.unwrap_or(1000));
        if sweep_interval.is_zero() || sweep_interval > Duration::from_secs(60) {
            return invalid("sweep_interval_ms", "must be between 1 and 60000");
        }

        let verification = self.verification.validate()?;
        let limits = self.limits.validate()?;
        let fraud_guard = self.fraud_guard.validate()?;
        let queue_capacity = self.queue.capacity.unwrap_or(200_000);
        if !(1..=100_000_000).contains(&queue_capacity) {
            return invalid("queue.capacity", "must be between 1 and 100000000");
        }
        let overload = self.queue.validate_policy()?;

        let webhooks = self.webhooks.validate()?;

        let mut carriers = Vec::with_capacity(self.carriers.len());
        let mut carrier_names = HashSet::new();
        for (index, raw) in self.carriers.into_iter().enumerate() {
            let carrier = raw.validate(index)?;
            if !carrier_names.insert(carrier.name.clone()) {
                return invalid(format!("carriers[{index}].name"), "duplicate carrier name");
            }
            carriers.push(carrier);
        }
        if carriers.len() > 64 {
            return invalid("carriers", "at most 64 carriers");
        }

        let mut clients = Vec::with_capacity(self.clients.len());
        let mut client_names = HashSet::new();
        let mut client_keys = HashSet::new();
        for (index, raw) in self.clients.into_iter().enumerate() {
            let client = raw.validate(index)?;
            if !client_names.insert(client.name.clone()) {
                return invalid(format!("clients[{index}].name"), "duplicate client name");
            }
            if !client_keys.insert(client.api_key_sha256) {
                return invalid(
                    format!("clients[{index}].api_key_sha256"),
                    "the same key belongs to another client",
                );
            }
            clients.push(client);
        }
        if clients.len() > 1000 {
            return invalid("clients", "at most 1000 clients");
        }
        if clients.is_empty() && !(listen.ip().is_loopback() && admin_listen.ip().is_loopback()) {
            return invalid(
                "clients",
                "no clients (API keys) are configured, which is allowed only while listen and \
                 admin_listen are both on loopback; add [[clients]] or bind to 127.0.0.1",
            );
        }

        if carriers.is_empty() && !clients.is_empty() {
            return invalid(
                "carriers",
                "none configured; the built-in console carrier, which prints codes, is only for \
                 development without [[clients]] on loopback",
            );
        }

        Ok(Config {
            listen,
            admin_listen,
            store,
            secret,
            public_url,
            templates,
            max_body_bytes,
            connections,
            shutdown_grace,
            sweep_interval,
            verification,
            limits,
            fraud_guard,
            queue_capacity,
            overload,
            webhooks,
            carriers,
            clients,
        })
    }
}

// === impl RawQueue ===

impl RawQueue {
    fn validate_policy(&self) -> Result<Option<OverloadPolicy>, ConfigError> {
        let millis = |key: &str, value: Option<u64>, default: u64, min: u64, max: u64| {
            let value = value.unwrap_or(default);
            if !(min..=max).contains(&value) {
                return invalid(
                    format!("queue.{key}"),
                    format!("must be between {min} and {max}"),
                );
            }
            Ok(Duration::from_millis(value))
        };
        // Checked whatever the policy, so that a typo shows before anyone switches policy.
        let max_wait = millis("max_wait_ms", self.max_wait_ms, 300_000, 1, 86_400_000)?;
        let target = millis(
            "overload_wait_ms",
            self.overload_wait_ms,
            5_000,
            1,
            3_600_000,
        )?;
        let after = millis(
            "overload_after_ms",
            self.overload_after_ms,
            30_000,
            0,
            3_600_000,
        )?;
        let unseen_after = millis(
            "unseen_after_ms",
            self.unseen_after_ms,
            300_000,
            0,
            86_400_000,
        )?;
        match self.policy.as_deref().unwrap_or("adaptive") {
            "adaptive" => Ok(Some(OverloadPolicy {
                max_wait,
                target,
                after,
                unseen_after: (!unseen_after.is_zero()).then_some(unseen_after),
            })),
            "deadline" => Ok(None),
            other => invalid(
                "queue.policy",
                format!("unknown policy {other:?}; use \"adaptive\" or \"deadline\""),
            ),
        }
    }
}

fn builtin_pairs() -> impl Iterator<Item = (String, String)> {
    crate::sms::BUILTIN_TEMPLATES
        .iter()
        .map(|(locale, text)| (locale.to_string(), text.to_string()))
}

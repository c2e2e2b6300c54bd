//! `[redis]` and the storage back-end: [`StoreKind`], and [`RedisConfig`] for the redis one.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, invalid};

/// `[redis]`: the redis back-end.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://host:port/db`; with `cluster`, any of the cluster's nodes.
    pub url: Option<String>,
    pub urls: Option<Vec<String>>,
    pub cluster: Option<bool>,
    pub key_prefix: Option<String>,
    pub pool_size: Option<usize>,
    pub timeout_ms: Option<u64>,
    pub claim_after_secs: Option<u64>,
}

/// The storage back-end.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// In process memory: one instance.
    Embedded,
    /// Redis or Redis Cluster, shared by every instance.
    Redis(RedisConfig),
}

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Every key starts with it, so several deployments can share one Redis.
    pub key_prefix: String,
    pub pool_size: usize,
    /// The longest a call to Redis may take, connection included.
    pub timeout: Duration,
    /// A job held this long by an instance that stopped acknowledging it is taken over by
    /// another.
    pub claim_after: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may carry a password.
        f.debug_struct("RedisConfig")
            .field("urls", &self.urls.len())
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("claim_after", &self.claim_after)
            .finish()
    }
}

/// Checks `[redis]` for the redis back-end, which also needs a secret shared by every instance.
pub(crate) fn validate_redis(raw: RawRedis, has_secret: bool) -> Result<RedisConfig, ConfigError> {
    if !has_secret {
        return invalid(
            "secret",
            "the redis back-end needs a secret shared by every instance (OTPGATE_SECRET), or \
             one instance could not check the codes another sent",
        );
    }
    let urls: Vec<String> = match (raw.url, raw.urls) {
        (Some(_), Some(_)) => return invalid("redis.urls", "give url or urls, not both"),
        (Some(url), None) => url
            .split(',')
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty())
            .collect(),
        (None, Some(urls)) => urls,
        (None, None) => vec!["redis://127.0.0.1:6379/".to_owned()],
    };
    if urls.is_empty() {
        return invalid("redis.url", "empty");
    }
    for url in &urls {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return invalid("redis.url", "must start with redis:// or rediss://");
        }
    }
    let cluster = raw.cluster.unwrap_or(false);
    if !cluster && urls.len() > 1 {
        return invalid("redis.url", "several URLs need `cluster = true`");
    }
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "otp".to_owned());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return invalid(
            "redis.key_prefix",
            "1 to 64 letters, digits, '-', '_', '.' or ':' (no braces: they name hash slots)",
        );
    }
    let pool_size = raw.pool_size.unwrap_or(16);
    if !(1..=1024).contains(&pool_size) {
        return invalid("redis.pool_size", "must be 1 to 1024");
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(1000);
    if !(10..=60_000).contains(&timeout_ms) {
        return invalid("redis.timeout_ms", "must be 10 to 60000");
    }
    let claim_after_secs = raw.claim_after_secs.unwrap_or(30);
    if !(1..=3600).contains(&claim_after_secs) {
        return invalid("redis.claim_after_secs", "must be 1 to 3600");
    }
    Ok(RedisConfig {
        urls,
        cluster,
        key_prefix,
        pool_size,
        timeout: Duration::from_millis(timeout_ms),
        claim_after: Duration::from_secs(claim_after_secs),
    })
}

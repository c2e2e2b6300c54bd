//! Why the redis back-end could not answer.

use std::time::Duration;

use deadpool_redis::redis;

/// Why the redis back-end could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: no connection: {0}")]
    Pool(String),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: unexpected answer: {0}")]
    Protocol(String),
}

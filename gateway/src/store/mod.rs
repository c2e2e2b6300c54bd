//! Where verifications live: the embedded store in process memory, or Redis.

pub mod embedded;
pub mod redis;

pub use self::embedded::{
    DeadlineWrite, Deferred, FailedChecks, IdempotencyEntry, IdempotencyKey, Shard, Store,
};

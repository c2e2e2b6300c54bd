//! The redis back-end: what must be shared by several gateway instances, or survive one, kept in
//! Redis (standalone or Cluster) through a deadpool-redis pool.
//!
//! A call reads what it needs (`LOAD`), runs the engine's own logic on that copy, and writes the
//! result back with `COMMIT`, one Lua script that checks the revision it read (optimistic
//! concurrency: another instance's write in between makes it start over), takes the phone's
//! send limit on Redis's clock, writes the record, the live index, the failed checks and the
//! deadline, and adds or acknowledges the SMS job, all in one step.
//!
//! # Files
//! - `keys.rs`: every key, with their table, and the hash-tag groups that keep one call's keys
//!   on one Cluster slot.
//! - `codec.rs`: how records, jobs, failed checks and stream entry ids are written.
//! - `pool.rs`: [`RedisStore`], its pool of multiplexed sockets, `connect`, and running one
//!   command or script with the call timeout. `error.rs`: [`StoreError`].
//! - `txn.rs`: `LOAD` and `COMMIT`, one engine call's read and write; `named.rs`: how their
//!   keys and arguments are named once, for the Rust that passes them and the Lua that reads
//!   them.
//! - `limits.rs`: client and IP send limits (`GCRA`), and the rule text both scripts read.
//! - `guess_caps.rs`: the caps on wrong codes per citizen IP and per client (`GUESSES`).
//! - `idempotency.rs`, `receipts.rs`, `deadlines.rs`: `Idempotency-Key`s, the receipt index
//!   and held receipts, the sweeper's deadlines and the delay watches.
//! - `streams.rs`: the SMS and webhook streams; `feed.rs`: the task that moves their entries
//!   into this instance's queue and webhook outbox (dropping and counting the events a client's
//!   full line cannot take, as the embedded outbox does).
//! - `changes.rs`: the one pub/sub subscription per instance that wakes long-polls when
//!   another instance changes their verification.
//! - `lua/`: the scripts, each with its keys, arguments and answer described at its top;
//!   `gcra.lua` is the GCRA function that `GCRA` (`limits.lua`), `GUESSES` (`guesses.lua`)
//!   and `COMMIT` start with.

pub mod backend;
pub mod changes;
mod codec;
mod deadlines;
mod error;
mod feed;
mod guess_caps;
mod idempotency;
mod keys;
mod limits;
mod named;
mod pool;
mod receipts;
mod streams;
mod txn;

pub use self::codec::{StreamEntry, decode_record, encode_record};
pub use self::error::StoreError;
pub use self::feed::{Feed, feed};
pub use self::guess_caps::GuessOp;
pub use self::idempotency::IdempotencyHolder;
pub use self::keys::{GROUPS, group, phone_group};
pub use self::pool::RedisStore;
pub use self::streams::StreamJob;
pub use self::txn::{Commit, Committed, FailedChecksOf, LiveWrite, LoadKeys, Loaded};

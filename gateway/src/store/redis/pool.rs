//! The connection to Redis: `RedisStore`, its pool of multiplexed sockets, and running a
//! command or a script on one with the call timeout.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_redis::redis::{self, RedisFuture, Value, aio::ConnectionLike};

use super::codec::StreamEntry;
use super::error::StoreError;
use super::keys::{CONSUMER_GROUP, GROUPS, Keys};
use crate::clock::Millis;
use crate::config::RedisConfig;
use crate::otp::PhoneKeys;
use crate::sync::lock;

/// The pool: one Redis, or a Cluster.
#[derive(Clone)]
enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection from either pool: a handle on a multiplexed socket, which many calls share at
/// once.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The redis back-end. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) shared: std::sync::Arc<Shared>,
}

pub(crate) struct Shared {
    /// Makes connections and checks them (deadpool recycles a broken one); calls do not hold
    /// pool objects but share the multiplexed sockets in `conns`.
    pool: Pool,
    /// `pool_size` multiplexed sockets, taken in turn; a slot is emptied when its socket
    /// fails, and filled again from the pool.
    conns: Box<[std::sync::Mutex<Option<Conn>>]>,
    next_conn: std::sync::atomic::AtomicUsize,
    keys: Keys,
    timeout: Duration,
    /// This instance's name in the consumer group.
    pub(crate) consumer: String,
    /// Whether the last call reached Redis; `/readyz` reports it.
    reachable: AtomicBool,
    /// Stream entries this instance has read and not yet acknowledged, with their group and
    /// lane: kept claimed (so no one takes them over) while held.
    pub(crate) held: std::sync::Mutex<HashMap<StreamEntry, (u8, u8)>>,
    /// Webhook events this instance read from the outbox streams and holds: `(group, entry)`,
    /// since two groups' streams may give the same entry id.
    pub(crate) held_events: std::sync::Mutex<std::collections::HashSet<(u8, StreamEntry)>>,
}

// === impl RedisStore ===

impl RedisStore {
    /// Builds the pool and checks that Redis answers; creates the consumer groups. `secret` is
    /// the server secret every instance shares: phones are named in keys by a hash keyed from it.
    ///
    /// # Errors
    /// When the URLs are malformed. An unreachable Redis is not an error here: the gateway
    /// starts not ready and connects when Redis comes up.
    pub async fn connect(
        config: &RedisConfig,
        secret: &[u8],
        lanes: &[u8],
    ) -> Result<RedisStore, StoreError> {
        let timeouts = deadpool_redis::Timeouts {
            wait: Some(config.timeout),
            create: Some(config.timeout),
            recycle: Some(config.timeout),
        };
        let pool_config = deadpool_redis::PoolConfig {
            max_size: config.pool_size,
            timeouts,
            ..Default::default()
        };
        let pool = if config.cluster {
            let mut cfg = deadpool_redis::cluster::Config::from_urls(config.urls.clone());
            cfg.pool = Some(pool_config);
            Pool::Cluster(
                cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .map_err(|error| StoreError::Pool(error.to_string()))?,
            )
        } else {
            let url = config.urls.first().cloned().unwrap_or_default();
            let mut cfg = deadpool_redis::Config::from_url(url);
            cfg.pool = Some(pool_config);
            Pool::Single(
                cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .map_err(|error| StoreError::Pool(error.to_string()))?,
            )
        };
        let mut random = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
        let store = RedisStore {
            shared: std::sync::Arc::new(Shared {
                pool,
                conns: (0..config.pool_size)
                    .map(|_| std::sync::Mutex::new(None))
                    .collect(),
                next_conn: std::sync::atomic::AtomicUsize::new(0),
                keys: Keys::new(config.key_prefix.clone(), PhoneKeys::new(secret)),
                timeout: config.timeout,
                consumer: format!("{}-{}", std::process::id(), hex::encode(random)),
                reachable: AtomicBool::new(false),
                held: std::sync::Mutex::new(HashMap::new()),
                held_events: std::sync::Mutex::new(std::collections::HashSet::new()),
            }),
        };
        if let Err(error) = store.prepare_streams(lanes).await {
            tracing::warn!(%error, "redis is not reachable yet; the gateway is not ready until it is");
        }
        Ok(store)
    }

    /// Creates each stream's consumer group (idempotent).
    pub async fn prepare_streams(&self, lanes: &[u8]) -> Result<(), StoreError> {
        for group in 0..GROUPS {
            let keys = lanes
                .iter()
                .map(|&lane| self.keys().stream(group, lane))
                .chain(std::iter::once(self.keys().outbox(group)));
            for key in keys {
                let result: Result<Value, StoreError> = self
                    .run(
                        redis::cmd("XGROUP")
                            .arg("CREATE")
                            .arg(&key)
                            .arg(CONSUMER_GROUP)
                            .arg("0")
                            .arg("MKSTREAM"),
                    )
                    .await;
                match result {
                    Ok(_) => {}
                    Err(StoreError::Redis(error)) if error.code() == Some("BUSYGROUP") => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// The pub/sub channel on which `COMMIT` publishes the ids of changed verifications.
    pub fn changes_channel(&self) -> String {
        self.shared.keys.changes()
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.shared.keys
    }

    /// Whether the last call reached Redis.
    pub fn is_reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }

    /// Pings Redis, updating [`RedisStore::is_reachable`].
    pub async fn ping(&self) -> bool {
        let answer: Result<String, _> = self.run(&redis::cmd("PING")).await;
        answer.is_ok()
    }

    /// A connection to run one call on, and its slot.
    async fn conn(&self) -> Result<(usize, Conn), StoreError> {
        let slot = self.shared.next_conn.fetch_add(1, Ordering::Relaxed) % self.shared.conns.len();
        if let Some(conn) = lock(&self.shared.conns[slot]).clone() {
            return Ok((slot, conn));
        }
        let conn = match &self.shared.pool {
            Pool::Single(pool) => pool
                .get()
                .await
                .map(|object| Conn::Single((*object).clone())),
            Pool::Cluster(pool) => pool
                .get()
                .await
                .map(|object| Conn::Cluster((*object).clone())),
        };
        let conn = conn.map_err(|error| {
            self.shared.reachable.store(false, Ordering::Relaxed);
            StoreError::Pool(error.to_string())
        })?;
        *lock(&self.shared.conns[slot]) = Some(conn.clone());
        Ok((slot, conn))
    }

    /// Runs a command with the call timeout, noting whether Redis answered.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.call(async |conn| cmd.query_async(conn).await).await
    }

    /// Sets `key` to `value` for `keep` (a millisecond at least).
    pub(crate) async fn set_for(
        &self,
        key: String,
        value: String,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let keep_ms = keep.as_millis().max(1) as u64;
        self.run(redis::cmd("SET").arg(key).arg(value).arg("PX").arg(keep_ms))
            .await
    }

    /// The members of a sorted set scored `now` or less, at most `count`.
    pub(crate) async fn due_members(
        &self,
        key: String,
        now: Millis,
        count: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.run(
            redis::cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(count),
        )
        .await
    }

    /// Runs a script with the call timeout, noting whether Redis answered.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.call(async |conn| invocation.invoke_async(conn).await)
            .await
    }

    async fn call<T>(
        &self,
        call: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let timeout = self.shared.timeout;
        let mut used = None;
        let result = tokio::time::timeout(timeout, async {
            let (slot, mut conn) = self.conn().await?;
            used = Some(slot);
            call(&mut conn).await.map_err(StoreError::from)
        })
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
        self.note(&result, used);
        result
    }

    /// Notes whether Redis answered; a socket that failed is let go, and its slot filled
    /// again from the pool on its next use.
    fn note<T>(&self, result: &Result<T, StoreError>, slot: Option<usize>) {
        let reached = match result {
            Ok(_) => true,
            // Redis answered, with an error: it is there.
            Err(StoreError::Redis(error)) => {
                !(error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout())
            }
            Err(_) => false,
        };
        self.shared.reachable.store(reached, Ordering::Relaxed);
        if let (false, Some(slot)) = (reached, slot) {
            lock(&self.shared.conns[slot]).take();
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.shared.keys.prefix())
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

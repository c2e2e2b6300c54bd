//! Long-polls waiting for a verification to change: always this instance's own, whatever the
//! back-end. This instance's changes wake them directly; on Redis, other instances' changes wake
//! them through the changes channel (`store::redis::changes`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::ids::VerificationId;
use crate::sync::lock;

/// Shards of the map: long-polls come and go on every worker.
const N_SHARDS: usize = 64;

/// One shard: each verification's `Notify`.
type Waiting = HashMap<VerificationId, Arc<Notify>>;

/// The long-polls waiting on each verification.
#[derive(Debug)]
pub struct Watchers {
    shards: Box<[Mutex<Waiting>]>,
}

impl Watchers {
    pub fn new() -> Watchers {
        Watchers {
            shards: (0..N_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The `Notify` a long-poll on `id` waits on; it fires at every change of `id`.
    pub fn watch(&self, id: &VerificationId) -> Arc<Notify> {
        lock(self.shard(id)).entry(*id).or_default().clone()
    }

    /// Wakes every long-poll waiting on `id`.
    pub fn notify(&self, id: &VerificationId) {
        if let Some(notify) = lock(self.shard(id)).get(id) {
            notify.notify_waiters();
        }
    }

    /// Wakes every long-poll, to read again (changes may have gone unheard).
    pub fn notify_all(&self) {
        for shard in self.shards.iter() {
            for notify in lock(shard).values() {
                notify.notify_waiters();
            }
        }
    }

    /// Forgets the verifications nobody waits on any more.
    pub fn prune(&self) {
        for shard in self.shards.iter() {
            lock(shard).retain(|_, notify| Arc::strong_count(notify) > 1);
        }
    }

    fn shard(&self, id: &VerificationId) -> &Mutex<Waiting> {
        &self.shards[id.as_bytes()[1] as usize % N_SHARDS]
    }
}

impl Default for Watchers {
    fn default() -> Self {
        Watchers::new()
    }
}

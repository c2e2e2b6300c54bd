//! Simulated handsets: the simulated carriers hand each SMS to the handset of the user who owns
//! the number, which delivers it to that user after a delay, or loses, duplicates or holds it
//! back, as the scenario says.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use tokio::sync::mpsc;

use crate::carriers::settings::{HandsetSettings, standard_normal};

/// How many SMS a handset keeps unread.
const INBOX: usize = 8;
const SHARDS: usize = 256;

/// Waiting users by index, and where their SMS go.
type Shard = HashMap<u64, mpsc::Sender<Box<str>>>;

/// Every user's handset. Users register while they wait for SMS.
#[derive(Debug)]
pub struct Handsets {
    shards: Box<[Mutex<Shard>]>,
    settings: HandsetSettings,
    pub counts: HandsetCounts,
}

/// What happened to SMS on their way to handsets.
#[derive(Debug, Default)]
pub struct HandsetCounts {
    /// SMS handed to a handset (after the carrier accepted them).
    pub received: AtomicU64,
    /// Lost on purpose (the scenario's `handsets.loss`).
    pub lost_on_purpose: AtomicU64,
    /// Duplicated on purpose (`handsets.duplicate`).
    pub duplicated_on_purpose: AtomicU64,
    /// For a user who was no longer waiting (gone, or already verified).
    pub to_absent_users: AtomicU64,
}

/// A user's registration; unregisters on drop.
#[derive(Debug)]
pub struct Inbox<'a> {
    handsets: &'a Handsets,
    user: u64,
    pub messages: mpsc::Receiver<Box<str>>,
}

impl Handsets {
    pub fn new(settings: HandsetSettings) -> Handsets {
        Handsets {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            settings,
            counts: HandsetCounts::default(),
        }
    }

    /// Turns `user`'s handset on: SMS to its number reach the returned inbox.
    pub fn register(&self, user: u64) -> Inbox<'_> {
        let (sender, messages) = mpsc::channel(INBOX);
        self.shard(user).insert(user, sender);
        Inbox {
            handsets: self,
            user,
            messages,
        }
    }

    /// Hands an SMS text to `user`'s handset, with the scenario's delay and faults.
    pub fn deliver(&self, user: u64, text: &str) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let Some(sender) = self.shard(user).get(&user).cloned() else {
            self.counts.to_absent_users.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut rng = rand::rng();
        if rng.random::<f64>() < self.settings.loss {
            self.counts.lost_on_purpose.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if rng.random::<f64>() < self.settings.duplicate {
            self.counts
                .duplicated_on_purpose
                .fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let z = standard_normal(&mut rng);
            let mut delay = self.settings.delay.sample_with(z);
            if rng.random::<f64>() < self.settings.reorder {
                // Held back long enough to arrive after a later SMS.
                delay = delay * 3 + self.settings.delay.sample_with(2.0);
            }
            let sender = sender.clone();
            let text: Box<str> = text.into();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // A user who stopped waiting meanwhile has dropped the inbox.
                let _ = sender.send(text).await;
            });
        }
    }

    fn shard(&self, user: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(user as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Inbox<'_> {
    fn drop(&mut self) {
        self.handsets.shard(self.user).remove(&self.user);
    }
}

//! Simulated handsets: the simulated carriers hand each SMS to the handset of the user who owns
//! the number, which delivers it to that user after a delay, or loses, duplicates or holds it
//! back, as the scenario says.
//!
//! A handset also remembers the users who left without a code (their inbox went away before any
//! SMS reached it), so an SMS that reaches one of them afterwards is told to the run's
//! [`Tally`] as an SMS to an absent citizen: one the carriers spent on nobody.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;
use tokio::sync::mpsc;

use crate::carriers::network::Tally;
use crate::carriers::settings::{HandsetSettings, standard_normal};

/// How many SMS a handset keeps unread.
const INBOX: usize = 8;
const SHARDS: usize = 256;

/// Users by index: waiting, with where their SMS go, or gone without a code.
type Shard = HashMap<u64, Slot>;

/// A user the handsets know of.
#[derive(Debug)]
enum Slot {
    Waiting(mpsc::Sender<Sms>),
    /// The user's inbox went away before an SMS reached it (gave up, expired, refused).
    LeftWithoutCode,
}

/// An SMS on a handset, and when it got there. Reads as its text.
#[derive(Debug)]
pub struct Sms {
    pub text: Box<str>,
    pub arrived: Instant,
}

/// Every user's handset. Users register while they wait for SMS.
#[derive(Debug)]
pub struct Handsets {
    /// Shared with the SMS still on their way to a handset, which look again at their user
    /// when they land.
    shards: Arc<[Mutex<Shard>]>,
    settings: HandsetSettings,
    tally: Arc<dyn Tally>,
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

/// A user's registration; unregisters on drop, remembering a user who left without a code.
#[derive(Debug)]
pub struct Inbox<'a> {
    handsets: &'a Handsets,
    user: u64,
    messages: mpsc::Receiver<Sms>,
    /// Whether an SMS reached the user through this inbox.
    reached: bool,
}

impl Handsets {
    pub fn new(settings: HandsetSettings, tally: Arc<dyn Tally>) -> Handsets {
        Handsets {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            settings,
            tally,
            counts: HandsetCounts::default(),
        }
    }

    /// Turns `user`'s handset on: SMS to its number reach the returned inbox.
    pub fn register(&self, user: u64) -> Inbox<'_> {
        let (sender, messages) = mpsc::channel(INBOX);
        lock(&self.shards, user).insert(user, Slot::Waiting(sender));
        Inbox {
            handsets: self,
            user,
            messages,
            reached: false,
        }
    }

    /// Hands an SMS text to `user`'s handset, with the scenario's delay and faults.
    pub fn deliver(&self, user: u64, text: &str) {
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let sender = match lock(&self.shards, user).get(&user) {
            Some(Slot::Waiting(sender)) => sender.clone(),
            absent => {
                if let Some(Slot::LeftWithoutCode) = absent {
                    self.tally.sms_to_absent();
                }
                self.counts.to_absent_users.fetch_add(1, Ordering::Relaxed);
                return;
            }
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
            let (shards, tally) = (self.shards.clone(), self.tally.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let sms = Sms {
                    text,
                    arrived: Instant::now(),
                };
                // A user who stopped waiting meanwhile has dropped the inbox: if it left without
                // a code, this SMS reached a citizen who was no longer there.
                if sender.send(sms).await.is_err()
                    && matches!(lock(&shards, user).get(&user), Some(Slot::LeftWithoutCode))
                {
                    tally.sms_to_absent();
                }
            });
        }
    }
}

impl Inbox<'_> {
    /// The next SMS on the handset; `None` once nothing can come.
    pub async fn recv(&mut self) -> Option<Sms> {
        let sms = self.messages.recv().await;
        self.reached |= sms.is_some();
        sms
    }
}

impl std::ops::Deref for Sms {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl Drop for Inbox<'_> {
    fn drop(&mut self) {
        let mut shard = lock(&self.handsets.shards, self.user);
        if self.reached {
            shard.remove(&self.user);
        } else {
            shard.insert(self.user, Slot::LeftWithoutCode);
        }
    }
}

fn lock(shards: &[Mutex<Shard>], user: u64) -> std::sync::MutexGuard<'_, Shard> {
    shards[(user as usize) % SHARDS]
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::carriers::settings::Dist;

    /// Counts the SMS to absent citizens.
    #[derive(Debug, Default)]
    struct Absent(AtomicU64);

    impl Tally for Absent {
        fn duplicate_sms(&self) {}
        fn sms_received(&self) {}
        fn sms_to_absent(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn handsets(delay: Duration) -> (Handsets, Arc<Absent>) {
        let absent = Arc::new(Absent::default());
        let mut settings = HandsetSettings::faultless();
        settings.delay = Dist::Constant(delay);
        (Handsets::new(settings, absent.clone()), absent)
    }

    #[tokio::test]
    async fn sms_to_users_who_left_without_a_code_are_told_apart() {
        let (handsets, absent) = handsets(Duration::ZERO);
        // User 1 gives up before any SMS: its SMS is for an absent citizen.
        drop(handsets.register(1));
        // User 2 gets its code and leaves: a late copy is for nobody waiting, but it had one.
        let mut inbox = handsets.register(2);
        handsets.deliver(2, "Codice: 111111");
        assert_eq!(&*inbox.recv().await.unwrap(), "Codice: 111111");
        drop(inbox);
        handsets.deliver(1, "Codice: 222222");
        handsets.deliver(2, "Codice: 111111");
        // User 3 was never there (another shard's).
        handsets.deliver(3, "Codice: 333333");
        assert_eq!(absent.0.load(Ordering::Relaxed), 1);
        assert_eq!(handsets.counts.to_absent_users.load(Ordering::Relaxed), 3);
        // User 1 comes back and waits again: its SMS reach it.
        let mut inbox = handsets.register(1);
        handsets.deliver(1, "Codice: 444444");
        assert_eq!(&*inbox.recv().await.unwrap(), "Codice: 444444");
        assert_eq!(absent.0.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_sms_on_its_way_when_its_user_gives_up_is_to_an_absent_citizen() {
        let (handsets, absent) = handsets(Duration::from_millis(50));
        let inbox = handsets.register(7);
        handsets.deliver(7, "Codice: 777777");
        drop(inbox);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(absent.0.load(Ordering::Relaxed), 1);
        // Handed to a handset that was on: not counted as absent at hand-over.
        assert_eq!(handsets.counts.to_absent_users.load(Ordering::Relaxed), 0);
    }
}

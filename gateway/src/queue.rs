//! The SMS queue: bounded, with a priority lane per client priority and earliest deadline first
//! inside a lane.
//!
//! A job names its verification and carries no text and no code: the dispatcher renders the SMS
//! when a carrier is ready for it, so a cancelled or expired verification is noticed then and its
//! job dropped instead of sent late. Jobs put back after a throttle or a temporary failure keep
//! their sequence number, and so their place in line.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::Millis;
use crate::store::VerificationId;
use crate::verification::CarrierId;

/// One SMS to send.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: VerificationId,
    /// Which send of the verification this is (1 for the first SMS).
    pub send_no: u8,
    /// Higher lanes are served first.
    pub lane: u8,
    /// Nothing is sent after this moment.
    pub deadline_ms: Millis,
    /// Order of arrival, for ties and fairness inside a lane.
    pub seq: u64,
    /// When the job first entered the queue.
    pub enqueued_ms: Millis,
    /// Submits already tried for this job.
    pub attempts: u16,
    /// A carrier to avoid if another is eligible: the one that sent the previous SMS (for a
    /// resend), or the one that just failed (for a retry).
    pub avoid_carrier: Option<CarrierId>,
    /// How often the avoided carrier has passed the job on; past a few passes it sends it
    /// itself, so a job never waits for a carrier that is not coming.
    pub passes: u8,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("sms queue: full")]
    Full,
    #[error("sms queue: closed")]
    Closed,
}

/// A cheap-clone handle to the queue.
#[derive(Clone, Debug)]
pub struct Queue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes dispatchers waiting for work, and for the queue to close.
    available: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by `Reverse(lane)` so iteration starts at the highest priority.
    lanes: BTreeMap<Reverse<u8>, LaneState>,
    len: usize,
    next_seq: u64,
    closed: bool,
    /// Jobs waiting out a retry pause outside the queue: they are coming back, so the queue is
    /// not drained while any are out.
    deferred: usize,
    /// Jobs taken by a dispatcher and not yet settled (sent, dropped, deferred or put back):
    /// one of them may yet come back, so the queue is not drained while any are out either.
    checked_out: usize,
}

#[derive(Debug, Default)]
struct LaneState {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Tickets handed out and jobs taken: their difference approximates a job's place in line.
    pushed: u64,
    popped: u64,
}

#[derive(Debug)]
struct Entry(Job);

/// A snapshot of one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneDepth {
    pub lane: u8,
    pub depth: usize,
}

// === impl Queue ===

impl Queue {
    pub fn new(capacity: usize) -> Queue {
        Queue {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                available: Notify::new(),
                capacity,
            }),
        }
    }

    /// Queues a new job unless the queue is full; returns its ticket in its lane.
    pub fn push(&self, mut job: Job) -> Result<u64, PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.len >= self.shared.capacity {
            return Err(PushError::Full);
        }
        job.seq = state.next_seq;
        state.next_seq += 1;
        let ticket = state.insert(job);
        drop(state);
        self.shared.available.notify_one();
        Ok(ticket)
    }

    /// Puts a job back after a throttle or a temporary failure, keeping its place in line. It
    /// was admitted once, so capacity does not apply; returns its ticket.
    pub fn requeue(&self, job: Job) -> u64 {
        let mut state = self.lock();
        let ticket = state.insert(job);
        drop(state);
        self.shared.available.notify_one();
        ticket
    }

    /// Takes the most urgent job, waiting for one. Returns `None` once the queue is closed and
    /// empty.
    pub async fn pop(&self) -> Option<Job> {
        loop {
            let notified = self.shared.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(job) = state.take() {
                    let more = state.len > 0;
                    drop(state);
                    if more {
                        // Pass the baton: another dispatcher may be waiting.
                        self.shared.available.notify_one();
                    }
                    return Some(job);
                }
                if state.closed && state.deferred == 0 && state.checked_out == 0 {
                    drop(state);
                    self.shared.available.notify_waiters();
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Takes the most urgent job if there is one.
    pub fn try_pop(&self) -> Option<Job> {
        self.lock().take()
    }

    /// Refuses new jobs from now on; dispatchers drain what is queued and then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.shared.available.notify_waiters();
    }

    /// Forgets every job (after the shutdown grace period ran out); returns how many.
    pub fn clear(&self) -> usize {
        let mut state = self.lock();
        let n_cleared = state.len + state.deferred;
        state.lanes.clear();
        state.len = 0;
        state.deferred = 0;
        state.checked_out = 0;
        drop(state);
        self.shared.available.notify_waiters();
        n_cleared
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether the queue was closed and has nothing left.
    pub fn is_drained(&self) -> bool {
        let state = self.lock();
        state.closed && state.len == 0 && state.deferred == 0 && state.checked_out == 0
    }

    /// Says a job taken with [`Queue::pop`] is done with: sent, dropped, deferred or put back.
    /// Every popped job is settled exactly once, after whatever put it back.
    pub fn settle(&self) {
        let mut state = self.lock();
        state.checked_out = state.checked_out.saturating_sub(1);
        let closed = state.closed;
        drop(state);
        if closed {
            self.shared.available.notify_waiters();
        }
    }

    /// Puts `job` back after `pause`, through `requeue` (which may drop it instead, if its
    /// deadline passed). Meanwhile the job counts as coming back: dispatchers do not stop at
    /// shutdown while it is out, and it holds no carrier's window.
    pub fn defer(&self, job: Job, pause: Duration, requeue: impl FnOnce(Job) + Send + 'static) {
        self.lock().deferred += 1;
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            requeue(job);
            // After `clear` (the grace period ran out) the count is already zero.
            let mut state = queue.lock();
            state.deferred = state.deferred.saturating_sub(1);
            drop(state);
            queue.shared.available.notify_waiters();
        });
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Jobs that a new job in `lane` would wait behind.
    pub fn ahead_of_new(&self, lane: u8) -> usize {
        let state = self.lock();
        state
            .lanes
            .range(..=Reverse(lane))
            .map(|(_, lane_state)| lane_state.heap.len())
            .sum()
    }

    /// Jobs ahead of the job holding `ticket` in `lane` (an estimate inside the lane, exact
    /// across lanes).
    pub fn ahead_of(&self, lane: u8, ticket: u64) -> usize {
        let state = self.lock();
        let higher: usize = state
            .lanes
            .range(..Reverse(lane))
            .map(|(_, lane_state)| lane_state.heap.len())
            .sum();
        let in_lane = state.lanes.get(&Reverse(lane)).map_or(0, |lane_state| {
            (ticket.saturating_sub(lane_state.popped) as usize).min(lane_state.heap.len())
        });
        higher + in_lane
    }

    /// Depth of every lane that has been used.
    pub fn depths(&self) -> Vec<LaneDepth> {
        let state = self.lock();
        state
            .lanes
            .iter()
            .map(|(Reverse(lane), lane_state)| LaneDepth {
                lane: *lane,
                depth: lane_state.heap.len(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the heap half-updated in a way that
        // matters more than losing the gateway, so poisoning is ignored.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// === impl State ===

impl State {
    fn insert(&mut self, job: Job) -> u64 {
        let lane = self.lanes.entry(Reverse(job.lane)).or_default();
        lane.pushed += 1;
        let ticket = lane.pushed;
        lane.heap.push(Reverse(Entry(job)));
        self.len += 1;
        ticket
    }

    fn take(&mut self) -> Option<Job> {
        for lane in self.lanes.values_mut() {
            if let Some(Reverse(Entry(job))) = lane.heap.pop() {
                lane.popped += 1;
                self.len -= 1;
                self.checked_out += 1;
                return Some(job);
            }
        }
        None
    }
}

// === impl Entry ===

impl Entry {
    fn key(&self) -> (Millis, u64) {
        (self.0.deadline_ms, self.0.seq)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.key().cmp(&other.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Phone;

    fn job(lane: u8, deadline_ms: Millis) -> Job {
        let (phone, _) = Phone::parse("+393331234567").unwrap();
        Job {
            id: VerificationId::new_for(&phone),
            send_no: 1,
            lane,
            deadline_ms,
            seq: 0,
            enqueued_ms: 0,
            attempts: 0,
            avoid_carrier: None,
            passes: 0,
        }
    }

    #[test]
    fn higher_lanes_first_then_earliest_deadline() {
        let queue = Queue::new(10);
        queue.push(job(0, 100)).unwrap();
        queue.push(job(0, 50)).unwrap();
        queue.push(job(2, 900)).unwrap();
        queue.push(job(1, 10)).unwrap();
        let order: Vec<(u8, Millis)> = std::iter::from_fn(|| queue.try_pop())
            .map(|job| (job.lane, job.deadline_ms))
            .collect();
        assert_eq!(order, [(2, 900), (1, 10), (0, 50), (0, 100)]);
    }

    #[test]
    fn bounded_but_requeue_always_fits() {
        let queue = Queue::new(1);
        queue.push(job(0, 1)).unwrap();
        assert_eq!(queue.push(job(0, 2)), Err(PushError::Full));
        let taken = queue.try_pop().unwrap();
        queue.push(job(0, 3)).unwrap();
        queue.requeue(taken);
        assert_eq!(queue.len(), 2);
        // The requeued job kept its place: it came first, so it leaves first on a tie.
        assert_eq!(queue.try_pop().unwrap().deadline_ms, 1);
    }

    #[test]
    fn requeued_job_keeps_its_place_among_equal_deadlines() {
        let queue = Queue::new(10);
        queue.push(job(0, 5)).unwrap();
        queue.push(job(0, 5)).unwrap();
        let first = queue.try_pop().unwrap();
        queue.requeue(first.clone());
        assert_eq!(queue.try_pop().unwrap().seq, first.seq);
    }

    #[test]
    fn counts_what_is_ahead() {
        let queue = Queue::new(10);
        let t1 = queue.push(job(0, 1)).unwrap();
        let t2 = queue.push(job(0, 2)).unwrap();
        queue.push(job(1, 2)).unwrap();
        assert_eq!(queue.ahead_of(0, t1), 2);
        assert_eq!(queue.ahead_of(0, t2), 3);
        assert_eq!(queue.ahead_of_new(0), 3);
        assert_eq!(queue.ahead_of_new(1), 1);
        assert_eq!(queue.ahead_of_new(5), 0);
    }

    #[tokio::test]
    async fn close_drains_then_ends() {
        let queue = Queue::new(10);
        queue.push(job(0, 1)).unwrap();
        queue.close();
        assert_eq!(queue.push(job(0, 1)), Err(PushError::Closed));
        assert!(queue.pop().await.is_some());
        assert!(!queue.is_drained(), "the job taken may come back");
        queue.settle();
        assert!(queue.pop().await.is_none());
        assert!(queue.is_drained());
    }

    #[tokio::test]
    async fn a_job_checked_out_at_close_may_come_back() {
        let queue = Queue::new(10);
        queue.push(job(0, 5)).unwrap();
        let taken = queue.pop().await.unwrap();
        queue.close();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await.map(|job| job.deadline_ms) }
        });
        tokio::task::yield_now().await;
        // The dispatcher that took it puts it back (a retry), then settles it.
        queue.requeue(taken);
        queue.settle();
        assert_eq!(waiter.await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_deferred_job_keeps_a_closed_queue_open_until_it_is_back() {
        let queue = Queue::new(10);
        let back = queue.clone();
        queue.defer(job(0, 7), Duration::from_millis(50), move |job| {
            back.requeue(job);
        });
        queue.close();
        assert!(!queue.is_drained());
        // pop waits for the deferred job rather than reporting the queue drained.
        assert_eq!(queue.pop().await.map(|job| job.deadline_ms), Some(7));
        queue.settle();
        assert!(queue.pop().await.is_none());
        assert!(queue.is_drained());
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let queue = Queue::new(10);
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await.map(|job| job.deadline_ms) }
        });
        tokio::task::yield_now().await;
        queue.push(job(0, 42)).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(42));
    }
}

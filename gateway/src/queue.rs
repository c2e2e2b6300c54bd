//! The SMS queue: bounded, with a priority lane per client priority and earliest deadline first
//! inside a lane, and routing: each job names the carriers that may send it.
//!
//! A job names its verification and carries no text and no code: the dispatcher renders the SMS
//! when a carrier is ready for it, so a cancelled or expired verification is noticed then and its
//! job dropped instead of sent late. Jobs put back after a throttle or a temporary failure keep
//! their sequence number, and so their place in line.
//!
//! Every carrier pulls from the one queue, taking the most urgent job it is eligible for
//! ([`Queue::pop`]); a lane keeps one heap per set of eligible carriers, so a pop looks at a
//! handful of heads, not at every job. When jobs wait, every carrier takes them as fast as its
//! pace and window allow, and weights do not matter. When carriers wait for jobs, a new job wakes
//! one idle eligible carrier, drawn by weight: that is how weights share out a light load.
//!
//! Under overload the order changes ([`OverloadPolicy`], the adaptive policy): once the oldest job has
//! waited longer than a target for a while (a standing queue, in the manner of CoDel), a carrier
//! takes the newest job of a lane first (adaptive LIFO), since its citizen is the one most
//! likely still looking at the screen; a job older than `unseen_after` goes before the newest,
//! marked for the engine to send it only if its citizen has shown up since (`check_presence`).
//! When the oldest job is younger than the target again, the order is earliest deadline first.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

use crate::clock::{Clock, Millis};
use crate::config::OverloadPolicy;
use crate::ids::{CarrierId, VerificationId};
use crate::routing::CarrierSet;

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
    /// The carriers that may send it (their prefix rules), never empty.
    pub carriers: CarrierSet,
    /// A carrier to avoid if another is eligible: the one that sent the previous SMS (for a
    /// resend), or the one that just failed (for a retry).
    pub avoid_carrier: Option<CarrierId>,
    /// How often the avoided carrier has passed the job on; past a few passes it sends it
    /// itself, so a job never waits for a carrier that is not coming.
    pub passes: u8,
    /// What its back-end needs to acknowledge it when it ends (on Redis, its stream entry).
    pub entry: Option<crate::ids::AckToken>,
    /// The verification as the back-end wrote it when the job was prepared, and its revision,
    /// when the back-end reads before it writes (Redis): the carrier's answer is recorded on it
    /// without reading it again.
    pub snapshot: Option<Box<(u64, crate::verification::Verification)>>,
    /// Taken while the queue was in overload: the engine sends it only if its citizen was seen
    /// within `unseen_after`, and holds it otherwise.
    pub check_presence: bool,
}

impl Job {
    /// The job of a verification's first SMS.
    pub fn first(
        id: VerificationId,
        lane: u8,
        deadline_ms: Millis,
        carriers: CarrierSet,
        now: Millis,
    ) -> Job {
        Job::resend(id, 1, lane, deadline_ms, carriers, None, now)
    }

    /// The job of send `send_no`, avoiding the carrier that sent the previous SMS if another
    /// may take it.
    pub fn resend(
        id: VerificationId,
        send_no: u8,
        lane: u8,
        deadline_ms: Millis,
        carriers: CarrierSet,
        avoid_carrier: Option<CarrierId>,
        now: Millis,
    ) -> Job {
        Job {
            id,
            send_no,
            lane,
            deadline_ms,
            seq: 0,
            enqueued_ms: now,
            attempts: 0,
            carriers,
            avoid_carrier,
            passes: 0,
            entry: None,
            snapshot: None,
            check_presence: false,
        }
    }

    /// The carriers to wake for it: those eligible, less the one it avoids unless it is the only
    /// one.
    fn wanted_carriers(&self) -> CarrierSet {
        let avoided = self.avoid_carrier.map_or(0, |id| 1 << id);
        match self.carriers & !avoided {
            0 => self.carriers,
            others => others,
        }
    }
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
    /// One per carrier: wakes it when a job it may take arrives, or when the queue closes.
    wake: Box<[Notify]>,
    /// Each carrier's weight, for the choice of which idle carrier to wake.
    weights: Box<[u32]>,
    capacity: usize,
    /// The adaptive policy and the clock it reads; `None` is earliest deadline first always.
    overload: Option<(OverloadPolicy, Clock)>,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by `Reverse(lane)` so iteration starts at the highest priority.
    lanes: BTreeMap<Reverse<u8>, LaneState>,
    len: usize,
    next_seq: u64,
    closed: bool,
    /// Carriers waiting in `pop` for a job: ready to send at once.
    idle: CarrierSet,
    /// Jobs waiting out a retry pause outside the queue: they are coming back, so the queue is
    /// not drained while any are out.
    deferred: usize,
    /// Jobs taken by a dispatcher and not yet settled (sent, dropped, deferred or put back):
    /// one of them may yet come back, so the queue is not drained while any are out either.
    checked_out: usize,
    /// Jobs taken by any carrier since start-up (the pace of a lagging carrier's probes).
    popped: u64,
    /// The adaptive policy's reading of the queue.
    mode: Mode,
}

/// Whether the queue is in overload, and what it counted.
#[derive(Debug, Default)]
struct Mode {
    /// Since when the oldest job has waited longer than the target, as first noticed.
    above_since: Option<Millis>,
    overloaded: bool,
    /// Jobs taken under overload ahead of a more urgent one.
    out_of_order: u64,
    /// SMS the carriers accepted lately: what the queue really drains.
    accepted: Meter,
}

#[derive(Debug, Default)]
struct LaneState {
    /// One group per set of eligible carriers; there are as many sets as distinct outcomes of
    /// the prefix rules, usually one.
    groups: Vec<Group>,
    len: usize,
    /// Tickets handed out and jobs taken: their difference approximates a job's place in line.
    pushed: u64,
    popped: u64,
}

/// The jobs of one lane that the same carriers may send, by urgency and by arrival.
#[derive(Debug)]
struct Group {
    carriers: CarrierSet,
    by_deadline: BTreeMap<(Millis, u64), Job>,
    /// When the job was first queued (on a shared store, when its verification queued it,
    /// whichever instance holds it now) and its sequence number, to its deadline.
    by_arrival: BTreeMap<(Millis, u64), Millis>,
}

/// How the next job is chosen.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// Earliest deadline first.
    Urgent,
    /// Under overload: a job queued at or before `stale_before` first (oldest first), else the
    /// newest.
    Newest { stale_before: Option<Millis> },
}

/// Events per second over the last few slots of a sliding window.
#[derive(Debug, Default)]
struct Meter {
    slot_ms: Millis,
    /// When it began watching.
    since: Option<Millis>,
    /// The slot `slot` is counted in `counts[slot % SLOTS]`.
    slot: Millis,
    counts: [u32; METER_SLOTS],
}

const METER_SLOTS: usize = 8;

/// What the adaptive policy reads of the queue, for admission and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverloadReading {
    pub overloaded: bool,
    /// How long the oldest queued job has waited.
    pub oldest_wait: Duration,
    /// Jobs taken under overload ahead of a more urgent one, since start-up.
    pub out_of_order: u64,
    /// SMS the carriers accepted per second over the last `overload_after` (at least a
    /// second), once that much has been seen.
    pub accepted_per_sec: Option<f64>,
}

/// A snapshot of one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneDepth {
    pub lane: u8,
    pub depth: usize,
}

// === impl Queue ===

impl Queue {
    /// A queue for carriers with these weights (carrier ids are indices; at most 64).
    pub fn new(capacity: usize, weights: &[NonZeroU32]) -> Queue {
        Queue::with_policy(capacity, weights, None)
    }

    /// A queue that follows the adaptive policy when `overload` is some, read on `clock`.
    pub fn with_policy(
        capacity: usize,
        weights: &[NonZeroU32],
        overload: Option<(OverloadPolicy, Clock)>,
    ) -> Queue {
        assert!(weights.len() <= 64, "at most 64 carriers");
        let mut state = State::default();
        if let Some((policy, _)) = &overload {
            // The meter's window is the time the queue must stay congested, at least a second.
            let window_ms = (policy.after.as_millis() as Millis).max(1000);
            state.mode.accepted.slot_ms = (window_ms / METER_SLOTS as Millis).max(1);
        }
        Queue {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                wake: weights.iter().map(|_| Notify::new()).collect(),
                weights: weights.iter().map(|w| w.get()).collect(),
                capacity,
                overload,
            }),
        }
    }

    /// Queues a new job unless the queue is full; returns its ticket in its lane.
    pub fn push(&self, mut job: Job) -> Result<u64, PushError> {
        self.route_known(&mut job);
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.len >= self.shared.capacity {
            return Err(PushError::Full);
        }
        job.seq = state.next_seq;
        state.next_seq += 1;
        let (wanted, eligible) = (job.wanted_carriers(), job.carriers);
        let ticket = state.insert(job);
        let woken = self
            .choose_idle(&mut state, wanted)
            .or_else(|| self.choose_idle(&mut state, eligible));
        drop(state);
        self.wake(woken);
        Ok(ticket)
    }

    /// Puts a job back after a throttle or a temporary failure, keeping its place in line. It
    /// was admitted once, so capacity does not apply; returns its ticket.
    pub fn requeue(&self, mut job: Job) -> u64 {
        self.route_known(&mut job);
        let mut state = self.lock();
        let (wanted, eligible) = (job.wanted_carriers(), job.carriers);
        let ticket = state.insert(job);
        let woken = self
            .choose_idle(&mut state, wanted)
            .or_else(|| self.choose_idle(&mut state, eligible));
        drop(state);
        self.wake(woken);
        ticket
    }

    /// Keeps a job's eligible set within the carriers this queue serves. A job read back from a
    /// shared store may name carriers an earlier configuration had: it keeps those still here,
    /// and if none is, any carrier may send it, so that no job waits for a carrier that is gone.
    fn route_known(&self, job: &mut Job) {
        let known: CarrierSet = match self.shared.weights.len() {
            0 => return,
            64.. => CarrierSet::MAX,
            n => (1 << n) - 1,
        };
        job.carriers = match job.carriers & known {
            0 => known,
            still_here => still_here,
        };
    }

    /// Takes the most urgent job `carrier` may send, waiting for one. Returns `None` once no job
    /// can come for it any more: the queue is closed, holds nothing it may send, and has no job
    /// deferred or checked out that could come back.
    pub async fn pop(&self, carrier: CarrierId) -> Option<Job> {
        let bit: CarrierSet = 1 << carrier;
        // Should this future be dropped while the carrier waits, the guard takes it off the
        // idle set and offers whatever it may have been woken for to another carrier.
        let mut guard = IdleGuard {
            queue: self,
            bit,
            armed: false,
        };
        loop {
            let notified = self.shared.wake[carrier as usize].notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(job) = self.take(&mut state, bit, |_| true) {
                    state.idle &= !bit;
                    guard.armed = false;
                    // Pass the baton: another idle carrier may take what is left.
                    let waiting = state.waiting_for();
                    let woken = self.choose_idle(&mut state, waiting);
                    drop(state);
                    self.wake(woken);
                    return Some(job);
                }
                if state.closed && state.deferred == 0 && state.checked_out == 0 {
                    state.idle &= !bit;
                    guard.armed = false;
                    return None;
                }
                state.idle |= bit;
                guard.armed = true;
            }
            notified.await;
        }
    }

    /// Takes the most urgent job `carrier` may send, if there is one.
    pub fn try_pop(&self, carrier: CarrierId) -> Option<Job> {
        let mut state = self.lock();
        self.take(&mut state, 1 << carrier, |_| true)
    }

    /// Takes the most urgent job `carrier` may send among those `wanted` accepts (looking at
    /// the candidate of each of its groups), if there is one.
    pub fn try_pop_where(&self, carrier: CarrierId, wanted: impl Fn(&Job) -> bool) -> Option<Job> {
        let mut state = self.lock();
        self.take(&mut state, 1 << carrier, wanted)
    }

    /// Counts an SMS a carrier accepted: what the queue really drains, which admission compares
    /// with the configured pace under overload.
    pub fn accepted(&self) {
        if let Some((_, clock)) = &self.shared.overload {
            let now = clock.now_ms();
            self.lock().mode.accepted.count(now);
        }
    }

    /// The adaptive policy's reading of the queue now; `None` under the deadline policy.
    pub fn overload(&self) -> Option<OverloadReading> {
        let (policy, clock) = self.shared.overload.as_ref()?;
        let now = clock.now_ms();
        let mut state = self.lock();
        state.update_mode(policy, now);
        let oldest_wait = state
            .oldest_enqueued()
            .map_or(0, |enqueued| now.saturating_sub(enqueued));
        let window_ms = (policy.after.as_millis() as Millis).max(1000);
        Some(OverloadReading {
            overloaded: state.mode.overloaded,
            oldest_wait: Duration::from_millis(oldest_wait),
            out_of_order: state.mode.out_of_order,
            accepted_per_sec: state.mode.accepted.per_sec(now, window_ms),
        })
    }

    /// Takes the next job for a carrier in `bit` by the queue's policy.
    fn take(
        &self,
        state: &mut State,
        bit: CarrierSet,
        wanted: impl Fn(&Job) -> bool,
    ) -> Option<Job> {
        let pick = match &self.shared.overload {
            None => Pick::Urgent,
            Some((policy, clock)) => {
                let now = clock.now_ms();
                state.update_mode(policy, now);
                if state.mode.overloaded {
                    Pick::Newest {
                        stale_before: policy
                            .unseen_after
                            .map(|unseen| now.saturating_sub(unseen.as_millis() as Millis)),
                    }
                } else {
                    Pick::Urgent
                }
            }
        };
        state.take(bit, wanted, pick)
    }

    /// Refuses new jobs from now on; dispatchers drain what is queued and then stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake_all();
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
        self.wake_all();
        n_cleared
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Jobs taken from the queue by any carrier since start-up.
    pub fn popped(&self) -> u64 {
        self.lock().popped
    }

    /// Whether the queue was closed (shutdown began).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Whether the queue was closed and has nothing left.
    pub fn is_drained(&self) -> bool {
        let state = self.lock();
        state.closed && state.len == 0 && state.deferred == 0 && state.checked_out == 0
    }

    /// Whether nothing can come for `carrier` any more: the queue is closed, holds no job it
    /// may send, and has nothing deferred or checked out.
    pub fn is_done_for(&self, carrier: CarrierId) -> bool {
        let state = self.lock();
        state.closed
            && state.deferred == 0
            && state.checked_out == 0
            && state.waiting_for() & (1 << carrier) == 0
    }

    /// Says a job taken with [`Queue::pop`] is done with: sent, dropped, deferred or put back.
    /// Every popped job is settled exactly once, after whatever put it back.
    pub fn settle(&self) {
        let mut state = self.lock();
        state.checked_out = state.checked_out.saturating_sub(1);
        let closed = state.closed;
        drop(state);
        if closed {
            self.wake_all();
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
            let closed = state.closed;
            drop(state);
            if closed {
                queue.wake_all();
            }
        });
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Jobs that a new job in `lane` for `carriers` would wait behind: those in its lane and
    /// higher ones that some of the same carriers may send.
    pub fn ahead_of_new(&self, lane: u8, carriers: CarrierSet) -> usize {
        let state = self.lock();
        state
            .lanes
            .range(..=Reverse(lane))
            .map(|(_, lane_state)| lane_state.len_for(carriers))
            .sum()
    }

    /// Jobs ahead of the job holding `ticket` in `lane`, for `carriers` (an estimate inside the
    /// lane, exact across lanes).
    pub fn ahead_of(&self, lane: u8, ticket: u64, carriers: CarrierSet) -> usize {
        let state = self.lock();
        let higher: usize = state
            .lanes
            .range(..Reverse(lane))
            .map(|(_, lane_state)| lane_state.len_for(carriers))
            .sum();
        let in_lane = state.lanes.get(&Reverse(lane)).map_or(0, |lane_state| {
            (ticket.saturating_sub(lane_state.popped) as usize).min(lane_state.len_for(carriers))
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
                depth: lane_state.len,
            })
            .collect()
    }

    /// Picks, by weight, one idle carrier in `eligible` to wake, and marks it busy so that the
    /// next job wakes another.
    fn choose_idle(&self, state: &mut State, eligible: CarrierSet) -> Option<usize> {
        let candidates = state.idle & eligible;
        if candidates == 0 {
            return None;
        }
        let weight_of = |id: usize| self.shared.weights.get(id).copied().unwrap_or(1);
        let mut ids = (0..64usize).filter(|id| candidates & (1 << id) != 0);
        let total: u64 = ids.clone().map(|id| u64::from(weight_of(id))).sum();
        let mut draw = rand::rng().random_range(0..total);
        // `draw` is below the total, so some carrier's slice holds it.
        let chosen = ids.find(|&id| {
            let weight = u64::from(weight_of(id));
            if draw < weight {
                true
            } else {
                draw -= weight;
                false
            }
        })?;
        state.idle &= !(1 << chosen);
        Some(chosen)
    }

    fn wake(&self, carrier: Option<usize>) {
        if let Some(notify) = carrier.and_then(|id| self.shared.wake.get(id)) {
            notify.notify_one();
        }
    }

    fn wake_all(&self) {
        for notify in &self.shared.wake {
            notify.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.shared.state)
    }
}

/// Clears a carrier's idle bit when its `pop` is dropped while waiting.
struct IdleGuard<'a> {
    queue: &'a Queue,
    bit: CarrierSet,
    /// Set while the carrier is idle, or woken and not yet back in the queue's lock.
    armed: bool,
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.queue.lock();
        state.idle &= !self.bit;
        // A job may have been promised to this carrier: offer it to another idle one.
        let waiting = state.waiting_for();
        let woken = self.queue.choose_idle(&mut state, waiting);
        drop(state);
        self.queue.wake(woken);
    }
}

// === impl LaneState ===

impl LaneState {
    /// Jobs in this lane that any of `carriers` may send.
    fn len_for(&self, carriers: CarrierSet) -> usize {
        self.groups
            .iter()
            .filter(|group| group.carriers & carriers != 0)
            .map(|group| group.by_deadline.len())
            .sum()
    }
}

// === impl State ===

impl State {
    fn insert(&mut self, mut job: Job) -> u64 {
        let lane = self.lanes.entry(Reverse(job.lane)).or_default();
        lane.pushed += 1;
        let ticket = lane.pushed;
        let index = match lane
            .groups
            .iter()
            .position(|group| group.carriers == job.carriers)
        {
            Some(index) => index,
            None => {
                lane.groups.push(Group {
                    carriers: job.carriers,
                    by_deadline: BTreeMap::new(),
                    by_arrival: BTreeMap::new(),
                });
                lane.groups.len() - 1
            }
        };
        let group = &mut lane.groups[index];
        // Whether to look for its citizen is decided when it is taken again.
        job.check_presence = false;
        // A job keeps its sequence number when it is put back; one that never had one here
        // (or whose number is taken) gets a new one, so no job ever replaces another.
        if group.by_deadline.contains_key(&(job.deadline_ms, job.seq))
            || group.by_arrival.contains_key(&(job.enqueued_ms, job.seq))
        {
            job.seq = self.next_seq;
            self.next_seq += 1;
        }
        group
            .by_arrival
            .insert((job.enqueued_ms, job.seq), job.deadline_ms);
        group.by_deadline.insert((job.deadline_ms, job.seq), job);
        lane.len += 1;
        self.len += 1;
        ticket
    }

    /// The next job for a carrier in `bit` (and that `wanted` accepts, looking at each group's
    /// candidate): from the highest lane holding one, the earliest deadline among the heads of
    /// the groups it may take from, or under overload the job `pick` names.
    fn take(&mut self, bit: CarrierSet, wanted: impl Fn(&Job) -> bool, pick: Pick) -> Option<Job> {
        for lane in self.lanes.values_mut() {
            let eligible = || {
                lane.groups
                    .iter()
                    .enumerate()
                    .filter(|(_, group)| group.carriers & bit != 0)
            };
            let urgent = eligible()
                .filter_map(|(index, group)| {
                    let job = group.by_deadline.values().next()?;
                    wanted(job).then_some((index, (job.deadline_ms, job.seq)))
                })
                .min_by_key(|(_, key)| *key);
            let chosen = match pick {
                Pick::Urgent => urgent,
                Pick::Newest { stale_before } => {
                    let stale = stale_before.and_then(|cutoff| {
                        eligible()
                            .filter_map(|(index, group)| {
                                let ((enqueued, seq), deadline) =
                                    group.by_arrival.first_key_value()?;
                                let job = group.by_deadline.get(&(*deadline, *seq))?;
                                (*enqueued <= cutoff && wanted(job)).then_some((
                                    index,
                                    (*enqueued, *seq),
                                    (*deadline, *seq),
                                ))
                            })
                            .min_by_key(|(_, arrival, _)| *arrival)
                            .map(|(index, _, key)| (index, key))
                    });
                    stale.or_else(|| {
                        eligible()
                            .filter_map(|(index, group)| {
                                let ((enqueued, seq), deadline) =
                                    group.by_arrival.last_key_value()?;
                                let job = group.by_deadline.get(&(*deadline, *seq))?;
                                wanted(job).then_some((index, (*enqueued, *seq), (*deadline, *seq)))
                            })
                            .max_by_key(|(_, arrival, _)| *arrival)
                            .map(|(index, _, key)| (index, key))
                    })
                }
            };
            let Some((index, key)) = chosen else {
                continue;
            };
            let group = &mut lane.groups[index];
            let mut job = group.by_deadline.remove(&key)?;
            group.by_arrival.remove(&(job.enqueued_ms, job.seq));
            lane.len -= 1;
            lane.popped += 1;
            self.popped += 1;
            self.len -= 1;
            self.checked_out += 1;
            if let Pick::Newest { .. } = pick {
                job.check_presence = true;
                if urgent.map(|(_, urgent_key)| urgent_key) != Some(key) {
                    self.mode.out_of_order += 1;
                }
            }
            return Some(job);
        }
        None
    }

    /// The carriers some queued job is waiting for.
    fn waiting_for(&self) -> CarrierSet {
        self.lanes
            .values()
            .flat_map(|lane| lane.groups.iter())
            .filter(|group| !group.by_deadline.is_empty())
            .fold(0, |set, group| set | group.carriers)
    }

    /// When the job waiting longest was queued.
    fn oldest_enqueued(&self) -> Option<Millis> {
        self.lanes
            .values()
            .flat_map(|lane| lane.groups.iter())
            .filter_map(|group| group.by_arrival.first_key_value())
            .map(|((enqueued, _), _)| *enqueued)
            .min()
    }

    /// Enters overload once the oldest job has waited longer than the target for `after`, and
    /// leaves it as soon as the oldest job is younger than the target (or the queue is empty).
    fn update_mode(&mut self, policy: &OverloadPolicy, now: Millis) {
        let target = policy.target.as_millis() as Millis;
        let congested = self
            .oldest_enqueued()
            .is_some_and(|enqueued| now.saturating_sub(enqueued) > target);
        if !congested {
            self.mode.above_since = None;
            self.mode.overloaded = false;
            return;
        }
        let since = *self.mode.above_since.get_or_insert(now);
        if now.saturating_sub(since) >= policy.after.as_millis() as Millis {
            self.mode.overloaded = true;
        }
    }
}

// === impl Meter ===

impl Meter {
    fn count(&mut self, now: Millis) {
        self.roll(now);
        let slot = (self.slot % METER_SLOTS as Millis) as usize;
        self.counts[slot] = self.counts[slot].saturating_add(1);
    }

    /// Events per second over the complete slots of the last `window_ms`; `None` until that
    /// much time has been watched.
    fn per_sec(&mut self, now: Millis, window_ms: Millis) -> Option<f64> {
        self.roll(now);
        let since = self.since?;
        if self.slot_ms == 0 || now.saturating_sub(since) < window_ms {
            return None;
        }
        let current = (self.slot % METER_SLOTS as Millis) as usize;
        let complete: u64 = self
            .counts
            .iter()
            .enumerate()
            .filter(|(slot, _)| *slot != current)
            .map(|(_, count)| u64::from(*count))
            .sum();
        let span_ms = self.slot_ms * (METER_SLOTS as Millis - 1);
        Some(complete as f64 * 1000.0 / span_ms as f64)
    }

    /// Moves to the slot of `now`, clearing the slots passed over.
    fn roll(&mut self, now: Millis) {
        if self.slot_ms == 0 {
            return;
        }
        self.since.get_or_insert(now);
        let slot = now / self.slot_ms;
        if slot <= self.slot {
            return;
        }
        if slot - self.slot >= METER_SLOTS as Millis {
            self.counts = [0; METER_SLOTS];
        } else {
            for passed in self.slot + 1..=slot {
                self.counts[(passed % METER_SLOTS as Millis) as usize] = 0;
            }
        }
        self.slot = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Phone;

    const ONE: &[NonZeroU32] = &[NonZeroU32::MIN];

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
            carriers: 1,
            avoid_carrier: None,
            passes: 0,
            entry: None,
            snapshot: None,
            check_presence: false,
        }
    }

    #[test]
    fn higher_lanes_first_then_earliest_deadline() {
        let queue = Queue::new(10, ONE);
        queue.push(job(0, 100)).unwrap();
        queue.push(job(0, 50)).unwrap();
        queue.push(job(2, 900)).unwrap();
        queue.push(job(1, 10)).unwrap();
        let order: Vec<(u8, Millis)> = std::iter::from_fn(|| queue.try_pop(0))
            .map(|job| (job.lane, job.deadline_ms))
            .collect();
        assert_eq!(order, [(2, 900), (1, 10), (0, 50), (0, 100)]);
    }

    #[test]
    fn bounded_but_requeue_always_fits() {
        let queue = Queue::new(1, ONE);
        queue.push(job(0, 1)).unwrap();
        assert_eq!(queue.push(job(0, 2)), Err(PushError::Full));
        let taken = queue.try_pop(0).unwrap();
        queue.push(job(0, 3)).unwrap();
        queue.requeue(taken);
        assert_eq!(queue.len(), 2);
        // The requeued job kept its place: it came first, so it leaves first on a tie.
        assert_eq!(queue.try_pop(0).unwrap().deadline_ms, 1);
    }

    #[test]
    fn requeued_job_keeps_its_place_among_equal_deadlines() {
        let queue = Queue::new(10, ONE);
        queue.push(job(0, 5)).unwrap();
        queue.push(job(0, 5)).unwrap();
        let first = queue.try_pop(0).unwrap();
        queue.requeue(first.clone());
        assert_eq!(queue.try_pop(0).unwrap().seq, first.seq);
    }

    #[test]
    fn counts_what_is_ahead() {
        let queue = Queue::new(10, ONE);
        let t1 = queue.push(job(0, 1)).unwrap();
        let t2 = queue.push(job(0, 2)).unwrap();
        queue.push(job(1, 2)).unwrap();
        assert_eq!(queue.ahead_of(0, t1, 1), 2);
        assert_eq!(queue.ahead_of(0, t2, 1), 3);
        assert_eq!(queue.ahead_of_new(0, 1), 3);
        assert_eq!(queue.ahead_of_new(1, 1), 1);
        assert_eq!(queue.ahead_of_new(5, 1), 0);
        // Jobs only other carriers may send are not ahead.
        assert_eq!(queue.ahead_of_new(0, 0b10), 0);
    }

    #[tokio::test]
    async fn close_drains_then_ends() {
        let queue = Queue::new(10, ONE);
        queue.push(job(0, 1)).unwrap();
        queue.close();
        assert_eq!(queue.push(job(0, 1)), Err(PushError::Closed));
        assert!(queue.pop(0).await.is_some());
        assert!(!queue.is_drained(), "the job taken may come back");
        queue.settle();
        assert!(queue.pop(0).await.is_none());
        assert!(queue.is_drained());
    }

    #[tokio::test]
    async fn a_job_checked_out_at_close_may_come_back() {
        let queue = Queue::new(10, ONE);
        queue.push(job(0, 5)).unwrap();
        let taken = queue.pop(0).await.unwrap();
        queue.close();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop(0).await.map(|job| job.deadline_ms) }
        });
        tokio::task::yield_now().await;
        // The dispatcher that took it puts it back (a retry), then settles it.
        queue.requeue(taken);
        queue.settle();
        assert_eq!(waiter.await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_deferred_job_keeps_a_closed_queue_open_until_it_is_back() {
        let queue = Queue::new(10, ONE);
        let back = queue.clone();
        queue.defer(job(0, 7), Duration::from_millis(50), move |job| {
            back.requeue(job);
        });
        queue.close();
        assert!(!queue.is_drained());
        // pop waits for the deferred job rather than reporting the queue drained.
        assert_eq!(queue.pop(0).await.map(|job| job.deadline_ms), Some(7));
        queue.settle();
        assert!(queue.pop(0).await.is_none());
        assert!(queue.is_drained());
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let queue = Queue::new(10, ONE);
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop(0).await.map(|job| job.deadline_ms) }
        });
        tokio::task::yield_now().await;
        queue.push(job(0, 42)).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(42));
    }

    fn routed(lane: u8, deadline_ms: Millis, carriers: CarrierSet) -> Job {
        Job {
            carriers,
            ..job(lane, deadline_ms)
        }
    }

    #[test]
    fn a_carrier_takes_only_what_it_may_send_most_urgent_first() {
        let weights = [NonZeroU32::MIN; 3];
        let queue = Queue::new(10, &weights);
        queue.push(routed(0, 10, 0b001)).unwrap();
        queue.push(routed(0, 20, 0b011)).unwrap();
        queue.push(routed(0, 5, 0b100)).unwrap();
        queue.push(routed(1, 99, 0b010)).unwrap();
        let deadline = |job: Option<Job>| job.map(|job| job.deadline_ms);
        // Carrier 1: its own higher lane first, then the shared job.
        assert_eq!(deadline(queue.try_pop(1)), Some(99));
        assert_eq!(deadline(queue.try_pop(1)), Some(20));
        assert_eq!(deadline(queue.try_pop(1)), None);
        assert_eq!(deadline(queue.try_pop(0)), Some(10));
        assert_eq!(deadline(queue.try_pop(0)), None);
        assert_eq!(deadline(queue.try_pop(2)), Some(5));
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn a_closed_queue_ends_for_a_carrier_with_nothing_left_to_send() {
        let weights = [NonZeroU32::MIN; 2];
        let queue = Queue::new(10, &weights);
        queue.push(routed(0, 1, 0b10)).unwrap();
        queue.close();
        assert!(queue.is_done_for(0));
        assert!(queue.pop(0).await.is_none());
        assert!(!queue.is_done_for(1));
        assert!(queue.pop(1).await.is_some());
        queue.settle();
        assert!(queue.is_drained());
    }

    /// Pushes `n` jobs one at a time to idle carriers with `weights`, and counts who took each.
    async fn share_of_idle_jobs(weights: &[u32], n: usize) -> Vec<usize> {
        let weights: Vec<NonZeroU32> = weights.iter().filter_map(|w| NonZeroU32::new(*w)).collect();
        let queue = Queue::new(10, &weights);
        let (taken, mut took) = tokio::sync::mpsc::unbounded_channel();
        for carrier in 0..weights.len() as CarrierId {
            let queue = queue.clone();
            let taken = taken.clone();
            tokio::spawn(async move {
                while queue.pop(carrier).await.is_some() {
                    queue.settle();
                    let _ = taken.send(carrier);
                }
            });
        }
        let all: CarrierSet = (1 << weights.len()) - 1;
        let mut counts = vec![0; weights.len()];
        for _ in 0..n {
            // Wait until every carrier is idle, so the push chooses among all of them.
            while queue.lock().idle != all {
                tokio::task::yield_now().await;
            }
            queue.push(routed(0, 1, all)).unwrap();
            let carrier = took.recv().await.unwrap();
            counts[carrier as usize] += 1;
        }
        queue.close();
        counts
    }

    #[tokio::test]
    async fn idle_carriers_share_jobs_by_weight() {
        let counts = share_of_idle_jobs(&[3, 1], 2000).await;
        // Expected 1500 : 500; the binomial standard deviation is about 19.
        assert!((1380..=1620).contains(&counts[0]), "{counts:?}");
        let counts = share_of_idle_jobs(&[1, 1, 1, 1], 2000).await;
        assert!(counts.iter().all(|n| (400..=600).contains(n)), "{counts:?}");
    }

    #[tokio::test]
    async fn a_dropped_waiter_passes_its_job_on() {
        // Carrier 0 is almost always the one woken for the job.
        let weights = [NonZeroU32::new(1000).unwrap(), NonZeroU32::MIN];
        let queue = Queue::new(10, &weights);
        let gone = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop(0).await }
        });
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop(1).await.map(|job| job.deadline_ms) }
        });
        while queue.lock().idle != 0b11 {
            tokio::task::yield_now().await;
        }
        // The job is promised to carrier 0, which goes away before it runs (this runtime has
        // one thread, so nothing runs until the test yields): carrier 1 must get it.
        queue.push(routed(0, 3, 0b11)).unwrap();
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(waiter.await.unwrap(), Some(3));
    }

    fn adaptive(unseen_after: Option<Duration>) -> (Queue, Clock) {
        let clock = Clock::system();
        let policy = OverloadPolicy {
            max_wait: Duration::from_secs(300),
            target: Duration::from_secs(5),
            after: Duration::from_secs(30),
            unseen_after,
        };
        (
            Queue::with_policy(100, ONE, Some((policy, clock.clone()))),
            clock,
        )
    }

    /// A job queued now on `clock`, with a deadline far away and in arrival order.
    fn queued_now(clock: &Clock, deadline_ms: Millis) -> Job {
        Job {
            enqueued_ms: clock.now_ms(),
            ..job(0, clock.now_ms() + deadline_ms)
        }
    }

    #[test]
    fn overload_begins_after_a_standing_wait_and_ends_when_the_oldest_is_young() {
        let (queue, clock) = adaptive(None);
        // Later arrivals have later deadlines, as they do: earliest deadline first is oldest
        // first here.
        let mut deadlines = Vec::new();
        for n in 0..4 {
            let job = queued_now(&clock, 10_000 + n * 1000);
            deadlines.push(job.deadline_ms);
            queue.push(job).unwrap();
            clock.advance(Duration::from_millis(1));
        }
        let reading = |queue: &Queue| queue.overload().unwrap();
        // Young: no overload.
        assert!(!reading(&queue).overloaded);
        // Older than the target, but not yet for `after`.
        clock.advance(Duration::from_secs(6));
        assert!(!reading(&queue).overloaded);
        clock.advance(Duration::from_secs(29));
        assert!(!reading(&queue).overloaded);
        clock.advance(Duration::from_secs(1));
        let now = reading(&queue);
        assert!(now.overloaded);
        assert!(now.oldest_wait >= Duration::from_secs(36), "{now:?}");
        // Newest first, each taken ahead of the more urgent oldest job.
        let taken: Vec<Millis> = std::iter::from_fn(|| queue.try_pop(0))
            .take(2)
            .map(|job| {
                assert!(job.check_presence);
                job.deadline_ms
            })
            .collect();
        assert_eq!(taken, [deadlines[3], deadlines[2]]);
        assert_eq!(reading(&queue).out_of_order, 2);
        // Drain it: an empty queue is not overloaded, and new jobs go by deadline again.
        while queue.try_pop(0).is_some() {}
        assert!(!reading(&queue).overloaded);
        let (later, sooner) = (queued_now(&clock, 9_000), queued_now(&clock, 8_000));
        let sooner_deadline = sooner.deadline_ms;
        queue.push(later).unwrap();
        queue.push(sooner).unwrap();
        let next = queue.try_pop(0).unwrap();
        assert_eq!(next.deadline_ms, sooner_deadline);
        assert!(!next.check_presence);
    }

    #[test]
    fn under_overload_a_stale_job_goes_before_the_newest() {
        let (queue, clock) = adaptive(Some(Duration::from_secs(60)));
        // What each job says of when it was queued, read as it is pushed (real time moves on
        // too, so the test compares these, never the clock again).
        let push = |clock: &Clock| {
            let job = queued_now(clock, 500_000);
            let enqueued = job.enqueued_ms;
            queue.push(job).unwrap();
            enqueued
        };
        let stale = push(&clock);
        clock.advance(Duration::from_secs(50));
        push(&clock);
        clock.advance(Duration::from_secs(5));
        let newest = push(&clock);
        // Congested for `after`: overload, and the first job is past `unseen_after`.
        assert!(!queue.overload().unwrap().overloaded);
        clock.advance(Duration::from_secs(30));
        let taken = queue.try_pop(0).unwrap();
        assert_eq!(taken.enqueued_ms, stale);
        assert!(taken.check_presence);
        // The others are not stale yet (35 s and 30 s): the newest goes next.
        let next = queue.try_pop(0).unwrap();
        assert_eq!(next.enqueued_ms, newest);
    }

    #[test]
    fn a_put_back_job_loses_its_presence_mark_and_keeps_its_place() {
        let (queue, clock) = adaptive(None);
        queue.push(queued_now(&clock, 1000)).unwrap();
        let newest = queued_now(&clock, 2000);
        let newest_deadline = newest.deadline_ms;
        queue.push(newest).unwrap();
        clock.advance(Duration::from_secs(6));
        queue.overload();
        clock.advance(Duration::from_secs(30));
        let newest = queue.try_pop(0).unwrap();
        assert!(newest.check_presence);
        queue.requeue(newest);
        queue.settle();
        assert_eq!(queue.len(), 2);
        let again = queue.try_pop(0).unwrap();
        assert_eq!(again.deadline_ms, newest_deadline);
        assert!(again.check_presence);
    }

    #[test]
    fn the_drain_meter_counts_acceptances_over_its_window() {
        let (queue, clock) = adaptive(None);
        assert_eq!(queue.overload().unwrap().accepted_per_sec, None);
        // 10 a second for 40 s: the 30 s window (8 slots of 3.75 s, the current one left out)
        // reads about 10.
        for _ in 0..400 {
            queue.accepted();
            clock.advance(Duration::from_millis(100));
        }
        let rate = queue.overload().unwrap().accepted_per_sec.unwrap();
        assert!((9.0..=11.0).contains(&rate), "{rate}");
        // Then nothing for a minute: zero.
        clock.advance(Duration::from_secs(60));
        assert_eq!(queue.overload().unwrap().accepted_per_sec, Some(0.0));
    }

    #[test]
    fn a_job_for_carriers_no_longer_configured_goes_to_those_still_here() {
        let weights = [NonZeroU32::MIN, NonZeroU32::MIN];
        let queue = Queue::new(10, &weights);
        // Carriers 1 and 5 (an earlier configuration): only 1 is still here.
        queue.push(routed(0, 1, 0b10_0010)).unwrap();
        assert_eq!(queue.try_pop(1).map(|job| job.carriers), Some(0b10));
        // Only carriers that are gone: any carrier here may send it.
        queue.push(routed(0, 2, 0b1100)).unwrap();
        assert_eq!(queue.try_pop(0).map(|job| job.carriers), Some(0b11));
    }
}

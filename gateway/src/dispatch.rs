//! The dispatcher: one task per carrier that keeps the carrier's window full, up to its pace,
//! with jobs from the shared queue.
//!
//! For each carrier: wait for its circuit breaker to allow a submit and for the pacer to allow a
//! segment, take the most urgent job, have the engine render it (or drop it, if its
//! verification ended), and submit it. All of a carrier's submits in flight are driven by its
//! one task (a `FuturesUnordered` as large as the window); each records its answer with the
//! engine and the breaker. An open circuit takes the carrier out of rotation, and since every
//! carrier pulls from the one queue, the carriers still up take its traffic.
//!
//! Throttle answers and temporary failures put the job back in line, keeping its place, after a
//! short pause (a throttle) or an exponential back-off with full jitter (a failure); the job
//! waits outside the window, so a flaky carrier's pauses do not idle its window. Throttles also
//! lower the carrier's adaptive pace (`pace.rs`). A retry after a failure, and a resend, ask to
//! avoid the carrier that sent before: that carrier passes the job on a few times, so another
//! takes it if there is one.
//!
//! Which carriers may take a job is the queue's business: each job carries the set its number's
//! prefix rules allow (`routing.rs`), a carrier pops only jobs in its set, and a job arriving
//! while several eligible carriers are idle wakes one of them drawn by weight. A carrier on
//! standby (`standby = true`, a backup) is never woken that way: it takes only the jobs no
//! serving primary may take, those whose eligible primaries all lag or have an open circuit.
//!
//! Every job popped is settled with the queue once it is sent, dropped, deferred or put back,
//! so the queue never counts as drained (and shutdown never ends) while a job may come back.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use tokio::task::JoinSet;

use crate::breaker::{Breaker, Permit};
use crate::carrier::{Connector, OutboundSms, SubmitError};
use crate::clock::Millis;
use crate::config::CarrierConfig;
use crate::ids::CarrierId;
use crate::metrics::{CarrierMetrics, SubmitOutcome};
use crate::pace::AdaptivePace;
use crate::queue::Job;
use crate::routing::CarrierSet;
use crate::verifier::{Completion, Prepared, Verifier};

/// Longest pause after a throttle answer before the job is offered again.
const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a throttle answer that gave no Retry-After.
const DEFAULT_THROTTLE_PAUSE: Duration = Duration::from_millis(20);
/// Back-off after a temporary failure: base and cap.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One carrier as the dispatcher drives it.
#[derive(Debug)]
pub struct Carrier {
    pub id: CarrierId,
    pub config: CarrierConfig,
    pub connector: Connector,
    pub metrics: CarrierMetrics,
    /// Takes the carrier out of rotation while it keeps failing.
    pub breaker: Arc<Breaker>,
}

/// The carriers that are not on standby, each with its breaker: what a standby carrier watches.
#[derive(Debug, Default)]
struct Primaries(Vec<(CarrierId, Arc<Breaker>)>);

impl Primaries {
    /// The primaries serving now: not lagging, and with a circuit that is not open.
    fn serving(&self, deliveries: &crate::delivery::Deliveries, now: Instant) -> CarrierSet {
        self.0
            .iter()
            .filter(|(id, breaker)| {
                !deliveries.is_lagging(*id) && breaker.state(now) != crate::breaker::State::Open
            })
            .fold(0, |set, (id, _)| set | 1 << id)
    }
}

/// Starts a dispatcher task per carrier. The returned set finishes once the queue is closed and
/// every job has been handed to a carrier (or dropped).
pub fn spawn(verifier: Verifier, carriers: Vec<Carrier>) -> JoinSet<()> {
    let primaries = Arc::new(Primaries(
        carriers
            .iter()
            .filter(|carrier| !carrier.config.standby)
            .map(|carrier| (carrier.id, carrier.breaker.clone()))
            .collect(),
    ));
    let standby: CarrierSet = carriers
        .iter()
        .filter(|carrier| carrier.config.standby)
        .fold(0, |set, carrier| set | 1 << carrier.id);
    let mut tasks = JoinSet::new();
    for carrier in carriers {
        let role = if carrier.config.standby {
            Role::Standby(primaries.clone())
        } else {
            Role::Primary { standby }
        };
        tasks.spawn(run_carrier(verifier.clone(), Arc::new(carrier), role));
    }
    tasks
}

/// How a carrier takes jobs from the queue.
#[derive(Debug, Clone)]
enum Role {
    /// Takes the most urgent job it may send; `standby` are the carriers on standby, which a
    /// resend does not pass its job on to.
    Primary { standby: CarrierSet },
    /// Takes only the jobs the serving primaries may not take.
    Standby(Arc<Primaries>),
}

/// How often a carrier passes on a job that asked to avoid it before sending it anyway.
const MAX_PASSES: u8 = 10;
/// How long a passed-on job waits before it is offered again.
const PASS_PAUSE: Duration = Duration::from_millis(20);
/// How long a job waits when the store did not answer before it is tried again.
const STORE_PAUSE: Duration = Duration::from_millis(250);

async fn run_carrier(verifier: Verifier, carrier: Arc<Carrier>, role: Role) {
    let window = carrier.config.window.get() as usize;
    let pacer = Arc::new(AdaptivePace::new(carrier.config.pace_per_sec));
    carrier.metrics.set_pace(pacer.current());
    carrier
        .metrics
        .set_configured_pace(f64::from(carrier.config.pace_per_sec.get()));
    let queue = verifier.queue().clone();
    // Every submit of this carrier runs inside this one task: no task per SMS, and no wake-up
    // crossing threads when a submit completes. The window is the set's size.
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    // The next job, kept across turns of the loop rather than dropped and made again, so that a
    // pace cell it has taken is never wasted and a job it has popped is never lost.
    let mut next: Option<NextJob> = Some(Box::pin(next_job(
        verifier.clone(),
        pacer.clone(),
        carrier.clone(),
        role.clone(),
    )));
    loop {
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                carrier.metrics.set_in_flight(in_flight.len());
            }
            job = async { next.as_mut().expect("guarded by is_some").await }, if next.is_some() && in_flight.len() < window => {
                let (permit, job) = job;
                let (Some(permit), Some(job)) = (permit, job) else {
                    // The queue is closed and holds nothing for this carrier: let the submits in
                    // flight finish (a retry may put a job back), then look again.
                    while in_flight.next().await.is_some() {}
                    carrier.metrics.set_in_flight(0);
                    if queue.is_done_for(carrier.id) {
                        return;
                    }
                    next = Some(Box::pin(next_job(verifier.clone(), pacer.clone(), carrier.clone(), role.clone())));
                    continue;
                };
                // A resend, or a retry after this carrier failed, goes by another carrier when
                // there is one: pass it on, and keep the permit and pace cell for the next job.
                let standby = match &role {
                    Role::Primary { standby } => *standby,
                    Role::Standby(_) => 0,
                };
                let others_eligible = job.carriers & !(1 << carrier.id) & !standby != 0;
                if others_eligible && job.avoid_carrier == Some(carrier.id) && job.passes < MAX_PASSES {
                    let mut job = job;
                    job.passes += 1;
                    carrier.metrics.passed_on();
                    let requeuer = verifier.clone();
                    queue.defer(job, PASS_PAUSE, move |job| {
                        requeuer.requeue(job);
                    });
                    queue.settle();
                    next = Some(Box::pin(pop_job(verifier.clone(), permit, carrier.clone(), role.clone())));
                    continue;
                }
                if verifier.backend().is_remote() {
                    // Preparing a job takes round trips: each runs inside its own submit
                    // future, so the window's worth of jobs prepare at once.
                    next = Some(Box::pin(next_job(verifier.clone(), pacer.clone(), carrier.clone(), role.clone())));
                    in_flight.push(Box::pin(prepare_and_submit(verifier.clone(), carrier.clone(), pacer.clone(), permit, job)));
                    carrier.metrics.set_in_flight(in_flight.len());
                    continue;
                }
                match verifier.prepare(&job, carrier.id).await {
                    Prepared::Send(sms) => {
                        if job.avoid_carrier.is_some_and(|avoided| avoided != carrier.id) {
                            carrier.metrics.took_over();
                        }
                        next = Some(Box::pin(next_job(verifier.clone(), pacer.clone(), carrier.clone(), role.clone())));
                        in_flight.push(Box::pin(submit(verifier.clone(), carrier.clone(), pacer.clone(), permit, job, sms)));
                        carrier.metrics.set_in_flight(in_flight.len());
                    }
                    // The pace cell and breaker permit this job took were not used: the next
                    // job has them.
                    Prepared::Dropped => {
                        queue.settle();
                        next = Some(Box::pin(pop_job(verifier.clone(), permit, carrier.clone(), role.clone())));
                    }
                    Prepared::Later => {
                        let requeuer = verifier.clone();
                        queue.defer(job, STORE_PAUSE, move |job| {
                            requeuer.requeue(job);
                        });
                        queue.settle();
                        next = Some(Box::pin(pop_job(verifier.clone(), permit, carrier.clone(), role.clone())));
                    }
                }
            }
        }
    }
}

type Pacer = AdaptivePace;
/// A job and the breaker's permit for it; both `None` once the queue is closed and empty.
type NextJob =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Option<Permit>, Option<Job>)> + Send>>;

/// Waits for the carrier's breaker to allow a submit, then for a pace cell, then for the most
/// urgent job (`None` once the queue is closed and empty).
async fn next_job(
    verifier: Verifier,
    pacer: Arc<Pacer>,
    carrier: Arc<Carrier>,
    role: Role,
) -> (Option<Permit>, Option<Job>) {
    let queue = verifier.queue();
    loop {
        let permit = loop {
            match carrier.breaker.try_acquire(Instant::now()) {
                Ok(permit) => break permit,
                Err(wait) => {
                    carrier
                        .metrics
                        .set_circuit(carrier.breaker.state(Instant::now()));
                    // At shutdown, a carrier whose circuit is open has nothing to wait for
                    // once the others have drained the queue.
                    if queue.is_done_for(carrier.id) {
                        return (None, None);
                    }
                    // While the circuit is open the other carriers take the queue.
                    tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
                }
            }
        };
        carrier
            .metrics
            .set_circuit(carrier.breaker.state(Instant::now()));
        // A Retry-After pause: like an open circuit, the other carriers take the queue, and at
        // shutdown there is nothing to wait for once it is drained.
        while let Some(pause) = pacer.paused_for(Instant::now()) {
            if queue.is_done_for(carrier.id) {
                carrier.breaker.record(permit, None, Instant::now());
                return (None, None);
            }
            tokio::time::sleep(pause.min(Duration::from_millis(200))).await;
        }
        pacer.until_ready().await;
        let Some(job) = take_job(&verifier, &carrier, &role).await else {
            carrier.breaker.record(permit, None, Instant::now());
            return (None, None);
        };
        // The permit was granted before the wait for a job; if the circuit opened meanwhile,
        // the job goes back (keeping its place) for a carrier that is up.
        let opened = carrier.breaker.state(Instant::now()) == crate::breaker::State::Open;
        if opened && !permit.is_probe() {
            queue.requeue(job);
            queue.settle();
            carrier.breaker.record(permit, None, Instant::now());
            continue;
        }
        return (Some(permit), Some(job));
    }
}

/// The most urgent job, with a breaker permit and a pace cell already in hand.
async fn pop_job(
    verifier: Verifier,
    permit: Permit,
    carrier: Arc<Carrier>,
    role: Role,
) -> (Option<Permit>, Option<Job>) {
    match take_job(&verifier, &carrier, &role).await {
        Some(job) => (Some(permit), Some(job)),
        None => {
            carrier.breaker.record(permit, None, Instant::now());
            (None, None)
        }
    }
}

/// The most urgent job for `carrier`, waiting for one (`None` once none can come).
///
/// While the carrier lags (its receipts come late or not at all, `delivery.rs`), new jobs go to
/// the carriers that deliver, as far as their pace allows: it takes the jobs they leave waiting
/// or cannot send, and a probe now and then (one job in twenty, and at least one per ten receipt
/// timeouts), for which it competes like any idle carrier. The probes' receipts bring it back.
async fn take_job(verifier: &Verifier, carrier: &Carrier, role: &Role) -> Option<Job> {
    let queue = verifier.queue();
    let deliveries = verifier.deliveries();
    let clock = verifier.clock();
    let id = carrier.id;
    if let Role::Standby(primaries) = role {
        loop {
            let serving = primaries.serving(deliveries, Instant::now());
            if let Some(job) = queue.try_pop_where(id, |job| job.carriers & serving == 0) {
                return Some(job);
            }
            if queue.is_done_for(id) {
                return None;
            }
            tokio::time::sleep(STANDBY_LOOK_EVERY).await;
        }
    }
    loop {
        if !deliveries.is_lagging(id) {
            return queue.pop(id).await;
        }
        if deliveries.probe_due(id, clock.now_ms(), queue.popped()) {
            let job = queue.pop(id).await;
            if job.is_some() {
                deliveries.probe_taken(id, clock.now_ms(), queue.popped());
                carrier.metrics.probed();
            }
            return job;
        }
        let left_after = deliveries.left_waiting_after(id);
        let waited_since = clock
            .now_ms()
            .saturating_sub(left_after.as_millis() as Millis);
        let others = !deliveries.lagging() & !(1 << id);
        let left_waiting =
            |job: &Job| job.enqueued_ms <= waited_since || job.carriers & others == 0;
        if let Some(job) = queue.try_pop_where(id, left_waiting) {
            return Some(job);
        }
        if queue.is_done_for(id) {
            return None;
        }
        tokio::time::sleep(left_after.min(LAGGING_LOOK_EVERY)).await;
    }
}

/// How often a lagging carrier looks at the queue for jobs left waiting.
const LAGGING_LOOK_EVERY: Duration = Duration::from_millis(50);
/// How often a carrier on standby looks at the queue for jobs no serving primary may take.
const STANDBY_LOOK_EVERY: Duration = Duration::from_millis(20);

/// A submit in flight: boxed, since the embedded and redis back-ends start it differently.
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Prepares a job (redis back-end) and submits it; a job that is dropped or must wait for the
/// store gives its breaker permit back and is settled.
async fn prepare_and_submit(
    verifier: Verifier,
    carrier: Arc<Carrier>,
    pacer: Arc<Pacer>,
    permit: Permit,
    mut job: Job,
) {
    let (prepared, snapshot) = verifier.prepare_keeping(&job, carrier.id).await;
    match prepared {
        Prepared::Send(sms) => {
            if job
                .avoid_carrier
                .is_some_and(|avoided| avoided != carrier.id)
            {
                carrier.metrics.took_over();
            }
            // The carrier's answer is recorded on the verification as prepare wrote it.
            job.snapshot = snapshot;
            submit(verifier, carrier, pacer, permit, job, sms).await;
        }
        Prepared::Dropped => {
            carrier.breaker.record(permit, None, Instant::now());
            verifier.queue().settle();
        }
        Prepared::Later => {
            carrier.breaker.record(permit, None, Instant::now());
            let requeuer = verifier.clone();
            verifier.queue().defer(job, STORE_PAUSE, move |job| {
                requeuer.requeue(job);
            });
            verifier.queue().settle();
        }
    }
}

/// Submits one SMS, after pacing its segments beyond the first, and records the answer.
async fn submit(
    verifier: Verifier,
    carrier: Arc<Carrier>,
    pacer: Arc<Pacer>,
    permit: Permit,
    job: Job,
    sms: OutboundSms,
) {
    let segments = sms.text.segments();
    if let Some(more) = NonZeroU32::new(u32::from(segments.saturating_sub(1))) {
        pacer.until_n_ready(more).await;
    }
    carrier.metrics.segments(sms.text.encoding(), segments);
    let started = Instant::now();
    let result = carrier.connector.submit(&sms).await;
    drop(sms);
    let seconds = started.elapsed().as_secs_f64();
    // Only temporary failures say the carrier is unwell; throttles and refusals of one number
    // do not.
    let failed = match &result {
        Ok(_) => Some(false),
        Err(SubmitError::Temporary { .. }) => Some(true),
        Err(SubmitError::Throttled { .. } | SubmitError::Permanent { .. }) => None,
    };
    carrier.breaker.record(permit, failed, Instant::now());
    carrier
        .metrics
        .set_circuit(carrier.breaker.state(Instant::now()));
    match &result {
        Ok(_) => pacer.on_success(segments, Instant::now()),
        Err(SubmitError::Throttled { retry_after }) => {
            pacer.on_throttle(*retry_after, Instant::now());
        }
        Err(_) => {}
    }
    carrier.metrics.set_pace(pacer.current());
    handle_result(&verifier, &carrier, job, result, seconds).await;
    // Only now, with the job recorded, deferred or put back, may the queue count as drained.
    verifier.queue().settle();
}

async fn handle_result(
    verifier: &Verifier,
    carrier: &Carrier,
    mut job: Job,
    result: Result<crate::carrier::Accepted, SubmitError>,
    seconds: f64,
) {
    match result {
        Ok(accepted) => {
            carrier.metrics.submitted(SubmitOutcome::Accepted, seconds);
            verifier.queue().accepted();
            verifier
                .complete(
                    &job,
                    carrier.id,
                    Completion::Accepted {
                        carrier_message_id: accepted.carrier_message_id,
                    },
                )
                .await;
        }
        Err(SubmitError::Throttled { retry_after }) => {
            carrier.metrics.submitted(SubmitOutcome::Throttled, seconds);
            tracing::debug!(carrier = %carrier.config.name, verification = %job.id, "carrier throttled a submit");
            let pause = retry_after.map_or(DEFAULT_THROTTLE_PAUSE, |after| {
                after.min(MAX_THROTTLE_PAUSE)
            });
            job.attempts = job.attempts.saturating_add(1);
            verifier.complete(&job, carrier.id, Completion::Retry).await;
            carrier.metrics.retried(true);
            retry_after_pause(verifier, job, pause);
        }
        Err(SubmitError::Temporary { reason }) => {
            carrier.metrics.submitted(SubmitOutcome::Temporary, seconds);
            tracing::warn!(carrier = %carrier.config.name, verification = %job.id, %reason, "temporary carrier failure; retrying");
            let pause = backoff(job.attempts);
            job.attempts = job.attempts.saturating_add(1);
            // Fail over: another carrier takes the retry if one is there.
            job.avoid_carrier = Some(carrier.id);
            job.passes = 0;
            carrier.metrics.retried(false);
            verifier.complete(&job, carrier.id, Completion::Retry).await;
            retry_after_pause(verifier, job, pause);
        }
        Err(SubmitError::Permanent { reason }) => {
            carrier.metrics.submitted(SubmitOutcome::Permanent, seconds);
            tracing::warn!(carrier = %carrier.config.name, verification = %job.id, %reason, "carrier refused an SMS permanently");
            verifier
                .complete(&job, carrier.id, Completion::Permanent)
                .await;
        }
    }
}

/// Puts a job back in line after `pause`, without holding the carrier's window meanwhile.
fn retry_after_pause(verifier: &Verifier, job: Job, pause: Duration) {
    let requeuer = verifier.clone();
    verifier.queue().defer(job, pause, move |job| {
        requeuer.requeue(job);
    });
}

/// Exponential back-off with full jitter: uniform in `[0, min(max, base * 2^attempts)]`.
pub fn backoff(attempts: u16) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempts.min(16))
        .min(BACKOFF_MAX);
    let millis = rand::rng().random_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(millis)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn backoff_stays_within_bounds(attempts in 0u16..1000) {
            let delay = backoff(attempts);
            prop_assert!(delay <= BACKOFF_MAX);
            let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempts.min(16)).min(BACKOFF_MAX);
            prop_assert!(delay <= ceiling);
        }
    }
}

//! Delivery per carrier: whether a carrier's `delivered` receipts come in time, told from the
//! receipts themselves, not from its answers to submits.
//!
//! The failure otpgate exists for (docs/DESIGN.md section 1) was an operator that accepted every
//! SMS and generated them late. Acceptance says nothing about that; only the receipts do. Each
//! SMS a carrier accepts while its receipts are *awaited* gets one verdict: *on time* when its
//! `delivered` receipt comes within the carrier's `receipt_timeout`, *late* when it has not come
//! by then (the receipt is *missing*: counted, and the SMS may be rerouted by the engine).
//!
//! A carrier's state follows its verdicts, as an exponentially weighted share of late ones:
//! `ok` turns `lagging` when that share reaches [`ENTER_LAGGING`], and `lagging` turns `ok`
//! again only below [`LEAVE_LAGGING`] (hysteresis, so a carrier near the line does not flap).
//! While it lags, the dispatcher sends it only probes and the jobs the other carriers leave
//! waiting (`dispatch.rs`), and the probes' receipts bring it back.
//!
//! A carrier whose receipts are not awaited is `unknown`, and none of this applies to it: one
//! configured with `receipt_timeout_ms = 0`, one that cannot send receipts (an HTTP carrier
//! without a `receipt_token`, the console), and one that sends none at all: after
//! [`NEVER_HEARD_LIMIT`] receipts missing without a single receipt of it since start-up, its
//! SMSC is taken not to send them (otherwise it would look like a carrier losing every SMS).
//! Until then a carrier that can send receipts is awaited from the start, so that one lagging
//! from its first SMS is caught too. Each instance judges from the receipts it sees.

use std::sync::Mutex;
use std::time::Duration;

use crate::clock::Millis;
use crate::config::CarrierConfig;
use crate::ids::CarrierId;
use crate::metrics::{CarrierMetrics, Metrics};
use crate::routing::CarrierSet;
use crate::sync::lock;

/// Weight of the newest verdict in the late share.
const ALPHA: f64 = 0.1;
/// The late share at which a carrier starts lagging: from a clean record, seven late SMS in a
/// row.
pub const ENTER_LAGGING: f64 = 0.5;
/// The late share below which a lagging carrier is `ok` again: from the threshold, nine SMS on
/// time in a row.
pub const LEAVE_LAGGING: f64 = 0.2;
/// Receipts missing, with none of the carrier's ever heard, after which it is taken to send none.
pub const NEVER_HEARD_LIMIT: u32 = 50;
/// A lagging carrier's probes: one in this many jobs taken from the queue by any carrier, and
/// at least one per [`PROBE_AT_LEAST_EVERY`] receipt timeouts, so that it can come back under a
/// light load too without taking the SMS of every citizen who arrives alone.
pub const PROBE_ONE_IN: u64 = 20;
pub const PROBE_AT_LEAST_EVERY: u64 = 10;
/// A job that has waited a thirtieth of a lagging carrier's receipt timeout was left waiting by
/// the others, and the lagging carrier may take it.
const LEFT_WAITING_PER_TIMEOUT: u64 = 30;

/// What the gateway knows of a carrier's deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Its receipts are not awaited: nothing is judged.
    Unknown,
    Ok,
    Lagging,
}

impl Health {
    pub const ALL: [Health; 3] = [Health::Unknown, Health::Ok, Health::Lagging];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Ok => "ok",
            Health::Lagging => "lagging",
        }
    }
}

/// What the engine learned about one SMS's delivery, recorded once its change stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// A `delivered` receipt came `after_ms` after the carrier accepted the SMS; `on_time` is
    /// the SMS's verdict when this receipt gives it (`None`: judged already, or not awaited).
    Delivered {
        carrier: CarrierId,
        after_ms: Millis,
        on_time: Option<bool>,
    },
    /// No `delivered` receipt within the carrier's timeout, and what the engine did about it.
    Missing {
        carrier: CarrierId,
        reroute: Reroute,
    },
}

/// What became of an SMS whose receipt is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reroute {
    /// The same code was queued again for another carrier.
    Queued,
    /// Not rerouted: the verification had used its reroutes (`[verification] reroutes`).
    Exhausted,
    /// Not rerouted: no other carrier serves the number.
    NoOtherCarrier,
    /// Not rerouted: the phone's send limit refused one more SMS.
    Limited,
    /// Not rerouted: the queue is full, or the SMS could no longer leave in time.
    NoRoom,
}

impl Reroute {
    pub const SKIPPED: [Reroute; 4] = [
        Reroute::Exhausted,
        Reroute::NoOtherCarrier,
        Reroute::Limited,
        Reroute::NoRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reroute::Queued => "queued",
            Reroute::Exhausted => "exhausted",
            Reroute::NoOtherCarrier => "no_other_carrier",
            Reroute::Limited => "limited",
            Reroute::NoRoom => "no_room",
        }
    }
}

/// Every carrier's delivery record.
#[derive(Debug)]
pub struct Deliveries {
    carriers: Box<[Watch]>,
}

#[derive(Debug)]
struct Watch {
    /// `None`: its receipts are not awaited (see the module's notes).
    timeout_ms: Option<Millis>,
    state: Mutex<Tracker>,
    metrics: CarrierMetrics,
}

#[derive(Debug, Default)]
struct Tracker {
    /// A receipt of this carrier has arrived since start-up.
    heard: bool,
    /// Receipts missing while none was ever heard.
    missing_unheard: u32,
    /// Exponentially weighted share of late verdicts.
    late_share: f64,
    lagging: bool,
    /// When the last probe was taken while lagging, and the queue's count of jobs taken then
    /// (`None` until the dispatcher first looks after the carrier started lagging).
    last_probe: Option<(Millis, u64)>,
}

/// One carrier's state, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CarrierDelivery {
    pub state: &'static str,
    /// The weighted share of its recent SMS whose receipt was late or missing.
    pub late_share: f64,
    pub receipt_timeout_ms: Option<Millis>,
}

// === impl Deliveries ===

impl Deliveries {
    pub fn new(carriers: &[CarrierConfig], metrics: &Metrics) -> Deliveries {
        let carriers: Box<[Watch]> = carriers
            .iter()
            .enumerate()
            .map(|(index, config)| Watch {
                timeout_ms: config.receipt_timeout.map(|t| t.as_millis() as Millis),
                state: Mutex::new(Tracker::default()),
                metrics: metrics.carrier(index),
            })
            .collect();
        for watch in carriers.iter() {
            watch
                .metrics
                .set_delivery_health(watch.health(&lock(&watch.state)));
        }
        Deliveries { carriers }
    }

    /// The receipt timeout of `carrier` if its receipts are awaited now.
    pub fn awaited(&self, carrier: CarrierId) -> Option<Millis> {
        let watch = self.carriers.get(carrier as usize)?;
        let timeout = watch.timeout_ms?;
        (watch.health(&lock(&watch.state)) != Health::Unknown).then_some(timeout)
    }

    /// A receipt of `carrier` arrived: it sends them.
    pub fn heard(&self, carrier: CarrierId) {
        let Some(watch) = self.carriers.get(carrier as usize) else {
            return;
        };
        let mut state = lock(&watch.state);
        if state.heard {
            return;
        }
        let was = watch.health(&state);
        state.heard = true;
        let now = watch.health(&state);
        drop(state);
        if now != was {
            watch.metrics.set_delivery_health(now);
            tracing::info!(
                carrier,
                "a delivery receipt: this carrier's receipts are awaited again"
            );
        }
    }

    pub fn health(&self, carrier: CarrierId) -> Health {
        let Some(watch) = self.carriers.get(carrier as usize) else {
            return Health::Unknown;
        };
        watch.health(&lock(&watch.state))
    }

    pub fn is_lagging(&self, carrier: CarrierId) -> bool {
        self.health(carrier) == Health::Lagging
    }

    /// Every carrier's state, in config order.
    pub fn report(&self) -> Vec<CarrierDelivery> {
        self.carriers
            .iter()
            .map(|watch| {
                let state = lock(&watch.state);
                CarrierDelivery {
                    state: watch.health(&state).as_str(),
                    late_share: (state.late_share * 1000.0).round() / 1000.0,
                    receipt_timeout_ms: watch.timeout_ms,
                }
            })
            .collect()
    }

    /// How long a job waits before a lagging carrier may take it, as left waiting by the others.
    pub fn left_waiting_after(&self, carrier: CarrierId) -> Duration {
        let timeout = self.timeout_ms(carrier).unwrap_or(30_000);
        Duration::from_millis((timeout / LEFT_WAITING_PER_TIMEOUT).max(10))
    }

    /// Whether a lagging carrier is due a probe, with the queue's count of jobs taken so far:
    /// one in [`PROBE_ONE_IN`] jobs since its last probe (or since it started lagging), and at
    /// least one per [`PROBE_AT_LEAST_EVERY`] receipt timeouts.
    pub fn probe_due(&self, carrier: CarrierId, now: Millis, popped: u64) -> bool {
        let Some(watch) = self.carriers.get(carrier as usize) else {
            return false;
        };
        let every_ms = watch.timeout_ms.unwrap_or(30_000) * PROBE_AT_LEAST_EVERY;
        let mut state = lock(&watch.state);
        let (last_ms, last_popped) = *state.last_probe.get_or_insert((now, popped));
        popped >= last_popped + PROBE_ONE_IN || now >= last_ms + every_ms
    }

    /// A lagging carrier took a probe.
    pub fn probe_taken(&self, carrier: CarrierId, now: Millis, popped: u64) {
        if let Some(watch) = self.carriers.get(carrier as usize) {
            lock(&watch.state).last_probe = Some((now, popped));
        }
    }

    fn timeout_ms(&self, carrier: CarrierId) -> Option<Millis> {
        self.carriers.get(carrier as usize)?.timeout_ms
    }

    /// The carriers lagging now.
    pub fn lagging(&self) -> CarrierSet {
        (0..self.carriers.len())
            .filter(|&index| self.is_lagging(index as CarrierId))
            .fold(0, |set, index| set | (1 << index))
    }

    /// Records what the engine learned about an SMS.
    pub fn observe(&self, observation: Observation) {
        match observation {
            Observation::Delivered {
                carrier,
                after_ms,
                on_time,
            } => {
                let Some(watch) = self.carriers.get(carrier as usize) else {
                    return;
                };
                watch.metrics.delivered_in(after_ms as f64 / 1000.0);
                if let Some(on_time) = on_time {
                    watch.judge(!on_time);
                }
            }
            Observation::Missing { carrier, reroute } => {
                let Some(watch) = self.carriers.get(carrier as usize) else {
                    return;
                };
                watch.metrics.receipt_missing(reroute);
                watch.judge(true);
            }
        }
    }
}

// === impl Watch ===

impl Watch {
    fn health(&self, state: &Tracker) -> Health {
        let never_heard = !state.heard && state.missing_unheard >= NEVER_HEARD_LIMIT;
        match (self.timeout_ms, never_heard, state.lagging) {
            (None, _, _) | (_, true, _) => Health::Unknown,
            (Some(_), false, false) => Health::Ok,
            (Some(_), false, true) => Health::Lagging,
        }
    }

    /// One SMS's verdict.
    fn judge(&self, late: bool) {
        let mut state = lock(&self.state);
        if late && !state.heard {
            state.missing_unheard = state.missing_unheard.saturating_add(1);
        }
        let sample = if late { 1.0 } else { 0.0 };
        state.late_share += ALPHA * (sample - state.late_share);
        let was = self.health(&state);
        if !state.lagging && state.late_share >= ENTER_LAGGING {
            state.lagging = true;
            // Probes are counted from the dispatcher's next look.
            state.last_probe = None;
        } else if state.lagging && state.late_share < LEAVE_LAGGING {
            state.lagging = false;
        }
        let now = self.health(&state);
        let share = state.late_share;
        drop(state);
        if now != was {
            self.metrics.set_delivery_health(now);
            tracing::warn!(
                late_share = share,
                "carrier delivery state: {} -> {}",
                was.as_str(),
                now.as_str()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(timeout_ms: Option<u64>) -> Deliveries {
        let config = crate::config::Config::from_toml(&format!(
            "[[carriers]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/sms\"\n\
             receipt_token = \"0123456789abcdef\"\n{}",
            timeout_ms.map_or(String::new(), |ms| format!("receipt_timeout_ms = {ms}\n"))
        ))
        .unwrap();
        let metrics = Metrics::new(&[0], &[("a".to_owned(), false)], &[], &[]);
        Deliveries::new(&config.carriers, &metrics)
    }

    fn late(carrier: CarrierId) -> Observation {
        Observation::Missing {
            carrier,
            reroute: Reroute::Queued,
        }
    }

    fn on_time(carrier: CarrierId) -> Observation {
        Observation::Delivered {
            carrier,
            after_ms: 1000,
            on_time: Some(true),
        }
    }

    #[test]
    fn a_carrier_that_never_sends_receipts_becomes_unknown() {
        let deliveries = deliveries(None);
        assert_eq!(deliveries.health(0), Health::Ok);
        assert_eq!(deliveries.awaited(0), Some(60_000));
        for _ in 0..NEVER_HEARD_LIMIT - 1 {
            deliveries.observe(late(0));
        }
        assert_eq!(deliveries.health(0), Health::Lagging);
        deliveries.observe(late(0));
        assert_eq!(deliveries.health(0), Health::Unknown);
        assert_eq!(deliveries.awaited(0), None);
        // A receipt after all: awaited again, and judged by its record.
        deliveries.heard(0);
        assert_eq!(deliveries.health(0), Health::Lagging);
        // Once heard, missing receipts never make it unknown.
        for _ in 0..100 {
            deliveries.observe(late(0));
        }
        assert_eq!(deliveries.health(0), Health::Lagging);
    }

    #[test]
    fn a_timeout_of_zero_never_awaits_receipts() {
        let deliveries = deliveries(Some(0));
        deliveries.heard(0);
        assert_eq!(deliveries.health(0), Health::Unknown);
        for _ in 0..50 {
            deliveries.observe(late(0));
        }
        assert_eq!(deliveries.health(0), Health::Unknown);
        assert_eq!(deliveries.awaited(0), None);
    }

    #[test]
    fn lagging_comes_and_goes_with_hysteresis() {
        let deliveries = deliveries(Some(30_000));
        // Six late SMS are not enough; the seventh is.
        for _ in 0..6 {
            deliveries.observe(late(0));
        }
        assert_eq!(deliveries.health(0), Health::Ok);
        deliveries.observe(late(0));
        assert_eq!(deliveries.health(0), Health::Lagging);
        // A few on time do not end it: the share must fall below the lower line.
        for _ in 0..5 {
            deliveries.observe(on_time(0));
        }
        assert_eq!(deliveries.health(0), Health::Lagging);
        for _ in 0..5 {
            deliveries.observe(on_time(0));
        }
        assert_eq!(deliveries.health(0), Health::Ok);
        // An SMS delivered late counts as late.
        for _ in 0..20 {
            deliveries.observe(Observation::Delivered {
                carrier: 0,
                after_ms: 45_000,
                on_time: Some(false),
            });
        }
        assert_eq!(deliveries.health(0), Health::Lagging);
    }

    #[test]
    fn probes_are_one_job_in_twenty_and_one_per_ten_timeouts() {
        let deliveries = deliveries(Some(30_000));
        assert_eq!(
            deliveries.left_waiting_after(0),
            Duration::from_millis(1000)
        );
        // The first look sets the count's start.
        assert!(!deliveries.probe_due(0, 10_000, 100));
        assert!(!deliveries.probe_due(0, 10_500, 119));
        assert!(deliveries.probe_due(0, 10_500, 120));
        deliveries.probe_taken(0, 11_000, 120);
        assert!(!deliveries.probe_due(0, 310_999, 121));
        assert!(deliveries.probe_due(0, 311_000, 121));
    }
}

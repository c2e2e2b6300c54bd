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
//! without a `receipt_token`, the console), and one that has sent no receipt at all since
//! start-up (an SMSC that never sends them would otherwise look like a carrier losing every
//! SMS). Each instance judges from the receipts it sees.

use std::sync::Mutex;
use std::time::Duration;

use crate::clock::Millis;
use crate::config::CarrierConfig;
use crate::ids::CarrierId;
use crate::routing::CarrierSet;
use crate::metrics::{CarrierMetrics, Metrics};
use crate::sync::lock;

/// Weight of the newest verdict in the late share.
const ALPHA: f64 = 0.1;
/// The late share at which a carrier starts lagging: from a clean record, seven late SMS in a
/// row.
pub const ENTER_LAGGING: f64 = 0.5;
/// The late share below which a lagging carrier is `ok` again: from the threshold, nine SMS on
/// time in a row.
pub const LEAVE_LAGGING: f64 = 0.2;
/// How many probes a lagging carrier is sent per receipt timeout.
const PROBES_PER_TIMEOUT: u32 = 30;

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
    /// Exponentially weighted share of late verdicts.
    late_share: f64,
    lagging: bool,
    /// When the last probe was let through while lagging.
    last_probe_ms: Millis,
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
            watch.metrics.set_delivery_health(Health::Unknown);
        }
        Deliveries { carriers }
    }

    /// The receipt timeout of `carrier` if its receipts are awaited now.
    pub fn awaited(&self, carrier: CarrierId) -> Option<Millis> {
        let watch = self.carriers.get(carrier as usize)?;
        let timeout = watch.timeout_ms?;
        lock(&watch.state).heard.then_some(timeout)
    }

    /// A receipt of `carrier` arrived: from now on its receipts are awaited (if configured).
    pub fn heard(&self, carrier: CarrierId) {
        let Some(watch) = self.carriers.get(carrier as usize) else {
            return;
        };
        if watch.timeout_ms.is_none() {
            return;
        }
        let mut state = lock(&watch.state);
        if !state.heard {
            state.heard = true;
            drop(state);
            watch.metrics.set_delivery_health(Health::Ok);
            tracing::info!(carrier, "first delivery receipt: this carrier's receipts are awaited from now on");
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

    /// How often a lagging carrier gets a probe, or a job the others left waiting.
    pub fn probe_every(&self, carrier: CarrierId) -> Duration {
        let timeout = self
            .carriers
            .get(carrier as usize)
            .and_then(|watch| watch.timeout_ms)
            .unwrap_or(30_000);
        Duration::from_millis((timeout / Millis::from(PROBES_PER_TIMEOUT)).max(10))
    }

    /// Whether a lagging carrier may send a probe now.
    pub fn probe_due(&self, carrier: CarrierId, now: Millis) -> bool {
        let every = self.probe_every(carrier).as_millis() as Millis;
        self.carriers
            .get(carrier as usize)
            .is_some_and(|watch| now >= lock(&watch.state).last_probe_ms + every)
    }

    /// A lagging carrier took a probe: the next is due one interval later.
    pub fn probe_taken(&self, carrier: CarrierId, now: Millis) {
        if let Some(watch) = self.carriers.get(carrier as usize) {
            lock(&watch.state).last_probe_ms = now;
        }
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
        match (self.timeout_ms, state.heard, state.lagging) {
            (None, _, _) | (_, false, _) => Health::Unknown,
            (Some(_), true, false) => Health::Ok,
            (Some(_), true, true) => Health::Lagging,
        }
    }

    /// One SMS's verdict.
    fn judge(&self, late: bool) {
        let mut state = lock(&self.state);
        let sample = if late { 1.0 } else { 0.0 };
        state.late_share += ALPHA * (sample - state.late_share);
        let was = self.health(&state);
        if !state.lagging && state.late_share >= ENTER_LAGGING {
            state.lagging = true;
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
        let metrics = Metrics::new(&[0], &[("a".to_owned(), false)], &[]);
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
    fn unknown_until_the_first_receipt() {
        let deliveries = deliveries(None);
        assert_eq!(deliveries.health(0), Health::Unknown);
        assert_eq!(deliveries.awaited(0), None);
        deliveries.heard(0);
        assert_eq!(deliveries.health(0), Health::Ok);
        assert_eq!(deliveries.awaited(0), Some(60_000));
    }

    #[test]
    fn a_timeout_of_zero_never_awaits_receipts() {
        let deliveries = deliveries(Some(0));
        deliveries.heard(0);
        for _ in 0..50 {
            deliveries.observe(late(0));
        }
        assert_eq!(deliveries.health(0), Health::Unknown);
        assert_eq!(deliveries.awaited(0), None);
    }

    #[test]
    fn lagging_comes_and_goes_with_hysteresis() {
        let deliveries = deliveries(Some(30_000));
        deliveries.heard(0);
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
    fn probes_are_spaced_by_a_share_of_the_timeout() {
        let deliveries = deliveries(Some(30_000));
        assert_eq!(deliveries.probe_every(0), Duration::from_millis(1000));
        assert!(deliveries.probe_due(0, 10_000));
        deliveries.probe_taken(0, 10_000);
        assert!(!deliveries.probe_due(0, 10_500));
        assert!(deliveries.probe_due(0, 11_000));
    }
}

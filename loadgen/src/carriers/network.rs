//! What every simulated carrier shares, whatever its wire (HTTP in [`super::http`], SMPP in
//! [`super::smsc`]): the capacity bucket and the draws of one submit (`judge`), what a carrier
//! counts, and handing an SMS over to its user with duplicates noticed ([`Network::hand_over`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use crate::carriers::handset::Handsets;
use crate::carriers::settings::{CarrierState, HandsetSettings, Phones};

/// What the simulated carriers share: the users' numbers and handsets, the tally of the run they
/// serve, and which users had an SMS accepted.
#[derive(Debug)]
pub struct Network {
    pub phones: Phones,
    pub handsets: Handsets,
    pub tally: Arc<dyn Tally>,
    /// SMS accepted per user (saturating), by schedule index.
    pub accepted: Box<[AtomicU8]>,
    /// How many times each SMS was handed over, across carriers, by its [`SmsKey`]: a repeat
    /// beyond what the user asked for is a duplicate SMS.
    handed_over: Mutex<HashMap<Box<str>, u8>>,
    /// Resends each user pressed (saturating), by schedule index.
    resends: Box<[AtomicU8]>,
    /// SMS to numbers outside the scenario.
    pub strangers: AtomicU64,
    /// The client the HTTP carriers post their receipts with, one pool for them all.
    pub(crate) receipts: Client<HttpConnector, Full<Bytes>>,
}

/// Where the network tells the run it serves what became of the SMS it handed over: the
/// rehearsal's measurements.
pub trait Tally: std::fmt::Debug + Send + Sync {
    /// An SMS handed over more times than its user asked for.
    fn duplicate_sms(&self);
    /// An SMS delivered to its user's handset.
    fn sms_received(&self);
    /// An SMS that reached the handset of a user who had left without a code (gave up, or the
    /// session ended, before any SMS came).
    fn sms_to_absent(&self);
}

/// The tally of a carrier run on its own, which nobody reads.
#[derive(Debug)]
pub(crate) struct Unread;

impl Tally for Unread {
    fn duplicate_sms(&self) {}
    fn sms_received(&self) {}
    fn sms_to_absent(&self) {}
}

/// How a repeated SMS is recognised.
#[derive(Debug)]
pub enum SmsKey {
    /// By the gateway's message id (HTTP): a repeat is the same job sent twice.
    MessageId(String),
    /// By destination and text (SMPP, whose `submit_sm` carries no gateway id): each code is
    /// drawn afresh and the text carries it, so the same text to the same number twice is the
    /// same verification's SMS sent twice. A resend sends the same code again on purpose, so a
    /// user's resends are allowed as that many more copies.
    Text,
}

/// What one carrier answered. An SMSC counts per `submit_sm` (a segment) in `accepted`,
/// `throttled`, `failed` and `refused`, and fills [`SmppCounts`] too.
#[derive(Debug, Default)]
pub struct CarrierCounts {
    pub accepted: AtomicU64,
    pub throttled: AtomicU64,
    pub failed: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    /// Accepted, and drawn undeliverable: never reached the handset.
    pub undeliverable: AtomicU64,
    /// Receipts the gateway acknowledged (HTTP: answered 2xx; SMPP: `deliver_sm_resp` ok).
    pub receipts_sent: AtomicU64,
    /// Receipts not sent, refused or left unanswered.
    pub receipts_failed: AtomicU64,
    /// Receipts the carrier chose never to send (`receipt_loss`).
    pub receipts_withheld: AtomicU64,
    pub smpp: SmppCounts,
}

/// What an SMSC saw besides submits' answers.
#[derive(Debug, Default)]
pub struct SmppCounts {
    /// Binds accepted, and refused (bad system_id or password, a second bind).
    pub binds: AtomicU64,
    pub binds_refused: AtomicU64,
    /// `submit_sm` received while bound, whatever their answer.
    pub submit_sm: AtomicU64,
    /// Parts of concatenated messages accepted.
    pub parts: AtomicU64,
    /// Whole messages handed over (a single SMS, or every part of a concatenated one).
    pub messages: AtomicU64,
    /// Whole messages whose text had been handed over before (see `SmsKey::Text`).
    pub duplicates: AtomicU64,
    /// Concatenated messages given up incomplete after a minute.
    pub incomplete: AtomicU64,
    /// PDUs that could not be read (answered `generic_nack`, or the connection closed), and
    /// `short_message`s whose text could not be decoded.
    pub decode_errors: AtomicU64,
    /// Receipts sent as `deliver_sm`, and `deliver_sm_resp` with a non-zero status.
    pub deliver_sm: AtomicU64,
    pub receipts_nacked: AtomicU64,
    /// Receipts never sent: no receiver bound before the held ones overflowed.
    pub receipts_lost: AtomicU64,
}

impl Network {
    pub fn new(
        phones: Phones,
        handsets: HandsetSettings,
        tally: Arc<dyn Tally>,
        n_users: u64,
    ) -> Network {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let receipts = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector);
        Network {
            phones,
            handsets: Handsets::new(handsets, tally.clone()),
            tally,
            accepted: (0..n_users).map(|_| AtomicU8::new(0)).collect(),
            handed_over: Mutex::new(HashMap::new()),
            resends: (0..n_users).map(|_| AtomicU8::new(0)).collect(),
            strangers: AtomicU64::new(0),
            receipts,
        }
    }

    /// A network without users, for a simulated carrier run on its own: every SMS goes to a
    /// stranger (no real number starts with `+0`).
    pub fn without_users() -> Network {
        let phones = Phones {
            prefix: "+0".to_owned(),
            digits: 7,
            first: 0,
        };
        Network::new(phones, HandsetSettings::faultless(), Arc::new(Unread), 0)
    }

    /// How many SMS carriers accepted for `user`.
    pub fn accepted_for(&self, user: u64) -> u8 {
        self.accepted
            .get(user as usize)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Notes that `user` pressed resend: one more copy of its code's SMS is expected (counted
    /// before the call, so an SMS that beats the call's answer is not taken for a duplicate).
    pub fn resend_pressed(&self, user: u64) {
        if let Some(count) = self.resends.get(user as usize) {
            saturating_increment(count);
        }
    }

    /// Hands an SMS a carrier accepted to the handset of the user who owns `to` (unless it was
    /// drawn undeliverable), counting it per user, as a stranger's, or as a duplicate, at once.
    /// It leaves the carrier for the handset `after` from now (the carrier's `delivery_delay`),
    /// and the handset's own delay follows. Returns whether it was a duplicate.
    pub fn hand_over(
        self: &Arc<Self>,
        to: &str,
        text: &str,
        key: SmsKey,
        delivered: bool,
        after: Duration,
    ) -> bool {
        let user = self.phones.user_of(to);
        let (key, allowed): (Box<str>, u8) = match key {
            SmsKey::MessageId(id) => (id.into_boxed_str(), 1),
            SmsKey::Text => {
                let resends = user
                    .and_then(|user| self.resends.get(user as usize))
                    .map_or(0, |count| count.load(Ordering::Relaxed));
                (
                    format!("{to}\n{text}").into_boxed_str(),
                    resends.saturating_add(1),
                )
            }
        };
        let copies = {
            let mut handed_over = self
                .handed_over
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let copies = handed_over.entry(key).or_insert(0);
            *copies = copies.saturating_add(1);
            *copies
        };
        let duplicate = copies > allowed;
        if duplicate {
            self.tally.duplicate_sms();
        }
        match user {
            Some(user) => {
                if let Some(count) = self.accepted.get(user as usize) {
                    saturating_increment(count);
                }
                if delivered {
                    if after.is_zero() {
                        self.leave_carrier(user, text);
                    } else {
                        let network = self.clone();
                        let text: Box<str> = text.into();
                        tokio::spawn(async move {
                            tokio::time::sleep(after).await;
                            network.leave_carrier(user, &text);
                        });
                    }
                }
            }
            None => {
                self.strangers.fetch_add(1, Ordering::Relaxed);
            }
        }
        duplicate
    }

    /// An SMS leaves its carrier for `user`'s handset.
    fn leave_carrier(&self, user: u64, text: &str) {
        self.tally.sms_received();
        self.handsets.deliver(user, text);
    }
}

fn saturating_increment(count: &AtomicU8) {
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_add(1))
    });
}

/// What a carrier answers one submit: an HTTP request, or an SMPP `submit_sm` (a segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Above capacity.
    Throttled,
    /// A temporary failure (`failure_rate`).
    Failed,
    /// A permanent refusal (`refusal_rate`).
    Refused,
    /// Accepted: the SMS leaves for the handset after `delivery_delay`, and its receipt, which
    /// says whether it was `delivered` (`undeliverable_rate`), is due `receipt_delay` after that
    /// unless the carrier never sends it (`receipt_lost`, drawn from `receipt_loss`).
    Accepted {
        delivery_delay: Duration,
        receipt_delay: Duration,
        delivered: bool,
        receipt_lost: bool,
    },
}

/// The draws for one submit at `state`: how long the carrier takes to answer and what it
/// answers (a token from `bucket` first, shared by all the carrier's connections), counted in
/// `counts`.
pub(crate) fn judge(
    state: &CarrierState,
    bucket: &Mutex<Bucket>,
    counts: &CarrierCounts,
) -> (Duration, Verdict) {
    judge_with(state, bucket, counts, &mut rand::rng())
}

/// [`judge`] with its draws taken from `rng`.
pub(crate) fn judge_with(
    state: &CarrierState,
    bucket: &Mutex<Bucket>,
    counts: &CarrierCounts,
    rng: &mut impl Rng,
) -> (Duration, Verdict) {
    let latency = state.latency.sample(rng);
    let roll = rng.random::<f64>();
    let allowed = bucket
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take(state.capacity_per_sec, Instant::now());
    let (counter, verdict) = if !allowed {
        (&counts.throttled, Verdict::Throttled)
    } else if roll < state.failure_rate {
        (&counts.failed, Verdict::Failed)
    } else if roll < state.failure_rate + state.refusal_rate {
        (&counts.refused, Verdict::Refused)
    } else {
        let delivered = rng.random::<f64>() >= state.undeliverable_rate;
        if !delivered {
            counts.undeliverable.fetch_add(1, Ordering::Relaxed);
        }
        let receipt_delay = state.receipt_delay.sample(rng);
        let delivery_delay = state.delivery_delay.sample(rng);
        let receipt_lost = rng.random::<f64>() < state.receipt_loss;
        (
            &counts.accepted,
            Verdict::Accepted {
                delivery_delay,
                receipt_delay,
                delivered,
                receipt_lost,
            },
        )
    };
    counter.fetch_add(1, Ordering::Relaxed);
    (latency, verdict)
}

/// How a simulated carrier counts its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CapacityRule {
    /// A token bucket holding a tenth of a second of capacity.
    #[default]
    Bucket,
    /// At most the capacity in any second (a sliding second), as the HTTP sink counts its
    /// `--capacity-per-sec`: a second's worth at once, then as the oldest leave the second.
    SlidingSecond,
}

/// A carrier's capacity, counted as its [`CapacityRule`] says: above it the carrier answers 429
/// (an SMSC `ESME_RTHROTTLED`).
#[derive(Debug)]
pub(crate) struct Bucket {
    rule: CapacityRule,
    tokens: f64,
    last: Instant,
    /// For [`CapacityRule::SlidingSecond`]: when the last second's submits were accepted.
    accepted: std::collections::VecDeque<Instant>,
}

impl Bucket {
    pub(crate) fn new(per_sec: f64) -> Bucket {
        Bucket::with_rule(per_sec, CapacityRule::Bucket)
    }

    pub(crate) fn with_rule(per_sec: f64, rule: CapacityRule) -> Bucket {
        Bucket {
            rule,
            tokens: burst(per_sec),
            last: Instant::now(),
            accepted: std::collections::VecDeque::new(),
        }
    }

    pub(crate) fn take(&mut self, per_sec: f64, now: Instant) -> bool {
        if self.rule == CapacityRule::SlidingSecond {
            while self
                .accepted
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) >= Duration::from_secs(1))
            {
                self.accepted.pop_front();
            }
            // At least one a second, as the bucket allows.
            let capacity = per_sec.floor().max(1.0);
            if (self.accepted.len() as f64) < capacity {
                self.accepted.push_back(now);
                return true;
            }
            return false;
        }
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + refill).min(burst(per_sec));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn burst(per_sec: f64) -> f64 {
    (per_sec / 10.0).max(1.0)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::carriers::settings::{Carrier, Dist, Protocol, TimelineEntry};

    fn carrier() -> Carrier {
        Carrier::steady(
            "a",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            1e9,
            Duration::ZERO,
            Duration::from_secs(2),
            Protocol::Http,
        )
    }

    /// Judges `n` submits at `state` with a seeded generator; returns the accepted verdicts.
    fn accepted(state: &CarrierState, n: usize) -> Vec<(Duration, Duration, bool)> {
        let bucket = Mutex::new(Bucket::new(state.capacity_per_sec));
        let counts = CarrierCounts::default();
        let mut rng = StdRng::seed_from_u64(42);
        (0..n)
            .filter_map(|_| match judge_with(state, &bucket, &counts, &mut rng).1 {
                Verdict::Accepted {
                    delivery_delay,
                    receipt_delay,
                    receipt_lost,
                    ..
                } => Some((delivery_delay, receipt_delay, receipt_lost)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_share_of_receipts_is_lost_as_receipt_loss_says() {
        let mut state = carrier().base;
        assert!(accepted(&state, 1000).iter().all(|(.., lost)| !lost));
        state.receipt_loss = 0.3;
        let verdicts = accepted(&state, 10_000);
        assert_eq!(verdicts.len(), 10_000);
        let lost = verdicts.iter().filter(|(.., lost)| *lost).count();
        assert!((2800..3200).contains(&lost), "{lost} of 10000 lost");
        state.receipt_loss = 1.0;
        assert!(accepted(&state, 1000).iter().all(|(.., lost)| *lost));
    }

    #[test]
    fn the_delivery_delay_is_drawn_at_acceptance_from_the_timeline() {
        let mut carrier = carrier();
        let mut late = carrier.base.clone();
        late.delivery_delay = Dist::Uniform {
            min: Duration::from_secs(300),
            max: Duration::from_secs(1500),
        };
        late.receipt_loss = 0.5;
        carrier.timeline = vec![TimelineEntry {
            from: Duration::from_secs(300),
            until: Duration::from_secs(5400),
            state: late,
        }];
        for (at, delayed) in [(0, false), (300, true), (5399, true), (5400, false)] {
            let state = carrier.state_at(Duration::from_secs(at));
            let verdicts = accepted(state, 200);
            let delays_ok = verdicts.iter().all(|(delay, receipt, _)| {
                *receipt == Duration::from_secs(2)
                    && if delayed {
                        (300..=1500).contains(&delay.as_secs())
                    } else {
                        delay.is_zero()
                    }
            });
            assert!(delays_ok, "at {at} s: {:?}", &verdicts[..3]);
            let lost = verdicts.iter().filter(|(.., lost)| *lost).count();
            assert_eq!(lost > 50, delayed, "at {at} s: {lost} receipts lost");
        }
    }
}

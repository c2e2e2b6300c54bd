//! What a scenario says of the simulated network: each carrier's behaviour over its timeline and
//! its wire (HTTP, or SMPP with its knobs), what handsets do to SMS, and the users' numbers. The
//! rehearsal's scenario file is parsed and validated into these; a carrier run on its own
//! (`loadgen smsc`) builds them from flags.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// A simulated carrier.
#[derive(Debug, Clone)]
pub struct Carrier {
    pub name: String,
    /// Where it listens; port 0 picks one (fine for the in-process gateway).
    pub listen: SocketAddr,
    pub base: CarrierState,
    /// Changes on the timeline: each applies from `from` until `until`.
    pub timeline: Vec<TimelineEntry>,
    /// What the gateway is configured with (in-process gateway only).
    pub window: u32,
    pub pace_per_sec: u32,
    pub weight: u32,
    /// A backup the gateway calls on only while the others lag or fail (`standby = true`).
    pub standby: bool,
    pub prefixes: Vec<String>,
    /// The token its receipts carry; with `--target` it must be the gateway's `receipt_token`
    /// for this carrier. Made up when absent.
    pub receipt_token: Option<String>,
    /// The wire it speaks: docs/DESIGN.md section 5 over HTTP, or SMPP 3.4 as an SMSC.
    pub protocol: Protocol,
}

/// A simulated carrier's wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Smpp(Smpp),
}

/// The SMPP knobs of a simulated SMSC (`protocol = "smpp"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smpp {
    /// The `system_id` and `password` binds must carry; made up when absent (with `--target`,
    /// they must be what the gateway binds with).
    pub system_id: Option<String>,
    pub password: Option<String>,
    /// GSM-7 `short_message`s arrive packed 8 septets into 7 octets.
    pub gsm7_packed: bool,
    /// The `data_coding` read as GSM-7 (`0` unless the ESME says otherwise; `0xF0`..`0xF3` are
    /// GSM-7 always).
    pub gsm7_data_coding: u8,
    /// The `data_coding` read as UCS-2 (`8` unless the ESME says otherwise).
    pub ucs2_data_coding: u8,
    /// Where receipts carry the message id and state.
    pub receipt_format: ReceiptFormat,
    /// How receipts quote the message id.
    pub receipt_ids: ReceiptIds,
    /// The in-process gateway's binds to it, and their kind.
    pub binds: u32,
    pub bind: BindKind,
}

/// Where a receipt (`deliver_sm`) carries its message id and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptFormat {
    /// The `receipted_message_id` and `message_state` TLVs only (the text is a bare `id:`).
    Tlv,
    /// The `id:… stat:…` text only.
    Text,
    /// Both.
    Both,
}

/// How a receipt quotes the id its `submit_sm_resp` gave (`00000A1F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptIds {
    /// Lower case without leading zeros (`a1f`): the gateway must normalise ids to match.
    Short,
    /// As `submit_sm_resp` gave it.
    Same,
}

/// How the in-process gateway binds to a simulated SMSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindKind {
    Transceiver,
    TransmitterReceiver,
}

impl BindKind {
    /// The gateway configuration's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BindKind::Transceiver => "transceiver",
            BindKind::TransmitterReceiver => "transmitter_receiver",
        }
    }
}

/// How a carrier behaves at some moment.
#[derive(Debug, Clone)]
pub struct CarrierState {
    /// SMS accepted per second; above it, `429`.
    pub capacity_per_sec: f64,
    pub latency: Dist,
    /// Share of submits answered `500`.
    pub failure_rate: f64,
    /// Share of submits refused permanently (`400`).
    pub refusal_rate: f64,
    /// Share of accepted SMS that never reach the handset: their receipt says `undeliverable`.
    pub undeliverable_rate: f64,
    /// From acceptance to the `delivered` (or `undeliverable`) receipt, counted once the SMS
    /// leaves the carrier's queue (after `delivery_delay`).
    pub receipt_delay: Dist,
    /// How long an accepted SMS waits in the carrier's own queue before it leaves for the
    /// handset (a carrier that accepts at once but generates its SMS late).
    pub delivery_delay: Dist,
    /// Share of receipts the carrier never sends (the SMS is delivered all the same).
    pub receipt_loss: f64,
    /// Down: connections are dropped without an answer.
    pub down: bool,
}

#[derive(Debug, Clone)]
pub struct TimelineEntry {
    pub from: Duration,
    pub until: Duration,
    pub state: CarrierState,
}

/// A distribution of durations: constant, log-normal by its median and 95th percentile, or
/// uniform between two bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Constant(Duration),
    LogNormal { median: Duration, p95: Duration },
    Uniform { min: Duration, max: Duration },
}

impl Dist {
    /// A sample, given a standard normal deviate `z`: the distribution's quantile at the
    /// standard normal's probability of `z` (so `z = 0` is the median, and a larger `z` never
    /// gives a shorter duration).
    pub fn sample_with(&self, z: f64) -> Duration {
        match *self {
            Dist::Constant(duration) => duration,
            Dist::LogNormal { median, p95 } => {
                let median = median.as_secs_f64().max(1e-6);
                let sigma = (p95.as_secs_f64().max(median) / median).ln() / 1.6449;
                Duration::from_secs_f64((median.ln() + sigma * z).exp().min(86_400.0))
            }
            Dist::Uniform { min, max } => {
                let span = max.saturating_sub(min);
                min + span.mul_f64(normal_cdf(z).clamp(0.0, 1.0))
            }
        }
    }

    /// A sample drawn with `rng`.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        self.sample_with(standard_normal(rng))
    }

    /// The distribution with every duration divided by `by` (time compression).
    pub(crate) fn scaled(self, by: f64) -> Dist {
        match self {
            Dist::Constant(duration) => Dist::Constant(duration.div_f64(by)),
            Dist::LogNormal { median, p95 } => Dist::LogNormal {
                median: median.div_f64(by),
                p95: p95.div_f64(by),
            },
            Dist::Uniform { min, max } => Dist::Uniform {
                min: min.div_f64(by),
                max: max.div_f64(by),
            },
        }
    }
}

/// The standard normal's cumulative distribution at `z` (Abramowitz and Stegun 7.1.26, within
/// 1.5e-7): turns a standard normal deviate into a uniform one.
fn normal_cdf(z: f64) -> f64 {
    if z.is_nan() {
        return 0.5;
    }
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// A standard normal deviate (Box-Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Carrier {
    /// The carrier's state at `elapsed` into the run.
    pub fn state_at(&self, elapsed: Duration) -> &CarrierState {
        self.timeline
            .iter()
            .find(|entry| entry.from <= elapsed && elapsed < entry.until)
            .map_or(&self.base, |entry| &entry.state)
    }

    /// How many SMS the carrier could accept over the first `duration` of the run: its capacity
    /// per second integrated over time, following its timeline (none while it is down).
    pub fn capacity_over(&self, duration: Duration) -> f64 {
        let mut moments = vec![Duration::ZERO, duration];
        for entry in &self.timeline {
            moments.extend([entry.from.min(duration), entry.until.min(duration)]);
        }
        moments.sort_unstable();
        moments.dedup();
        moments
            .windows(2)
            .map(|span| {
                let state = self.state_at(span[0]);
                let per_sec = if state.down {
                    0.0
                } else {
                    state.capacity_per_sec
                };
                per_sec * (span[1] - span[0]).as_secs_f64()
            })
            .sum()
    }

    /// A carrier that behaves the same all run long, without failures: for a simulator run on
    /// its own (`loadgen smsc`) and for tests.
    pub fn steady(
        name: &str,
        listen: SocketAddr,
        capacity_per_sec: f64,
        latency: Duration,
        receipt_delay: Duration,
        protocol: Protocol,
    ) -> Carrier {
        Carrier {
            name: name.to_owned(),
            listen,
            base: CarrierState {
                capacity_per_sec,
                latency: Dist::Constant(latency),
                failure_rate: 0.0,
                refusal_rate: 0.0,
                undeliverable_rate: 0.0,
                receipt_delay: Dist::Constant(receipt_delay),
                delivery_delay: Dist::Constant(Duration::ZERO),
                receipt_loss: 0.0,
                down: false,
            },
            timeline: Vec::new(),
            window: 100,
            pace_per_sec: capacity_per_sec.round().max(1.0) as u32,
            weight: 1,
            standby: false,
            prefixes: Vec::new(),
            receipt_token: None,
            protocol,
        }
    }
}

impl Default for Smpp {
    fn default() -> Smpp {
        Smpp {
            system_id: None,
            password: None,
            gsm7_packed: false,
            gsm7_data_coding: 0,
            ucs2_data_coding: 8,
            receipt_format: ReceiptFormat::Both,
            receipt_ids: ReceiptIds::Short,
            binds: 1,
            bind: BindKind::Transceiver,
        }
    }
}

/// What handsets do to SMS on their way to the user.
#[derive(Debug, Clone)]
pub struct HandsetSettings {
    pub delay: Dist,
    /// Share of SMS lost on the way.
    pub loss: f64,
    /// Share of SMS delivered twice.
    pub duplicate: f64,
    /// Share of SMS held back long enough to arrive after a later one.
    pub reorder: f64,
}

impl HandsetSettings {
    /// Handsets that deliver at once and never lose, duplicate or hold back an SMS.
    pub(crate) fn faultless() -> HandsetSettings {
        HandsetSettings {
            delay: Dist::Constant(Duration::ZERO),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

/// Phone numbers: `prefix` followed by the user's index, zero-padded to `digits` digits.
#[derive(Debug, Clone)]
pub struct Phones {
    pub prefix: String,
    pub digits: u8,
    pub first: u64,
}

impl Phones {
    /// Every user's phone number, by index.
    ///
    /// The first digit after the prefix is the user's index modulo 10, and the rest the index
    /// divided by 10 (plus `first`): so the users of shard `i` of `n` (for `n` dividing 10) own
    /// whole number prefixes, which a gateway's prefix rules can route to that shard's carriers.
    pub fn phone(&self, index: u64) -> String {
        format!(
            "{}{}{:0width$}",
            self.prefix,
            index % 10,
            self.first + index / 10,
            width = usize::from(self.digits) - 1
        )
    }

    /// The index of the user who owns `phone`, if a user does.
    pub fn user_of(&self, phone: &str) -> Option<u64> {
        let digits = phone.strip_prefix(&self.prefix)?;
        if digits.len() != usize::from(self.digits) || !digits.is_ascii() {
            return None;
        }
        let (last, rest) = digits.split_at(1);
        let last: u64 = last.parse().ok()?;
        let rest: u64 = rest.parse().ok()?;
        Some(rest.checked_sub(self.first)? * 10 + last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carriers_capacity_follows_its_timeline() {
        let secs = Duration::from_secs;
        let mut carrier = Carrier::steady(
            "a",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            25.0,
            Duration::ZERO,
            Duration::ZERO,
            Protocol::Http,
        );
        assert_eq!(carrier.capacity_over(secs(100)), 2500.0);
        let slow = CarrierState {
            capacity_per_sec: 1.5,
            ..carrier.base.clone()
        };
        let down = CarrierState {
            down: true,
            ..carrier.base.clone()
        };
        // Slow from 10 s to 30 s, down from 50 s to 200 s (past the end): 10 × 25 + 20 × 1.5 +
        // 20 × 25, and nothing after 50 s. An entry that overlaps an earlier one yields to it,
        // as `state_at` says.
        carrier.timeline = vec![
            TimelineEntry {
                from: secs(10),
                until: secs(30),
                state: slow,
            },
            TimelineEntry {
                from: secs(50),
                until: secs(200),
                state: down,
            },
            TimelineEntry {
                from: secs(20),
                until: secs(60),
                state: carrier.base.clone(),
            },
        ];
        assert_eq!(carrier.capacity_over(secs(100)), 250.0 + 30.0 + 500.0);
        assert_eq!(carrier.capacity_over(secs(20)), 250.0 + 15.0);
        assert_eq!(carrier.capacity_over(Duration::ZERO), 0.0);
    }

    #[test]
    fn lognormal_has_its_median_and_p95() {
        let dist = Dist::LogNormal {
            median: Duration::from_millis(100),
            p95: Duration::from_millis(400),
        };
        assert_eq!(dist.sample_with(0.0), Duration::from_millis(100));
        let p95 = dist.sample_with(1.6449).as_secs_f64();
        assert!((p95 - 0.4).abs() < 1e-3, "{p95}");
    }

    #[test]
    fn uniform_stays_within_its_bounds_and_spreads_evenly() {
        let dist = Dist::Uniform {
            min: Duration::from_secs(300),
            max: Duration::from_secs(1500),
        };
        // The standard normal's distribution is approximated within 1.5e-7.
        let near = |z: f64, secs: f64| (dist.sample_with(z).as_secs_f64() - secs).abs() < 0.1;
        assert!(near(0.0, 900.0));
        assert!(near(f64::NEG_INFINITY, 300.0));
        assert!(near(f64::INFINITY, 1500.0));
        assert!(near(f64::NAN, 900.0));
        assert!(near(-1.6449, 360.0));
        let p95 = dist.sample_with(1.6449).as_secs_f64();
        assert!((p95 - 1440.0).abs() < 0.1, "{p95}");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let mut below_600 = 0;
        for _ in 0..10_000 {
            let sample = dist.sample(&mut rng);
            assert!((300..=1500).contains(&sample.as_secs()), "{sample:?}");
            if sample < Duration::from_secs(600) {
                below_600 += 1;
            }
        }
        // A quarter of the span: 2,500 expected.
        assert!((2300..2700).contains(&below_600), "{below_600}");
        assert_eq!(
            dist.scaled(100.0),
            Dist::Uniform {
                min: Duration::from_secs(3),
                max: Duration::from_secs(15)
            }
        );
    }
}

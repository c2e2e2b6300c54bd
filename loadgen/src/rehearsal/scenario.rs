//! Scenario files: who arrives when, how users behave, and the carriers and handsets they meet.
//!
//! A scenario is a TOML file (see `scenarios/` for examples and `scenarios/README.md` for every
//! key). Everything in it is in *scenario time*; `time_compression = N` runs the scenario N times
//! faster than the day it describes: every duration is divided by N and every rate multiplied
//! by N, so queue waits keep the same proportion to code lifetimes as on the day.
//!
//! Errors name the file, the key (`carriers[1].timeline[0].until_secs`) and what is wrong.
//!
//! The carriers and handsets are parsed into the simulated network's own settings
//! ([`crate::carriers::Carrier`], [`crate::carriers::HandsetSettings`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::carriers::{
    BindKind, Carrier, CarrierState, Dist, HandsetSettings, Phones, Protocol, ReceiptFormat,
    ReceiptIds, Smpp, TimelineEntry,
};
use crate::rehearsal::schedule::RatePoint;

/// A scenario, validated and with time compression applied: every duration and rate here is in
/// real (wall-clock) terms.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub time_compression: f64,
    /// Arrivals happen over this long.
    pub duration: Duration,
    /// After the last arrival, journeys get at most this long to finish.
    pub drain: Duration,
    /// Keep-alive connections the users share.
    pub connections: usize,
    pub phones: Phones,
    /// The arrival rate over time: piecewise linear between points, constant after the last.
    pub arrivals: Vec<RatePoint>,
    pub clients: Vec<Client>,
    pub users: Users,
    pub handsets: HandsetSettings,
    pub gateway: GatewaySettings,
    pub carriers: Vec<Carrier>,
    /// Moments of the scenario at which the report counts the users verified so far.
    pub marks: Vec<Mark>,
}

/// A moment of the scenario the report counts completed sign-ups by.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Scenario seconds from the start, as written.
    pub at_secs: f64,
    /// The same moment in real time (time compression applied).
    pub at: Duration,
    pub label: String,
}

/// A frontend whose users arrive with a share of all arrivals.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub share: f64,
    pub priority: u8,
    /// The gateway's request-rate limit for it (in-process gateway only).
    pub rate_per_sec: u32,
    /// Sent as `Bearer`; for the in-process gateway a key is made up when absent.
    pub api_key: Option<String>,
}

/// How users behave.
#[derive(Debug, Clone)]
pub struct Users {
    /// From the SMS on the handset to the code typed.
    pub type_delay: Dist,
    /// Share of users who type a wrong code first.
    pub mistype: f64,
    /// A user with no SMS after this long may press resend.
    pub resend_after: Duration,
    /// Share of waiting users who press resend then.
    pub resend: f64,
    /// A user with no SMS after this long gives up.
    pub give_up_after: Duration,
    /// Share of users who get the SMS and never come back to type it.
    pub never_type: f64,
    /// Share of users whose sign-up failed (no code in time, an expired session, a refused
    /// start) who come back later and start again.
    pub retry: f64,
    /// How long after the failure they come back.
    pub retry_after: Dist,
    /// How many times a user starts again at most.
    pub retries: u32,
    /// While its user waits for the SMS, the frontend reads the verification this often
    /// (jittered by a fifth either way), the gateway's sign that the user is still there;
    /// `None`: it never does.
    pub poll_every: Option<Duration>,
}

/// Settings of the in-process gateway (ignored with `--target`).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub code_ttl: Duration,
    pub max_extension: Duration,
    pub queue_capacity: usize,
    /// The delivery-aware defences, with the gateway's own defaults: how long each carrier's
    /// `delivered` receipt may take before the SMS is rerouted (real time, so compressed like
    /// every duration; zero turns the watch off), how many reroutes a verification gets, and
    /// whether a code's expiry counts from its delivery.
    pub receipt_timeout: Duration,
    pub reroutes: u32,
    pub expiry_follows_delivery: bool,
    /// The overload policy of the gateway's queue (`[queue]`), in real time like every duration
    /// here: which policy, the predicted SMS wait past which a start is refused
    /// (`come_back_later`), the oldest job's wait that counts as overload and for how long, and
    /// how long an unread verification may go unseen before overload drops it (`None`: never).
    pub queue_policy: QueuePolicy,
    pub max_wait: Duration,
    pub overload_wait: Duration,
    pub overload_after: Duration,
    pub unseen_after: Option<Duration>,
}

/// The gateway queue's policy under overload (`gateway.queue_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Admission by patience; under overload, newest first and unseen verifications dropped.
    Adaptive,
    /// Earliest deadline first always, no abandonment drops, admission by `max_extension`.
    Deadline,
}

impl QueuePolicy {
    /// The spelling of scenarios and of the gateway's configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            QueuePolicy::Adaptive => "adaptive",
            QueuePolicy::Deadline => "deadline",
        }
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        Scenario::load_with(path, &[])
    }

    /// Reads a scenario file, applies `overrides` (`--set`) in order, and validates the result.
    pub fn load_with(path: &Path, overrides: &[Override]) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Scenario::parse_with(&text, overrides).map_err(|error| error.in_file(path))
    }

    /// Parses and validates scenario text; errors name the key at fault.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse_with(text, &[])
    }

    /// Parses scenario text, applies `overrides` in order, and validates the result.
    pub fn parse_with(text: &str, overrides: &[Override]) -> Result<Scenario, ScenarioError> {
        if overrides.is_empty() {
            return Scenario::parse_text(text);
        }
        let mut table: toml::Table = text.parse().map_err(|error| syntax_error(text, &error))?;
        for set in overrides {
            set.apply(&mut table)?;
        }
        let text = toml::to_string(&table).map_err(|error| ScenarioError::Invalid {
            path: None,
            key: String::new(),
            message: format!("after --set: {error}"),
        })?;
        Scenario::parse_text(&text)
    }

    fn parse_text(text: &str) -> Result<Scenario, ScenarioError> {
        let deserializer =
            toml::Deserializer::parse(text).map_err(|error| syntax_error(text, &error))?;
        let raw: RawScenario = serde_path_to_error::deserialize(deserializer).map_err(|error| {
            ScenarioError::Invalid {
                path: None,
                key: error.path().to_string(),
                message: error.inner().message().to_owned(),
            }
        })?;
        raw.validate()
    }

    /// Every user's phone number, by index (see [`Phones::phone`]).
    pub fn phone(&self, index: u64) -> String {
        self.phones.phone(index)
    }

    /// The user index of a phone number of this scenario, if it is one.
    pub fn user_of(&self, phone: &str) -> Option<u64> {
        self.phones.user_of(phone)
    }

    /// The number prefixes the users of shard `shard` of `n_shards` own (`n_shards` dividing
    /// 10).
    pub fn shard_prefixes(&self, shard: u64, n_shards: u64) -> Vec<String> {
        (0..10)
            .filter(|digit| digit % n_shards == shard)
            .map(|digit| format!("{}{digit}", self.phones.prefix))
            .collect()
    }

    /// How many users the arrival profile brings in expectation: the integral of the rate.
    pub fn expected_arrivals(&self) -> f64 {
        crate::rehearsal::schedule::integral(&self.arrivals, self.duration)
    }
}

/// A TOML syntax error, with where it is: line and column, counted from 1.
fn syntax_error(text: &str, error: &toml::de::Error) -> ScenarioError {
    let position = error.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    ScenarioError::Invalid {
        path: None,
        key: String::new(),
        message: format!("{}{}", position.unwrap_or_default(), error.message()),
    }
}

/// A `--set KEY=VALUE` override of a scenario key: a dotted path into the scenario's TOML
/// (`users.resend`, `carriers[0].timeline[1].delivery_delay_ms`) and a TOML value (`0.2`,
/// `true`, `"text"`, `{ min = 300000, max = 1500000 }`).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The path as written.
    pub key: String,
    steps: Vec<Step>,
    pub value: toml::Value,
}

/// One step of an override's path: a key of a table, or an index into an array.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The longest path an override may have, in steps.
const MAX_PATH_STEPS: usize = 16;

impl std::str::FromStr for Override {
    type Err = String;

    fn from_str(text: &str) -> Result<Override, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
        let key = key.trim();
        let steps = parse_path(key).map_err(|message| format!("key {key:?}: {message}"))?;
        let value = format!("value = {}", value.trim())
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut table| table.remove("value"))
            .ok_or_else(|| {
                format!(
                    "key {key}: {:?} is not a TOML value (a number, true or false, a string in \
                     quotes, an inline table or array)",
                    value.trim()
                )
            })?;
        Ok(Override {
            key: key.to_owned(),
            steps,
            value,
        })
    }
}

/// `a.b[2].c` (or `a.b.2.c`) into its steps.
fn parse_path(key: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if name.is_empty() && steps.is_empty() {
            return Err("must start with a key".to_owned());
        }
        if !name.is_empty() {
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{name:?} is not a key"));
            }
            steps.push(match name.parse::<usize>() {
                Ok(index) if !steps.is_empty() => Step::Index(index),
                _ => Step::Key(name.to_owned()),
            });
        } else if rest.is_empty() {
            return Err("has an empty step".to_owned());
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let (index, after) = inner
                .split_once(']')
                .ok_or_else(|| "has an unclosed [".to_owned())?;
            let index = index
                .parse::<usize>()
                .map_err(|_| format!("[{index}] is not an index"))?;
            steps.push(Step::Index(index));
            rest = after;
        }
        if !rest.is_empty() {
            return Err(format!("{rest:?} after an index"));
        }
        if steps.len() > MAX_PATH_STEPS {
            return Err(format!("has more than {MAX_PATH_STEPS} steps"));
        }
    }
    Ok(steps)
}

impl Override {
    /// Sets the value in `table`, making the tables on its way that are missing; an index must
    /// name an entry that exists.
    fn apply(&self, table: &mut toml::Table) -> Result<(), ScenarioError> {
        let fail = |message: String| ScenarioError::Invalid {
            path: None,
            key: self.key.clone(),
            message: format!("--set: {message}"),
        };
        let mut root = toml::Value::Table(std::mem::take(table));
        let mut here = &mut root;
        let mut walked = String::new();
        for (at, step) in self.steps.iter().enumerate() {
            let last = at + 1 == self.steps.len();
            here = match (step, here) {
                (Step::Key(name), toml::Value::Table(inner)) => {
                    inner.entry(name.clone()).or_insert_with(|| {
                        if last {
                            self.value.clone()
                        } else {
                            toml::Value::Table(toml::Table::new())
                        }
                    })
                }
                (Step::Index(index), toml::Value::Array(values)) => {
                    let len = values.len();
                    values.get_mut(*index).ok_or_else(|| {
                        fail(format!("{walked} has {len} entries, not an entry {index}"))
                    })?
                }
                (Step::Key(_), toml::Value::Array(_)) => {
                    return Err(fail(format!("{walked} is an array: give an index")));
                }
                (Step::Index(_), _) => return Err(fail(format!("{walked} is not an array"))),
                (Step::Key(_), _) => return Err(fail(format!("{walked} is not a table"))),
            };
            walked.push_str(&match step {
                Step::Key(name) if walked.is_empty() => name.clone(),
                Step::Key(name) => format!(".{name}"),
                Step::Index(index) => format!("[{index}]"),
            });
        }
        *here = self.value.clone();
        if let toml::Value::Table(root) = root {
            *table = root;
        }
        Ok(())
    }
}

/// A scenario that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario {path}: cannot read it: {source}", path = path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}{message}", path.as_ref().map(|p| format!("scenario {}: ", p.display())).unwrap_or_default(), if key.is_empty() { String::new() } else { format!("key {key}: ") })]
    Invalid {
        path: Option<PathBuf>,
        key: String,
        message: String,
    },
}

impl ScenarioError {
    fn in_file(self, file: &Path) -> ScenarioError {
        match self {
            ScenarioError::Invalid { key, message, .. } => ScenarioError::Invalid {
                path: Some(file.to_owned()),
                key,
                message,
            },
            other => other,
        }
    }
}

/// The most users one run may schedule (in expectation).
const MAX_ARRIVALS: f64 = 50_000_000.0;

fn invalid<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, ScenarioError> {
    Err(ScenarioError::Invalid {
        path: None,
        key: key.into(),
        message: message.into(),
    })
}

// === the file as written ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    seed: u64,
    time_compression: Option<f64>,
    duration_secs: f64,
    drain_secs: Option<f64>,
    connections: Option<usize>,
    phones: RawPhones,
    arrivals: Vec<RawRatePoint>,
    clients: Vec<RawClient>,
    #[serde(default)]
    users: RawUsers,
    #[serde(default)]
    handsets: RawHandsets,
    #[serde(default)]
    gateway: RawGateway,
    carriers: Vec<RawCarrier>,
    #[serde(default)]
    marks: Vec<RawMark>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMark {
    at_secs: f64,
    label: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhones {
    prefix: String,
    digits: Option<u8>,
    #[serde(default)]
    first: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRatePoint {
    at_secs: f64,
    per_sec: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    share: f64,
    #[serde(default)]
    priority: u8,
    rate_per_sec: Option<u32>,
    api_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    type_delay_secs: Option<RawDist>,
    mistype: Option<f64>,
    resend_after_secs: Option<f64>,
    resend: Option<f64>,
    give_up_after_secs: Option<f64>,
    never_type: Option<f64>,
    retry: Option<f64>,
    retry_after_secs: Option<RawDist>,
    retries: Option<u32>,
    poll_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandsets {
    delay_secs: Option<RawDist>,
    loss: Option<f64>,
    duplicate: Option<f64>,
    reorder: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    code_ttl_secs: Option<f64>,
    max_extension_secs: Option<f64>,
    queue_capacity: Option<usize>,
    receipt_timeout_secs: Option<f64>,
    reroutes: Option<u32>,
    expiry_follows_delivery: Option<bool>,
    queue_policy: Option<String>,
    max_wait_secs: Option<f64>,
    overload_wait_secs: Option<f64>,
    overload_after_secs: Option<f64>,
    unseen_after_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCarrier {
    name: String,
    listen: Option<SocketAddr>,
    capacity_per_sec: f64,
    latency_ms: Option<RawDist>,
    failure_rate: Option<f64>,
    refusal_rate: Option<f64>,
    receipt_delay_ms: Option<RawDist>,
    delivery_delay_ms: Option<RawDist>,
    receipt_loss: Option<f64>,
    window: Option<u32>,
    pace_per_sec: Option<u32>,
    weight: Option<u32>,
    standby: Option<bool>,
    #[serde(default)]
    prefixes: Vec<String>,
    receipt_token: Option<String>,
    undeliverable_rate: Option<f64>,
    #[serde(default)]
    timeline: Vec<RawTimelineEntry>,
    #[serde(default)]
    protocol: RawProtocol,
    system_id: Option<String>,
    password: Option<String>,
    gsm7_packed: Option<bool>,
    gsm7_data_coding: Option<u8>,
    ucs2_data_coding: Option<u8>,
    receipt_format: Option<ReceiptFormat>,
    receipt_ids: Option<ReceiptIds>,
    binds: Option<u32>,
    bind: Option<BindKind>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawProtocol {
    #[default]
    Http,
    Smpp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimelineEntry {
    from_secs: f64,
    until_secs: f64,
    capacity_per_sec: Option<f64>,
    latency_ms: Option<RawDist>,
    failure_rate: Option<f64>,
    refusal_rate: Option<f64>,
    undeliverable_rate: Option<f64>,
    receipt_delay_ms: Option<RawDist>,
    delivery_delay_ms: Option<RawDist>,
    receipt_loss: Option<f64>,
    #[serde(default)]
    down: bool,
}

/// A number (constant), `{ median = …, p95 = … }` (log-normal) or `{ min = …, max = … }`
/// (uniform), in the unit its key names.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum RawDist {
    Constant(f64),
    LogNormal { median: f64, p95: f64 },
    Uniform { min: f64, max: f64 },
}

impl RawDist {
    fn validate(self, key: &str, unit_secs: f64) -> Result<Dist, ScenarioError> {
        let ok = |value: f64| value.is_finite() && value >= 0.0 && value * unit_secs <= 86_400.0;
        match self {
            RawDist::Constant(value) if ok(value) => {
                Ok(Dist::Constant(Duration::from_secs_f64(value * unit_secs)))
            }
            RawDist::LogNormal { median, p95 } if ok(median) && ok(p95) && median > 0.0 => {
                if p95 < median {
                    return invalid(format!("{key}.p95"), "must not be below the median");
                }
                Ok(Dist::LogNormal {
                    median: Duration::from_secs_f64(median * unit_secs),
                    p95: Duration::from_secs_f64(p95 * unit_secs),
                })
            }
            RawDist::Uniform { min, max } if ok(min) && ok(max) => {
                if max < min {
                    return invalid(format!("{key}.max"), "must not be below the min");
                }
                Ok(Dist::Uniform {
                    min: Duration::from_secs_f64(min * unit_secs),
                    max: Duration::from_secs_f64(max * unit_secs),
                })
            }
            _ => invalid(
                key,
                "must be a non-negative number, { median, p95 } with a positive median, or \
                 { min, max }, at most a day",
            ),
        }
    }
}

fn share(key: &str, value: Option<f64>, default: f64) -> Result<f64, ScenarioError> {
    let value = value.unwrap_or(default);
    if !(0.0..=1.0).contains(&value) {
        return invalid(key, "must be a share between 0 and 1");
    }
    Ok(value)
}

fn seconds(key: &str, value: f64, min: f64, max: f64) -> Result<Duration, ScenarioError> {
    if !value.is_finite() || value < min || value > max {
        return invalid(key, format!("must be between {min} and {max} seconds"));
    }
    Ok(Duration::from_secs_f64(value))
}

impl RawScenario {
    fn validate(self) -> Result<Scenario, ScenarioError> {
        if self.name.is_empty() || self.name.len() > 64 {
            return invalid("name", "must be 1 to 64 characters");
        }
        let compression = self.time_compression.unwrap_or(1.0);
        if !(compression.is_finite() && (0.001..=10_000.0).contains(&compression)) {
            return invalid("time_compression", "must be between 0.001 and 10000");
        }
        let duration = seconds("duration_secs", self.duration_secs, 0.001, 30.0 * 86_400.0)?;
        let drain = seconds(
            "drain_secs",
            self.drain_secs.unwrap_or(1800.0),
            0.0,
            30.0 * 86_400.0,
        )?;

        let prefix = self.phones.prefix;
        let prefix_digits = prefix.strip_prefix('+').unwrap_or("");
        if prefix_digits.is_empty() || !prefix_digits.bytes().all(|b| b.is_ascii_digit()) {
            return invalid("phones.prefix", "must be + and digits, like \"+39333\"");
        }
        let digits = self.phones.digits.unwrap_or(7);
        if !(2..=12).contains(&digits) || prefix_digits.len() + usize::from(digits) > 15 {
            return invalid(
                "phones.digits",
                "prefix and digits together must make at most 15 digits (E.164)",
            );
        }

        if self.arrivals.is_empty() {
            return invalid("arrivals", "needs at least one { at_secs, per_sec } point");
        }
        let mut arrivals = Vec::with_capacity(self.arrivals.len());
        let mut last_at = -1.0;
        for (index, point) in self.arrivals.iter().enumerate() {
            let key = |field: &str| format!("arrivals[{index}].{field}");
            if !(point.at_secs.is_finite() && (0.0..=30.0 * 86_400.0).contains(&point.at_secs))
                || point.at_secs <= last_at
            {
                return invalid(
                    key("at_secs"),
                    "must be between 0 and 30 days, and later than the previous point",
                );
            }
            last_at = point.at_secs;
            if !(point.per_sec.is_finite() && (0.0..=1e7).contains(&point.per_sec)) {
                return invalid(key("per_sec"), "must be between 0 and 10000000");
            }
            arrivals.push(RatePoint {
                at: Duration::from_secs_f64(point.at_secs / compression),
                per_sec: point.per_sec * compression,
            });
        }

        if self.clients.is_empty() {
            return invalid("clients", "needs at least one client");
        }
        let mut clients = Vec::with_capacity(self.clients.len());
        for (index, raw) in self.clients.into_iter().enumerate() {
            let key = |field: &str| format!("clients[{index}].{field}");
            if raw.name.is_empty()
                || !raw
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return invalid(key("name"), "must be 1 to 32 of a-z, 0-9, '-' and '_'");
            }
            if !(raw.share.is_finite() && raw.share > 0.0) {
                return invalid(key("share"), "must be positive");
            }
            if raw.priority > 9 {
                return invalid(key("priority"), "must be between 0 and 9");
            }
            clients.push(Client {
                name: raw.name,
                share: raw.share,
                priority: raw.priority,
                rate_per_sec: raw.rate_per_sec.unwrap_or(100_000),
                api_key: raw.api_key,
            });
        }
        let total_share: f64 = clients.iter().map(|client| client.share).sum();
        for client in &mut clients {
            client.share /= total_share;
        }

        let poll_secs = self.users.poll_secs.unwrap_or(0.0);
        if !(poll_secs == 0.0 || (1.0..=86_400.0).contains(&poll_secs)) {
            return invalid(
                "users.poll_secs",
                "must be 0 (never) or between 1 and 86400 seconds",
            );
        }
        let users = Users {
            type_delay: self
                .users
                .type_delay_secs
                .unwrap_or(RawDist::LogNormal {
                    median: 8.0,
                    p95: 30.0,
                })
                .validate("users.type_delay_secs", 1.0)?
                .scaled(compression),
            mistype: share("users.mistype", self.users.mistype, 0.05)?,
            resend_after: seconds(
                "users.resend_after_secs",
                self.users.resend_after_secs.unwrap_or(60.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            resend: share("users.resend", self.users.resend, 0.3)?,
            give_up_after: seconds(
                "users.give_up_after_secs",
                self.users.give_up_after_secs.unwrap_or(900.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            never_type: share("users.never_type", self.users.never_type, 0.01)?,
            retry: share("users.retry", self.users.retry, 0.0)?,
            retry_after: self
                .users
                .retry_after_secs
                .unwrap_or(RawDist::LogNormal {
                    median: 1800.0,
                    p95: 7200.0,
                })
                .validate("users.retry_after_secs", 1.0)?
                .scaled(compression),
            retries: match self.users.retries.unwrap_or(2) {
                retries @ 0..=10 => retries,
                _ => return invalid("users.retries", "must be between 0 and 10"),
            },
            poll_every: (poll_secs > 0.0)
                .then(|| Duration::from_secs_f64(poll_secs).div_f64(compression)),
        };
        let handsets = HandsetSettings {
            delay: self
                .handsets
                .delay_secs
                .unwrap_or(RawDist::LogNormal {
                    median: 1.0,
                    p95: 5.0,
                })
                .validate("handsets.delay_secs", 1.0)?
                .scaled(compression),
            loss: share("handsets.loss", self.handsets.loss, 0.0)?,
            duplicate: share("handsets.duplicate", self.handsets.duplicate, 0.0)?,
            reorder: share("handsets.reorder", self.handsets.reorder, 0.0)?,
        };
        let gateway = GatewaySettings {
            code_ttl: seconds(
                "gateway.code_ttl_secs",
                self.gateway.code_ttl_secs.unwrap_or(600.0),
                10.0,
                86_400.0,
            )?
            .div_f64(compression),
            max_extension: seconds(
                "gateway.max_extension_secs",
                self.gateway.max_extension_secs.unwrap_or(900.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            queue_capacity: match self.gateway.queue_capacity.unwrap_or(200_000) {
                capacity @ 1..=100_000_000 => capacity,
                _ => return invalid("gateway.queue_capacity", "must be between 1 and 100000000"),
            },
            receipt_timeout: seconds(
                "gateway.receipt_timeout_secs",
                self.gateway.receipt_timeout_secs.unwrap_or(60.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            reroutes: match self.gateway.reroutes.unwrap_or(1) {
                reroutes @ 0..=5 => reroutes,
                _ => return invalid("gateway.reroutes", "must be between 0 and 5"),
            },
            expiry_follows_delivery: self.gateway.expiry_follows_delivery.unwrap_or(true),
            queue_policy: match self.gateway.queue_policy.as_deref().unwrap_or("adaptive") {
                "adaptive" => QueuePolicy::Adaptive,
                "deadline" => QueuePolicy::Deadline,
                _ => {
                    return invalid(
                        "gateway.queue_policy",
                        "must be \"adaptive\" or \"deadline\"",
                    );
                }
            },
            max_wait: seconds(
                "gateway.max_wait_secs",
                self.gateway.max_wait_secs.unwrap_or(300.0),
                1.0,
                86_400.0,
            )?
            .div_f64(compression),
            overload_wait: seconds(
                "gateway.overload_wait_secs",
                self.gateway.overload_wait_secs.unwrap_or(5.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            overload_after: seconds(
                "gateway.overload_after_secs",
                self.gateway.overload_after_secs.unwrap_or(30.0),
                0.0,
                86_400.0,
            )?
            .div_f64(compression),
            unseen_after: Some(seconds(
                "gateway.unseen_after_secs",
                self.gateway.unseen_after_secs.unwrap_or(300.0),
                0.0,
                86_400.0,
            )?)
            .filter(|unseen| !unseen.is_zero())
            .map(|unseen| unseen.div_f64(compression)),
        };

        if self.carriers.is_empty() {
            return invalid("carriers", "needs at least one carrier");
        }
        let mut carriers = Vec::with_capacity(self.carriers.len());
        for (index, raw) in self.carriers.into_iter().enumerate() {
            carriers.push(raw.validate(index, compression)?);
        }
        for (index, carrier) in carriers.iter().enumerate() {
            if carriers[..index]
                .iter()
                .any(|other| other.name == carrier.name)
            {
                return invalid(format!("carriers[{index}].name"), "duplicate carrier name");
            }
        }

        // The run's size: a schedule is computed before the run, and every user needs a number.
        let expected =
            crate::rehearsal::schedule::integral(&arrivals, duration.div_f64(compression));
        if expected > MAX_ARRIVALS {
            return invalid(
                "arrivals",
                format!(
                    "the profile brings about {expected:.0} users; at most {MAX_ARRIVALS} per run"
                ),
            );
        }
        let numbers = 10
            * (10u64
                .pow(u32::from(digits) - 1)
                .saturating_sub(self.phones.first));
        if expected * 1.2 + 100.0 > numbers as f64 {
            return invalid(
                "phones",
                format!(
                    "about {expected:.0} users need more numbers than {digits} digits from {} give ({numbers})",
                    self.phones.first
                ),
            );
        }
        let mut marks = Vec::with_capacity(self.marks.len());
        for (index, raw) in self.marks.into_iter().enumerate() {
            let key = |field: &str| format!("marks[{index}].{field}");
            let at = seconds(&key("at_secs"), raw.at_secs, 0.0, 30.0 * 86_400.0)?;
            if raw.label.is_empty() || raw.label.chars().count() > 32 {
                return invalid(key("label"), "must be 1 to 32 characters");
            }
            if marks.iter().any(|mark: &Mark| mark.label == raw.label) {
                return invalid(key("label"), "duplicate mark label");
            }
            marks.push(Mark {
                at_secs: raw.at_secs,
                at: at.div_f64(compression),
                label: raw.label,
            });
        }
        let connections = self.connections.unwrap_or(256);
        if !(1..=1_000_000).contains(&connections) {
            return invalid("connections", "must be between 1 and 1000000");
        }
        Ok(Scenario {
            connections,
            name: self.name,
            description: self.description,
            seed: self.seed,
            time_compression: compression,
            duration: duration.div_f64(compression),
            drain: drain.div_f64(compression),
            phones: Phones {
                prefix,
                digits,
                first: self.phones.first,
            },
            arrivals,
            clients,
            users,
            handsets,
            gateway,
            carriers,
            marks,
        })
    }
}

impl RawCarrier {
    fn validate(self, index: usize, compression: f64) -> Result<Carrier, ScenarioError> {
        let key = |field: &str| format!("carriers[{index}].{field}");
        if self.name.is_empty()
            || self.name.len() > 32
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return invalid(key("name"), "must be 1 to 32 of a-z, 0-9, '-' and '_'");
        }
        if !(self.capacity_per_sec.is_finite() && self.capacity_per_sec > 0.0) {
            return invalid(key("capacity_per_sec"), "must be positive");
        }
        let base = CarrierState {
            capacity_per_sec: self.capacity_per_sec * compression,
            latency: self
                .latency_ms
                .unwrap_or(RawDist::LogNormal {
                    median: 40.0,
                    p95: 120.0,
                })
                .validate(&key("latency_ms"), 0.001)?
                .scaled(compression),
            failure_rate: share(&key("failure_rate"), self.failure_rate, 0.0)?,
            refusal_rate: share(&key("refusal_rate"), self.refusal_rate, 0.0)?,
            undeliverable_rate: share(&key("undeliverable_rate"), self.undeliverable_rate, 0.0)?,
            receipt_delay: self
                .receipt_delay_ms
                .unwrap_or(RawDist::LogNormal {
                    median: 2000.0,
                    p95: 8000.0,
                })
                .validate(&key("receipt_delay_ms"), 0.001)?
                .scaled(compression),
            delivery_delay: self
                .delivery_delay_ms
                .unwrap_or(RawDist::Constant(0.0))
                .validate(&key("delivery_delay_ms"), 0.001)?
                .scaled(compression),
            receipt_loss: share(&key("receipt_loss"), self.receipt_loss, 0.0)?,
            down: false,
        };
        let mut timeline = Vec::with_capacity(self.timeline.len());
        for (entry_index, raw) in self.timeline.into_iter().enumerate() {
            let key = |field: &str| format!("carriers[{index}].timeline[{entry_index}].{field}");
            let from = seconds(&key("from_secs"), raw.from_secs, 0.0, 30.0 * 86_400.0)?;
            let until = seconds(&key("until_secs"), raw.until_secs, 0.0, 30.0 * 86_400.0)?;
            if until <= from {
                return invalid(key("until_secs"), "must be later than from_secs");
            }
            let capacity = raw.capacity_per_sec.unwrap_or(self.capacity_per_sec);
            if !(capacity.is_finite() && capacity > 0.0) {
                return invalid(key("capacity_per_sec"), "must be positive");
            }
            let state = CarrierState {
                capacity_per_sec: capacity * compression,
                latency: match raw.latency_ms {
                    Some(dist) => dist
                        .validate(&key("latency_ms"), 0.001)?
                        .scaled(compression),
                    None => base.latency,
                },
                failure_rate: share(&key("failure_rate"), raw.failure_rate, base.failure_rate)?,
                refusal_rate: share(&key("refusal_rate"), raw.refusal_rate, base.refusal_rate)?,
                undeliverable_rate: share(
                    &key("undeliverable_rate"),
                    raw.undeliverable_rate,
                    base.undeliverable_rate,
                )?,
                receipt_delay: match raw.receipt_delay_ms {
                    Some(dist) => dist
                        .validate(&key("receipt_delay_ms"), 0.001)?
                        .scaled(compression),
                    None => base.receipt_delay,
                },
                delivery_delay: match raw.delivery_delay_ms {
                    Some(dist) => dist
                        .validate(&key("delivery_delay_ms"), 0.001)?
                        .scaled(compression),
                    None => base.delivery_delay,
                },
                receipt_loss: share(&key("receipt_loss"), raw.receipt_loss, base.receipt_loss)?,
                down: raw.down,
            };
            timeline.push(TimelineEntry {
                from: from.div_f64(compression),
                until: until.div_f64(compression),
                state,
            });
        }
        let window = self.window.unwrap_or(100);
        if !(1..=10_000).contains(&window) {
            return invalid(key("window"), "must be between 1 and 10000");
        }
        let pace = self.pace_per_sec.map_or(self.capacity_per_sec, f64::from) * compression;
        if !(1.0..=1_000_000.0).contains(&pace) {
            return invalid(
                key("pace_per_sec"),
                "times time_compression must be between 1 and 1000000",
            );
        }
        let weight = self.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            return invalid(key("weight"), "must be between 1 and 1000");
        }
        let protocol = match self.protocol {
            RawProtocol::Http => {
                let smpp_keys = [
                    ("system_id", self.system_id.is_some()),
                    ("password", self.password.is_some()),
                    ("gsm7_packed", self.gsm7_packed.is_some()),
                    ("gsm7_data_coding", self.gsm7_data_coding.is_some()),
                    ("ucs2_data_coding", self.ucs2_data_coding.is_some()),
                    ("receipt_format", self.receipt_format.is_some()),
                    ("receipt_ids", self.receipt_ids.is_some()),
                    ("binds", self.binds.is_some()),
                    ("bind", self.bind.is_some()),
                ];
                if let Some((name, _)) = smpp_keys.iter().find(|(_, set)| *set) {
                    return invalid(key(name), "only for protocol = \"smpp\"");
                }
                Protocol::Http
            }
            RawProtocol::Smpp => {
                if self.receipt_token.is_some() {
                    return invalid(
                        key("receipt_token"),
                        "only for protocol = \"http\" (SMPP receipts come back on the bind)",
                    );
                }
                // SMPP 3.4: system_id is a C-string of at most 16 octets, password of 9.
                let printable = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
                if let Some(system_id) = &self.system_id {
                    if system_id.is_empty() || system_id.len() > 15 || !printable(system_id) {
                        return invalid(
                            key("system_id"),
                            "must be 1 to 15 printable ASCII characters",
                        );
                    }
                }
                if let Some(password) = &self.password {
                    if password.is_empty() || password.len() > 8 || !printable(password) {
                        return invalid(
                            key("password"),
                            "must be 1 to 8 printable ASCII characters",
                        );
                    }
                }
                let binds = self.binds.unwrap_or(1);
                if !(1..=64).contains(&binds) {
                    return invalid(key("binds"), "must be between 1 and 64");
                }
                Protocol::Smpp(Smpp {
                    system_id: self.system_id,
                    password: self.password,
                    gsm7_packed: self.gsm7_packed.unwrap_or(false),
                    gsm7_data_coding: self.gsm7_data_coding.unwrap_or(0),
                    ucs2_data_coding: self.ucs2_data_coding.unwrap_or(8),
                    receipt_format: self.receipt_format.unwrap_or(ReceiptFormat::Both),
                    receipt_ids: self.receipt_ids.unwrap_or(ReceiptIds::Short),
                    binds,
                    bind: self.bind.unwrap_or(BindKind::Transceiver),
                })
            }
        };
        Ok(Carrier {
            name: self.name,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            base,
            timeline,
            window,
            pace_per_sec: pace.round() as u32,
            weight,
            standby: self.standby.unwrap_or(false),
            prefixes: self.prefixes,
            receipt_token: self.receipt_token,
            protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::carriers::smsc::SmscSettings;

    const SMALL: &str = r#"
name = "small"
duration_secs = 60
time_compression = 2
[phones]
prefix = "+39333"
[[arrivals]]
at_secs = 0
per_sec = 10
[[clients]]
name = "portal"
share = 3
[[clients]]
name = "pharmacies"
share = 1
priority = 1
[[carriers]]
name = "alpha"
capacity_per_sec = 100
latency_ms = { median = 40, p95 = 120 }
[[carriers.timeline]]
from_secs = 10
until_secs = 20
capacity_per_sec = 5
"#;

    const SMSC: &str = r#"
name = "smsc-test"
duration_secs = 10
[phones]
prefix = "+39333"
[[arrivals]]
at_secs = 0
per_sec = 1
[[clients]]
name = "portal"
share = 1
[handsets]
delay_secs = 0
[[carriers]]
name = "smsc"
capacity_per_sec = 1000
protocol = "smpp"
"#;

    #[test]
    fn scenario_smpp_keys() {
        let scenario = Scenario::parse(&SMSC.replace(
            "protocol = \"smpp\"",
            "protocol = \"smpp\"\nsystem_id = \"gw\"\npassword = \"pw\"\nreceipt_format = \"tlv\"\nbinds = 2\nbind = \"transmitter_receiver\"\ngsm7_packed = true",
        ))
        .unwrap();
        let Protocol::Smpp(smpp) = &scenario.carriers[0].protocol else {
            panic!("smpp");
        };
        assert_eq!(smpp.system_id.as_deref(), Some("gw"));
        assert_eq!(smpp.receipt_format, ReceiptFormat::Tlv);
        assert_eq!(smpp.binds, 2);
        assert!(smpp.gsm7_packed);
        let settings = SmscSettings::from_carrier(&scenario.carriers[0], Instant::now());
        assert_eq!(settings.login.password, "pw");
        for (from, to, key) in [
            (
                "protocol = \"smpp\"",
                "system_id = \"x\"",
                "carriers[0].system_id",
            ),
            (
                "protocol = \"smpp\"",
                "protocol = \"smpp\"\npassword = \"123456789\"",
                "carriers[0].password",
            ),
            (
                "protocol = \"smpp\"",
                "protocol = \"smpp\"\nreceipt_token = \"t\"",
                "carriers[0].receipt_token",
            ),
            (
                "protocol = \"smpp\"",
                "protocol = \"x25\"",
                "carriers[0].protocol",
            ),
        ] {
            let error = Scenario::parse(&SMSC.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
    }

    #[test]
    fn compression_scales_rates_up_and_durations_down() {
        let scenario = Scenario::parse(SMALL).unwrap();
        assert_eq!(scenario.duration, Duration::from_secs(30));
        assert_eq!(scenario.connections, 256);
        assert_eq!(scenario.arrivals[0].per_sec, 20.0);
        assert_eq!(scenario.clients[0].share, 0.75);
        let carrier = &scenario.carriers[0];
        assert_eq!(carrier.base.capacity_per_sec, 200.0);
        assert_eq!(carrier.pace_per_sec, 200);
        assert_eq!(
            carrier.base.latency,
            Dist::LogNormal {
                median: Duration::from_millis(20),
                p95: Duration::from_millis(60)
            }
        );
        assert_eq!(
            carrier.state_at(Duration::from_secs(4)).capacity_per_sec,
            200.0
        );
        assert_eq!(
            carrier.state_at(Duration::from_secs(5)).capacity_per_sec,
            10.0
        );
        assert_eq!(
            carrier.state_at(Duration::from_secs(10)).capacity_per_sec,
            200.0
        );
        // The last digit of the index leads, so shards own whole prefixes.
        assert_eq!(scenario.phone(42), "+393332000004");
        assert_eq!(scenario.user_of("+393332000004"), Some(42));
        assert_eq!(scenario.user_of("+39333200000"), None);
        for user in [0, 9, 10, 123_457, 999_999] {
            assert_eq!(scenario.user_of(&scenario.phone(user)), Some(user));
        }
        assert_eq!(
            scenario.shard_prefixes(1, 2),
            ["+393331", "+393333", "+393335", "+393337", "+393339"]
        );
        for user in 0..40u64 {
            let owner = scenario
                .shard_prefixes(user % 2, 2)
                .iter()
                .any(|prefix| scenario.phone(user).starts_with(prefix.as_str()));
            assert!(owner, "user {user} is in its shard's prefixes");
        }
    }

    #[test]
    fn carriers_can_deliver_late_and_lose_receipts() {
        let text = SMALL
            .replace(
                "latency_ms = { median = 40, p95 = 120 }",
                "latency_ms = { median = 40, p95 = 120 }\ndelivery_delay_ms = 500\nreceipt_loss = 0.1",
            )
            .replace(
                "capacity_per_sec = 5",
                "delivery_delay_ms = { min = 300000, max = 1500000 }\nreceipt_loss = 0.5",
            );
        let scenario = Scenario::parse(&text).unwrap();
        let carrier = &scenario.carriers[0];
        // Compressed 2 times, as every duration.
        assert_eq!(
            carrier.base.delivery_delay,
            Dist::Constant(Duration::from_millis(250))
        );
        assert_eq!(carrier.base.receipt_loss, 0.1);
        let late = carrier.state_at(Duration::from_secs(5));
        assert_eq!(
            late.delivery_delay,
            Dist::Uniform {
                min: Duration::from_secs(150),
                max: Duration::from_secs(750)
            }
        );
        assert_eq!(late.receipt_loss, 0.5);
        assert_eq!(late.capacity_per_sec, carrier.base.capacity_per_sec);
        // Without the keys: no delay, no loss.
        let plain = Scenario::parse(SMALL).unwrap();
        assert_eq!(
            plain.carriers[0].base.delivery_delay,
            Dist::Constant(Duration::ZERO)
        );
        assert_eq!(plain.carriers[0].timeline[0].state.receipt_loss, 0.0);
        for (to, key) in [
            (
                "delivery_delay_ms = { min = 9, max = 3 }",
                "carriers[0].timeline[0].delivery_delay_ms.max",
            ),
            (
                "delivery_delay_ms = -1",
                "carriers[0].timeline[0].delivery_delay_ms",
            ),
            ("receipt_loss = 2", "carriers[0].timeline[0].receipt_loss"),
        ] {
            let error = Scenario::parse(&SMALL.replace("capacity_per_sec = 5", to))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
    }

    #[test]
    fn marks_are_in_scenario_time() {
        let text = format!(
            "{SMALL}\n[[marks]]\nat_secs = 20\nlabel = \"13:00:20\"\n[[marks]]\nat_secs = 60\nlabel = \"end\"\n"
        );
        let scenario = Scenario::parse(&text).unwrap();
        assert_eq!(scenario.marks.len(), 2);
        assert_eq!(scenario.marks[0].label, "13:00:20");
        assert_eq!(scenario.marks[0].at_secs, 20.0);
        assert_eq!(scenario.marks[0].at, Duration::from_secs(10));
        assert!(Scenario::parse(SMALL).unwrap().marks.is_empty());
        for (second, key) in [
            ("at_secs = -1\nlabel = \"x\"", "marks[1].at_secs"),
            ("at_secs = 2\nlabel = \"\"", "marks[1].label"),
            ("at_secs = 2\nlabel = \"13:00:20\"", "marks[1].label"),
            ("at_secs = 2\nlabel = \"x\"\ncolour = 1", "marks[1].colour"),
            ("label = \"x\"", "marks[1]"),
        ] {
            let text = format!(
                "{SMALL}\n[[marks]]\nat_secs = 1\nlabel = \"13:00:20\"\n[[marks]]\n{second}\n"
            );
            let error = Scenario::parse(&text).unwrap_err().to_string();
            assert!(error.contains(key), "{second}: {error}");
        }
    }

    #[test]
    fn failed_users_may_come_back() {
        let plain = Scenario::parse(SMALL).unwrap();
        assert_eq!(plain.users.retry, 0.0);
        let text = format!(
            "{SMALL}\n[users]\nretry = 0.6\nretries = 3\nretry_after_secs = {{ median = 3600, p95 = 7200 }}\n"
        );
        let users = Scenario::parse(&text).unwrap().users;
        assert_eq!(users.retry, 0.6);
        assert_eq!(users.retries, 3);
        assert_eq!(
            users.retry_after,
            Dist::LogNormal {
                median: Duration::from_secs(1800),
                p95: Duration::from_secs(3600)
            }
        );
        for (to, key) in [
            ("retry = 1.5", "users.retry"),
            ("retries = 11", "users.retries"),
            (
                "retry_after_secs = { min = 2, max = 1 }",
                "users.retry_after_secs.max",
            ),
        ] {
            let error = Scenario::parse(&format!("{SMALL}\n[users]\n{to}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
    }

    #[test]
    fn the_frontend_polls_as_the_scenario_says() {
        // SMALL runs at 2x: a poll every 60 s of the scenario is one every 30 real seconds.
        assert_eq!(Scenario::parse(SMALL).unwrap().users.poll_every, None);
        let polling = Scenario::parse(&format!("{SMALL}\n[users]\npoll_secs = 60\n")).unwrap();
        assert_eq!(polling.users.poll_every, Some(Duration::from_secs(30)));
        let never = Scenario::parse(&format!("{SMALL}\n[users]\npoll_secs = 0\n")).unwrap();
        assert_eq!(never.users.poll_every, None);
        for to in [
            "poll_secs = 0.5",
            "poll_secs = -1",
            "poll_secs = 1e6",
            "poll_secs = nan",
        ] {
            let error = Scenario::parse(&format!("{SMALL}\n[users]\n{to}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("users.poll_secs"), "{to}: {error}");
        }
    }

    #[test]
    fn the_gateway_defences_default_to_the_gateways_own() {
        // SMALL runs at 2x: the gateway's 60 s receipt timeout is 30 s of real time.
        let plain = Scenario::parse(SMALL).unwrap().gateway;
        assert_eq!(plain.receipt_timeout, Duration::from_secs(30));
        assert_eq!(plain.reroutes, 1);
        assert!(plain.expiry_follows_delivery);
        let text = format!(
            "{SMALL}\n[gateway]\nreceipt_timeout_secs = 45\nreroutes = 2\nexpiry_follows_delivery = false\n"
        );
        let gateway = Scenario::parse(&text).unwrap().gateway;
        assert_eq!(gateway.receipt_timeout, Duration::from_millis(22_500));
        assert_eq!(gateway.reroutes, 2);
        assert!(!gateway.expiry_follows_delivery);
        for (to, key) in [
            ("receipt_timeout_secs = -1", "gateway.receipt_timeout_secs"),
            ("reroutes = 6", "gateway.reroutes"),
            ("reroutes = -1", "gateway.reroutes"),
            (
                "expiry_follows_delivery = 1",
                "gateway.expiry_follows_delivery",
            ),
        ] {
            let error = Scenario::parse(&format!("{SMALL}\n[gateway]\n{to}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
    }

    #[test]
    fn the_queue_policy_defaults_to_the_gateways_own() {
        // SMALL runs at 2x: every duration is halved.
        let plain = Scenario::parse(SMALL).unwrap().gateway;
        assert_eq!(plain.queue_policy, QueuePolicy::Adaptive);
        assert_eq!(plain.max_wait, Duration::from_secs(150));
        assert_eq!(plain.overload_wait, Duration::from_millis(2500));
        assert_eq!(plain.overload_after, Duration::from_secs(15));
        assert_eq!(plain.unseen_after, Some(Duration::from_secs(150)));
        let text = format!(
            "{SMALL}\n[gateway]\nqueue_policy = \"deadline\"\nmax_wait_secs = 60\n\
             overload_wait_secs = 0\noverload_after_secs = 10\nunseen_after_secs = 0\n"
        );
        let gateway = Scenario::parse(&text).unwrap().gateway;
        assert_eq!(gateway.queue_policy, QueuePolicy::Deadline);
        assert_eq!(gateway.max_wait, Duration::from_secs(30));
        assert_eq!(gateway.overload_wait, Duration::ZERO);
        assert_eq!(gateway.overload_after, Duration::from_secs(5));
        assert_eq!(gateway.unseen_after, None);
        for (to, key) in [
            ("queue_policy = \"fifo\"", "gateway.queue_policy"),
            ("queue_policy = 1", "gateway.queue_policy"),
            ("max_wait_secs = 0", "gateway.max_wait_secs"),
            ("overload_wait_secs = -1", "gateway.overload_wait_secs"),
            ("overload_after_secs = 1e9", "gateway.overload_after_secs"),
            ("unseen_after_secs = -5", "gateway.unseen_after_secs"),
        ] {
            let error = Scenario::parse(&format!("{SMALL}\n[gateway]\n{to}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
        // `--set` takes a TOML value: the policy is a string in quotes.
        let set = "gateway.queue_policy=\"deadline\""
            .parse::<Override>()
            .unwrap();
        let scenario = Scenario::parse_with(SMALL, &[set]).unwrap();
        assert_eq!(scenario.gateway.queue_policy, QueuePolicy::Deadline);
        assert!("gateway.queue_policy=deadline".parse::<Override>().is_err());
    }

    #[test]
    fn overrides_set_keys_before_validation() {
        let set = |text: &str| text.parse::<Override>().unwrap();
        let scenario = Scenario::parse_with(
            SMALL,
            &[
                set("users.resend=0.2"),
                set("gateway.receipt_timeout_secs=0"),
                set("carriers[0].timeline[0].delivery_delay_ms = { min = 2, max = 4 }"),
                set("clients.1.priority=3"),
            ],
        )
        .unwrap();
        assert_eq!(scenario.users.resend, 0.2);
        assert_eq!(scenario.gateway.receipt_timeout, Duration::ZERO);
        assert_eq!(
            scenario.carriers[0].timeline[0].state.delivery_delay,
            Dist::Uniform {
                min: Duration::from_millis(1),
                max: Duration::from_millis(2)
            }
        );
        assert_eq!(scenario.clients[1].priority, 3);
        // Bad text is refused before the scenario is read.
        for text in [
            "users.resend",
            "users.resend=fast",
            "users..resend=1",
            "[0]=1",
            "a[x]=1",
        ] {
            assert!(text.parse::<Override>().is_err(), "{text}");
        }
        // A bad path or value is named by its key.
        for (text, key) in [
            (
                "carriers[3].weight=2",
                "key carriers[3].weight: --set: carriers has 1 entries",
            ),
            (
                "carriers.name=\"x\"",
                "key carriers.name: --set: carriers is an array",
            ),
            ("name.first=1", "key name.first: --set: name is not a table"),
            ("users.resend=\"often\"", "key users.resend"),
            ("users.colour=1", "colour"),
        ] {
            let error = Scenario::parse_with(SMALL, &[set(text)])
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        for (from, to, key) in [
            ("per_sec = 10", "per_sec = -1", "arrivals[0].per_sec"),
            ("share = 3", "share = \"x\"", "clients[0].share"),
            (
                "until_secs = 20",
                "until_secs = 5",
                "carriers[0].timeline[0].until_secs",
            ),
            ("p95 = 120", "p95 = 10", "carriers[0].latency_ms.p95"),
            ("prefix = \"+39333\"", "prefix = \"39333\"", "phones.prefix"),
            (
                "time_compression = 2",
                "time_compression = 2\ncolour = 1",
                "colour",
            ),
            (
                "time_compression = 2",
                "time_compression = 2\nconnections = 0",
                "connections",
            ),
            ("at_secs = 0", "at_secs = 1e20", "arrivals[0].at_secs"),
            (
                "at_secs = 0\nper_sec = 10\n",
                "at_secs = 0\nper_sec = 9000000\n",
                "key arrivals: the profile brings",
            ),
            (
                "prefix = \"+39333\"",
                "prefix = \"+39333\"\ndigits = 2",
                "phones",
            ),
        ] {
            let text = SMALL.replace(from, to);
            let error = Scenario::parse(&text).unwrap_err().to_string();
            assert!(error.contains(key), "{to}: {error}");
        }
        // A syntax error says where it is.
        let text = SMALL.replace("per_sec = 10", "per_sec = = 10");
        let error = Scenario::parse(&text).unwrap_err().to_string();
        assert!(error.contains("line 9, column"), "{error}");
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut n_files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let scenario = Scenario::load(&path).unwrap_or_else(|error| panic!("{error}"));
                assert!(scenario.expected_arrivals() > 0.0, "{}", path.display());
                n_files += 1;
            }
        }
        assert!(
            n_files >= 4,
            "{n_files} scenarios found in {}",
            dir.display()
        );
        let lombardia = Scenario::load(&dir.join("lombardia-2021.toml")).unwrap();
        // First attempts: the day's ~100,000 sign-ups and those who never completed one.
        let expected = lombardia.expected_arrivals();
        assert!((90_000.0..120_000.0).contains(&expected), "{expected}");
        assert!(
            lombardia.duration < Duration::from_secs(600),
            "runs in under 10 minutes"
        );
    }
}

//! `[[carriers]]`: each carrier's kind (HTTP, SMPP or console) and settings, pace, window,
//! circuit breaker and the prefixes it serves.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, check_name, http_url, invalid};
use crate::breaker::BreakerPolicy;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCarrier {
    pub name: String,
    pub kind: String,
    pub url: Option<String>,
    pub pace_per_sec: Option<u32>,
    pub window: Option<u32>,
    pub from: Option<String>,
    pub timeout_ms: Option<u64>,
    pub http_version: Option<String>,
    pub receipt_token: Option<String>,
    pub receipt_timeout_ms: Option<u64>,
    pub breaker_failures: Option<u32>,
    pub breaker_error_ratio: Option<f64>,
    pub breaker_open_ms: Option<u64>,
    pub breaker_probes: Option<u32>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub exclude_prefixes: Vec<String>,
    pub weight: Option<u32>,
    pub standby: Option<bool>,
    // SMPP carriers only.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub system_id: Option<String>,
    pub password: Option<String>,
    pub system_type: Option<String>,
    pub bind: Option<String>,
    pub binds: Option<u32>,
    pub enquire_link_secs: Option<u64>,
    pub tls: Option<bool>,
    pub tls_ca_file: Option<PathBuf>,
    pub gsm7_packed: Option<bool>,
    pub gsm7_data_coding: Option<u8>,
    pub ucs2_data_coding: Option<u8>,
}

#[derive(Debug, Clone)]
pub struct CarrierConfig {
    pub name: String,
    pub kind: CarrierKind,
    /// SMS segments per second.
    pub pace_per_sec: NonZeroU32,
    /// Requests in flight: for an SMPP carrier, its window per bind times its binds.
    pub window: NonZeroU32,
    /// Sender id.
    pub from: String,
    /// SHA-256 of the token the carrier presents (`Authorization: Bearer …`) when it posts
    /// delivery receipts; without one, its receipts are refused.
    pub receipt_token_sha256: Option<[u8; 32]>,
    /// How long after acceptance a `delivered` receipt is awaited before the SMS counts as
    /// missing its receipt (and may be rerouted); `None` when its receipts are not awaited at
    /// all (`receipt_timeout_ms = 0`, or a carrier that cannot send receipts).
    pub receipt_timeout: Option<Duration>,
    /// When the carrier's circuit breaker opens, and how it probes back.
    pub breaker: BreakerPolicy,
    /// E.164 prefixes (with `+`) of the numbers it serves; empty serves every number.
    pub prefixes: Vec<Box<str>>,
    /// Prefixes it never serves, whatever `prefixes` says.
    pub exclude_prefixes: Vec<Box<str>>,
    /// Its share, against the other eligible carriers, of the jobs that arrive while several
    /// are idle. When jobs wait in the queue every carrier sends as fast as it is allowed.
    pub weight: NonZeroU32,
    /// A backup carrier: it takes a job only when no other carrier eligible for it is serving
    /// (all lagging or with an open circuit), or when no other may send it (prefix rules, a
    /// reroute away from the carrier that sent).
    pub standby: bool,
}

#[derive(Debug, Clone)]
pub enum CarrierKind {
    Http {
        url: http::Uri,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        timeout: Duration,
        version: HttpVersion,
    },
    /// Boxed: the SMPP settings are large and carriers are built once.
    Smpp(Box<SmppSettings>),
    Console,
}

/// An SMPP 3.4 carrier (an SMSC) and how the gateway binds to it as an ESME.
#[derive(Clone)]
pub struct SmppSettings {
    pub host: String,
    pub port: u16,
    pub system_id: String,
    /// Never printed.
    pub password: String,
    pub system_type: String,
    pub bind: BindMode,
    /// Sessions kept bound, each with its own window.
    pub binds: NonZeroU32,
    /// `submit_sm` outstanding per bind.
    pub window_per_bind: NonZeroU32,
    /// How long a `submit_sm` (or a bind) waits for its answer.
    pub timeout: Duration,
    pub enquire_link: Duration,
    /// `Some` to speak TLS, with a CA file to trust instead of the webpki roots.
    pub tls: Option<Option<PathBuf>>,
    pub coding: crate::sms_wire::Coding,
}

/// How an SMPP session is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    /// One `bind_transceiver` session per bind: submits out, receipts in.
    Transceiver,
    /// A `bind_transmitter` session for submits and a `bind_receiver` session for receipts.
    TransmitterReceiver,
}

impl std::fmt::Debug for SmppSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmppSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("system_id", &self.system_id)
            .field("password", &"**REDACTED**")
            .field("bind", &self.bind)
            .field("binds", &self.binds)
            .field("window_per_bind", &self.window_per_bind)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .field("coding", &self.coding)
            .finish_non_exhaustive()
    }
}

/// Which HTTP a carrier is spoken to with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/2 when TLS negotiates it (ALPN), HTTP/1.1 otherwise.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only; over plain `http://` with prior knowledge (h2c). Many submits then share
    /// one connection and few system calls.
    Http2,
}

/// The largest window a carrier may have: beyond it, pooled connections cannot keep up anyway.
const MAX_WINDOW: u32 = 10_000;

impl RawCarrier {
    /// An SMPP carrier's settings, and its window across all binds.
    fn smpp_settings(
        &self,
        window_per_bind: NonZeroU32,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(SmppSettings, NonZeroU32), ConfigError> {
        let host = match &self.host {
            Some(host) if !host.is_empty() && host.len() <= 253 => host.clone(),
            _ => return invalid(key("host"), "an smpp carrier needs a host name or address"),
        };
        let port = self.port.unwrap_or(2775);
        if port == 0 {
            return invalid(key("port"), "must be between 1 and 65535");
        }
        // SMPP 3.4 section 5.2: system_id up to 15 octets, password up to 8, system_type up to 12.
        let printable = |text: &str| text.bytes().all(|b| b.is_ascii_graphic());
        let system_id = match &self.system_id {
            Some(id) if (1..=15).contains(&id.len()) && printable(id) => id.clone(),
            _ => {
                return invalid(
                    key("system_id"),
                    "must be 1 to 15 printable ASCII characters",
                );
            }
        };
        let password = match &self.password {
            Some(password) if password.len() <= 8 && printable(password) => password.clone(),
            _ => {
                return invalid(
                    key("password"),
                    "must be up to 8 printable ASCII characters",
                );
            }
        };
        let system_type = self.system_type.clone().unwrap_or_default();
        if system_type.len() > 12 || !printable(&system_type) {
            return invalid(
                key("system_type"),
                "must be up to 12 printable ASCII characters",
            );
        }
        let bind = match self.bind.as_deref().unwrap_or("transceiver") {
            "transceiver" => BindMode::Transceiver,
            "transmitter_receiver" => BindMode::TransmitterReceiver,
            other => {
                return invalid(
                    key("bind"),
                    format!(
                        "unknown bind {other:?}; expected \"transceiver\" or \"transmitter_receiver\""
                    ),
                );
            }
        };
        let Some(binds) = NonZeroU32::new(self.binds.unwrap_or(1)).filter(|b| b.get() <= 32) else {
            return invalid(key("binds"), "must be between 1 and 32");
        };
        let Some(total_window) = window_per_bind
            .checked_mul(binds)
            .filter(|total| total.get() <= MAX_WINDOW)
        else {
            return invalid(
                key("window"),
                format!("window times binds must be at most {MAX_WINDOW}"),
            );
        };
        let timeout_ms = self.timeout_ms.unwrap_or(5000);
        if !(1..=120_000).contains(&timeout_ms) {
            return invalid(key("timeout_ms"), "must be between 1 and 120000");
        }
        let enquire_link_secs = self.enquire_link_secs.unwrap_or(30);
        if !(1..=3600).contains(&enquire_link_secs) {
            return invalid(key("enquire_link_secs"), "must be between 1 and 3600");
        }
        let tls = match (self.tls.unwrap_or(false), &self.tls_ca_file) {
            (false, None) => None,
            (false, Some(_)) => return invalid(key("tls_ca_file"), "needs tls = true"),
            (true, ca_file) => Some(ca_file.clone()),
        };
        // The sender goes in a C-octet string: an alphanumeric name of up to 11 characters (what
        // handsets show), or a number of up to 20 digits.
        let from = self.from.as_deref().unwrap_or("otpgate");
        let digits = from.strip_prefix('+').unwrap_or(from);
        let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let sender_ok = if numeric {
            digits.len() <= 20
        } else {
            from.len() <= 11 && from.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        };
        if !sender_ok {
            return invalid(
                key("from"),
                "an smpp carrier's sender is up to 11 ASCII characters, or a number of up to 20 digits",
            );
        }
        // Codings that keep the octets' meaning: GSM-7 septets under a GSM alphabet, UTF-16
        // under a UCS-2 one (with or without a message class).
        let gsm7_data_coding = self
            .gsm7_data_coding
            .unwrap_or(crate::sms_wire::DATA_CODING_DEFAULT);
        if !crate::sms_wire::is_gsm7_coding(gsm7_data_coding) {
            return invalid(
                key("gsm7_data_coding"),
                "must name the GSM 7-bit alphabet: 0, 16 to 19, or 240 to 243",
            );
        }
        let ucs2_data_coding = self
            .ucs2_data_coding
            .unwrap_or(crate::sms_wire::DATA_CODING_UCS2);
        if !crate::sms_wire::is_ucs2_coding(ucs2_data_coding) {
            return invalid(
                key("ucs2_data_coding"),
                "must name the UCS-2 alphabet: 8, or 24 to 27",
            );
        }
        let coding = crate::sms_wire::Coding {
            gsm7_packed: self.gsm7_packed.unwrap_or(false),
            gsm7_data_coding,
            ucs2_data_coding,
        };
        let settings = SmppSettings {
            host,
            port,
            system_id,
            password,
            system_type,
            bind,
            binds,
            window_per_bind,
            timeout: Duration::from_millis(timeout_ms),
            enquire_link: Duration::from_secs(enquire_link_secs),
            tls,
            coding,
        };
        Ok((settings, total_window))
    }

    pub(crate) fn validate(self, index: usize) -> Result<CarrierConfig, ConfigError> {
        let key = |field: &str| format!("carriers[{index}].{field}");
        check_name(key("name"), &self.name)?;
        let pace = self.pace_per_sec.unwrap_or(100);
        let Some(pace_per_sec) = NonZeroU32::new(pace).filter(|pace| pace.get() <= 1_000_000)
        else {
            return invalid(key("pace_per_sec"), "must be between 1 and 1000000");
        };
        let window = self.window.unwrap_or(10);
        let Some(window) = NonZeroU32::new(window).filter(|w| w.get() <= MAX_WINDOW) else {
            return invalid(key("window"), format!("must be between 1 and {MAX_WINDOW}"));
        };
        let from = self.from.clone().unwrap_or_else(|| "otpgate".to_owned());
        if from.is_empty() || from.len() > 16 {
            return invalid(key("from"), "must be 1 to 16 characters");
        }
        let smpp_keys = [
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("system_id", self.system_id.is_some()),
            ("password", self.password.is_some()),
            ("system_type", self.system_type.is_some()),
            ("bind", self.bind.is_some()),
            ("binds", self.binds.is_some()),
            ("enquire_link_secs", self.enquire_link_secs.is_some()),
            ("tls", self.tls.is_some()),
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("gsm7_packed", self.gsm7_packed.is_some()),
            ("gsm7_data_coding", self.gsm7_data_coding.is_some()),
            ("ucs2_data_coding", self.ucs2_data_coding.is_some()),
        ];
        if self.kind != "smpp" {
            if let Some((field, _)) = smpp_keys.iter().find(|(_, set)| *set) {
                return invalid(key(field), "only smpp carriers take this key");
            }
        }
        let mut window = window;
        let kind = match self.kind.as_str() {
            "smpp" => {
                if self.url.is_some() || self.http_version.is_some() || !self.headers.is_empty() {
                    return invalid(
                        key("url"),
                        "an smpp carrier takes host and port, not url, http_version or headers",
                    );
                }
                let (settings, total_window) = self.smpp_settings(window, &key)?;
                window = total_window;
                CarrierKind::Smpp(Box::new(settings))
            }
            "console" => {
                if self.url.is_some() {
                    return invalid(key("url"), "a console carrier takes no url");
                }
                if self.http_version.is_some() {
                    return invalid(key("http_version"), "a console carrier speaks no HTTP");
                }
                CarrierKind::Console
            }
            "http" => {
                let Some(url) = self.url else {
                    return invalid(key("url"), "an http carrier needs a url");
                };
                let url = http_url(key("url"), &url)?;
                let mut headers = Vec::with_capacity(self.headers.len());
                for (name, value) in self.headers {
                    let parsed_name =
                        http::HeaderName::from_bytes(name.as_bytes()).or_else(|_| {
                            invalid(key("headers"), format!("bad header name {name:?}"))
                        })?;
                    let mut parsed_value = http::HeaderValue::from_str(&value)
                        .or_else(|_| invalid(key("headers"), format!("bad value for {name:?}")))?;
                    parsed_value.set_sensitive(true);
                    headers.push((parsed_name, parsed_value));
                }
                let timeout_ms = self.timeout_ms.unwrap_or(5000);
                if !(1..=120_000).contains(&timeout_ms) {
                    return invalid(key("timeout_ms"), "must be between 1 and 120000");
                }
                let version = match self.http_version.as_deref().unwrap_or("auto") {
                    "auto" => HttpVersion::Auto,
                    "1.1" => HttpVersion::Http1,
                    "2" => HttpVersion::Http2,
                    other => {
                        return invalid(
                            key("http_version"),
                            format!(
                                "unknown version {other:?}; expected \"auto\", \"1.1\" or \"2\""
                            ),
                        );
                    }
                };
                CarrierKind::Http {
                    url,
                    headers,
                    timeout: Duration::from_millis(timeout_ms),
                    version,
                }
            }
            other => {
                return invalid(
                    key("kind"),
                    format!("unknown kind {other:?}; expected \"http\", \"smpp\" or \"console\""),
                );
            }
        };
        let receipt_token_sha256 = match self.receipt_token {
            None => None,
            Some(token) if token.len() < 16 || token.len() > 256 => {
                return invalid(key("receipt_token"), "must be 16 to 256 characters");
            }
            Some(token) => Some(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()).into()),
        };
        let receipt_timeout_ms = self
            .receipt_timeout_ms
            .unwrap_or(DEFAULT_RECEIPT_TIMEOUT_MS);
        if receipt_timeout_ms > 3_600_000 {
            return invalid(key("receipt_timeout_ms"), "must be between 0 and 3600000");
        }
        // Only an HTTP carrier with a receipt token, or an SMPP carrier, can send receipts.
        let sends_receipts = match &kind {
            CarrierKind::Http { .. } => receipt_token_sha256.is_some(),
            CarrierKind::Smpp(_) => true,
            CarrierKind::Console => false,
        };
        let receipt_timeout = (sends_receipts && receipt_timeout_ms > 0)
            .then(|| Duration::from_millis(receipt_timeout_ms));
        let failures = self.breaker_failures.unwrap_or(5);
        if !(1..=10_000).contains(&failures) {
            return invalid(key("breaker_failures"), "must be between 1 and 10000");
        }
        let error_ratio = self.breaker_error_ratio.unwrap_or(0.5);
        if !(error_ratio > 0.0 && error_ratio <= 1.0) {
            return invalid(key("breaker_error_ratio"), "must be above 0 and at most 1");
        }
        let open_ms = self.breaker_open_ms.unwrap_or(10_000);
        if !(10..=3_600_000).contains(&open_ms) {
            return invalid(key("breaker_open_ms"), "must be between 10 and 3600000");
        }
        let probes = self.breaker_probes.unwrap_or(1);
        if !(1..=1000).contains(&probes) {
            return invalid(key("breaker_probes"), "must be between 1 and 1000");
        }
        let prefixes = validate_prefixes(self.prefixes, &key("prefixes"))?;
        let exclude_prefixes = validate_prefixes(self.exclude_prefixes, &key("exclude_prefixes"))?;
        let Some(weight) = NonZeroU32::new(self.weight.unwrap_or(1)).filter(|w| w.get() <= 1000)
        else {
            return invalid(key("weight"), "must be between 1 and 1000");
        };
        Ok(CarrierConfig {
            name: self.name,
            kind,
            pace_per_sec,
            window,
            from,
            receipt_token_sha256,
            receipt_timeout,
            breaker: BreakerPolicy {
                failures,
                error_ratio,
                open_for: Duration::from_millis(open_ms),
                probes,
            },
            prefixes,
            exclude_prefixes,
            weight,
            standby: self.standby.unwrap_or(false),
        })
    }
}

/// How long a `delivered` receipt is awaited by default: most carriers' receipts come within
/// seconds, and a minute is still well inside a code's life.
pub const DEFAULT_RECEIPT_TIMEOUT_MS: u64 = 60_000;

/// E.164 prefixes: `+` and 1 to 15 digits each.
fn validate_prefixes(prefixes: Vec<String>, key: &str) -> Result<Vec<Box<str>>, ConfigError> {
    if prefixes.len() > 1000 {
        return invalid(key, "at most 1000 prefixes");
    }
    prefixes
        .into_iter()
        .map(|prefix| {
            let digits = prefix.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return invalid(
                    key,
                    format!("{prefix:?} is not an E.164 prefix like \"+39\" or \"+39333\""),
                );
            }
            Ok(prefix.into_boxed_str())
        })
        .collect()
}

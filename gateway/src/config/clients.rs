//! `[[clients]]` and `[webhooks]`: who may call the API, and how their webhook events go out.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, check_name, http_url, invalid, secs};
use crate::citizen_ip::{CitizenIpSource, ForwardedHeader, IpBlock};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    pub outbox_capacity: Option<usize>,
    pub max_attempts: Option<u32>,
    pub timeout_ms: Option<u64>,
    pub concurrency: Option<usize>,
    pub retry_base_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub name: String,
    pub api_key_sha256: String,
    pub rate_per_sec: Option<u32>,
    pub priority: Option<u8>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub webhook_delayed_after_secs: Option<u64>,
    pub citizen_ip: Option<String>,
    pub citizen_ip_header: Option<String>,
    pub citizen_ip_trusted_proxies: Option<Vec<String>>,
    pub web_origins: Option<Vec<String>>,
    pub app_hashes: Option<Vec<String>>,
    pub sms_budget: Option<super::limits::RawRule>,
}

/// How webhook events are delivered to clients.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    /// Events waiting for delivery or a retry, across all clients; beyond it new events are
    /// dropped and counted.
    pub outbox_capacity: usize,
    /// Attempts per event before it is given up.
    pub max_attempts: u32,
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Back-off between attempts: exponential from the base, with full jitter, up to the cap.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub api_key_sha256: [u8; 32],
    pub rate_per_sec: NonZeroU32,
    /// Higher priorities are served first from the SMS queue.
    pub priority: u8,
    /// Where this client's events go, if anywhere.
    pub webhook: Option<WebhookTarget>,
    /// Where the address of the citizen behind each start comes from, for the per-IP limit;
    /// never this client's own address, which every citizen it serves shares.
    pub citizen_ip: CitizenIpSource,
    /// The hosts of the web origins this client's SMS may bind a code to (WebOTP), from its
    /// `web_origins`; a start may name only these, and with exactly one it need not name it.
    pub web_origin_hosts: Vec<String>,
    /// The Android SMS Retriever hashes of this client's apps (`app_hashes`), on the same terms.
    pub app_hashes: Vec<String>,
    /// At most this many SMS (first SMS and resends) for this client, across every instance
    /// (`crate::budget`); `None`: no budget.
    pub sms_budget: Option<super::Rule>,
}

/// A client's webhook: its URL, the secret its events are signed with, and after how long in
/// the queue a `verification.delayed` event goes out.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: http::Uri,
    pub secret: Vec<u8>,
    pub delayed_after: Duration,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry credentials in its query; only its host is printed, never the secret.
        f.debug_struct("WebhookTarget")
            .field("host", &self.url.host())
            .field("secret", &"**REDACTED**")
            .field("delayed_after", &self.delayed_after)
            .finish()
    }
}

impl RawClient {
    pub(crate) fn validate(self, index: usize) -> Result<ClientConfig, ConfigError> {
        let key = |field: &str| format!("clients[{index}].{field}");
        check_name(key("name"), &self.name)?;
        let mut api_key_sha256 = [0u8; 32];
        if hex::decode_to_slice(self.api_key_sha256.trim(), &mut api_key_sha256).is_err() {
            return invalid(key("api_key_sha256"), "must be 64 hex digits (a SHA-256)");
        }
        let Some(rate_per_sec) = NonZeroU32::new(self.rate_per_sec.unwrap_or(100)) else {
            return invalid(key("rate_per_sec"), "must be at least 1");
        };
        let priority = self.priority.unwrap_or(0);
        if priority > 9 {
            return invalid(key("priority"), "must be between 0 and 9");
        }
        let webhook = match (self.webhook_url, self.webhook_secret) {
            (None, None) => {
                if self.webhook_delayed_after_secs.is_some() {
                    return invalid(key("webhook_delayed_after_secs"), "needs a webhook_url");
                }
                None
            }
            (Some(_), None) => {
                return invalid(
                    key("webhook_secret"),
                    "a webhook_url needs a webhook_secret",
                );
            }
            (None, Some(_)) => {
                return invalid(key("webhook_url"), "a webhook_secret needs a webhook_url");
            }
            (Some(url), Some(secret)) => {
                let parsed = http_url(key("webhook_url"), &url)?;
                if secret.len() < 16 || secret.len() > 256 {
                    return invalid(key("webhook_secret"), "must be 16 to 256 characters");
                }
                let delayed_after = secs(
                    &key("webhook_delayed_after_secs"),
                    self.webhook_delayed_after_secs,
                    30,
                    1,
                    // Every queued SMS is watched this long: an hour bounds the watch list
                    // (an SMS queued longer has outlived any code anyway).
                    3_600,
                )?;
                Some(WebhookTarget {
                    url: parsed,
                    secret: secret.into_bytes(),
                    delayed_after,
                })
            }
        };
        let citizen_ip = citizen_ip_source(
            &key,
            self.citizen_ip.as_deref(),
            self.citizen_ip_header,
            self.citizen_ip_trusted_proxies,
        )?;
        let mut web_origin_hosts = Vec::new();
        for (n, origin) in self.web_origins.unwrap_or_default().iter().enumerate() {
            let host = crate::sms::web_otp_host(origin).or_else(|error| {
                invalid(format!("{}[{n}]", key("web_origins")), error.to_string())
            })?;
            web_origin_hosts.push(host);
        }
        let app_hashes = self.app_hashes.unwrap_or_default();
        for (n, hash) in app_hashes.iter().enumerate() {
            if !crate::sms::is_valid_app_hash(hash) {
                return invalid(
                    format!("{}[{n}]", key("app_hashes")),
                    "expected the 11-character Android SMS Retriever hash",
                );
            }
        }
        let sms_budget = self
            .sms_budget
            .map(|rule| rule.validate(&key("sms_budget")))
            .transpose()?;
        Ok(ClientConfig {
            sms_budget,
            name: self.name,
            api_key_sha256,
            rate_per_sec,
            priority,
            webhook,
            citizen_ip,
            web_origin_hosts,
            app_hashes,
        })
    }
}

/// A client's `citizen_ip`, with `citizen_ip_header` and `citizen_ip_trusted_proxies`, which
/// only the `"header"` source takes (and requires the first of).
fn citizen_ip_source(
    key: &dyn Fn(&str) -> String,
    source: Option<&str>,
    header: Option<String>,
    trusted_proxies: Option<Vec<String>>,
) -> Result<CitizenIpSource, ConfigError> {
    let source = match source.unwrap_or("optional") {
        "optional" => CitizenIpSource::Optional,
        "body" => CitizenIpSource::Body,
        "none" => CitizenIpSource::None,
        "header" => {
            let Some(header) = header else {
                return invalid(
                    key("citizen_ip_header"),
                    "citizen_ip = \"header\" needs the header's name, e.g. \"X-Forwarded-For\"",
                );
            };
            let Ok(name) = http::HeaderName::from_bytes(header.trim().as_bytes()) else {
                return invalid(key("citizen_ip_header"), "not a valid HTTP header name");
            };
            let trusted_proxies = trusted_proxies
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(index, block)| {
                    block.parse::<IpBlock>().or_else(|()| {
                        invalid(
                            key(&format!("citizen_ip_trusted_proxies[{index}]")),
                            "expected an IP address or a block such as 10.0.0.0/8",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(CitizenIpSource::Header(ForwardedHeader {
                name,
                trusted_proxies,
            }));
        }
        _ => {
            return invalid(
                key("citizen_ip"),
                "must be \"optional\", \"body\", \"header\" or \"none\"",
            );
        }
    };
    if header.is_some() {
        return invalid(
            key("citizen_ip_header"),
            "only with citizen_ip = \"header\"",
        );
    }
    if trusted_proxies.is_some() {
        return invalid(
            key("citizen_ip_trusted_proxies"),
            "only with citizen_ip = \"header\"",
        );
    }
    Ok(source)
}

impl RawWebhooks {
    pub(crate) fn validate(self) -> Result<WebhookPolicy, ConfigError> {
        let outbox_capacity = self.outbox_capacity.unwrap_or(100_000);
        if !(1..=10_000_000).contains(&outbox_capacity) {
            return invalid("webhooks.outbox_capacity", "must be between 1 and 10000000");
        }
        let max_attempts = self.max_attempts.unwrap_or(12);
        if !(1..=100).contains(&max_attempts) {
            return invalid("webhooks.max_attempts", "must be between 1 and 100");
        }
        let concurrency = self.concurrency.unwrap_or(64);
        if !(1..=10_000).contains(&concurrency) {
            return invalid("webhooks.concurrency", "must be between 1 and 10000");
        }
        let millis = |key: &str, value: Option<u64>, default: u64, max: u64| {
            let value = value.unwrap_or(default);
            if !(1..=max).contains(&value) {
                return invalid(
                    format!("webhooks.{key}"),
                    format!("must be between 1 and {max}"),
                );
            }
            Ok(Duration::from_millis(value))
        };
        let timeout = millis("timeout_ms", self.timeout_ms, 5_000, 120_000)?;
        let retry_base = millis("retry_base_ms", self.retry_base_ms, 1_000, 3_600_000)?;
        let retry_max = millis("retry_max_ms", self.retry_max_ms, 300_000, 86_400_000)?;
        if retry_max < retry_base {
            return invalid("webhooks.retry_max_ms", "must not be below retry_base_ms");
        }
        Ok(WebhookPolicy {
            outbox_capacity,
            max_attempts,
            timeout,
            concurrency,
            retry_base,
            retry_max,
        })
    }
}

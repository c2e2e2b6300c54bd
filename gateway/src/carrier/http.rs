//! The HTTP carrier connector: DESIGN.md section 5's wire format over pooled keep-alive
//! connections.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Accepted, FailureKind, OutboundSms, SubmitError};
use crate::config::HttpVersion;

#[derive(Debug)]
pub struct HttpConnector {
    name: String,
    url: reqwest::Url,
    client: reqwest::Client,
}

#[derive(Serialize)]
struct SubmitBody<'a> {
    message_id: &'a str,
    to: &'a str,
    from: &'a str,
    text: &'a str,
    receipt_url: &'a str,
}

#[derive(Deserialize)]
struct AcceptBody {
    carrier_message_id: Option<serde_json::Value>,
}

/// The largest carrier answer read: a carrier that sends more is broken or hostile.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

impl HttpConnector {
    pub fn new(
        name: String,
        url: reqwest::Url,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        timeout: Duration,
        window: usize,
        version: HttpVersion,
    ) -> Result<HttpConnector, reqwest::Error> {
        let builder = reqwest::Client::builder();
        let builder = match version {
            HttpVersion::Auto => builder,
            HttpVersion::Http1 => builder.http1_only(),
            HttpVersion::Http2 => builder
                .http2_prior_knowledge()
                .http2_adaptive_window(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_while_idle(true),
        };
        let client = builder
            .default_headers(headers.into_iter().collect())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(window)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("otpgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpConnector { name, url, client })
    }

    pub async fn submit(&self, sms: &OutboundSms) -> Result<Accepted, SubmitError> {
        let body = SubmitBody {
            message_id: &sms.message_id,
            to: &sms.to,
            from: &sms.from,
            text: sms.text.text(),
            receipt_url: &sms.receipt_url,
        };
        let body = serde_json::to_vec(&body).map_err(|_| SubmitError::Permanent {
            reason: FailureKind::BadResponse,
        })?;
        let response = self
            .client
            .post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|error| SubmitError::Temporary {
                reason: classify(&error),
            })?;
        let status = response.status();
        if status.is_success() {
            let bytes = read_capped(response)
                .await
                .map_err(|reason| SubmitError::Temporary { reason })?;
            let carrier_message_id = serde_json::from_slice::<AcceptBody>(&bytes)
                .ok()
                .and_then(|body| body.carrier_message_id)
                .and_then(|id| match id {
                    serde_json::Value::String(id) if !id.is_empty() && id.len() <= 128 => Some(id),
                    serde_json::Value::Number(id) => Some(id.to_string()),
                    _ => None,
                });
            if carrier_message_id.is_none() {
                tracing::warn!(carrier = %self.name, "carrier accepted an SMS without a usable carrier_message_id");
            }
            return Ok(Accepted { carrier_message_id });
        }
        if status == http::StatusCode::TOO_MANY_REQUESTS
            || status == http::StatusCode::SERVICE_UNAVAILABLE
        {
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(|secs| Duration::from_secs(secs.min(3600)));
            return Err(SubmitError::Throttled { retry_after });
        }
        let reason = FailureKind::Status(status.as_u16());
        if status.is_client_error() {
            Err(SubmitError::Permanent { reason })
        } else {
            Err(SubmitError::Temporary { reason })
        }
    }
}

fn classify(error: &reqwest::Error) -> FailureKind {
    if error.is_timeout() {
        FailureKind::Timeout
    } else if error.is_connect() {
        FailureKind::Connect
    } else {
        FailureKind::BadResponse
    }
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, FailureKind> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(FailureKind::BadResponse);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(error) => return Err(classify(&error)),
        }
    }
}

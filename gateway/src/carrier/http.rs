//! The HTTP carrier connector: docs/DESIGN.md section 5's wire format over pooled keep-alive
//! connections (HTTP/1.1, or HTTP/2 by ALPN or prior knowledge), over TLS when the URL says
//! `https`.
//!
//! It is hyper-util's pooled client with a rustls connector rather than a higher-level client:
//! one submit is one small POST, and at thousands per second the layers above hyper (URL
//! handling, redirect and retry policies, boxed futures) cost more than the submit itself.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};

use super::{Accepted, FailureKind, OutboundSms, SubmitError};
use crate::config::HttpVersion;
use crate::http_client::PooledClient;

/// A carrier reached over HTTP.
#[derive(Debug)]
pub struct HttpConnector {
    name: String,
    url: http::Uri,
    /// The carrier's configured headers (its auth), marked sensitive so they never print.
    headers: http::HeaderMap,
    timeout: Duration,
    client: PooledClient,
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

/// Whether the carrier answered something that is not HTTP, rather than no answer at all.
fn is_parse_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(hyper_error) = error.downcast_ref::<hyper::Error>() {
            return hyper_error.is_parse() || hyper_error.is_parse_status();
        }
        source = error.source();
    }
    false
}

impl HttpConnector {
    pub fn new(
        name: String,
        url: http::Uri,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        timeout: Duration,
        window: usize,
        version: HttpVersion,
    ) -> Result<HttpConnector, std::io::Error> {
        let client = crate::http_client::pooled(timeout, window, version)?;
        let mut header_map = http::HeaderMap::with_capacity(headers.len() + 2);
        for (header_name, mut value) in headers {
            value.set_sensitive(true);
            header_map.append(header_name, value);
        }
        header_map.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        header_map.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("otpgate/", env!("CARGO_PKG_VERSION"))),
        );
        Ok(HttpConnector {
            name,
            url,
            headers: header_map,
            timeout,
            client,
        })
    }

    pub async fn submit(&self, sms: &OutboundSms) -> Result<Accepted, SubmitError> {
        let to = sms.to.e164();
        let body = SubmitBody {
            message_id: &sms.message_id,
            to: &to,
            from: &sms.from,
            text: sms.text.text(),
            receipt_url: &sms.receipt_url,
        };
        let body = serde_json::to_vec(&body).map_err(|_| SubmitError::Permanent {
            reason: FailureKind::BadResponse,
        })?;
        let mut request = http::Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.url.clone();
        *request.headers_mut() = self.headers.clone();
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(SubmitError::Temporary {
                reason: FailureKind::Timeout,
            }),
        }
    }

    /// Sends the request and classifies the answer (docs/DESIGN.md section 5).
    async fn exchange(&self, request: http::Request<Full<Bytes>>) -> Result<Accepted, SubmitError> {
        let response = self.client.request(request).await.map_err(|error| {
            let reason = if error.is_connect() {
                FailureKind::Connect
            } else if is_parse_error(&error) {
                FailureKind::BadResponse
            } else {
                FailureKind::ConnectionLost
            };
            SubmitError::Temporary { reason }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs.min(3600)));
        // The body is read whatever the status, so the connection can carry the next submit.
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|collected| collected.to_bytes());
        if status.is_success() {
            // A 2xx is an acceptance even if its body is unreadable: retrying would send the
            // SMS twice. Only receipts are lost without the carrier's id.
            let carrier_message_id = body
                .ok()
                .and_then(|bytes| serde_json::from_slice::<AcceptBody>(&bytes).ok())
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

//! Carrier connectors: the only code that talks to carriers.
//!
//! A connector takes one [`OutboundSms`] and answers with what the carrier said, classified the
//! way the dispatcher needs it (docs/DESIGN.md section 5): accepted with the carrier's message id,
//! throttled (slow down and retry within milliseconds), a temporary failure (retry, or fail over
//! to another carrier) or a permanent one (fail the verification). Retry policy, pacing and
//! windows belong to the dispatcher, never to a connector.

mod console;
mod http;
mod smpp;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{CarrierConfig, CarrierKind};
use crate::phone::Phone;
use crate::sms::SmsText;

pub use self::console::ConsoleConnector;
pub use self::http::HttpConnector;
pub use self::smpp::{ReceiptSink, SmppConnector, read_receipt};

/// One SMS, ready for a carrier. Its text holds the code, so it never prints.
pub struct OutboundSms {
    /// Unique per submit attempt family: `<verification id>.<send number>`.
    pub message_id: String,
    /// The recipient; connectors take the full number from it with `Phone::e164`, and it
    /// prints masked.
    pub to: Phone,
    /// The sender id, shared by every SMS of a carrier.
    pub from: Arc<str>,
    pub text: SmsText,
    /// Where the carrier posts its delivery receipt, shared by every SMS of a carrier.
    pub receipt_url: Arc<str>,
}

/// The carrier's `2xx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `None` when the carrier accepted but sent no usable id (receipts cannot match then).
    pub carrier_message_id: Option<String>,
}

/// Why a submit did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("carrier throttled the submit")]
    Throttled { retry_after: Option<Duration> },
    #[error("temporary carrier failure: {reason}")]
    Temporary { reason: FailureKind },
    #[error("carrier refused the message permanently: {reason}")]
    Permanent { reason: FailureKind },
}

/// A closed set of failure causes, safe for logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    Connect,
    /// The connection closed before the answer came (the carrier went away mid-request).
    ConnectionLost,
    Status(u16),
    BadResponse,
}

/// A carrier connector, by kind.
#[derive(Debug)]
pub enum Connector {
    /// Boxed: the HTTP client is large, the console carrier tiny.
    Http(Box<HttpConnector>),
    Smpp(SmppConnector),
    Console(ConsoleConnector),
}

// === impl Connector ===

impl Connector {
    /// Builds the carrier's connector; an SMPP carrier starts binding in the background and
    /// hands the receipts it reads to `receipts`.
    pub fn new(
        config: &CarrierConfig,
        receipts: ReceiptSink,
        metrics: crate::metrics::CarrierMetrics,
    ) -> Result<Connector, std::io::Error> {
        Ok(match &config.kind {
            CarrierKind::Http {
                url,
                headers,
                timeout,
                version,
            } => Connector::Http(Box::new(HttpConnector::new(
                config.name.clone(),
                url.clone(),
                headers.clone(),
                *timeout,
                config.window.get() as usize,
                *version,
            )?)),
            CarrierKind::Smpp(settings) => Connector::Smpp(SmppConnector::start(
                config.name.clone(),
                (**settings).clone(),
                receipts,
                metrics,
            )?),
            CarrierKind::Console => Connector::Console(ConsoleConnector::new(config.name.clone())),
        })
    }

    /// Hands one SMS to the carrier.
    pub async fn submit(&self, sms: &OutboundSms) -> Result<Accepted, SubmitError> {
        match self {
            Connector::Http(http) => http.submit(sms).await,
            Connector::Smpp(smpp) => smpp.submit(sms).await,
            Connector::Console(console) => console.submit(sms),
        }
    }
}

impl fmt::Debug for OutboundSms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSms")
            .field("message_id", &self.message_id)
            .field("to", &self.to)
            .field("from", &self.from)
            .field("text", &self.text)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Timeout => f.write_str("timed out"),
            FailureKind::Connect => f.write_str("connection failed"),
            FailureKind::ConnectionLost => f.write_str("connection lost before the answer"),
            FailureKind::Status(status) => write!(f, "status {status}"),
            FailureKind::BadResponse => f.write_str("malformed response"),
        }
    }
}

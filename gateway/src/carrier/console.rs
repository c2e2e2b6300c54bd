//! The `console` carrier: prints each SMS on standard output instead of sending it.
//!
//! A development aid, so the quick start works with no carrier at all. It is the one place where
//! a code is shown, and only on standard output, which the gateway keeps for this carrier alone:
//! logs go to standard error. Never configure it in production.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Accepted, OutboundSms, SubmitError};

#[derive(Debug)]
pub struct ConsoleConnector {
    name: String,
    next_id: AtomicU64,
}

impl ConsoleConnector {
    pub fn new(name: String) -> ConsoleConnector {
        ConsoleConnector {
            name,
            next_id: AtomicU64::new(1),
        }
    }

    pub fn submit(&self, sms: &OutboundSms) -> Result<Accepted, SubmitError> {
        let carrier_message_id = format!(
            "{}-{}",
            self.name,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let line = format!(
            "SMS via {} to {} ({}, {} segment(s)): {}\n",
            self.name,
            sms.to,
            sms.text.encoding().as_str(),
            sms.text.segments(),
            sms.text.text().replace('\n', " / "),
        );
        let mut stdout = std::io::stdout().lock();
        // A closed stdout must not fail the verification: the console carrier is a dev aid.
        let _ = stdout.write_all(line.as_bytes());
        let _ = stdout.flush();
        Ok(Accepted {
            carrier_message_id: Some(carrier_message_id),
        })
    }
}

//! The simulated carriers and handsets: HTTP carriers (`http.rs`) and SMPP SMSCs ([`smsc`]),
//! sharing one [`Network`] (`network.rs`) that hands each SMS to its user's handset
//! (`handset.rs`).
//!
//! The rehearsal starts a scenario's carriers with [`start`], each by its protocol, and reads
//! what they did from the [`SimCarrier`]s it returns and from the [`Network`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

mod handset;
mod http;
mod network;
mod settings;
pub mod smsc;

pub use network::{CapacityRule, CarrierCounts, Network, SmppCounts, Tally};
pub use settings::{
    BindKind, Carrier, CarrierState, Dist, HandsetSettings, Phones, Protocol, ReceiptFormat,
    ReceiptIds, Smpp, TimelineEntry, standard_normal,
};

/// One simulated carrier, listening.
#[derive(Debug)]
pub struct SimCarrier {
    pub name: String,
    pub addr: SocketAddr,
    /// The token its receipts carry (`Authorization: Bearer`); unused by an SMSC.
    pub receipt_token: String,
    /// An SMSC's login, which the gateway binds with; `None` for an HTTP carrier.
    pub smpp_login: Option<smsc::Login>,
    pub counts: Arc<CarrierCounts>,
}

/// Starts every carrier of `carriers`, an HTTP carrier or an SMSC as its protocol says; they
/// stop when `stop` fires.
pub async fn start(
    carriers: &[Carrier],
    network: &Arc<Network>,
    started: Instant,
    stop: &CancellationToken,
) -> std::io::Result<Vec<SimCarrier>> {
    let mut listening = Vec::with_capacity(carriers.len());
    for settings in carriers {
        let carrier = if let Protocol::Smpp(_) = settings.protocol {
            let smsc = smsc::start(
                smsc::SmscSettings::from_carrier(settings, started),
                network.clone(),
                stop.clone(),
            )
            .await?;
            SimCarrier {
                name: settings.name.clone(),
                addr: smsc.local_addr(),
                receipt_token: String::new(),
                smpp_login: Some(smsc.login().clone()),
                counts: smsc.counts().clone(),
            }
        } else {
            let http = http::start(settings, network, started, stop).await?;
            SimCarrier {
                name: settings.name.clone(),
                addr: http.addr,
                receipt_token: http.receipt_token,
                smpp_login: None,
                counts: http.counts,
            }
        };
        listening.push(carrier);
    }
    Ok(listening)
}

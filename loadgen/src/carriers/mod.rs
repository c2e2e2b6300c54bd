//! The simulated carriers and handsets: HTTP carriers, SMPP SMSCs and the handsets they deliver
//! to.

pub mod handset;
pub mod http;
pub mod smsc;

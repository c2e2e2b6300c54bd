//! The SMPP 3.4 carrier connector: the gateway as an ESME, bound to a carrier's SMSC.
//!
//! Each carrier keeps `binds` sessions, each its own TCP (or TLS) connection with its own window
//! of outstanding `submit_sm`. A session is a task that connects, binds (one transceiver, or a
//! transmitter and a receiver), answers every `deliver_sm`, and on any loss reconnects with
//! exponential back-off and jitter. rusmppc drives the link itself: sequence numbers, matching
//! answers to requests, response timeouts and `enquire_link` keep-alives. On shutdown every
//! session unbinds, and takes receipts until the SMSC answers the unbind.
//!
//! A submit takes the next bound session with room in its window, splits the text into parts
//! (`sms_wire::encode`: GSM-7 or UCS-2, a UDH per part of a long text) and sends them in order on
//! that session. Only the last part asks for a delivery receipt, and its message id is the one
//! receipts are matched by: the message reaches the handset when its last part does.
//!
//! Answers map to the dispatcher's classes: `ESME_RTHROTTLED` and `ESME_RMSGQFUL` are throttles
//! (the session also stands aside for a moment, so other binds take the next submits), an invalid
//! destination is permanent, anything else temporary. A throttle or a temporary failure on a part
//! after the first is retried here within the submit's timeout, since the parts before it are
//! already with the SMSC. A session that ends within seconds of its bind backs off like a failed
//! bind, so an SMSC that drops the link on some PDU it sends after every bind is not rebound in a
//! tight loop.
//!
//! Receipts come as `deliver_sm` with the receipt bits of `esm_class`: the message id and state
//! are read from the `receipted_message_id` and `message_state` TLVs, or from the receipt text
//! (`id:… stat:DELIVRD …`) when the SMSC sends no TLVs. Each is applied to its verification
//! before it is answered; when the store cannot take it, the answer is `ESME_RX_T_APPN` so that
//! the SMSC sends it again.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use rusmpp::pdus::{
    BindReceiver, BindTransceiver, BindTransmitter, DeliverSm, DeliverSmResp, SubmitSm,
};
use rusmpp::tlvs::TlvValue;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{
    DataCoding, EsmClass, InterfaceVersion, Npi, RegisteredDelivery, ServiceType, Ton,
};
use rusmpp::{CommandStatus, Pdu};
use rusmppc::{Client, ConnectionBuilder, Event};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::{Accepted, FailureKind, OutboundSms, SubmitError};
use crate::config::{BindMode, SmppSettings};
use crate::metrics::CarrierMetrics;
use crate::receipt::ReceiptStatus;
use crate::sms_wire;
use crate::sync::lock;

/// Applies a receipt (carrier message id, status) and says whether it was taken.
pub type ReceiptSink =
    Arc<dyn Fn(String, ReceiptStatus) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A carrier reached over SMPP. Cloning shares the sessions; they end when the last clone is
/// dropped, or cleanly with [`SmppConnector::close`].
#[derive(Clone)]
pub struct SmppConnector {
    inner: Arc<Inner>,
    /// Outside `Inner`, which the session tasks hold: dropping the last connector aborts them.
    tasks: Arc<Mutex<JoinSet<()>>>,
}

struct Inner {
    name: String,
    settings: SmppSettings,
    /// The sessions that submit, one per bind.
    sessions: Box<[Session]>,
    /// Where the round-robin over sessions starts next.
    next: AtomicUsize,
    /// The concatenation reference of the next long text.
    reference: AtomicU8,
    receipts: ReceiptSink,
    metrics: CarrierMetrics,
    /// Held while a session's client changes and the bound sessions are counted.
    counting: Mutex<()>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Cancelled to unbind every session.
    stop: CancellationToken,
}

/// One bind's submitting side.
struct Session {
    /// The bound client, `None` while connecting.
    client: watch::Sender<Option<Client>>,
    /// The bind's window of outstanding `submit_sm`.
    window: Arc<Semaphore>,
    /// Until when the session stands aside after a throttle answer.
    throttled_until: Mutex<Option<Instant>>,
}

/// What a session binds as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Transceiver,
    Transmitter,
    Receiver,
}

/// How long a session stands aside after a throttle answer.
const THROTTLE_PAUSE: Duration = Duration::from_millis(20);
/// How long a submit waits for some session to be bound before it fails over.
const BIND_WAIT: Duration = Duration::from_secs(1);
/// Reconnect back-off: base and cap.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long a session must have stayed bound for its end not to count as a failure.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// The `deliver_sm` being applied at once per session; beyond it the session reads no more.
const MAX_ANSWERING: usize = 256;
/// Pause before a part after the first is tried again.
const PART_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a session waits for its `unbind_resp` on shutdown.
const UNBIND_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest PDU read from an SMSC.
const MAX_PDU: usize = 64 * 1024;

impl SmppConnector {
    /// Starts the carrier's sessions; they bind in the background and keep reconnecting until
    /// [`SmppConnector::close`].
    pub fn start(
        name: String,
        settings: SmppSettings,
        receipts: ReceiptSink,
        metrics: CarrierMetrics,
    ) -> Result<SmppConnector, std::io::Error> {
        let tls = match &settings.tls {
            None => None,
            Some(ca_file) => Some(tls_connector(ca_file.as_deref())?),
        };
        let window = settings.window_per_bind.get() as usize;
        let sessions = (0..settings.binds.get())
            .map(|_| Session {
                client: watch::Sender::new(None),
                window: Arc::new(Semaphore::new(window)),
                throttled_until: Mutex::new(None),
            })
            .collect();
        let inner = Arc::new(Inner {
            name,
            settings,
            sessions,
            next: AtomicUsize::new(0),
            reference: AtomicU8::new(rand::rng().random()),
            receipts,
            metrics,
            counting: Mutex::new(()),
            tls,
            stop: CancellationToken::new(),
        });
        let mut tasks = JoinSet::new();
        let roles: &[Role] = match inner.settings.bind {
            BindMode::Transceiver => &[Role::Transceiver],
            BindMode::TransmitterReceiver => &[Role::Transmitter, Role::Receiver],
        };
        for index in 0..inner.sessions.len() {
            for &role in roles {
                tasks.spawn(run_session(inner.clone(), index, role));
            }
        }
        Ok(SmppConnector {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// Unbinds every session and waits for them to end.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while tasks.join_next().await.is_some() {}
    }

    /// The number of sessions bound for submits right now.
    pub fn bound(&self) -> usize {
        self.inner.bound()
    }

    pub async fn submit(&self, sms: &OutboundSms) -> Result<Accepted, SubmitError> {
        let inner = &*self.inner;
        let (client, session, _permit) = inner.acquire().await?;
        let reference = inner.reference.fetch_add(1, Ordering::Relaxed);
        let parts = sms_wire::encode(&sms.text, &inner.settings.coding, reference);
        let (source_ton, source_npi, source) = source_address(&sms.from);
        let destination = sms.to.e164();
        let destination = destination.trim_start_matches('+');
        let last = parts.len().saturating_sub(1);
        let deadline = Instant::now() + inner.settings.timeout;
        let mut message_id = None;
        for (index, part) in parts.into_iter().enumerate() {
            let submit = SubmitSm::builder()
                .service_type(ServiceType::default())
                .source_addr_ton(source_ton)
                .source_addr_npi(source_npi)
                .source_addr(c_octets(source)?)
                .dest_addr_ton(Ton::International)
                .dest_addr_npi(Npi::Isdn)
                .destination_addr(c_octets(destination)?)
                .esm_class(EsmClass::from(part.esm_class))
                // A receipt for the last part only: the message is whole when it arrives.
                .registered_delivery(RegisteredDelivery::from(u8::from(index == last)))
                .data_coding(DataCoding::from(part.data_coding))
                .short_message(OctetString::from_vec(part.short_message).map_err(|_| {
                    SubmitError::Permanent {
                        reason: FailureKind::BadResponse,
                    }
                })?)
                .build();
            let id = loop {
                match client.submit_sm(submit.clone()).await {
                    Ok(response) => break response.message_id().as_str().to_owned(),
                    Err(error) => {
                        let error = classify(error);
                        let pause = match error {
                            SubmitError::Throttled { .. } => {
                                session.stand_aside();
                                THROTTLE_PAUSE
                            }
                            SubmitError::Temporary { .. } => PART_RETRY_PAUSE,
                            SubmitError::Permanent { .. } => return Err(error),
                        };
                        // Earlier parts are with the SMSC: retry this one rather than the
                        // whole text, while the submit's time lasts.
                        if index > 0 && Instant::now() + pause < deadline {
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        return Err(error);
                    }
                }
            };
            message_id = Some(id);
        }
        let carrier_message_id = message_id.filter(|id| !id.is_empty());
        if carrier_message_id.is_none() {
            tracing::warn!(carrier = %inner.name, "SMSC accepted an SMS without a message id");
        }
        Ok(Accepted { carrier_message_id })
    }
}

impl fmt::Debug for SmppConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmppConnector")
            .field("name", &self.inner.name)
            .field("settings", &self.inner.settings)
            .field("bound", &self.bound())
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn bound(&self) -> usize {
        self.sessions
            .iter()
            .filter(|session| session.client.borrow().is_some())
            .count()
    }

    /// Publishes session `index`'s client (`None` while it is not bound).
    fn set_client(&self, index: usize, client: Option<Client>) {
        // One session at a time, so that the gauge ends at the count of the last change.
        let _counting = lock(&self.counting);
        self.sessions[index].client.send_replace(client);
        self.metrics.set_sessions_bound(self.bound());
    }

    /// A bound session with room in its window: round-robin from `next`, passing over sessions
    /// that stand aside after a throttle unless all do.
    async fn acquire(&self) -> Result<(Client, &Session, OwnedSemaphorePermit), SubmitError> {
        let give_up = Instant::now() + BIND_WAIT.min(self.settings.timeout);
        loop {
            let n = self.sessions.len();
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let mut fallback = None;
            for offset in 0..n {
                let session = &self.sessions[(start + offset) % n];
                let Some(client) = session.client.borrow().clone() else {
                    continue;
                };
                if session.is_aside(now) {
                    fallback.get_or_insert(session);
                    continue;
                }
                if let Ok(permit) = session.window.clone().try_acquire_owned() {
                    return Ok((client, session, permit));
                }
                fallback.get_or_insert(session);
            }
            if let Some(session) = fallback {
                // Every bound session is full or standing aside: wait for this one, then take
                // its client as it is now (it may have reconnected meanwhile, or be down).
                let pause = session.aside_for(now);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let permit = session.window.clone().acquire_owned().await.map_err(|_| {
                    SubmitError::Temporary {
                        reason: FailureKind::ConnectionLost,
                    }
                })?;
                let client = session.client.borrow().clone();
                if let Some(client) = client {
                    return Ok((client, session, permit));
                }
                continue;
            }
            // Nothing bound: wait a little for a session, then let the dispatcher fail over.
            let Some(wait) = give_up.checked_duration_since(now).filter(|w| !w.is_zero()) else {
                return Err(SubmitError::Temporary {
                    reason: FailureKind::Connect,
                });
            };
            let mut bound = self.sessions[start % n].client.subscribe();
            let _ = tokio::time::timeout(
                wait.min(Duration::from_millis(50)),
                bound.wait_for(Option::is_some),
            )
            .await;
        }
    }
}

// === impl Session ===

impl Session {
    fn stand_aside(&self) {
        *lock(&self.throttled_until) = Some(Instant::now() + THROTTLE_PAUSE);
    }

    fn is_aside(&self, now: Instant) -> bool {
        !self.aside_for(now).is_zero()
    }

    fn aside_for(&self, now: Instant) -> Duration {
        lock(&self.throttled_until)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

/// One session, for the life of the connector: connect, bind, serve, and on any loss back off
/// and do it again.
async fn run_session(inner: Arc<Inner>, index: usize, role: Role) {
    let mut failures: u32 = 0;
    loop {
        let attempt = tokio::select! {
            biased;
            () = inner.stop.cancelled() => return,
            attempt = connect_and_bind(&inner, role) => attempt,
        };
        match attempt {
            Ok((client, events)) => {
                let bound_at = Instant::now();
                tracing::info!(carrier = %inner.name, bind = index, role = role.as_str(), "SMPP session bound");
                if role != Role::Receiver {
                    inner.set_client(index, Some(client.clone()));
                }
                let stopped = serve(&inner, &client, events).await;
                if role != Role::Receiver {
                    inner.set_client(index, None);
                }
                // A session that ends soon after its bind (an SMSC that drops the link on some
                // PDU it sends again after every bind) backs off like a failed bind.
                if bound_at.elapsed() >= STABLE_SESSION {
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                }
                if stopped {
                    // `serve` has unbound; close the link.
                    let _ = tokio::time::timeout(UNBIND_TIMEOUT, client.close()).await;
                    tracing::info!(carrier = %inner.name, bind = index, role = role.as_str(), "SMPP session unbound");
                    return;
                }
                tracing::warn!(carrier = %inner.name, bind = index, role = role.as_str(), "SMPP session lost; reconnecting");
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                tracing::warn!(carrier = %inner.name, bind = index, role = role.as_str(), %reason, "SMPP bind failed; retrying");
            }
        }
        let ceiling = RECONNECT_BASE
            .saturating_mul(1 << failures.min(10))
            .min(RECONNECT_MAX);
        let pause = Duration::from_millis(
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64),
        );
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Connects (over TLS when configured) and binds as `role`.
async fn connect_and_bind(
    inner: &Inner,
    role: Role,
) -> Result<
    (
        Client,
        impl futures_util::Stream<Item = Event> + Unpin + 'static,
    ),
    String,
> {
    let settings = &inner.settings;
    let tcp = tokio::time::timeout(
        settings.timeout,
        tokio::net::TcpStream::connect((settings.host.as_str(), settings.port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|error| format!("connect: {error}"))?;
    let _ = tcp.set_nodelay(true);
    // rusmppc speaks SMPP 5.0 and refuses to bind as anything else unless told; 3.4 is a subset.
    let builder = ConnectionBuilder::new()
        .disable_interface_version_check()
        .max_command_length(MAX_PDU)
        .enquire_link_interval(settings.enquire_link)
        .enquire_link_response_timeout(settings.timeout)
        .response_timeout(settings.timeout);
    let (client, events) = match &inner.tls {
        None => builder.connected(Either::Left(tcp)),
        Some(tls) => {
            let server_name = rustls::pki_types::ServerName::try_from(settings.host.clone())
                .map_err(|_| "tls: host is not a valid server name".to_owned())?;
            let stream = tokio::time::timeout(settings.timeout, tls.connect(server_name, tcp))
                .await
                .map_err(|_| "tls handshake timed out".to_owned())?
                .map_err(|error| format!("tls: {error}"))?;
            builder.connected(Either::Right(stream))
        }
    };
    let system_id = c_octets(&settings.system_id).map_err(|_| "bad system_id".to_owned())?;
    let password = c_octets(&settings.password).map_err(|_| "bad password".to_owned())?;
    let system_type = c_octets(&settings.system_type).map_err(|_| "bad system_type".to_owned())?;
    // The three binds are one PDU layout under three types.
    macro_rules! bind {
        ($method:ident, $pdu:ident) => {
            client
                .$method(
                    $pdu::builder()
                        .system_id(system_id)
                        .password(password)
                        .system_type(system_type)
                        .interface_version(InterfaceVersion::Smpp3_4)
                        .build(),
                )
                .await
                .map(drop)
        };
    }
    let bound = match role {
        Role::Transceiver => bind!(bind_transceiver, BindTransceiver),
        Role::Transmitter => bind!(bind_transmitter, BindTransmitter),
        Role::Receiver => bind!(bind_receiver, BindReceiver),
    };
    if let Err(error) = bound {
        let _ = client.close().await;
        return Err(match error {
            rusmppc::error::Error::UnexpectedResponse { response } => {
                format!(
                    "bind refused with status {:#010x}",
                    u32::from(response.status())
                )
            }
            other => other.to_string(),
        });
    }
    Ok((client, events))
}

/// Serves a bound session's incoming PDUs until the link ends (`false`) or the connector stops
/// (`true`).
async fn serve(
    inner: &Arc<Inner>,
    client: &Client,
    mut events: impl futures_util::Stream<Item = Event> + Unpin,
) -> bool {
    // Receipts being applied: each answers its own deliver_sm when done.
    let mut answering = JoinSet::new();
    // On shutdown, the unbind in flight: receipts keep being taken until its answer.
    let mut unbinding: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let stopped = loop {
        tokio::select! {
            biased;
            () = inner.stop.cancelled(), if unbinding.is_none() => {
                let client = client.clone();
                unbinding = Some(Box::pin(async move {
                    let _ = tokio::time::timeout(UNBIND_TIMEOUT, client.unbind()).await;
                }));
            }
            () = async { unbinding.as_mut().expect("guarded by is_some").await }, if unbinding.is_some() => break true,
            Some(_) = answering.join_next(), if !answering.is_empty() => {}
            event = events.next(), if answering.len() < MAX_ANSWERING => match event {
                None => break unbinding.is_some(),
                Some(Event::Error(error)) => {
                    tracing::warn!(carrier = %inner.name, %error, "SMPP link error");
                }
                Some(Event::Incoming(command)) => {
                    let sequence = command.sequence_number();
                    match command.pdu() {
                        Some(Pdu::DeliverSm(deliver)) => {
                            let receipt = read_receipt(deliver);
                            let (client, inner) = (client.clone(), inner.clone());
                            answering.spawn(async move {
                                let status = match receipt {
                                    Some((id, Some(status))) => {
                                        if (inner.receipts)(id, status).await {
                                            CommandStatus::EsmeRok
                                        } else {
                                            CommandStatus::EsmeRxTAppn
                                        }
                                    }
                                    // Intermediate states and messages from handsets: taken.
                                    _ => CommandStatus::EsmeRok,
                                };
                                let _ = client
                                    .status(status)
                                    .deliver_sm_resp(sequence, DeliverSmResp::default())
                                    .await;
                            });
                        }
                        Some(Pdu::Unbind) => {
                            let _ = client.unbind_resp(sequence).await;
                            break false;
                        }
                        // rusmppc answers enquire_link itself; answers to our requests never
                        // surface here; an alert_notification takes no answer.
                        Some(Pdu::EnquireLink | Pdu::AlertNotification(_)) => {}
                        _ if command.id().is_operation() => {
                            let _ = client
                                .status(CommandStatus::EsmeRinvcmdid)
                                .generic_nack(sequence)
                                .await;
                        }
                        _ => {}
                    }
                }
            },
        }
    };
    // Answer the receipts already taken before the link goes.
    while answering.join_next().await.is_some() {}
    stopped
}

/// Reads a `deliver_sm` as a receipt: the receipted message id, and the final status it reports
/// (`None` for an intermediate state). `None` when it is not a receipt.
///
/// Public for the `smpp_pdu` fuzz target (fuzz/), which feeds it whatever an SMSC could send.
pub fn read_receipt(deliver: &DeliverSm) -> Option<(String, Option<ReceiptStatus>)> {
    let mut id = None;
    let mut state = None;
    for tlv in deliver.tlvs() {
        match tlv.value() {
            Some(TlvValue::ReceiptedMessageId(value)) => id = Some(value.as_str().to_owned()),
            Some(TlvValue::MessageState(value)) => state = Some(u8::from(*value)),
            _ => {}
        }
    }
    receipt_of(
        u8::from(deliver.esm_class),
        id,
        state,
        deliver.short_message().as_ref(),
    )
}

/// The receipt in a `deliver_sm`'s parts: its id from the TLV or the text's `id:`, its state
/// from the TLV or the text's `stat:`.
fn receipt_of(
    esm_class: u8,
    tlv_id: Option<String>,
    tlv_state: Option<u8>,
    text: &[u8],
) -> Option<(String, Option<ReceiptStatus>)> {
    // Bits 2-5 of esm_class: 0001 is an SMSC delivery receipt, 1000 an intermediate notice.
    // Only the SMSC marks a receipt: a handset's message that reads like one is not.
    let is_receipt = matches!(esm_class & 0x3C, 0x04 | 0x20) || tlv_id.is_some();
    if !is_receipt {
        return None;
    }
    // The receipt's fields are ASCII; its quoted text may be in any alphabet.
    let text = String::from_utf8_lossy(text);
    let field = |name: &str| {
        text.split_ascii_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .filter(|value| !value.is_empty())
    };
    let id = tlv_id
        .filter(|id| !id.is_empty())
        .or_else(|| field("id:").map(str::to_owned))?;
    let status = match tlv_state {
        Some(state) => match state {
            2 => Some(ReceiptStatus::Delivered),
            3 => Some(ReceiptStatus::Expired),
            4 | 5 | 8 => Some(ReceiptStatus::Undeliverable),
            _ => None,
        },
        None => match field("stat:").map(|stat| stat.to_ascii_uppercase()) {
            Some(stat) if stat.starts_with("DELIVRD") => Some(ReceiptStatus::Delivered),
            Some(stat) if stat.starts_with("EXPIRED") => Some(ReceiptStatus::Expired),
            Some(stat)
                if ["UNDELIV", "REJECTD", "DELETED"]
                    .iter()
                    .any(|s| stat.starts_with(s)) =>
            {
                Some(ReceiptStatus::Undeliverable)
            }
            _ => None,
        },
    };
    Some((id, status))
}

/// Maps a failed `submit_sm` to the dispatcher's classes.
fn classify(error: rusmppc::error::Error) -> SubmitError {
    use rusmppc::error::Error;
    match error {
        Error::UnexpectedResponse { response } => {
            let status = response.status();
            let code = u32::from(status);
            let reason = FailureKind::Status(u16::try_from(code).unwrap_or(u16::MAX));
            match status {
                CommandStatus::EsmeRthrottled | CommandStatus::EsmeRmsgqful => {
                    SubmitError::Throttled { retry_after: None }
                }
                CommandStatus::EsmeRinvdstadr
                | CommandStatus::EsmeRinvdstton
                | CommandStatus::EsmeRinvdstnpi => SubmitError::Permanent { reason },
                // A non-zero status with a submit_sm_resp is the SMSC's refusal; a zero status
                // with another PDU is a broken SMSC.
                CommandStatus::EsmeRok => SubmitError::Temporary {
                    reason: FailureKind::BadResponse,
                },
                _ => SubmitError::Temporary { reason },
            }
        }
        Error::ResponseTimeout { .. } | Error::EnquireLinkTimeout { .. } => {
            SubmitError::Temporary {
                reason: FailureKind::Timeout,
            }
        }
        Error::Decode(_) | Error::Encode(_) => SubmitError::Temporary {
            reason: FailureKind::BadResponse,
        },
        _ => SubmitError::Temporary {
            reason: FailureKind::ConnectionLost,
        },
    }
}

/// The sender as SMPP addresses it: digits (with an optional `+`) as an international number,
/// anything else as alphanumeric.
fn source_address(from: &str) -> (Ton, Npi, &str) {
    let digits = from.strip_prefix('+').unwrap_or(from);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        (Ton::International, Npi::Isdn, digits)
    } else {
        (Ton::Alphanumeric, Npi::Unknown, from)
    }
}

fn c_octets<const MIN: usize, const MAX: usize>(
    text: &str,
) -> Result<COctetString<MIN, MAX>, SubmitError> {
    COctetString::from_str(text).map_err(|_| SubmitError::Permanent {
        reason: FailureKind::BadResponse,
    })
}

/// A TLS connector trusting `ca_file`'s certificates, or the webpki roots without one.
fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsConnector, std::io::Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path).map_err(std::io::Error::other)? {
                roots
                    .add(certificate.map_err(std::io::Error::other)?)
                    .map_err(std::io::Error::other)?;
            }
            if roots.is_empty() {
                return Err(std::io::Error::other(format!(
                    "tls_ca_file {}: no certificate in it",
                    path.display()
                )));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Transceiver => "transceiver",
            Role::Transmitter => "transmitter",
            Role::Receiver => "receiver",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_read_from_tlvs_first() {
        let text = b"id:999 sub:001 dlvrd:000 submit date:2611262200 done date:2611262201 stat:UNDELIV err:001 text:";
        assert_eq!(
            receipt_of(0x04, Some("a1f3".into()), Some(2), text),
            Some(("a1f3".into(), Some(ReceiptStatus::Delivered)))
        );
    }

    #[test]
    fn receipt_text_in_another_alphabet_still_gives_its_fields() {
        let mut text = b"id:a1f3 sub:001 dlvrd:001 stat:DELIVRD err:000 text:Caf".to_vec();
        text.extend([0xE9, 0x00, 0xE8]);
        assert_eq!(
            receipt_of(0x04, None, None, &text),
            Some(("a1f3".into(), Some(ReceiptStatus::Delivered)))
        );
    }

    #[test]
    fn receipts_fall_back_to_the_text() {
        let text = b"id:00A1F3 sub:001 dlvrd:001 submit date:2611262200 done date:2611262201 stat:DELIVRD err:000 text:Your code";
        assert_eq!(
            receipt_of(0x04, None, None, text),
            Some(("00A1F3".into(), Some(ReceiptStatus::Delivered)))
        );
        for (stat, status) in [
            ("EXPIRED", Some(ReceiptStatus::Expired)),
            ("UNDELIV", Some(ReceiptStatus::Undeliverable)),
            ("REJECTD", Some(ReceiptStatus::Undeliverable)),
            ("DELETED", Some(ReceiptStatus::Undeliverable)),
            ("ENROUTE", None),
            ("ACCEPTD", None),
            ("garbage", None),
        ] {
            let text = format!("id:7 stat:{stat}");
            assert_eq!(
                receipt_of(0x04, None, None, text.as_bytes()),
                Some(("7".into(), status)),
                "{stat}"
            );
        }
    }

    #[test]
    fn message_states_map_to_statuses() {
        for (state, status) in [
            (1, None),
            (2, Some(ReceiptStatus::Delivered)),
            (3, Some(ReceiptStatus::Expired)),
            (4, Some(ReceiptStatus::Undeliverable)),
            (5, Some(ReceiptStatus::Undeliverable)),
            (6, None),
            (7, None),
            (8, Some(ReceiptStatus::Undeliverable)),
        ] {
            assert_eq!(
                receipt_of(0x04, Some("x".into()), Some(state), b""),
                Some(("x".into(), status)),
                "{state}"
            );
        }
    }

    #[test]
    fn a_message_from_a_handset_is_not_a_receipt() {
        assert_eq!(receipt_of(0x00, None, None, b"hello there"), None);
        // Even one that reads like a receipt: only the SMSC sets the receipt bits.
        assert_eq!(receipt_of(0x00, None, None, b"id:7 stat:DELIVRD"), None);
        assert_eq!(receipt_of(0x00, None, None, &[0xff, 0xfe]), None);
        // A receipt without any id cannot be matched.
        assert_eq!(receipt_of(0x04, None, None, b"stat:DELIVRD"), None);
    }

    #[test]
    fn statuses_map_to_dispatch_classes() {
        let answer = |status| {
            classify(rusmppc::error::Error::UnexpectedResponse {
                response: Box::new(rusmpp::Command::new(
                    status,
                    1,
                    Pdu::SubmitSmResp(Default::default()),
                )),
            })
        };
        assert_eq!(
            answer(CommandStatus::EsmeRthrottled),
            SubmitError::Throttled { retry_after: None }
        );
        assert_eq!(
            answer(CommandStatus::EsmeRmsgqful),
            SubmitError::Throttled { retry_after: None }
        );
        assert_eq!(
            answer(CommandStatus::EsmeRinvdstadr),
            SubmitError::Permanent {
                reason: FailureKind::Status(0x0B)
            }
        );
        assert_eq!(
            answer(CommandStatus::EsmeRsyserr),
            SubmitError::Temporary {
                reason: FailureKind::Status(0x08)
            }
        );
    }

    #[test]
    fn senders_are_numbers_or_names() {
        assert_eq!(
            source_address("+3912345"),
            (Ton::International, Npi::Isdn, "3912345")
        );
        assert_eq!(
            source_address("otpgate"),
            (Ton::Alphanumeric, Npi::Unknown, "otpgate")
        );
    }
}

//! A simulated SMSC: an SMPP 3.4 server that behaves as a scenario carrier does over HTTP (see
//! [`crate::carriers`]), on the SMPP wire.
//!
//! - **Binds**: `bind_transmitter`, `bind_receiver` and `bind_transceiver`, checked against
//!   one `system_id` and `password` (`ESME_RINVSYSID`, `ESME_RINVPASWD`); a second bind on a
//!   connection is `ESME_RALYBND`, a `submit_sm` before a transmitting bind `ESME_RINVBNDSTS`.
//!   `enquire_link` and `unbind` are answered (the connection closes after `unbind_resp`).
//! - **Garbage**: a PDU whose length is plausible but whose body rusmpp cannot read gets a
//!   `generic_nack` (`ESME_RINVCMDID` for an unknown command, else `ESME_RINVCMDLEN`) and the
//!   connection goes on; a length below 16 octets or above the maximum gets a `generic_nack` and
//!   the connection closes, since the stream has no PDU boundary left to trust.
//! - **Submits**: each `submit_sm` is one segment for capacity and billing, judged with the HTTP
//!   carriers' draws (`network::judge`: the token bucket shared by all binds, then
//!   failure and refusal rates) and answered after its latency without holding up the others:
//!   `ESME_RTHROTTLED` above capacity, `ESME_RSYSERR` for a failure, `ESME_RINVDSTADR` for a
//!   refusal, else a message id: upper-case hex, zero-padded (`00000A1F`), unique per simulator.
//!   Text is read by [`gateway::sms_wire::decode`], from `short_message` or the
//!   `message_payload` TLV; a concatenated message (UDH, or the SAR TLVs) is reassembled in
//!   order, keyed by source, destination and reference (one `system_id` per simulator), and an
//!   incomplete one is dropped after a minute.
//! - **Outages**: while the timeline says `down`, new connections are closed at once and a PDU
//!   arriving on an open one closes it without an answer (HTTP carriers drop connections so too).
//! - **Receipts**: when the `submit_sm` asked for one (`registered_delivery`), a `deliver_sm`
//!   after the receipt delay, on any receiver or transceiver bind (held, up to a bound, until one
//!   binds): `esm_class` 0x04, `receipted_message_id` and `message_state` TLVs and/or the
//!   `id:… stat:DELIVRD …` text, as the carrier's `receipt_format` says. By default the id is
//!   quoted lower-case without leading zeros (`a1f`), so the gateway must normalise ids.
//! - **Handsets**: a whole message is handed to its user's handset once
//!   ([`Network::hand_over`]); duplicates are told by destination and text.
//!
//! The text of an SMS carries its code: nothing here logs it. Tests can read every message
//! reassembled through [`SmscSettings::messages`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use rusmpp::pdus::{
    BindReceiverResp, BindTransceiverResp, BindTransmitterResp, DeliverSm, SubmitSm, SubmitSmResp,
};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{DataCoding, EsmClass, MessageState};
use rusmpp::{Command, CommandId, CommandStatus, Pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::carriers::network::{
    Bucket, CapacityRule, CarrierCounts, Network, SmsKey, Verdict, judge,
};
use crate::carriers::settings::{
    Carrier as CarrierSettings, Protocol, ReceiptFormat, ReceiptIds, Smpp,
};

/// The largest PDU read by default (rusmpp's default too): a `submit_sm` with a full
/// `short_message` and some TLVs is well under it.
pub const DEFAULT_MAX_PDU_LEN: usize = 8192;
/// The `system_id` the simulator gives in its bind answers.
const SMSC_SYSTEM_ID: &str = "otpgate-sim";
/// Connections open at once; more are closed at once.
const MAX_CONNECTIONS: usize = 4096;
/// PDUs queued for one connection's writer.
const WRITE_QUEUE: usize = 4096;
/// Receipts held while no receiver is bound; more are lost (counted).
const MAX_HELD_RECEIPTS: usize = 100_000;
/// Concatenated messages being reassembled; more parts are dropped (counted incomplete).
const MAX_PARTIAL: usize = 100_000;
/// How long the parts of a concatenated message wait for the rest.
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The credentials a simulator accepts in binds.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub system_id: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("system_id", &self.system_id)
            .field("password", &"**REDACTED**")
            .finish()
    }
}

/// How one simulator behaves.
#[derive(Debug, Clone)]
pub struct SmscSettings {
    /// Where it listens (port 0 picks one).
    pub listen: SocketAddr,
    pub login: Login,
    /// Capacity, latency, failures, receipt delay and outages over time (the scenario
    /// carrier's `listen` is not used: `listen` above is).
    pub carrier: CarrierSettings,
    /// Codings and receipt format.
    pub smpp: Smpp,
    /// The moment the carrier's timeline counts from.
    pub started: Instant,
    /// The largest PDU read (`command_length`).
    pub max_pdu_len: usize,
    /// How the carrier's capacity is counted (all binds share it).
    pub capacity_rule: CapacityRule,
    /// Every whole message handed over, for tests; a message that finds the channel full is
    /// not sent to it (the counts still have it).
    pub messages: Option<mpsc::Sender<SmscMessage>>,
}

/// A whole message as the simulator reassembled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmscMessage {
    pub destination: String,
    pub text: String,
    /// The `data_coding` of its (first) part, as received.
    pub data_coding: u8,
    /// How many `submit_sm` it took.
    pub parts: u8,
}

/// A running simulator; it stops when the `stop` token given to [`start`] fires.
#[derive(Debug)]
pub struct SimSmsc {
    addr: SocketAddr,
    smsc: Arc<Smsc>,
}

/// What a standalone simulator did (`loadgen smsc` prints it as one JSON line). Times are
/// milliseconds from the first bind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub binds: u64,
    pub submit_sm: u64,
    pub accepted: u64,
    pub throttled: u64,
    pub messages: u64,
    pub duplicates: u64,
    pub receipts_sent: u64,
    pub receipts_acked: u64,
    pub decode_errors: u64,
    pub first_submit_ms: Option<u64>,
    pub last_message_ms: Option<u64>,
    /// Mean time from reading a `submit_sm` to writing its answer, in microseconds: the
    /// latency the simulator really gave (its timer answers a little later than asked).
    pub mean_answer_micros: Option<u64>,
    /// The longest such time.
    pub max_answer_micros: Option<u64>,
    /// Messages a second between the 10% and the 90% marks of the messages (by arrival): the
    /// steady rate, without the start (windows filling) and the end (the queue running dry).
    /// `None` under ten messages.
    pub steady_messages_per_sec: Option<f64>,
}

impl SmscSettings {
    /// A scenario carrier's simulator, its login made up where the scenario leaves it out.
    pub fn from_carrier(carrier: &CarrierSettings, started: Instant) -> SmscSettings {
        let smpp = match &carrier.protocol {
            Protocol::Smpp(smpp) => smpp.clone(),
            Protocol::Http => Smpp::default(),
        };
        let system_id = smpp.system_id.clone().unwrap_or_else(|| {
            // At most 15 characters, as SMPP allows.
            carrier.name.chars().take(15).collect()
        });
        let password = smpp
            .password
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
        SmscSettings {
            listen: carrier.listen,
            login: Login {
                system_id,
                password,
            },
            carrier: carrier.clone(),
            smpp,
            started,
            max_pdu_len: DEFAULT_MAX_PDU_LEN,
            capacity_rule: CapacityRule::default(),
            messages: None,
        }
    }
}

impl SimSmsc {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn login(&self) -> &Login {
        &self.smsc.settings.login
    }

    pub fn counts(&self) -> &Arc<CarrierCounts> {
        &self.smsc.counts
    }

    pub fn summary(&self) -> Summary {
        let counts = &self.smsc.counts;
        let smpp = &counts.smpp;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let first_bind = load(&self.smsc.first_bind_ms);
        let since_bind = |at: u64| (at != NEVER).then(|| at.saturating_sub(first_bind));
        let (mean_answer_micros, max_answer_micros) = self.smsc.answer_times.mean_and_max();
        Summary {
            binds: load(&smpp.binds),
            submit_sm: load(&smpp.submit_sm),
            accepted: load(&counts.accepted),
            throttled: load(&counts.throttled),
            messages: load(&smpp.messages),
            duplicates: load(&smpp.duplicates),
            receipts_sent: load(&smpp.deliver_sm),
            receipts_acked: load(&counts.receipts_sent),
            decode_errors: load(&smpp.decode_errors),
            first_submit_ms: since_bind(load(&self.smsc.first_submit_ms)),
            last_message_ms: since_bind(load(&self.smsc.last_message_ms)),
            mean_answer_micros,
            max_answer_micros,
            steady_messages_per_sec: steady_rate(&Smsc::lock(&self.smsc.message_micros)),
        }
    }
}

/// Messages waiting to be written by [`write_messages_file`] (`loadgen smsc --messages-file`);
/// one that finds the channel full is left out of the file (the summary's `messages` has it).
pub const MESSAGES_FILE_QUEUE: usize = 1 << 16;

/// Writes one line `UNIX_MICROS DESTINATION` to `file` for every message on `messages` (a
/// simulator's [`SmscSettings::messages`]); the text, which holds the code, is left out. Lines are
/// flushed whenever none is waiting so that a reader sees each one soon, until `done` fires
/// and what is queued has been written (or every sender is gone). Returns the lines written.
///
/// # Errors
///
/// Writing to the file failed.
pub async fn write_messages_file(
    file: tokio::fs::File,
    mut messages: mpsc::Receiver<SmscMessage>,
    done: CancellationToken,
) -> std::io::Result<u64> {
    let mut out = tokio::io::BufWriter::new(file);
    let mut written = 0;
    loop {
        let message = tokio::select! {
            biased;
            message = messages.recv() => message,
            () = done.cancelled() => None,
        };
        let Some(message) = message else {
            break;
        };
        out.write_all(message_line(&message).as_bytes()).await?;
        written += 1;
        if messages.is_empty() {
            out.flush().await?;
        }
    }
    while let Ok(message) = messages.try_recv() {
        out.write_all(message_line(&message).as_bytes()).await?;
        written += 1;
    }
    out.flush().await?;
    Ok(written)
}

/// `UNIX_MICROS DESTINATION\n`: the moment it was written and the number it went to.
fn message_line(message: &SmscMessage) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    format!("{micros} {}\n", message.destination)
}

/// The rate between the 10% and the 90% marks of `at` (microseconds, in arrival order).
fn steady_rate(at: &[u64]) -> Option<f64> {
    if at.len() < 10 {
        return None;
    }
    let (low, high) = (at.len() / 10, at.len() * 9 / 10);
    let span = at[high].saturating_sub(at[low]);
    (span > 0).then(|| (high - low) as f64 / (span as f64 / 1e6))
}

/// Starts a simulator listening on `settings.listen`; it stops when `stop` fires.
///
/// # Errors
///
/// The address cannot be listened on.
pub async fn start(
    settings: SmscSettings,
    network: Arc<Network>,
    stop: CancellationToken,
) -> std::io::Result<SimSmsc> {
    let listener = TcpListener::bind(settings.listen).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!(
                "SMSC {}: cannot listen on {}: {error}",
                settings.carrier.name, settings.listen
            ),
        )
    })?;
    let addr = listener.local_addr()?;
    let smsc = Arc::new(Smsc {
        bucket: Mutex::new(Bucket::with_rule(
            settings.carrier.base.capacity_per_sec,
            settings.capacity_rule,
        )),
        settings,
        network,
        counts: Arc::new(CarrierCounts::default()),
        next_id: AtomicU64::new(1),
        next_session: AtomicU64::new(1),
        next_sequence: AtomicU32::new(1),
        receivers: Mutex::new(Receivers::default()),
        held: Mutex::new(VecDeque::new()),
        partial: Mutex::new(HashMap::new()),
        connections: AtomicU64::new(0),
        stop: stop.clone(),
        epoch: Instant::now(),
        first_bind_ms: AtomicU64::new(NEVER),
        first_submit_ms: AtomicU64::new(NEVER),
        last_message_ms: AtomicU64::new(NEVER),
        answer_times: AnswerTimes::default(),
        message_micros: Mutex::new(Vec::new()),
    });
    tokio::spawn(serve(listener, smsc.clone(), stop.clone()));
    tokio::spawn(sweep(smsc.clone(), stop));
    Ok(SimSmsc { addr, smsc })
}

/// Not yet: the marker of a time never recorded.
const NEVER: u64 = u64::MAX;

#[derive(Debug)]
struct Smsc {
    settings: SmscSettings,
    network: Arc<Network>,
    counts: Arc<CarrierCounts>,
    bucket: Mutex<Bucket>,
    next_id: AtomicU64,
    next_session: AtomicU64,
    /// Sequence numbers of the `deliver_sm` the simulator sends (unique on every bind).
    next_sequence: AtomicU32,
    receivers: Mutex<Receivers>,
    /// Receipts due while no receiver was bound.
    held: Mutex<VecDeque<Receipt>>,
    partial: Mutex<HashMap<PartsKey, Partial>>,
    connections: AtomicU64,
    stop: CancellationToken,
    epoch: Instant,
    first_bind_ms: AtomicU64,
    first_submit_ms: AtomicU64,
    last_message_ms: AtomicU64,
    answer_times: AnswerTimes,
    /// When each whole message arrived, in microseconds from `epoch` (the first
    /// `MAX_MESSAGE_TIMES`), for the summary's steady rate.
    message_micros: Mutex<Vec<u64>>,
}

/// The most message arrival times kept (8 bytes each).
const MAX_MESSAGE_TIMES: usize = 1_000_000;

/// The receiver and transceiver binds, by session, taken in turn for receipts.
#[derive(Debug, Default)]
struct Receivers {
    binds: Vec<(u64, mpsc::Sender<Outgoing>)>,
    next: usize,
}

/// A receipt due: what its `deliver_sm` says.
#[derive(Debug, Clone)]
struct Receipt {
    message_id: u64,
    /// The handset: the receipt's source.
    handset: String,
    /// The ESME's source address: the receipt's destination.
    sender: String,
    submitted: std::time::SystemTime,
    delivered: bool,
    /// The first 20 characters of the part's text (the receipt text quotes them).
    text_start: String,
}

/// The parts of one concatenated message (the simulator has one `system_id`, so it is not in
/// the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PartsKey {
    source: String,
    destination: String,
    reference: u16,
    total: u8,
}

#[derive(Debug)]
struct Partial {
    parts: Vec<Option<String>>,
    data_coding: u8,
    delivered: bool,
    since: Instant,
}

impl Smsc {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn mark_first(&self, at: &AtomicU64) {
        let _ = at.compare_exchange(NEVER, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn is_down(&self) -> bool {
        self.settings
            .carrier
            .state_at(self.settings.started.elapsed())
            .down
    }

    fn sequence(&self) -> u32 {
        // Sequence numbers run from 1 to 0x7FFFFFFF.
        self.next_sequence.fetch_add(1, Ordering::Relaxed) % 0x7FFF_FFFF + 1
    }

    /// The id a `submit_sm_resp` gives, and the one its receipt quotes.
    fn ids(&self, id: u64) -> (String, String) {
        let full = format!("{id:08X}");
        let quoted = match self.settings.smpp.receipt_ids {
            ReceiptIds::Same => full.clone(),
            ReceiptIds::Short => format!("{id:x}"),
        };
        (full, quoted)
    }
}

async fn serve(listener: TcpListener, smsc: Arc<Smsc>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if smsc.is_down() {
            smsc.counts.dropped.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        if smsc.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS as u64 {
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        smsc.connections.fetch_add(1, Ordering::Relaxed);
        let smsc = smsc.clone();
        let kill = stop.child_token();
        tokio::spawn(async move {
            connection(stream, &smsc, kill).await;
            smsc.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Drops concatenated messages that waited too long for their parts.
async fn sweep(smsc: Arc<Smsc>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let mut partial = Smsc::lock(&smsc.partial);
        let before = partial.len();
        partial.retain(|_, message| message.since.elapsed() < REASSEMBLY_TIMEOUT);
        let dropped = (before - partial.len()) as u64;
        smsc.counts
            .smpp
            .incomplete
            .fetch_add(dropped, Ordering::Relaxed);
    }
}

/// What kind of bind a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    Transmitter,
    Receiver,
    Transceiver,
}

impl Bound {
    fn submits(self) -> bool {
        matches!(self, Bound::Transmitter | Bound::Transceiver)
    }

    fn receives(self) -> bool {
        matches!(self, Bound::Receiver | Bound::Transceiver)
    }
}

/// One ESME connection: a reader (this task), a writer task fed by a channel, and a task per
/// `submit_sm` in flight, so one slow answer holds up no other.
async fn connection(stream: TcpStream, smsc: &Arc<Smsc>, kill: CancellationToken) {
    let (read, write) = stream.into_split();
    let (out, queue) = mpsc::channel::<Outgoing>(WRITE_QUEUE);
    let writer_smsc = smsc.clone();
    let writer_kill = kill.clone();
    let writer =
        tokio::spawn(async move { write_all(write, queue, &writer_smsc, writer_kill).await });
    let mut frames = FramedRead::new(read, PduCodec::new(smsc.settings.max_pdu_len));
    let session = smsc.next_session.fetch_add(1, Ordering::Relaxed);
    let mut bound: Option<Bound> = None;
    loop {
        let next = tokio::select! {
            () = kill.cancelled() => break,
            next = frames.next() => next,
        };
        let Some(Ok(frame)) = next else {
            break;
        };
        let read_at = Instant::now();
        if smsc.is_down() {
            // Down: the connection drops without an answer.
            smsc.counts.dropped.fetch_add(1, Ordering::Relaxed);
            kill.cancel();
            break;
        }
        let command = match frame {
            Frame::Command(command) => command,
            Frame::Garbage {
                sequence_number,
                status,
                fatal,
            } => {
                smsc.counts
                    .smpp
                    .decode_errors
                    .fetch_add(1, Ordering::Relaxed);
                let nack = Command::new(status, sequence_number, Pdu::GenericNack);
                let _ = out.send(nack.into()).await;
                if fatal {
                    break;
                }
                continue;
            }
        };
        let sequence_number = command.sequence_number();
        let answer = |status: CommandStatus, pdu: Pdu| Command::new(status, sequence_number, pdu);
        if let Some((kind, status, resp)) = smsc.bind(bound, command.pdu()) {
            let _ = out.send(answer(status, resp).into()).await;
            if status == CommandStatus::EsmeRok {
                bound = Some(kind);
                if kind.receives() {
                    // After the bind's answer, which is queued already.
                    smsc.add_receiver(session, &out);
                }
            }
            continue;
        }
        match command.pdu() {
            Some(Pdu::EnquireLink) => {
                let _ = out
                    .send(answer(CommandStatus::EsmeRok, Pdu::EnquireLinkResp).into())
                    .await;
            }
            Some(Pdu::Unbind) => {
                let _ = out
                    .send(answer(CommandStatus::EsmeRok, Pdu::UnbindResp).into())
                    .await;
                break;
            }
            Some(Pdu::SubmitSm(submit)) => {
                if !bound.is_some_and(Bound::submits) {
                    let resp = SubmitSmResp::new(COctetString::empty(), Vec::new());
                    let _ = out
                        .send(answer(CommandStatus::EsmeRinvbndsts, resp.into()).into())
                        .await;
                    continue;
                }
                tokio::spawn(submit_sm(
                    smsc.clone(),
                    submit.clone(),
                    Request {
                        sequence_number,
                        read_at,
                    },
                    out.clone(),
                    kill.clone(),
                ));
            }
            _ if command.id() == CommandId::DeliverSmResp => {
                let counts = &smsc.counts;
                if command.status() == CommandStatus::EsmeRok {
                    counts.receipts_sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
                    counts.smpp.receipts_nacked.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ if command.id().is_response() => {}
            _ => {
                // Requests the simulator does not serve (query_sm, data_sm, …).
                let _ = out
                    .send(answer(CommandStatus::EsmeRinvcmdid, Pdu::GenericNack).into())
                    .await;
            }
        }
    }
    smsc.remove_receiver(session);
    drop(out);
    // The writer sends what is queued (answers still in flight come first) and ends when every
    // sender is gone, or at once on `kill`.
    let _ = writer.await;
}

/// A PDU for a connection's writer.
#[derive(Debug)]
struct Outgoing {
    command: Command,
    /// For the answer to a `submit_sm`: when the `submit_sm` was read (for the answer time).
    submit_read: Option<Instant>,
}

impl Outgoing {
    fn answer(command: Command, submit_read: Instant) -> Outgoing {
        Outgoing {
            command,
            submit_read: Some(submit_read),
        }
    }
}

impl From<Command> for Outgoing {
    fn from(command: Command) -> Outgoing {
        Outgoing {
            command,
            submit_read: None,
        }
    }
}

/// A `submit_sm` as the reader got it.
#[derive(Debug, Clone, Copy)]
struct Request {
    sequence_number: u32,
    read_at: Instant,
}

/// Writes queued PDUs, coalescing what is ready into one write, and records how long each
/// `submit_sm` took from being read to its answer being written.
async fn write_all(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
    smsc: &Smsc,
    kill: CancellationToken,
) {
    let mut codec = CommandCodec::new();
    let mut buffer = BytesMut::with_capacity(4096);
    let mut answered: Vec<Instant> = Vec::new();
    loop {
        let outgoing = tokio::select! {
            () = kill.cancelled() => return,
            outgoing = queue.recv() => match outgoing {
                Some(outgoing) => outgoing,
                None => break,
            },
        };
        answered.extend(outgoing.submit_read);
        if codec.encode(outgoing.command, &mut buffer).is_err() {
            return;
        }
        while buffer.len() < 64 * 1024 {
            let Ok(outgoing) = queue.try_recv() else {
                break;
            };
            answered.extend(outgoing.submit_read);
            if codec.encode(outgoing.command, &mut buffer).is_err() {
                return;
            }
        }
        if write.write_all(&buffer).await.is_err() {
            return;
        }
        buffer.clear();
        let now = Instant::now();
        for read_at in answered.drain(..) {
            smsc.answer_times
                .record(now.saturating_duration_since(read_at));
        }
    }
    let _ = write.shutdown().await;
}

/// How long the simulator took from reading a `submit_sm` to writing its answer: what the
/// ESME's round trip would be on a network and an ESME that added nothing.
#[derive(Debug, Default)]
struct AnswerTimes {
    count: AtomicU64,
    total_micros: AtomicU64,
    max_micros: AtomicU64,
}

impl AnswerTimes {
    fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_micros.fetch_add(micros, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    /// The mean and the longest, in microseconds (`None` before the first answer).
    fn mean_and_max(&self) -> (Option<u64>, Option<u64>) {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return (None, None);
        }
        let total = self.total_micros.load(Ordering::Relaxed);
        (
            Some(total / count),
            Some(self.max_micros.load(Ordering::Relaxed)),
        )
    }
}

impl Smsc {
    /// For a bind on a connection bound as `bound`: the bind's kind, its answer's status and
    /// its answer. `None` for any other PDU.
    fn bind(&self, bound: Option<Bound>, pdu: Option<&Pdu>) -> Option<(Bound, CommandStatus, Pdu)> {
        let system_id = c_string(SMSC_SYSTEM_ID);
        let (kind, status, resp) = match pdu? {
            Pdu::BindTransmitter(bind) => (
                Bound::Transmitter,
                self.check_bind(bound, &bind.system_id, &bind.password),
                BindTransmitterResp::new(system_id, None).into(),
            ),
            Pdu::BindReceiver(bind) => (
                Bound::Receiver,
                self.check_bind(bound, &bind.system_id, &bind.password),
                BindReceiverResp::new(system_id, None).into(),
            ),
            Pdu::BindTransceiver(bind) => (
                Bound::Transceiver,
                self.check_bind(bound, &bind.system_id, &bind.password),
                BindTransceiverResp::new(system_id, None).into(),
            ),
            _ => return None,
        };
        Some((kind, status, resp))
    }

    /// The status a bind gets on a connection bound as `bound`.
    fn check_bind(
        &self,
        bound: Option<Bound>,
        system_id: &COctetString<1, 16>,
        password: &COctetString<1, 9>,
    ) -> CommandStatus {
        let login = &self.settings.login;
        let status = if bound.is_some() {
            CommandStatus::EsmeRalybnd
        } else if system_id.as_str() != login.system_id {
            CommandStatus::EsmeRinvsysid
        } else if password.as_str() != login.password {
            CommandStatus::EsmeRinvpaswd
        } else {
            CommandStatus::EsmeRok
        };
        if status == CommandStatus::EsmeRok {
            self.mark_first(&self.first_bind_ms);
        }
        let counter = if status == CommandStatus::EsmeRok {
            &self.counts.smpp.binds
        } else {
            &self.counts.smpp.binds_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        status
    }

    fn add_receiver(self: &Arc<Self>, session: u64, out: &mpsc::Sender<Outgoing>) {
        Smsc::lock(&self.receivers)
            .binds
            .push((session, out.clone()));
        // Receipts held while nobody could take them go to this bind now.
        let held: Vec<Receipt> = Smsc::lock(&self.held).drain(..).collect();
        if !held.is_empty() {
            let smsc = self.clone();
            tokio::spawn(async move {
                for receipt in held {
                    smsc.send_receipt(receipt).await;
                }
            });
        }
    }

    fn remove_receiver(&self, session: u64) {
        Smsc::lock(&self.receivers)
            .binds
            .retain(|(id, _)| *id != session);
    }

    /// A receiver bind, taken in turn.
    fn receiver(&self) -> Option<(u64, mpsc::Sender<Outgoing>)> {
        let mut receivers = Smsc::lock(&self.receivers);
        receivers.binds.retain(|(_, out)| !out.is_closed());
        if receivers.binds.is_empty() {
            return None;
        }
        receivers.next = (receivers.next + 1) % receivers.binds.len();
        Some(receivers.binds[receivers.next].clone())
    }

    /// Sends a receipt on a receiver bind, or holds it until one binds.
    async fn send_receipt(&self, receipt: Receipt) {
        let deliver = self.receipt_pdu(&receipt);
        // Each try drops a closed bind, so this ends.
        for _ in 0..8 {
            let Some((session, out)) = self.receiver() else {
                break;
            };
            let command = Command::new(CommandStatus::EsmeRok, self.sequence(), deliver.clone());
            if out.send(command.into()).await.is_ok() {
                self.counts.smpp.deliver_sm.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.remove_receiver(session);
        }
        let mut held = Smsc::lock(&self.held);
        if held.len() < MAX_HELD_RECEIPTS {
            held.push_back(receipt);
        } else {
            self.counts.receipts_failed.fetch_add(1, Ordering::Relaxed);
            self.counts
                .smpp
                .receipts_lost
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A receipt's `deliver_sm`: the TLVs, the text, or both.
    fn receipt_pdu(&self, receipt: &Receipt) -> Pdu {
        let (_, id) = self.ids(receipt.message_id);
        let (stat, err, state) = if receipt.delivered {
            ("DELIVRD", "000", MessageState::Delivered)
        } else {
            ("UNDELIV", "001", MessageState::Undeliverable)
        };
        let format = self.settings.smpp.receipt_format;
        let text = if format == ReceiptFormat::Tlv {
            String::new()
        } else {
            let (submitted, done) = (
                smpp_minute(receipt.submitted),
                smpp_minute(std::time::SystemTime::now()),
            );
            format!(
                "id:{id} sub:001 dlvrd:{} submit date:{submitted} done date:{done} stat:{stat} err:{err} text:{}",
                if receipt.delivered { "001" } else { "000" },
                receipt.text_start
            )
        };
        let mut tlvs = Vec::new();
        if format != ReceiptFormat::Text {
            tlvs.push(
                rusmpp::tlvs::MessageDeliveryRequestTlvValue::ReceiptedMessageId(c_string(&id)),
            );
            tlvs.push(rusmpp::tlvs::MessageDeliveryRequestTlvValue::MessageState(
                state,
            ));
        }
        // The text is ASCII (GSM-7 text quoted by at most 20 characters); anything past 255
        // octets cannot be, but cut it rather than fail.
        let mut octets = text.into_bytes();
        octets.truncate(255);
        let short_message =
            OctetString::from_slice(&octets).unwrap_or_else(|_| OctetString::empty());
        let deliver = DeliverSm::builder()
            .source_addr(address(&receipt.handset))
            .destination_addr(address(&receipt.sender))
            .esm_class(EsmClass::from(0x04))
            .data_coding(DataCoding::McSpecific)
            .short_message(short_message)
            .tlvs(tlvs)
            .build();
        Pdu::DeliverSm(deliver)
    }
}

/// An address for a PDU (at most 20 characters).
fn address(text: &str) -> COctetString<1, 21> {
    c_string(&text.chars().take(20).collect::<String>())
}

/// A C-octet string of `text` (empty if it does not fit).
fn c_string<const MIN: usize, const MAX: usize>(text: &str) -> COctetString<MIN, MAX> {
    COctetString::from_string(text.to_owned()).unwrap_or_else(|_| COctetString::empty())
}

/// `YYMMDDhhmm`, in UTC, as receipts write dates.
fn smpp_minute(at: std::time::SystemTime) -> String {
    // 2024-01-02T03:04:05Z
    let rfc = humantime::format_rfc3339_seconds(at).to_string();
    let digits = |range: std::ops::Range<usize>| rfc.get(range).unwrap_or("00").to_owned();
    [
        digits(2..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
    ]
    .concat()
}

/// The text of a `submit_sm` and where it sits in a concatenated message.
#[derive(Debug)]
struct Text {
    text: String,
    concat: Option<gateway::sms_wire::Concat>,
    data_coding: u8,
}

impl Smsc {
    /// Reads a `submit_sm`'s text with the gateway's decoder, mapping the carrier's own
    /// `data_coding`s for GSM-7 and UCS-2 to the standard ones first.
    fn read_text(&self, submit: &SubmitSm) -> Option<Text> {
        let smpp = &self.settings.smpp;
        let data_coding = u8::from(submit.data_coding);
        let standard = if data_coding == smpp.gsm7_data_coding {
            gateway::sms_wire::DATA_CODING_DEFAULT
        } else if data_coding == smpp.ucs2_data_coding {
            gateway::sms_wire::DATA_CODING_UCS2
        } else {
            data_coding
        };
        let payload = submit.tlvs().iter().find_map(|tlv| match tlv.value() {
            Some(rusmpp::tlvs::TlvValue::MessagePayload(payload)) => Some(&payload.value),
            _ => None,
        });
        let octets: &[u8] = match payload {
            Some(payload) if submit.short_message().is_empty() => payload.as_ref(),
            _ => submit.short_message().as_ref(),
        };
        let decoded = gateway::sms_wire::decode(
            standard,
            u8::from(submit.esm_class),
            octets,
            smpp.gsm7_packed,
        )
        .ok()?;
        // Concatenation by the SAR TLVs instead of a UDH.
        let concat = decoded.concat.or_else(|| sar(submit));
        Some(Text {
            text: decoded.text,
            concat,
            data_coding,
        })
    }
}

/// The `sar_msg_ref_num`, `sar_total_segments` and `sar_segment_seqnum` TLVs, if all are there.
fn sar(submit: &SubmitSm) -> Option<gateway::sms_wire::Concat> {
    use rusmpp::tlvs::TlvValue;
    let (mut reference, mut total, mut seq) = (None, None, None);
    for tlv in submit.tlvs() {
        match tlv.value() {
            Some(TlvValue::SarMsgRefNum(value)) => reference = Some(*value),
            Some(TlvValue::SarTotalSegments(value)) => total = Some(*value),
            Some(TlvValue::SarSegmentSeqnum(value)) => seq = Some(*value),
            _ => {}
        }
    }
    let (reference, total, seq) = (reference?, total?, seq?);
    (total > 0 && (1..=total).contains(&seq)).then_some(gateway::sms_wire::Concat {
        reference,
        total,
        seq,
    })
}

/// One `submit_sm`: judged, answered after its latency, and its text handed over (whole
/// messages) and receipted.
async fn submit_sm(
    smsc: Arc<Smsc>,
    submit: SubmitSm,
    request: Request,
    out: mpsc::Sender<Outgoing>,
    kill: CancellationToken,
) {
    let Request {
        sequence_number,
        read_at,
    } = request;
    let counts = &smsc.counts;
    counts.smpp.submit_sm.fetch_add(1, Ordering::Relaxed);
    smsc.mark_first(&smsc.first_submit_ms);
    let refuse = |status: CommandStatus| {
        let resp = SubmitSmResp::new(COctetString::empty(), Vec::new());
        Outgoing::answer(Command::new(status, sequence_number, resp), read_at)
    };
    let Some(text) = smsc.read_text(&submit) else {
        counts.smpp.decode_errors.fetch_add(1, Ordering::Relaxed);
        let _ = out.send(refuse(CommandStatus::EsmeRsubmitfail)).await;
        return;
    };
    let state = smsc
        .settings
        .carrier
        .state_at(smsc.settings.started.elapsed())
        .clone();
    let (latency, verdict) = judge(&state, &smsc.bucket, counts);
    // The latency counts from the submit_sm's arrival, as the HTTP sink's does.
    tokio::select! {
        () = kill.cancelled() => return,
        () = tokio::time::sleep_until((read_at + latency).into()) => {}
    }
    let (delivery_delay, receipt_delay, delivered, receipt_lost) = match verdict {
        Verdict::Throttled => {
            let _ = out.send(refuse(CommandStatus::EsmeRthrottled)).await;
            return;
        }
        Verdict::Failed => {
            let _ = out.send(refuse(CommandStatus::EsmeRsyserr)).await;
            return;
        }
        Verdict::Refused => {
            let _ = out.send(refuse(CommandStatus::EsmeRinvdstadr)).await;
            return;
        }
        Verdict::Accepted {
            delivery_delay,
            receipt_delay,
            delivered,
            receipt_lost,
        } => (delivery_delay, receipt_delay, delivered, receipt_lost),
    };
    let id = smsc.next_id.fetch_add(1, Ordering::Relaxed);
    let (message_id, _) = smsc.ids(id);
    let resp = SubmitSmResp::new(c_string(&message_id), Vec::new());
    let _ = out
        .send(Outgoing::answer(
            Command::new(CommandStatus::EsmeRok, sequence_number, resp),
            read_at,
        ))
        .await;
    // The connection may close (unbind) while the receipt waits.
    drop(out);
    let source = submit.source_addr.as_str().to_owned();
    let destination = submit.destination_addr.as_str().to_owned();
    let text_start: String = text.text.chars().take(20).collect();
    // An international number travels without its `+`; handsets are keyed by E.164.
    let international = u8::from(submit.dest_addr_ton) == 1 && !destination.starts_with('+');
    let handset = if international {
        format!("+{destination}")
    } else {
        destination.clone()
    };
    smsc.assemble(&source, &handset, text, delivered, delivery_delay);
    let wants_receipt = match u8::from(submit.registered_delivery) & 0x03 {
        1 => true,
        2 => !delivered,
        _ => false,
    };
    if wants_receipt && receipt_lost {
        counts.receipts_withheld.fetch_add(1, Ordering::Relaxed);
    } else if wants_receipt {
        let receipt = Receipt {
            message_id: id,
            handset: destination,
            sender: source,
            submitted: std::time::SystemTime::now(),
            delivered,
            text_start,
        };
        // A receipt outlives its connection: it goes on any receiver bind, or waits for one.
        tokio::select! {
            () = smsc.stop.cancelled() => {}
            // The receipt follows the SMS out of the carrier's queue.
            () = tokio::time::sleep(delivery_delay.saturating_add(receipt_delay)) => {
                smsc.send_receipt(receipt).await;
            }
        }
    }
}

impl Smsc {
    /// Hands a single message over, or files a part and hands the message over once whole;
    /// it leaves for the handset `after` from now (the delivery delay of its last part).
    fn assemble(
        &self,
        source: &str,
        destination: &str,
        text: Text,
        delivered: bool,
        after: Duration,
    ) {
        let Some(concat) = text.concat.filter(|concat| concat.total > 1) else {
            let message = Whole {
                text: &text.text,
                data_coding: text.data_coding,
                parts: 1,
                delivered,
            };
            self.hand_over(destination, &message, after);
            return;
        };
        self.counts.smpp.parts.fetch_add(1, Ordering::Relaxed);
        let key = PartsKey {
            source: source.to_owned(),
            destination: destination.to_owned(),
            reference: concat.reference,
            total: concat.total,
        };
        let whole = {
            let mut partial = Smsc::lock(&self.partial);
            if !partial.contains_key(&key) && partial.len() >= MAX_PARTIAL {
                self.counts.smpp.incomplete.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let message = partial.entry(key.clone()).or_insert_with(|| Partial {
                parts: vec![None; usize::from(concat.total)],
                data_coding: text.data_coding,
                delivered: true,
                since: Instant::now(),
            });
            message.delivered &= delivered;
            if let Some(slot) = message.parts.get_mut(usize::from(concat.seq) - 1) {
                *slot = Some(text.text);
            }
            if message.parts.iter().all(Option::is_some) {
                partial.remove(&key)
            } else {
                None
            }
        };
        if let Some(message) = whole {
            let text: String = message.parts.into_iter().flatten().collect();
            let whole = Whole {
                text: &text,
                data_coding: message.data_coding,
                parts: concat.total,
                delivered: message.delivered,
            };
            self.hand_over(destination, &whole, after);
        }
    }

    fn hand_over(&self, destination: &str, message: &Whole<'_>, after: Duration) {
        let &Whole {
            text,
            data_coding,
            parts,
            delivered,
        } = message;
        let smpp = &self.counts.smpp;
        smpp.messages.fetch_add(1, Ordering::Relaxed);
        if self
            .network
            .hand_over(destination, text, SmsKey::Text, delivered, after)
        {
            smpp.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        self.last_message_ms.store(self.now_ms(), Ordering::Relaxed);
        {
            let mut times = Smsc::lock(&self.message_micros);
            if times.len() < MAX_MESSAGE_TIMES {
                times.push(u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
        }
        if let Some(messages) = &self.settings.messages {
            let _ = messages.try_send(SmscMessage {
                destination: destination.to_owned(),
                text: text.to_owned(),
                data_coding,
                parts,
            });
        }
    }
}

/// A whole message, ready to be handed over.
#[derive(Debug)]
struct Whole<'a> {
    text: &'a str,
    data_coding: u8,
    /// How many `submit_sm` it took.
    parts: u8,
    /// Whether every part was accepted as deliverable.
    delivered: bool,
}

/// What the reader gets: a PDU, or octets that are not one.
#[derive(Debug)]
enum Frame {
    Command(Box<Command>),
    Garbage {
        sequence_number: u32,
        status: CommandStatus,
        /// The stream has no PDU boundary left to trust: close after the `generic_nack`.
        fatal: bool,
    },
}

/// rusmpp's [`CommandCodec`] one PDU at a time: the length is checked here and each PDU's
/// octets are decoded on their own, so a PDU rusmpp cannot read is answered (with its sequence
/// number) and the next one read, where the codec alone would end the stream.
#[derive(Debug)]
struct PduCodec {
    max_len: usize,
}

impl PduCodec {
    fn new(max_len: usize) -> PduCodec {
        PduCodec {
            max_len: max_len.max(16),
        }
    }
}

fn be_u32(octets: &[u8], at: usize) -> u32 {
    octets
        .get(at..at + 4)
        .and_then(|slice| <[u8; 4]>::try_from(slice).ok())
        .map_or(0, u32::from_be_bytes)
}

impl Decoder for PduCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        if src.len() < 4 {
            return Ok(None);
        }
        let length = be_u32(src, 0) as usize;
        if !(16..=self.max_len).contains(&length) {
            let sequence_number = be_u32(src, 12);
            src.clear();
            return Ok(Some(Frame::Garbage {
                sequence_number,
                status: CommandStatus::EsmeRinvcmdlen,
                fatal: true,
            }));
        }
        if src.len() < length {
            src.reserve(length - src.len());
            return Ok(None);
        }
        let mut pdu = src.split_to(length);
        let command_id = CommandId::from(be_u32(&pdu, 4));
        let sequence_number = be_u32(&pdu, 12);
        let decoded = CommandCodec::new()
            .without_max_length()
            .decode(&mut pdu)
            .ok()
            .flatten();
        Ok(Some(match decoded {
            Some(command) if !matches!(command.pdu(), Some(Pdu::Other { .. })) => {
                Frame::Command(Box::new(command))
            }
            _ => Frame::Garbage {
                sequence_number,
                status: if matches!(command_id, CommandId::Other(_)) {
                    CommandStatus::EsmeRinvcmdid
                } else {
                    CommandStatus::EsmeRinvcmdlen
                },
                fatal: false,
            },
        }))
    }
}

#[cfg(test)]
mod tests;

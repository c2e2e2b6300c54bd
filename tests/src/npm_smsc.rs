//! An independent SMSC for SMPP interoperability tests: `tests/interop/npm-smsc/smsc.js`, built
//! on the npm `smpp` package, run by node as a child process the test owns (dropping it kills
//! the process).
//!
//! The package encodes and decodes every PDU itself, text included (GSM 03.38 for data_coding
//! 0 and 1, UCS-2 for 8), so what it reports is what a peer nobody on this team wrote made of
//! our bytes. The script prints one JSON object per line; [`NpmSmsc`] collects them as
//! [`serde_json::Value`]s, in order:
//!
//! | `event` | fields |
//! | --- | --- |
//! | `listening` | `port` |
//! | `connect` | `session`, `remote_port` |
//! | `bind` | `session`, `command` (`bind_transceiver`, …), `system_id`, `system_type`, `interface_version`, `status` (0, or 0x0E bad password, 0x0F bad system_id, 0x05 already bound) |
//! | `submit` | `session`, `seq`, `status`, `message_id` (null unless status 0), `service_type`, `source_addr`, `source_addr_ton`, `source_addr_npi`, `destination_addr`, `dest_addr_ton`, `dest_addr_npi`, `data_coding`, `esm_class`, `registered_delivery`, `short_message_hex`, `in_message_payload`, `udh` (`{ref, total, seq}` or null), `sar` (the same from SAR TLVs, or null), `text` (the package's decoding of this part; null if it left bytes) |
//! | `message` | `source_addr`, `destination_addr`, `text` (whole, parts joined in seq order), `parts`, `data_coding`, `message_ids`, `ref` (concatenated only): once every part of an accepted message is in |
//! | `handset` | the same fields: when that message reaches the handset, [`NpmSmscOptions::delivery_delay`] after the `submit_sm_resp` of its last part |
//! | `receipt_queued` | `message_id`: no receiver or transceiver of its system_id is bound yet |
//! | `receipt_sent` | `session`, `seq`, `message_id` (as the submit_sm_resp gave it), `receipt_id` (as the receipt gives it), `receipts` |
//! | `receipt_acked` | `session`, `message_id`, `command` (`deliver_sm_resp` or `generic_nack`), `status` |
//! | `enquire_link`, `unbind` | `session` |
//! | `close` | `session`, `system_id` |
//! | `error` | `error`, and context: anything odd the SMSC saw (it never exits on bad input) |
//! | `exit` | `reason` |
//!
//! Statuses are numbers (`88` is ESME_RTHROTTLED 0x58). Receipts go out about 20 ms after the
//! SMS reaches the handset (the delivery delay and 20 ms after the `submit_sm_resp`), for
//! accepted submits whose `registered_delivery & 3 == 1`, round-robin over the receiver and
//! transceiver sessions of the submit's system_id. The password is never printed.
//!
//! Everything here is blocking std code usable from `#[test]` and `#[tokio::test]`, except
//! that in a `#[tokio::test]` whose runtime also runs the gateway the waiting must not block
//! that runtime: use [`NpmSmsc::wait_for_async`] there, not [`NpmSmsc::wait_for`].
//!
//! [`require_npm_smsc`] lets a test skip where node or the package is not installed, unless
//! `OTPGATE_REQUIRE_INTEROP=1` (as in CI) makes that a failure. To run these tests locally:
//! `npm ci --prefix tests/interop/npm-smsc`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the script has to print `listening` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NpmSmsc::stop`] waits for the script to exit once its stdin is closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`NpmSmsc::wait_for_async`] looks again.
const ASYNC_POLL: Duration = Duration::from_millis(5);

/// How the SMSC reports deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Receipts {
    /// A `deliver_sm` with esm_class 0x04, the standard receipt text, and the
    /// `receipted_message_id` and `message_state` TLVs.
    #[default]
    Tlv,
    /// The same `deliver_sm` with the receipt text only, no TLVs.
    Text,
    /// No receipts at all.
    None,
}

/// The form of the message ids the SMSC hands out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdFormat {
    /// `submit_sm_resp` says `0000A1F3` (uppercase hex, zero-padded to 8); its receipt says
    /// `a1f3` (lowercase, no leading zeros), in the text and the TLV alike, as some SMSCs do.
    #[default]
    Hex,
    /// Decimal ids (`4711001`), the same in the `submit_sm_resp` and the receipt.
    Decimal,
}

/// How to run an [`NpmSmsc`]. Its `Default`: system_id `otpgate`, password `secret12`, every
/// submit accepted, receipts with TLVs, hex ids, SMS on the handset at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpmSmscOptions {
    /// The system_id a bind must give, else ESME_RINVSYSID (0x0F).
    pub system_id: String,
    /// The password a bind must give, else ESME_RINVPASWD (0x0E).
    pub password: String,
    /// Answer the first this many `submit_sm` with ESME_RTHROTTLED (0x58).
    pub throttle_first: u32,
    /// Answer the next this many (after the throttled ones) with ESME_RMSGQFUL (0x14).
    pub qfull_first: u32,
    pub receipts: Receipts,
    pub id_format: IdFormat,
    /// How long an accepted message waits in the SMSC's own queue before it reaches the
    /// handset (its `handset` event, [`NpmSmsc::handset_code_for`]); its receipts go out 20 ms
    /// after that. An operator that accepts at once and delivers late. Whole milliseconds, up
    /// to 2^31 - 21 of them.
    pub delivery_delay: Duration,
}

impl Default for NpmSmscOptions {
    fn default() -> NpmSmscOptions {
        NpmSmscOptions {
            system_id: "otpgate".to_owned(),
            password: "secret12".to_owned(),
            throttle_first: 0,
            qfull_first: 0,
            receipts: Receipts::Tlv,
            id_format: IdFormat::Hex,
            delivery_delay: Duration::ZERO,
        }
    }
}

/// The npm SMSC, running as node's child on `127.0.0.1`, owned by the test.
#[derive(Debug)]
pub struct NpmSmsc {
    options: NpmSmscOptions,
    port: u16,
    /// `None` once killed or stopped.
    child: Option<Child>,
    /// Its stdin: the script exits when this closes (so a test that dies leaves no node behind).
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
}

/// What the reader threads collected.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Output>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Output {
    events: Vec<Value>,
    stderr: Vec<String>,
    /// Whether the current process's stdout has ended (it exited, or is about to).
    ended: bool,
    /// Which launch is the current one: a reader of an earlier process's stdout that ends late
    /// does not mark the current one ended.
    launch: u64,
}

// === impl NpmSmsc ===

impl NpmSmsc {
    /// Starts the SMSC on a free port and waits (up to 10 s) until it listens. Panics if node or
    /// the package is missing (check [`require_npm_smsc`] first) or the script does not start.
    pub fn start(options: NpmSmscOptions) -> NpmSmsc {
        let mut smsc = NpmSmsc {
            options,
            port: 0,
            child: None,
            stdin: None,
            shared: Arc::new(Shared::default()),
        };
        smsc.launch(0);
        smsc
    }

    /// Starts it with the default options.
    pub fn start_default() -> NpmSmsc {
        NpmSmsc::start(NpmSmscOptions::default())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    pub fn options(&self) -> &NpmSmscOptions {
        &self.options
    }

    /// The process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every event so far, in order (across restarts).
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// The events of this kind (`"submit"`, `"bind"`, …) so far.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        events_of(&self.lock().events, kind)
    }

    /// Every `submit` event (one per `submit_sm`, whatever its answer).
    pub fn submits(&self) -> Vec<Value> {
        self.events_of("submit")
    }

    /// Every `message` event: whole messages, concatenated parts joined.
    pub fn messages(&self) -> Vec<Value> {
        self.events_of("message")
    }

    /// Every `handset` event: whole messages, as they reached their handsets.
    pub fn handsets(&self) -> Vec<Value> {
        self.events_of("handset")
    }

    /// The code ([`crate::extract_code`]) in the latest message that has reached the handset
    /// of `phone` (`+39…`; the SMSC's `destination_addr` has no `+`), if any has yet.
    pub fn handset_code_for(&self, phone: &str) -> Option<String> {
        let number = phone.trim_start_matches('+');
        let output = self.lock();
        output
            .events
            .iter()
            .rev()
            .find(|event| event["event"] == "handset" && event["destination_addr"] == number)
            .and_then(|event| crate::extract_code(event["text"].as_str()?))
    }

    pub fn binds(&self) -> Vec<Value> {
        self.events_of("bind")
    }

    /// Every `error` event: an interop test usually wants none.
    pub fn errors(&self) -> Vec<Value> {
        self.events_of("error")
    }

    /// The events and the script's stderr, for a failure message.
    pub fn dump(&self) -> String {
        dump(&self.lock())
    }

    /// Blocks until `done(events)` holds, and returns the events then. Panics with the dump if
    /// it does not within `timeout`, or if the process ended first. Do not call it from a
    /// `#[tokio::test]` whose runtime also runs the gateway: use [`NpmSmsc::wait_for_async`].
    pub fn wait_for(&self, done: impl Fn(&[Value]) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut output = self.lock();
        loop {
            if done(&output.events) {
                return output.events.clone();
            }
            if output.ended {
                panic!(
                    "the npm SMSC exited before the awaited events\n{}",
                    dump(&output)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "the awaited npm SMSC events did not come within {timeout:?}\n{}",
                    dump(&output)
                );
            }
            output = self
                .shared
                .changed
                .wait_timeout(output, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// [`NpmSmsc::wait_for`] for async tests: it sleeps on the tokio timer between looks, so
    /// the gateway running on the same runtime goes on meanwhile.
    pub async fn wait_for_async(
        &self,
        done: impl Fn(&[Value]) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let output = self.lock();
                if done(&output.events) {
                    return output.events.clone();
                }
                if output.ended {
                    panic!(
                        "the npm SMSC exited before the awaited events\n{}",
                        dump(&output)
                    );
                }
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "the awaited npm SMSC events did not come within {timeout:?}\n{}",
                        dump(&output)
                    );
                }
            }
            tokio::time::sleep(ASYNC_POLL).await;
        }
    }

    /// Waits until at least `n` `message` events are in; returns the `message` events.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let events = self.wait_for(|events| events_of(events, "message").len() >= n, timeout);
        events_of(&events, "message")
    }

    /// [`NpmSmsc::wait_for_messages`] for async tests.
    pub async fn wait_for_messages_async(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let events = self
            .wait_for_async(|events| events_of(events, "message").len() >= n, timeout)
            .await;
        events_of(&events, "message")
    }

    /// Whether the process is still alive (one that has exited is reaped).
    pub fn is_running(&mut self) -> bool {
        crate::process::still_running(&mut self.child)
    }

    /// Kills the process with SIGKILL and waits for it: the SMSC crashes, every connection
    /// drops. Does nothing if it is not running.
    pub fn kill(&mut self) {
        self.stdin = None;
        crate::process::kill_and_reap(&mut self.child);
    }

    /// Stops the process the way it is meant to end (its stdin closes; it prints `exit`) and
    /// waits for it; kills it after 5 s. Does nothing if it is not running.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stdin = None;
        let mut child = self.child.take()?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// Starts the SMSC again on the same port with the same options (after [`NpmSmsc::kill`]
    /// or [`NpmSmsc::stop`]; a running one is stopped first), for reconnection tests. Its
    /// counters start over (throttling included, and message ids); the events go on in the same
    /// list, after a new `listening`.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch(port);
    }

    /// Spawns the script on `port` (0: any) and waits for its `listening`.
    fn launch(&mut self, port: u16) {
        debug_assert!(self.child.is_none(), "launch with an SMSC running");
        let script = npm_smsc_dir().join("smsc.js");
        let options = &self.options;
        let mut child = Command::new("node")
            .arg(&script)
            .current_dir(npm_smsc_dir())
            .env("SMSC_PORT", port.to_string())
            .env("SMSC_SYSTEM_ID", &options.system_id)
            .env("SMSC_PASSWORD", &options.password)
            .env("SMSC_THROTTLE_FIRST", options.throttle_first.to_string())
            .env("SMSC_QFULL_FIRST", options.qfull_first.to_string())
            .env("SMSC_RECEIPTS", options.receipts.as_env())
            .env("SMSC_ID_FORMAT", options.id_format.as_env())
            .env(
                "SMSC_DELIVERY_DELAY_MS",
                options.delivery_delay.as_millis().to_string(),
            )
            .env("SMSC_EXIT_ON_STDIN_CLOSE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "spawning node {}: {error} (is node installed? see require_npm_smsc)",
                    script.display()
                )
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let (listening_before, launch) = {
            let mut output = self.lock();
            output.ended = false;
            output.launch += 1;
            (events_of(&output.events, "listening").len(), output.launch)
        };
        spawn_stdout_reader(stdout, self.shared.clone(), launch);
        spawn_stderr_reader(stderr, self.shared.clone());

        let events = self.wait_for(
            |events| events_of(events, "listening").len() > listening_before,
            START_TIMEOUT,
        );
        let listening = events_of(&events, "listening")
            .pop()
            .expect("a listening event");
        let Some(bound) = listening["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
        else {
            panic!("listening without a port: {listening}\n{}", self.dump());
        };
        assert!(
            port == 0 || bound == port,
            "the npm SMSC listens on {bound}, not {port}"
        );
        self.port = bound;
    }

    fn lock(&self) -> MutexGuard<'_, Output> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for NpmSmsc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Receipts {
    fn as_env(self) -> &'static str {
        match self {
            Receipts::Tlv => "tlv",
            Receipts::Text => "text",
            Receipts::None => "none",
        }
    }
}

impl IdFormat {
    fn as_env(self) -> &'static str {
        match self {
            IdFormat::Hex => "hex",
            IdFormat::Decimal => "decimal",
        }
    }
}

// === availability ===

/// `tests/interop/npm-smsc`: the script, its `package.json`, and (after `npm ci`) its
/// `node_modules`.
pub fn npm_smsc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/npm-smsc")
}

/// Whether `node` runs here and the `smpp` package is installed beside the script.
pub fn npm_smsc_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let node = Command::new("node")
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        node && npm_smsc_dir()
            .join("node_modules/smpp/package.json")
            .is_file()
    })
}

/// For tests that need the npm SMSC: `if !require_npm_smsc() { return; }`. True when node and
/// the package are installed; otherwise panics if `OTPGATE_REQUIRE_INTEROP=1` (CI), else notes
/// the skip on stderr and returns false.
pub fn require_npm_smsc() -> bool {
    if npm_smsc_available() {
        return true;
    }
    if std::env::var("OTPGATE_REQUIRE_INTEROP").is_ok_and(|value| value == "1") {
        panic!(
            "node or the npm smpp package not found; .ci/run installs them: apt-get install \
             nodejs npm, then npm ci --prefix tests/interop/npm-smsc (OTPGATE_REQUIRE_INTEROP=1 \
             makes this a failure rather than a skip)"
        );
    }
    eprintln!(
        "SKIPPED: node or the npm smpp package not found (apt-get install nodejs npm; npm ci \
         --prefix tests/interop/npm-smsc); set OTPGATE_REQUIRE_INTEROP=1 to fail instead"
    );
    false
}

// === helpers ===

/// The events of this kind among `events`.
pub fn events_of(events: &[Value], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|event| event["event"] == kind)
        .cloned()
        .collect()
}

fn dump(output: &Output) -> String {
    let mut dump = String::from("--- npm SMSC events:\n");
    for event in &output.events {
        let _ = writeln!(dump, "{event}");
    }
    if !output.stderr.is_empty() {
        dump.push_str("--- npm SMSC stderr:\n");
        for line in &output.stderr {
            let _ = writeln!(dump, "{line}");
        }
    }
    if output.ended {
        dump.push_str("--- (its stdout has ended)\n");
    }
    dump
}

/// Reads the script's stdout, one JSON event a line, until it ends.
fn spawn_stdout_reader(stdout: impl Read + Send + 'static, shared: Arc<Shared>, launch: u64) {
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let event = serde_json::from_str::<Value>(&line)
                .unwrap_or_else(|_| serde_json::json!({ "event": "unparsed", "line": line }));
            let mut output = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            output.events.push(event);
            shared.changed.notify_all();
        }
        let mut output = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if output.launch == launch {
            output.ended = true;
        }
        shared.changed.notify_all();
    });
}

/// Passes the script's stderr on to the test's (captured like its other output) and keeps it
/// for the dump.
fn spawn_stderr_reader(stderr: impl Read + Send + 'static, shared: Arc<Shared>) {
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("npm-smsc: {line}");
            let mut output = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            output.stderr.push(line);
        }
    });
}

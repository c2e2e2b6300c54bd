//! Kannel (Debian's `kannel` package: `bearerbox` and `smsbox`) as an SMPP 3.4 ESME against an
//! SMSC on a loopback port, for interop tests: the SMSC under test gets what a widely deployed
//! ESME really sends, fed through Kannel's HTTP `sendsms` interface.
//!
//! - [`Kannel`] is one bearerbox and one smsbox, foreground child processes with their own
//!   config (`tests/interop/kannel/kannel.conf.in`, which `run.sh` beside it fills in for the
//!   benchmarks too), their own temporary directory and free loopback ports; dropping it kills
//!   both and removes the directory. It never uses Debian's own Kannel service or its files.
//! - [`Kannel::send`] submits one SMS (GSM 7-bit or UCS-2, split and concatenated by Kannel when
//!   long) with an optional delivery-report URL.
//! - [`DlrReceiver`] is the HTTP endpoint those delivery reports are fetched from.
//! - [`require_kannel`] lets a test skip where Kannel is not installed, unless
//!   `OTPGATE_REQUIRE_INTEROP=1` makes that a failure. `tests/interop/kannel/setup.sh` installs it.
//!
//! What Kannel sends on the wire, byte by byte, is in `tests/interop/kannel/README.md`.
//!
//! Everything here is blocking std code: it works in `#[test]` and `#[tokio::test]` alike (the
//! waits are short, and the receiver answers on its own thread). HTTP is a minimal HTTP/1.0 GET
//! over a std `TcpStream` rather than reqwest: the crate's reqwest is the async client, and its
//! blocking one panics when used inside a tokio runtime.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use reqwest::Url;

/// The config template, shared with `run.sh`.
const TEMPLATE: &str = include_str!("../interop/kannel/kannel.conf.in");
/// The admin password in the template (bearerbox's status page and admin commands).
pub const ADMIN_PASSWORD: &str = "otpgate-admin";
/// The sendsms-user in the template.
pub const SENDSMS_USER: &str = "otpgate";
pub const SENDSMS_PASSWORD: &str = "otpgate";
/// The `dlr-mask` of [`Kannel::send`]: 1 (delivered) + 2 (not delivered), the final states, so
/// one delivery report per SMS (Kannel sets `registered_delivery` 1 in the submit_sm).
pub const DLR_MASK: u8 = 3;
/// How long bearerbox and smsbox have to start and the SMSC link to come online.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect, read and write timeout of one HTTP request to Kannel.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Fresh starts that lost a port to another process before Kannel bound it are retried.
const START_ATTEMPTS: usize = 3;
/// Lines of each log quoted when a start fails.
const LOG_TAIL_LINES: usize = 40;
/// Kannel's log level in the tests: 0, debug, dumps every PDU (see [`Kannel::log`]).
const LOG_LEVEL: u8 = 0;

/// How to run a [`Kannel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KannelOptions {
    /// The SMSC's port on 127.0.0.1.
    pub smsc_port: u16,
    /// The bind's `system_id` (Kannel's `smsc-username`).
    pub system_id: String,
    /// The bind's `password` (Kannel's `smsc-password`).
    pub password: String,
    /// `max-pending-submits`: submit_sm sent and not yet answered, at most.
    pub window: u32,
    /// Kannel's own cap in SMS (submit_sm) per second; `None` for none.
    pub throughput: Option<u32>,
}

impl KannelOptions {
    /// System id `otpgate`, password `secret`, a window of 10 (Kannel's default) and no cap.
    pub fn new(smsc_port: u16) -> KannelOptions {
        KannelOptions {
            smsc_port,
            system_id: "otpgate".to_owned(),
            password: "secret".to_owned(),
            window: 10,
            throughput: None,
        }
    }
}

/// How Kannel encodes an SMS's text (`sendsms`'s `coding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// `coding=0`: the GSM 03.38 default alphabet, `data_coding` 0, one septet an octet
    /// (unpacked); a character outside it becomes `?`.
    Gsm7,
    /// `coding=2`: UTF-16BE, `data_coding` 8 (characters beyond the BMP as surrogate pairs).
    Ucs2,
}

impl Coding {
    fn cgi_value(self) -> &'static str {
        match self {
            Coding::Gsm7 => "0",
            Coding::Ucs2 => "2",
        }
    }
}

/// Kannel's answer to a `sendsms` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendsmsAnswer {
    pub status: u16,
    /// `0: Accepted for delivery`, `3: Queued for later delivery` (the SMSC link is down), or
    /// an error.
    pub body: String,
}

impl SendsmsAnswer {
    /// Kannel took the SMS: sent on, or queued until the SMSC link is up.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
            && (self.body.starts_with("0:") || self.body.starts_with("3:"))
    }
}

/// One bearerbox and one smsbox, owned by the test.
#[derive(Debug)]
pub struct Kannel {
    opts: KannelOptions,
    dir: PathBuf,
    admin_port: u16,
    smsbox_port: u16,
    sendsms_port: u16,
    /// `None` once killed.
    bearerbox: Option<Child>,
    smsbox: Option<Child>,
}

/// Why a launch failed.
struct LaunchError {
    message: String,
    /// Another process had one of the ports: a fresh start can try again on others.
    port_taken: bool,
}

// === impl Kannel ===

impl Kannel {
    /// Starts bearerbox and smsbox against `opts.smsc_port` and waits (up to 20 s) until the
    /// SMSC link is bound; panics with the tails of Kannel's logs otherwise.
    pub fn start(opts: KannelOptions) -> Kannel {
        let kannel = Kannel::launch(opts);
        kannel.wait_online(START_TIMEOUT);
        kannel
    }

    /// Starts bearerbox and smsbox and waits only until both are up (the status page answers and
    /// smsbox is connected to bearerbox), whether or not the SMSC link is: `sendsms` then queues
    /// what it is given until the link comes up.
    pub fn launch(opts: KannelOptions) -> Kannel {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let [admin_port, smsbox_port, sendsms_port] = free_ports();
            let mut kannel = Kannel {
                opts: opts.clone(),
                dir: new_temp_dir(),
                admin_port,
                smsbox_port,
                sendsms_port,
                bearerbox: None,
                smsbox: None,
            };
            match kannel.spawn() {
                Ok(()) => return kannel,
                Err(error) if error.port_taken => failures.push(error.message),
                Err(error) => panic!("{}", error.message),
            }
            // Dropping `kannel` kills what runs and removes its directory.
        }
        panic!(
            "Kannel lost a port to another process {START_ATTEMPTS} times:\n{}",
            failures.join("\n")
        );
    }

    /// Waits until bearerbox's status page shows the SMSC link online; panics with the tails of
    /// the logs after `timeout`, or as soon as a box exits.
    pub fn wait_online(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().is_ok_and(|status| smsc_online(&status)) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "Kannel's SMPP link to 127.0.0.1:{} was not online within {timeout:?}\n{}",
                    self.opts.smsc_port,
                    self.logs()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Whether bearerbox's status page shows the SMSC link online now.
    pub fn is_online(&self) -> bool {
        self.status().is_ok_and(|status| smsc_online(&status))
    }

    /// Submits one SMS through `sendsms` (`charset=UTF-8`, so any text arrives as written, as
    /// far as `coding` can carry it), from the config's `global-sender` `OTPGATE`. With a
    /// `dlr_url` (see [`DlrReceiver::url`]), Kannel asks for a receipt ([`DLR_MASK`]) and fetches
    /// the URL once the SMSC's receipt is matched. Ok when Kannel accepted or queued it.
    pub fn send(
        &self,
        to: &str,
        text: &str,
        coding: Coding,
        dlr_url: Option<&str>,
    ) -> anyhow::Result<()> {
        let dlr_mask = DLR_MASK.to_string();
        let mut params = vec![
            ("to", to),
            ("text", text),
            ("coding", coding.cgi_value()),
            // Without it, coding=2 takes the text as UTF-16BE already.
            ("charset", "UTF-8"),
        ];
        if let Some(url) = dlr_url {
            params.extend([("dlr-mask", dlr_mask.as_str()), ("dlr-url", url)]);
        }
        let answer = self.sendsms(&params)?;
        if !answer.accepted() {
            bail!(
                "sendsms refused the SMS to {to}: {} {}",
                answer.status,
                answer.body
            );
        }
        Ok(())
    }

    /// `GET /cgi-bin/sendsms` with the sendsms-user's credentials and these parameters (any of
    /// Kannel's: `udh`, `mclass`, `validity`, …), URL-encoded; the answer as it came.
    pub fn sendsms(&self, params: &[(&str, &str)]) -> anyhow::Result<SendsmsAnswer> {
        let credentials = [("username", SENDSMS_USER), ("password", SENDSMS_PASSWORD)];
        let url = Url::parse_with_params(
            &format!("http://127.0.0.1:{}/cgi-bin/sendsms", self.sendsms_port),
            credentials.iter().chain(params),
        )?;
        let (status, body) = http_get(&url)?;
        Ok(SendsmsAnswer {
            status,
            body: body.trim().to_owned(),
        })
    }

    /// bearerbox's status page, `status.txt`.
    pub fn status(&self) -> anyhow::Result<String> {
        let url = Url::parse_with_params(
            &format!("http://127.0.0.1:{}/status.txt", self.admin_port),
            [("password", ADMIN_PASSWORD)],
        )?;
        match http_get(&url)? {
            (200, body) => Ok(body),
            (status, body) => bail!("status.txt answered {status}: {body}"),
        }
    }

    pub fn options(&self) -> &KannelOptions {
        &self.opts
    }

    /// smsbox's `sendsms` port on 127.0.0.1.
    pub fn sendsms_port(&self) -> u16 {
        self.sendsms_port
    }

    /// bearerbox's admin (status) port on 127.0.0.1.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The directory with `kannel.conf` and the logs; removed when this is dropped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process ids of bearerbox and smsbox, while they run.
    pub fn pids(&self) -> Vec<u32> {
        [&self.bearerbox, &self.smsbox]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// One of the logs in [`Kannel::dir`], whole: `bearerbox.log` (at debug level, every PDU
    /// dumped field by field), `smsbox.log`, `access.log` (one line per SMS and receipt), or
    /// `bearerbox.out`/`smsbox.out` (what the box printed: warnings and worse).
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// The tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut logs = String::new();
        for name in ["bearerbox.log", "smsbox.log", "bearerbox.out", "smsbox.out"] {
            let text = self.log(name);
            if text.trim().is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            let _ = write!(
                logs,
                "--- {name} (last {} lines):\n{}\n",
                tail.len(),
                tail.join("\n")
            );
        }
        if logs.is_empty() {
            logs.push_str("(nothing logged)");
        }
        logs
    }

    /// Kills smsbox and bearerbox (SIGKILL) and waits for them. Does nothing if they are gone.
    pub fn kill(&mut self) {
        for child in [self.smsbox.take(), self.bearerbox.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes the config, spawns bearerbox, then (once it listens for boxes) smsbox, and waits
    /// until the status page shows smsbox connected.
    fn spawn(&mut self) -> Result<(), LaunchError> {
        let config = self.dir.join("kannel.conf");
        fs::write(&config, self.config())
            .unwrap_or_else(|error| panic!("writing {config:?}: {error}"));
        self.bearerbox = Some(self.spawn_box("bearerbox", &config));
        let deadline = Instant::now() + START_TIMEOUT;
        // smsbox gives up at once if bearerbox does not listen for it yet.
        while TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.smsbox_port)),
            Duration::from_secs(1),
        )
        .is_err()
        {
            self.check_running(deadline, "listen for smsbox")?;
            thread::sleep(POLL);
        }
        self.smsbox = Some(self.spawn_box("smsbox", &config));
        loop {
            let up = self.status().is_ok_and(|status| status.contains("smsbox:"));
            let sendsms = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, self.sendsms_port)),
                Duration::from_secs(1),
            )
            .is_ok();
            if up && sendsms {
                return Ok(());
            }
            self.check_running(deadline, "start smsbox")?;
            thread::sleep(POLL);
        }
    }

    fn spawn_box(&self, program: &str, config: &Path) -> Child {
        let path = find_program(program).unwrap_or_else(|| {
            panic!("{program} not found (tests/interop/kannel/setup.sh installs Kannel)")
        });
        let out = File::create(self.dir.join(format!("{program}.out")))
            .and_then(|file| Ok((file.try_clone()?, file)))
            .unwrap_or_else(|error| panic!("{program} output file in {:?}: {error}", self.dir));
        // In the foreground (no --daemonize); `-v 2` prints warnings and worse, which covers
        // what goes wrong before the log file is open.
        Command::new(path)
            .args(["-v", "2"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.0)
            .stderr(out.1)
            .spawn()
            .unwrap_or_else(|error| panic!("spawning {program}: {error}"))
    }

    /// An error if a box has exited (the port-taken kind if its log says it could not open a
    /// port) or the deadline has passed (after killing both).
    fn check_running(&mut self, deadline: Instant, doing: &str) -> Result<(), LaunchError> {
        let exited = [
            ("bearerbox", &mut self.bearerbox),
            ("smsbox", &mut self.smsbox),
        ]
        .into_iter()
        .find_map(|(name, child)| {
            let status = child.as_mut()?.try_wait().ok()??;
            *child = None;
            Some((name, status))
        });
        if let Some((name, status)) = exited {
            self.kill();
            let logs = self.logs();
            return Err(LaunchError {
                port_taken: logs.contains("Could not open")
                    || logs.contains("Address already in use"),
                message: format!("{name} exited at start ({status})\n{logs}"),
            });
        }
        if Instant::now() > deadline {
            self.kill();
            return Err(LaunchError {
                port_taken: false,
                message: format!(
                    "Kannel did not {doing} within {START_TIMEOUT:?}\n{}",
                    self.logs()
                ),
            });
        }
        Ok(())
    }

    /// The template with every placeholder filled in.
    fn config(&self) -> String {
        let dir = self.dir.to_string_lossy();
        render(&[
            ("ADMIN_PORT", &self.admin_port.to_string()),
            ("SMSBOX_PORT", &self.smsbox_port.to_string()),
            ("SENDSMS_PORT", &self.sendsms_port.to_string()),
            ("SMSC_PORT", &self.opts.smsc_port.to_string()),
            ("SYSTEM_ID", &self.opts.system_id),
            ("PASSWORD", &self.opts.password),
            ("WINDOW", &self.opts.window.to_string()),
            ("THROUGHPUT", &self.opts.throughput.unwrap_or(0).to_string()),
            ("LOG_LEVEL", &LOG_LEVEL.to_string()),
            ("DIR", &dir),
        ])
    }
}

impl Drop for Kannel {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `kannel.conf.in` with each `@NAME@` replaced; panics if one outside a comment is left.
fn render(values: &[(&str, &str)]) -> String {
    let mut config = TEMPLATE.to_owned();
    for (name, value) in values {
        assert!(
            !value.contains(['"', '\n']),
            "{name} for kannel.conf has a quote or a newline: {value:?}"
        );
        config = config.replace(&format!("@{name}@"), value);
    }
    let left: Vec<&str> = config
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter(|line| line.matches('@').count() >= 2)
        .collect();
    assert!(
        left.is_empty(),
        "placeholders left in kannel.conf: {left:?}"
    );
    config
}

/// Whether a status page shows the (only) SMSC link online.
fn smsc_online(status: &str) -> bool {
    status
        .lines()
        .skip_while(|line| !line.starts_with("SMSC connections:"))
        .skip(1)
        .any(|line| line.contains("(online "))
}

// === DlrReceiver ===

/// An HTTP endpoint on 127.0.0.1 for Kannel's delivery-report callbacks (`dlr-url`): records
/// every request's query and answers `200`. Dropping it stops its thread.
#[derive(Debug)]
pub struct DlrReceiver {
    addr: SocketAddr,
    shared: Arc<DlrShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct DlrShared {
    callbacks: Mutex<Vec<DlrCallback>>,
    arrived: Condvar,
    stop: AtomicBool,
}

/// One delivery-report callback as Kannel fetched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlrCallback {
    /// The raw query string.
    pub query: String,
    /// Its parameters, decoded, in order.
    pub params: Vec<(String, String)>,
}

impl DlrCallback {
    /// The first parameter of this name, decoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The `tag` given to [`DlrReceiver::url`].
    pub fn tag(&self) -> Option<&str> {
        self.param("tag")
    }

    /// Kannel's report type (`%d`): 1 delivered, 2 not delivered, 4 queued on the SMSC, 8 accepted
    /// by the SMSC (submit_sm_resp), 16 refused by the SMSC.
    pub fn dlr_type(&self) -> Option<u32> {
        self.param("type")?.parse().ok()
    }
}

impl DlrReceiver {
    /// Starts a receiver on a free port of 127.0.0.1.
    pub fn start() -> DlrReceiver {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the DLR receiver");
        let addr = listener.local_addr().expect("DLR receiver address");
        let shared = Arc::new(DlrShared::default());
        let thread = thread::Builder::new()
            .name("kannel-dlr".to_owned())
            .spawn({
                let shared = shared.clone();
                move || {
                    for stream in listener.incoming() {
                        if shared.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            let _ = serve_dlr(stream, &shared);
                        }
                    }
                }
            })
            .expect("spawn the DLR receiver");
        DlrReceiver {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// A `dlr-url` for [`Kannel::send`]: this receiver's `/dlr` with `tag` (letters, digits,
    /// `-`, `_` and `.` only) and Kannel's escapes, which Kannel fills in, URL-encoded, when it
    /// fetches it: `type=%d` (see [`DlrCallback::dlr_type`]), `smsc=%i` (the SMSC's id, `sim`),
    /// `fid=%F` (the SMSC's message id, as Kannel stores it: a decimal number with
    /// `msg-id-type = 3`), `to=%p` (the handset; `%P` would be our sender) and `reply=%A` (the
    /// receipt's text, or `ACK/` for type 8).
    pub fn url(&self, tag: &str) -> String {
        assert!(
            tag.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "a DLR tag is letters, digits, '-', '_' and '.': {tag:?}"
        );
        format!(
            "http://{}/dlr?tag={tag}&type=%d&smsc=%i&fid=%F&to=%p&reply=%A",
            self.addr
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every callback so far, in arrival order.
    pub fn callbacks(&self) -> Vec<DlrCallback> {
        self.shared.callbacks.lock().unwrap().clone()
    }

    /// Waits until at least `count` callbacks have arrived and returns them all; panics, listing
    /// those that came, after `timeout`.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<DlrCallback> {
        let deadline = Instant::now() + timeout;
        let mut callbacks = self.shared.callbacks.lock().unwrap();
        while callbacks.len() < count {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{} of {count} delivery reports within {timeout:?}: {:#?}",
                    callbacks.len(),
                    *callbacks
                );
            }
            callbacks = self
                .shared
                .arrived
                .wait_timeout(callbacks, deadline - now)
                .unwrap()
                .0;
        }
        callbacks.clone()
    }
}

impl Drop for DlrReceiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request, records its query, answers `200 ok`.
fn serve_dlr(stream: TcpStream, shared: &DlrShared) -> io::Result<()> {
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let status = if path == "/dlr" {
        let params = Url::parse(&format!("http://dlr/?{query}"))
            .map(|url| {
                url.query_pairs()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect()
            })
            .unwrap_or_default();
        shared.callbacks.lock().unwrap().push(DlrCallback {
            query: query.to_owned(),
            params,
        });
        shared.arrived.notify_all();
        "200 OK"
    } else {
        "404 Not Found"
    };
    (&stream).write_all(
        format!("HTTP/1.0 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").as_bytes(),
    )
}

// === availability ===

/// Whether Kannel's `bearerbox` and `smsbox` are installed (on `PATH` or in `/usr/sbin`).
pub fn kannel_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE
        .get_or_init(|| find_program("bearerbox").is_some() && find_program("smsbox").is_some())
}

/// For tests that need Kannel: `if !require_kannel() { return; }`. True when Kannel is
/// installed; otherwise panics if `OTPGATE_REQUIRE_INTEROP=1` (CI), else notes the skip on
/// stderr and returns false.
pub fn require_kannel() -> bool {
    if kannel_available() {
        return true;
    }
    if std::env::var("OTPGATE_REQUIRE_INTEROP").is_ok_and(|value| value == "1") {
        panic!(
            "Kannel's bearerbox/smsbox not found; tests/interop/kannel/setup.sh installs them \
             (OTPGATE_REQUIRE_INTEROP=1 makes this a failure rather than a skip)"
        );
    }
    eprintln!(
        "SKIPPED: Kannel's bearerbox/smsbox not found (tests/interop/kannel/setup.sh installs \
         them); set OTPGATE_REQUIRE_INTEROP=1 to fail instead"
    );
    false
}

// === helpers ===

/// An executable `program` on `PATH`, or in the sbin directories a user's `PATH` may lack
/// (Debian puts Kannel's boxes in `/usr/sbin`).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Three distinct ports free on 127.0.0.1 right now.
fn free_ports() -> [u16; 3] {
    let listeners =
        [(); 3].map(|()| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0"));
    listeners.map(|listener| listener.local_addr().expect("local addr").port())
}

/// A new empty directory under the system's temporary directory.
fn new_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "otpgate-kannel-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).unwrap_or_else(|error| panic!("creating {dir:?}: {error}"));
    dir
}

/// A GET over HTTP/1.0 on 127.0.0.1; the status and the body. Reads up to `Content-Length`
/// when there is one, else to the end.
fn http_get(url: &Url) -> anyhow::Result<(u16, String)> {
    let port = url.port().context("a URL with a port")?;
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let stream = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), HTTP_TIMEOUT)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    (&stream).write_all(
        format!("GET {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut reader = BufReader::new(&stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut content_length = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse::<u64>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match content_length {
        Some(length) => {
            reader.take(length).read_to_end(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_config() -> String {
        render(&[
            ("ADMIN_PORT", "1"),
            ("SMSBOX_PORT", "2"),
            ("SENDSMS_PORT", "3"),
            ("SMSC_PORT", "4"),
            ("SYSTEM_ID", "sys"),
            ("PASSWORD", "pw"),
            ("WINDOW", "5"),
            ("THROUGHPUT", "0"),
            ("LOG_LEVEL", "0"),
            ("DIR", "/tmp/x"),
        ])
    }

    #[test]
    fn the_template_holds_the_harness_credentials() {
        let config = sample_config();
        for line in [
            format!("admin-password = {ADMIN_PASSWORD}"),
            format!("username = {SENDSMS_USER}"),
            format!("password = {SENDSMS_PASSWORD}"),
            "smsc-username = \"sys\"".to_owned(),
            "port = 4".to_owned(),
            "max-pending-submits = 5".to_owned(),
            "msg-id-type = 3".to_owned(),
            "dlr-storage = internal".to_owned(),
        ] {
            assert!(
                config.lines().any(|l| l == line),
                "kannel.conf lacks {line:?}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "placeholders left")]
    fn a_missing_value_is_caught() {
        render(&[("ADMIN_PORT", "1")]);
    }

    #[test]
    fn reads_the_smsc_state_from_the_status_page() {
        let link = "    sim[sim]    SMPP:127.0.0.1:1/1:otpgate:";
        let online = format!("SMS: received 0\n\nSMSC connections:\n{link} (online 5s, rcvd: 0)\n");
        let down = format!("SMSC connections:\n{link} (re-connecting, rcvd: sms 0)\n");
        assert!(smsc_online(&online));
        assert!(!smsc_online(&down));
        assert!(!smsc_online(
            "Box connections:\n    smsbox:(none) (on-line 0d)\n"
        ));
    }
}

//! Real `redis-server` processes for end-to-end tests, each on a free loopback port with its own
//! temporary directory, owned by the test: dropping one kills its process and removes its
//! directory.
//!
//! - [`RedisServer`] is one server, with or without an append-only file; it can be killed,
//!   stopped, and restarted on the same port and directory (replaying its AOF).
//! - [`RedisCluster`] is a cluster of masters made with `redis-cli --cluster create`.
//! - [`require_redis`] lets a test skip where Redis is not installed, unless
//!   `OTPGATE_REQUIRE_REDIS=1` (as in CI) makes that a failure.
//!
//! Everything here is blocking std code: it works in `#[test]` and `#[tokio::test]` alike (the
//! waits are short).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server has to answer `PING` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`RedisServer::stop`] waits for the process to exit after `SHUTDOWN`.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster has to report `cluster_state:ok` on every node.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);
/// Read and write timeout of [`RedisServer::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);
/// A cluster node's bus listens on its port plus this.
const CLUSTER_BUS_OFFSET: u16 = 10_000;
/// Fresh starts that lost their port to another process before binding it are retried.
const START_ATTEMPTS: usize = 5;

/// How to run a [`RedisServer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// `--appendonly yes --appendfsync always`: every write is on disk before it is answered, so
    /// it survives [`RedisServer::kill`] and [`RedisServer::stop`], and
    /// [`RedisServer::restart`] replays it.
    pub appendonly: bool,
}

/// A `redis-server` process on `127.0.0.1`, owned by the test.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    opts: RedisOptions,
    /// Arguments after the common ones (the cluster's).
    extra_args: Vec<String>,
    /// `None` once killed or stopped.
    child: Option<Child>,
}

/// A Redis cluster of masters only, each a [`RedisServer`] on its own port and directory.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// Why a launch failed.
struct LaunchError {
    message: String,
    /// Another process had the port: a fresh start can try again on another.
    port_taken: bool,
}

// === impl RedisServer ===

impl RedisServer {
    /// Starts a server without persistence and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default())
    }

    /// Starts a server with these options and waits until it answers `PING`.
    pub fn start_with(opts: RedisOptions) -> RedisServer {
        RedisServer::start_fresh(opts, Vec::new(), false)
    }

    /// Starts a server on a fresh port and directory, trying again on another port when some
    /// other process takes the one found free before the server binds it.
    fn start_fresh(opts: RedisOptions, extra_args: Vec<String>, cluster: bool) -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port(cluster);
            let dir = new_temp_dir();
            let mut extra_args = extra_args.clone();
            if cluster {
                extra_args.extend(cluster_args(&dir));
            }
            let mut server = RedisServer {
                port,
                dir,
                opts,
                extra_args,
                child: None,
            };
            match server.launch() {
                Ok(()) => return server,
                Err(error) if error.port_taken => failures.push(error.message),
                Err(error) => panic!("{}", error.message),
            }
            // Dropping `server` removes its directory; the next attempt starts clean.
        }
        panic!(
            "redis-server lost its port to another process {START_ATTEMPTS} times:\n{}",
            failures.join("\n")
        );
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory: its AOF, `redis.log` and (in a cluster) `nodes.conf`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the server logged (at `warning` level) and printed, for failure messages.
    pub fn log(&self) -> String {
        let mut log = String::new();
        for name in ["redis.log", "output.log"] {
            match fs::read_to_string(self.dir.join(name)) {
                Ok(text) if !text.trim().is_empty() => {
                    let _ = write!(log, "--- {name}:\n{text}");
                }
                _ => {}
            }
        }
        if log.is_empty() {
            log.push_str("(nothing logged)");
        }
        log
    }

    /// Whether the process is still alive (one that has exited is reaped).
    pub fn is_running(&mut self) -> bool {
        crate::process::still_running(&mut self.child)
    }

    /// Kills the process with SIGKILL and waits for it: a crash. Writes not yet in the AOF are
    /// lost (with `appendfsync always` there are none). Does nothing if it is not running.
    pub fn kill(&mut self) {
        crate::process::kill_and_reap(&mut self.child);
    }

    /// Stops the server gracefully with `SHUTDOWN` (which also flushes the AOF) and waits for it
    /// to exit. Does nothing if it is not running. Panics, after killing it, if the server
    /// refuses or does not exit within 10 s.
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        // On success the server closes the connection without a reply.
        if let Ok(Some(reply)) = self
            .try_command(&["SHUTDOWN"])
            .map(|reply| reply.starts_with("(error)").then_some(reply))
        {
            self.kill();
            panic!(
                "redis-server on port {} refused SHUTDOWN: {reply}\n{}",
                self.port,
                self.log()
            );
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_running() {
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "redis-server on port {} did not exit within {STOP_TIMEOUT:?} of SHUTDOWN\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Starts the server again on the same port and directory with the same options, and waits
    /// until it answers `PING` (by then it has replayed its AOF). A server still running is
    /// [stopped](RedisServer::stop) first.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(error) = self.launch() {
            panic!("restart: {}", error.message);
        }
    }

    /// Sends one command and returns its reply, read whole; panics if the server cannot be
    /// reached or the reply is not RESP. See [`RedisServer::try_command`] for the reply's form.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|error| {
            panic!("redis command {args:?} to 127.0.0.1:{}: {error}", self.port)
        })
    }

    /// Sends one command on a new connection (5 s timeouts) and returns its reply, written
    /// like `redis-cli` does:
    ///
    /// - a simple string, bulk string or integer: its text (`OK`, `value`, `3`);
    /// - a null bulk string or array: `(nil)`;
    /// - an error: `(error) ` and its message (`(error) ERR unknown command …`);
    /// - an array: its elements so written, one a line (`(empty array)` when empty).
    pub fn try_command(&self, args: &[&str]) -> io::Result<String> {
        let stream = connect(self.port, COMMAND_TIMEOUT)?;
        (&stream).write_all(&encode_command(args))?;
        read_reply(&mut BufReader::new(&stream))
    }

    /// Spawns the process on `self.port` and `self.dir` and waits until it answers `PING`.
    fn launch(&mut self) -> Result<(), LaunchError> {
        debug_assert!(self.child.is_none(), "launch with a server running");
        let output = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("output.log"))
            .and_then(|file| Ok((file.try_clone()?, file)))
            .unwrap_or_else(|error| panic!("redis-server output file in {:?}: {error}", self.dir));
        let child = Command::new("redis-server")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(output.0)
            .stderr(output.1)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("spawning redis-server: {error} (is it installed? see require_redis)")
            });
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                let log = self.log();
                return Err(LaunchError {
                    port_taken: log.contains("Address already in use"),
                    message: format!(
                        "redis-server on port {} exited at start ({status})\n{log}",
                        self.port
                    ),
                });
            }
            match probe(self.port) {
                Some(answering) if answering == pid => return Ok(()),
                // Another process has the port: ours fails to bind and exits (seen above).
                Some(_) | None => {}
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(LaunchError {
                    port_taken: false,
                    message: format!(
                        "redis-server on port {} did not answer PING within {START_TIMEOUT:?}\n{}",
                        self.port,
                        self.log()
                    ),
                });
            }
            thread::sleep(POLL);
        }
    }

    /// The exit status, if the process has exited (it is reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            if self.opts.appendonly { "yes" } else { "no" },
        ]
        .map(String::from)
        .into();
        if self.opts.appendonly {
            args.extend(["--appendfsync", "always"].map(String::from));
        }
        args.extend(
            [
                "--dir",
                &dir,
                "--logfile",
                &format!("{dir}/redis.log"),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ]
            .map(String::from),
        );
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// === impl RedisCluster ===

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers (at least 3, Redis's minimum), joins them with
    /// `redis-cli --cluster create … --cluster-replicas 0`, and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis cluster needs at least 3 masters");
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::start_fresh(RedisOptions::default(), Vec::new(), true))
            .collect();
        let cluster = RedisCluster { nodes };
        cluster.create();
        cluster.wait_ok();
        cluster
    }

    /// One `redis://127.0.0.1:<port>/` per node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    fn create(&self) {
        let log_path = self.nodes[0].dir.join("cluster-create.log");
        let log = File::create(&log_path)
            .and_then(|file| Ok((file.try_clone()?, file)))
            .unwrap_or_else(|error| panic!("{log_path:?}: {error}"));
        let mut cli = Command::new("redis-cli");
        cli.arg("--cluster").arg("create");
        for node in &self.nodes {
            cli.arg(format!("127.0.0.1:{}", node.port));
        }
        let mut child = cli
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("spawning redis-cli: {error} (apt-get install redis-tools)")
            });
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "redis-cli --cluster create did not finish within {CLUSTER_TIMEOUT:?}\n{}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        };
        assert!(
            status.success(),
            "redis-cli --cluster create failed ({status})\n{}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let infos: Vec<String> = self
                .nodes
                .iter()
                .map(|node| {
                    node.try_command(&["CLUSTER", "INFO"])
                        .unwrap_or_else(|error| error.to_string())
                })
                .collect();
            if infos
                .iter()
                .all(|info| info.lines().any(|line| line.trim() == "cluster_state:ok"))
            {
                return;
            }
            if Instant::now() > deadline {
                let mut report = String::new();
                for (node, info) in self.nodes.iter().zip(&infos) {
                    let _ = write!(
                        report,
                        "--- node on port {}: CLUSTER INFO\n{info}\n{}\n",
                        node.port,
                        node.log()
                    );
                }
                panic!(
                    "the cluster did not reach cluster_state:ok within {CLUSTER_TIMEOUT:?}\n{report}"
                );
            }
            thread::sleep(POLL);
        }
    }
}

// === availability ===

/// Whether `redis-server` (and `redis-cli`, which clusters need) run here.
pub fn redis_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        ["redis-server", "redis-cli"].iter().all(|program| {
            Command::new(program)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
    })
}

/// For tests that need Redis: `if !require_redis() { return; }`. True when Redis is installed;
/// otherwise panics if `OTPGATE_REQUIRE_REDIS=1` (CI), else notes the skip on stderr and
/// returns false.
pub fn require_redis() -> bool {
    if redis_available() {
        return true;
    }
    if std::env::var("OTPGATE_REQUIRE_REDIS").is_ok_and(|value| value == "1") {
        panic!(
            "redis-server not found; .ci/run installs it: apt-get install redis-server \
             (OTPGATE_REQUIRE_REDIS=1 makes this a failure rather than a skip)"
        );
    }
    eprintln!(
        "SKIPPED: redis-server or redis-cli not found (apt-get install redis-server); \
         set OTPGATE_REQUIRE_REDIS=1 to fail instead"
    );
    false
}

// === helpers ===

/// A port free on 127.0.0.1 right now (with, for a cluster node, its bus port too).
fn free_port(cluster_bus: bool) -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if !cluster_bus {
            return port;
        }
        let bus_free = port
            .checked_add(CLUSTER_BUS_OFFSET)
            .is_some_and(|bus| TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok());
        if bus_free {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 with its cluster bus port free too");
}

/// A new empty directory under the system's temporary directory.
fn new_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "otpgate-redis-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).unwrap_or_else(|error| panic!("creating {dir:?}: {error}"));
    dir
}

fn cluster_args(dir: &Path) -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &dir.join("nodes.conf").to_string_lossy(),
        "--cluster-node-timeout",
        "2000",
    ]
    .map(String::from)
    .into()
}

fn connect(port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// The pid of the Redis answering `PING` on this port, if one does (and is not loading).
fn probe(port: u16) -> Option<u32> {
    let stream = connect(port, Duration::from_secs(1)).ok()?;
    (&stream).write_all(b"PING\r\n").ok()?;
    let mut reader = BufReader::new(&stream);
    if !read_line(&mut reader).ok()?.starts_with("+PONG") {
        return None;
    }
    (&stream)
        .write_all(&encode_command(&["INFO", "server"]))
        .ok()?;
    let info = read_reply(&mut reader).ok()?;
    info.lines()
        .find_map(|line| line.trim().strip_prefix("process_id:"))
        .and_then(|pid| pid.parse().ok())
}

/// A command as a RESP array of bulk strings.
fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One line, without its `\r\n`.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-reply",
        ));
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// One RESP2 reply, written as [`RedisServer::try_command`] describes.
fn read_reply(reader: &mut impl BufRead) -> io::Result<String> {
    let line = read_line(reader)?;
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {line:?}"));
    let Some(kind) = line.chars().next() else {
        return Err(invalid("empty reply line"));
    };
    let rest = &line[kind.len_utf8()..];
    let length = || -> io::Result<i64> { rest.parse().map_err(|_| invalid("bad length")) };
    match kind {
        '+' | ':' => Ok(rest.to_owned()),
        '-' => Ok(format!("(error) {rest}")),
        '$' => {
            let Ok(length) = usize::try_from(length()?) else {
                return Ok("(nil)".to_owned());
            };
            let mut data = vec![0; length + 2];
            reader.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(invalid("bulk string without its \\r\\n"));
            }
            data.truncate(length);
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
        '*' => {
            let Ok(length) = usize::try_from(length()?) else {
                return Ok("(nil)".to_owned());
            };
            if length == 0 {
                return Ok("(empty array)".to_owned());
            }
            let elements = (0..length)
                .map(|_| read_reply(reader))
                .collect::<io::Result<Vec<_>>>()?;
            Ok(elements.join("\n"))
        }
        _ => Err(invalid("unknown reply type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> io::Result<String> {
        read_reply(&mut BufReader::new(bytes))
    }

    #[test]
    fn encodes_commands_as_resp_arrays() {
        assert_eq!(
            encode_command(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn reads_every_reply_type() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), "OK");
        assert_eq!(parse(b"-ERR no\r\n").unwrap(), "(error) ERR no");
        assert_eq!(parse(b":42\r\n").unwrap(), "42");
        assert_eq!(parse(b"$5\r\na\r\nbc\r\n").unwrap(), "a\r\nbc");
        assert_eq!(parse(b"$-1\r\n").unwrap(), "(nil)");
        assert_eq!(parse(b"*-1\r\n").unwrap(), "(nil)");
        assert_eq!(parse(b"*0\r\n").unwrap(), "(empty array)");
        assert_eq!(parse(b"*2\r\n$1\r\na\r\n:7\r\n").unwrap(), "a\n7");
        assert!(parse(b"$5\r\nab\r\n").is_err());
        assert!(parse(b"+OK").is_err());
        assert!(parse(b"?\r\n").is_err());
    }
}

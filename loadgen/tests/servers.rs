//! Runs the sink, the bare server and fill against each other on port 0.

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use loadgen::bench::fill::{self, Failure, FillArgs, FillConfig};
use loadgen::bench::sink::{Sink, SinkConfig, Stats};
use loadgen::cli::Cli;

/// Stops the server it was made for when dropped, at the end of a test.
type StopOnDrop = oneshot::Sender<()>;

fn stop_on_drop() -> (StopOnDrop, impl Future<Output = ()>) {
    let (sender, receiver) = oneshot::channel();
    (sender, async move {
        let _ = receiver.await;
    })
}

async fn start_sink() -> (SocketAddr, Sink, StopOnDrop) {
    start_sink_with(SinkConfig::plain()).await
}

async fn start_sink_with(config: SinkConfig) -> (SocketAddr, Sink, StopOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let sink = Sink::with_config(config);
    let (shutdown, stopped) = stop_on_drop();
    tokio::spawn(sink.clone().serve(listener, stopped));
    (address, sink, shutdown)
}

async fn start_bare() -> (SocketAddr, StopOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, stopped) = stop_on_drop();
    tokio::spawn(loadgen::bench::bare::serve(listener, stopped));
    (address, shutdown)
}

/// Sends one request on a fresh connection and returns the status and body.
async fn send(address: SocketAddr, method: Method, path: &str, body: &str) -> (StatusCode, Bytes) {
    try_send(address, method, path, body).await.unwrap()
}

/// Like [`send`], but returns connection failures and unanswered requests as errors.
async fn try_send(
    address: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", address.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("request: {error}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("body: {error}"))?
        .to_bytes();
    Ok((status, body))
}

fn sms(message_id: &str, to: &str) -> String {
    serde_json::json!({
        "message_id": message_id,
        "to": to,
        "from": "otpgate",
        "text": "Your code is 123456",
        "receipt_url": "http://127.0.0.1:1/v1/carriers/sink/receipts",
    })
    .to_string()
}

fn fill_args(address: SocketAddr, count: u64) -> FillArgs {
    FillArgs {
        target: format!("http://{address}"),
        count,
        concurrency: NonZeroUsize::new(4).unwrap(),
        api_key: Some("test-key".into()),
        phone_offset: 0,
        timeout_ms: 5_000,
    }
}

#[tokio::test]
async fn sink_counts_sms_duplicates_and_bad_requests() {
    let (address, sink, _shutdown) = start_sink().await;

    let mut carrier_message_ids = Vec::new();
    for (message_id, path) in [("m-1", "/sms"), ("m-1", "/sms"), ("m-2", "/other/path")] {
        let (status, body) = send(
            address,
            Method::POST,
            path,
            &sms(message_id, "+393331234567"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let accepted: serde_json::Value = serde_json::from_slice(&body).unwrap();
        carrier_message_ids.push(accepted["carrier_message_id"].as_str().unwrap().to_owned());
    }
    carrier_message_ids.sort();
    carrier_message_ids.dedup();
    assert_eq!(
        carrier_message_ids.len(),
        3,
        "carrier message ids are unique"
    );

    let (status, _) = send(address, Method::POST, "/sms", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send(address, Method::POST, "/sms", r#"{"message_id":"m-3"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send(address, Method::POST, "/sms", &sms("m-4", "3331234567")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send(address, Method::POST, "/sms", &sms("", "+393331234567")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = send(address, Method::GET, "/stats", "").await;
    assert_eq!(status, StatusCode::OK);
    let served = serde_json::from_slice::<Stats>(&body).unwrap();
    // Without a latency, the answers take what the machine takes.
    let expected = Stats {
        received: 3,
        distinct_message_ids: 2,
        bad_requests: 4,
        throttled: 0,
        mean_answer_micros: served.mean_answer_micros,
    };
    assert_eq!(served, expected);
    assert_eq!(sink.stats(), expected);
}

#[tokio::test]
async fn fill_against_bare_succeeds_on_every_request() {
    let (address, _shutdown) = start_bare().await;
    let config = FillConfig::from_args(&fill_args(address, 500)).unwrap();
    let report = fill::run(config).await.unwrap();
    assert_eq!(report.n_succeeded(), 500);
    assert_eq!(report.n_failed(), 0);
    assert_eq!(report.by_status.get(&202), Some(&500));
}

#[tokio::test]
async fn fill_counts_non_2xx_answers_as_failed() {
    // The sink refuses fill's bodies, which are not SMS, with 400.
    let (address, sink, _shutdown) = start_sink().await;
    let config = FillConfig::from_args(&fill_args(address, 20)).unwrap();
    let report = fill::run(config).await.unwrap();
    assert_eq!(report.n_succeeded(), 0);
    assert_eq!(report.n_failed(), 20);
    assert_eq!(report.by_status.get(&400), Some(&20));
    assert_eq!(sink.stats().bad_requests, 20);
}

#[tokio::test]
async fn fill_counts_refused_connections_as_failed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let config = FillConfig::from_args(&fill_args(address, 3)).unwrap();
    let report = fill::run(config).await.unwrap();
    assert_eq!(report.n_failed(), 3);
    assert_eq!(report.by_failure.get(&Failure::Connect), Some(&3));
}

#[tokio::test]
async fn fill_refuses_a_phone_range_past_the_generator() {
    let mut args = fill_args("127.0.0.1:1".parse().unwrap(), 10);
    args.phone_offset = loadgen::bench::phone::CAPACITY - 5;
    assert!(FillConfig::from_args(&args).is_err());
}

/// A sink with a capacity accepts that many SMS in a second and answers `429` above it.
#[tokio::test]
async fn sink_with_a_capacity_throttles_above_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let sink = Sink::with_capacity(std::num::NonZeroU32::new(3));
    let (_shutdown, stopped) = stop_on_drop();
    tokio::spawn(sink.clone().serve(listener, stopped));
    let mut statuses = Vec::new();
    for n in 0..5 {
        let (status, _) = send(
            address,
            Method::POST,
            "/sms",
            &sms(&format!("c-{n}"), "+393331234567"),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let stats = sink.stats();
    assert_eq!((stats.received, stats.throttled), (3, 2));
}

/// A sink with a latency answers every SMS that much later, and the wait is a timer: five SMS
/// sent at once on five connections are all answered after one latency, not five, even on this
/// test's single-threaded runtime.
#[tokio::test]
async fn sink_with_a_latency_delays_every_answer_without_blocking() {
    const LATENCY: Duration = Duration::from_millis(300);
    let (address, sink, _shutdown) = start_sink_with(SinkConfig {
        latency: LATENCY,
        ..SinkConfig::plain()
    })
    .await;
    let started = Instant::now();
    let mut requests = JoinSet::new();
    for n in 0..5 {
        requests.spawn(async move {
            let sent = Instant::now();
            let (status, _) = send(
                address,
                Method::POST,
                "/sms",
                &sms(&format!("l-{n}"), "+393331234567"),
            )
            .await;
            (status, sent.elapsed())
        });
    }
    while let Some(answered) = requests.join_next().await {
        let (status, elapsed) = answered.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(elapsed >= LATENCY, "answered after {elapsed:?}");
    }
    let total = started.elapsed();
    assert!(
        total < 2 * LATENCY,
        "five answers took {total:?}: the latency must not block"
    );
    let stats = sink.stats();
    assert_eq!(stats.received, 5);
    assert!(
        stats.mean_answer_micros >= 300_000,
        "mean answer after {} µs",
        stats.mean_answer_micros
    );
}

/// `GET /ids` lists every SMS accepted, duplicates included, in order, with the Unix time in
/// microseconds; an id that could not be listed on one line is refused.
#[tokio::test]
async fn sink_lists_the_sms_it_accepted() {
    let (address, _sink, _shutdown) = start_sink().await;
    let before = unix_micros();
    for message_id in ["m-1", "m-1", "m-2"] {
        let (status, _) = send(
            address,
            Method::POST,
            "/sms",
            &sms(message_id, "+393331234567"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let after = unix_micros();
    for message_id in ["m 3", "m-4\n"] {
        let (status, _) = send(
            address,
            Method::POST,
            "/sms",
            &sms(message_id, "+393331234567"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{message_id:?}");
    }

    let (status, body) = send(address, Method::GET, "/ids", "").await;
    assert_eq!(status, StatusCode::OK);
    let lines = parse_ids(std::str::from_utf8(&body).unwrap());
    let ids: Vec<&str> = lines.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["m-1", "m-1", "m-2"]);
    let times: Vec<u64> = lines.iter().map(|(at, _)| *at).collect();
    assert!(times.is_sorted(), "{times:?}");
    // The sink's clock starts from the system clock, read a moment before this test's `before`.
    assert!(
        times[0] + 1_000_000 >= before && times[2] <= after + 1_000_000,
        "{times:?}"
    );
}

/// `--die-after 3` answers two SMS, then on accepting the third writes all three to the ids
/// file and exits without answering it.
#[tokio::test]
async fn sink_dies_after_so_many_sms_and_lists_them() {
    let ids_file = temp_path("dies");
    let (mut child, address) =
        spawn_sink(&["--die-after", "3", "--ids-file", ids_file.to_str().unwrap()]).await;
    for n in 0..2 {
        let (status, _) = send(
            address,
            Method::POST,
            "/sms",
            &sms(&format!("d-{n}"), "+393331234567"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let last = try_send(address, Method::POST, "/sms", &sms("d-2", "+393331234567")).await;
    assert!(last.is_err(), "the third SMS was answered: {last:?}");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the sink exits")
        .unwrap();
    assert!(status.success(), "{status}");

    let listed = std::fs::read_to_string(&ids_file).unwrap();
    let _ = std::fs::remove_file(&ids_file);
    let ids: Vec<String> = parse_ids(&listed).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["d-0", "d-1", "d-2"]);
    assert!(
        try_send(address, Method::GET, "/stats", "").await.is_err(),
        "nothing listens any more"
    );
}

/// A sink stopped with SIGTERM writes its ids file on the way out.
#[tokio::test]
async fn sink_writes_its_ids_file_when_stopped() {
    let ids_file = temp_path("stopped");
    let (mut child, address) = spawn_sink(&["--ids-file", ids_file.to_str().unwrap()]).await;
    for message_id in ["s-1", "s-2"] {
        let (status, _) = send(
            address,
            Method::POST,
            "/sms",
            &sms(message_id, "+393331234567"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the sink exits")
        .unwrap();
    assert!(status.success(), "{status}");
    let listed = std::fs::read_to_string(&ids_file).unwrap();
    let _ = std::fs::remove_file(&ids_file);
    let ids: Vec<String> = parse_ids(&listed).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["s-1", "s-2"]);
}

#[test]
fn die_after_needs_an_ids_file() {
    use clap::Parser;
    assert!(Cli::try_parse_from(["loadgen", "sink", "--die-after", "3"]).is_err());
    let cli = Cli::try_parse_from([
        "loadgen",
        "sink",
        "--die-after",
        "3",
        "--ids-file",
        "/tmp/ids",
        "--latency-ms",
        "40",
    ])
    .unwrap();
    let loadgen::cli::Command::Sink(args) = cli.command else {
        panic!("not a sink: {cli:?}");
    };
    let config = SinkConfig::from_args(&args);
    assert_eq!(config.die_after, NonZeroU64::new(3));
    assert_eq!(config.latency, Duration::from_millis(40));
    assert_eq!(config.ids_file, Some(PathBuf::from("/tmp/ids")));
}

/// Starts the `loadgen sink` binary on port 0 with `flags` and returns it and its address.
async fn spawn_sink(flags: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["sink", "--worker-threads", "1", "--listen", "127.0.0.1:0"])
        .args(flags)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut first_line = String::new();
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .await
        .unwrap();
    let address = first_line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
        .parse()
        .unwrap();
    (child, address)
}

/// Parses `UNIX_MICROS MESSAGE_ID` lines.
fn parse_ids(listed: &str) -> Vec<(u64, String)> {
    listed
        .lines()
        .map(|line| {
            let (at, message_id) = line.split_once(' ').unwrap();
            (at.parse().unwrap(), message_id.to_owned())
        })
        .collect()
}

fn unix_micros() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since_epoch.as_micros()).unwrap()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("loadgen-servers-{}-{name}.ids", std::process::id()))
}

//! The connection guards (docs/DESIGN.md section 3, *Connections*): silent sockets, bare HTTP/2
//! prefaces and trickled bodies no longer hold the gateway's connections, one address cannot take
//! them all, and idle connections are closed; on the admin listener too, so `/readyz` answers.

use std::net::SocketAddr;
use std::time::Duration;

use gateway::clock::Clock;
use tests::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

/// The HTTP/2 client preface and an empty SETTINGS frame: all an h2c client sends before its
/// first request.
const H2C_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// How long a test waits for something that should take a fraction of it.
const PATIENCE: Duration = Duration::from_secs(5);

/// A gateway (embedded back-end, no carriers: the console one) with these connection keys.
async fn gateway(keys: &str) -> Gateway {
    Gateway::start_configured(keys, Clock::system()).await
}

/// Opens `n` connections to `addr` from `source` (any loopback address), sending `hello` (maybe
/// nothing) on each, and keeps them open.
async fn hold(n: usize, addr: SocketAddr, source: [u8; 4], hello: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .expect("bind a loopback source address");
        let mut stream = socket.connect(addr).await.expect("connect");
        stream.write_all(hello).await.expect("hello");
        streams.push(stream);
    }
    streams
}

/// Reads until the peer closes the connection (or resets it), and returns what it sent; panics
/// if it is still open after `within`.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => panic!(
                "still open after {within:?}, having sent {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
}

/// Reads one HTTP/1.1 answer whose body has a `content-length`, and returns it whole.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before answering");
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("content-length");
            if received.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

async fn closed(gateway: &Gateway, listener: &str, reason: &str) -> f64 {
    gateway
        .registered_metric(&format!(
            "otpgate_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ))
        .await
}

#[tokio::test]
async fn silent_sockets_no_longer_keep_a_client_out_of_the_api() {
    let gateway =
        gateway("max_connections = 8\nmax_connections_per_ip = 0\nprelude_timeout_ms = 300\n")
            .await;
    let mut silent = hold(8, gateway.api, [127, 0, 0, 1], b"").await;

    let answer = timeout(PATIENCE, gateway.get("/v1/openapi.json"))
        .await
        .expect("the API answers while silent sockets hold every slot");
    assert_eq!(answer.status, 200, "{}", answer.text);
    for stream in &mut silent {
        assert!(read_to_close(stream, PATIENCE).await.is_empty());
    }
    assert_eq!(closed(&gateway, "api", "prelude_timeout").await, 8.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn bare_h2c_prefaces_no_longer_keep_a_client_out_of_the_api() {
    let gateway =
        gateway("max_connections = 8\nmax_connections_per_ip = 0\nprelude_timeout_ms = 300\n")
            .await;
    let mut prefaces = hold(8, gateway.api, [127, 0, 0, 1], H2C_PREFACE).await;

    let answer = timeout(PATIENCE, gateway.get("/v1/openapi.json"))
        .await
        .expect("the API answers while HTTP/2 prefaces hold every slot");
    assert_eq!(answer.status, 200, "{}", answer.text);
    for stream in &mut prefaces {
        // The server's own SETTINGS may come first; then the connection closes.
        read_to_close(stream, PATIENCE).await;
    }
    assert_eq!(closed(&gateway, "api", "prelude_timeout").await, 8.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn the_admin_readyz_stays_reachable_with_64_silent_sockets() {
    // No per-address cap: the probe shares its address with the silent sockets.
    let gateway = gateway("max_connections_per_ip = 0\nprelude_timeout_ms = 300\n").await;
    let mut silent = hold(64, gateway.admin, [127, 0, 0, 1], b"").await;

    let ready = timeout(PATIENCE, gateway.admin_get("/readyz"))
        .await
        .expect("/readyz answers while 64 silent sockets hold every admin slot");
    assert_eq!(ready.status, 200, "{}", ready.text);
    for stream in &mut silent {
        assert!(read_to_close(stream, PATIENCE).await.is_empty());
    }
    assert_eq!(closed(&gateway, "admin", "prelude_timeout").await, 64.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn one_address_holds_at_most_16_admin_connections() {
    // The default deadlines (10 s): only the per-address cap lets the probe in at once.
    let gateway = gateway("").await;
    let _silent = hold(64, gateway.admin, [127, 0, 0, 2], b"").await;

    let started = Instant::now();
    let ready = timeout(PATIENCE, gateway.admin_get("/readyz"))
        .await
        .expect("/readyz answers another address at once");
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(closed(&gateway, "admin", "per_ip_cap").await, 48.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_trickled_body_is_answered_408_at_its_deadline_and_its_connection_closed() {
    let gateway = gateway("body_timeout_ms = 500\n").await;
    let mut stream = TcpStream::connect(gateway.api).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/verifications HTTP/1.1\r\nhost: otpgate\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"pho",
        )
        .await
        .expect("headers");
    let sent_headers = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        // A byte every 100 ms, 40 at most: never the whole body.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b" ").await.is_err() {
                break;
            }
        }
    });

    let mut received = Vec::new();
    let finished = timeout(PATIENCE, reader.read_to_end(&mut received)).await;
    let elapsed = sent_headers.elapsed();
    let text = String::from_utf8_lossy(&received);
    assert!(finished.is_ok(), "still open after {PATIENCE:?}: {text}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"body_timeout\""), "{text}");
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    trickle.abort();

    assert_eq!(closed(&gateway, "api", "body_timeout").await, 1.0);
    let answer = gateway.get("/v1/openapi.json").await;
    assert_eq!(answer.status, 200, "the gateway serves on: {}", answer.text);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_address_over_its_cap_is_closed_at_once_while_others_get_in() {
    let gateway = gateway("max_connections_per_ip = 3\n").await;
    let _held = hold(3, gateway.api, [127, 0, 0, 2], b"").await;

    let mut over = hold(1, gateway.api, [127, 0, 0, 2], b"").await;
    let received = read_to_close(&mut over[0], Duration::from_secs(1)).await;
    assert!(received.is_empty(), "{received:?}");
    assert_eq!(closed(&gateway, "api", "per_ip_cap").await, 1.0);

    let answer = timeout(PATIENCE, gateway.get("/v1/openapi.json"))
        .await
        .expect("another address gets in");
    assert_eq!(answer.status, 200, "{}", answer.text);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let gateway = gateway("idle_timeout_ms = 400\n").await;
    let mut stream = TcpStream::connect(gateway.api).await.expect("connect");
    stream
        .write_all(b"GET /v1/openapi.json HTTP/1.1\r\nhost: otpgate\r\n\r\n")
        .await
        .expect("request");
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = Instant::now();

    assert!(read_to_close(&mut stream, PATIENCE).await.is_empty());
    let elapsed = answered.elapsed();
    assert!(
        elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}"
    );
    assert_eq!(closed(&gateway, "api", "idle").await, 1.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let gateway = gateway("idle_timeout_ms = 400\n").await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2c client");
    let answer = client
        .get(gateway.url("/v1/openapi.json"))
        .send()
        .await
        .expect("h2c request");
    assert_eq!(answer.version(), http::Version::HTTP_2);
    assert_eq!(answer.status(), 200);

    let open = "otpgate_connections_open{listener=\"api\"}";
    gateway.wait_for_metric(open, |n| n == 0.0).await;
    assert_eq!(closed(&gateway, "api", "idle").await, 1.0);
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_long_poll_longer_than_the_idle_timeout_is_answered() {
    let gateway = gateway("idle_timeout_ms = 300\n").await;
    let id = gateway.start_ok(&tests::phone(1)).await;
    let read = gateway.wait_for_delivery(&id, "submitted").await;
    let etag = read.header("etag").expect("etag").to_owned();

    let started = Instant::now();
    let answer = gateway
        .request(
            http::Method::GET,
            &format!("/v1/verifications/{id}?wait=1"),
            None,
            &[("if-none-match", etag.as_str())],
        )
        .await;
    assert!(matches!(answer.status, 200 | 304), "{}", answer.text);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(closed(&gateway, "api", "idle").await, 0.0);
    gateway.stop().await.unwrap();
}

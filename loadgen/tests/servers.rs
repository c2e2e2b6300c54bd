//! Runs the sink, the bare server and fill against each other on port 0.

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use loadgen::cli::FillArgs;
use loadgen::fill::{self, Failure, FillConfig};
use loadgen::sink::{Sink, Stats};

/// Stops the server it was made for when dropped, at the end of a test.
type StopOnDrop = oneshot::Sender<()>;

fn stop_on_drop() -> (StopOnDrop, impl Future<Output = ()>) {
    let (sender, receiver) = oneshot::channel();
    (sender, async move {
        let _ = receiver.await;
    })
}

async fn start_sink() -> (SocketAddr, Sink, StopOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let sink = Sink::new();
    let (shutdown, stopped) = stop_on_drop();
    tokio::spawn(sink.clone().serve(listener, stopped));
    (address, sink, shutdown)
}

async fn start_bare() -> (SocketAddr, StopOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (shutdown, stopped) = stop_on_drop();
    tokio::spawn(loadgen::bare::serve(listener, stopped));
    (address, shutdown)
}

/// Sends one request on a fresh connection and returns the status and body.
async fn send(address: SocketAddr, method: Method, path: &str, body: &str) -> (StatusCode, Bytes) {
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", address.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
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

    let expected = Stats {
        received: 3,
        distinct_message_ids: 2,
        bad_requests: 4,
        throttled: 0,
    };
    let (status, body) = send(address, Method::GET, "/stats", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Stats>(&body).unwrap(), expected);
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
    args.phone_offset = loadgen::phone::CAPACITY - 5;
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

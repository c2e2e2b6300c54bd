//! The end-to-end test harness: a real gateway on port 0, fake carriers over real HTTP, and
//! captured logs.
//!
//! - [`Gateway`] runs `gateway::run` in the test's runtime on two ephemeral ports, with a clock
//!   the test can move forward, and speaks HTTP to it like a frontend would.
//! - [`FakeCarrier`] is an HTTP carrier that checks every request against docs/DESIGN.md section 5's
//!   wire format exactly, records what it was sent, and answers as the test tells it.
//! - [`capture_logs`] collects everything the gateway logs (at trace level) for secrecy checks.

pub mod kannel;
pub mod npm_smsc;
pub mod process;
pub mod redis;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use gateway::clock::Clock;
use gateway::config::Config;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// A gateway running inside the test.
#[derive(Debug)]
pub struct Gateway {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// The gateway's clock: `advance` it to move time.
    pub clock: Clock,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// The redis-server this gateway owns (`OTPGATE_TEST_STORE=redis`); stopped with it.
    redis: Option<redis::RedisServer>,
    /// The Redis Cluster this gateway owns (`OTPGATE_TEST_STORE=redis-cluster`).
    cluster: Option<redis::RedisCluster>,
}

/// The server secret every gateway of a test shares on the redis back-end.
pub const TEST_SECRET: &str = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";

/// Whether this run puts the gateways on Redis: `OTPGATE_TEST_STORE=redis` runs the whole
/// behaviour suite on the redis back-end, each gateway on a redis-server of its own, and
/// `OTPGATE_TEST_STORE=redis-cluster` on a 3-master Redis Cluster of its own.
pub fn testing_redis() -> bool {
    std::env::var("OTPGATE_TEST_STORE")
        .is_ok_and(|store| store == "redis" || store == "redis-cluster")
}

/// Whether this run puts the gateways on a Redis Cluster (`OTPGATE_TEST_STORE=redis-cluster`).
pub fn testing_cluster() -> bool {
    std::env::var("OTPGATE_TEST_STORE").is_ok_and(|store| store == "redis-cluster")
}

/// `config_toml` on the redis back-end at `url`.
pub fn on_redis(config_toml: &str, url: &str) -> String {
    format!(
        "store = \"redis\"\nsecret = \"{TEST_SECRET}\"\n{config_toml}\n\n[redis]\nurl = \"{url}\"\n"
    )
}

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
    pub text: String,
}

/// What a fake carrier does with the next submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// `200 {"carrier_message_id": …}`.
    Accept,
    /// Any other status, with an optional `Retry-After` in seconds.
    Status(u16, Option<u64>),
    /// Accept, but only after this long.
    Slow(Duration),
    /// Take the SMS at once (it shows in `received`), but answer only after this long: a
    /// carrier whose receipt can beat its own submit answer.
    SlowAnswer(Duration),
    /// `200` with this body instead of the carrier_message_id JSON.
    AcceptWithBody(&'static str),
    /// Accept at most this many SMS in any second, and answer `429` above it (a carrier
    /// capped at its contracted rate).
    Capacity(u32),
    /// Answer this status, but only after this long.
    SlowStatus(Duration, u16),
}

/// One SMS as the fake carrier received it (already checked against the wire format).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceivedSms {
    pub message_id: String,
    pub to: String,
    pub from: String,
    pub text: String,
    pub receipt_url: String,
}

/// A fake HTTP carrier.
#[derive(Debug, Clone)]
pub struct FakeCarrier {
    pub addr: SocketAddr,
    shared: Arc<CarrierShared>,
}

#[derive(Debug, Default)]
struct CarrierShared {
    received: Mutex<Vec<ReceivedSms>>,
    /// Requests that broke the wire format, with what was wrong.
    violations: Mutex<Vec<String>>,
    /// Replies to use, in order; the last one repeats.
    script: Mutex<VecDeque<Reply>>,
    /// Submits answered so far, by any reply.
    n_requests: Mutex<usize>,
    required_header: Mutex<Option<(String, String)>>,
    arrived: Notify,
    /// When recent SMS were accepted, for [`Reply::Capacity`].
    accepted_at: Mutex<VecDeque<tokio::time::Instant>>,
    /// Submits answered `429` for being over capacity.
    n_throttled: Mutex<usize>,
    /// Fired by [`FakeCarrier::kill`].
    killed: tokio_util::sync::CancellationToken,
    /// Set by [`FakeCarrier::deliver`]: accepted SMS reach the handset this long after
    /// acceptance, and a `delivered` receipt with this token follows.
    delivery: Mutex<Option<(Duration, String)>>,
    /// SMS that reached their handsets, with when.
    handset: Mutex<Vec<(ReceivedSms, tokio::time::Instant)>>,
}

// === impl Gateway ===

impl Gateway {
    /// Starts a gateway on 127.0.0.1 port 0 with this TOML config (listen addresses are ignored).
    pub async fn start(config_toml: &str) -> Gateway {
        Gateway::start_with_clock(config_toml, Clock::system()).await
    }

    pub async fn start_with_clock(config_toml: &str, clock: Clock) -> Gateway {
        if testing_cluster() && redis::require_redis() {
            let cluster = redis::RedisCluster::start(3);
            let config = format!(
                "{}cluster = true\n",
                on_redis(config_toml, &cluster.urls().join(","))
            );
            let mut gateway = Gateway::start_configured(&config, clock).await;
            gateway.cluster = Some(cluster);
            gateway.wait_ready().await;
            return gateway;
        }
        if testing_redis() && redis::require_redis() {
            let server = redis::RedisServer::start();
            let mut gateway =
                Gateway::start_configured(&on_redis(config_toml, &server.url()), clock).await;
            gateway.redis = Some(server);
            gateway.wait_ready().await;
            return gateway;
        }
        Gateway::start_configured(config_toml, clock).await
    }

    /// Starts a gateway with exactly this config (no redis-server of its own).
    pub async fn start_configured(config_toml: &str, clock: Clock) -> Gateway {
        install_log_capture();
        let mut config =
            Config::from_toml(config_toml).unwrap_or_else(|error| panic!("test config: {error}"));
        let api_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let api = api_listener.local_addr().expect("api addr");
        // Carriers post receipts back to this gateway, unless the test names another URL.
        if !config_toml.contains("public_url") {
            config.public_url = format!("http://{api}");
        }
        let admin = admin_listener.local_addr().expect("admin addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::run(
            gateway::Listeners {
                api: api_listener,
                admin: admin_listener,
            },
            config,
            clock.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Gateway {
            api,
            admin,
            clock,
            api_key: None,
            http,
            stop: Some(stop),
            task: Some(task),
            redis: None,
            cluster: None,
        }
    }

    /// A handle on a gateway running elsewhere (another process), for the request helpers.
    pub fn external(api: SocketAddr, admin: SocketAddr) -> Gateway {
        Gateway {
            api,
            admin,
            clock: Clock::system(),
            api_key: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            stop: None,
            task: None,
            redis: None,
            cluster: None,
        }
    }

    /// Waits (up to 10 s) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self
                .http
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200);
            if ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn with_api_key(mut self, key: &str) -> Gateway {
        self.api_key = Some(key.to_owned());
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Sends a request with the gateway's API key (if any) and these extra headers.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self.http.request(method, self.url(path));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.expect("request to the gateway");
        Answer::read(response).await
    }

    /// Sends a request with this bearer token instead of the gateway's API key (a carrier
    /// posting a receipt, say).
    pub async fn request_with_bearer(
        &self,
        method: http::Method,
        path: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        Answer::read(request.send().await.expect("request to the gateway")).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.request(
            http::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
            &[],
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(http::Method::GET, path, None, &[]).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.request(http::Method::DELETE, path, None, &[]).await
    }

    /// Starts a verification for `phone` and returns the answer.
    pub async fn start_verification(&self, phone: &str) -> Answer {
        self.post("/v1/verifications", serde_json::json!({ "phone": phone }))
            .await
    }

    /// Starts a verification for `phone`, checks that it was accepted, and returns its id.
    pub async fn start_ok(&self, phone: &str) -> String {
        let started = self.start_verification(phone).await;
        assert_eq!(started.status, 202, "{}", started.text);
        started.id()
    }

    /// Reads a verification, and checks that the read succeeded.
    pub async fn read(&self, id: &str) -> Answer {
        let answer = self.get(&format!("/v1/verifications/{id}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer
    }

    pub async fn check(&self, id: &str, code: &str) -> Answer {
        self.post(
            &format!("/v1/verifications/{id}/check"),
            serde_json::json!({ "code": code }),
        )
        .await
    }

    /// The Prometheus text of the admin listener.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one series (exact name with labels, as rendered), or `None` if absent.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// The value of a series the gateway registers at start-up; panics if it is absent.
    pub async fn registered_metric(&self, series: &str) -> f64 {
        self.metric(series)
            .await
            .unwrap_or_else(|| panic!("{series} is not exported"))
    }

    /// Scrapes `series` until `done` holds for its value (within ten seconds), and returns it.
    pub async fn wait_for_metric(&self, series: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(series).await;
            if let Some(value) = value.filter(|value| done(*value)) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed at {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Long-polls a verification until its delivery state is `state` (within ten seconds),
    /// passing the last `ETag` seen so that no change is missed between polls.
    pub async fn wait_for_delivery(&self, id: &str, state: &str) -> Answer {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let path = format!("/v1/verifications/{id}");
        let mut answer = self.get(&path).await;
        loop {
            assert_eq!(answer.status, 200, "{}", answer.text);
            if answer.body["delivery"]["state"] == state {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "delivery never became {state}: {}",
                answer.text
            );
            let etag = answer.header("etag").unwrap_or_default().to_owned();
            answer = self
                .request(
                    http::Method::GET,
                    &format!("{path}?wait=1"),
                    None,
                    &[("if-none-match", etag.as_str())],
                )
                .await;
        }
    }

    pub async fn admin_get(&self, path: &str) -> Answer {
        let response = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("admin request");
        Answer::read(response).await
    }

    /// Asks the gateway to shut down and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.begin_stop();
        self.finish().await
    }

    /// Signals shutdown without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `run` to return after [`Gateway::begin_stop`].
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        match self.task.take() {
            Some(task) => task.await.expect("gateway task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Finds `series` (the name and labels exactly as rendered) in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

// === impl Answer ===

impl Answer {
    async fn read(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    /// The error code of an error answer.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .expect("answer has an id")
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// `Retry-After`, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(|value| value.parse().ok())
    }
}

// === impl FakeCarrier ===

impl FakeCarrier {
    /// Starts a carrier on 127.0.0.1 port 0 that accepts everything.
    pub async fn start() -> FakeCarrier {
        install_log_capture();
        let shared = Arc::new(CarrierShared::default());
        shared.script.lock().unwrap().push_back(Reply::Accept);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind carrier");
        let addr = listener.local_addr().expect("carrier addr");
        let app = axum::Router::new()
            .route("/sms", post(receive))
            .with_state(shared.clone());
        let killed = shared.killed.clone();
        // Its own accept loop rather than axum::serve, so that `kill` can drop every
        // connection at once, requests in flight included, like a crashed carrier.
        tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    () = killed.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let service = hyper_util::service::TowerToHyperService::new(app.clone());
                        connections.spawn(async move {
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            connections.abort_all();
        });
        FakeCarrier { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}/sms", self.addr)
    }

    /// Crashes the carrier: its listener closes (new connections are refused) and every open
    /// connection is dropped, requests in flight included.
    pub fn kill(&self) {
        self.shared.killed.cancel();
    }

    /// A `[[carriers]]` block for this carrier.
    pub fn config(&self, name: &str, pace_per_sec: u32, window: u32) -> String {
        format!(
            "[[carriers]]\nname = \"{name}\"\nkind = \"http\"\nurl = \"{}\"\npace_per_sec = {pace_per_sec}\nwindow = {window}\nfrom = \"SaluteRL\"\ntimeout_ms = 2000\n",
            self.url()
        )
    }

    /// From now on, every SMS accepted with [`Reply::Accept`] spends `delay` in the carrier's
    /// own queue before it reaches the handset ([`FakeCarrier::handset_code_for`]); then its
    /// `delivered` receipt is posted to the SMS's `receipt_url` with `receipt_token`. Without
    /// this, SMS reach the handset on acceptance and no receipt is sent.
    pub fn deliver(&self, delay: Duration, receipt_token: &str) {
        *self.shared.delivery.lock().unwrap() = Some((delay, receipt_token.to_owned()));
    }

    /// The code in the latest SMS that reached `phone`'s handset (at acceptance, unless
    /// [`FakeCarrier::deliver`] delays it).
    pub fn handset_code_for(&self, phone: &str) -> Option<String> {
        if self.shared.delivery.lock().unwrap().is_none() {
            return self.code_for(phone);
        }
        self.shared
            .handset
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(sms, _)| sms.to == phone)
            .and_then(|(sms, _)| extract_code(&sms.text))
    }

    /// Replies to use from now on, in order; the last one repeats.
    pub fn script(&self, replies: &[Reply]) {
        let mut script = self.shared.script.lock().unwrap();
        script.clear();
        script.extend(replies.iter().copied());
    }

    /// Requires this header on every request (a violation is recorded otherwise).
    pub fn require_header(&self, name: &str, value: &str) {
        *self.shared.required_header.lock().unwrap() =
            Some((name.to_ascii_lowercase(), value.to_owned()));
    }

    /// Every SMS accepted so far.
    pub fn received(&self) -> Vec<ReceivedSms> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn n_requests(&self) -> usize {
        *self.shared.n_requests.lock().unwrap()
    }

    /// Submits answered `429` by [`Reply::Capacity`].
    pub fn n_throttled(&self) -> usize {
        *self.shared.n_throttled.lock().unwrap()
    }

    /// Requests that broke the wire format.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().unwrap().clone()
    }

    /// Waits until the carrier has answered at least `n` submits (of any outcome), or panics
    /// after `timeout`.
    pub async fn wait_for_submits(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.n_requests() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the carrier got {} submits, expected {n}",
                self.n_requests()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until at least `n` SMS were accepted, or panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedSms> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("carrier got {} SMS, expected {n}", self.received().len());
            }
        }
    }

    /// The code in the latest SMS sent to `phone`.
    pub fn code_for(&self, phone: &str) -> Option<String> {
        self.received()
            .iter()
            .rev()
            .find(|sms| sms.to == phone)
            .and_then(|sms| extract_code(&sms.text))
    }
}

/// The first run of 6 to 9 digits (a code's possible lengths) in an SMS text.
pub fn extract_code(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|run| (6..=9).contains(&run.len()))
        .map(str::to_owned)
}

async fn receive(
    State(shared): State<Arc<CarrierShared>>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reply = {
        let mut script = shared.script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap_or(Reply::Accept)
        } else {
            script.front().copied().unwrap_or(Reply::Accept)
        }
    };
    *shared.n_requests.lock().unwrap() += 1;
    let mut problems = Vec::new();
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        problems.push("content-type is not application/json".to_owned());
    }
    if let Some((name, value)) = shared.required_header.lock().unwrap().clone() {
        if headers.get(&name).and_then(|v| v.to_str().ok()) != Some(value.as_str()) {
            problems.push(format!("missing header {name}"));
        }
    }
    let sms = match serde_json::from_slice::<ReceivedSms>(&body) {
        Ok(sms) => Some(sms),
        Err(error) => {
            problems.push(format!("body does not match the wire format: {error}"));
            None
        }
    };
    if let Some(sms) = &sms {
        if !sms.to.starts_with('+') || !sms.to[1..].bytes().all(|b| b.is_ascii_digit()) {
            problems.push(format!("to is not E.164: {}", sms.to));
        }
        if !sms.receipt_url.starts_with("http://") || !sms.receipt_url.contains("/v1/carriers/") {
            problems.push(format!("receipt_url looks wrong: {}", sms.receipt_url));
        }
    }
    if !problems.is_empty() {
        shared.violations.lock().unwrap().extend(problems);
        return (http::StatusCode::BAD_REQUEST, "wire format violation").into_response();
    }
    let Some(sms) = sms else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    let reply = match reply {
        Reply::Capacity(per_sec) => {
            let now = tokio::time::Instant::now();
            let mut accepted_at = shared.accepted_at.lock().unwrap();
            while accepted_at
                .front()
                .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
            {
                accepted_at.pop_front();
            }
            if accepted_at.len() < per_sec as usize {
                accepted_at.push_back(now);
                Reply::Accept
            } else {
                *shared.n_throttled.lock().unwrap() += 1;
                Reply::Status(429, None)
            }
        }
        Reply::SlowStatus(delay, status) => {
            tokio::time::sleep(delay).await;
            Reply::Status(status, None)
        }
        other => other,
    };
    match reply {
        Reply::Accept | Reply::Slow(_) | Reply::SlowAnswer(_) => {
            if let Reply::Slow(delay) = reply {
                tokio::time::sleep(delay).await;
            }
            let carrier_message_id = format!("cm-{}", sms.message_id);
            let delivery = shared.delivery.lock().unwrap().clone();
            if let Some((delay, token)) = delivery {
                tokio::spawn(deliver_later(
                    shared.clone(),
                    sms.clone(),
                    carrier_message_id.clone(),
                    delay,
                    token,
                ));
            }
            shared.received.lock().unwrap().push(sms);
            shared.arrived.notify_waiters();
            if let Reply::SlowAnswer(delay) = reply {
                tokio::time::sleep(delay).await;
            }
            axum::Json(serde_json::json!({ "carrier_message_id": carrier_message_id }))
                .into_response()
        }
        Reply::AcceptWithBody(body) => {
            shared.received.lock().unwrap().push(sms);
            shared.arrived.notify_waiters();
            (http::StatusCode::OK, body).into_response()
        }
        Reply::Capacity(_) | Reply::SlowStatus(..) => {
            http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Reply::Status(status, retry_after) => {
            let status = http::StatusCode::from_u16(status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, "no").into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from(secs));
            }
            response
        }
    }
}

/// Hands an accepted SMS to its handset after `delay`, then posts its `delivered` receipt.
async fn deliver_later(
    shared: Arc<CarrierShared>,
    sms: ReceivedSms,
    carrier_message_id: String,
    delay: Duration,
    token: String,
) {
    tokio::time::sleep(delay).await;
    let url = sms.receipt_url.clone();
    shared
        .handset
        .lock()
        .unwrap()
        .push((sms, tokio::time::Instant::now()));
    let body =
        serde_json::json!({ "carrier_message_id": carrier_message_id, "status": "delivered" });
    let posted = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    if let Err(error) = posted {
        shared
            .violations
            .lock()
            .unwrap()
            .push(format!("receipt not posted: {error}"));
    }
}

/// Captured log output.
#[derive(Debug, Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line, at trace level, emitted on this thread until the guard drops. Use it
/// in a current-thread `#[tokio::test]`, where every task of the gateway runs on this thread.
///
/// One global subscriber serves every test of the binary and writes to the buffer of the
/// thread that logs, if that thread captures. (A thread-local default subscriber per test would
/// be simpler, but tracing caches each call site's interest process-wide, and a call site first
/// reached by a thread with no subscriber could then stay silent in a capturing test.)
pub fn capture_logs() -> (Logs, CaptureGuard) {
    install_log_capture();
    let logs = Logs::default();
    CAPTURE.with(|capture| *capture.borrow_mut() = Some(logs.clone()));
    (logs, CaptureGuard { _private: () })
}

/// Installs the process-wide subscriber that [`capture_logs`] reads from. Every gateway and
/// fake carrier the harness starts calls it first, so that it is in place before any call site
/// is first reached: tracing caches call-site interest, and one first reached while no
/// subscriber was installed could stay silent.
pub fn install_log_capture() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            // No timestamps: their digits could match a code by chance.
            .without_time()
            .with_writer(|| ThreadWriter)
            // A dynamic filter: it is asked at every event, never cached per call site (a plain
            // `filter_fn` caches its first answer, given on whatever thread got there first).
            // The binary's own silencing applies here too (gateway::SILENCED_LOG_TARGETS).
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(
                |metadata, _| {
                    gateway::log_target_allowed(metadata.target())
                        && CAPTURE.with(|capture| capture.borrow().is_some())
                },
            ));
        // Another subscriber may already be global in this process; capturing then finds
        // nothing, and the tests that capture say so.
        let _ = tracing_subscriber::registry().with(layer).try_init();
    });
}

/// Stops this thread's capture when dropped.
#[derive(Debug)]
pub struct CaptureGuard {
    _private: (),
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|capture| *capture.borrow_mut() = None);
    }
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capturing thread's buffer.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|capture| {
            if let Some(logs) = capture.borrow_mut().as_mut() {
                logs.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Milliseconds since the Unix epoch of a timestamp as the API writes them
/// (`2025-03-14T09:26:53.589Z`, RFC 3339 in UTC with milliseconds).
pub fn epoch_ms(text: &str) -> u64 {
    let time = humantime::parse_rfc3339(text)
        .unwrap_or_else(|error| panic!("not an RFC 3339 timestamp: {text:?}: {error}"));
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a time after 1970")
        .as_millis() as u64;
    assert_eq!(
        gateway::clock::rfc3339(ms),
        text,
        "the API writes milliseconds in UTC"
    );
    ms
}

/// The SHA-256 of an API key, hex, as `api_key_sha256` wants it.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// A unique valid Italian mobile number for test `n`.
pub fn phone(n: u32) -> String {
    format!("+39333{:07}", n % 10_000_000)
}

/// A frontend's webhook endpoint: records every event posted to it and answers with the
/// statuses the test scripts (the last one repeats).
#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<ReceiverShared>,
}

#[derive(Debug, Default)]
struct ReceiverShared {
    statuses: Mutex<VecDeque<u16>>,
    /// How long to wait before answering.
    delay: Mutex<Duration>,
    posts: Mutex<Vec<WebhookPost>>,
    arrived: Notify,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct WebhookPost {
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub signature: Option<String>,
    pub body: bytes::Bytes,
    /// What the receiver answered.
    pub status: u16,
}

impl WebhookReceiver {
    /// Starts a receiver on 127.0.0.1 port 0 that answers `200` to everything.
    pub async fn start() -> WebhookReceiver {
        let shared = Arc::new(ReceiverShared::default());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let app = axum::Router::new()
            .route("/hook", post(receive_event))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Statuses to answer with from now on, in order; the last one repeats.
    pub fn answer(&self, statuses: &[u16]) {
        let mut script = self.shared.statuses.lock().unwrap();
        script.clear();
        script.extend(statuses);
    }

    /// Waits this long before each answer.
    pub fn delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Every request so far.
    pub fn posts(&self) -> Vec<WebhookPost> {
        self.shared.posts.lock().unwrap().clone()
    }

    /// Waits until a post matching `wanted` arrived, or panics after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        wanted: impl Fn(&WebhookPost) -> bool,
    ) -> WebhookPost {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(post) = self.posts().into_iter().find(|post| wanted(post)) {
                return post;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("no such webhook post; got {:?}", self.posts());
            }
        }
    }

    /// Waits for a `200`-answered event of type `event_type`; returns its JSON.
    pub async fn wait_for_event(&self, event_type: &str) -> Value {
        let post = self
            .wait_for(Duration::from_secs(10), |post| {
                post.status == 200 && post.event_type.as_deref() == Some(event_type)
            })
            .await;
        serde_json::from_slice(&post.body).expect("event body is JSON")
    }
}

impl WebhookPost {
    /// Whether the `Otpgate-Signature` header is `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
    /// under `secret`, and its timestamp is within five minutes of `now_secs`.
    pub fn signed_with(&self, secret: &str, now_secs: u64) -> bool {
        use hmac::Mac;
        let Some(header) = &self.signature else {
            return false;
        };
        let mut timestamp = None;
        let mut signature = None;
        for part in header.split(',') {
            match part.split_once('=') {
                Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
                Some(("v1", value)) => signature = hex::decode(value).ok(),
                _ => {}
            }
        }
        let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
            return false;
        };
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&self.body);
        mac.verify_slice(&signature).is_ok() && timestamp.abs_diff(now_secs) <= 300
    }
}

async fn receive_event(
    State(shared): State<Arc<ReceiverShared>>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> http::StatusCode {
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = {
        let mut script = shared.statuses.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap_or(200)
        } else {
            script.front().copied().unwrap_or(200)
        }
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    shared.posts.lock().unwrap().push(WebhookPost {
        event_id: header("otpgate-event-id"),
        event_type: header("otpgate-event-type"),
        signature: header("otpgate-signature"),
        body,
        status,
    });
    shared.arrived.notify_waiters();
    http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

//! The virtual users' HTTP client for the gateway's API: pooled keep-alive connections, at most
//! `connections` requests in flight, each with a timeout.
//!
//! Waiting for a connection counts in a request's latency (it is measured from the intended
//! start), so a pool too small for the load shows up in the figures; the run's self-watch
//! reports how often requests had to wait for one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::rehearsal::connect::Connector;

/// The largest answer read from the gateway.
const MAX_ANSWER: usize = 64 * 1024;

/// A cheap-clone API client.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    base: String,
    client: Client<Connector, Full<Bytes>>,
    permits: Semaphore,
    timeout: Duration,
    /// Requests that found every connection busy.
    pub waited_for_connection: AtomicU64,
}

/// An answer: its status and JSON body (`Value::Null` when it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Api {
    /// `base` is the gateway's URL (`http://127.0.0.1:8080`), without a trailing slash.
    pub fn new(base: &str, connector: Connector, connections: usize, timeout: Duration) -> Api {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Api {
            inner: Arc::new(Inner {
                base: base.trim_end_matches('/').to_owned(),
                client,
                permits: Semaphore::new(connections),
                timeout,
                waited_for_connection: AtomicU64::new(0),
            }),
        }
    }

    /// POSTs `body` to `path` with the API key; `None` when no answer came (connection error or
    /// timeout).
    pub async fn post(&self, path: &str, api_key: Option<&str>, body: &Value) -> Option<Answer> {
        let body = Bytes::from(serde_json::to_vec(body).ok()?);
        self.request(http::Method::POST, path, api_key, body).await
    }

    /// GETs `path` and returns its status and body as text (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> Option<(u16, String)> {
        let request = http::Request::get(format!("{}{path}", self.inner.base))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let exchange = async {
            let response = self.inner.client.request(request).await.ok()?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), 16 * 1024 * 1024)
                .collect()
                .await
                .ok()?
                .to_bytes();
            Some((status, String::from_utf8_lossy(&bytes).into_owned()))
        };
        tokio::time::timeout(self.inner.timeout, exchange)
            .await
            .ok()
            .flatten()
    }

    pub async fn get(&self, path: &str, api_key: Option<&str>) -> Option<Answer> {
        self.request(http::Method::GET, path, api_key, Bytes::new())
            .await
    }

    /// Requests that had to wait for a free connection.
    pub fn waited_for_connection(&self) -> u64 {
        self.inner.waited_for_connection.load(Ordering::Relaxed)
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        api_key: Option<&str>,
        body: Bytes,
    ) -> Option<Answer> {
        let inner = &*self.inner;
        let permit = match inner.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                inner.waited_for_connection.fetch_add(1, Ordering::Relaxed);
                inner.permits.acquire().await.ok()?
            }
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", inner.base))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(key) = api_key {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request.body(Full::new(body)).ok()?;
        let exchange = async {
            let response = inner.client.request(request).await.ok()?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .ok()?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Some(Answer { status, body })
        };
        let answer = tokio::time::timeout(inner.timeout, exchange)
            .await
            .ok()
            .flatten();
        drop(permit);
        answer
    }
}

//! The accept loop shared by the API and admin listeners, and the guards on its connections.
//!
//! A connection permit is taken *before* `accept`, so the gateway never holds more connections
//! than `max_connections` (the machine allows 20,000 open files per process). A connection from
//! an address that already holds `max_connections_per_ip` (an IPv6 /64 counts as one address) is
//! closed at once. Each connection is served by hyper-util's auto builder (HTTP/1.1 keep-alive or
//! HTTP/2) and driven by `drive`, which holds its deadlines, since neither hyper-util's first
//! read (telling HTTP/1 from HTTP/2) nor hyper's HTTP/2 server has one:
//! - the *prelude*: the first request's headers (for HTTP/2, the preface, the settings and the
//!   first `HEADERS`) must have arrived within `prelude_timeout`, or the connection is dropped;
//! - *idle*: a connection with no request in flight for `idle_timeout` is shut down gracefully
//!   (HTTP/2: a `GOAWAY`), and dropped if it has not ended within another `prelude_timeout`;
//! - each request body must be complete within `body_timeout` of its headers (`DeadlineBody`;
//!   the API answers `408`);
//! - HTTP/2 keep-alive pings find peers that went away.
//!
//! On shutdown every connection is shut down gracefully (idle ones close at once, requests in
//! flight finish), and `serve` waits up to the grace period for all of them to end.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{Builder, HttpServerConnExec, UpgradeableConnection};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::ConnectionPolicy;
use crate::metrics::{ConnectionClosed, ListenerMetrics};
use crate::routes::PeerAddr;
use crate::sync::lock;

/// Serves `app` on `listener` under `policy` until `shutdown` fires, then waits up to `grace`
/// for open connections to finish. Returns whether every connection finished in time.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    policy: ConnectionPolicy,
    metrics: ListenerMetrics,
    shutdown: CancellationToken,
    grace: Duration,
) -> bool {
    let max_connections = u32::try_from(policy.max_connections).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    let per_ip = Arc::new(PerIp::new(policy.max_per_ip));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's timer runs from the moment it waits for a request's head, idle time included:
        // `drive` closes idle connections first, and this only backs it up.
        .header_read_timeout(policy.idle_timeout + policy.prelude_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(policy.ping.map(|ping| ping.interval));
    if let Some(ping) = policy.ping {
        builder.http2().keep_alive_timeout(ping.timeout);
    }

    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = per_ip.enter(peer.ip()) else {
            // Dropping the stream closes it; the permit goes back at once.
            metrics.closed(ConnectionClosed::PerIpCap);
            tracing::debug!(peer = %mask_peer(peer), "connection over the per-address cap closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = {
            let app = app.clone();
            let activity = activity.clone();
            let metrics = metrics.clone();
            let body_timeout = policy.body_timeout;
            hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
                let in_flight = activity.begin();
                request.extensions_mut().insert(PeerAddr(peer));
                let request = request.map(|body| {
                    if body.is_end_stream() {
                        axum::body::Body::new(body)
                    } else {
                        axum::body::Body::new(DeadlineBody::new(
                            body,
                            Instant::now() + body_timeout,
                            metrics.clone(),
                        ))
                    }
                });
                let response = app.clone().oneshot(request);
                async move {
                    let response = response.await;
                    drop(in_flight);
                    response
                }
            })
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        metrics.opened();
        tokio::spawn(async move {
            let closed = drive(connection, &activity, &policy, &shutdown, peer).await;
            if let Some(reason) = closed {
                metrics.closed(reason);
            }
            metrics.ended();
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends: all of them back means all ended.
    tokio::time::timeout(grace, permits.acquire_many(max_connections))
        .await
        .is_ok()
}

/// Drives one connection to its end under `policy`'s deadlines and `shutdown`. Returns why the
/// gateway closed it, when it did so before the peer.
async fn drive<C, E>(
    connection: C,
    activity: &Activity,
    policy: &ConnectionPolicy,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> Option<ConnectionClosed>
where
    C: Future<Output = Result<(), E>> + GracefulConnection,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let mut shutdown_seen = false;
    // Set when `drive` shut the connection down: why, and when to drop it if it has not ended.
    let mut closing: Option<(ConnectionClosed, Instant)> = None;
    loop {
        let check_at = match closing {
            Some((_, drop_at)) => drop_at,
            None => activity.next_check(policy),
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(peer = %mask_peer(peer), %error, "connection ended with an error");
                }
                return closing.map(|(reason, _)| reason);
            }
            () = shutdown.cancelled(), if !shutdown_seen => {
                // Requests in flight finish; `serve`'s grace period bounds the wait.
                shutdown_seen = true;
                connection.as_mut().shut_down();
            }
            () = tokio::time::sleep_until(check_at) => {
                if let Some((reason, _)) = closing {
                    return Some(reason);
                }
                match activity.due(policy) {
                    Some(ConnectionClosed::PreludeTimeout) => {
                        // Nothing was asked of it: drop it, whatever half of a prelude it sent.
                        return Some(ConnectionClosed::PreludeTimeout);
                    }
                    Some(reason) => {
                        connection.as_mut().shut_down();
                        closing = Some((reason, Instant::now() + policy.prelude_timeout));
                    }
                    None => {}
                }
            }
        }
    }
}

/// A connection that can be asked to finish what it is doing and close.
trait GracefulConnection {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for UpgradeableConnection<'_, I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: HttpServerConnExec<S::Future, B>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What a connection is doing, as its deadlines need it: requests begun, requests in flight and
/// when the last one ended.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    n_begun: AtomicU64,
    n_in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_ended_ms: AtomicU64,
}

// === impl Activity ===

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            n_begun: AtomicU64::new(0),
            n_in_flight: AtomicUsize::new(0),
            last_ended_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.n_begun.fetch_add(1, Ordering::Relaxed);
        self.n_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn end(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ended_ms.store(ms, Ordering::Relaxed);
        self.n_in_flight.fetch_sub(1, Ordering::Release);
    }

    /// When to look at the connection next: at its prelude deadline, or when it would have
    /// been idle for `idle_timeout`, whichever may come first. A request that ends between two
    /// looks is seen at the next one, so an idle connection closes within 1.25 `idle_timeout`.
    fn next_check(&self, policy: &ConnectionPolicy) -> Instant {
        if self.n_begun.load(Ordering::Relaxed) == 0 {
            self.opened + policy.prelude_timeout.min(policy.idle_timeout)
        } else if self.n_in_flight.load(Ordering::Acquire) > 0 {
            Instant::now() + policy.idle_timeout / 4
        } else {
            self.idle_since() + policy.idle_timeout
        }
    }

    /// The deadline the connection has passed, if any.
    fn due(&self, policy: &ConnectionPolicy) -> Option<ConnectionClosed> {
        let now = Instant::now();
        if self.n_begun.load(Ordering::Relaxed) == 0 {
            (now >= self.opened + policy.prelude_timeout)
                .then_some(ConnectionClosed::PreludeTimeout)
        } else if self.n_in_flight.load(Ordering::Acquire) > 0 {
            None
        } else {
            (now >= self.idle_since() + policy.idle_timeout).then_some(ConnectionClosed::Idle)
        }
    }

    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ended_ms.load(Ordering::Relaxed))
    }
}

/// A request in flight on a connection; dropping it (the response is ready, or the request was
/// cancelled) ends it.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Connections open per address, against a cap.
#[derive(Debug)]
struct PerIp {
    cap: Option<usize>,
    open: Mutex<HashMap<AddressKey, usize>>,
}

/// An address as the per-address cap counts it: IPv4 whole (IPv4-mapped IPv6 too), IPv6 by /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AddressKey {
    V4(u32),
    V6(u64),
}

/// One connection's place in its address's count; dropping it gives the place back.
struct Slot {
    per_ip: Arc<PerIp>,
    key: Option<AddressKey>,
}

// === impl PerIp ===

impl PerIp {
    fn new(cap: Option<usize>) -> PerIp {
        PerIp {
            cap,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a connection from `ip`, or `None` when its address holds the cap already.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let Some(cap) = self.cap else {
            return Some(Slot {
                per_ip: self.clone(),
                key: None,
            });
        };
        let key = AddressKey::of(ip);
        let mut open = lock(&self.open);
        let n_open = open.entry(key).or_insert(0);
        if *n_open >= cap {
            return None;
        }
        *n_open += 1;
        Some(Slot {
            per_ip: self.clone(),
            key: Some(key),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut open = lock(&self.per_ip.open);
        if let Some(n_open) = open.get_mut(&key) {
            *n_open -= 1;
            if *n_open == 0 {
                open.remove(&key);
            }
        }
    }
}

// === impl AddressKey ===

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.into()),
                None => AddressKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// The error a request body gives when it was not complete by its deadline; the API answers it
/// with `408 body_timeout`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body not complete within body_timeout_ms")]
pub struct BodyTimedOut;

/// A request body that fails with [`BodyTimedOut`] once `deadline` passes before its end.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    /// Made on the first poll, so a body nobody reads costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    metrics: ListenerMetrics,
    timed_out: bool,
}

// === impl DeadlineBody ===

impl DeadlineBody {
    fn new(inner: Incoming, deadline: Instant, metrics: ListenerMetrics) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline,
            sleep: None,
            metrics,
            timed_out: false,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(Some(Err(BodyTimedOut.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        this.timed_out = true;
        this.metrics.closed(ConnectionClosed::BodyTimeout);
        Poll::Ready(Some(Err(BodyTimedOut.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Peers are logged by address family and port only at debug level; citizen IPs are personal data.
fn mask_peer(peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V4(_) => format!("ipv4:{}", peer.port()),
        SocketAddr::V6(_) => format!("ipv6:{}", peer.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64_bit_prefix() {
        let a = AddressKey::of("2001:db8:1:2::1".parse().unwrap());
        let b = AddressKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = AddressKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let mapped = AddressKey::of("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped, AddressKey::of("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn an_address_at_its_cap_gets_no_slot_until_one_is_given_back() {
        let per_ip = Arc::new(PerIp::new(Some(2)));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let first = per_ip.enter(ip).expect("first");
        let _second = per_ip.enter(ip).expect("second");
        assert!(per_ip.enter(ip).is_none(), "a third is over the cap");
        assert!(per_ip.enter("192.0.2.8".parse().unwrap()).is_some());
        drop(first);
        assert!(per_ip.enter(ip).is_some(), "a place was given back");
    }

    #[test]
    fn no_cap_gives_every_connection_a_slot() {
        let per_ip = Arc::new(PerIp::new(None));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let slots: Vec<Slot> = (0..1000).filter_map(|_| per_ip.enter(ip)).collect();
        assert_eq!(slots.len(), 1000);
        assert!(lock(&per_ip.open).is_empty());
    }
}

//! The accept loop shared by the API and admin listeners.
//!
//! A connection permit is taken *before* `accept`, so the gateway never holds more connections
//! than `max_connections` (the machine allows 20,000 open files per process). Each connection is
//! served by hyper-util's auto builder (HTTP/1.1 keep-alive or HTTP/2) and watched by a
//! `GracefulShutdown`, so that on shutdown idle connections close at once and in-flight requests
//! finish, within the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::routes::PeerAddr;

/// How long a client may take to send its request headers (slow-loris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` fires, then waits up to `grace` for open
/// connections to finish. Returns whether every connection finished in time.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    shutdown: CancellationToken,
    grace: Duration,
) -> bool {
    let permits = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);

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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            app.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(peer = %mask_peer(peer), error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok()
}

/// Peers are logged by address family and port only at debug level; citizen IPs are personal data.
fn mask_peer(peer: SocketAddr) -> String {
    match peer {
        SocketAddr::V4(_) => format!("ipv4:{}", peer.port()),
        SocketAddr::V6(_) => format!("ipv6:{}", peer.port()),
    }
}

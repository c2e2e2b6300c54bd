//! The accept loop of the benchmark servers.
//!
//! Connections are served by hyper-util's auto builder (HTTP/1.1 with keep-alive, or h2c),
//! one task each, with `TCP_NODELAY` set so small answers leave at once.
//! Both the sink and the bare server go through here,
//! so the two differ only in what their service does.

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Flags shared by the subcommands that run a server.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port, printed on the first line of stdout.
    #[arg(long, env = "LOADGEN_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// How long to back off after a failed `accept`, e.g. when out of file descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Binds `listen` and prints `listening on ADDR` as the first line of stdout,
/// so that a script can start the server on port 0 and read the port back.
///
/// # Errors
///
/// Fails if the address cannot be bound or stdout cannot be written.
pub async fn bind_and_announce(listen: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on {local_addr}")?;
    stdout.flush()?;
    Ok(listener)
}

/// Serves `service` on every connection accepted from `listener` until `shutdown` resolves.
///
/// Open connections are dropped, not drained, when it returns:
/// these servers exist for benchmarks, and their callers read any counters first.
pub async fn serve<S>(listener: TcpListener, service: S, shutdown: impl Future<Output = ()>)
where
    S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    eprintln!("accept failed: {error}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // A failure here only costs latency, so it is not worth dropping the connection.
        let _ = stream.set_nodelay(true);
        let builder = Arc::clone(&builder);
        let service = service.clone();
        tokio::spawn(async move {
            // Clients that hang up mid-request are normal under load; there is no one to tell.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

//! Outgoing connections to the gateway, spread over several local source addresses.
//!
//! One source address can hold only about 28,000 connections to one gateway address (the
//! ephemeral port range). With `--source-ip 127.0.0.2 --source-ip 127.0.0.3 …` each new
//! connection binds the next address in turn, with `IP_BIND_ADDRESS_NO_PORT` so that the kernel
//! picks the port at `connect` by the whole 4-tuple instead of reserving one at `bind`.
//! Without source addresses, connections come from whatever the kernel chooses.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// A connector for hyper-util's pooled client.
#[derive(Clone, Debug, Default)]
pub struct Connector {
    sources: Arc<[IpAddr]>,
    next: Arc<AtomicUsize>,
}

impl Connector {
    pub fn new(sources: Vec<IpAddr>) -> Connector {
        Connector {
            sources: sources.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn connect(self, uri: http::Uri) -> std::io::Result<TokioIo<TcpStream>> {
        let host = uri
            .host()
            .ok_or_else(|| std::io::Error::other("no host in the URL"))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let target = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("the host has no address"))?;
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let index = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            bind_no_port(&socket, SocketAddr::new(self.sources[index], 0))?;
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }
}

/// Binds `socket` to `addr` (port 0) and lets `connect` choose the port.
fn bind_no_port(socket: &TcpSocket, addr: SocketAddr) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)?;
    socket.bind(addr)
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// The process's open-file limit (soft), raised to the hard limit if it is lower; `None` where
/// it cannot be read.
pub fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// The local ports the kernel hands out for outgoing connections, from
/// `/proc/sys/net/ipv4/ip_local_port_range`.
pub fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|part| part.parse::<u64>().ok());
    let (low, high) = (parts.next()??, parts.next()??);
    Some(high.saturating_sub(low) + 1)
}

#[cfg(test)]
mod tests {
    use tower_service::Service;

    use super::*;

    /// Connections leave from each source address in turn.
    #[tokio::test]
    async fn connections_take_the_source_addresses_in_turn() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: http::Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let sources: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        let mut connector = Connector::new(sources.clone());
        let mut peers = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..4 {
            streams.push(connector.call(uri.clone()).await.unwrap());
            let (_, peer) = listener.accept().await.unwrap();
            peers.push(peer.ip());
        }
        assert_eq!(peers, [sources[0], sources[1], sources[0], sources[1]]);
    }

    #[test]
    fn reads_the_limits() {
        assert!(raise_open_files_limit().is_some_and(|limit| limit >= 1024));
        assert!(ephemeral_ports().is_some_and(|ports| ports > 1000));
    }
}

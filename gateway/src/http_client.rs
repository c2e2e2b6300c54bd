//! The pooled HTTP client that carriers and webhooks are both reached with.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::HttpVersion;

/// A pooled client over rustls, sending whole bodies.
pub(crate) type PooledClient = Client<hyper_rustls::HttpsConnector<TcpConnector>, Full<Bytes>>;

/// The pooled HTTP client both carriers and webhooks are reached with: keep-alive connections
/// (up to `max_idle` kept per host), TLS by rustls with the webpki roots, and HTTP/1.1 or
/// HTTP/2 as `version` says.
pub(crate) fn pooled(
    connect_timeout: Duration,
    max_idle: usize,
    version: HttpVersion,
) -> Result<PooledClient, std::io::Error> {
    let mut tcp = TcpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout.min(Duration::from_secs(5))));
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match version {
        HttpVersion::Http1 => builder.enable_http1().wrap_connector(tcp),
        HttpVersion::Auto | HttpVersion::Http2 => builder.enable_all_versions().wrap_connector(tcp),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if version == HttpVersion::Http2 {
        client
            .http2_only(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true);
    }
    Ok(client.build(connector))
}

//! The bare server: the baseline that API throughput is measured against (docs/DESIGN.md section 7).
//!
//! It reads each request's body, as any server must before reusing the connection,
//! and answers `202` with a small fixed JSON body; it does nothing else.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::bench::server;

/// Largest request body read; the rest of a larger one is not read.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The body of every answer.
const BODY: &[u8] = br#"{"status":"accepted"}"#;

/// Serves the bare server on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    server::serve(listener, service_fn(handle), shutdown).await;
}

/// Answers any request `202` with `{"status":"accepted"}`.
///
/// # Errors
///
/// Never fails; the error type is the one hyper's services need.
pub async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Whatever the client sent is discarded; an aborted body changes nothing for the answer.
    let _ = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    *response.status_mut() = StatusCode::ACCEPTED;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

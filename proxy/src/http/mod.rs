//! HTTP plumbing shared by inbound and outbound: the response body type, the proxy's own
//! responses (errors in the caller's protocol), and serving a detected connection with hyper.

pub(crate) mod forward;
pub(crate) mod observe;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::drain::Drain;
use crate::io::ServerIo;
pub(crate) use crate::respond::{is_grpc, local_response};

/// HTTP/2 flow-control window per stream, both ways: 256 KiB moves 256 MB/s at 1 ms RTT.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Largest request head (request line + headers) accepted over HTTP/1.1 and HTTP/2.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A tower service whose `poll_ready` always returns `Ready` (the proxy's [`Stack`]: no layer
/// applies back-pressure through readiness), so it may be called without being polled first.
///
/// [`Stack`]: crate::listener::Stack
pub(crate) trait AlwaysReady {}

impl AlwaysReady for crate::listener::Stack {}

/// hyper's `Service` over an [`AlwaysReady`] tower service, called as soon as hyper has a
/// request: hyper keeps the call's future per stream, nothing else. hyper-util's
/// `TowerToHyperService` keeps a clone of the service and the request until its first poll,
/// and hyper sizes every stream's task for that (464 bytes against 144 for our future).
#[derive(Clone)]
struct Called<S>(S);

impl<S, R> hyper::service::Service<R> for Called<S>
where
    S: tower::Service<R> + AlwaysReady + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> S::Future {
        // A clone per request, as `TowerToHyperService` makes: tower's `call` takes `&mut`.
        self.0.clone().call(req)
    }
}

/// Serves one HTTP/1.1 connection until it ends, or until the drain asks it to finish.
pub async fn serve_h1<S, B>(io: ServerIo, svc: S, drain: &Drain, header_timeout: Duration)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
        + AlwaysReady
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), Called(svc))
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "HTTP/1.1 connection ended with an error");
    }
}

/// Serves one HTTP/2 connection; on drain it sends a graceful GOAWAY and lets streams finish.
pub async fn serve_h2<S, B, I>(io: I, svc: S, drain: &Drain)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
        + AlwaysReady
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // What one client may make the proxy buffer (the app reads slowly): a stream window
        // per stream and 1 MiB per connection, so memory is bounded by the connection limit.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(4 * STREAM_WINDOW)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), Called(svc));
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}

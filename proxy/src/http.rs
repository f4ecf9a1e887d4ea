//! HTTP plumbing shared by inbound and outbound: the response body type, the proxy's own
//! responses (errors in the caller's protocol), and serving a detected connection with hyper.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use crate::drain::Drain;
use crate::io::ServerIo;

/// HTTP/2 flow-control window per stream, both ways: 256 KiB moves 256 MB/s at 1 ms RTT.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Largest request head (request line + headers) accepted over HTTP/1.1 and HTTP/2.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A response written by the proxy. For gRPC callers it is a trailers-only response carrying
/// `grpc-status` (so the client sees a gRPC error, not a protocol error); for everyone else an
/// HTTP status with a one-line plain-text body.
pub fn local_response(status: StatusCode, grpc: bool, message: &str) -> Response<Full<Bytes>> {
    if grpc {
        let code = match status {
            StatusCode::BAD_REQUEST => "13", // INTERNAL: the request could not be routed
            StatusCode::NOT_FOUND => "12",   // UNIMPLEMENTED
            StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
            StatusCode::INTERNAL_SERVER_ERROR => "13", // INTERNAL
            _ => "14",                       // UNAVAILABLE
        };
        let mut rsp = Response::new(Full::new(Bytes::new()));
        let h = rsp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&grpc_message(message)) {
            h.insert("grpc-message", v);
        }
        return rsp;
    }
    let mut rsp = Response::new(Full::new(Bytes::from(format!("remora: {message}\n"))));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` stays as is.
fn grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Serves one HTTP/1.1 connection until it ends, or until the drain asks it to finish.
pub async fn serve_h1<S, B>(io: ServerIo, svc: S, drain: &Drain, header_timeout: Duration)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
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
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
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
pub async fn serve_h2<S, B>(io: ServerIo, svc: S, drain: &Drain)
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>>
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
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only() {
        let rsp = local_response(StatusCode::BAD_GATEWAY, true, "upstream 100% gone");
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["grpc-message"], "upstream 100%25 gone");
        let rsp = local_response(StatusCode::BAD_GATEWAY, false, "x");
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
    }
}

//! The proxy's own responses: errors in the caller's protocol (a leaf: the layers, forwarding
//! and the listeners all answer with it).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;

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
            StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
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

//! Request-phase hooks: the embedding application's own logic at named points of every HTTP
//! request, in both directions (much lighter than Pingora's `ProxyHttp`: plain synchronous
//! methods with no-op defaults, so a hook costs one virtual call per phase).
//!
//! Where they run, in order (see ARCHITECTURE.md, "request path"):
//!
//! 1. [`Hooks::on_request`]: after header scrubbing and identity (the inbound request carries
//!    the verified `x-remora-client-id`), before routing; may change the head or answer.
//! 2. [`Hooks::choose_destination`] (outbound): may send the request to another authority.
//! 3. [`Hooks::on_upstream_request`]: the head as it leaves for the chosen endpoint (once per
//!    try: a retry on another endpoint calls it again).
//! 4. [`Hooks::on_response`]: the response head, upstream's or the proxy's own error.
//! 5. [`Hooks::on_completion`]: when the response body has ended (or the client went away),
//!    with the status, gRPC status, duration and bytes — for logging.
//!
//! Upgrades (WebSocket) and `CONNECT` tunnels pass phases 1–3; what flows afterwards is bytes.
//! Hooks run on the proxy's runtime threads: keep them fast and never block.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{request, response};

use crate::direction::Direction;

/// What the proxy knows about a request when a phase runs.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RequestContext<'a> {
    /// Which listener the request came through.
    pub direction: Direction,
    /// Inbound: the caller's verified SPIFFE ID (mTLS), if any.
    pub client_identity: Option<&'a str>,
    /// Outbound: the normalised `host:port` the request asks for (in phase 1, as the client
    /// sent it; from phase 2 on, the one routed to). Inbound: `None`.
    pub destination: Option<&'a str>,
    /// The endpoint chosen, from phase 3 on.
    pub endpoint: Option<SocketAddr>,
}

/// A request that has ended, as [`Hooks::on_completion`] sees it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Completion {
    /// Which listener the request came through.
    pub direction: Direction,
    /// The request's method.
    pub method: http::Method,
    /// The request's URI as the client sent it.
    pub uri: http::Uri,
    /// The HTTP status sent to the client.
    pub status: http::StatusCode,
    /// `grpc-status` from the response headers or trailers.
    pub grpc_status: Option<u8>,
    /// From the request's arrival to the end of the response body.
    pub duration: Duration,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
    /// Inbound: the caller's verified SPIFFE ID (mTLS), if any.
    pub client_identity: Option<String>,
    /// The endpoint that answered, when one did.
    pub endpoint: Option<SocketAddr>,
    /// False when the client went away (or the body failed) before the end.
    pub finished: bool,
}

/// The application's logic at each request phase. Every method has a no-op default: implement
/// only the phases you need.
///
/// ```
/// use remora_proxy::{Hooks, RequestContext};
///
/// /// Refuses requests without an `authorization` header, and tags the rest.
/// struct RequireAuth;
///
/// impl Hooks for RequireAuth {
///     fn on_request(
///         &self,
///         req: &mut http::request::Parts,
///         _cx: &RequestContext<'_>,
///     ) -> Option<http::Response<bytes::Bytes>> {
///         if !req.headers.contains_key("authorization") {
///             let mut rsp = http::Response::new(bytes::Bytes::from_static(b"log in first\n"));
///             *rsp.status_mut() = http::StatusCode::UNAUTHORIZED;
///             return Some(rsp);
///         }
///         req.headers.insert("x-checked-by", http::HeaderValue::from_static("remora"));
///         None
///     }
/// }
/// ```
pub trait Hooks: Send + Sync + 'static {
    /// Phase 1. Inspect or change the request head; return a response to answer locally
    /// (it is not sent upstream; phases 4 and 5 still run).
    fn on_request(
        &self,
        req: &mut request::Parts,
        cx: &RequestContext<'_>,
    ) -> Option<http::Response<Bytes>> {
        let _ = (req, cx);
        None
    }

    /// Phase 2 (outbound only). Return an authority (`host:port`) to route to instead of
    /// the request's own; it is resolved like any other (static, discovery, DNS).
    fn choose_destination(&self, req: &request::Parts, cx: &RequestContext<'_>) -> Option<String> {
        let _ = (req, cx);
        None
    }

    /// Phase 3. The head as it is about to be sent to `cx.endpoint`. On a retry on another
    /// endpoint it runs again on the head as the previous try sent it (with this hook's earlier
    /// changes): set headers with `insert`, not `append`.
    fn on_upstream_request(&self, req: &mut request::Parts, cx: &RequestContext<'_>) {
        let _ = (req, cx);
    }

    /// Phase 4. The response head on its way to the client.
    fn on_response(&self, rsp: &mut response::Parts, cx: &RequestContext<'_>) {
        let _ = (rsp, cx);
    }

    /// Phase 5. The request is over. Its metrics (`remora_requests_total`, the duration
    /// histogram) are recorded just before this runs.
    fn on_completion(&self, done: &Completion) {
        let _ = done;
    }
}

/// The hooks of a proxy built without any: every phase does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// The endpoint that answered and the identity it proved, carried with the response's body
/// ([`crate::idle::Streamed`]) for the later phases and the per-route metrics.
pub(crate) struct Answered {
    pub(crate) addr: SocketAddr,
    pub(crate) identity: Option<std::sync::Arc<str>>,
}

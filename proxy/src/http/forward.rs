//! The innermost service of the request path: route the request, send it to an endpoint, and
//! turn every failure into an honest response in the caller's protocol.
//!
//! Also the two ways a request becomes a byte stream: `Upgrade` (WebSocket) and `CONNECT`
//! (the explicit-proxy tunnel for opaque TCP through the outbound listener).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::scrub::{CLIENT_ID_HEADER, Rules, Scrubbed};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper_util::rt::TokioIo;

use crate::balance::{Destination, PickError};
use crate::config::normalize_authority;
use crate::discover::{Destinations, ResolveError};
use crate::drain::Drain;
use crate::endpoint::{Endpoint, EndpointError, unbox};
use crate::hooks::{Answered, Hooks, RequestContext};
use crate::http::{is_grpc, local_response};
use crate::listener::Conn;
use crate::metrics::{Direction, ErrorKind, Metrics};
use crate::retry::SecondTry;
use crate::retry::replay::UpstreamBody;
use crate::scrub::Body;

/// Where a listener's requests go.
pub enum Route {
    /// Inbound: everything goes to the local application.
    App(Arc<Endpoint>),
    /// Outbound: the request's authority picks a destination.
    Destinations(Arc<Destinations>),
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(
        "request names no destination; send an absolute URI, an HTTP/2 :authority or a Host header"
    )]
    NoAuthority,
    #[error("malformed request authority: {0}")]
    BadAuthority(String),
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    Pick(#[from] PickError),
    #[error("{dst}: {source}")]
    Endpoint { dst: String, source: EndpointError },
    #[error("{dst} resolves to this proxy's own listener {addr}; refusing to loop")]
    Loop { dst: String, addr: SocketAddr },
    #[error("CONNECT is served on the outbound listener only")]
    ConnectInbound,
    #[error("a request hook panicked (a bug in the embedding application)")]
    HookPanicked,
    #[error("{dst}: no response within {after:?} ({why})")]
    Timeout {
        dst: String,
        after: Duration,
        /// Which deadline: the destination's policy or the caller's `grpc-timeout`.
        why: &'static str,
    },
    #[error("{dst}: tunnel to {addr} failed: {source}")]
    Upgrade {
        dst: String,
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl ForwardError {
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::NoAuthority | ForwardError::BadAuthority(_) => StatusCode::BAD_REQUEST,
            ForwardError::Endpoint { source, .. } if source.is_client_body() => {
                StatusCode::BAD_REQUEST
            }
            ForwardError::Resolve(_) | ForwardError::Pick(_) => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::ConnectInbound => StatusCode::METHOD_NOT_ALLOWED,
            ForwardError::HookPanicked => StatusCode::INTERNAL_SERVER_ERROR,
            ForwardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Endpoint { .. }
            | ForwardError::Loop { .. }
            | ForwardError::Upgrade { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ForwardError::NoAuthority
            | ForwardError::BadAuthority(_)
            | ForwardError::ConnectInbound => ErrorKind::BadRequest,
            ForwardError::Endpoint { source, .. } if source.is_client_body() => {
                ErrorKind::BadRequest
            }
            ForwardError::Resolve(_) | ForwardError::Pick(PickError::Empty { .. }) => {
                ErrorKind::NoEndpoints
            }
            ForwardError::Pick(PickError::Unavailable { .. }) => ErrorKind::ConnectFailed,
            ForwardError::Endpoint { source, .. } if source.is_connect() => {
                ErrorKind::ConnectFailed
            }
            ForwardError::Endpoint { .. } | ForwardError::Upgrade { .. } => {
                ErrorKind::UpstreamReset
            }
            ForwardError::Loop { .. } => ErrorKind::Loop,
            ForwardError::HookPanicked => ErrorKind::Hook,
            ForwardError::Timeout { .. } => ErrorKind::Timeout,
        }
    }
}

/// What the embedding application and the configuration add to every request of a listener.
#[derive(Clone, Default)]
pub struct PerRequest {
    /// The application's request phases.
    pub hooks: Option<Arc<dyn Hooks>>,
    /// Spans for sampled requests (`REMORA_TRACE_COLLECTOR`).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

/// One listener's forwarding: where its requests go and what its connections share.
pub struct Forwarder {
    pub direction: Direction,
    pub route: Route,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// The proxy's own listeners that a destination must never point back to.
    pub own_addrs: Vec<SocketAddr>,
    /// This host's addresses: any of them with an own port is the proxy itself.
    pub local_ips: Vec<std::net::IpAddr>,
    /// For trailers of responses (request trailers are scrubbed by the `Scrub` layer).
    pub rules: Arc<Rules>,
    /// The embedding application's request phases ([`crate::hooks`]).
    pub hooks: Arc<dyn Hooks>,
    /// False with [`crate::hooks::NoHooks`]: work done only for hooks (parsing the authority
    /// before phase 1) is skipped.
    pub hooks_active: bool,
    /// `REMORA_ACCESS_LOG`: one JSON line per (sampled) request on standard output.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// `REMORA_TRACE_COLLECTOR`: spans for sampled requests.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// Inbound, with a control plane: the rate limits of the addresses the app is reached on.
    pub limits: Option<Arc<crate::ratelimit::RateLimits>>,
}

#[derive(Clone)]
pub struct ForwardService {
    shared: Arc<Forwarder>,
    /// Strict mTLS, plaintext connection: only these probe paths (GET/HEAD) are served.
    probe_only: Option<Arc<Vec<String>>>,
    /// The connection's interception facts (original destination, app port).
    conn: Conn,
    /// The verified peer identity, as `Scrub` sets it in `x-remora-client-id`: what a failed
    /// request's log line names, without a lookup in every request's fields (nor a hook's
    /// rewrite of that field).
    client_id: Option<HeaderValue>,
}

impl ForwardService {
    pub fn new(
        shared: Arc<Forwarder>,
        probe_only: Option<Arc<Vec<String>>>,
        conn: Conn,
        client_id: Option<HeaderValue>,
    ) -> Self {
        ForwardService {
            shared,
            client_id,
            probe_only,
            conn,
        }
    }
}

/// A client's request on its way through the forwarding levels, boxed (see `call`).
///
/// Boxed with the body it goes upstream with, so that the same box goes down to the endpoint
/// (`Endpoint::send`, `send_h2`): each of those levels keeps its argument for as long as the
/// request is out, 8 bytes instead of the request's 296.
type Req = Box<Request<UpstreamBody>>;

/// The request a failure log line names (its body and the rest of its head are gone by then).
struct FailedAt {
    method: Method,
    path: Option<PathAndQuery>,
    client: Option<HeaderValue>,
}

/// How long a retryable answer waits for its request body to finish going out (an app may
/// answer before it has read the body) before it is passed on unretried.
const SETTLE: Duration = Duration::from_millis(100);

/// Longest route written to a log line; a path is client-controlled.
const MAX_LOGGED_ROUTE: usize = 256;

impl FailedAt {
    /// The path (`/pkg.Service/Method` for gRPC; never the query, which may hold secrets), cut
    /// at [`MAX_LOGGED_ROUTE`] bytes.
    fn route(&self) -> &str {
        let path = self.path.as_ref().map(|p| p.path()).unwrap_or("");
        let mut end = path.len().min(MAX_LOGGED_ROUTE);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        &path[..end]
    }

    /// The verified client (inbound over mTLS), `""` otherwise.
    fn client_identity(&self) -> &str {
        self.client
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A kubelet probe: GET/HEAD to a listed path, with no Upgrade (an upgrade would turn the
/// exempted plaintext connection into a tunnel past strict mode) and no body.
pub(crate) fn is_probe<B: http_body::Body>(req: &Request<B>, paths: &[String]) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(header::UPGRADE)
        && req.body().is_end_stream()
        && paths.iter().any(|p| p == req.uri().path())
}

impl tower::Service<Request<Scrubbed>> for ForwardService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    /// Always ready, and `crate::http::AlwaysReady` (the stack is called without a poll here)
    /// relies on it: a limit is applied per request in `call`, never through readiness.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Scrubbed>) -> Self::Future {
        let shared = self.shared.clone();
        let conn = self.conn.clone();
        let client_id_verified = self.client_id.clone();
        if let Some(paths) = &self.probe_only
            && !is_probe(&req, paths)
        {
            shared.metrics.tls(
                shared.direction,
                crate::metrics::TlsResult::RefusedPlaintext,
            );
            let mut rsp = local_response(
                StatusCode::FORBIDDEN,
                is_grpc(&req),
                "REMORA_MTLS=strict: plaintext is accepted only for the probe paths in REMORA_PROBE_PATHS; use mTLS",
            )
            .map(Either::Right);
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(rsp)));
        }
        if let (Some(limits), Some(local)) = (&shared.limits, conn.local) {
            let client = req
                .headers()
                .get(&CLIENT_ID_HEADER)
                .and_then(|v| v.to_str().ok());
            if !limits.is_probe(&req, client)
                && let Err(l) = limits.check(local, client, req.uri().path())
            {
                return Box::pin(std::future::ready(Ok(
                    shared.limited(&req, local, client, l)
                )));
            }
        }
        // Boxed once here: every level of the request's future below holds it (8 bytes
        // instead of the request's 296), and none of those levels' copies is ever used again
        // once the request has been handed to a connection.
        let mut req: Req = Box::new(req.map(UpstreamBody::Plain));
        Box::pin(async move {
            let grpc = is_grpc(&req);
            // Set by the `Scrub` layer from the verified peer (a client's own copy is gone).
            // Everything below marked "hooks" is skipped with `NoHooks`, so a proxy without
            // hooks pays one branch per phase.
            let client_id = match shared.hooks_active {
                true => req.headers().get(&CLIENT_ID_HEADER).cloned(),
                false => None,
            };
            // Outbound hooks see where the request asks to go; the route itself is read again
            // after `on_request`, which may change the head. Skipped without hooks.
            let asked = match (&shared.route, shared.hooks_active) {
                (Route::Destinations(_), true) => request_authority(&req).ok().flatten(),
                _ => None,
            };
            let cx = RequestContext {
                direction: shared.direction,
                client_identity: client_id.as_ref().and_then(|v| v.to_str().ok()),
                destination: asked.as_deref(),
                endpoint: None,
            };
            // The request stays where the block captured it (hooks see its head in place):
            // a moved copy would stay in this future for as long as the request is out.
            // Boxed: a hook's answer is rare, and this is kept while the request is out.
            let answered = match shared.hooks_active {
                false => None,
                true => with_head(&mut req, |head| {
                    match crate::panics::catch_sync(|| shared.hooks.on_request(head, &cx)) {
                        Some(Some(local)) => {
                            Some(Box::new(Ok(local.map(|b| Either::Right(Full::new(b))))))
                        }
                        Some(None) => None,
                        None => Some(Box::new(Err(ForwardError::HookPanicked))),
                    }
                }),
            };
            // What a failure's log line names: the route and the verified client. Reference
            // counts, not copies (the path and header bytes are shared with the request).
            let failed_at = FailedAt {
                method: req.method().clone(),
                path: req.uri().path_and_query().cloned(),
                client: client_id_verified,
            };
            let outcome = if let Some(answer) = answered {
                Some(*answer)
            } else {
                crate::panics::catch("request", shared.forward(req, &cx, &conn)).await
            };
            let rsp = match outcome {
                Some(Ok(rsp)) => rsp,
                Some(Err(e)) => {
                    shared.metrics.error(shared.direction, e.kind());
                    tracing::info!(
                        direction = shared.direction.as_str(),
                        method = %failed_at.method,
                        route = %failed_at.route(),
                        client_identity = failed_at.client_identity(),
                        error = %e,
                        "request failed"
                    );
                    local_response(e.status(), grpc, &e.to_string()).map(Either::Right)
                }
                None => {
                    shared.metrics.panics.inc();
                    local_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        grpc,
                        "internal error in the proxy (a bug, logged and counted in remora_panics_total)",
                    )
                    .map(Either::Right)
                }
            };
            if !shared.hooks_active {
                return Ok(rsp);
            }
            let endpoint = match rsp.body() {
                Either::Left(streamed) => streamed.answered().map(|a| a.addr),
                Either::Right(_) => None,
            };
            let (mut head, body) = rsp.into_parts();
            let cx = RequestContext { endpoint, ..cx };
            if crate::panics::catch_sync(|| shared.hooks.on_response(&mut head, &cx)).is_none() {
                shared.metrics.error(shared.direction, ErrorKind::Hook);
            }
            Ok(Response::from_parts(head, body))
        })
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Forwarder::send_within`]: the send, failed with
    /// [`ForwardError::Timeout`] if its deadline passes first.
    struct Within<'a, F> {
        #[pin]
        send: F,
        // Boxed: a timer entry is 112 bytes, and most requests have no deadline.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        limit: Option<Duration>,
        dst: &'a str,
        why: &'static str,
    }
}

impl<F: Future<Output = Result<Response<Body>, ForwardError>>> Future for Within<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.send.poll(cx) {
            return Poll::Ready(out);
        }
        match (this.deadline.as_mut(), *this.limit) {
            (Some(deadline), Some(after)) => {
                // Outside the task's cooperative budget, as tokio's `Timeout` does when its
                // future used the budget up: a send that exhausts it on every poll must not
                // keep its deadline from being seen.
                let check = std::future::poll_fn(|cx| deadline.as_mut().poll(cx));
                let check = std::pin::pin!(tokio::task::coop::unconstrained(check));
                std::task::ready!(check.poll(cx));
                Poll::Ready(Err(ForwardError::Timeout {
                    dst: this.dst.to_string(),
                    after,
                    why: this.why,
                }))
            }
            _ => Poll::Pending,
        }
    }
}

/// The authority a request is addressed to, as normalised `host:port`; `None` when it names
/// none, an error when what it names is malformed (a port beyond 65535, userinfo, no host).
pub fn request_authority<B>(req: &Request<B>) -> Result<Option<String>, String> {
    let from_host;
    let auth: &Authority = match req.uri().authority() {
        Some(a) => a,
        None => {
            let Some(host) = req.headers().get(header::HOST) else {
                return Ok(None);
            };
            let text = host
                .to_str()
                .map_err(|_| "the Host header is not ASCII".to_string())?;
            from_host = text
                .parse::<Authority>()
                .map_err(|_| format!("Host {text:?} is not a valid authority"))?;
            &from_host
        }
    };
    if auth.as_str().contains('@') {
        // RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs; forwarding it would put the
        // credentials in the Host the destination sees.
        return Err(format!(
            "authority {:?} carries userinfo (user:password@); send credentials in Authorization",
            auth.as_str()
        ));
    }
    // `Authority::port()` hides a port that does not fit 16 bits, so read it from the text.
    let written = auth
        .as_str()
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']') && !p.is_empty());
    let port = match written {
        None if req.uri().scheme_str() == Some("https") => 443,
        None => 80,
        Some(p) => p.parse::<u16>().map_err(|_| {
            format!(
                "authority {:?}: port {p} is not a number from 0 to 65535",
                auth.as_str()
            )
        })?,
    };
    normalize_authority(&format!("{}:{}", auth.host(), port))
        .map(Some)
        .ok_or_else(|| format!("authority {:?} names no usable host", auth.as_str()))
}

impl Forwarder {
    /// The answer to a request over its rate limit: `429` with `retry-after`, or
    /// `grpc-status: 8` (RESOURCE_EXHAUSTED); counted, and one debug line naming the policy.
    fn limited(
        &self,
        req: &Request<Scrubbed>,
        local: SocketAddr,
        client: Option<&str>,
        l: crate::ratelimit::Limited,
    ) -> Response<Body> {
        let scope = match (l.per_client, &l.route) {
            (true, _) => "client",
            (false, Some(_)) => "route",
            (false, None) => "total",
        };
        // The route label is one of the policy's own prefixes (at most MAX_ROUTES per
        // Service, written by its operator), never a path a caller chose.
        let route = l.route.as_deref().unwrap_or("").to_string();
        self.metrics
            .rate_limited
            .get_or_create(&crate::metrics::RateLimitedLabels {
                direction: self.direction,
                scope,
                route,
            })
            .inc();
        let policy = match (l.per_client, &l.route) {
            (true, _) => "remora.io/rate-limit-per-client".to_string(),
            (false, Some(r)) => format!("remora.io/rate-limit (route {r})"),
            (false, None) => "remora.io/rate-limit".to_string(),
        };
        tracing::debug!(%local, client = client.unwrap_or(""), limit = l.limit, "request refused by {policy} of the Service behind {local}");
        let msg = format!(
            "rate limited: {policy} {} requests per second for {local}",
            l.limit
        );
        let mut rsp =
            local_response(StatusCode::TOO_MANY_REQUESTS, is_grpc(req), &msg).map(Either::Right);
        let secs = l.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            rsp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        rsp
    }

    /// Not an `async fn`, for the reason [`Endpoint::send`] gives: the request is kept once.
    #[allow(clippy::manual_async_fn)] // on purpose: see `Endpoint::send`
    fn forward(
        &self,
        mut req: Req,
        cx: &RequestContext<'_>,
        conn: &Conn,
    ) -> impl Future<Output = Result<Response<Body>, ForwardError>> + Send {
        async move {
            let (dst, dest) = match (&self.route, conn.original) {
                (Route::App(app), _) => {
                    if req.method() == Method::CONNECT {
                        return Err(ForwardError::ConnectInbound);
                    }
                    let app = conn.app.as_ref().unwrap_or(app);
                    return self.send(req, "app", app, None, cx).await;
                }
                // Intercepted: the authority when discovery knows it, else where the app was
                // connecting (a ClusterIP, a meshed pod, or anything else, passed through).
                (Route::Destinations(d), Some(original)) if req.method() != Method::CONNECT => {
                    let name = match self.chosen(&mut req, cx)? {
                        Some(name) => Some(name),
                        None => request_authority(&req).ok().flatten(),
                    };
                    Box::pin(d.resolve_original(name.as_deref(), original)).await?
                }
                (Route::Destinations(d), _) => {
                    let name = match self.chosen(&mut req, cx)? {
                        Some(name) => name,
                        None => request_authority(&req)
                            .map_err(ForwardError::BadAuthority)?
                            .ok_or(ForwardError::NoAuthority)?,
                    };
                    // Cold paths are boxed so the per-request future stays small (it is moved into a
                    // Box for every request; its size showed up as memmove in profiles).
                    let dest = Box::pin(d.resolve(&name)).await?;
                    (name, dest)
                }
            };
            let (dst, dest) = match &self.route {
                Route::Destinations(d) if req.method() != Method::CONNECT => {
                    Box::pin(self.policy_route(d, dst, dest, &req)).await?
                }
                _ => (dst, dest),
            };
            let ep = Box::pin(dest.pick(None)).await?;
            self.check_loop(&dst, &ep)?;
            let cx = RequestContext {
                destination: Some(&dst),
                ..*cx
            };
            if req.method() == Method::CONNECT {
                self.upstream_phase(&mut req, &cx, &ep)?;
                return Box::pin(self.connect(unbox(req), &dst, &dest, &ep)).await;
            }
            let (timeout, idle) = {
                let policy = dest.policy_now();
                let path = req.uri().path();
                (policy.timeout_for(path), policy.idle_timeout_for(path))
            };
            let grpc = is_grpc(&req);
            let (limit, idle) = match req.headers().contains_key(header::UPGRADE) {
                // An upgraded stream lives as long as its peers want; only its 101 could be timed
                // (its bytes have the tunnel's own idle timeout).
                true => (None, None),
                false => (
                    crate::deadline::deadline(timeout, req.headers(), grpc),
                    idle,
                ),
            };
            match idle {
                None => {
                    self.send_within(req, &dst, &ep, &dest, &cx, limit, timeout)
                        .await
                }
                // Boxed: the common path's future does not carry the watchdog's state.
                Some(after) => {
                    let within = (limit, timeout);
                    Box::pin(self.send_watched(req, &dst, &ep, &dest, &cx, within, after)).await
                }
            }
        }
    }

    /// [`Forwarder::send`] within the request's deadline (`limit`: the policy's `timeout` or the
    /// caller's `grpc-timeout`, whichever is shorter), which ends when the response head comes.
    /// A future type, not an `async fn`: one async level less in every request's future (an
    /// async level stores its arguments beside what it awaits, and each level is moved whole).
    #[allow(clippy::too_many_arguments)]
    fn send_within<'a>(
        &'a self,
        req: Req,
        dst: &'a str,
        ep: &'a Arc<Endpoint>,
        dest: &'a Arc<Destination>,
        cx: &'a RequestContext<'a>,
        limit: Option<Duration>,
        timeout: Option<Duration>,
    ) -> Within<'a, impl Future<Output = Result<Response<Body>, ForwardError>> + 'a> {
        Within {
            send: self.send(req, dst, ep, Some(dest), cx),
            deadline: limit.map(|l| Box::pin(tokio::time::sleep(l))),
            limit,
            dst,
            why: match timeout == limit {
                true => "the destination's timeout policy",
                false => "the caller's grpc-timeout",
            },
        }
    }

    /// [`Forwarder::send_within`] under the destination's idle timeout for the path
    /// (`remora.io/idle-timeout`, [`crate::idle`]): frames of the request body count as
    /// activity from the start; the watchdog itself is armed when the response head comes
    /// (until then the deadline governs, as in `send_within`).
    #[allow(clippy::too_many_arguments)]
    async fn send_watched(
        &self,
        mut req: Req,
        dst: &str,
        ep: &Arc<Endpoint>,
        dest: &Arc<Destination>,
        cx: &RequestContext<'_>,
        (limit, timeout): (Option<Duration>, Option<Duration>),
        after: Duration,
    ) -> Result<Response<Body>, ForwardError> {
        let activity = crate::idle::Activity::new();
        req.body_mut().count_activity(activity.clone());
        // The path for the log line (a reference count, not a copy); the client's protocol
        // decides whether gRPC trailers can reach it.
        let uri = req.uri().clone();
        let client_h2 = req.version() == Version::HTTP_2;
        let mut rsp = self
            .send_within(req, dst, ep, dest, cx, limit, timeout)
            .await?;
        crate::idle::arm(
            &mut rsp,
            crate::idle::Armed {
                activity,
                after,
                dst,
                path: uri.path(),
                direction: self.direction,
                metrics: &self.metrics,
                client_h2,
            },
        );
        Ok(rsp)
    }

    /// The destination's routes and split (`remora.io/routes`, `remora.io/split`): the first
    /// route rule the request matches (header value or path prefix) sends it to its target;
    /// otherwise it stays with `dest` or goes to a split target, drawn per request. One level
    /// only: a target's own routes and split are not followed, so they cannot chain or loop.
    async fn policy_route(
        &self,
        d: &crate::discover::Destinations,
        dst: String,
        dest: Arc<Destination>,
        req: &Request<UpstreamBody>,
    ) -> Result<(String, Arc<Destination>), ForwardError> {
        let policy = dest.policy_now();
        if policy.split.is_empty() && policy.routes.is_empty() {
            return Ok((dst, dest));
        }
        let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
        let (to, by) = match policy.route_for(req.uri().path(), header) {
            Some(r) => (
                &r.to,
                match r.when {
                    remora_certs::Match::Header { .. } => "header",
                    remora_certs::Match::PathPrefix(_) => "path",
                },
            ),
            None => match policy.split_for(crate::random::below(100) as u32) {
                Some(s) => (&s.to, "split"),
                None => return Ok((dst, dest)),
            },
        };
        let to = to.clone();
        // The policy is not held across the lookup below.
        drop(policy);
        self.metrics
            .policy_routed
            .get_or_create(&crate::metrics::RoutedLabels {
                destination: dst,
                to: to.clone(),
                by,
            })
            .inc();
        let other = Box::pin(d.resolve(&to)).await?;
        Ok((to, other))
    }

    /// Phase 2: the embedding application's choice of destination, normalised.
    fn chosen(
        &self,
        req: &mut Request<UpstreamBody>,
        cx: &RequestContext<'_>,
    ) -> Result<Option<String>, ForwardError> {
        if !self.hooks_active {
            return Ok(None);
        }
        let chosen = with_head(req, |head| {
            crate::panics::catch_sync(|| self.hooks.choose_destination(head, cx))
        })
        .ok_or(ForwardError::HookPanicked)?;
        match chosen {
            Some(name) => Ok(Some(normalize_authority(&name).ok_or_else(|| {
                ForwardError::BadAuthority(format!(
                    "the choose_destination hook returned {name:?}, not host:port"
                ))
            })?)),
            None => Ok(None),
        }
    }

    /// The own listener an intercepted connection to `original` would reach, if any.
    pub(crate) fn loops_to(&self, original: SocketAddr) -> Option<SocketAddr> {
        self.own_addrs
            .iter()
            .find(|a| same_listener(a, &original, &self.local_ips))
            .copied()
    }

    /// Whether discovery marks the endpoints at `original` opaque (so the connection must not
    /// wait for the client to speak).
    pub(crate) async fn original_is_opaque(&self, original: SocketAddr) -> bool {
        match &self.route {
            Route::Destinations(d) => d
                .resolve_original(None, original)
                .await
                .is_ok_and(|(_, dest)| dest.endpoints().iter().any(|e| e.opaque)),
            Route::App(_) => false,
        }
    }

    /// An intercepted opaque connection: to the endpoints behind `original` (mTLS to meshed
    /// ones, offering the opaque hint), or straight to `original`.
    pub(crate) async fn connect_original(
        &self,
        original: SocketAddr,
    ) -> Result<crate::io::UpstreamIo, ForwardError> {
        let Route::Destinations(d) = &self.route else {
            return Err(ForwardError::NoAuthority);
        };
        let (dst, dest) = Box::pin(d.resolve_original(None, original)).await?;
        let ep = Box::pin(dest.pick(None)).await?;
        self.check_loop(&dst, &ep)?;
        let alpn = ep.tls.is_some().then_some(crate::tls::ALPN_OPAQUE);
        match ep.connect(alpn).await {
            Ok(u) => Ok(u),
            Err(error) => {
                // One other endpoint, as CONNECT does: a dead pod must not fail the connection.
                let other = dest
                    .pick(Some(&ep))
                    .await
                    .map_err(|_| ForwardError::Endpoint {
                        dst: dst.clone(),
                        source: error,
                    })?;
                self.check_loop(&dst, &other)?;
                let alpn = other.tls.is_some().then_some(crate::tls::ALPN_OPAQUE);
                other
                    .connect(alpn)
                    .await
                    .map_err(|source| ForwardError::Endpoint { dst, source })
            }
        }
    }

    /// Phase 3: the application's last look at the head before it leaves for `ep`.
    fn upstream_phase<B>(
        &self,
        req: &mut Request<B>,
        cx: &RequestContext<'_>,
        ep: &Endpoint,
    ) -> Result<(), ForwardError> {
        if !self.hooks_active {
            return Ok(());
        }
        let cx = RequestContext {
            endpoint: Some(ep.addr),
            ..*cx
        };
        with_head(req, |head| {
            crate::panics::catch_sync(|| self.hooks.on_upstream_request(head, &cx))
                .ok_or(ForwardError::HookPanicked)
        })
    }

    fn check_loop(&self, dst: &str, ep: &Endpoint) -> Result<(), ForwardError> {
        match self
            .own_addrs
            .iter()
            .find(|a| same_listener(a, &ep.addr, &self.local_ips))
        {
            Some(addr) => Err(ForwardError::Loop {
                dst: dst.to_string(),
                addr: *addr,
            }),
            None => Ok(()),
        }
    }

    /// Not an `async fn`, for the reason [`Endpoint::send`] gives: the request is kept once.
    #[allow(clippy::manual_async_fn)] // on purpose: see `Endpoint::send`
    fn send(
        &self,
        mut req: Req,
        dst: &str,
        ep: &Arc<Endpoint>,
        dest: Option<&Destination>,
        cx: &RequestContext<'_>,
    ) -> impl Future<Output = Result<Response<Body>, ForwardError>> + Send {
        async move {
            upstream_uri(&mut req, ep.addr);
            self.upstream_phase(&mut req, cx, ep)?;
            // `Upgrade` is HTTP/1.1's (RFC 9113 §8.2.2 makes it malformed in HTTP/2: h2
            // refuses it from clients, `scrub` strips it, and hyper drops one a hook adds):
            // an HTTP/2 request spares the lookup.
            if req.version() < Version::HTTP_2 && req.headers().contains_key(header::UPGRADE) {
                return Box::pin(self.upgrade(unbox(req), dst, ep)).await;
            }
            let Some(dest) = dest else {
                // Inbound: the app is the only endpoint.
                return match ep.send(req).await {
                    Ok(rsp) => Ok(self.answered(rsp, ep)),
                    Err(e) => Err(ForwardError::Endpoint {
                        dst: dst.to_string(),
                        source: e.error,
                    }),
                };
            };
            if req.version() == Version::HTTP_2 {
                dest.saw_h2();
            }
            dest.budget.deposit();
            let policy = dest.policy_now();
            let retries = policy.retries_for(req.uri().path());
            if retries > 0
                && (policy.retry_on.non_idempotent
                    || crate::retry::policy_may_retry(&req, is_grpc(&req)))
            {
                // Held for the request's tries: a policy change applies from the next request.
                let policy = arc_swap::Guard::into_inner(policy);
                return Box::pin(self.send_with_retries(unbox(req), dst, ep, dest, cx, &policy))
                    .await;
            }
            drop(policy);
            let second = SecondTry::new(&req);
            let err = match ep.send(req).await {
                Ok(rsp) => {
                    dest.accrue(ep, rsp.status(), rsp.headers());
                    return Ok(self.answered(rsp, ep));
                }
                Err(e) => e,
            };
            // Boxed: what a failure needs is not carried by every request's future.
            Box::pin(self.send_again(err, second, dst, ep, dest, cx)).await
        }
    }

    /// After a send to `ep` failed: the request once more on another endpoint, when it never
    /// left (`unsent`) or is idempotent and the retry budget allows; otherwise the error.
    async fn send_again(
        &self,
        err: crate::endpoint::SendError,
        second: SecondTry,
        dst: &str,
        ep: &Arc<Endpoint>,
        dest: &Destination,
        cx: &RequestContext<'_>,
    ) -> Result<Response<Body>, ForwardError> {
        let endpoint_error = |source| ForwardError::Endpoint {
            dst: dst.to_string(),
            source,
        };
        let Some(mut retry) = second.after(err.unsent, &dest.budget) else {
            return Err(endpoint_error(err.error));
        };
        let other = match Box::pin(dest.pick(Some(ep))).await {
            Ok(o) => o,
            Err(_) => return Err(endpoint_error(err.error)),
        };
        self.check_loop(dst, &other)?;
        tracing::debug!(dst, error = %err.error, retry = %other.addr, "retrying on another endpoint");
        self.upstream_phase(&mut retry, cx, &other)?;
        match Box::pin(other.send(Box::new(retry))).await {
            Ok(rsp) => {
                dest.accrue(&other, rsp.status(), rsp.headers());
                Ok(self.answered(rsp, &other))
            }
            Err(e) => Err(endpoint_error(e.error)),
        }
    }

    /// [`Forwarder::send`] under a policy with retries: the body is recorded (up to
    /// [`crate::retry::replay::MAX_REPLAY`]) so that a `503` / gRPC `UNAVAILABLE` answer, or a
    /// failure after the request went out, can be tried again on another endpoint, up to
    /// `retries` times, each within the destination's retry budget. A request that was never
    /// sent moves to another endpoint as on the path without a policy.
    async fn send_with_retries(
        &self,
        req: Request<UpstreamBody>,
        dst: &str,
        ep: &Arc<Endpoint>,
        dest: &Destination,
        cx: &RequestContext<'_>,
        policy: &remora_certs::Policy,
    ) -> Result<Response<Body>, ForwardError> {
        let grpc = is_grpc(&req);
        let retries = policy.retries_for(req.uri().path());
        let (parts, body) = req.into_parts();
        let head = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        );
        let again = |body| crate::endpoint::rebuild(head.clone(), body);
        let (body, replay) = body.recording();
        let mut req = Request::from_parts(parts, body);
        let mut ep = ep.clone();
        let mut left = retries;
        loop {
            let endpoint_error = |source| ForwardError::Endpoint {
                dst: dst.to_string(),
                source,
            };
            // Each try within the per-try timeout (`remora.io/retry-timeout`): one that has no
            // answer by then is abandoned (its stream reset) and tried again on another
            // endpoint while retries and budget last; the last one answers 504.
            let sent = match policy.retry_timeout {
                None => ep.send(Box::new(req)).await,
                Some(per_try) => {
                    match tokio::time::timeout(per_try, ep.send(Box::new(req))).await {
                        Ok(sent) => sent,
                        Err(_) => {
                            let timed_out = || ForwardError::Timeout {
                                dst: dst.to_string(),
                                after: per_try,
                                why: "the retry-timeout policy, on the last try",
                            };
                            if !(left > 0 && dest.budget.withdraw()) {
                                return Err(timed_out());
                            }
                            let Some(b) = Box::pin(replay.body()).await else {
                                return Err(timed_out());
                            };
                            let Ok(other) = Box::pin(dest.pick(Some(&ep))).await else {
                                return Err(timed_out());
                            };
                            tracing::debug!(dst, endpoint = %ep.addr, retry = %other.addr, "no answer within the retry timeout; trying another endpoint");
                            ep = other;
                            left -= 1;
                            self.count_retry();
                            self.check_loop(dst, &ep)?;
                            let mut next = again(b);
                            upstream_uri(&mut next, ep.addr);
                            self.upstream_phase(&mut next, cx, &ep)?;
                            req = next;
                            continue;
                        }
                    }
                }
            };
            let next = match sent {
                Ok(rsp) => {
                    dest.accrue(&ep, rsp.status(), rsp.headers());
                    let retryable = policy.retry_on.retries(
                        rsp.status().as_u16(),
                        rsp.headers().get("grpc-status").map(|v| v.as_bytes()),
                    );
                    if !(left > 0 && retryable && Box::pin(replay.settled(SETTLE)).await) {
                        return Ok(self.answered(rsp, &ep));
                    }
                    // Another endpoint first: with none (or none ready within failfast), the
                    // client gets the backend's own answer, not the proxy's.
                    let Ok(other) = Box::pin(dest.pick(Some(&ep))).await else {
                        return Ok(self.answered(rsp, &ep));
                    };
                    if other.addr == ep.addr || !dest.budget.withdraw() {
                        return Ok(self.answered(rsp, &ep));
                    }
                    tracing::debug!(dst, endpoint = %ep.addr, status = %rsp.status(), retry = %other.addr, "retryable answer; trying another endpoint (destination policy)");
                    // Dropping the answer lets go of the request body, so it can be replayed.
                    drop(rsp);
                    let Some(b) = Box::pin(replay.body()).await else {
                        return Ok(local_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            grpc,
                            &format!(
                                "{dst}: {} was unavailable and the request could not be replayed",
                                ep.addr
                            ),
                        )
                        .map(Either::Right));
                    };
                    ep = other;
                    again(b)
                }
                // Never sent: safe anywhere and needs no budget, but counts as a try, so a
                // destination whose endpoints all refuse connections is not looped over.
                Err(crate::endpoint::SendError {
                    unsent: Some(unsent),
                    error,
                }) => {
                    if left == 0 {
                        return Err(endpoint_error(error));
                    }
                    ep = match Box::pin(dest.pick(Some(&ep))).await {
                        Ok(o) => o,
                        Err(_) => return Err(endpoint_error(error)),
                    };
                    unsent
                }
                Err(e) => {
                    // `body` waits for the attempt to let go and says if it can replay.
                    if !(left > 0 && dest.budget.withdraw()) {
                        return Err(endpoint_error(e.error));
                    }
                    let Some(b) = Box::pin(replay.body()).await else {
                        return Err(endpoint_error(e.error));
                    };
                    ep = match Box::pin(dest.pick(Some(&ep))).await {
                        Ok(o) => o,
                        Err(_) => return Err(endpoint_error(e.error)),
                    };
                    again(b)
                }
            };
            left = left.saturating_sub(1);
            self.count_retry();
            self.check_loop(dst, &ep)?;
            let mut next = next;
            upstream_uri(&mut next, ep.addr);
            self.upstream_phase(&mut next, cx, &ep)?;
            req = next;
        }
    }

    fn count_retry(&self) {
        self.metrics
            .policy_retries
            .get_or_create(&crate::metrics::DirectionLabels {
                direction: self.direction,
            })
            .inc();
    }

    /// An upstream response, scrubbed, marked with the endpoint that sent it.
    fn answered(&self, rsp: Response<hyper::body::Incoming>, ep: &Endpoint) -> Response<Body> {
        let answered = Answered {
            addr: ep.addr,
            identity: ep.tls.as_ref().map(|t| t.label.clone()),
        };
        rsp.map(|b| {
            Either::Left(crate::idle::Streamed::answered_by(
                Scrubbed::new(b, self.rules.clone()),
                answered,
            ))
        })
    }

    /// `Upgrade` (WebSocket and friends): a dedicated upstream connection; after `101` both
    /// sides become one byte stream.
    async fn upgrade(
        &self,
        mut req: Request<UpstreamBody>,
        dst: &str,
        ep: &Arc<Endpoint>,
    ) -> Result<Response<Body>, ForwardError> {
        let downstream = hyper::upgrade::on(&mut req);
        let mut rsp = ep
            .send_upgrade(req)
            .await
            .map_err(|source| ForwardError::Endpoint {
                dst: dst.to_string(),
                source,
            })?;
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut rsp);
            let (dst, addr) = (dst.to_string(), ep.addr);
            self.drain
                .spawn("upgraded stream (WebSocket)", None, async move {
                    match tokio::try_join!(downstream, upstream) {
                        Ok((down, up)) => {
                            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                            if let Err(e) = crate::io::tunnel(
                                &mut down,
                                &mut up,
                                crate::io::TUNNEL_IDLE_TIMEOUT,
                            )
                            .await
                            {
                                tracing::debug!(%dst, error = %e, "upgraded stream ended");
                            }
                        }
                        Err(source) => {
                            let e = ForwardError::Upgrade { dst, addr, source };
                            tracing::info!(error = %e, "upgrade failed");
                        }
                    }
                });
        }
        Ok(self.answered(rsp, ep))
    }

    /// `CONNECT host:port`: a TCP tunnel to the destination (opaque traffic, server-speaks-first
    /// protocols, TLS the app originates itself).
    async fn connect(
        &self,
        mut req: Request<UpstreamBody>,
        dst: &str,
        dest: &Destination,
        ep: &Arc<Endpoint>,
    ) -> Result<Response<Body>, ForwardError> {
        let alpn = |e: &Endpoint| e.opaque.then_some(crate::tls::ALPN_OPAQUE);
        let tcp = match ep.connect(alpn(ep)).await {
            Ok(t) => t,
            Err(error) => match dest.pick(Some(ep)).await {
                Ok(other) => {
                    self.check_loop(dst, &other)?;
                    other
                        .connect(alpn(&other))
                        .await
                        .map_err(|source| ForwardError::Endpoint {
                            dst: dst.to_string(),
                            source,
                        })?
                }
                Err(_) => {
                    return Err(ForwardError::Endpoint {
                        dst: dst.to_string(),
                        source: error,
                    });
                }
            },
        };
        let downstream = hyper::upgrade::on(&mut req);
        let dst = dst.to_string();
        self.drain.spawn("CONNECT tunnel", None, async move {
            match downstream.await {
                Ok(down) => {
                    let mut down = TokioIo::new(down);
                    let mut up = tcp;
                    if let Err(e) =
                        crate::io::tunnel(&mut down, &mut up, crate::io::TUNNEL_IDLE_TIMEOUT).await
                    {
                        tracing::debug!(%dst, error = %e, "CONNECT tunnel ended");
                    }
                }
                Err(e) => tracing::debug!(%dst, error = %e, "CONNECT upgrade failed"),
            }
        });
        Ok(Response::new(Either::Right(Full::default())))
    }
}

/// Runs `f` on the head of `req` as the `Parts` hooks are given, in place: the fields are
/// swapped out and back (pointer moves), so the request itself is not moved — a moved request
/// would be a second copy of it in the request's future.
fn with_head<B, R>(req: &mut Request<B>, f: impl FnOnce(&mut http::request::Parts) -> R) -> R {
    let (mut head, ()) = Request::new(()).into_parts();
    std::mem::swap(&mut head.method, req.method_mut());
    std::mem::swap(&mut head.uri, req.uri_mut());
    std::mem::swap(&mut head.version, req.version_mut());
    std::mem::swap(&mut head.headers, req.headers_mut());
    std::mem::swap(&mut head.extensions, req.extensions_mut());
    let out = f(&mut head);
    std::mem::swap(&mut head.method, req.method_mut());
    std::mem::swap(&mut head.uri, req.uri_mut());
    std::mem::swap(&mut head.version, req.version_mut());
    std::mem::swap(&mut head.headers, req.headers_mut());
    std::mem::swap(&mut head.extensions, req.extensions_mut());
    out
}

/// Gives the request the URI form its upstream protocol needs. HTTP/1: origin-form, with `Host`
/// set from an absolute-form URI (RFC 9112 §3.2.2: the URI's authority wins). HTTP/2: absolute,
/// built from `Host` when the client sent no `:authority` (RFC 9113 §8.3.1 allows that).
fn upstream_uri<B>(req: &mut Request<B>, fallback: SocketAddr) {
    if req.version() < Version::HTTP_2 {
        let Some(auth) = req.uri().authority().map(|a| a.as_str().to_string()) else {
            return;
        };
        if let Ok(v) = HeaderValue::from_str(&auth) {
            req.headers_mut().insert(header::HOST, v);
        }
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = pq.parse::<Uri>() {
            *req.uri_mut() = u;
        }
    } else if req.uri().authority().is_none() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| fallback.to_string());
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = format!("http://{host}{pq}").parse::<Uri>() {
            *req.uri_mut() = u;
        }
    }
}

/// True when connecting to `target` would reach `listener`: the same port on the listener's
/// own address, on an unspecified address (`0.0.0.0` / `::` connect to this host), on loopback,
/// or on any address of this host's interfaces (`local`).
pub(crate) fn same_listener(
    listener: &SocketAddr,
    target: &SocketAddr,
    local: &[std::net::IpAddr],
) -> bool {
    let ip = target.ip().to_canonical();
    listener.port() == target.port()
        && (ip == listener.ip().to_canonical()
            || ip.is_unspecified()
            || ip.is_loopback()
            || local.contains(&ip))
}

/// This host's interface addresses (IPv4-mapped IPv6 folded to IPv4), read once at start.
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we only read, then free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match (*addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr).to_canonical());
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(
        send: impl Future<Output = Result<Response<Body>, ForwardError>>,
        limit: Option<Duration>,
    ) -> Within<'static, impl Future<Output = Result<Response<Body>, ForwardError>>> {
        Within {
            send,
            deadline: limit.map(|l| Box::pin(tokio::time::sleep(l))),
            limit,
            dst: "web.test:80",
            why: "the caller's grpc-timeout",
        }
    }

    /// A send that uses up the task's cooperative budget on every poll (it is never idle,
    /// so this runs on the real clock) still meets its deadline.
    #[tokio::test]
    async fn within_times_out_a_send_that_exhausts_the_budget() {
        let busy = async {
            loop {
                tokio::task::coop::consume_budget().await;
            }
        };
        let guarded = within(busy, Some(Duration::from_millis(50)));
        let out = tokio::time::timeout(Duration::from_secs(10), guarded).await;
        assert!(
            matches!(out, Ok(Err(ForwardError::Timeout { .. }))),
            "the deadline did not fire by itself"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn within_fails_a_silent_send_at_its_deadline_and_only_then() {
        let start = tokio::time::Instant::now();
        let silent = std::future::pending();
        match within(silent, Some(Duration::from_millis(300))).await {
            Err(ForwardError::Timeout { dst, after, why }) => {
                assert_eq!(
                    (dst.as_str(), after),
                    ("web.test:80", Duration::from_millis(300))
                );
                assert_eq!(why, "the caller's grpc-timeout");
            }
            other => panic!("expected a timeout, got {:?}", other.map(|r| r.status())),
        }
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        // An answer before the deadline is the answer.
        let quick = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Response::new(Either::Right(Full::new(
                bytes::Bytes::from_static(b"ok"),
            ))))
        };
        let rsp = within(quick, Some(Duration::from_millis(300))).await;
        assert_eq!(rsp.map(|r| r.status()).ok(), Some(StatusCode::OK));
        // No limit: nothing times out (an hour of silence is still pending).
        let never = within(std::future::pending(), None);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), never)
                .await
                .is_err()
        );
    }

    #[test]
    fn loops_through_any_local_address() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local = ["10.1.2.3".parse().unwrap()];
        let own = a("127.0.0.1:4140");
        for t in [
            "127.0.0.1:4140",
            "0.0.0.0:4140",
            "[::]:4140",
            "[::1]:4140",
            "127.9.9.9:4140",
            "[::ffff:127.0.0.1]:4140",
            "10.1.2.3:4140",
        ] {
            assert!(same_listener(&own, &a(t), &local), "{t}");
        }
        for t in ["127.0.0.1:4141", "10.1.2.4:4140", "[2001:db8::1]:4140"] {
            assert!(!same_listener(&own, &a(t), &local), "{t}");
        }
        assert!(same_listener(
            &a("0.0.0.0:4191"),
            &a("10.1.2.3:4191"),
            &local
        ));
    }

    #[test]
    fn upstream_uri_forms() {
        let fallback: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut r = Request::get("http://svc-a:81/p?q=1")
            .header("host", "svc-b")
            .body(())
            .unwrap();
        upstream_uri(&mut r, fallback);
        assert_eq!(r.uri(), "/p?q=1");
        assert_eq!(r.headers()["host"], "svc-a:81");
        let mut r = Request::get("/p")
            .version(Version::HTTP_2)
            .header("host", "a.b")
            .body(())
            .unwrap();
        upstream_uri(&mut r, fallback);
        assert_eq!(r.uri(), "http://a.b/p");
    }

    #[test]
    fn authority_from_uri_or_host() {
        let auth = |r: &Request<()>| request_authority(r);
        let r = Request::get("http://Echo.Test/x").body(()).unwrap();
        assert_eq!(auth(&r), Ok(Some("echo.test:80".into())));
        let r = Request::get("/x")
            .header("host", "a.b:81")
            .body(())
            .unwrap();
        assert_eq!(auth(&r), Ok(Some("a.b:81".into())));
        let r = Request::get("/x").body(()).unwrap();
        assert_eq!(auth(&r), Ok(None));
        for bad in ["a:99999", "user:pw@server", "a:1x", "a b"] {
            let r = Request::get("/x").header("host", bad).body(()).unwrap();
            assert!(auth(&r).is_err(), "{bad}");
        }
        let r = Request::get("http://user:pw@server/").body(()).unwrap();
        assert!(auth(&r).is_err());
        let r = Request::get("http://a:99999/").body(()).unwrap();
        assert!(auth(&r).is_err());
    }
}

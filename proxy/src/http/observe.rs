//! The request-metrics layer, outermost in the stack: counts and times every request to the end
//! of its response body, per route too, and there runs the completion hook, feeds tap
//! watchers and writes the access log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use crate::access_log::AccessLog;
use crate::direction::Direction;
use crate::hooks::{Answered, Completion, Hooks};
use crate::metrics::{DirectionLabels, Metrics, RequestLabels};
use crate::route_metrics::Outcome;
use crate::scrub::Body;
use crate::tap::Event;
use crate::trace::{SpanEnd, SpanStart, Tracer};

/// The request-metrics layer: counts each request by status and gRPC status, and times it to
/// the end of its response body (where gRPC's status arrives, in trailers).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    handles: Arc<RequestHandles>,
    /// The connection's verified peer, for the completion hook.
    client_id: Option<http::HeaderValue>,
    /// The same, as the per-route `peer_identity` label and tap's field (inbound only).
    peer: Option<Arc<str>>,
}

/// Per-listener handles, looked up once.
pub struct RequestHandles {
    direction: Direction,
    /// `None` without hooks: nothing is captured for the completion phase.
    hooks: Option<Arc<dyn Hooks>>,
    requests: Family<RequestLabels, Counter>,
    /// The commonest outcomes, resolved once: 200 without and with grpc-status 0 (a family
    /// lookup takes a lock and hashes the labels; profiling showed it on the hot path).
    ok_http: Counter,
    ok_grpc: Counter,
    duration: Histogram,
    in_flight: Gauge,
    /// Per-route metrics and tap.
    metrics: Arc<Metrics>,
    access_log: Option<AccessLog>,
    tracer: Option<Arc<Tracer>>,
}

impl RequestHandles {
    pub fn new(
        metrics: &Arc<Metrics>,
        direction: Direction,
        hooks: Option<Arc<dyn Hooks>>,
        access_log: Option<AccessLog>,
        tracer: Option<Arc<Tracer>>,
    ) -> Self {
        let ok = |grpc_status| {
            metrics.requests.get_or_create_owned(&RequestLabels {
                direction,
                status: 200,
                grpc_status,
            })
        };
        RequestHandles {
            direction,
            hooks,
            ok_http: ok(None),
            ok_grpc: ok(Some(0)),
            requests: metrics.requests.clone(),
            duration: metrics
                .request_duration
                .get_or_create_owned(&DirectionLabels { direction }),
            in_flight: metrics
                .requests_in_flight
                .get_or_create_owned(&DirectionLabels { direction }),
            metrics: metrics.clone(),
            access_log,
            tracer,
        }
    }
}

impl<S> Observe<S> {
    pub fn new(
        inner: S,
        handles: Arc<RequestHandles>,
        client_id: Option<http::HeaderValue>,
    ) -> Self {
        let peer = match handles.direction {
            Direction::Inbound => client_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(Arc::from),
            Direction::Outbound => None,
        };
        Observe {
            inner,
            handles,
            client_id,
            peer,
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for Observe<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>>,
{
    type Response = Response<ObservedBody>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let h = &self.handles;
        h.in_flight.inc();
        // The guard first: a panic below (caught by `http::Called`) still decrements.
        let in_flight = InFlight(h.clone());
        // Boxed, as `Seen` is: only a sampled request has one.
        let span = h
            .tracer
            .as_ref()
            .and_then(|t| t.start(req.headers_mut()))
            .map(Box::new);
        let grpc_path = crate::http::is_grpc(&req).then(|| Box::<str>::from(req.uri().path()));
        // The head's details are copied only for someone who reads them: hooks, a tap watcher,
        // the access log (sampled here, once per request).
        let log = h.access_log.is_some_and(|l| l.sampled());
        let request =
            (h.hooks.is_some() || log || span.is_some() || h.metrics.tap.active()).then(|| {
                Box::new(Seen {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    host: req.headers().get(http::header::HOST).cloned(),
                    content_type: req.headers().get(http::header::CONTENT_TYPE).cloned(),
                    user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
                    log,
                })
            });
        ObserveFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            in_flight: Some(in_flight),
            client_id: request.as_ref().and(self.client_id.clone()),
            peer: self.peer.clone(),
            grpc_path,
            request,
            span,
        }
    }
}

/// What the completion phase, tap and the access log need of a request head. Boxed where it is
/// kept: most requests copy none of it, and the future and the response body of every request
/// would otherwise carry its 230 bytes.
struct Seen {
    method: http::Method,
    uri: http::Uri,
    host: Option<http::HeaderValue>,
    content_type: Option<http::HeaderValue>,
    user_agent: Option<http::HeaderValue>,
    /// The access log writes this one.
    log: bool,
}

pin_project_lite::pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        in_flight: Option<InFlight>,
        request: Option<Box<Seen>>,
        client_id: Option<http::HeaderValue>,
        peer: Option<Arc<str>>,
        grpc_path: Option<Box<str>>,
        span: Option<Box<SpanStart>>,
    }
}

impl<F, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<ObservedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut rsp = std::task::ready!(this.inner.poll(cx))?;
        let (endpoint, identity) = match rsp.body_mut() {
            http_body_util::Either::Left(streamed) => match streamed.take_answered() {
                Some(Answered { addr, identity }) => (Some(addr), identity),
                None => (None, None),
            },
            http_body_util::Either::Right(_) => (None, None),
        };
        let recorder = this.in_flight.take().map(|in_flight| Recorder {
            start: *this.start,
            status: rsp.status().as_u16(),
            grpc_status: grpc_status(rsp.headers()),
            request: this.request.take(),
            client_id: this.client_id.take(),
            // Inbound the peer is the connection's client; outbound, the server that answered.
            peer: match in_flight.0.direction {
                Direction::Inbound => this.peer.take(),
                Direction::Outbound => identity,
            },
            grpc_path: this.grpc_path.take(),
            span: this.span.take(),
            endpoint,
            in_flight,
            bytes: 0,
            finished: http_body::Body::is_end_stream(rsp.body()),
        });
        Poll::Ready(Ok(rsp.map(|inner| ObservedBody { inner, recorder })))
    }
}

fn text(v: &Option<http::HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    // A `HeaderName`, not a `&str`: a string key is parsed and lowercased on every lookup
    // (~250 instructions per response).
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|s| s.parse().ok())
}

/// Counts a request as in flight from the moment it arrives until its response ends or it is
/// abandoned, whichever drop comes first.
struct InFlight(Arc<RequestHandles>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Records the request when dropped: at the end of the body, or when the client goes away.
struct Recorder {
    in_flight: InFlight,
    start: Instant,
    status: u16,
    grpc_status: Option<u8>,
    request: Option<Box<Seen>>,
    client_id: Option<http::HeaderValue>,
    peer: Option<Arc<str>>,
    grpc_path: Option<Box<str>>,
    span: Option<Box<SpanStart>>,
    endpoint: Option<std::net::SocketAddr>,
    bytes: u64,
    finished: bool,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let h = &self.in_flight.0;
        match (self.status, self.grpc_status) {
            (200, None) => {
                h.ok_http.inc();
            }
            (200, Some(0)) => {
                h.ok_grpc.inc();
            }
            (status, grpc_status) => {
                h.requests
                    .get_or_create(&RequestLabels {
                        direction: h.direction,
                        status,
                        grpc_status,
                    })
                    .inc();
            }
        }
        let duration = self.start.elapsed();
        let seconds = duration.as_secs_f64();
        h.duration.observe(seconds);
        let outcome = Outcome {
            status: self.status,
            grpc_status: self.grpc_status,
            finished: self.finished,
        };
        h.metrics
            .routes
            .handles(h.direction, self.peer.as_ref(), self.grpc_path.as_deref())
            .record(outcome, seconds);
        let Some(seen) = self.request.take() else {
            return;
        };
        if let (Some(start), Some(tracer)) = (self.span.take(), &h.tracer) {
            tracer.finish(
                *start,
                &SpanEnd {
                    direction: h.direction,
                    method: seen.method.as_str(),
                    path: seen.uri.path(),
                    authority: seen
                        .uri
                        .authority()
                        .map(|a| a.as_str())
                        .or(text(&seen.host)),
                    status: self.status,
                    grpc_status: self.grpc_status,
                    failed: outcome.failed(),
                    finished: self.finished,
                    duration,
                    peer_identity: self.peer.as_deref(),
                    endpoint: self.endpoint,
                },
            );
        }
        let tap = &h.metrics.tap;
        if seen.log || tap.active() {
            let event = Event {
                direction: h.direction,
                method: seen.method.as_str(),
                authority: seen
                    .uri
                    .authority()
                    .map(|a| a.as_str())
                    .or(text(&seen.host)),
                path: seen.uri.path(),
                status: self.status,
                grpc_status: self.grpc_status,
                latency: duration,
                response_bytes: self.bytes,
                peer_identity: self.peer.as_deref(),
                endpoint: self.endpoint,
                finished: self.finished,
                content_type: text(&seen.content_type),
                user_agent: text(&seen.user_agent),
            };
            if tap.active() {
                tap.publish(&event);
            }
            if seen.log {
                crate::access_log::write(event.to_json());
            }
        }
        let Some(hooks) = &h.hooks else {
            return;
        };
        let done = Completion {
            direction: h.direction,
            method: seen.method,
            uri: seen.uri,
            status: http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::OK),
            grpc_status: self.grpc_status,
            duration,
            response_bytes: self.bytes,
            client_identity: self
                .client_id
                .take()
                .and_then(|v| v.to_str().ok().map(str::to_string)),
            endpoint: self.endpoint,
            finished: self.finished,
        };
        let _ = crate::panics::catch_sync(|| hooks.on_completion(&done));
    }
}

pin_project_lite::pin_project! {
    /// The response body as the client receives it: the proxied body plus its recorder.
    pub struct ObservedBody {
        #[pin]
        inner: Body,
        recorder: Option<Recorder>,
    }
}

impl ObservedBody {
    /// A response the proxy made itself, outside the observed path (nothing records it).
    pub(crate) fn local(rsp: Response<http_body_util::Full<Bytes>>) -> Response<ObservedBody> {
        rsp.map(|b| ObservedBody {
            inner: http_body_util::Either::Right(b),
            recorder: None,
        })
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(rec) = this.recorder.as_mut() {
                    if let Some(data) = f.data_ref() {
                        rec.bytes += data.len() as u64;
                    } else if let Some(trailers) = f.trailers_ref()
                        && let Some(code) = grpc_status(trailers)
                    {
                        rec.grpc_status = Some(code);
                    }
                    if this.inner.is_end_stream() {
                        rec.finished = true;
                    }
                }
            }
            // End of stream, or an error: either way the request is over.
            None => {
                if let Some(mut rec) = this.recorder.take() {
                    rec.finished = true;
                }
            }
            Some(Err(_)) => drop(this.recorder.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

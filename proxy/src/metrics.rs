//! Prometheus metrics, all named `remora_*` (contract), served by the admin server.
//!
//! Handles that never change labels (per-direction histograms, connection counters) are looked
//! up once and cloned into the listeners, so the per-request cost is one family lookup for the
//! request counter and a histogram observation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::detect::Protocol;
use crate::http::Body;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Label values in snake_case, as Prometheus users expect (the derive would print `Inbound`).
macro_rules! snake_case_labels {
    ($($ty:ident { $($variant:ident => $s:literal),* $(,)? })*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self { $($ty::$variant => $s),* })
            }
        }
    )*};
}

snake_case_labels! {
    Direction { Inbound => "inbound", Outbound => "outbound" }
    ProtocolLabel { Http1 => "http1", Http2 => "http2", Opaque => "opaque" }
    DetectResult {
        Http1 => "http1", Http2 => "http2", Opaque => "opaque", OpaquePort => "opaque_port",
        Idle => "idle", Timeout => "timeout", Closed => "closed", Tls => "tls", Error => "error",
        Malformed => "malformed",
    }
    Flow { Read => "read", Write => "write" }
    TlsResult {
        Mtls => "mtls", Plaintext => "plaintext", Passthrough => "passthrough",
        RefusedPlaintext => "refused_plaintext", HandshakeFailed => "handshake_failed",
        BadHello => "bad_hello", Established => "established", Failed => "failed",
        BadIdentity => "bad_identity",
    }
    ErrorKind {
        NoEndpoints => "no_endpoints", ConnectFailed => "connect_failed",
        UpstreamReset => "upstream_reset", BadRequest => "bad_request", Loop => "loop",
        NoDestination => "no_destination", ClientIo => "client_io",
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ProtocolLabel {
    Http1,
    Http2,
    Opaque,
}

impl From<Protocol> for ProtocolLabel {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Http1 => ProtocolLabel::Http1,
            Protocol::Http2 => ProtocolLabel::Http2,
            Protocol::Opaque => ProtocolLabel::Opaque,
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DetectResult {
    Http1,
    Http2,
    Opaque,
    /// Opaque because the port is listed as opaque; detection was skipped.
    OpaquePort,
    /// Nothing arrived within the detect timeout; whoever speaks first decides.
    Idle,
    /// HTTP-like but failing the strict parse; refused with 400.
    Malformed,
    /// A partial HTTP request stalled past the detect timeout; closed.
    Timeout,
    /// The client closed before sending a byte.
    Closed,
    /// A TLS ClientHello (mTLS, the app's own TLS, or a bad hello).
    Tls,
    Error,
}

/// How an inbound connection was secured, or why it was turned away.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TlsResult {
    /// mTLS terminated, client certificate verified.
    Mtls,
    /// Plaintext, accepted (permissive or disabled mode).
    Plaintext,
    /// TLS for another server name: the app's own TLS, passed through untouched.
    Passthrough,
    /// Plaintext refused in strict mode.
    RefusedPlaintext,
    /// The TLS handshake failed (no or untrusted client certificate, protocol error).
    HandshakeFailed,
    /// A ClientHello that never completed, or was malformed.
    BadHello,
    /// The client certificate chains to the bundle but has no SPIFFE ID in this trust domain.
    BadIdentity,
    /// Outbound: mTLS established to a peer proxy with the expected identity.
    Established,
    /// Outbound: the peer failed verification or the handshake failed.
    Failed,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flow {
    Read,
    Write,
}

/// Why the proxy answered a request itself, or cut a connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    /// The destination resolved to no address (unknown name, empty endpoint set).
    NoEndpoints,
    /// Connecting to the upstream failed (refused, unreachable, timeout).
    ConnectFailed,
    /// The upstream reset or closed the request before a response.
    UpstreamReset,
    /// The request had no usable authority, or was otherwise unroutable.
    BadRequest,
    /// The request was addressed to the proxy itself.
    Loop,
    /// An opaque connection had nowhere to go.
    NoDestination,
    /// Reading the client failed during detection or serving.
    ClientIo,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub status: u16,
    pub grpc_status: Option<u8>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    pub protocol: ProtocolLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub result: DetectResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub flow: Flow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
    pub result: TlsResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: Direction,
    pub kind: ErrorKind,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~52 s: sidecar hops are sub-millisecond, app calls can be slow.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Per-endpoint families (destination + endpoint address labels).
#[derive(Default)]
pub struct EndpointFamilies {
    requests: Family<EndpointLabels, Counter>,
    failures: Family<EndpointLabels, Counter>,
    in_flight: Family<EndpointLabels, Gauge>,
    latency: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    ready: Family<EndpointLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub destination: String,
    pub endpoint: String,
}

/// One endpoint's metric handles, resolved once; its label sets are removed when the endpoint
/// goes away, so endpoint churn does not grow the registry.
pub struct EndpointMetrics {
    labels: EndpointLabels,
    families: Arc<EndpointFamilies>,
    pub requests: Counter,
    pub failures: Counter,
    pub in_flight: Gauge,
    pub latency: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub ready: Gauge,
}

impl EndpointMetrics {
    pub fn new(metrics: &Metrics, destination: &str, endpoint: std::net::SocketAddr) -> Self {
        let labels = EndpointLabels {
            destination: destination.to_string(),
            endpoint: endpoint.to_string(),
        };
        let f = metrics.endpoints.clone();
        let ready = f.ready.get_or_create_owned(&labels);
        ready.set(1);
        EndpointMetrics {
            requests: f.requests.get_or_create_owned(&labels),
            failures: f.failures.get_or_create_owned(&labels),
            in_flight: f.in_flight.get_or_create_owned(&labels),
            latency: f.latency.get_or_create_owned(&labels),
            ready,
            labels,
            families: f,
        }
    }
}

impl Drop for EndpointMetrics {
    fn drop(&mut self) {
        let f = &self.families;
        f.requests.remove(&self.labels);
        f.failures.remove(&self.labels);
        f.in_flight.remove(&self.labels);
        f.latency.remove(&self.labels);
        f.ready.remove(&self.labels);
    }
}

pub struct Metrics {
    registry: Registry,
    pub tls: Family<TlsLabels, Counter>,
    pub identity_expiry: Gauge,
    pub identity_reloads: Counter,
    pub identity_reload_failures: Counter,
    /// Control-plane discovery: watches open, updates applied, streams that broke.
    pub discovery_watches: Gauge,
    pub discovery_updates: Counter,
    pub discovery_stream_errors: Counter,
    pub endpoints: Arc<EndpointFamilies>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub open_connections: Family<DirectionLabels, Gauge>,
    pub connections_refused: Family<DirectionLabels, Counter>,
    pub detect: Family<DetectLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub requests_in_flight: Family<DirectionLabels, Gauge>,
    pub ready: Gauge,
    pub draining: Gauge,
    pub drain_connections: Gauge,
    pub drain_requests: Gauge,
    pub drain_cut: Gauge,
    /// Panics caught on the request path (each one is a bug; the request got a 500).
    pub panics: Counter,
    started: Instant,
    pub uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora");
        let requests = Family::default();
        registry.register(
            "requests",
            "HTTP requests completed, by direction, HTTP status and gRPC status",
            requests.clone(),
        );
        let request_duration =
            Family::<DirectionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response end, by direction",
            request_duration.clone(),
        );
        let connections = Family::default();
        registry.register(
            "connections",
            "Connections accepted, by direction and detected protocol",
            connections.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because the listener's connection limit was reached",
            connections_refused.clone(),
        );
        let open_connections = Family::default();
        registry.register(
            "open_connections",
            "Connections currently open, by direction",
            open_connections.clone(),
        );
        let detect = Family::default();
        registry.register(
            "detect",
            "Protocol detection results, by direction",
            detect.clone(),
        );
        let bytes = Family::default();
        registry.register(
            "transport_bytes",
            "Bytes read from and written to accepted connections (counted when they close)",
            bytes.clone(),
        );
        let errors = Family::default();
        registry.register(
            "errors",
            "Requests answered or connections closed by the proxy because of an error, by kind",
            errors.clone(),
        );
        let requests_in_flight = Family::default();
        registry.register(
            "requests_in_flight",
            "Requests received and not yet answered in full, by direction",
            requests_in_flight.clone(),
        );
        let drain_connections = Gauge::default();
        registry.register(
            "drain_start_connections",
            "Connections open when the drain started",
            drain_connections.clone(),
        );
        let drain_requests = Gauge::default();
        registry.register(
            "drain_start_requests",
            "Requests in flight when the drain started",
            drain_requests.clone(),
        );
        let drain_cut = Gauge::default();
        registry.register(
            "drain_cut_connections",
            "Connections and tunnels still running at the drain deadline, cut",
            drain_cut.clone(),
        );
        let tls = Family::default();
        registry.register(
            "tls_connections",
            "Connections by how TLS went: inbound mtls/plaintext/passthrough/refused_plaintext/handshake_failed/bad_hello, outbound established/failed",
            tls.clone(),
        );
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_expiry_timestamp_seconds",
            "When the certificate in service expires (Unix time)",
            identity_expiry.clone(),
        );
        let identity_reloads = Counter::default();
        registry.register(
            "identity_reloads",
            "Certificate sets validated and put in service",
            identity_reloads.clone(),
        );
        let identity_reload_failures = Counter::default();
        registry.register(
            "identity_reload_failures",
            "Certificate sets refused by validation (the previous set kept serving)",
            identity_reload_failures.clone(),
        );
        let discovery_watches = Gauge::default();
        registry.register(
            "discovery_watches",
            "Control-plane watches this proxy holds (one per destination name in use)",
            discovery_watches.clone(),
        );
        let discovery_updates = Counter::default();
        registry.register(
            "discovery_updates",
            "Snapshots and deltas applied from the control plane",
            discovery_updates.clone(),
        );
        let discovery_stream_errors = Counter::default();
        registry.register(
            "discovery_stream_errors",
            "Control-plane watches that failed or broke (endpoints kept, reconnecting)",
            discovery_stream_errors.clone(),
        );
        let endpoints = Arc::new(EndpointFamilies::default());
        registry.register(
            "endpoint_requests",
            "Requests sent to each endpoint of each destination",
            endpoints.requests.clone(),
        );
        registry.register(
            "endpoint_failures",
            "Failed connects and requests, by endpoint",
            endpoints.failures.clone(),
        );
        registry.register(
            "endpoint_requests_in_flight",
            "Requests waiting for a response head, by endpoint",
            endpoints.in_flight.clone(),
        );
        registry.register(
            "endpoint_latency_ewma_seconds",
            "Peak-EWMA latency the balancer sees, by endpoint",
            endpoints.latency.clone(),
        );
        registry.register(
            "endpoint_ready",
            "1 when the endpoint takes traffic, 0 while it backs off after failures",
            endpoints.ready.clone(),
        );
        let panics = Counter::default();
        registry.register(
            "panics",
            "Panics caught on the request path; every one is a bug, please report it",
            panics.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when the proxy reports ready", ready.clone());
        let draining = Gauge::default();
        registry.register("draining", "1 while the proxy drains", draining.clone());
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "uptime_seconds",
            "Seconds since the proxy started",
            uptime.clone(),
        );
        Metrics {
            registry,
            tls,
            identity_expiry,
            identity_reloads,
            identity_reload_failures,
            discovery_watches,
            discovery_updates,
            discovery_stream_errors,
            requests,
            request_duration,
            connections,
            open_connections,
            connections_refused,
            detect,
            bytes,
            errors,
            requests_in_flight,
            endpoints,
            ready,
            draining,
            drain_connections,
            drain_requests,
            drain_cut,
            panics,
            started: Instant::now(),
            uptime,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut out = String::with_capacity(8 * 1024);
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn error(&self, direction: Direction, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels { direction, kind })
            .inc();
    }

    pub fn tls(&self, direction: Direction, result: TlsResult) {
        self.tls
            .get_or_create(&TlsLabels { direction, result })
            .inc();
    }

    pub fn detected(&self, direction: Direction, result: DetectResult) {
        self.detect
            .get_or_create(&DetectLabels { direction, result })
            .inc();
    }

    /// Read/write byte counters for connections accepted in `direction`.
    pub fn byte_counters(&self, direction: Direction) -> (Counter, Counter) {
        (
            self.bytes.get_or_create_owned(&BytesLabels {
                direction,
                flow: Flow::Read,
            }),
            self.bytes.get_or_create_owned(&BytesLabels {
                direction,
                flow: Flow::Write,
            }),
        )
    }
}

/// The request-metrics layer: counts each request by status and gRPC status, and times it to
/// the end of its response body (where gRPC's status arrives, in trailers).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    handles: Arc<RequestHandles>,
}

/// Per-listener handles, looked up once.
pub struct RequestHandles {
    direction: Direction,
    requests: Family<RequestLabels, Counter>,
    /// The commonest outcomes, resolved once: 200 without and with grpc-status 0 (a family
    /// lookup takes a lock and hashes the labels; profiling showed it on the hot path).
    ok_http: Counter,
    ok_grpc: Counter,
    duration: Histogram,
    in_flight: Gauge,
}

impl RequestHandles {
    pub fn new(metrics: &Metrics, direction: Direction) -> Self {
        let ok = |grpc_status| {
            metrics.requests.get_or_create_owned(&RequestLabels {
                direction,
                status: 200,
                grpc_status,
            })
        };
        RequestHandles {
            direction,
            ok_http: ok(None),
            ok_grpc: ok(Some(0)),
            requests: metrics.requests.clone(),
            duration: metrics
                .request_duration
                .get_or_create_owned(&DirectionLabels { direction }),
            in_flight: metrics
                .requests_in_flight
                .get_or_create_owned(&DirectionLabels { direction }),
        }
    }
}

impl<S> Observe<S> {
    pub fn new(inner: S, handles: Arc<RequestHandles>) -> Self {
        Observe { inner, handles }
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

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.handles.in_flight.inc();
        ObserveFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            in_flight: Some(InFlight(self.handles.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        in_flight: Option<InFlight>,
    }
}

impl<F, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<ObservedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let rsp = std::task::ready!(this.inner.poll(cx))?;
        let recorder = this.in_flight.take().map(|in_flight| Recorder {
            in_flight,
            start: *this.start,
            status: rsp.status().as_u16(),
            grpc_status: grpc_status(rsp.headers()),
        });
        Poll::Ready(Ok(rsp.map(|inner| ObservedBody { inner, recorder })))
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    headers
        .get("grpc-status")
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
        h.duration.observe(self.start.elapsed().as_secs_f64());
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

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(trailers), Some(rec)) = (f.trailers_ref(), this.recorder.as_mut())
                    && let Some(code) = grpc_status(trailers)
                {
                    rec.grpc_status = Some(code);
                }
            }
            // End of stream, or an error: either way the request is over.
            _ => drop(this.recorder.take()),
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

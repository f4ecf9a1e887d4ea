//! Prometheus metrics, all named `remora_*` (contract), served by the admin server.
//!
//! Handles that never change labels (per-direction histograms, connection counters) are looked
//! up once and cloned into the listeners, so the per-request cost is one family lookup for the
//! request counter and a histogram observation.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use crate::direction::Direction;

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
    Transport { Tcp => "tcp", Quic => "quic" }
    TlsResult {
        Mtls => "mtls", Plaintext => "plaintext", Passthrough => "passthrough",
        RefusedPlaintext => "refused_plaintext", HandshakeFailed => "handshake_failed",
        BadHello => "bad_hello", Established => "established", Failed => "failed",
        BadIdentity => "bad_identity",
    }
    ErrorKind {
        NoEndpoints => "no_endpoints", ConnectFailed => "connect_failed",
        UpstreamReset => "upstream_reset", BadRequest => "bad_request", Loop => "loop",
        NoDestination => "no_destination", ClientIo => "client_io", Hook => "hook",
        Timeout => "timeout", IdleTimeout => "idle_timeout",
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ProtocolLabel {
    Http1,
    Http2,
    Opaque,
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
pub enum Transport {
    Tcp,
    Quic,
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
    /// A request hook of the embedding application panicked.
    Hook,
    /// The destination policy's timeout (or the caller's `grpc-timeout`) ran out before the
    /// response head.
    Timeout,
    /// A stream carried no data either way for the destination policy's idle timeout
    /// (`remora.io/idle-timeout`) and was ended.
    IdleTimeout,
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

/// The meshed hop's connections by transport: HTTP/2 over TCP + mTLS, or HTTP/3 over QUIC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshLabels {
    pub direction: Direction,
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
    pub result: TlsResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub direction: Direction,
    /// `total`, `client` or `route`.
    pub scope: &'static str,
    /// The route prefix for `route`, else empty.
    pub route: String,
}

/// A route or split decision: the destination asked for, the one the request went to, and
/// the kind of rule. All come from the operator's policy (bounded targets per destination),
/// not from clients.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutedLabels {
    pub destination: String,
    pub to: String,
    pub by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: Direction,
    pub kind: ErrorKind,
}

pub(crate) fn latency_histogram() -> Histogram {
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
    pub mesh_connections: Family<MeshLabels, Counter>,
    /// Outbound QUIC handshakes that did not complete in time; the request went over TCP.
    pub quic_fallbacks: Counter,
    pub identity_expiry: Gauge,
    pub identity_reloads: Counter,
    pub identity_reload_failures: Counter,
    /// Control-plane discovery: watches open, updates applied, streams that broke.
    pub discovery_watches: Gauge,
    pub discovery_updates: Counter,
    pub discovery_stream_errors: Counter,
    pub endpoints: Arc<EndpointFamilies>,
    /// Per-route RED metrics (capped label sets).
    pub(crate) routes: crate::route_metrics::Routes,
    /// Live request events for `GET /tap` watchers.
    pub(crate) tap: crate::tap::Tap,
    /// Span export counters.
    pub(crate) traces: crate::trace::TraceMetrics,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub open_connections: Family<DirectionLabels, Gauge>,
    pub connections_refused: Family<DirectionLabels, Counter>,
    pub detect: Family<DetectLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    /// Requests refused by an inbound rate limit.
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    /// Requests a destination's routes or split sent to another destination.
    pub policy_routed: Family<RoutedLabels, Counter>,
    /// Requests sent again because of a destination policy's retries.
    pub policy_retries: Family<DirectionLabels, Counter>,
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
        let mut m = Metrics {
            registry: Registry::default(),
            tls: Family::default(),
            mesh_connections: Family::default(),
            quic_fallbacks: Counter::default(),
            identity_expiry: Gauge::default(),
            identity_reloads: Counter::default(),
            identity_reload_failures: Counter::default(),
            discovery_watches: Gauge::default(),
            discovery_updates: Counter::default(),
            discovery_stream_errors: Counter::default(),
            endpoints: Arc::new(EndpointFamilies::default()),
            routes: Default::default(),
            tap: Default::default(),
            traces: Default::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            connections: Family::default(),
            open_connections: Family::default(),
            connections_refused: Family::default(),
            detect: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            policy_retries: Family::default(),
            policy_routed: Family::default(),
            rate_limited: Family::default(),
            requests_in_flight: Family::default(),
            ready: Gauge::default(),
            draining: Gauge::default(),
            drain_connections: Gauge::default(),
            drain_requests: Gauge::default(),
            drain_cut: Gauge::default(),
            panics: Counter::default(),
            started: Instant::now(),
            uptime: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("remora");
        m.register(&mut registry);
        m.registry = registry;
        m
    }

    /// Registers every metric (shared handles, not copies) into `r`, which an embedding
    /// application passes to serve remora's metrics beside its own; the admin endpoint keeps
    /// serving them too. Names are `remora_*` when `r` has no prefix of its own.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_connections",
            "mTLS connections between proxies established, by direction and transport (tcp: HTTP/2 over TCP; quic: HTTP/3)",
            self.mesh_connections.clone(),
        );
        r.register(
            "quic_fallbacks",
            "Outbound QUIC handshakes that did not complete in time (UDP blocked?); the request went over TCP + mTLS",
            self.quic_fallbacks.clone(),
        );
        r.register(
            "requests",
            "HTTP requests completed, by direction, HTTP status and gRPC status",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request received to response end, by direction",
            self.request_duration.clone(),
        );
        r.register(
            "connections",
            "Connections accepted, by direction and detected protocol",
            self.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept because the listener's connection limit was reached",
            self.connections_refused.clone(),
        );
        r.register(
            "open_connections",
            "Connections currently open, by direction",
            self.open_connections.clone(),
        );
        r.register(
            "detect",
            "Protocol detection results, by direction",
            self.detect.clone(),
        );
        r.register(
            "transport_bytes",
            "Bytes read from and written to accepted connections (counted when they close)",
            self.bytes.clone(),
        );
        r.register(
            "errors",
            "Requests answered or connections closed by the proxy because of an error, by kind",
            self.errors.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused with 429 / RESOURCE_EXHAUSTED by a rate limit (remora.io/rate-limit: scope total; -per-client: scope client)",
            self.rate_limited.clone(),
        );
        r.register(
            "policy_routed",
            "Requests a destination's routes or split (remora.io/routes, remora.io/split) sent to another destination, by destination, target and rule kind (header, path, split)",
            self.policy_routed.clone(),
        );
        r.register(
            "policy_retries",
            "Requests tried again on another endpoint after a 503 or gRPC UNAVAILABLE, by a destination policy's retries",
            self.policy_retries.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests received and not yet answered in full, by direction",
            self.requests_in_flight.clone(),
        );
        r.register(
            "drain_start_connections",
            "Connections open when the drain started",
            self.drain_connections.clone(),
        );
        r.register(
            "drain_start_requests",
            "Requests in flight when the drain started",
            self.drain_requests.clone(),
        );
        r.register(
            "drain_cut_connections",
            "Connections and tunnels still running at the drain deadline, cut",
            self.drain_cut.clone(),
        );
        r.register("tls_connections", "Connections by how TLS went: inbound mtls/plaintext/passthrough/refused_plaintext/handshake_failed/bad_hello, outbound established/failed", self.tls.clone());
        r.register(
            "identity_expiry_timestamp_seconds",
            "When the certificate in service expires (Unix time)",
            self.identity_expiry.clone(),
        );
        r.register(
            "identity_reloads",
            "Certificate sets validated and put in service",
            self.identity_reloads.clone(),
        );
        r.register(
            "identity_reload_failures",
            "Certificate sets refused by validation (the previous set kept serving)",
            self.identity_reload_failures.clone(),
        );
        r.register(
            "discovery_watches",
            "Control-plane watches this proxy holds (one per destination name in use)",
            self.discovery_watches.clone(),
        );
        r.register(
            "discovery_updates",
            "Snapshots and deltas applied from the control plane",
            self.discovery_updates.clone(),
        );
        r.register(
            "discovery_stream_errors",
            "Control-plane watches that failed or broke (endpoints kept, reconnecting)",
            self.discovery_stream_errors.clone(),
        );
        r.register(
            "endpoint_requests",
            "Requests sent to each endpoint of each destination",
            self.endpoints.requests.clone(),
        );
        r.register(
            "endpoint_failures",
            "Failed connects and requests, by endpoint",
            self.endpoints.failures.clone(),
        );
        r.register(
            "endpoint_requests_in_flight",
            "Requests waiting for a response head, by endpoint",
            self.endpoints.in_flight.clone(),
        );
        r.register(
            "endpoint_latency_ewma_seconds",
            "Peak-EWMA latency the balancer sees, by endpoint",
            self.endpoints.latency.clone(),
        );
        r.register(
            "endpoint_ready",
            "1 when the endpoint takes traffic, 0 while it backs off after failures",
            self.endpoints.ready.clone(),
        );
        self.routes.register(r);
        self.tap.register(r);
        self.traces.register(r);
        r.register(
            "access_log_dropped",
            "Access log lines dropped because standard output fell behind",
            crate::access_log::dropped(),
        );
        r.register(
            "panics",
            "Panics caught on the request path; every one is a bug, please report it",
            self.panics.clone(),
        );
        r.register(
            "ready",
            "1 when the proxy reports ready",
            self.ready.clone(),
        );
        r.register(
            "draining",
            "1 while the proxy drains",
            self.draining.clone(),
        );
        r.register(
            "uptime_seconds",
            "Seconds since the proxy started",
            self.uptime.clone(),
        );
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

    pub fn mesh_connection(&self, direction: Direction, transport: Transport) {
        self.mesh_connections
            .get_or_create(&MeshLabels {
                direction,
                transport,
            })
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

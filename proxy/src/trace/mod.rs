//! Distributed tracing: W3C trace context continued per request, spans exported over OTLP.
//!
//! With `REMORA_TRACE_COLLECTOR` unset (the default) the proxy touches no trace header:
//! `traceparent`, `tracestate` and B3's `x-b3-*` pass as the client sent them. With it set,
//! each request that arrives with a valid, *sampled* `traceparent` gets a span of its own (a
//! client span outbound, a server span inbound): the proxy keeps the trace id, makes a new span
//! id, and sends the request on with `traceparent` naming its span as the parent, so the app's
//! spans hang under the proxy's. `tracestate` is left as is (the proxy adds no vendor entry).
//! As in Linkerd, the proxy never starts a trace itself nor samples an unsampled one: the
//! sampling decision is the caller's, and an unsampled request costs one header parse.
//!
//! Spans go to the collector (OTLP/gRPC, `TraceService/Export`) in batches from one task,
//! through a bounded queue: a slow or absent collector drops spans (counted), never slows a
//! request. Attributes follow the OpenTelemetry HTTP and RPC conventions, plus the peer's
//! verified identity.

pub(crate) mod otlp;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::direction::Direction;
use crate::identity::IdentityStore;
use otlp::KeyValue;

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// Spans per Export call at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The export counters (always registered; zero while tracing is off).
#[derive(Default)]
pub(crate) struct TraceMetrics {
    exported: Counter,
    dropped: Counter,
}

impl TraceMetrics {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "trace_spans_exported",
            "Spans the trace collector accepted",
            self.exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans dropped: the export queue was full or the collector failed",
            self.dropped.clone(),
        );
    }
}

/// A request's `traceparent`, parsed: trace id, parent span id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent: [u8; 8],
    pub flags: u8,
}

fn hex_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(())
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Parses a `traceparent` (W3C Trace Context level 1): `VV-TRACEID-PARENTID-FLAGS`, lower-case
/// hex. Version `ff` and all-zero ids are invalid; a later version is read by its first four
/// fields, as the spec asks.
pub(crate) fn parse_traceparent(v: &[u8]) -> Option<TraceParent> {
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut version = [0u8; 1];
    hex_into(&v[..2], &mut version)?;
    if version[0] == 0xff {
        return None;
    }
    let mut tp = TraceParent {
        trace_id: [0; 16],
        parent: [0; 8],
        flags: 0,
    };
    hex_into(&v[3..35], &mut tp.trace_id)?;
    hex_into(&v[36..52], &mut tp.parent)?;
    let mut flags = [0u8; 1];
    hex_into(&v[53..55], &mut flags)?;
    tp.flags = flags[0];
    (tp.trace_id != [0; 16] && tp.parent != [0; 8]).then_some(tp)
}

/// A span begun at a request's arrival.
pub(crate) struct SpanStart {
    trace_id: [u8; 16],
    parent: [u8; 8],
    span_id: [u8; 8],
    start: SystemTime,
    trace_state: String,
}

/// What a finished request contributes to its span.
pub(crate) struct SpanEnd<'a> {
    pub direction: Direction,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub status: u16,
    pub grpc_status: Option<u8>,
    pub failed: bool,
    pub finished: bool,
    pub duration: Duration,
    pub peer_identity: Option<&'a str>,
    pub endpoint: Option<std::net::SocketAddr>,
}

/// The proxy's span sink: a queue to the export task.
pub(crate) struct Tracer {
    tx: mpsc::Sender<otlp::Span>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Tracer {
    /// Starts the export task (on the current runtime) for the collector at `collector`
    /// (`host:port`, OTLP/gRPC, plaintext). `identity` names this proxy's service in the spans.
    pub(crate) fn spawn(
        collector: &str,
        identity: Option<Arc<IdentityStore>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Tracer>, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{collector}"))
            .map_err(|e| format!("REMORA_TRACE_COLLECTOR {collector}: {e}; use host:port"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(EXPORT_TIMEOUT);
        let channel = endpoint.connect_lazy();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(export_loop(
            rx,
            channel,
            collector.to_string(),
            identity,
            metrics.clone(),
        ));
        Ok(Arc::new(Tracer { tx, metrics }))
    }

    /// Continues the request's trace when it is sampled: a span of ours begins, and
    /// `traceparent` is rewritten to name it as the parent of what follows.
    pub(crate) fn start(&self, headers: &mut http::HeaderMap) -> Option<SpanStart> {
        let tp = parse_traceparent(headers.get(&TRACEPARENT)?.as_bytes())?;
        if tp.flags & 1 == 0 {
            return None;
        }
        let span_id = loop {
            let id = crate::random::u64().to_be_bytes();
            if id != [0; 8] {
                break id;
            }
        };
        let value = format!(
            "00-{}-{}-{:02x}",
            hex(&tp.trace_id),
            hex(&span_id),
            tp.flags
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, v);
        }
        let trace_state = headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some(SpanStart {
            trace_id: tp.trace_id,
            parent: tp.parent,
            span_id,
            start: SystemTime::now(),
            trace_state,
        })
    }

    /// Queues the finished span; a full queue drops it.
    pub(crate) fn finish(&self, start: SpanStart, end: &SpanEnd<'_>) {
        if self.tx.try_send(span(start, end)).is_err() {
            self.metrics.traces.dropped.inc();
        }
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The OTLP span: names and attributes from the OpenTelemetry HTTP and RPC conventions.
fn span(start: SpanStart, end: &SpanEnd<'_>) -> otlp::Span {
    let mut attrs = vec![
        KeyValue::str("http.request.method", end.method),
        KeyValue::str("url.path", end.path),
        KeyValue::int("http.response.status_code", i64::from(end.status)),
        KeyValue::str("remora.direction", end.direction.as_str()),
    ];
    if let Some(a) = end.authority {
        // No port written is HTTP's default: requests reach the proxy as plaintext HTTP.
        let (host, port) = match a.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h, p.parse::<i64>().unwrap_or(80)),
            _ => (a, 80),
        };
        attrs.push(KeyValue::str("server.address", host));
        attrs.push(KeyValue::int("server.port", port));
    }
    let grpc = crate::route_metrics::grpc_method(end.path).filter(|_| end.grpc_status.is_some());
    let name = match grpc {
        Some((service, method)) => {
            attrs.push(KeyValue::str("rpc.system", "grpc"));
            attrs.push(KeyValue::str("rpc.service", service));
            attrs.push(KeyValue::str("rpc.method", method));
            format!("{service}/{method}")
        }
        None => end.method.to_string(),
    };
    if let Some(g) = end.grpc_status {
        attrs.push(KeyValue::int("rpc.grpc.status_code", i64::from(g)));
    }
    if let Some(ep) = end.endpoint {
        attrs.push(KeyValue::str("network.peer.address", ep.ip().to_string()));
        attrs.push(KeyValue::int("network.peer.port", i64::from(ep.port())));
    }
    if let Some(id) = end.peer_identity {
        let key = match end.direction {
            Direction::Inbound => "remora.client.identity",
            Direction::Outbound => "remora.server.identity",
        };
        attrs.push(KeyValue::str(key, id));
    }
    let status = end.failed.then(|| otlp::Status {
        code: otlp::STATUS_ERROR,
        message: match (end.finished, end.grpc_status) {
            (false, _) => "the response was cut short".to_string(),
            (true, Some(g)) if g != 0 => format!("grpc-status {g}"),
            _ => format!("HTTP {}", end.status),
        },
    });
    otlp::Span {
        trace_id: start.trace_id.to_vec(),
        span_id: start.span_id.to_vec(),
        trace_state: start.trace_state,
        parent_span_id: start.parent.to_vec(),
        name,
        kind: match end.direction {
            Direction::Inbound => otlp::KIND_SERVER,
            Direction::Outbound => otlp::KIND_CLIENT,
        },
        start_time_unix_nano: nanos(start.start),
        end_time_unix_nano: nanos(start.start + end.duration),
        attributes: attrs,
        status,
    }
}

/// `service.name` and `service.namespace` from this proxy's SPIFFE ID
/// (`spiffe://TD/ns/NS/sa/SA`), derived rather than configured.
fn resource(identity: Option<&IdentityStore>) -> otlp::Resource {
    let id = identity
        .and_then(|s| s.current())
        .map(|l| l.id().to_string());
    let mut attributes = vec![KeyValue::str("telemetry.sdk.name", "remora")];
    match id.as_deref().and_then(|id| {
        let rest = id.split_once("/ns/")?.1;
        let (ns, sa) = rest.split_once("/sa/")?;
        Some((ns.to_string(), sa.to_string()))
    }) {
        Some((ns, sa)) => {
            attributes.push(KeyValue::str("service.name", sa));
            attributes.push(KeyValue::str("service.namespace", ns));
        }
        None => attributes.push(KeyValue::str("service.name", "remora-proxy")),
    }
    if let Some(id) = id {
        attributes.push(KeyValue::str("remora.identity", id));
    }
    otlp::Resource { attributes }
}

async fn export_loop(
    mut rx: mpsc::Receiver<otlp::Span>,
    channel: tonic::transport::Channel,
    collector: String,
    identity: Option<Arc<IdentityStore>>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut last_warning: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut spans = vec![first];
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while spans.len() < BATCH {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => spans.push(s),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let n = spans.len() as u64;
        let req = otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(resource(identity.as_deref())),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(otlp::InstrumentationScope {
                        name: "remora-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        };
        let sent = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<
                otlp::ExportTraceServiceRequest,
                otlp::ExportTraceServiceResponse,
            >::default();
            grpc.unary(
                tonic::Request::new(req),
                http::uri::PathAndQuery::from_static(otlp::EXPORT_PATH),
                codec,
            )
            .await
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, sent).await {
            Ok(Ok(_)) => {
                metrics.traces.exported.inc_by(n);
            }
            failed => {
                metrics.traces.dropped.inc_by(n);
                let error = match failed {
                    Ok(Err(status)) => status.to_string(),
                    _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                };
                // One warning a minute: a collector that is down must not flood the log.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(%collector, %error, spans = n, "trace export failed; spans dropped (check REMORA_TRACE_COLLECTOR and the collector)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = parse_traceparent(ok.as_bytes()).unwrap();
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&tp.parent), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        // A later version: its first four fields, anything after a dash ignored.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn sampled_requests_get_a_span_and_a_new_parent_unsampled_ones_are_untouched() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        // Nothing listens on port 9 of loopback: spans are queued, the export fails later.
        let tracer = Tracer::spawn("127.0.0.1:9", None, metrics).unwrap();
        let mut h = http::HeaderMap::new();
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(sent));
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let start = tracer.start(&mut h).unwrap();
        let now = h["traceparent"].to_str().unwrap().to_string();
        assert_ne!(now, sent);
        let tp = parse_traceparent(now.as_bytes()).unwrap();
        assert_eq!(hex(&tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent, start.span_id, "the app's parent is our span");
        assert_eq!(tp.flags, 1);
        assert_eq!(h["tracestate"], "vendor=x");
        let s = span(
            start,
            &SpanEnd {
                direction: Direction::Inbound,
                method: "POST",
                path: "/pkg.Svc/Get",
                authority: Some("web.prod:8080"),
                status: 200,
                grpc_status: Some(14),
                failed: true,
                finished: true,
                duration: Duration::from_millis(3),
                peer_identity: Some("spiffe://td/ns/a/sa/b"),
                endpoint: Some("127.0.0.1:8080".parse().unwrap()),
            },
        );
        assert_eq!(s.name, "pkg.Svc/Get");
        assert_eq!(s.kind, otlp::KIND_SERVER);
        assert_eq!(s.parent_span_id, tp_parent_of(sent));
        assert_eq!(s.trace_state, "vendor=x");
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 3_000_000);
        assert_eq!(s.status.as_ref().unwrap().message, "grpc-status 14");
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        for k in [
            "rpc.system",
            "rpc.service",
            "rpc.method",
            "rpc.grpc.status_code",
            "server.address",
            "server.port",
            "remora.client.identity",
            "network.peer.address",
        ] {
            assert!(keys.contains(&k), "{k} in {keys:?}");
        }

        let mut unsampled = http::HeaderMap::new();
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        unsampled.insert("traceparent", HeaderValue::from_static(v));
        assert!(tracer.start(&mut unsampled).is_none());
        assert_eq!(unsampled["traceparent"], v, "untouched");
        assert!(tracer.start(&mut http::HeaderMap::new()).is_none());
    }

    fn tp_parent_of(v: &str) -> Vec<u8> {
        parse_traceparent(v.as_bytes()).unwrap().parent.to_vec()
    }
}

//! The control plane's Prometheus metrics, named `remora_control_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Why a connection was closed before its TLS handshake: `total` (the process-wide limit) or
/// `per_peer` (the limit for one client IP).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub services: Gauge,
    pub watches: Gauge,
    pub watches_refused: Counter,
    pub connections: Gauge,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub updates_sent: Counter,
    pub source_reloads: Counter,
    pub source_reload_failures: Counter,
    pub certify: Family<ResultLabels, Counter>,
    pub issuer_reload_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("remora_control");
        let m = Metrics {
            services: Gauge::default(),
            watches: Gauge::default(),
            watches_refused: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Family::default(),
            updates_sent: Counter::default(),
            source_reloads: Counter::default(),
            source_reload_failures: Counter::default(),
            certify: Family::default(),
            issuer_reload_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "services",
            "Services known to the source",
            m.services.clone(),
        );
        registry.register("watches", "Discovery watches open", m.watches.clone());
        registry.register(
            "watches_refused",
            "Discovery watches refused with RESOURCE_EXHAUSTED (the process-wide watch limit)",
            m.watches_refused.clone(),
        );
        registry.register(
            "connections",
            "gRPC connections open (TLS handshakes included)",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "gRPC connections closed before TLS by a connection limit, by limit (total, per_peer)",
            m.connections_refused.clone(),
        );
        registry.register(
            "updates_sent",
            "Discovery messages sent (snapshots, deltas, no-such-service)",
            m.updates_sent.clone(),
        );
        registry.register(
            "source_reloads",
            "Endpoint tables accepted from the source",
            m.source_reloads.clone(),
        );
        registry.register(
            "source_reload_failures",
            "Endpoint files refused (the previous table kept serving)",
            m.source_reload_failures.clone(),
        );
        registry.register("certify", "Certify requests by result", m.certify.clone());
        registry.register(
            "issuer_reload_failures",
            "Issuer directory changes refused (the previous issuer kept signing)",
            m.issuer_reload_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

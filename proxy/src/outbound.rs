//! The outbound side: the application's calls, routed by authority (explicit proxy).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::discover::Destinations;
use crate::drain::Drain;
use crate::hooks::NoHooks;
use crate::http::forward::{Forwarder, PerRequest, Route};
use crate::listener::Listener;
use crate::metrics::{Direction, Metrics};
use crate::scrub::Rules;

pub(crate) fn listener(
    cfg: &Config,
    destinations: Arc<Destinations>,
    metrics: Arc<Metrics>,
    drain: Drain,
    rules: Arc<Rules>,
    own_addrs: Vec<SocketAddr>,
    per_request: PerRequest,
) -> Listener {
    let forward = Arc::new(Forwarder {
        direction: Direction::Outbound,
        route: Route::Destinations(destinations),
        metrics: metrics.clone(),
        drain,
        own_addrs,
        rules: rules.clone(),
        hooks_active: per_request.hooks.is_some(),
        access_log: cfg.access_log.and_then(crate::access_log::AccessLog::new),
        tracer: per_request.tracer,
        limits: None,
        hooks: per_request.hooks.unwrap_or_else(|| Arc::new(NoHooks)),
        local_ips: crate::http::forward::local_addresses(),
    });
    // Explicit-proxy connections are always detected: a non-HTTP stream names no destination,
    // so opaque traffic arrives as an HTTP CONNECT tunnel. Intercepted ones have their
    // original destination instead.
    let mut l = Listener::new(
        Direction::Outbound,
        forward,
        rules,
        cfg.detect_timeout,
        false,
        None,
        metrics,
    );
    // Intercepted connections to these ports are forwarded without waiting for the client.
    l.opaque_ports = cfg.opaque_ports.clone();
    match cfg.max_connections {
        Some(max) => l.with_max_connections(max),
        None => l,
    }
}

//! The inbound side: everything that arrives for the local application.

use std::sync::Arc;

use crate::config::Config;
use crate::drain::Drain;
use crate::endpoint::Endpoint;
use crate::hooks::NoHooks;
use crate::http::forward::{Forwarder, PerRequest, Route};
use crate::listener::{AppPorts, Listener};
use crate::metrics::{Direction, Metrics};
use crate::scrub::Rules;

pub(crate) fn listener(
    cfg: &Config,
    limits: Option<Arc<crate::ratelimit::RateLimits>>,
    metrics: Arc<Metrics>,
    drain: Drain,
    rules: Arc<Rules>,
    per_request: PerRequest,
) -> Listener {
    let app = Arc::new(
        Endpoint::new(cfg.app_addr, 1, cfg.connect_timeout, None).with_unix(cfg.app_unix.clone()),
    );
    let forward = Arc::new(Forwarder {
        direction: Direction::Inbound,
        route: Route::App(app.clone()),
        metrics: metrics.clone(),
        drain,
        own_addrs: Vec::new(),
        rules: rules.clone(),
        hooks_active: per_request.hooks.is_some(),
        access_log: cfg.access_log.and_then(crate::access_log::AccessLog::new),
        tracer: per_request.tracer,
        limits,
        hooks: per_request.hooks.unwrap_or_else(|| Arc::new(NoHooks)),
        local_ips: Vec::new(),
    });
    // The app's port decides: a server-speaks-first app must not wait for detection.
    let skip = cfg.opaque_ports.contains(&cfg.app_addr.port());
    let mut l = Listener::new(
        Direction::Inbound,
        forward,
        rules,
        cfg.detect_timeout,
        skip,
        Some(app.clone()),
        metrics,
    );
    // Intercepted connections (`remora-proxy init`) reach the app on their original port, so
    // a pod serving several ports needs no knob per port; opaque ports apply per port.
    l.opaque_ports = cfg.opaque_ports.clone();
    l.app_ports = Some(AppPorts {
        app,
        connect_timeout: cfg.connect_timeout,
        own_ports: vec![
            cfg.inbound_addr.port(),
            cfg.outbound_addr.port(),
            cfg.admin_addr.port(),
        ],
        by_port: Default::default(),
    });
    match cfg.max_connections {
        Some(max) => l.with_max_connections(max),
        None => l,
    }
}

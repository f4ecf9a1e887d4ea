//! Per-route RED metrics with zero configuration: requests, failures and latency by gRPC
//! service and method (read from the `:path` of `application/grpc` requests) and by peer
//! identity (inbound: the verified client; outbound: the identity the server proved), in both
//! directions.
//!
//! A route's labels come from what clients send, so their number is capped: past
//! [`MAX_ROUTES`] label sets, new combinations are counted in one `route="other"` set per
//! direction and in `remora_route_overflow_total`, and a path-scanning client cannot grow the
//! registry. Label sets are never evicted: in a mesh, gRPC methods and identities are few and
//! stable, and a counter that disappears would break `rate()`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::direction::Direction;

/// Label sets a proxy keeps per-route series for, both directions together.
pub(crate) const MAX_ROUTES: usize = 256;

/// Longest gRPC `:path` taken as a route; anything longer is not a method name.
const MAX_GRPC_PATH: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub direction: Direction,
    /// Inbound: the verified client's SPIFFE ID; outbound: the server's; `""` without mTLS.
    pub peer_identity: String,
    /// `grpc` for a gRPC method, `default` for other HTTP, `other` for the overflow set.
    pub route: &'static str,
    pub grpc_service: String,
    pub grpc_method: String,
}

/// One label set's handles, resolved once and then shared by every request on the route.
pub(crate) struct RouteHandles {
    requests: Counter,
    failures: Counter,
    duration: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RouteKey {
    direction: Direction,
    peer: Option<Arc<str>>,
    /// The gRPC `:path`, `None` for other HTTP requests.
    grpc: Option<Box<str>>,
}

/// How a request ended, as far as its route's success rate is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub status: u16,
    pub grpc_status: Option<u8>,
    /// False when the client went away or the body failed before the end.
    pub finished: bool,
}

impl Outcome {
    /// Linkerd's classification: a 5xx, a gRPC status other than OK, or a response that never
    /// finished is a failure; everything else (4xx included) is the app answering.
    pub(crate) fn failed(self) -> bool {
        !self.finished || self.status >= 500 || self.grpc_status.is_some_and(|s| s != 0)
    }
}

/// The route table and its families.
pub(crate) struct Routes {
    /// Looked up once per request: foldhash (randomly seeded per process, as hashbrown's
    /// default) instead of SipHash, ~250 instructions fewer per request. The table is capped, so
    /// keys a client picks (gRPC paths) cannot grow a collision chain without bound.
    table: RwLock<HashMap<RouteKey, Arc<RouteHandles>, foldhash::fast::RandomState>>,
    requests: Family<RouteLabels, Counter>,
    failures: Family<RouteLabels, Counter>,
    duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    overflow: Counter,
    label_sets: Gauge,
    cap: usize,
}

impl Default for Routes {
    fn default() -> Self {
        Routes::with_cap(MAX_ROUTES)
    }
}

/// `service` and `method` of a gRPC `:path` (`/package.Service/Method`), when it is one.
pub(crate) fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    let name = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    (path.len() <= MAX_GRPC_PATH && name(service) && name(method)).then_some((service, method))
}

impl Routes {
    pub(crate) fn with_cap(cap: usize) -> Self {
        Routes {
            table: RwLock::new(HashMap::default()),
            requests: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(crate::metrics::latency_histogram),
            overflow: Counter::default(),
            label_sets: Gauge::default(),
            cap,
        }
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "route_requests",
            "HTTP requests completed, by direction, peer identity and route (gRPC service and method)",
            self.requests.clone(),
        );
        r.register(
            "route_failures",
            "Requests that failed (5xx, gRPC status other than OK, or cut short), by route",
            self.failures.clone(),
        );
        r.register(
            "route_request_duration_seconds",
            "Time from request received to response end, by route",
            self.duration.clone(),
        );
        r.register(
            "route_overflow",
            "Requests counted under route=\"other\" because the route label sets were at their cap",
            self.overflow.clone(),
        );
        r.register(
            "route_label_sets",
            "Per-route label sets in use (capped)",
            self.label_sets.clone(),
        );
    }

    /// The handles for a request's route. `grpc_path` is the `:path` of a gRPC request.
    pub(crate) fn handles(
        &self,
        direction: Direction,
        peer: Option<&Arc<str>>,
        grpc_path: Option<&str>,
    ) -> Arc<RouteHandles> {
        let key = RouteKey {
            direction,
            peer: peer.cloned(),
            grpc: grpc_path.map(Box::from),
        };
        if let Some(h) = self
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return h.clone();
        }
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = table.get(&key) {
            return h.clone();
        }
        if table.len() >= self.cap {
            self.overflow.inc();
            return self.resolve(RouteLabels {
                direction,
                peer_identity: String::new(),
                route: "other",
                grpc_service: String::new(),
                grpc_method: String::new(),
            });
        }
        let (route, service, method) = match key.grpc.as_deref() {
            Some(p) => match grpc_method(p) {
                Some((s, m)) => ("grpc", s, m),
                None => ("grpc", "", ""),
            },
            None => ("default", "", ""),
        };
        let labels = RouteLabels {
            direction,
            peer_identity: key.peer.as_deref().unwrap_or("").to_string(),
            route,
            grpc_service: service.to_string(),
            grpc_method: method.to_string(),
        };
        let h = self.resolve(labels);
        table.insert(key, h.clone());
        self.label_sets.set(table.len() as i64);
        h
    }

    fn resolve(&self, labels: RouteLabels) -> Arc<RouteHandles> {
        Arc::new(RouteHandles {
            requests: self.requests.get_or_create_owned(&labels),
            failures: self.failures.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
        })
    }
}

impl RouteHandles {
    pub(crate) fn record(&self, outcome: Outcome, seconds: f64) {
        self.requests.inc();
        if outcome.failed() {
            self.failures.inc();
        }
        self.duration.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths() {
        let table = [
            (
                "/helloworld.Greeter/SayHello",
                Some(("helloworld.Greeter", "SayHello")),
            ),
            ("/Svc/M", Some(("Svc", "M"))),
            ("/a.b-c_d/E9", Some(("a.b-c_d", "E9"))),
            ("", None),
            ("/", None),
            ("/Svc", None),
            ("/Svc/", None),
            ("//M", None),
            ("/Svc/M/extra", None),
            ("/Svc/M?x=1", None),
            ("/Sv c/M", None),
            ("/Svc/M\u{e9}", None),
        ];
        for (path, want) in table {
            assert_eq!(grpc_method(path), want, "{path:?}");
        }
        let long = format!("/{}/M", "s".repeat(300));
        assert_eq!(grpc_method(&long), None);
    }

    #[test]
    fn outcomes() {
        let o = |status, grpc_status, finished| Outcome {
            status,
            grpc_status,
            finished,
        };
        let table = [
            (o(200, None, true), false),
            (o(404, None, true), false),
            (o(200, Some(0), true), false),
            (o(200, Some(14), true), true),
            (o(503, None, true), true),
            (o(200, None, false), true),
        ];
        for (outcome, failed) in table {
            assert_eq!(outcome.failed(), failed, "{outcome:?}");
        }
    }

    #[test]
    fn label_sets_stop_at_the_cap_and_overflow_is_counted() {
        let routes = Routes::with_cap(3);
        let peer: Arc<str> = Arc::from("spiffe://td/ns/a/sa/b");
        let a = routes.handles(Direction::Inbound, Some(&peer), Some("/S/A"));
        let a2 = routes.handles(Direction::Inbound, Some(&peer), Some("/S/A"));
        assert!(Arc::ptr_eq(&a, &a2), "one label set per route, looked up");
        routes.handles(Direction::Inbound, None, Some("/S/B"));
        routes.handles(Direction::Outbound, None, None);
        for i in 0..100 {
            let h = routes.handles(Direction::Inbound, None, Some(&format!("/S/M{i}")));
            h.record(
                Outcome {
                    status: 200,
                    grpc_status: Some(0),
                    finished: true,
                },
                0.001,
            );
        }
        assert_eq!(routes.label_sets.get(), 3);
        assert_eq!(routes.overflow.get(), 100);
        let mut r = Registry::default();
        routes.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("route_requests_total{"))
            .count();
        assert_eq!(series, 4, "three routes and the overflow set:\n{text}");
        assert!(text.contains(r#"route_requests_total{direction="inbound",peer_identity="",route="other",grpc_service="",grpc_method=""} 100"#), "{text}");
        assert!(
            text.contains(r#"grpc_service="S",grpc_method="A""#),
            "{text}"
        );
    }
}

//! `Discovery.Watch`: a proxy names a service and gets its full endpoint set, then deltas.
//!
//! Each watch follows the service's registry channel. The first message is a snapshot (or
//! "no such service"); after that the watch compares the set it last sent with the current
//! one and sends only what changed. Because the channel holds only the latest set, a proxy
//! that reads slowly gets fewer, larger deltas, never an unbounded queue.

use std::pin::Pin;
use std::sync::Arc;

use remora_api::{
    Alias, Delta, Endpoint, NoSuchService, Snapshot, Update, WatchAddrRequest, WatchRequest, update,
};
use remora_certs::{EndpointSpec, Policy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::registry::{Published, Registry};

pub struct DiscoveryService {
    pub registry: Arc<Registry>,
    /// ClusterIP:port → the Service's endpoints (`WatchAddr`).
    pub by_addr: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// True once the source has published its first full table. Until then a watch sends
    /// nothing: "no such service" from a control plane that has not listed anything yet would
    /// make every reconnecting proxy drop its endpoints.
    pub synced: tokio::sync::watch::Receiver<bool>,
    /// The cluster's DNS domain, for expanding names the way a pod's search path does.
    pub cluster_domain: String,
    /// One permit per open watch, across every connection: the per-connection stream limit
    /// alone would let many connections hold millions of watches (about 12 KB each).
    watch_permits: Arc<Semaphore>,
    max_watches: usize,
}

impl DiscoveryService {
    /// `max_watches` bounds the watches open at once over all connections; beyond it `Watch`
    /// answers RESOURCE_EXHAUSTED and the proxy retries with backoff.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        synced: tokio::sync::watch::Receiver<bool>,
        max_watches: usize,
    ) -> Self {
        DiscoveryService {
            registry,
            by_addr: Registry::new(),
            metrics,
            synced,
            cluster_domain: crate::source::kubernetes::DEFAULT_CLUSTER_DOMAIN.to_string(),
            watch_permits: Arc::new(Semaphore::new(max_watches.min(Semaphore::MAX_PERMITS))),
            max_watches,
        }
    }

    /// Serves `WatchAddr` from `by_addr` (the Kubernetes source's ClusterIP table).
    pub fn with_addresses(mut self, by_addr: Arc<Registry>) -> Self {
        self.by_addr = by_addr;
        self
    }

    /// Expands names with `cluster_domain` (default `cluster.local`).
    pub fn with_cluster_domain(mut self, cluster_domain: &str) -> Self {
        self.cluster_domain = cluster_domain.trim_end_matches('.').to_ascii_lowercase();
        self
    }

    /// The zone of the endpoint at the address the caller connects from (a sidecar connects
    /// from its pod's IP); empty when it is not an endpoint or its zone is not known.
    fn caller_zone<T>(&self, request: &Request<T>) -> String {
        request
            .extensions()
            .get::<crate::server::PeerAddr>()
            // A dual-stack listener sees IPv4 callers as ::ffff:a.b.c.d.
            .and_then(|p| self.by_addr.zone_of(p.0.ip().to_canonical()))
            .unwrap_or_default()
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.watch_permits.clone().try_acquire_owned().map_err(|_| {
            self.metrics.watches_refused.inc();
            Status::resource_exhausted(format!(
                "{} discovery watches are open on this control plane (its limit, --max-watches); retry later or on another replica",
                self.max_watches
            ))
        })
    }

    /// Streams what the first of `names` that is known publishes, following all of them (an
    /// earlier name appearing later takes over, as it would in the caller's resolver).
    ///
    /// `caller_zone` goes with every snapshot: the caller's zone as far as this control plane
    /// knows it (see [`Registry::zone_of`]).
    fn stream(
        &self,
        registry: &Arc<Registry>,
        names: Vec<String>,
        caller_zone: String,
    ) -> Result<WatchStream, Status> {
        let permit = self.permit()?;
        let (tx, out) = mpsc::channel::<Result<Update, Status>>(1);
        let metrics = self.metrics.clone();
        metrics.watches.inc();
        let mut guard = WatchGuard {
            rxs: names.iter().map(|n| registry.subscribe(n)).collect(),
            metrics: metrics.clone(),
            registry: registry.clone(),
            names,
            _permit: permit,
        };
        let mut synced = self.synced.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = synced.wait_for(|s| *s) => if r.is_err() { return },
                _ = tx.closed() => return,
            }
            let mut sent: Option<Option<Published>> = None;
            loop {
                let mut now = None;
                for rx in guard.rxs.iter_mut() {
                    let v = rx.borrow_and_update().clone();
                    if now.is_none() {
                        now = v;
                    }
                }
                if let Some(mut msg) = diff(sent.as_ref(), &now) {
                    if let Some(update::Kind::Snapshot(s)) = msg.kind.as_mut() {
                        s.caller_zone.clone_from(&caller_zone);
                    }
                    // Waits while the proxy is slow; meanwhile changes collapse in `rxs`.
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    metrics.updates_sent.inc();
                }
                sent = Some(now);
                let changed = futures_util::future::select_all(
                    guard.rxs.iter_mut().map(|rx| Box::pin(rx.changed())),
                );
                tokio::select! {
                    (changed, _, _) = changed => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)))
    }
}

/// Longest service name accepted (a DNS name and a port).
const MAX_NAME: usize = 260;

/// The names `name` (normalised `host:port`) stands for from a pod in `namespace`, in the
/// order its resolver tries them: Kubernetes writes `search <ns>.svc.<domain> svc.<domain>
/// <domain>` and `ndots:5` into every pod's resolv.conf, so a name with fewer than 5 dots is
/// tried with each suffix before as written. A trailing dot means "as written only". IP
/// literals are never expanded.
pub fn candidates(name: &str, namespace: Option<&str>, cluster_domain: &str) -> Vec<String> {
    let Some((host, port)) = name.rsplit_once(':') else {
        return vec![name.to_string()];
    };
    if let Some(absolute) = host.strip_suffix('.') {
        return vec![format!("{absolute}:{port}")];
    }
    if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
        return vec![name.to_string()];
    }
    let mut search = Vec::with_capacity(3);
    if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
        search.push(format!("{host}.{ns}.svc.{cluster_domain}:{port}"));
    }
    search.push(format!("{host}.svc.{cluster_domain}:{port}"));
    search.push(format!("{host}.{cluster_domain}:{port}"));
    let mut out = Vec::with_capacity(4);
    if host.matches('.').count() >= 5 {
        out.push(name.to_string());
    }
    out.extend(search.into_iter().filter(|n| n.len() <= MAX_NAME));
    if !out.iter().any(|n| n == name) {
        out.push(name.to_string());
    }
    // An ExternalName Service without ports answers every port of its name: `<host>:*`.
    let svc_suffix = format!(".svc.{cluster_domain}");
    let mut all = Vec::with_capacity(out.len() * 2);
    for n in out {
        let wild = n
            .rsplit_once(':')
            .filter(|(h, _)| {
                // Only `<svc>.<ns>.svc.<domain>` names a Service.
                h.strip_suffix(svc_suffix.as_str())
                    .is_some_and(|rest| rest.matches('.').count() == 1)
            })
            .map(|(h, _)| format!("{h}:*"));
        all.push(n);
        all.extend(wild);
    }
    all
}

fn endpoint(e: &EndpointSpec) -> Endpoint {
    Endpoint {
        addr: e.addr.to_string(),
        identity: e
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        weight: e.weight,
        opaque: e.opaque,
        zone: e.locality.zone.clone().unwrap_or_default(),
        for_zones: e.locality.for_zones.clone(),
        quic_port: e.quic.map_or(0, u32::from),
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn counts(routes: &[(String, u32)]) -> Vec<remora_api::RouteCount> {
    routes
        .iter()
        .map(|(prefix, n)| remora_api::RouteCount {
            path_prefix: prefix.clone(),
            count: *n,
        })
        .collect()
}

/// The policy as the API carries it; `None` for no policy.
fn policy(p: &Policy) -> Option<remora_api::Policy> {
    (!p.is_default()).then(|| remora_api::Policy {
        timeout_ms: p
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        retries: p.retries,
        failure_accrual: p.failure_accrual,
        split: p
            .split
            .iter()
            .map(|s| remora_api::Split {
                to: s.to.clone(),
                percent: s.percent,
            })
            .collect(),
        route_timeouts: p
            .route_timeouts
            .iter()
            .map(|(prefix, d)| remora_api::RouteTimeout {
                path_prefix: prefix.clone(),
                timeout_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            })
            .collect(),
        rate_limit: p.rate_limit.unwrap_or(0),
        rate_limit_per_client: p.rate_limit_per_client.unwrap_or(0),
        route_retries: counts(&p.route_retries),
        retry_on: (p.retry_on != remora_certs::RetryOn::default()).then(|| remora_api::RetryOn {
            statuses: p.retry_on.statuses.iter().map(|&c| u32::from(c)).collect(),
            any_5xx: p.retry_on.any_5xx,
            grpc_codes: (1..=16)
                .filter(|c| p.retry_on.grpc & (1 << c) != 0)
                .collect(),
            non_idempotent: p.retry_on.non_idempotent,
        }),
        retry_timeout_ms: p.retry_timeout.map(ms).unwrap_or(0),
        idle_timeout_ms: p.idle_timeout.map(ms).unwrap_or(0),
        route_idle_timeouts: p
            .route_idle_timeouts
            .iter()
            .map(|(prefix, d)| remora_api::RouteTimeout {
                path_prefix: prefix.clone(),
                timeout_ms: ms(*d),
            })
            .collect(),
        route_rate_limits: counts(&p.route_rate_limits),
        routes: p
            .routes
            .iter()
            .map(|r| {
                let (header, value, path_prefix) = match &r.when {
                    remora_certs::Match::Header { name, value } => {
                        (name.clone(), value.clone(), String::new())
                    }
                    remora_certs::Match::PathPrefix(p) => (String::new(), String::new(), p.clone()),
                };
                remora_api::Route {
                    header,
                    value,
                    path_prefix,
                    to: r.to.clone(),
                }
            })
            .collect(),
    })
}

/// The message that takes a subscriber from `sent` to `now`; `None` when nothing changed.
pub fn diff(sent: Option<&Option<Published>>, now: &Option<Published>) -> Option<Update> {
    let kind = match (sent, now) {
        (
            Some(Some(Published::Endpoints(old, old_policy))),
            Some(Published::Endpoints(new, new_policy)),
        ) => {
            let add: Vec<Endpoint> = new
                .values()
                .filter(|e| old.get(&e.addr) != Some(e))
                .map(endpoint)
                .collect();
            let remove: Vec<String> = old
                .keys()
                .filter(|a| !new.contains_key(a))
                .map(|a| a.to_string())
                .collect();
            // A changed policy travels whole; back to none is an empty message.
            let changed =
                (old_policy != new_policy).then(|| policy(new_policy).unwrap_or_default());
            if add.is_empty() && remove.is_empty() && changed.is_none() {
                return None;
            }
            update::Kind::Delta(Delta {
                add,
                remove,
                policy: changed,
            })
        }
        (Some(None), None) => return None,
        (Some(Some(Published::Alias(a))), Some(Published::Alias(b))) if a == b => return None,
        (_, Some(Published::Alias(name))) => update::Kind::Alias(Alias {
            name: name.to_string(),
        }),
        (_, Some(Published::Endpoints(new, p))) => update::Kind::Snapshot(Snapshot {
            endpoints: new.values().map(endpoint).collect(),
            policy: policy(p),
            caller_zone: String::new(),
        }),
        (_, None) => update::Kind::NoSuchService(NoSuchService {}),
    };
    Some(Update { kind: Some(kind) })
}

/// Owns a watch's registry subscriptions; when the watch ends, however it ends, it drops the
/// subscriptions *first*, then lets the registry forget unknown names nobody follows.
struct WatchGuard {
    rxs: Vec<tokio::sync::watch::Receiver<Option<Published>>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    names: Vec<String>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.rxs.clear();
        self.metrics.watches.dec();
        for name in &self.names {
            self.registry.release(name);
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

#[tonic::async_trait]
impl remora_api::discovery_server::Discovery for DiscoveryService {
    type WatchStream = WatchStream;
    type WatchAddrStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let zone = self.caller_zone(&request);
        let req = request.into_inner();
        let name = remora_certs::normalize_authority(&req.service)
            .filter(|n| n.len() <= MAX_NAME)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "service {:?} is not host:port",
                    req.service.chars().take(MAX_NAME).collect::<String>()
                ))
            })?;
        let ns = req.namespace.to_ascii_lowercase();
        // A namespace is one DNS label; anything else would expand into names nobody wrote.
        let ns = (!ns.is_empty()
            && ns.len() <= 63
            && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then_some(ns);
        let names = candidates(&name, ns.as_deref(), &self.cluster_domain);
        tracing::debug!(service = %name, client = %req.client, ?names, "watch");
        Ok(Response::new(self.stream(&self.registry, names, zone)?))
    }

    async fn watch_addr(
        &self,
        request: Request<WatchAddrRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let zone = self.caller_zone(&request);
        let req = request.into_inner();
        let addr: std::net::SocketAddr = req.addr.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "address {:?} is not ip:port",
                req.addr.chars().take(MAX_NAME).collect::<String>()
            ))
        })?;
        tracing::debug!(%addr, client = %req.client, "watch by address");
        Ok(Response::new(self.stream(
            &self.by_addr,
            vec![addr.to_string()],
            zone,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn set(addrs: &[(&str, u32)]) -> Option<Published> {
        Some(Published::Endpoints(
            Arc::new(
                addrs
                    .iter()
                    .map(|(a, w)| {
                        let addr = a.parse().unwrap();
                        (
                            addr,
                            EndpointSpec {
                                addr,
                                weight: *w,
                                identity: None,
                                opaque: false,
                                quic: None,
                                locality: Default::default(),
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            ),
            Arc::default(),
        ))
    }

    fn kind(u: Option<Update>) -> Option<update::Kind> {
        u.and_then(|u| u.kind)
    }

    #[tokio::test]
    async fn nothing_is_said_before_the_source_has_synced() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let svc = DiscoveryService::new(registry.clone(), Arc::new(Metrics::new()), synced, 100);
        let req = Request::new(WatchRequest {
            service: "web.shop.svc.cluster.local:8080".into(),
            client: String::new(),
            namespace: String::new(),
        });
        let mut stream = svc.watch(req).await.unwrap().into_inner();
        // Still listing: a "no such service" now would make proxies drop good endpoints.
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio_stream::StreamExt::next(&mut stream),
        )
        .await;
        assert!(early.is_err(), "sent {early:?} before the first sync");
        registry.set(
            "web.shop.svc.cluster.local:8080",
            Some(vec![EndpointSpec {
                addr: "10.0.0.1:8080".parse().unwrap(),
                weight: 1,
                identity: None,
                opaque: false,
                quic: None,
                locality: Default::default(),
            }]),
        );
        synced_tx.send(true).unwrap();
        let first = tokio_stream::StreamExt::next(&mut stream).await;
        assert!(matches!(
            first.and_then(|r| r.ok()).and_then(|u| u.kind),
            Some(update::Kind::Snapshot(s)) if s.endpoints.len() == 1
        ));
    }

    #[tokio::test]
    async fn watches_of_unknown_names_leave_nothing_behind() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let (_synced_tx, synced) = tokio::sync::watch::channel(true);
        let svc = DiscoveryService::new(registry.clone(), Arc::new(Metrics::new()), synced, 100);
        for i in 0..50 {
            let req = Request::new(WatchRequest {
                service: format!("junk-{i}.example:80"),
                client: String::new(),
                namespace: String::new(),
            });
            let mut stream = svc.watch(req).await.unwrap().into_inner();
            let first = tokio_stream::StreamExt::next(&mut stream).await;
            assert!(matches!(
                first.and_then(|r| r.ok()).and_then(|u| u.kind),
                Some(update::Kind::NoSuchService(_))
            ));
        }
        // The streams are dropped; each watch task notices and releases its name.
        for _ in 0..200 {
            if registry.names() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(registry.names(), 0);
        let long = Request::new(WatchRequest {
            service: format!("{}:80", "a".repeat(300)),
            client: String::new(),
            namespace: String::new(),
        });
        assert_eq!(
            svc.watch(long).await.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn watches_beyond_the_process_limit_are_refused_until_one_ends() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let metrics = Arc::new(Metrics::new());
        let (_synced_tx, synced) = tokio::sync::watch::channel(true);
        let svc = DiscoveryService::new(registry.clone(), metrics.clone(), synced, 3);
        let watch = |i: usize| {
            Request::new(WatchRequest {
                service: format!("web-{i}.shop:80"),
                client: String::new(),
                namespace: String::new(),
            })
        };
        let mut open = Vec::new();
        for i in 0..3 {
            open.push(svc.watch(watch(i)).await.unwrap().into_inner());
        }
        let refused = svc.watch(watch(3)).await.err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted),
            "{refused:?}"
        );
        assert!(
            refused.is_some_and(|s| s.message().contains("3 discovery watches")),
            "the refusal names the limit"
        );
        assert_eq!(metrics.watches_refused.get(), 1);
        // Ending one watch (the proxy's stream goes away) frees its permit.
        drop(open.pop());
        let mut again = None;
        for _ in 0..200 {
            match svc.watch(watch(4)).await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert!(again.is_some(), "a watch slot was not freed");
    }

    #[test]
    fn first_message_is_a_snapshot_or_no_such_service() {
        assert!(matches!(
            kind(diff(None, &None)),
            Some(update::Kind::NoSuchService(_))
        ));
        assert!(matches!(
            kind(diff(None, &set(&[]))),
            Some(update::Kind::Snapshot(s)) if s.endpoints.is_empty()
        ));
    }

    #[test]
    fn policies_ride_the_snapshot_and_changes_come_as_deltas() {
        let eps = || {
            set(&[("10.0.0.1:80", 1)])
                .and_then(|p| p.set().cloned())
                .unwrap()
        };
        let with = |p: Policy| Some(Published::Endpoints(eps(), Arc::new(p)));
        let p = Policy::new(Some(std::time::Duration::from_millis(250)), 2).unwrap();
        let Some(update::Kind::Snapshot(s)) = kind(diff(None, &with(p.clone()))) else {
            panic!("a snapshot first");
        };
        let sent = s.policy.expect("the policy");
        assert_eq!(
            (sent.timeout_ms, sent.retries, sent.failure_accrual),
            (250, 2, None)
        );
        // No policy: none on the wire.
        let Some(update::Kind::Snapshot(s)) = kind(diff(None, &with(Policy::default()))) else {
            panic!("a snapshot");
        };
        assert!(s.policy.is_none());
        // Same endpoints, same policy: nothing to say; a new policy alone is a delta.
        assert!(diff(Some(&with(p.clone())), &with(p.clone())).is_none());
        let Some(update::Kind::Delta(d)) = kind(diff(Some(&with(p)), &with(Policy::default())))
        else {
            panic!("a delta");
        };
        assert!(d.add.is_empty() && d.remove.is_empty());
        assert_eq!(
            d.policy,
            Some(remora_api::Policy::default()),
            "back to none"
        );
    }

    #[test]
    fn later_changes_are_deltas() {
        let a = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let b = set(&[("10.0.0.2:80", 3), ("10.0.0.3:80", 1)]);
        let Some(update::Kind::Delta(d)) = kind(diff(Some(&a), &b)) else {
            panic!("expected a delta")
        };
        let added: Vec<_> = d.add.iter().map(|e| (e.addr.as_str(), e.weight)).collect();
        assert_eq!(added, [("10.0.0.2:80", 3), ("10.0.0.3:80", 1)]);
        assert_eq!(d.remove, ["10.0.0.1:80"]);
        assert!(diff(Some(&b), &b).is_none());
        assert!(matches!(
            kind(diff(Some(&b), &None)),
            Some(update::Kind::NoSuchService(_))
        ));
        assert!(matches!(
            kind(diff(Some(&None), &b)),
            Some(update::Kind::Snapshot(_))
        ));
    }

    /// The QUIC port rides the endpoint (0: none), and a change of it alone is re-sent.
    #[test]
    fn quic_ports_go_out_and_their_changes_are_deltas() {
        let with_quic = |q: Option<u16>| {
            let mut e = EndpointSpec::new("10.0.0.1:4143".parse().unwrap());
            e.quic = q;
            Some(Published::endpoints(vec![e]))
        };
        let Some(update::Kind::Snapshot(s)) = kind(diff(None, &with_quic(None))) else {
            panic!("a snapshot first");
        };
        assert_eq!(s.endpoints[0].quic_port, 0);
        let Some(update::Kind::Delta(d)) =
            kind(diff(Some(&with_quic(None)), &with_quic(Some(4143))))
        else {
            panic!("a delta");
        };
        let added: Vec<_> = d
            .add
            .iter()
            .map(|e| (e.addr.as_str(), e.quic_port))
            .collect();
        assert_eq!(added, [("10.0.0.1:4143", 4143)]);
        assert!(d.remove.is_empty());
    }

    #[test]
    fn names_expand_as_a_pods_search_path_would() {
        let cd = "cluster.local";
        let table: &[(&str, Option<&str>, &[&str])] = &[
            // Short name from a pod in `shop`.
            (
                "web:80",
                Some("shop"),
                &[
                    "web.shop.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:*",
                    "web.svc.cluster.local:80",
                    "web.cluster.local:80",
                    "web:80",
                ],
            ),
            // `<svc>.<ns>` from anywhere.
            (
                "web.shop:80",
                Some("other"),
                &[
                    "web.shop.other.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:*",
                    "web.shop.cluster.local:80",
                    "web.shop:80",
                ],
            ),
            (
                "web.shop.svc:80",
                None,
                &[
                    "web.shop.svc.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:*",
                    "web.shop.svc:80",
                ],
            ),
            // A full name is also tried first with the suffixes (4 dots < ndots 5), then as is.
            (
                "web.shop.svc.cluster.local:80",
                None,
                &[
                    "web.shop.svc.cluster.local.svc.cluster.local:80",
                    "web.shop.svc.cluster.local.cluster.local:80",
                    "web.shop.svc.cluster.local:80",
                    "web.shop.svc.cluster.local:*",
                ],
            ),
            // Absolute and IP names are taken as written.
            (
                "web.shop.svc.cluster.local.:80",
                Some("shop"),
                &["web.shop.svc.cluster.local:80"],
            ),
            ("10.0.0.1:80", Some("shop"), &["10.0.0.1:80"]),
            ("[fd00::1]:80", Some("shop"), &["[fd00::1]:80"]),
            // Five dots or more: as written first.
            (
                "a.b.c.d.e.f:80",
                None,
                &[
                    "a.b.c.d.e.f:80",
                    "a.b.c.d.e.f.svc.cluster.local:80",
                    "a.b.c.d.e.f.cluster.local:80",
                ],
            ),
        ];
        for (name, ns, want) in table {
            assert_eq!(candidates(name, *ns, cd), *want, "{name} from {ns:?}");
        }
    }

    async fn first(svc: &DiscoveryService, service: &str, namespace: &str) -> Option<update::Kind> {
        use remora_api::discovery_server::Discovery;
        let req = Request::new(WatchRequest {
            service: service.into(),
            client: String::new(),
            namespace: namespace.into(),
        });
        let mut s = svc.watch(req).await.unwrap().into_inner();
        tokio_stream::StreamExt::next(&mut s)
            .await
            .and_then(|r| r.ok())
            .and_then(|u| u.kind)
    }

    #[tokio::test]
    async fn short_names_find_services_in_the_callers_namespace_and_addresses_apart() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let by_addr = Registry::new();
        let (_synced_tx, synced) = tokio::sync::watch::channel(true);
        let svc = DiscoveryService::new(registry.clone(), Arc::new(Metrics::new()), synced, 100)
            .with_addresses(by_addr.clone());
        registry.publish(
            "web.shop.svc.cluster.local:80",
            set(&[("10.0.0.1:8080", 1)]),
        );
        registry.publish(
            "ext.shop.svc.cluster.local:*",
            Some(Published::Alias("db.example.org".into())),
        );
        by_addr.publish("198.18.0.10:80", set(&[("10.0.0.1:8080", 1)]));
        let snap = |k: Option<update::Kind>| match k {
            Some(update::Kind::Snapshot(s)) => s
                .endpoints
                .iter()
                .map(|e| e.addr.clone())
                .collect::<Vec<_>>(),
            other => panic!("expected a snapshot, got {other:?}"),
        };
        assert_eq!(snap(first(&svc, "web:80", "shop").await), ["10.0.0.1:8080"]);
        assert_eq!(
            snap(first(&svc, "web.shop:80", "other").await),
            ["10.0.0.1:8080"]
        );
        assert_eq!(
            snap(first(&svc, "Web.Shop.svc.cluster.local:80", "").await),
            ["10.0.0.1:8080"]
        );
        // From another namespace the short name is not this Service.
        assert!(matches!(
            first(&svc, "web:80", "other").await,
            Some(update::Kind::NoSuchService(_))
        ));
        // A bad namespace is ignored, never expanded.
        assert!(matches!(
            first(&svc, "web:80", "shop.svc.cluster.local#").await,
            Some(update::Kind::NoSuchService(_))
        ));
        assert!(matches!(first(&svc, "ext:5432", "shop").await,
            Some(update::Kind::Alias(a)) if a.name == "db.example.org"));
        // Addresses are looked up apart from names: the ClusterIP is not a name, nor the reverse.
        assert!(matches!(
            first(&svc, "198.18.0.10:80", "shop").await,
            Some(update::Kind::NoSuchService(_))
        ));
        let by = |addr: &str| {
            svc.watch_addr(Request::new(WatchAddrRequest {
                addr: addr.into(),
                client: String::new(),
            }))
        };
        let mut s = by("198.18.0.10:80").await.unwrap().into_inner();
        let k = tokio_stream::StreamExt::next(&mut s)
            .await
            .and_then(|r| r.ok())
            .and_then(|u| u.kind);
        assert_eq!(snap(k), ["10.0.0.1:8080"]);
        let mut s = by("198.18.0.99:80").await.unwrap().into_inner();
        let k = tokio_stream::StreamExt::next(&mut s)
            .await
            .and_then(|r| r.ok())
            .and_then(|u| u.kind);
        assert!(
            matches!(k, Some(update::Kind::NoSuchService(_))),
            "not a service: {k:?}"
        );
        assert_eq!(
            by("web:80").await.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );

        // A Service created later in the caller's namespace takes over the short name.
        let mut s = svc
            .watch(Request::new(WatchRequest {
                service: "api:80".into(),
                client: String::new(),
                namespace: "shop".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        async fn next(s: &mut WatchStream) -> Option<update::Kind> {
            tokio_stream::StreamExt::next(s)
                .await
                .and_then(|r| r.ok())
                .and_then(|u| u.kind)
        }
        assert!(matches!(
            next(&mut s).await,
            Some(update::Kind::NoSuchService(_))
        ));
        registry.publish("api.cluster.local:80", set(&[("10.0.9.9:80", 1)]));
        let k = next(&mut s).await;
        assert_eq!(snap(k), ["10.0.9.9:80"]);
        registry.publish("api.shop.svc.cluster.local:80", set(&[("10.0.0.5:80", 1)]));
        let Some(update::Kind::Delta(d)) = next(&mut s).await else {
            panic!("expected a delta")
        };
        assert_eq!(
            d.add.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>(),
            ["10.0.0.5:80"]
        );
        assert_eq!(d.remove, ["10.0.9.9:80"]);
    }
}

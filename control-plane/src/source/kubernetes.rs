//! Kubernetes as a source: `core/v1` Services joined with the `discovery.k8s.io/v1`
//! EndpointSlices that carry their `kubernetes.io/service-name` label, in all namespaces, and
//! Pods for identities. What it publishes is what an app in a pod can reach by name:
//!
//! - **Names.** Each TCP port of a Service publishes `<svc>.<ns>.svc.<cluster-domain>:<port>`
//!   under the *Service* port number. Its endpoints are the slice endpoints of the slice port
//!   with the same name (as the endpointslice controller writes them; the unnamed port is
//!   `""`), each at `ip:<that slice's port number>` — a named `targetPort` can be 8080 on some
//!   pods and 8081 on others, and the caller never needs to know. The shorter names a pod's
//!   resolv.conf search path expands (`web:80` from the same namespace, `web.shop:80`,
//!   `web.shop.svc:80`) are expanded by the Discovery service, so only full names are stored.
//! - **ClusterIP:port** of a Service with a cluster IP publishes the same set in a second table
//!   ([`Registry`] `by_addr`), for callers that only know the address they connected to.
//! - **Headless Services** (`clusterIP: None`) publish the service name like any other (per
//!   request balancing over all ready endpoints), and each endpoint that has a `hostname` (a
//!   StatefulSet pod) also under `<hostname>.<svc>.<ns>.svc.<domain>:<port>`: that pod only.
//! - **ExternalName Services** publish an alias to their external name (resolved by the caller
//!   through DNS), under each declared port, or `<name>:*` when none is declared.
//! - **Opaque ports.** A Service port whose `appProtocol` names a non-HTTP or
//!   server-speaks-first protocol ([`opaque_protocol`]) publishes its endpoints as opaque.
//! - **No Service, no name.** Slices without a Service are not published (kube-proxy ignores
//!   them too); a Service without slices publishes empty sets ("no endpoints", not "no such
//!   service"), so callers can tell an outage from a typo. Deleting the Service deletes its
//!   names, and callers go back to DNS.
//! - **Which endpoints.** Only `ready` ones (a missing condition means ready, as the API says);
//!   `terminating` ones are left out even if still `serving`, so they get no new requests. Only
//!   IPv4/IPv6 slices (FQDN slices have no defined semantics); every address of an endpoint.
//! - **Re-lists.** Each watcher (with backoff, so it reconnects) starts over with `Init` after a
//!   `410 Gone` or on start; those events are buffered and swapped in whole at `InitDone`
//!   (`Registry::replace_all`), so a re-list never shows a half-listed table. `Apply`/`Delete`
//!   recompute only the services they touch (`Registry::publish`). `synced` turns true after the
//!   first table is published, which waits for Services, slices and (when followed) Pods.
//! - **Identity.** When Pods can be read, an endpoint whose `targetRef` is a Pod is expected to
//!   present `spiffe://<trust-domain>/ns/<ns>/sa/<pod's service account>`; proxies then reach it
//!   with mTLS and refuse any other identity. Pods are followed with a reflector store (stripped
//!   to their service account, to keep memory small). A Pod endpoint whose Pod is not (yet)
//!   known, or is in another namespace, is withheld rather than published without an identity
//!   (that would be a silent downgrade to plaintext); the services referring to a Pod are
//!   recomputed when it appears. Endpoints without a Pod `targetRef` (external addresses) have
//!   no identity. When Pods cannot be read (RBAC), one warning says so and endpoints get no
//!   identity. A watch refused with 403 logs the RBAC rule to add ([`super::permission`]).
//! - **QUIC.** An endpoint with an identity (a meshed Pod) also advertises the UDP port where
//!   its proxy serves HTTP/3: its inbound port, read from the Pod's `remora-proxy` container
//!   ([`proxy_inbound_port`]: `--inbound-addr`, `REMORA_INBOUND_ADDR`, the `remora-inbound`
//!   container port), else the proxy's default 4143, which `remora inject` keeps. Endpoints
//!   without an identity advertise none.
//! - **Policy.** A Service's annotations (`remora.io/*`) and, where the cluster has the Gateway
//!   API CRDs, the `HTTPRoute`s / `GRPCRoute`s attached to it ([`super::gateway`]) give the
//!   policy published with its names. A route kind the API server does not serve (404: no CRD)
//!   is logged once at info and looked for again every [`ROUTES_RECHECK`]; publishing waits
//!   for the first list of each route watch, so a Service's first policy already has its
//!   routes. It stops waiting when the watch is refused (403: the RBAC hint is logged) or has
//!   failed for [`gateway::PATIENCE`] (logged once), and the routes apply when a list succeeds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use remora_certs::{EndpointSpec, Locality, Policy, SpiffeId};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};

use super::gateway::{self, Routes, RoutesChanged};
use crate::registry::{Published, Registry, Table};

/// The label the EndpointSlice controller puts on every slice it manages.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The cluster DNS domain when none is configured.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Watches Services, EndpointSlices (and, when allowed, Pods) and keeps the registries in step.
pub struct KubeSource {
    pub client: kube::Client,
    /// The cluster's DNS domain, usually `cluster.local`.
    pub cluster_domain: String,
    /// The SPIFFE trust domain of the mesh's identities.
    pub trust_domain: String,
}

/// `(namespace, service name)`.
pub type ServiceKey = (String, String);
/// `(namespace, object name)`; ordered so that one namespace's objects are a contiguous range.
type ObjectKey = (String, String);

type EventStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// What an endpoint is expected to present, as far as the source can tell.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// No identity to check (not a Pod, or Pods cannot be read): plaintext.
    Plain,
    /// mTLS, and the peer must present exactly this identity: a meshed Pod, whose proxy also
    /// serves HTTP/3 over QUIC on UDP port `quic` (its inbound port, [`proxy_inbound_port`]).
    Identity { id: SpiffeId, quic: u16 },
    /// A Pod whose service account is not known yet: not published until it is.
    Withhold,
}

/// Where one source writes: names, and ClusterIP:port addresses.
pub struct Sink<'a> {
    pub names: &'a Registry,
    pub addrs: &'a Registry,
    pub synced: &'a watch::Sender<bool>,
}

impl KubeSource {
    /// Runs until the task is dropped; watch errors are logged and retried with backoff.
    pub async fn run(
        self,
        registry: Arc<Registry>,
        by_addr: Arc<Registry>,
        synced: watch::Sender<bool>,
    ) {
        let identities = self.identities().await;
        let mut state = State::new(
            self.cluster_domain
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            identities.map(|(store, writer, trust_domain)| Identities {
                store,
                writer,
                trust_domain,
                listed: false,
            }),
        );
        let sink = Sink {
            names: &registry,
            addrs: &by_addr,
            synced: &synced,
        };
        let mut pods = state.identities.is_some().then(|| pod_events(&self.client));
        // Node zones only matter with the Pod placements above.
        let mut nodes = pods
            .is_some()
            .then(|| super::zones::node_events(&self.client));
        state.zones = super::zones::Zones::new(nodes.is_some());
        let mut slices = slice_events(&self.client);
        let mut services = service_events(&self.client);
        state.routes.follow();
        let mut http_routes = RouteWatch::new(&self.client, gateway::Kind::Http);
        let mut grpc_routes = RouteWatch::new(&self.client, gateway::Kind::Grpc);
        // Resources whose missing permission was logged; logged again only after it worked.
        let mut hinted = Hinted::default();
        loop {
            tokio::select! {
                ev = slices.next() => match ev {
                    Some(Ok(ev)) => {
                        hinted.ok("endpointslices");
                        state.on_slice(ev, &sink);
                    }
                    Some(Err(e)) => hinted.warn("EndpointSlice", "endpointslices", "discovery.k8s.io", &e),
                    None => {
                        // The watcher retries forever, so this is not expected; start over.
                        tracing::warn!("EndpointSlice watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        slices = slice_events(&self.client);
                    }
                },
                ev = services.next() => match ev {
                    Some(Ok(ev)) => {
                        hinted.ok("services");
                        state.on_service(ev, &sink);
                    }
                    Some(Err(e)) => hinted.warn("Service", "services", "", &e),
                    None => {
                        tracing::warn!("Service watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        services = service_events(&self.client);
                    }
                },
                ev = next_or_pending(&mut nodes) => match ev {
                    Some(Ok(ev)) => {
                        hinted.ok("nodes");
                        let was = state.zones.nodes_settled();
                        state.zones.on_node(ev, sink.addrs);
                        if !was && state.zones.nodes_settled() {
                            state.go_live(&sink);
                        }
                    }
                    // Without Nodes, proxies learn their zone from their EndpointSlice entry.
                    Some(Err(e)) => {
                        hinted.warn("Node", "nodes", "", &e);
                        if state.zones.settle_nodes() {
                            state.go_live(&sink);
                        }
                    }
                    None => {
                        tracing::warn!("Node watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        nodes = Some(super::zones::node_events(&self.client));
                    }
                },
                ev = next_or_pending(&mut pods) => match ev {
                    Some(Ok(ev)) => {
                        hinted.ok("pods");
                        state.on_pod(ev, &sink);
                    }
                    Some(Err(e)) => hinted.warn("Pod", "pods", "", &e),
                    None => {
                        tracing::warn!("Pod watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        pods = Some(pod_events(&self.client));
                    }
                },
                ev = http_routes.next() => state.on_route_watch(&mut http_routes, ev, &mut hinted, &sink),
                ev = grpc_routes.next() => state.on_route_watch(&mut grpc_routes, ev, &mut hinted, &sink),
                // A route watch failing before its first list holds publishing back only so long.
                () = sleep_until_some(state.routes.deadline()) => {
                    let changed = state.routes.overdue(tokio::time::Instant::now());
                    state.routes_changed(changed, &sink);
                }
            }
        }
    }

    /// A Pod store when Pods can be read. API errors (403, 404, …) mean they cannot, for the
    /// life of the process; transport errors are retried, because a blip at start must not turn
    /// mTLS off for good.
    async fn identities(&self) -> Option<(Store<Pod>, reflector::store::Writer<Pod>, String)> {
        let trust_domain = self.trust_domain.trim_end_matches('.').to_ascii_lowercase();
        if let Err(e) = SpiffeId::workload(&trust_domain, "ns", "sa") {
            tracing::error!(error = %e, "the trust domain is not valid: endpoints get no expected identity, so proxies reach them without mTLS");
            return None;
        }
        let api = Api::<Pod>::all(self.client.clone());
        let mut delay = Duration::from_millis(500);
        loop {
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => {
                    let (store, writer) = reflector::store();
                    return Some((store, writer, trust_domain));
                }
                Err(e @ kube::Error::Api(_)) => {
                    tracing::warn!(
                        "Pods cannot be read ({}): endpoints get no expected identity, so proxies reach them without mTLS; grant `list`/`watch` on pods to enable it",
                        describe(&e)
                    );
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %describe(&e), retry_in = ?delay,
                        "cannot reach the API server to check whether Pods can be read");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

fn slice_events(client: &kube::Client) -> EventStream<EndpointSlice> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    }
    .labels(SERVICE_NAME_LABEL);
    Box::pin(
        watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config)
            // Cached for as long as the slice exists; managed fields are often its bulk.
            .modify(|s| s.metadata.managed_fields = None)
            .default_backoff(),
    )
}

fn service_events(client: &kube::Client) -> EventStream<Service> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    Box::pin(
        watcher::watcher(Api::<Service>::all(client.clone()), config)
            // Only the spec is read; kubectl's last-applied copy doubles an object's size.
            .modify(|s| {
                s.metadata.managed_fields = None;
                // Only remora's own policy annotations are read (a bounded set of keys).
                if let Some(a) = s.metadata.annotations.as_mut() {
                    a.retain(|k, _| remora_certs::policy::ANNOTATIONS.contains(&k.as_str()));
                }
                s.metadata.labels = None;
                s.status = None;
            })
            .default_backoff(),
    )
}

/// How long after the API server answered 404 for a route kind (the Gateway API CRDs are not
/// installed) the control plane looks for it again: routes then apply without a restart, and
/// a cluster without the CRDs costs one list request a minute per kind, and no log line.
pub const ROUTES_RECHECK: Duration = Duration::from_secs(60);

/// The watch of one Gateway API route kind, stopped while the API server does not serve it.
struct RouteWatch {
    kind: gateway::Kind,
    client: kube::Client,
    events: Option<EventStream<DynamicObject>>,
    /// While stopped: when to look again.
    recheck: tokio::time::Instant,
}

impl RouteWatch {
    fn new(client: &kube::Client, kind: gateway::Kind) -> Self {
        RouteWatch {
            kind,
            client: client.clone(),
            events: Some(route_events(client, kind)),
            recheck: tokio::time::Instant::now(),
        }
    }

    /// The next event; while stopped, waits for the recheck first. Cancel-safe: the recheck is
    /// a deadline, not a fresh sleep each time another branch of the loop wins.
    async fn next(&mut self) -> Option<Result<Event<DynamicObject>, watcher::Error>> {
        if self.events.is_none() {
            tokio::time::sleep_until(self.recheck).await;
            self.events = Some(route_events(&self.client, self.kind));
        }
        match &mut self.events {
            Some(events) => events.next().await,
            None => std::future::pending().await,
        }
    }

    fn stop(&mut self) {
        self.events = None;
        self.recheck = tokio::time::Instant::now() + ROUTES_RECHECK;
    }
}

fn route_events(client: &kube::Client, kind: gateway::Kind) -> EventStream<DynamicObject> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource());
    Box::pin(
        watcher::watcher(api, config)
            // Only the spec is read; the status lists conditions for every parent.
            .modify(|r| {
                r.metadata.managed_fields = None;
                r.metadata.annotations = None;
                r.metadata.labels = None;
                if let Some(o) = r.data.as_object_mut() {
                    o.retain(|k, _| k == "spec");
                }
            })
            .default_backoff(),
    )
}

/// The slices of every service, by service.
fn slices_by_service(slices: &Cache<EndpointSlice>) -> BTreeMap<ServiceKey, Vec<&EndpointSlice>> {
    let mut by: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices.items.values() {
        if let Some(k) = service_of(s) {
            by.entry(k).or_default().push(s);
        }
    }
    by
}

/// Whether the API server answered 404 for the resource itself: it does not serve it (a CRD
/// that is not installed).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Whether the API server refused the route watch (403): that lasts until the RBAC is fixed.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

/// The TCP port numbers of a Service.
fn tcp_ports(svc: &Service) -> Vec<u16> {
    let ports: BTreeSet<u16> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| u16::try_from(p.port).ok().filter(|&n| n != 0))
        .collect();
    ports.into_iter().collect()
}

/// Watch failures, logged with the permission to add when the API server said 403: that hint
/// once per resource until the watch works again (the watcher retries with backoff, so a fixed
/// RBAC rule is picked up without a restart); other failures at every attempt.
#[derive(Default)]
struct Hinted(BTreeSet<&'static str>);

impl Hinted {
    fn ok(&mut self, resource: &'static str) {
        self.0.remove(resource);
    }

    fn warn(&mut self, kind: &str, resource: &'static str, group: &str, e: &watcher::Error) {
        match super::permission::hint_for_watch(e, group, resource) {
            Some(hint) if self.0.insert(resource) => tracing::warn!("{hint}"),
            Some(hint) => tracing::debug!("{hint}"),
            None => {
                tracing::warn!(error = %describe_watch(e), "{kind} watch failed; retrying with backoff")
            }
        }
    }
}

fn pod_events(client: &kube::Client) -> EventStream<Pod> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    Box::pin(
        watcher::watcher(Api::<Pod>::all(client.clone()), config)
            // Only the service account, the proxy's inbound port and the placement (node, IPs:
            // `zones`) are read; a whole Pod is kilobytes, times every Pod.
            .modify(|p| {
                let spec = p.spec.take().unwrap_or_default();
                p.spec = Some(strip_pod_spec(spec));
                super::zones::trim_pod_status(p);
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
                p.metadata.labels = None;
                p.metadata.owner_references = None;
            })
            .default_backoff(),
    )
}

/// The injected proxy's container, as `remora inject` and the webhook name it (a native
/// sidecar in `initContainers`, or with `--classic` the first of `containers`).
const PROXY_CONTAINER: &str = "remora-proxy";
/// Its inbound port's name in the container's `ports`, as `remora inject` writes it.
const INBOUND_PORT_NAME: &str = "remora-inbound";
/// The proxy's knob for its inbound listener.
const INBOUND_ADDR_ENV: &str = "REMORA_INBOUND_ADDR";
/// The proxy's inbound port when nothing in the Pod says otherwise: `REMORA_INBOUND_ADDR`'s
/// default (`0.0.0.0:4143`), which `remora inject` leaves as it is.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;

/// What the source keeps of a Pod's spec: the service account, the placement, and of the
/// proxy's container only what [`proxy_inbound_port`] reads.
fn strip_pod_spec(spec: PodSpec) -> PodSpec {
    let proxy = |cs: Vec<Container>| -> Vec<Container> {
        cs.into_iter()
            .filter(|c| c.name == PROXY_CONTAINER)
            .take(1)
            .map(|c| Container {
                env: c.env.map(|env| {
                    env.into_iter()
                        .filter(|e| e.name == INBOUND_ADDR_ENV)
                        .map(|e| k8s_openapi::api::core::v1::EnvVar {
                            value_from: None,
                            ..e
                        })
                        .collect()
                }),
                args: c.args.map(|a| inbound_addr_args(&a)),
                command: c.command.map(|a| inbound_addr_args(&a)),
                ports: c.ports.map(|ports| {
                    ports
                        .into_iter()
                        .filter(|p| p.name.as_deref() == Some(INBOUND_PORT_NAME))
                        .collect()
                }),
                ..Container {
                    name: c.name,
                    ..Container::default()
                }
            })
            .collect()
    };
    PodSpec {
        service_account_name: spec.service_account_name,
        node_name: spec.node_name,
        host_network: spec.host_network,
        init_containers: spec.init_containers.map(proxy),
        containers: proxy(spec.containers),
        ..PodSpec::default()
    }
}

/// The `--inbound-addr ADDR` / `--inbound-addr=ADDR` arguments of a command line, alone.
fn inbound_addr_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--inbound-addr" {
            out.push(a.clone());
            out.extend(it.next().cloned());
        } else if a.starts_with("--inbound-addr=") {
            out.push(a.clone());
        }
    }
    out
}

/// The inbound port of a meshed Pod's proxy, where it also serves HTTP/3 over UDP: from its
/// `remora-proxy` container, the last `--inbound-addr` argument, else a literal
/// `REMORA_INBOUND_ADDR`, else the container port named `remora-inbound`; when none says
/// (no such container, a value from a ConfigMap), [`DEFAULT_INBOUND_PORT`], the proxy's
/// default and what `remora inject` runs it with.
pub fn proxy_inbound_port(spec: &PodSpec) -> u16 {
    let port_of = |addr: &str| {
        addr.trim()
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.port())
            .filter(|&p| p != 0)
    };
    let Some(c) = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == PROXY_CONTAINER)
    else {
        return DEFAULT_INBOUND_PORT;
    };
    let arg = || {
        let args: Vec<&String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .collect();
        let mut found = None;
        for (i, a) in args.iter().enumerate() {
            if *a == "--inbound-addr" {
                found = args.get(i + 1).map(|v| v.as_str());
            } else if let Some(v) = a.strip_prefix("--inbound-addr=") {
                found = Some(v);
            }
        }
        found.and_then(port_of)
    };
    let env = || {
        c.env
            .iter()
            .flatten()
            .rfind(|e| e.name == INBOUND_ADDR_ENV)
            .and_then(|e| e.value.as_deref())
            .and_then(port_of)
    };
    let named = || {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(INBOUND_PORT_NAME))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|&p| p != 0)
    };
    arg()
        .or_else(env)
        .or_else(named)
        .unwrap_or(DEFAULT_INBOUND_PORT)
}

/// Sleeps until `deadline`; without one, forever.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next_or_pending<S: Stream + Unpin>(s: &mut Option<S>) -> Option<S::Item> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// A short description of a client error: an API error's code and message (a 404 from a path
/// the server does not serve carries its whole index as the message), or the error itself.
pub(crate) fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let mut msg = s.message.lines().next().unwrap_or("").trim().to_string();
            if msg.len() > 200 {
                let mut cut = 200;
                while !msg.is_char_boundary(cut) {
                    cut -= 1;
                }
                msg.truncate(cut);
                msg.push('…');
            }
            match (s.reason.is_empty(), msg.is_empty()) {
                (false, false) => format!("HTTP {} {}: {msg}", s.code, s.reason),
                (false, true) => format!("HTTP {} {}", s.code, s.reason),
                (true, _) => format!("HTTP {}: {msg}", s.code),
            }
        }
        e => e.to_string(),
    }
}

fn describe_watch(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) => format!("list failed: {}", describe(e)),
        watcher::Error::WatchStartFailed(e) => format!("watch failed to start: {}", describe(e)),
        watcher::Error::WatchFailed(e) => format!("watch stream failed: {}", describe(e)),
        watcher::Error::WatchError(s) => {
            format!(
                "the API server ended the watch: HTTP {} {}: {}",
                s.code, s.reason, s.message
            )
        }
        e @ watcher::Error::NoResourceVersion => e.to_string(),
    }
}

/// The Pod store, when Pods can be read.
struct Identities {
    store: Store<Pod>,
    writer: reflector::store::Writer<Pod>,
    trust_domain: String,
    /// The first Pod list is in.
    listed: bool,
}

impl Identities {
    fn expect(&self, slice_ns: &str, ep: &Endpoint) -> Expect {
        let Some(target) = &ep.target_ref else {
            return Expect::Plain;
        };
        if target.kind.as_deref() != Some("Pod") {
            return Expect::Plain;
        }
        // A slice names Pods of its own namespace; one pointing elsewhere must not borrow another
        // namespace's identity for an address its author controls.
        let ns = slice_ns;
        let (Some(name), true) = (
            &target.name,
            target.namespace.as_deref().is_none_or(|n| n == ns),
        ) else {
            return Expect::Withhold;
        };
        let Some(pod) = self.store.get(&ObjectRef::new(name).within(ns)) else {
            return Expect::Withhold;
        };
        // Admission sets `default` when a Pod names none; an empty name means the same.
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        match SpiffeId::workload(&self.trust_domain, ns, sa) {
            Ok(id) => Expect::Identity {
                id,
                quic: pod
                    .spec
                    .as_ref()
                    .map_or(DEFAULT_INBOUND_PORT, proxy_inbound_port),
            },
            Err(e) => {
                tracing::debug!(error = %e, pod = name, ns, "no identity for this Pod's service account");
                Expect::Withhold
            }
        }
    }
}

/// Objects of one kind as last seen, with a re-list buffered until it is complete.
struct Cache<T> {
    items: BTreeMap<ObjectKey, T>,
    /// A re-list in progress (`Init` … `InitDone`).
    relist: Option<BTreeMap<ObjectKey, T>>,
    listed: bool,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache {
            items: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }
}

/// What an event changed.
enum Changed {
    Nothing,
    /// A list completed: everything may have changed.
    All,
    /// These services (before and after the event) need recomputing.
    Services(Vec<ServiceKey>),
}

impl<T> Cache<T> {
    /// Applies one watcher event; `owner` names the service an object belongs to (`None`:
    /// not ours, not kept).
    fn apply(
        &mut self,
        ev: Event<T>,
        key: impl Fn(&T) -> Option<ObjectKey>,
        owner: impl Fn(&T) -> Option<ServiceKey>,
    ) -> Changed {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                Changed::Nothing
            }
            Event::InitApply(o) => {
                if let (Some(buf), Some(k)) = (&mut self.relist, key(&o))
                    && owner(&o).is_some()
                {
                    buf.insert(k, o);
                }
                Changed::Nothing
            }
            Event::InitDone => {
                if let Some(listed) = self.relist.take() {
                    self.items = listed;
                }
                self.listed = true;
                Changed::All
            }
            Event::Apply(o) => {
                let Some(k) = key(&o) else {
                    return Changed::Nothing;
                };
                let old = self.items.get(&k).and_then(&owner);
                let new = owner(&o);
                // An object whose label went away is no longer one of ours.
                match new {
                    Some(_) => self.items.insert(k, o),
                    None => self.items.remove(&k),
                };
                Changed::Services(old.into_iter().chain(new).collect())
            }
            Event::Delete(o) => {
                let Some(k) = key(&o) else {
                    return Changed::Nothing;
                };
                let old = self
                    .items
                    .remove(&k)
                    .and_then(|o| owner(&o))
                    .or_else(|| owner(&o));
                Changed::Services(old.into_iter().collect())
            }
        }
    }

    /// The objects of one namespace.
    fn in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a T> + 'a {
        self.items
            .range((ns.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == ns)
            .map(|(_, o)| o)
    }
}

fn object_key<K: kube::Resource>(o: &K) -> Option<ObjectKey> {
    let meta = o.meta();
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn service_key(s: &Service) -> Option<ServiceKey> {
    object_key(s).filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
}

/// The names and addresses one service published last, so that those it no longer has are
/// deleted.
#[derive(Default)]
struct Names {
    names: BTreeSet<String>,
    addrs: BTreeSet<String>,
}

/// What each Service publishes for an address: a pod's address can belong to several
/// Services (a canary and a stable one, a headless twin), and must stay while any has it.
type AddrOwners = HashMap<String, BTreeMap<ServiceKey, Published>>;

/// One address's entry from all the Services that publish it: the first Service's (in key
/// order, so the same every time), with the strictest of their rate limits.
fn merged(owners: &BTreeMap<ServiceKey, Published>) -> Option<Published> {
    let mut it = owners.values();
    let first = it.next()?.clone();
    let Published::Endpoints(set, policy) = first else {
        return Some(first);
    };
    let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    let (mut total, mut per_client) = (policy.rate_limit, policy.rate_limit_per_client);
    let mut routes = policy.route_rate_limits.clone();
    for p in it.filter_map(Published::policy) {
        total = min(total, p.rate_limit);
        per_client = min(per_client, p.rate_limit_per_client);
        // Per route: the strictest limit of each prefix; prefixes only one Service names
        // apply as they are (bounded: the model refuses more than MAX_ROUTES per Service,
        // and the union is capped the same way, the strictest kept).
        for (prefix, v) in &p.route_rate_limits {
            match routes.iter_mut().find(|(q, _)| q == prefix) {
                Some((_, w)) => *w = (*w).min(*v),
                None => routes.push((prefix.clone(), *v)),
            }
        }
    }
    if routes.len() > remora_certs::policy::MAX_ROUTES {
        routes.sort_by_key(|(_, v)| *v);
        routes.truncate(remora_certs::policy::MAX_ROUTES);
    }
    if (total, per_client, &routes)
        == (
            policy.rate_limit,
            policy.rate_limit_per_client,
            &policy.route_rate_limits,
        )
    {
        return Some(Published::Endpoints(set, policy));
    }
    let mut p = (*policy).clone();
    p.rate_limit = total;
    p.rate_limit_per_client = per_client;
    p.route_rate_limits = routes;
    Some(Published::Endpoints(set, Arc::new(p)))
}

/// What each Service's policy was built from and last was.
type Policies = HashMap<ServiceKey, Kept>;

#[derive(Debug, Default)]
struct Kept {
    /// The policy of the last good annotations: a refused annotation keeps it.
    annotated: Arc<Policy>,
    /// The annotation error last logged.
    error: Option<String>,
    /// The policy last published (shared while unchanged).
    published: Arc<Policy>,
}

/// The source's state between events.
struct State {
    cluster_domain: String,
    identities: Option<Identities>,
    /// Pod placements and node zones, written to the address registry's zone index.
    zones: super::zones::Zones,
    slices: Cache<EndpointSlice>,
    services: Cache<Service>,
    published: HashMap<ServiceKey, Names>,
    /// Each Service's last good annotations, and the annotation error last logged for it: a
    /// bad annotation is refused (logged once per error) and the last good annotations keep
    /// serving. Routes are refused one by one ([`Routes::fragment`]).
    policies: Policies,
    /// Gateway API routes attached to Services.
    routes: Routes,
    addr_owners: AddrOwners,
    /// The registry follows the caches (all listed).
    live: bool,
}

impl State {
    fn new(cluster_domain: String, identities: Option<Identities>) -> Self {
        State {
            cluster_domain,
            identities,
            zones: Default::default(),
            slices: Cache::default(),
            services: Cache::default(),
            published: HashMap::new(),
            policies: HashMap::new(),
            routes: Routes::default(),
            addr_owners: HashMap::new(),
            live: false,
        }
    }

    /// The policy `svc`'s annotations give, with the routes attached to it applied
    /// ([`gateway::apply`]: routes, split and timeouts from the accepted routes, the rest from
    /// the annotations). Refused annotations: the Service's last good annotations (none for a
    /// Service never seen with good ones), with one log line naming the Service and the field;
    /// a refused route leaves out that route only ([`Routes::fragment`]).
    fn policy(policies: &mut Policies, svc: &Service, routes: &mut Routes) -> Arc<Policy> {
        let Some(key) = service_key(svc) else {
            return Arc::default();
        };
        let annotations = svc.metadata.annotations.as_ref();
        let parsed = Policy::from_fields(|k| {
            annotations.and_then(|a| a.get(k)).map(String::as_str)
        })
        .and_then(|p| {
            // Split and route targets are Services of the same namespace, by name.
            let bad = |field: &str, to: &str| {
                Err(format!(
                    "{field}: {to:?} is not a Service name; name a Service in the same namespace"
                ))
            };
            if let Some(s) = p.split.iter().find(|s| !is_label(&s.to)) {
                return bad(remora_certs::policy::SPLIT, &s.to);
            }
            if let Some(r) = p.routes.iter().find(|r| !is_label(&r.to)) {
                return bad(remora_certs::policy::ROUTES, &r.to);
            }
            Ok(p)
        });
        let fragment = routes.fragment(&key, &tcp_ports(svc));
        let (ns, name) = key.clone();
        let entry = policies.entry(key.clone()).or_default();
        match parsed {
            Ok(p) => {
                if *entry.annotated != p {
                    entry.annotated = Arc::new(p);
                }
                entry.error = None;
            }
            Err(e) => {
                let e = format!(
                    "Service {ns}/{name}: annotation refused: {e}; keeping its last good policy from annotations"
                );
                if entry.error.as_ref() != Some(&e) {
                    tracing::warn!(service = %format!("{ns}/{name}"), "{e}");
                    entry.error = Some(e);
                }
            }
        }
        if !fragment.applied {
            entry.published = entry.annotated.clone();
            return entry.published.clone();
        }
        let p = match gateway::apply((*entry.annotated).clone(), &key, &fragment) {
            Ok(p) => p,
            // Each route was checked on its own and the merge keeps within the model's
            // bounds, so this is a bug; the annotations alone are the safe answer.
            Err(e) => {
                tracing::error!(service = %format!("{ns}/{name}"), "{e}; the Service's annotations alone apply");
                (*entry.annotated).clone()
            }
        };
        if *entry.published != p {
            entry.published = Arc::new(p);
        }
        entry.published.clone()
    }

    fn expect(&self, slice_ns: &str, ep: &Endpoint) -> Expect {
        match &self.identities {
            Some(ids) => ids.expect(slice_ns, ep),
            None => Expect::Plain,
        }
    }

    fn on_slice(&mut self, ev: Event<EndpointSlice>, sink: &Sink<'_>) {
        let first = matches!(ev, Event::InitDone) && !self.slices.listed;
        let changed = self.slices.apply(ev, object_key, service_of);
        if first {
            tracing::info!(slices = self.slices.items.len(), "EndpointSlices listed");
        }
        self.changed(changed, sink);
    }

    fn on_service(&mut self, ev: Event<Service>, sink: &Sink<'_>) {
        let first = matches!(ev, Event::InitDone) && !self.services.listed;
        let changed = self.services.apply(ev, service_key, service_key);
        if first {
            tracing::info!(services = self.services.items.len(), "Services listed");
        }
        self.changed(changed, sink);
    }

    fn on_route(&mut self, kind: gateway::Kind, ev: Event<DynamicObject>, sink: &Sink<'_>) {
        let changed = self.routes.apply(kind, ev);
        self.routes_changed(changed, sink);
    }

    fn routes_changed(&mut self, changed: RoutesChanged, sink: &Sink<'_>) {
        let changed = match changed {
            RoutesChanged::Nothing => Changed::Nothing,
            RoutesChanged::All => Changed::All,
            RoutesChanged::Services(s) => Changed::Services(s.into_iter().collect()),
        };
        self.changed(changed, sink);
    }

    /// One answer of a route watch: an event, the kind not served (no CRD: the watch stops
    /// until [`ROUTES_RECHECK`], logged once), or another error (logged; before the first list,
    /// publishing stops waiting on a 403 at once and on other errors after
    /// [`gateway::PATIENCE`]; the routes already read stay).
    fn on_route_watch(
        &mut self,
        watch: &mut RouteWatch,
        ev: Option<Result<Event<DynamicObject>, watcher::Error>>,
        hinted: &mut Hinted,
        sink: &Sink<'_>,
    ) {
        let kind = watch.kind;
        match ev {
            Some(Ok(ev)) => {
                hinted.ok(kind.plural());
                self.on_route(kind, ev, sink);
            }
            Some(Err(e)) if not_served(&e) => {
                if !self.routes.is_unavailable(kind) {
                    tracing::info!(
                        "{}s are not served by the API server (the Gateway API CRDs are not installed): no route applies; looking again every {}s",
                        kind.name(),
                        ROUTES_RECHECK.as_secs()
                    );
                }
                watch.stop();
                let changed = self.routes.unavailable(kind);
                self.routes_changed(changed, sink);
            }
            Some(Err(e)) => {
                hinted.warn(kind.name(), kind.plural(), gateway::GROUP, &e);
                let changed = self
                    .routes
                    .failed(kind, forbidden(&e), tokio::time::Instant::now());
                self.routes_changed(changed, sink);
            }
            None => {
                tracing::warn!("{} watch ended; starting it again", kind.name());
                watch.stop();
            }
        }
    }

    fn changed(&mut self, changed: Changed, sink: &Sink<'_>) {
        match changed {
            Changed::Nothing => {}
            Changed::All => {
                let was_live = self.live;
                self.go_live(sink);
                if was_live {
                    self.publish_all(sink);
                }
            }
            Changed::Services(keys) => {
                if self.live {
                    let keys: BTreeSet<ServiceKey> = keys.into_iter().collect();
                    for key in keys {
                        self.recompute(&key, sink);
                    }
                }
            }
        }
    }

    fn on_pod(&mut self, ev: Event<Pod>, sink: &Sink<'_>) {
        self.zones.on_pod(&ev, sink.addrs);
        let Some(ids) = &mut self.identities else {
            return;
        };
        // A Pod's service account and containers cannot change, so only a Pod seen for the
        // first time can give a withheld endpoint its identity (and QUIC port).
        let appeared = match &ev {
            Event::Apply(p) => ids.store.get(&ObjectRef::from_obj(p)).is_none().then(|| {
                (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                )
            }),
            _ => None,
        };
        ids.writer.apply_watcher_event(&ev);
        match ev {
            Event::InitDone => {
                if !ids.listed {
                    tracing::info!(
                        pods = ids.store.len(),
                        "Pods listed; endpoints get expected identities"
                    );
                }
                ids.listed = true;
                self.changed(Changed::All, sink);
            }
            Event::Apply(_) if self.live => {
                if let Some((ns, pod)) = appeared {
                    for key in self.services_referring_to(&ns, &pod) {
                        self.recompute(&key, sink);
                    }
                }
            }
            _ => {}
        }
    }

    /// Publishes the whole table the first time everything needed is listed.
    fn go_live(&mut self, sink: &Sink<'_>) {
        // Pods and Nodes too: endpoints carry their identity, and proxies learn their zone,
        // from the first answer on.
        let pods_listed =
            self.identities.as_ref().is_none_or(|i| i.listed) && self.zones.nodes_settled();
        let listed = self.slices.listed && self.services.listed && !self.routes.pending();
        if self.live || !listed || !pods_listed {
            if listed && !pods_listed {
                tracing::info!(
                    "Services and EndpointSlices listed; waiting for the Pod list before publishing, so endpoints carry their identity"
                );
            }
            return;
        }
        self.live = true;
        self.publish_all(sink);
        tracing::info!(services = self.published.len(), "Services published");
        sink.synced.send_replace(true);
    }

    fn publish_all(&mut self, sink: &Sink<'_>) {
        // Rebuilt from the Services that exist: a deleted one's entry goes.
        let mut old_policies = std::mem::take(&mut self.policies);
        let by = slices_by_service(&self.slices);
        let mut names = Table::new();
        let mut published = HashMap::new();
        let mut owners: AddrOwners = HashMap::new();
        let mut policies = Policies::new();
        for (key, svc) in &self.services.items {
            let slices = by.get(key).map(Vec::as_slice).unwrap_or_default();
            if let Some(p) = old_policies.remove(key) {
                policies.insert(key.clone(), p);
            }
            let policy = State::policy(&mut policies, svc, &mut self.routes);
            let t = service_table(svc, slices, &self.cluster_domain, &policy, |ns, ep| {
                self.expect(ns, ep)
            });
            published.insert(
                key.clone(),
                Names {
                    names: t.names.keys().cloned().collect(),
                    addrs: t.addrs.keys().cloned().collect(),
                },
            );
            names.extend(t.names);
            for (a, p) in t.addrs {
                owners.entry(a).or_default().insert(key.clone(), p);
            }
        }
        let addrs: Table = owners
            .iter()
            .filter_map(|(a, o)| Some((a.clone(), merged(o)?)))
            .collect();
        self.addr_owners = owners;
        self.published = published;
        self.policies = policies;
        sink.names.replace_all(names);
        sink.addrs.replace_all(addrs);
    }

    fn services_referring_to(&self, ns: &str, pod: &str) -> BTreeSet<ServiceKey> {
        self.slices
            .in_namespace(ns)
            .filter(|s| {
                s.endpoints.iter().any(|ep| {
                    ep.target_ref.as_ref().is_some_and(|t| {
                        t.kind.as_deref() == Some("Pod") && t.name.as_deref() == Some(pod)
                    })
                })
            })
            .filter_map(service_of)
            .collect()
    }

    /// Publishes one service from the caches, deleting the names it no longer has.
    fn recompute(&mut self, key: &ServiceKey, sink: &Sink<'_>) {
        let (ns, name) = key;
        let mut policies = std::mem::take(&mut self.policies);
        if !self.services.items.contains_key(key) {
            policies.remove(key);
            self.routes.forget(key);
        }
        let t = match self.services.items.get(key) {
            Some(svc) => {
                let slices: Vec<&EndpointSlice> = self
                    .slices
                    .in_namespace(ns)
                    .filter(|s| service_of(s).is_some_and(|(_, n)| &n == name))
                    .collect();
                let policy = State::policy(&mut policies, svc, &mut self.routes);
                service_table(svc, &slices, &self.cluster_domain, &policy, |ns, ep| {
                    self.expect(ns, ep)
                })
            }
            None => ServiceTables::default(),
        };
        self.policies = policies;
        let old = self.published.remove(key).unwrap_or_default();
        for gone in old.names.iter().filter(|n| !t.names.contains_key(*n)) {
            sink.names.publish(gone, None);
        }
        for gone in old.addrs.iter().filter(|n| !t.addrs.contains_key(*n)) {
            // Another Service may still select this pod address: it keeps what they publish.
            let left = match self.addr_owners.get_mut(gone) {
                Some(owners) => {
                    owners.remove(key);
                    merged(owners)
                }
                None => None,
            };
            if left.is_none() {
                self.addr_owners.remove(gone);
            }
            sink.addrs.publish(gone, left);
        }
        let now = Names {
            names: t.names.keys().cloned().collect(),
            addrs: t.addrs.keys().cloned().collect(),
        };
        for (n, p) in t.names {
            sink.names.publish(&n, Some(p));
        }
        for (a, p) in t.addrs {
            let owners = self.addr_owners.entry(a.clone()).or_default();
            owners.insert(key.clone(), p);
            sink.addrs.publish(&a, merged(owners));
        }
        if self.services.items.contains_key(key) {
            self.published.insert(key.clone(), now);
        }
    }
}

/// The service a slice belongs to.
pub fn service_of(s: &EndpointSlice) -> Option<ServiceKey> {
    let ns = s.metadata.namespace.as_ref().filter(|n| !n.is_empty())?;
    let svc = s
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .filter(|n| !n.is_empty())?;
    Some((ns.clone(), svc.clone()))
}

/// `<svc>.<ns>.svc.<cluster-domain>:<port>`, lower-cased like every registry name.
pub fn authority(ns: &str, svc: &str, cluster_domain: &str, port: u16) -> String {
    format!("{svc}.{ns}.svc.{cluster_domain}:{port}").to_ascii_lowercase()
}

/// An endpoint's zone and topology hints (`hints.forZones`), as far as they are zone names.
fn locality(ep: &Endpoint) -> Locality {
    let valid = |z: &str| remora_certs::is_zone_name(z).then(|| z.to_string());
    Locality {
        zone: ep.zone.as_deref().and_then(valid),
        for_zones: ep
            .hints
            .iter()
            .flat_map(|h| h.for_zones.iter().flatten())
            .filter_map(|z| valid(&z.name))
            // The controller lists a handful; a bound keeps a hostile slice from growing it.
            .take(8)
            .collect(),
    }
}

/// Ready and not terminating; missing conditions mean ready and not terminating (API docs).
fn takes_traffic(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    c.and_then(|c| c.ready).unwrap_or(true) && !c.and_then(|c| c.terminating).unwrap_or(false)
}

/// TCP, which is also what an unset protocol means.
fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

/// A DNS label (RFC 1123), as Kubernetes requires of hostnames and namespace names.
pub(crate) fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS name (labels joined by dots; a trailing dot allowed), as ExternalName requires.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

/// Whether an `appProtocol` names a protocol that detection must not wait on: the client
/// does not speak first (MySQL, SMTP…), or it is not HTTP at all. Kubernetes leaves the
/// values free-form besides `kubernetes.io/h2c`, `kubernetes.io/ws` and `kubernetes.io/wss`
/// (all HTTP: detected as usual); a prefix such as `linkerd.io/` or `remora.io/` is ignored.
/// Unknown values keep detection, which is correct for any client-speaks-first protocol.
pub fn opaque_protocol(app_protocol: Option<&str>) -> bool {
    let Some(p) = app_protocol else {
        return false;
    };
    let p = p.to_ascii_lowercase();
    let bare = p.rsplit('/').next().unwrap_or(&p);
    matches!(
        bare,
        "tcp"
            | "opaque"
            | "tls"
            | "https"
            | "mysql"
            | "mysqlx"
            | "mariadb"
            | "postgres"
            | "postgresql"
            | "redis"
            | "nats"
            | "mongo"
            | "mongodb"
            | "amqp"
            | "amqps"
            | "kafka"
            | "memcache"
            | "memcached"
            | "smtp"
            | "smtps"
            | "ftp"
            | "cql"
            | "cassandra"
            | "zookeeper"
            | "mqtt"
            | "ldap"
            | "ldaps"
            | "ssh"
    )
}

/// What one Service publishes: names, and ClusterIP:port addresses.
#[derive(Debug, Default)]
pub struct ServiceTables {
    pub names: Table,
    pub addrs: Table,
}

/// The names and addresses one Service publishes from its slices, each with its endpoints (one
/// per address). A port with no usable endpoint maps to an empty set.
pub fn service_table(
    svc: &Service,
    slices: &[&EndpointSlice],
    cluster_domain: &str,
    policy: &Arc<Policy>,
    expect: impl Fn(&str, &Endpoint) -> Expect,
) -> ServiceTables {
    let mut out = ServiceTables::default();
    let (Some((ns, name)), Some(spec)) = (service_key(svc), svc.spec.as_ref()) else {
        return out;
    };
    let host = format!("{name}.{ns}.svc.{cluster_domain}").to_ascii_lowercase();
    let ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            let n = u16::try_from(p.port).ok().filter(|&n| n != 0)?;
            Some((n, p.name.clone().unwrap_or_default(), p))
        })
        .collect();
    if spec.type_.as_deref() == Some("ExternalName") {
        let Some(ext) = spec.external_name.as_deref().map(str::to_ascii_lowercase) else {
            return out;
        };
        if !is_dns_name(&ext) {
            tracing::warn!(service = %format!("{ns}/{name}"), external_name = %ext,
                "ExternalName is not a DNS name; the Service publishes nothing");
            return out;
        }
        let alias: Arc<str> = ext.trim_end_matches('.').into();
        if ports.is_empty() {
            out.names
                .insert(format!("{host}:*"), Published::Alias(alias.clone()));
        }
        for (port, _, _) in &ports {
            out.names
                .insert(format!("{host}:{port}"), Published::Alias(alias.clone()));
        }
        return out;
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let cluster_ips: BTreeSet<IpAddr> = if headless {
        BTreeSet::new()
    } else {
        spec.cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect()
    };
    for (port, port_name, sp) in &ports {
        let opaque = opaque_protocol(sp.app_protocol.as_deref());
        // Split targets name Services of this namespace; on this port they are authorities.
        let policy = match policy.split.is_empty() && policy.routes.is_empty() {
            true => policy.clone(),
            false => {
                let full = |to: &str| {
                    format!("{to}.{ns}.svc.{cluster_domain}:{port}").to_ascii_lowercase()
                };
                let mut p = (**policy).clone();
                for s in &mut p.split {
                    s.to = full(&s.to);
                }
                for r in &mut p.routes {
                    r.to = full(&r.to);
                }
                Arc::new(p)
            }
        };
        let policy = &policy;
        let mut set: BTreeMap<SocketAddr, EndpointSpec> = BTreeMap::new();
        let mut per_pod: BTreeMap<String, Vec<EndpointSpec>> = BTreeMap::new();
        for slice in slices {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            // The slice port carrying this Service port: same name, as the controller writes.
            let Some(target) = slice
                .ports
                .iter()
                .flatten()
                .filter(|p| is_tcp(p.protocol.as_deref()))
                .find(|p| p.name.as_deref().unwrap_or("") == port_name)
                .and_then(|p| u16::try_from(p.port?).ok())
                .filter(|&p| p != 0)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|ep| takes_traffic(ep)) {
                // Only a meshed endpoint (one with an identity) has a proxy serving QUIC.
                let (identity, quic) = match expect(&ns, ep) {
                    Expect::Plain => (None, None),
                    Expect::Identity { id, quic } => (Some(id), Some(quic)),
                    Expect::Withhold => continue,
                };
                let hostname = ep.hostname.as_deref().filter(|h| headless && is_label(h));
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    let addr = SocketAddr::new(ip, target);
                    let spec = EndpointSpec {
                        addr,
                        weight: 1,
                        identity: identity.clone(),
                        opaque,
                        quic,
                        locality: locality(ep),
                    };
                    if let Some(h) = hostname {
                        per_pod.entry(h.to_string()).or_default().push(spec.clone());
                    }
                    set.insert(addr, spec);
                }
            }
        }
        // Each endpoint is also known by its own address: an intercepted connection to a pod
        // IP (a headless Service, a StatefulSet peer) gets that pod's identity and mTLS.
        for (addr, spec) in &set {
            // With the part of the Service's policy its own proxy enforces (rate limits).
            out.addrs.insert(
                addr.to_string(),
                Published::with_policy(vec![spec.clone()], policy.inbound_part()),
            );
        }
        // The Service's policy goes with its names and ClusterIPs; a pod's own address may
        // belong to several Services, so it carries none.
        let set = Published::Endpoints(Arc::new(set.into_iter().collect()), policy.clone());
        for ip in &cluster_ips {
            out.addrs
                .insert(SocketAddr::new(*ip, *port).to_string(), set.clone());
        }
        out.names.insert(format!("{host}:{port}"), set);
        for (h, eps) in per_pod {
            out.names.insert(
                format!("{h}.{host}:{port}"),
                Published::Endpoints(
                    Arc::new(eps.into_iter().map(|e| (e.addr, e)).collect()),
                    policy.clone(),
                ),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const WEB: &str = "web.shop.svc.cluster.local:80";
    const CD: &str = "cluster.local";

    fn ep(addr: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![addr.to_string()],
            conditions: Some(EndpointConditions {
                ready,
                serving: Some(true),
                terminating,
            }),
            ..Endpoint::default()
        }
    }

    fn pod_ep(addr: &str, pod: &str) -> Endpoint {
        Endpoint {
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                namespace: Some("shop".into()),
                ..ObjectReference::default()
            }),
            ..ep(addr, Some(true), None)
        }
    }

    /// A slice of `svc` whose ports are `(name, number)`.
    fn slice(
        name: &str,
        svc: &str,
        ports: &[(&str, i32)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|&(n, p)| EndpointPort {
                        name: Some(n.into()),
                        port: Some(p),
                        protocol: Some("TCP".into()),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        }
    }

    /// A ClusterIP Service with ports `(name, port, appProtocol)`.
    fn service(name: &str, cluster_ip: &str, ports: &[(&str, i32, Option<&str>)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|&(n, p, app)| ServicePort {
                            name: Some(n.into()),
                            port: p,
                            protocol: Some("TCP".into()),
                            app_protocol: app.map(String::from),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn web() -> Service {
        service("web", "198.18.0.10", &[("http", 80, None)])
    }

    fn addrs(t: &Table, name: &str) -> Vec<String> {
        t[name]
            .set()
            .unwrap_or_else(|| panic!("{name} is not an endpoint set"))
            .keys()
            .map(|a| a.to_string())
            .collect()
    }

    fn plain(_: &str, _: &Endpoint) -> Expect {
        Expect::Plain
    }

    #[test]
    fn a_service_port_reaches_each_endpoint_on_its_own_target_port() {
        // targetPort `http` is 8080 on some pods and 8081 on others (two slices).
        let a = slice(
            "web-a",
            "web",
            &[("http", 8080), ("metrics", 9090)],
            vec![ep("10.0.0.1", None, None)],
        );
        let b = slice(
            "web-b",
            "web",
            &[("http", 8081)],
            vec![ep("10.0.0.2", None, None)],
        );
        let t = service_table(&web(), &[&a, &b], CD, &Arc::default(), plain);
        assert_eq!(addrs(&t.names, WEB), ["10.0.0.1:8080", "10.0.0.2:8081"]);
        // Only Service ports are names; the slice's `metrics` port is not a Service port.
        assert_eq!(t.names.len(), 1, "{:?}", t.names.keys());
        assert_eq!(
            addrs(&t.addrs, "198.18.0.10:80"),
            ["10.0.0.1:8080", "10.0.0.2:8081"]
        );
        // The ClusterIP, and each endpoint by its own address (interception of pod IPs).
        assert_eq!(t.addrs.len(), 3, "{:?}", t.addrs.keys());
        assert_eq!(addrs(&t.addrs, "10.0.0.2:8081"), ["10.0.0.2:8081"]);
        // Dual-stack: every cluster IP answers.
        let mut dual = web();
        if let Some(spec) = dual.spec.as_mut() {
            spec.cluster_ips = Some(vec!["198.18.0.10".into(), "fd00::10".into()]);
        }
        let t = service_table(&dual, &[&a], CD, &Arc::default(), plain);
        let mut keys: Vec<_> = t.addrs.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["10.0.0.1:8080", "198.18.0.10:80", "[fd00::10]:80"]);
    }

    #[test]
    fn unnamed_ports_match_unnamed_slice_ports() {
        let svc = service("web", "198.18.0.10", &[("", 80, None)]);
        let s = slice(
            "web-a",
            "web",
            &[("", 8080)],
            vec![ep("10.0.0.1", None, None)],
        );
        let t = service_table(&svc, &[&s], CD, &Arc::default(), plain);
        assert_eq!(addrs(&t.names, WEB), ["10.0.0.1:8080"]);
    }

    #[test]
    fn not_ready_and_terminating_endpoints_get_no_traffic() {
        let s = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![
                ep("10.0.0.1", Some(true), Some(false)),
                ep("10.0.0.2", Some(false), None),
                // Terminating but still serving: no new requests.
                ep("10.0.0.3", Some(true), Some(true)),
                Endpoint {
                    addresses: vec!["10.0.0.4".into(), "10.0.0.5".into()],
                    conditions: None,
                    ..Endpoint::default()
                },
            ],
        );
        let t = service_table(&web(), &[&s], CD, &Arc::default(), plain);
        assert_eq!(
            addrs(&t.names, WEB),
            ["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.5:8080"]
        );
    }

    #[test]
    fn a_service_without_usable_endpoints_is_an_empty_set_not_a_missing_service() {
        let down = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![ep("10.0.0.2", Some(false), None)],
        );
        for slices in [vec![], vec![&down]] {
            let t = service_table(&web(), &slices, CD, &Arc::default(), plain);
            assert!(addrs(&t.names, WEB).is_empty());
            assert!(addrs(&t.addrs, "198.18.0.10:80").is_empty());
        }
    }

    #[test]
    fn headless_services_name_each_pod_with_a_hostname() {
        let svc = service("db", "None", &[("cql", 9042, Some("cql"))]);
        let mut a = pod_ep("10.0.0.1", "db-0");
        a.hostname = Some("db-0".into());
        let mut b = pod_ep("10.0.0.2", "db-1");
        b.hostname = Some("db-1".into());
        let mut bad = pod_ep("10.0.0.3", "x");
        bad.hostname = Some("Not_A_Label".into());
        let s = slice("db-a", "db", &[("cql", 9042)], vec![a, b, bad]);
        let t = service_table(&svc, &[&s], CD, &Arc::default(), plain);
        assert_eq!(
            addrs(&t.names, "db.shop.svc.cluster.local:9042"),
            ["10.0.0.1:9042", "10.0.0.2:9042", "10.0.0.3:9042"]
        );
        assert_eq!(
            addrs(&t.names, "db-0.db.shop.svc.cluster.local:9042"),
            ["10.0.0.1:9042"]
        );
        assert_eq!(
            addrs(&t.names, "db-1.db.shop.svc.cluster.local:9042"),
            ["10.0.0.2:9042"]
        );
        assert_eq!(t.names.len(), 3, "{:?}", t.names.keys());
        // A headless Service has no ClusterIP; its pods are known by their addresses.
        let mut keys: Vec<_> = t.addrs.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["10.0.0.1:9042", "10.0.0.2:9042", "10.0.0.3:9042"]);
        // `cql` is not HTTP: published as opaque.
        assert!(
            t.names
                .values()
                .all(|p| p.set().unwrap().values().all(|e| e.opaque))
        );
        // Hostnames of a ClusterIP Service's endpoints get no names (as in cluster DNS).
        let mut c = ep("10.0.0.4", None, None);
        c.hostname = Some("web-0".into());
        let s = slice("web-a", "web", &[("http", 8080)], vec![c]);
        assert_eq!(
            service_table(&web(), &[&s], CD, &Arc::default(), plain)
                .names
                .len(),
            1
        );
    }

    #[test]
    fn external_names_are_aliases() {
        let mut ext = service("ext", "", &[("https", 443, None)]);
        if let Some(spec) = ext.spec.as_mut() {
            spec.type_ = Some("ExternalName".into());
            spec.cluster_ip = None;
            spec.external_name = Some("API.Example.org.".into());
        }
        let t = service_table(&ext, &[], CD, &Arc::default(), plain);
        assert_eq!(
            t.names["ext.shop.svc.cluster.local:443"],
            Published::Alias("api.example.org".into())
        );
        assert!(t.addrs.is_empty());
        // Without ports: every port of the name.
        if let Some(spec) = ext.spec.as_mut() {
            spec.ports = None;
        }
        let t = service_table(&ext, &[], CD, &Arc::default(), plain);
        assert_eq!(
            t.names.keys().collect::<Vec<_>>(),
            ["ext.shop.svc.cluster.local:*"]
        );
        // Not a DNS name: nothing, rather than an alias nobody can resolve.
        if let Some(spec) = ext.spec.as_mut() {
            spec.external_name = Some("not a name".into());
        }
        assert!(
            service_table(&ext, &[], CD, &Arc::default(), plain)
                .names
                .is_empty()
        );
    }

    #[test]
    fn app_protocols_that_are_not_client_first_http_are_opaque() {
        for (p, opaque) in [
            (None, false),
            (Some("http"), false),
            (Some("kubernetes.io/h2c"), false),
            (Some("kubernetes.io/ws"), false),
            (Some("grpc"), false),
            (Some("something-new"), false),
            (Some("tcp"), true),
            (Some("TCP"), true),
            (Some("mysql"), true),
            (Some("linkerd.io/opaque"), true),
            (Some("remora.io/opaque"), true),
            (Some("nats"), true),
            (Some("postgresql"), true),
        ] {
            assert_eq!(opaque_protocol(p), opaque, "{p:?}");
        }
        let svc = service(
            "db",
            "198.18.0.11",
            &[("sql", 3306, Some("mysql")), ("http", 80, Some("http"))],
        );
        let s = slice(
            "db-a",
            "db",
            &[("sql", 3306), ("http", 8080)],
            vec![ep("10.0.0.1", None, None)],
        );
        let t = service_table(&svc, &[&s], CD, &Arc::default(), plain);
        let opaque = |n: &str| t.names[n].set().unwrap().values().all(|e| e.opaque);
        assert!(opaque("db.shop.svc.cluster.local:3306"));
        assert!(!opaque("db.shop.svc.cluster.local:80"));
    }

    #[test]
    fn fqdn_slices_other_protocols_and_bad_data_are_skipped() {
        let mut fqdn = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![ep("example.com", None, None)],
        );
        fqdn.address_type = "FQDN".into();
        let mut udp = slice(
            "web-2",
            "web",
            &[("http", 8080)],
            vec![ep("10.0.0.9", None, None)],
        );
        udp.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let big = slice(
            "web-3",
            "web",
            &[("http", 70000)],
            vec![ep("10.0.0.8", None, None)],
        );
        let bad_ip = slice(
            "web-4",
            "web",
            &[("http", 8080)],
            vec![ep("not-an-ip", None, None)],
        );
        let t = service_table(
            &web(),
            &[&fqdn, &udp, &big, &bad_ip],
            CD,
            &Arc::default(),
            plain,
        );
        assert!(addrs(&t.names, WEB).is_empty(), "{t:?}");
        // UDP Service ports publish nothing.
        let dns = service("dns", "198.18.0.12", &[("dns", 53, None)]);
        let mut dns = dns;
        if let Some(p) = dns.spec.as_mut().and_then(|s| s.ports.as_mut()) {
            p[0].protocol = Some("UDP".into());
        }
        assert!(
            service_table(&dns, &[], CD, &Arc::default(), plain)
                .names
                .is_empty()
        );
    }

    #[test]
    fn expectations_give_identities_or_withhold() {
        let s = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![
                pod_ep("10.0.0.1", "known"),
                pod_ep("10.0.0.2", "unknown"),
                ep("10.0.0.3", None, None),
            ],
        );
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let t = service_table(&web(), &[&s], CD, &Arc::default(), |ns, ep| {
            assert_eq!(ns, "shop");
            match ep.target_ref.as_ref().and_then(|t| t.name.as_deref()) {
                Some("known") => Expect::Identity {
                    id: id.clone(),
                    quic: 4143,
                },
                Some(_) => Expect::Withhold,
                None => Expect::Plain,
            }
        });
        assert_eq!(addrs(&t.names, WEB), ["10.0.0.1:8080", "10.0.0.3:8080"]);
        let set = t.names[WEB].set().unwrap();
        assert_eq!(
            set[&"10.0.0.1:8080".parse().unwrap()].identity.as_ref(),
            Some(&id)
        );
        assert_eq!(set[&"10.0.0.3:8080".parse().unwrap()].identity, None);
        // Only the meshed endpoint advertises its proxy's QUIC port.
        assert_eq!(set[&"10.0.0.1:8080".parse().unwrap()].quic, Some(4143));
        assert_eq!(set[&"10.0.0.3:8080".parse().unwrap()].quic, None);
    }

    struct Sinks {
        names: Arc<Registry>,
        addrs: Arc<Registry>,
        synced: watch::Sender<bool>,
    }

    impl Sinks {
        fn new() -> Self {
            Sinks {
                names: Registry::new(),
                addrs: Registry::new(),
                synced: watch::channel(false).0,
            }
        }
        fn sink(&self) -> Sink<'_> {
            Sink {
                names: &self.names,
                addrs: &self.addrs,
                synced: &self.synced,
            }
        }
    }

    fn registry_addrs(r: &Registry, name: &str) -> Option<Vec<String>> {
        r.get(name)
            .map(|s| s.keys().map(|a| a.to_string()).collect())
    }

    fn listed(state: &mut State, k: &Sinks, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let sink = k.sink();
        state.on_service(Event::Init, &sink);
        for s in services {
            state.on_service(Event::InitApply(s), &sink);
        }
        state.on_service(Event::InitDone, &sink);
        state.on_slice(Event::Init, &sink);
        for s in slices {
            state.on_slice(Event::InitApply(s), &sink);
        }
        state.on_slice(Event::InitDone, &sink);
    }

    #[test]
    fn events_update_only_what_they_touch_and_relists_replace_everything() {
        let k = Sinks::new();
        let sink = k.sink();
        let mut state = State::new(CD.into(), None);
        let web_slice = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![ep("10.0.0.1", None, None)],
        );
        // A slice without its Service publishes nothing.
        let orphan = slice(
            "api-1",
            "api",
            &[("http", 8080)],
            vec![ep("10.0.1.1", None, None)],
        );
        listed(&mut state, &k, vec![web()], vec![web_slice.clone(), orphan]);
        assert!(*k.synced.borrow());
        assert_eq!(registry_addrs(&k.names, WEB).unwrap(), ["10.0.0.1:8080"]);
        assert_eq!(
            registry_addrs(&k.addrs, "198.18.0.10:80").unwrap(),
            ["10.0.0.1:8080"]
        );
        assert_eq!(k.names.services(), 1);

        // The api Service appears: its slice, already there, is published at once.
        state.on_service(
            Event::Apply(service("api", "198.18.0.11", &[("http", 81, None)])),
            &sink,
        );
        assert_eq!(
            registry_addrs(&k.names, "api.shop.svc.cluster.local:81").unwrap(),
            ["10.0.1.1:8080"]
        );

        // The Service port is renumbered: the old name and address go, the new ones come.
        state.on_service(
            Event::Apply(service("web", "198.18.0.10", &[("http", 90, None)])),
            &sink,
        );
        assert!(k.names.get(WEB).is_none());
        assert!(k.addrs.get("198.18.0.10:80").is_none());
        assert_eq!(
            registry_addrs(&k.names, "web.shop.svc.cluster.local:90").unwrap(),
            ["10.0.0.1:8080"]
        );
        assert_eq!(
            registry_addrs(&k.addrs, "198.18.0.10:90").unwrap(),
            ["10.0.0.1:8080"]
        );

        // Not ready: empty but present.
        state.on_slice(
            Event::Apply(slice(
                "web-1",
                "web",
                &[("http", 8080)],
                vec![ep("10.0.0.1", Some(false), None)],
            )),
            &sink,
        );
        assert_eq!(
            registry_addrs(&k.names, "web.shop.svc.cluster.local:90").unwrap(),
            Vec::<String>::new()
        );

        // The label moves the slice to another service: both are recomputed.
        state.on_slice(
            Event::Apply(slice(
                "web-1",
                "api",
                &[("http", 8082)],
                vec![ep("10.0.0.1", None, None)],
            )),
            &sink,
        );
        assert_eq!(
            registry_addrs(&k.names, "web.shop.svc.cluster.local:90").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            registry_addrs(&k.names, "api.shop.svc.cluster.local:81").unwrap(),
            ["10.0.0.1:8082", "10.0.1.1:8080"]
        );

        // The Service is deleted: no such service (callers go back to DNS).
        state.on_service(Event::Delete(service("api", "198.18.0.11", &[])), &sink);
        assert!(k.names.get("api.shop.svc.cluster.local:81").is_none());
        assert!(k.addrs.get("198.18.0.11:81").is_none());

        // A re-list (after 410 Gone) swaps the tables in whole.
        let db = service("db", "198.18.0.12", &[("sql", 5432, Some("postgresql"))]);
        let db_slice = slice(
            "db-1",
            "db",
            &[("sql", 5432)],
            vec![ep("10.0.2.1", None, None)],
        );
        state.on_service(Event::Init, &sink);
        state.on_service(Event::InitApply(db), &sink);
        // Nothing changes until the list is complete.
        assert!(k.names.get("web.shop.svc.cluster.local:90").is_some());
        state.on_service(Event::InitDone, &sink);
        assert!(k.names.get("web.shop.svc.cluster.local:90").is_none());
        assert!(k.addrs.get("198.18.0.10:90").is_none());
        assert_eq!(
            registry_addrs(&k.names, "db.shop.svc.cluster.local:5432").unwrap(),
            Vec::<String>::new()
        );
        state.on_slice(Event::Apply(db_slice), &sink);
        assert_eq!(
            registry_addrs(&k.names, "db.shop.svc.cluster.local:5432").unwrap(),
            ["10.0.2.1:5432"]
        );
        state.on_slice(Event::Delete(slice("db-1", "db", &[], vec![])), &sink);
        assert_eq!(
            registry_addrs(&k.names, "db.shop.svc.cluster.local:5432").unwrap(),
            Vec::<String>::new()
        );
        state.on_service(Event::Delete(service("db", "", &[])), &sink);
        assert_eq!(k.names.services(), 0);
        assert_eq!(k.addrs.services(), 0);
    }

    #[test]
    fn nothing_is_published_until_services_and_slices_are_both_listed() {
        let k = Sinks::new();
        let sink = k.sink();
        let mut state = State::new(CD.into(), None);
        state.on_slice(Event::Init, &sink);
        state.on_slice(
            Event::InitApply(slice(
                "web-1",
                "web",
                &[("http", 8080)],
                vec![ep("10.0.0.1", None, None)],
            )),
            &sink,
        );
        state.on_slice(Event::InitDone, &sink);
        assert!(!*k.synced.borrow());
        assert!(k.names.get(WEB).is_none());
        state.on_service(Event::Init, &sink);
        state.on_service(Event::InitApply(web()), &sink);
        state.on_service(Event::InitDone, &sink);
        assert!(*k.synced.borrow());
        assert_eq!(registry_addrs(&k.names, WEB).unwrap(), ["10.0.0.1:8080"]);
    }

    fn pod(name: &str, sa: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: sa.map(String::from),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn pods_give_endpoints_their_identity() {
        let k = Sinks::new();
        let sink = k.sink();
        let (store, writer) = reflector::store();
        let mut state = State::new(
            CD.into(),
            Some(Identities {
                store,
                writer,
                trust_domain: "example.org".into(),
                listed: false,
            }),
        );
        let s = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![
                pod_ep("10.0.0.1", "web-a"),
                pod_ep("10.0.0.2", "web-b"),
                ep("10.0.0.3", None, None),
            ],
        );
        // Points at a Pod of another namespace: never published with (or without) its identity.
        let mut elsewhere = pod_ep("10.0.0.4", "web-a");
        if let Some(t) = elsewhere.target_ref.as_mut() {
            t.namespace = Some("kube-system".into());
        }
        let s2 = slice("web-2", "web", &[("http", 8080)], vec![elsewhere]);
        listed(&mut state, &k, vec![web()], vec![s, s2]);
        // Services and slices are in, Pods are not: nothing is published yet, and not ready.
        assert!(k.names.get(WEB).is_none());
        assert!(!*k.synced.borrow());

        state.on_pod(Event::Init, &sink);
        state.on_pod(Event::InitApply(pod("web-a", Some("web"))), &sink);
        state.on_pod(Event::InitDone, &sink);
        assert!(*k.synced.borrow());
        let set = k.names.get(WEB).unwrap();
        // web-b's Pod is unknown: withheld, not published without identity.
        assert_eq!(set.len(), 2);
        let a = &set[&"10.0.0.1:8080".parse().unwrap()];
        assert_eq!(
            a.identity.as_ref().unwrap().to_string(),
            "spiffe://example.org/ns/shop/sa/web"
        );
        assert!(set[&"10.0.0.3:8080".parse().unwrap()].identity.is_none());
        // The ClusterIP table carries the same identities.
        assert_eq!(k.addrs.get("198.18.0.10:80").unwrap(), set);

        // web-b appears (no service account named: `default`) and its endpoint follows.
        state.on_pod(Event::Apply(pod("web-b", None)), &sink);
        let set = k.names.get(WEB).unwrap();
        let b = &set[&"10.0.0.2:8080".parse().unwrap()];
        assert_eq!(
            b.identity.as_ref().unwrap().to_string(),
            "spiffe://example.org/ns/shop/sa/default"
        );
    }

    /// A proxy container as `remora inject` writes it (native sidecar or `--classic`), with
    /// extra environment and arguments, and an app container beside it.
    fn meshed_pod(name: &str, classic: bool, env: &[(&str, &str)], args: &[&str]) -> Pod {
        use k8s_openapi::api::core::v1::{ContainerPort, EnvVar};
        let proxy = Container {
            name: "remora-proxy".into(),
            env: Some(
                env.iter()
                    .map(|(k, v)| EnvVar {
                        name: k.to_string(),
                        value: Some(v.to_string()),
                        value_from: None,
                    })
                    .chain([EnvVar {
                        name: "REMORA_IDENTITY_MODE".into(),
                        value: Some("control".into()),
                        value_from: None,
                    }])
                    .collect(),
            ),
            args: Some(args.iter().map(|a| a.to_string()).collect()),
            ports: Some(vec![
                ContainerPort {
                    name: Some("remora-inbound".into()),
                    container_port: 4143,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("remora-admin".into()),
                    container_port: 4191,
                    ..ContainerPort::default()
                },
            ]),
            ..Container::default()
        };
        let app = Container {
            name: "web".into(),
            env: Some(vec![EnvVar {
                name: "REMORA_INBOUND_ADDR".into(),
                value: Some("0.0.0.0:9999".into()),
                value_from: None,
            }]),
            ..Container::default()
        };
        let mut p = pod(name, Some("web"));
        let spec = p.spec.as_mut().unwrap();
        if classic {
            spec.containers = vec![proxy, app];
        } else {
            spec.init_containers = Some(vec![proxy]);
            spec.containers = vec![app];
        }
        p
    }

    #[test]
    fn a_meshed_pods_quic_port_is_its_proxys_inbound_port() {
        // (pod, expected port): what the Pod says, else the proxy's default.
        let with_port = |n: i32| {
            let mut p = meshed_pod("p", false, &[], &[]);
            let c = &mut p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0];
            c.ports.as_mut().unwrap()[0].container_port = n;
            p
        };
        let from_elsewhere = {
            let mut p = meshed_pod("p", true, &[], &[]);
            p.spec.as_mut().unwrap().containers[0].env =
                Some(vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "REMORA_INBOUND_ADDR".into(),
                    value: None,
                    value_from: Some(Default::default()),
                }]);
            p
        };
        let cases = [
            ("not injected", pod("p", Some("web")), 4143),
            (
                "injected, native sidecar",
                meshed_pod("p", false, &[], &[]),
                4143,
            ),
            ("injected, classic", meshed_pod("p", true, &[], &[]), 4143),
            (
                "REMORA_INBOUND_ADDR",
                meshed_pod("p", false, &[("REMORA_INBOUND_ADDR", "0.0.0.0:5143")], &[]),
                5143,
            ),
            (
                "REMORA_INBOUND_ADDR, IPv6, classic",
                meshed_pod("p", true, &[("REMORA_INBOUND_ADDR", "[::]:5144")], &[]),
                5144,
            ),
            (
                "--inbound-addr beats the environment",
                meshed_pod(
                    "p",
                    false,
                    &[("REMORA_INBOUND_ADDR", "0.0.0.0:5143")],
                    &["--inbound-addr", "0.0.0.0:6143"],
                ),
                6143,
            ),
            (
                "--inbound-addr=",
                meshed_pod(
                    "p",
                    true,
                    &[],
                    &["--threads", "2", "--inbound-addr=0.0.0.0:6144"],
                ),
                6144,
            ),
            (
                "a value that is no address: the named port",
                meshed_pod("p", false, &[("REMORA_INBOUND_ADDR", "$(ADDR)")], &[]),
                4143,
            ),
            ("the named container port", with_port(7143), 7143),
            ("a named port out of range", with_port(70000), 4143),
            (
                "a value from a ConfigMap: the named port",
                from_elsewhere,
                4143,
            ),
        ];
        for (what, p, want) in cases {
            let spec = p.spec.unwrap();
            assert_eq!(proxy_inbound_port(&spec), want, "{what}");
            // The store keeps only a stripped Pod: it still says the same.
            let stripped = strip_pod_spec(spec);
            assert_eq!(proxy_inbound_port(&stripped), want, "{what}, stripped");
            assert!(
                stripped
                    .init_containers
                    .iter()
                    .flatten()
                    .chain(&stripped.containers)
                    .all(|c| c.name == "remora-proxy"
                        && c.ports.iter().flatten().count() <= 1
                        && c.env
                            .iter()
                            .flatten()
                            .all(|e| e.name == "REMORA_INBOUND_ADDR" && e.value_from.is_none())),
                "{what}: {stripped:?}"
            );
        }
    }

    #[test]
    fn meshed_endpoints_advertise_their_proxys_quic_port() {
        let k = Sinks::new();
        let sink = k.sink();
        let (store, writer) = reflector::store();
        let mut state = State::new(
            CD.into(),
            Some(Identities {
                store,
                writer,
                trust_domain: "example.org".into(),
                listed: false,
            }),
        );
        let s = slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![
                pod_ep("10.0.0.1", "web-a"),
                pod_ep("10.0.0.2", "web-b"),
                ep("10.0.0.3", None, None),
            ],
        );
        listed(&mut state, &k, vec![web()], vec![s]);
        let stripped = |mut p: Pod| {
            p.spec = p.spec.map(strip_pod_spec);
            p
        };
        state.on_pod(Event::Init, &sink);
        state.on_pod(
            Event::InitApply(stripped(meshed_pod("web-a", false, &[], &[]))),
            &sink,
        );
        state.on_pod(
            Event::InitApply(stripped(meshed_pod(
                "web-b",
                true,
                &[("REMORA_INBOUND_ADDR", "0.0.0.0:5143")],
                &[],
            ))),
            &sink,
        );
        state.on_pod(Event::InitDone, &sink);
        let set = k.names.get(WEB).unwrap();
        let quic = |a: &str| set[&a.parse().unwrap()].quic;
        assert_eq!(quic("10.0.0.1:8080"), Some(4143));
        assert_eq!(quic("10.0.0.2:8080"), Some(5143));
        // Not a Pod: no identity, no proxy known to serve QUIC.
        assert_eq!(quic("10.0.0.3:8080"), None);
        // The pod's own address and the ClusterIP carry the same.
        assert_eq!(k.addrs.get("198.18.0.10:80").unwrap(), set);
        let own = k.addrs.get("10.0.0.2:8080").unwrap();
        assert_eq!(own[&"10.0.0.2:8080".parse().unwrap()].quic, Some(5143));
    }

    #[test]
    fn api_errors_are_described_briefly() {
        let status = kube::core::Status::failure(&format!("{}\nmore", "x".repeat(300)), "NotFound")
            .with_code(404);
        let d = describe(&kube::Error::Api(status.boxed()));
        assert!(d.starts_with("HTTP 404 NotFound: xxx"), "{d}");
        assert!(d.chars().count() <= 220 && !d.contains("more"), "{d}");
    }

    #[test]
    fn service_annotations_give_the_policy_and_a_bad_one_keeps_the_last_good() {
        use std::collections::BTreeMap;
        let annotated = |pairs: &[(&str, &str)]| {
            let mut s = web();
            s.metadata.annotations = Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            );
            s
        };
        let mut policies = Policies::new();
        let good = annotated(&[("remora.io/timeout", "300ms"), ("remora.io/retries", "1")]);
        let p = State::policy(&mut policies, &good, &mut Routes::default());
        assert_eq!(
            (p.timeout, p.retries),
            (Some(Duration::from_millis(300)), 1)
        );
        // The policy travels with the Service's name and its ClusterIP, not a pod's address.
        let a = slice(
            "a",
            "web",
            &[("http", 8080)],
            vec![ep("10.1.0.1", None, None)],
        );
        let t = service_table(&good, &[&a], CD, &p, plain);
        assert_eq!(
            t.names[&format!("web.shop.svc.{CD}:80")].policy(),
            Some(&*p)
        );
        assert_eq!(t.addrs["198.18.0.10:80"].policy(), Some(&*p));
        assert!(t.addrs["10.1.0.1:8080"].policy().unwrap().is_default());
        // Refused: the last good policy stays.
        let bad = annotated(&[("remora.io/timeout", "soon"), ("remora.io/retries", "1")]);
        assert_eq!(
            State::policy(&mut policies, &bad, &mut Routes::default()),
            p
        );
        assert!(policies.values().any(|k| {
            k.error
                .as_deref()
                .is_some_and(|e| e.contains("remora.io/timeout"))
        }));
        // Annotations removed: no policy.
        assert!(State::policy(&mut policies, &web(), &mut Routes::default()).is_default());
        // A split names Services of the namespace; each port gets their authorities.
        let split = annotated(&[("remora.io/split", "web-canary=5")]);
        let p = State::policy(&mut policies, &split, &mut Routes::default());
        let t = service_table(&split, &[&a], CD, &p, plain);
        let sent = t.names[&format!("web.shop.svc.{CD}:80")].policy().unwrap();
        assert_eq!(sent.split[0].to, format!("web-canary.shop.svc.{CD}:80"));
        assert_eq!(sent.split[0].percent, 5);
        // Rate limits go to each pod's own address (its proxy enforces them), alone.
        let limited = annotated(&[("remora.io/rate-limit", "100"), ("remora.io/timeout", "1s")]);
        let p = State::policy(&mut policies, &limited, &mut Routes::default());
        let t = service_table(&limited, &[&a], CD, &p, plain);
        let own = t.addrs["10.1.0.1:8080"].policy().unwrap();
        assert_eq!((own.rate_limit, own.timeout), (Some(100), None));
        let routed = annotated(&[("remora.io/routes", "header:x-canary=true=>web-canary")]);
        let p = State::policy(&mut policies, &routed, &mut Routes::default());
        let t = service_table(&routed, &[&a], CD, &p, plain);
        let sent = t.names[&format!("web.shop.svc.{CD}:80")].policy().unwrap();
        assert_eq!(sent.routes[0].to, format!("web-canary.shop.svc.{CD}:80"));
        let bad = annotated(&[("remora.io/split", "web.other:80=5")]);
        assert_eq!(
            State::policy(&mut policies, &bad, &mut Routes::default()),
            p,
            "not a Service name: refused"
        );
    }

    #[test]
    fn routes_merge_with_the_annotations_and_each_is_refused_alone() {
        use serde_json::json;
        let annotated = |pairs: &[(&str, &str)]| {
            let mut s = web();
            s.metadata.annotations = Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            );
            s
        };
        let route = |name: &str, rules: serde_json::Value| {
            DynamicObject::new(name, &gateway::Kind::Http.api_resource())
                .within("shop")
                .data(json!({"spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                    "rules": rules}}))
        };
        let good = route(
            "a",
            json!([{"backendRefs": [{"name": "web", "weight": 3}, {"name": "web-v2", "weight": 1}]}]),
        );
        let bad = route(
            "b",
            json!([{"matches": [{"path": {"value": "/b"}}], "backendRefs": [{"name": "b"}],
                    "filters": [{"type": "RequestHeaderModifier"}]}]),
        );
        let mut routes = Routes::default();
        routes.follow();
        routes.unavailable(gateway::Kind::Grpc);
        routes.apply(gateway::Kind::Http, Event::Init);
        routes.apply(gateway::Kind::Http, Event::InitApply(good.clone()));
        routes.apply(gateway::Kind::Http, Event::InitApply(bad));
        routes.apply(gateway::Kind::Http, Event::InitDone);
        let mut policies = Policies::new();
        let limited = annotated(&[
            ("remora.io/rate-limit", "100"),
            ("remora.io/timeout", "2s"),
            ("remora.io/split", "old=50"),
        ]);
        type Case = (
            &'static str,
            Service,
            Option<u32>,
            Option<Duration>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "the good route's split beside the annotations' limit and timeout",
                limited.clone(),
                Some(100),
                Some(Duration::from_secs(2)),
                "web-v2",
            ),
            (
                "an annotation edit applies while the bad route stays",
                annotated(&[("remora.io/rate-limit", "50"), ("remora.io/timeout", "1s")]),
                Some(50),
                Some(Duration::from_secs(1)),
                "web-v2",
            ),
            (
                "a refused annotation keeps the last good annotations; the routes still apply",
                annotated(&[("remora.io/rate-limit", "lots")]),
                Some(50),
                Some(Duration::from_secs(1)),
                "web-v2",
            ),
        ];
        for (what, svc, limit, timeout, split) in cases {
            let p = State::policy(&mut policies, &svc, &mut routes);
            assert_eq!(
                (
                    p.rate_limit,
                    p.timeout,
                    p.split.first().map(|s| s.to.as_str())
                ),
                (limit, timeout, Some(split)),
                "{what}"
            );
        }
        // The good route deleted, the bad one still there: the annotations' split is back.
        routes.apply(gateway::Kind::Http, Event::Delete(good));
        let p = State::policy(&mut policies, &limited, &mut routes);
        assert_eq!(
            (p.rate_limit, p.split.first().map(|s| s.to.as_str())),
            (Some(100), Some("old"))
        );
    }

    #[test]
    fn an_address_several_services_publish_keeps_the_strictest_limit_and_outlives_each() {
        let pod = || vec![EndpointSpec::new("10.1.0.1:8080".parse().unwrap())];
        let limit = |r: Option<u32>| {
            Published::with_policy(pod(), Policy::default().with_rate_limits(r, None).unwrap())
        };
        let key = |n: &str| ("shop".to_string(), n.to_string());
        let mut owners = BTreeMap::new();
        owners.insert(key("web"), limit(Some(100)));
        owners.insert(key("web-canary"), limit(None));
        owners.insert(key("web-hl"), limit(Some(40)));
        let m = merged(&owners).unwrap();
        assert_eq!(m.policy().unwrap().rate_limit, Some(40));
        assert_eq!(m.set().unwrap().len(), 1);
        // One Service letting go leaves the others' entry, not a deletion.
        owners.remove(&key("web-hl"));
        assert_eq!(
            merged(&owners).unwrap().policy().unwrap().rate_limit,
            Some(100)
        );
        owners.clear();
        assert!(merged(&owners).is_none());
    }
}

//! Kubernetes EndpointSlices as a source: every `discovery.k8s.io/v1` EndpointSlice carrying a
//! `kubernetes.io/service-name` label, in all namespaces, becomes part of the [`Registry`].
//!
//! - **Names.** Slices are grouped by namespace + `kubernetes.io/service-name`. Each distinct TCP
//!   port number in a service's slices publishes `<svc>.<ns>.svc.<cluster-domain>:<port>`, with
//!   that slice's endpoints. Port *names* are not published: only a numeric port is a valid
//!   `host:port` authority. Without Service objects (this source reads EndpointSlices only) the
//!   authority port is the *endpoint* (target) port, not the Service's port; and when slices of
//!   one service carry different numbers for the same port name (a rollout changing the target
//!   port), each number is published with its own slices' endpoints.
//! - **"No endpoints" vs "no such service".** A service whose slices exist but hold no usable
//!   endpoint publishes an empty set; when its last slice is deleted its names are deleted, so
//!   callers can tell an outage from a typo.
//! - **Which endpoints.** Only `ready` ones (a missing condition means ready, as the API says);
//!   `terminating` ones are left out even if still `serving`, so they get no new requests. Only
//!   IPv4/IPv6 slices (FQDN slices have no defined semantics); every address of an endpoint.
//! - **Re-lists.** The watcher (with backoff, so it reconnects) starts over with `Init` after a
//!   `410 Gone` or on start; those events are buffered and swapped in whole at `InitDone`
//!   (`Registry::replace_all`), so a re-list never shows a half-listed table. `Apply`/`Delete`
//!   recompute only the service they touch (`Registry::set`). `synced` turns true after the
//!   first table is published.
//! - **Identity.** When Pods can be read, an endpoint whose `targetRef` is a Pod is expected to
//!   present `spiffe://<trust-domain>/ns/<ns>/sa/<pod's service account>`; proxies then reach it
//!   with mTLS and refuse any other identity. Pods are followed with a reflector store (stripped
//!   to their service account, to keep memory small), and the table is first published only once
//!   the Pod list is in, so a restart never publishes meshed endpoints without their identity. A
//!   Pod endpoint whose Pod is not (yet) known, or is in another namespace, is withheld rather
//!   than published without an identity (that would be a silent downgrade to plaintext); the
//!   services referring to a Pod are recomputed when it appears. Endpoints without a Pod `targetRef` (external addresses)
//!   have no identity. When Pods cannot be read (RBAC, or an API server that does not serve
//!   them), one warning says so and endpoints get no identity. The test API server serves no
//!   Pods, so the Pod path is covered by unit tests here only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use remora_certs::{EndpointSpec, SpiffeId};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};

use crate::registry::{Registry, Table};

/// The label the EndpointSlice controller puts on every slice it manages.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Watches EndpointSlices (and, when allowed, Pods) and keeps a [`Registry`] in step.
pub struct KubeSource {
    pub client: kube::Client,
    /// The cluster's DNS domain, usually `cluster.local`.
    pub cluster_domain: String,
    /// The SPIFFE trust domain of the mesh's identities.
    pub trust_domain: String,
}

/// `(namespace, service name)`.
pub type ServiceKey = (String, String);
/// `(namespace, slice name)`; ordered so that one namespace's slices are a contiguous range.
type SliceKey = (String, String);

type EventStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

/// What an endpoint is expected to present, as far as the source can tell.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// No identity to check (not a Pod, or Pods cannot be read): plaintext.
    Plain,
    /// mTLS, and the peer must present exactly this identity.
    Identity(SpiffeId),
    /// A Pod whose service account is not known yet: not published until it is.
    Withhold,
}

impl KubeSource {
    /// Runs until the task is dropped; watch errors are logged and retried with backoff.
    pub async fn run(self, registry: Arc<Registry>, synced: watch::Sender<bool>) {
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
        let mut pods = state.identities.is_some().then(|| pod_events(&self.client));
        let mut slices = slice_events(&self.client);
        loop {
            tokio::select! {
                ev = slices.next() => match ev {
                    Some(Ok(ev)) => state.on_slice(ev, &registry, &synced),
                    Some(Err(e)) => tracing::warn!(error = %describe_watch(&e),
                        "EndpointSlice watch failed; retrying with backoff"),
                    None => {
                        // The watcher retries forever, so this is not expected; start over.
                        tracing::warn!("EndpointSlice watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        slices = slice_events(&self.client);
                    }
                },
                ev = next_or_pending(&mut pods) => match ev {
                    Some(Ok(ev)) => state.on_pod(ev, &registry, &synced),
                    Some(Err(e)) => tracing::warn!(error = %describe_watch(&e),
                        "Pod watch failed; retrying with backoff"),
                    None => {
                        tracing::warn!("Pod watch ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        pods = Some(pod_events(&self.client));
                    }
                },
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

fn pod_events(client: &kube::Client) -> EventStream<Pod> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    Box::pin(
        watcher::watcher(Api::<Pod>::all(client.clone()), config)
            // Only the service account is read; a whole Pod is kilobytes, times every Pod.
            .modify(|p| {
                let service_account_name = p.spec.take().and_then(|s| s.service_account_name);
                p.spec = Some(PodSpec {
                    service_account_name,
                    ..PodSpec::default()
                });
                p.status = None;
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
                p.metadata.labels = None;
                p.metadata.owner_references = None;
            })
            .default_backoff(),
    )
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
            Ok(id) => Expect::Identity(id),
            Err(e) => {
                tracing::debug!(error = %e, pod = name, ns, "no identity for this Pod's service account");
                Expect::Withhold
            }
        }
    }
}

/// The source's state between events.
struct State {
    cluster_domain: String,
    identities: Option<Identities>,
    /// Every slice with a service label, as last seen.
    slices: BTreeMap<SliceKey, EndpointSlice>,
    /// A re-list in progress (`Init` … `InitDone`).
    relist: Option<BTreeMap<SliceKey, EndpointSlice>>,
    /// The names each service published last, so that names it no longer has are deleted.
    published: HashMap<ServiceKey, BTreeSet<String>>,
    slices_listed: bool,
    /// The registry follows the cache (slices listed, and Pods too when they are followed).
    live: bool,
}

impl State {
    fn new(cluster_domain: String, identities: Option<Identities>) -> Self {
        State {
            cluster_domain,
            identities,
            slices: BTreeMap::new(),
            relist: None,
            published: HashMap::new(),
            slices_listed: false,
            live: false,
        }
    }

    fn expect(&self, slice_ns: &str, ep: &Endpoint) -> Expect {
        match &self.identities {
            Some(ids) => ids.expect(slice_ns, ep),
            None => Expect::Plain,
        }
    }

    fn on_slice(
        &mut self,
        ev: Event<EndpointSlice>,
        registry: &Registry,
        synced: &watch::Sender<bool>,
    ) {
        match ev {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(s) => {
                if let (Some(buf), Some(key)) = (&mut self.relist, slice_key(&s))
                    && service_of(&s).is_some()
                {
                    buf.insert(key, s);
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.relist.take() {
                    self.slices = listed;
                }
                if !self.slices_listed {
                    tracing::info!(slices = self.slices.len(), "EndpointSlices listed");
                }
                self.slices_listed = true;
                let was_live = self.live;
                self.go_live(registry, synced);
                if was_live {
                    self.publish_all(registry);
                }
            }
            Event::Apply(s) => {
                let Some(key) = slice_key(&s) else { return };
                let old = self.slices.get(&key).and_then(service_of);
                let new = service_of(&s);
                // A slice whose label went away is no longer one of ours.
                match new {
                    Some(_) => self.slices.insert(key, s),
                    None => self.slices.remove(&key),
                };
                self.recompute_changed(old, new, registry);
            }
            Event::Delete(s) => {
                let Some(key) = slice_key(&s) else { return };
                let old = self
                    .slices
                    .remove(&key)
                    .and_then(|s| service_of(&s))
                    .or_else(|| service_of(&s));
                self.recompute_changed(old, None, registry);
            }
        }
    }

    fn on_pod(&mut self, ev: Event<Pod>, registry: &Registry, synced: &watch::Sender<bool>) {
        let Some(ids) = &mut self.identities else {
            return;
        };
        // A Pod's service account cannot change, so only a Pod seen for the first time can
        // give a withheld endpoint its identity.
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
                let was_live = self.live;
                self.go_live(registry, synced);
                // A re-list may have brought Pods missed while the watch was down.
                if was_live {
                    self.publish_all(registry);
                }
            }
            Event::Apply(_) if self.live => {
                if let Some((ns, pod)) = appeared {
                    for key in self.services_referring_to(&ns, &pod) {
                        self.recompute(&key, registry);
                    }
                }
            }
            _ => {}
        }
    }

    /// Publishes the whole table the first time everything needed is listed.
    fn go_live(&mut self, registry: &Registry, synced: &watch::Sender<bool>) {
        let pods_listed = self.identities.as_ref().is_none_or(|i| i.listed);
        if self.live || !self.slices_listed || !pods_listed {
            if self.slices_listed && !pods_listed {
                tracing::info!(
                    "EndpointSlices listed; waiting for the Pod list before publishing, so endpoints carry their identity"
                );
            }
            return;
        }
        self.live = true;
        self.publish_all(registry);
        tracing::info!(services = self.published.len(), "EndpointSlices published");
        synced.send_replace(true);
    }

    fn publish_all(&mut self, registry: &Registry) {
        let (table, published) = table(self.slices.values(), &self.cluster_domain, |ns, ep| {
            self.expect(ns, ep)
        });
        self.published = published;
        registry.replace_all(table);
    }

    fn recompute_changed(
        &mut self,
        old: Option<ServiceKey>,
        new: Option<ServiceKey>,
        registry: &Registry,
    ) {
        if !self.live {
            return;
        }
        if let Some(old) = &old {
            self.recompute(old, registry);
        }
        if let Some(new) = new
            && Some(&new) != old.as_ref()
        {
            self.recompute(&new, registry);
        }
    }

    /// The slices of one namespace.
    fn in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices
            .range((ns.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == ns)
            .map(|(_, s)| s)
    }

    fn services_referring_to(&self, ns: &str, pod: &str) -> BTreeSet<ServiceKey> {
        self.in_namespace(ns)
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

    /// Publishes one service from the cache, deleting the names it no longer has.
    fn recompute(&mut self, key: &ServiceKey, registry: &Registry) {
        let (ns, svc) = key;
        let slices: Vec<&EndpointSlice> = self
            .in_namespace(ns)
            .filter(|s| service_of(s).is_some_and(|(_, n)| &n == svc))
            .collect();
        let exists = !slices.is_empty();
        let table = service_table(ns, svc, slices, &self.cluster_domain, |ns, ep| {
            self.expect(ns, ep)
        });
        let names: BTreeSet<String> = table.keys().cloned().collect();
        for gone in self
            .published
            .remove(key)
            .unwrap_or_default()
            .difference(&names)
        {
            registry.set(gone, None);
        }
        for (name, eps) in table {
            registry.set(&name, Some(eps));
        }
        if exists {
            self.published.insert(key.clone(), names);
        }
    }
}

fn slice_key(s: &EndpointSlice) -> Option<SliceKey> {
    Some((s.metadata.namespace.clone()?, s.metadata.name.clone()?))
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

/// Ready and not terminating; missing conditions mean ready and not terminating (API docs).
fn takes_traffic(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    c.and_then(|c| c.ready).unwrap_or(true) && !c.and_then(|c| c.terminating).unwrap_or(false)
}

/// The TCP port numbers of a slice; unset ports ("all ports") and other protocols carry no
/// `host:port` the proxy can serve.
fn tcp_ports(s: &EndpointSlice) -> BTreeSet<u16> {
    s.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.port?).ok().filter(|&p| p != 0))
        .collect()
}

/// The names one service's slices publish, each with its endpoints (sorted, one per address).
/// A port with no usable endpoint maps to an empty list.
pub fn service_table<'a>(
    ns: &str,
    svc: &str,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    cluster_domain: &str,
    expect: impl Fn(&str, &Endpoint) -> Expect,
) -> Table {
    let mut sets: BTreeMap<u16, BTreeMap<SocketAddr, EndpointSpec>> = BTreeMap::new();
    for slice in slices {
        let ports = tcp_ports(slice);
        for &port in &ports {
            sets.entry(port).or_default();
        }
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for ep in slice.endpoints.iter().filter(|ep| takes_traffic(ep)) {
            let identity = match expect(ns, ep) {
                Expect::Plain => None,
                Expect::Identity(id) => Some(id),
                Expect::Withhold => continue,
            };
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                for &port in &ports {
                    let addr = SocketAddr::new(ip, port);
                    sets.entry(port).or_default().insert(
                        addr,
                        EndpointSpec {
                            addr,
                            weight: 1,
                            identity: identity.clone(),
                        },
                    );
                }
            }
        }
    }
    sets.into_iter()
        .map(|(port, eps)| {
            (
                authority(ns, svc, cluster_domain, port),
                eps.into_values().collect(),
            )
        })
        .collect()
}

/// The whole table from a set of slices, and the names each service published.
pub fn table<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    cluster_domain: &str,
    expect: impl Fn(&str, &Endpoint) -> Expect,
) -> (Table, HashMap<ServiceKey, BTreeSet<String>>) {
    let mut by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(key) = service_of(s) {
            by_service.entry(key).or_default().push(s);
        }
    }
    let mut all = Table::new();
    let mut published = HashMap::new();
    for ((ns, svc), slices) in by_service {
        let t = service_table(&ns, &svc, slices, cluster_domain, &expect);
        published.insert((ns, svc), t.keys().cloned().collect());
        all.extend(t);
    }
    (all, published)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const WEB: &str = "web.shop.svc.cluster.local:8080";

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

    fn slice(name: &str, svc: &str, ports: &[i32], endpoints: Vec<Endpoint>) -> EndpointSlice {
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
                    .map(|&p| EndpointPort {
                        name: Some(format!("p{p}")),
                        port: Some(p),
                        protocol: Some("TCP".into()),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        }
    }

    fn addrs(t: &Table, name: &str) -> Vec<String> {
        t[name].iter().map(|e| e.addr.to_string()).collect()
    }

    fn plain(_: &str, _: &Endpoint) -> Expect {
        Expect::Plain
    }

    #[test]
    fn ready_endpoints_times_ports() {
        let s = slice(
            "web-1",
            "web",
            &[8080, 9090],
            vec![ep("10.0.0.1", Some(true), None), ep("10.0.0.2", None, None)],
        );
        let (t, published) = table([&s], "cluster.local", plain);
        assert_eq!(addrs(&t, WEB), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            addrs(&t, "web.shop.svc.cluster.local:9090"),
            ["10.0.0.1:9090", "10.0.0.2:9090"]
        );
        assert!(t[WEB].iter().all(|e| e.weight == 1 && e.identity.is_none()));
        assert_eq!(published[&("shop".into(), "web".into())].len(), 2);
    }

    #[test]
    fn not_ready_and_terminating_endpoints_get_no_traffic() {
        let s = slice(
            "web-1",
            "web",
            &[8080],
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
        let (t, _) = table([&s], "cluster.local", plain);
        assert_eq!(
            addrs(&t, WEB),
            ["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.5:8080"]
        );
    }

    #[test]
    fn no_usable_endpoint_is_an_empty_set_not_a_missing_service() {
        let s = slice(
            "web-1",
            "web",
            &[8080],
            vec![ep("10.0.0.2", Some(false), None)],
        );
        let (t, _) = table([&s], "cluster.local", plain);
        assert!(t[WEB].is_empty());
    }

    #[test]
    fn slices_of_one_service_are_joined_each_with_its_own_ports() {
        let a = slice("web-1", "web", &[8080], vec![ep("10.0.0.1", None, None)]);
        let b = slice(
            "web-2",
            "web",
            &[8080],
            vec![ep("10.0.0.2", None, None), ep("10.0.0.1", None, None)],
        );
        // A rollout to a new target port: its endpoints publish under their own number.
        let c = slice("web-3", "web", &[8081], vec![ep("10.0.0.3", None, None)]);
        let other = slice("api-1", "api", &[8080], vec![ep("10.0.1.1", None, None)]);
        let (t, _) = table([&a, &b, &c, &other], "cluster.local", plain);
        assert_eq!(addrs(&t, WEB), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            addrs(&t, "web.shop.svc.cluster.local:8081"),
            ["10.0.0.3:8081"]
        );
        assert_eq!(
            addrs(&t, "api.shop.svc.cluster.local:8080"),
            ["10.0.1.1:8080"]
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn fqdn_slices_other_protocols_and_bad_data_are_skipped() {
        let mut fqdn = slice("web-1", "web", &[8080], vec![ep("example.com", None, None)]);
        fqdn.address_type = "FQDN".into();
        let mut udp = slice("dns-1", "dns", &[53], vec![ep("10.0.0.9", None, None)]);
        udp.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let mut no_port = slice("x-1", "x", &[], vec![ep("10.0.0.8", None, None)]);
        no_port
            .ports
            .as_mut()
            .unwrap()
            .push(EndpointPort::default());
        let v6 = EndpointSlice {
            address_type: "IPv6".into(),
            ..slice(
                "v6-1",
                "v6",
                &[80, 70000],
                vec![ep("fd00::1", None, None), ep("not-an-ip", None, None)],
            )
        };
        let mut unlabelled = slice("y-1", "y", &[80], vec![ep("10.0.0.7", None, None)]);
        unlabelled.metadata.labels = None;
        let (t, _) = table(
            [&fqdn, &udp, &no_port, &v6, &unlabelled],
            "cluster.local",
            plain,
        );
        // The FQDN slice still says the service exists, with nothing to reach.
        assert!(t[WEB].is_empty());
        assert_eq!(addrs(&t, "v6.shop.svc.cluster.local:80"), ["[fd00::1]:80"]);
        assert_eq!(t.len(), 2, "{t:?}");
    }

    #[test]
    fn expectations_give_identities_or_withhold() {
        let s = slice(
            "web-1",
            "web",
            &[8080],
            vec![
                pod_ep("10.0.0.1", "known"),
                pod_ep("10.0.0.2", "unknown"),
                ep("10.0.0.3", None, None),
            ],
        );
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let (t, _) = table([&s], "cluster.local", |ns, ep| {
            assert_eq!(ns, "shop");
            match ep.target_ref.as_ref().and_then(|t| t.name.as_deref()) {
                Some("known") => Expect::Identity(id.clone()),
                Some(_) => Expect::Withhold,
                None => Expect::Plain,
            }
        });
        assert_eq!(addrs(&t, WEB), ["10.0.0.1:8080", "10.0.0.3:8080"]);
        assert_eq!(t[WEB][0].identity.as_ref(), Some(&id));
        assert_eq!(t[WEB][1].identity, None);
    }

    fn synced() -> watch::Sender<bool> {
        watch::channel(false).0
    }

    fn listed(
        state: &mut State,
        r: &Registry,
        tx: &watch::Sender<bool>,
        slices: Vec<EndpointSlice>,
    ) {
        state.on_slice(Event::Init, r, tx);
        for s in slices {
            state.on_slice(Event::InitApply(s), r, tx);
        }
        state.on_slice(Event::InitDone, r, tx);
    }

    fn registry_addrs(r: &Registry, name: &str) -> Option<Vec<String>> {
        r.get(name)
            .map(|s| s.keys().map(|a| a.to_string()).collect())
    }

    #[test]
    fn events_update_only_what_they_touch_and_relists_replace_everything() {
        let r = Registry::new();
        let tx = synced();
        let mut state = State::new("cluster.local".into(), None);
        let web = slice("web-1", "web", &[8080], vec![ep("10.0.0.1", None, None)]);
        listed(&mut state, &r, &tx, vec![web.clone()]);
        assert!(*tx.borrow());
        assert_eq!(registry_addrs(&r, WEB).unwrap(), ["10.0.0.1:8080"]);

        // The port changes: the old name is deleted, the new one published.
        state.on_slice(
            Event::Apply(slice(
                "web-1",
                "web",
                &[9090],
                vec![ep("10.0.0.1", None, None)],
            )),
            &r,
            &tx,
        );
        assert!(r.get(WEB).is_none());
        assert_eq!(
            registry_addrs(&r, "web.shop.svc.cluster.local:9090").unwrap(),
            ["10.0.0.1:9090"]
        );

        // Not ready: empty but present.
        state.on_slice(
            Event::Apply(slice(
                "web-1",
                "web",
                &[9090],
                vec![ep("10.0.0.1", Some(false), None)],
            )),
            &r,
            &tx,
        );
        assert_eq!(
            registry_addrs(&r, "web.shop.svc.cluster.local:9090").unwrap(),
            Vec::<String>::new()
        );

        // The label moves the slice to another service: both are recomputed.
        state.on_slice(
            Event::Apply(slice(
                "web-1",
                "api",
                &[9090],
                vec![ep("10.0.0.1", None, None)],
            )),
            &r,
            &tx,
        );
        assert!(r.get("web.shop.svc.cluster.local:9090").is_none());
        assert_eq!(
            registry_addrs(&r, "api.shop.svc.cluster.local:9090").unwrap(),
            ["10.0.0.1:9090"]
        );

        // Deleted: no such service.
        state.on_slice(
            Event::Delete(slice("web-1", "api", &[9090], vec![])),
            &r,
            &tx,
        );
        assert!(r.get("api.shop.svc.cluster.local:9090").is_none());
        assert_eq!(r.services(), 0);

        // A re-list (after 410 Gone) swaps the table in whole.
        state.on_slice(Event::Apply(web.clone()), &r, &tx);
        let other = slice("db-1", "db", &[5432], vec![ep("10.0.2.1", None, None)]);
        state.on_slice(Event::Init, &r, &tx);
        state.on_slice(Event::InitApply(other), &r, &tx);
        // Nothing changes until the list is complete.
        assert!(r.get(WEB).is_some());
        state.on_slice(Event::InitDone, &r, &tx);
        assert!(r.get(WEB).is_none());
        assert_eq!(
            registry_addrs(&r, "db.shop.svc.cluster.local:5432").unwrap(),
            ["10.0.2.1:5432"]
        );
        // Deleting a slice that was listed by the re-list works off the new cache.
        state.on_slice(Event::Delete(slice("db-1", "db", &[], vec![])), &r, &tx);
        assert_eq!(r.services(), 0);
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
        let r = Registry::new();
        let tx = synced();
        let (store, writer) = reflector::store();
        let mut state = State::new(
            "cluster.local".into(),
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
            &[8080],
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
        let s2 = slice("web-2", "web", &[8080], vec![elsewhere]);
        listed(&mut state, &r, &tx, vec![s, s2]);
        // Slices are in, Pods are not: nothing is published yet, and not ready.
        assert!(r.get(WEB).is_none());
        assert!(!*tx.borrow());

        state.on_pod(Event::Init, &r, &tx);
        state.on_pod(Event::InitApply(pod("web-a", Some("web"))), &r, &tx);
        state.on_pod(Event::InitDone, &r, &tx);
        assert!(*tx.borrow());
        let set = r.get(WEB).unwrap();
        // web-b's Pod is unknown: withheld, not published without identity.
        assert_eq!(set.len(), 2);
        let a = &set[&"10.0.0.1:8080".parse().unwrap()];
        assert_eq!(
            a.identity.as_ref().unwrap().to_string(),
            "spiffe://example.org/ns/shop/sa/web"
        );
        assert!(set[&"10.0.0.3:8080".parse().unwrap()].identity.is_none());

        // web-b appears (no service account named: `default`) and its endpoint follows.
        state.on_pod(Event::Apply(pod("web-b", None)), &r, &tx);
        let set = r.get(WEB).unwrap();
        let b = &set[&"10.0.0.2:8080".parse().unwrap()];
        assert_eq!(
            b.identity.as_ref().unwrap().to_string(),
            "spiffe://example.org/ns/shop/sa/default"
        );
    }

    #[test]
    fn api_errors_are_described_briefly() {
        let status = kube::core::Status::failure(&format!("{}\nmore", "x".repeat(300)), "NotFound")
            .with_code(404);
        let d = describe(&kube::Error::Api(status.boxed()));
        assert!(d.starts_with("HTTP 404 NotFound: xxx"), "{d}");
        assert!(d.chars().count() <= 220 && !d.contains("more"), "{d}");
    }
}

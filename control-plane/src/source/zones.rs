//! Which zone every pod is in, so a proxy learns its own from the control plane with no knob:
//! a Pod's IPs and node (from the Pod watch the identities already need) and each Node's
//! `topology.kubernetes.io/zone` label. The registry answers `zone_of(ip)` from these for any
//! pod — one no Service selects (a Job), or one not ready yet when its app opens its first
//! connections — and falls back to the EndpointSlice `zone` of the endpoint at that address
//! where the Nodes cannot be read.

use std::net::IpAddr;
use std::pin::Pin;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_stream::Stream;

use crate::registry::Registry;

/// The well-known zone label, and its deprecated predecessor (still set by older clusters).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

type EventStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

pub(crate) fn node_events(client: &kube::Client) -> EventStream<Node> {
    let config = watcher::Config {
        bookmarks: true,
        ..watcher::Config::default()
    };
    Box::pin(
        watcher::watcher(Api::<Node>::all(client.clone()), config)
            // Only the zone label is read; a Node's status (images, conditions) is the bulk.
            .modify(|n| {
                let zone = node_zone(n);
                n.metadata.labels = zone.map(|z| [(ZONE_LABEL.to_string(), z)].into());
                n.metadata.annotations = None;
                n.metadata.managed_fields = None;
                n.spec = None;
                n.status = None;
            })
            .default_backoff(),
    )
}

/// A Node's zone label, when it is a zone name.
pub(crate) fn node_zone(n: &Node) -> Option<String> {
    let labels = n.metadata.labels.as_ref()?;
    labels
        .get(ZONE_LABEL)
        .or_else(|| labels.get(LEGACY_ZONE_LABEL))
        .filter(|z| remora_certs::is_zone_name(z))
        .cloned()
}

/// A Pod's key (`namespace/name`), IPs and node; the IPs are empty until it has one.
pub(crate) fn placement(p: &Pod) -> Option<(String, Vec<IpAddr>, Option<String>)> {
    let key = format!(
        "{}/{}",
        p.metadata.namespace.as_deref()?,
        p.metadata.name.as_deref()?
    );
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|i| i.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    // A host-network Pod has its node's IP, which many such Pods share: not its own.
    let host_network = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network {
        ips.clear();
    }
    ips.truncate(2);
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    Some((key, ips, node))
}

/// What the Pod watch's trimming keeps for [`placement`] (the rest is dropped to save memory).
pub(crate) fn trim_pod_status(p: &mut Pod) {
    p.status = p
        .status
        .take()
        .map(|s| k8s_openapi::api::core::v1::PodStatus {
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            ..Default::default()
        });
}

/// Follows Pod and Node events into the registry's zone index, buffering re-lists. The
/// default watches no Nodes (nothing to wait for).
pub(crate) struct Zones {
    pod_relist: Option<Vec<(String, IpAddr, String)>>,
    node_relist: Option<Vec<(String, String)>>,
    /// Nodes listed once, or known not to be readable: until then the source does not
    /// publish, so the first watch of every proxy already learns its zone.
    nodes_settled: bool,
}

impl Default for Zones {
    fn default() -> Self {
        Zones::new(false)
    }
}

impl Zones {
    /// `watching_nodes`: a Node watch runs (else there is nothing to wait for).
    pub(crate) fn new(watching_nodes: bool) -> Self {
        Zones {
            pod_relist: None,
            node_relist: None,
            nodes_settled: !watching_nodes,
        }
    }

    pub(crate) fn nodes_settled(&self) -> bool {
        self.nodes_settled
    }

    /// The Node watch failed (no permission, no API): proxies learn their zone from their
    /// EndpointSlice entries instead, and publishing must not wait. True when newly settled.
    pub(crate) fn settle_nodes(&mut self) -> bool {
        !std::mem::replace(&mut self.nodes_settled, true)
    }

    pub(crate) fn on_pod(&mut self, ev: &Event<Pod>, registry: &Registry) {
        match ev {
            Event::Init => self.pod_relist = Some(Vec::new()),
            Event::InitApply(p) => {
                if let (Some(list), Some((key, ips, Some(node)))) =
                    (self.pod_relist.as_mut(), placement(p))
                {
                    list.extend(ips.into_iter().map(|ip| (key.clone(), ip, node.clone())));
                }
            }
            Event::InitDone => {
                if let Some(list) = self.pod_relist.take() {
                    registry.replace_pods(list);
                }
            }
            Event::Apply(p) => {
                if let Some((key, ips, node)) = placement(p) {
                    registry.set_pod(&key, &ips, node.as_deref());
                }
            }
            Event::Delete(p) => {
                if let Some((key, _, _)) = placement(p) {
                    registry.set_pod(&key, &[], None);
                }
            }
        }
    }

    pub(crate) fn on_node(&mut self, ev: Event<Node>, registry: &Registry) {
        let name = |n: &Node| n.metadata.name.clone();
        match ev {
            Event::Init => self.node_relist = Some(Vec::new()),
            Event::InitApply(n) => {
                if let (Some(list), Some(name), Some(zone)) =
                    (self.node_relist.as_mut(), name(&n), node_zone(&n))
                {
                    list.push((name, zone));
                }
            }
            Event::InitDone => {
                if let Some(list) = self.node_relist.take() {
                    registry.replace_node_zones(list);
                }
                self.nodes_settled = true;
            }
            Event::Apply(n) => {
                if let Some(name) = name(&n) {
                    registry.set_node_zone(&name, node_zone(&n));
                }
            }
            Event::Delete(n) => {
                if let Some(name) = name(&n) {
                    registry.set_node_zone(&name, None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, node: &str, host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "hostNetwork": host_network, "containers": []},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .expect("pod")
    }

    fn node(name: &str, labels: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .expect("node")
    }

    #[test]
    fn pods_get_their_nodes_zone_through_events_and_relists() {
        let r = Registry::new();
        let mut z = Zones::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        z.on_node(Event::Init, &r);
        z.on_node(
            Event::InitApply(node("n1", serde_json::json!({ZONE_LABEL: "eu-1a"}))),
            &r,
        );
        z.on_node(
            Event::InitApply(node("n2", serde_json::json!({LEGACY_ZONE_LABEL: "eu-1b"}))),
            &r,
        );
        z.on_node(
            Event::InitApply(node("n3", serde_json::json!({ZONE_LABEL: "not a zone"}))),
            &r,
        );
        z.on_node(Event::InitDone, &r);
        z.on_pod(&Event::Apply(pod("job", "10.0.0.5", "n1", false)), &r);
        z.on_pod(&Event::Apply(pod("web", "10.0.0.6", "n2", false)), &r);
        z.on_pod(&Event::Apply(pod("odd", "10.0.0.7", "n3", false)), &r);
        z.on_pod(&Event::Apply(pod("agent", "192.168.1.1", "n1", true)), &r);
        assert_eq!(r.zone_of(ip("10.0.0.5")).as_deref(), Some("eu-1a"));
        assert_eq!(r.zone_of(ip("10.0.0.6")).as_deref(), Some("eu-1b"));
        assert_eq!(r.zone_of(ip("10.0.0.7")), None, "not a zone name");
        assert_eq!(r.zone_of(ip("192.168.1.1")), None, "host network");
        z.on_pod(&Event::Delete(pod("job", "10.0.0.5", "n1", false)), &r);
        assert_eq!(r.zone_of(ip("10.0.0.5")), None);
        z.on_node(Event::Apply(node("n2", serde_json::json!({}))), &r);
        assert_eq!(r.zone_of(ip("10.0.0.6")), None, "label removed");
        // A Pod re-list replaces the placements.
        z.on_pod(&Event::Init, &r);
        z.on_pod(&Event::InitApply(pod("new", "10.0.0.8", "n1", false)), &r);
        assert_eq!(r.zone_of(ip("10.0.0.8")), None, "not before InitDone");
        z.on_pod(&Event::InitDone, &r);
        assert_eq!(r.zone_of(ip("10.0.0.8")).as_deref(), Some("eu-1a"));
        assert_eq!(r.zone_of(ip("10.0.0.6")), None, "gone in the re-list");
    }

    /// Publishing waits for the Nodes when they are watched: listed, or known unreadable.
    #[test]
    fn nodes_settle_once_listed_or_refused() {
        let r = Registry::new();
        assert!(
            Zones::default().nodes_settled(),
            "no Node watch: nothing to wait for"
        );
        let mut z = Zones::new(true);
        assert!(!z.nodes_settled());
        z.on_node(Event::Init, &r);
        assert!(!z.nodes_settled(), "not before the list is complete");
        z.on_node(Event::InitDone, &r);
        assert!(z.nodes_settled());
        let mut refused = Zones::new(true);
        assert!(refused.settle_nodes(), "newly settled by an error");
        assert!(!refused.settle_nodes(), "once");
    }
}

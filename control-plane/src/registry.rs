//! The service table every source writes and every `Watch` reads: service name (`host:port`)
//! → its endpoints (or, for a Kubernetes ExternalName Service, another name to resolve through
//! DNS), or "no such service". The same type keys ClusterIP:port addresses in a second table.
//!
//! Each service is a `tokio::sync::watch` channel: a subscriber always sees the latest set and
//! never a queue of stale ones, so a slow proxy cannot make the control plane buffer without
//! bound, and bursts of changes collapse into one delta.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use remora_certs::{EndpointSpec, Policy};
use tokio::sync::watch;

/// A service's endpoints, keyed by address.
pub type EndpointSet = Arc<BTreeMap<SocketAddr, EndpointSpec>>;

/// What a known name stands for. `None` in a channel means "no such service".
#[derive(Clone, Debug, PartialEq)]
pub enum Published {
    /// The endpoints, and the policy callers apply to requests to them.
    Endpoints(EndpointSet, Arc<Policy>),
    /// Another name, resolved by the caller through DNS (an ExternalName Service).
    Alias(Arc<str>),
}

impl Published {
    /// Endpoints without a policy.
    pub fn endpoints(eps: Vec<EndpointSpec>) -> Self {
        Published::Endpoints(to_set(eps), Arc::default())
    }

    /// Endpoints and the policy that goes with them.
    pub fn with_policy(eps: Vec<EndpointSpec>, policy: Policy) -> Self {
        Published::Endpoints(to_set(eps), Arc::new(policy))
    }

    /// The policy (the default for an alias).
    pub fn policy(&self) -> Option<&Policy> {
        match self {
            Published::Endpoints(_, p) => Some(p),
            Published::Alias(_) => None,
        }
    }

    /// The endpoint set, or `None` for an alias.
    pub fn set(&self) -> Option<&EndpointSet> {
        match self {
            Published::Endpoints(s, _) => Some(s),
            Published::Alias(_) => None,
        }
    }
}

impl From<Vec<EndpointSpec>> for Published {
    fn from(eps: Vec<EndpointSpec>) -> Self {
        Published::endpoints(eps)
    }
}

/// What one source knows: service name → what it publishes.
pub type Table = HashMap<String, Published>;

type Channels = HashMap<String, watch::Sender<Option<Published>>>;

#[derive(Default)]
pub struct Registry {
    services: Mutex<Channels>,
    /// The zone of each endpoint published under its own address (the Kubernetes source's
    /// pod-address entries), so the control plane can tell a watching proxy its zone from the
    /// address it connects from instead of asking for a knob.
    zones: Mutex<BTreeMap<SocketAddr, String>>,
    /// Where pods run (pod IP → its Pod and node) and each node's zone (Kubernetes source):
    /// the zone of any pod, selected by a Service or not, ready or not. Preferred to `zones`.
    nodes: Mutex<NodeZones>,
}

/// Pod IP → (the Pod, its node); node → zone.
#[derive(Default)]
struct NodeZones {
    pods: HashMap<IpAddr, (Arc<str>, Arc<str>)>,
    /// The IPs each Pod was last seen with, so an update touches only its own entries.
    ips: HashMap<Arc<str>, Vec<IpAddr>>,
    zones: HashMap<Arc<str>, String>,
}

/// The zone of the endpoint `name` publishes under its own address, if it is one.
fn own_zone(name: &str, published: Option<&Published>) -> Option<(SocketAddr, Option<String>)> {
    let addr: SocketAddr = name.parse().ok()?;
    let zone = published
        .and_then(Published::set)
        .and_then(|set| set.get(&addr))
        .and_then(|e| e.locality.zone.clone());
    Some((addr, zone))
}

fn to_set(eps: Vec<EndpointSpec>) -> EndpointSet {
    Arc::new(eps.into_iter().map(|e| (e.addr, e)).collect())
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows `name` (normalised `host:port`); the receiver holds `None` while the service
    /// does not exist.
    pub fn subscribe(&self, name: &str) -> watch::Receiver<Option<Published>> {
        let mut map = self.lock();
        match map.get(name) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(None);
                map.insert(name.to_string(), tx);
                rx
            }
        }
    }

    /// Sets one service (`None` deletes it). Subscribers are woken only if something changed.
    pub fn set(&self, name: &str, endpoints: Option<Vec<EndpointSpec>>) {
        self.publish(name, endpoints.map(Published::endpoints));
    }

    fn lock_zones(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, String>> {
        self.zones.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, NodeZones> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the Pod `pod` (`namespace/name`) has `ips` and runs on `node`; `None`
    /// forgets it (an IP now another Pod's stays that one's).
    pub fn set_pod(&self, pod: &str, ips: &[IpAddr], node: Option<&str>) {
        let mut n = self.lock_nodes();
        for old in n.ips.remove(pod).unwrap_or_default() {
            if n.pods.get(&old).is_some_and(|(p, _)| &**p == pod) {
                n.pods.remove(&old);
            }
        }
        if let Some(node) = node.filter(|_| !ips.is_empty()) {
            let (pod, node): (Arc<str>, Arc<str>) = (pod.into(), node.into());
            for ip in ips {
                n.pods.insert(*ip, (pod.clone(), node.clone()));
            }
            n.ips.insert(pod, ips.to_vec());
        }
    }

    /// Replaces every Pod placement (a re-list): `(pod, ip, node)`.
    pub fn replace_pods(&self, pods: Vec<(String, IpAddr, String)>) {
        let mut n = self.lock_nodes();
        n.pods.clear();
        n.ips.clear();
        for (pod, ip, node) in pods {
            let pod: Arc<str> = pod.into();
            n.ips.entry(pod.clone()).or_default().push(ip);
            n.pods.insert(ip, (pod, node.into()));
        }
    }

    /// Sets a node's zone (`None`: the node is gone or has no zone label).
    pub fn set_node_zone(&self, node: &str, zone: Option<String>) {
        let mut n = self.lock_nodes();
        match zone {
            Some(z) => n.zones.insert(node.into(), z),
            None => n.zones.remove(node),
        };
    }

    /// Replaces every node's zone (a re-list).
    pub fn replace_node_zones(&self, zones: Vec<(String, String)>) {
        self.lock_nodes().zones = zones.into_iter().map(|(n, z)| (n.into(), z)).collect();
    }

    /// The zone of whoever is at `ip`: its Pod's node's zone, else the zone of the endpoints
    /// published at `ip` (any port); `None` when unknown or when those disagree.
    pub fn zone_of(&self, ip: IpAddr) -> Option<String> {
        {
            let n = self.lock_nodes();
            if let Some(zone) = n.pods.get(&ip).and_then(|(_, node)| n.zones.get(node)) {
                return Some(zone.clone());
            }
        }
        let zones = self.lock_zones();
        let mut found = zones
            .range(SocketAddr::new(ip, 0)..=SocketAddr::new(ip, u16::MAX))
            .map(|(_, z)| z);
        let first = found.next()?;
        found.all(|z| z == first).then(|| first.clone())
    }

    /// Sets one name to what it publishes (`None` deletes it).
    pub fn publish(&self, name: &str, next: Option<Published>) {
        if let Some((addr, zone)) = own_zone(name, next.as_ref()) {
            let mut zones = self.lock_zones();
            match zone {
                Some(z) => zones.insert(addr, z),
                None => zones.remove(&addr),
            };
        }
        let mut map = self.lock();
        match map.get(name) {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    if *cur == next {
                        return false;
                    }
                    *cur = next;
                    true
                });
                if tx.borrow().is_none() && tx.receiver_count() == 0 {
                    map.remove(name);
                }
            }
            None if next.is_some() => {
                map.insert(name.to_string(), watch::channel(next).0);
            }
            None => {}
        }
    }

    /// Replaces everything a whole-table source knows (the file source, a Kubernetes re-list):
    /// services missing from `table` are deleted.
    pub fn replace_all(&self, mut table: Table) {
        *self.lock_zones() = table
            .iter()
            .filter_map(|(name, p)| match own_zone(name, Some(p))? {
                (addr, Some(zone)) => Some((addr, zone)),
                _ => None,
            })
            .collect();
        let mut map = self.lock();
        map.retain(|name, tx| {
            let next = table.remove(name);
            tx.send_if_modified(|cur| {
                if *cur == next {
                    return false;
                }
                *cur = next;
                true
            });
            // Forget unknown names nobody follows, so lookups of junk names cannot grow memory.
            tx.borrow().is_some() || tx.receiver_count() > 0
        });
        for (name, published) in table {
            map.insert(name, watch::channel(Some(published)).0);
        }
    }

    /// Known services (those with a set, possibly empty).
    pub fn services(&self) -> usize {
        self.lock()
            .values()
            .filter(|tx| tx.borrow().is_some())
            .count()
    }

    /// Forgets unknown names whose last subscriber has gone.
    pub fn release(&self, name: &str) {
        let mut map = self.lock();
        if let Some(tx) = map.get(name)
            && tx.borrow().is_none()
            && tx.receiver_count() == 0
        {
            map.remove(name);
        }
    }

    /// Names in the table, known or followed (tests: nothing may accumulate).
    pub fn names(&self) -> usize {
        self.lock().len()
    }

    /// The current set of `name` (tests, `remora check`).
    pub fn get(&self, name: &str) -> Option<EndpointSet> {
        self.lookup(name).and_then(|p| p.set().cloned())
    }

    /// What `name` publishes now.
    pub fn lookup(&self, name: &str) -> Option<Published> {
        self.lock().get(name).and_then(|tx| tx.borrow().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(a: &str) -> EndpointSpec {
        EndpointSpec {
            addr: a.parse().unwrap(),
            weight: 1,
            identity: None,
            opaque: false,
            quic: None,
            locality: Default::default(),
        }
    }

    /// The zone index answers for endpoints published under their own address, follows
    /// updates and re-lists, and says nothing when the endpoints at one IP disagree.
    #[test]
    fn zone_of_an_ip_follows_its_own_address_entries() {
        let zoned = |a: &str, z: &str| {
            let mut e = ep(a);
            e.locality = remora_certs::Locality::zone(z);
            Some(Published::endpoints(vec![e]))
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let r = Registry::new();
        r.publish("10.0.0.1:8080", zoned("10.0.0.1:8080", "a"));
        r.publish("10.0.0.1:9090", zoned("10.0.0.1:9090", "a"));
        // A ClusterIP entry: its set holds other addresses, so it says nothing of 10.96.0.1.
        r.publish("10.96.0.1:80", zoned("10.0.0.1:8080", "a"));
        assert_eq!(r.zone_of(ip("10.0.0.1")).as_deref(), Some("a"));
        assert_eq!(r.zone_of(ip("10.96.0.1")), None);
        assert_eq!(r.zone_of(ip("10.0.0.2")), None);
        r.publish("10.0.0.1:9090", zoned("10.0.0.1:9090", "b"));
        assert_eq!(r.zone_of(ip("10.0.0.1")), None, "two zones at one IP");
        r.publish("10.0.0.1:9090", None);
        assert_eq!(r.zone_of(ip("10.0.0.1")).as_deref(), Some("a"));
        let mut table = Table::new();
        table.insert("10.0.0.2:80".into(), zoned("10.0.0.2:80", "c").unwrap());
        r.replace_all(table);
        assert_eq!(r.zone_of(ip("10.0.0.1")), None);
        assert_eq!(r.zone_of(ip("10.0.0.2")).as_deref(), Some("c"));
    }

    /// A Pod's node's zone answers first, for any pod; a Pod deleted after its IP went to
    /// another Pod does not take the new one's placement with it.
    #[test]
    fn zone_of_a_pod_comes_from_its_node() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let r = Registry::new();
        r.set_node_zone("node-1", Some("a".into()));
        r.set_node_zone("node-2", Some("b".into()));
        r.set_pod("shop/job-1", &[ip("10.0.0.9")], Some("node-1"));
        assert_eq!(r.zone_of(ip("10.0.0.9")).as_deref(), Some("a"));
        // The IP reused by a Pod on node-2 before the old Pod's deletion arrives.
        r.set_pod("shop/web-2", &[ip("10.0.0.9")], Some("node-2"));
        r.set_pod("shop/job-1", &[], None);
        assert_eq!(r.zone_of(ip("10.0.0.9")).as_deref(), Some("b"));
        r.set_node_zone("node-2", None);
        assert_eq!(r.zone_of(ip("10.0.0.9")), None);
        // A re-list replaces all.
        r.replace_pods(vec![("shop/x".into(), ip("10.0.0.7"), "node-1".into())]);
        r.replace_node_zones(vec![("node-1".into(), "c".into())]);
        assert_eq!(r.zone_of(ip("10.0.0.7")).as_deref(), Some("c"));
        assert_eq!(r.zone_of(ip("10.0.0.9")), None);
    }

    #[tokio::test]
    async fn subscribers_see_create_change_and_delete() {
        let r = Registry::new();
        let mut rx = r.subscribe("a:80");
        assert!(rx.borrow_and_update().is_none());
        r.set("a:80", Some(vec![ep("10.0.0.1:80")]));
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update()
                .as_ref()
                .unwrap()
                .set()
                .unwrap()
                .len(),
            1
        );
        // Setting the same set again does not wake anyone.
        r.set("a:80", Some(vec![ep("10.0.0.1:80")]));
        assert!(!rx.has_changed().unwrap());
        r.replace_all(Table::new());
        rx.changed().await.unwrap();
        assert!(rx.borrow().is_none());
        assert_eq!(r.services(), 0);
    }

    #[test]
    fn unknown_names_are_forgotten_when_unfollowed() {
        let r = Registry::new();
        let rx = r.subscribe("junk:1");
        drop(rx);
        r.release("junk:1");
        assert!(r.lock().is_empty());
    }
}

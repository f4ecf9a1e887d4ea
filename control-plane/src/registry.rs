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

    /// The zone of the endpoints published at `ip` (any port); `None` when unknown or when
    /// they disagree.
    pub fn zone_of(&self, ip: IpAddr) -> Option<String> {
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

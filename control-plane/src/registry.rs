//! The service table every source writes and every `Watch` reads: service name (`host:port`)
//! → its endpoints (or, for a Kubernetes ExternalName Service, another name to resolve through
//! DNS), or "no such service". The same type keys ClusterIP:port addresses in a second table.
//!
//! Each service is a `tokio::sync::watch` channel: a subscriber always sees the latest set and
//! never a queue of stale ones, so a slow proxy cannot make the control plane buffer without
//! bound, and bursts of changes collapse into one delta.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
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

    /// Sets one name to what it publishes (`None` deletes it).
    pub fn publish(&self, name: &str, next: Option<Published>) {
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
        }
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

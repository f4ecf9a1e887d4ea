//! Where a destination's endpoints come from: static configuration (updatable at run time
//! through [`Destinations::set`]), otherwise DNS.
//!
//! The control-plane issue adds a third source; all of them feed a [`Destination`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::balance::Destination;
use crate::config::{EndpointSpec, StaticDestination};
use crate::endpoint::{Endpoint, EndpointTls};
use crate::identity::IdentityStore;
use crate::metrics::{EndpointMetrics, Metrics};

/// How long a DNS answer is reused before resolving again.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Bound on cached DNS destinations, so a client cycling through names cannot grow memory.
const DNS_CACHE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("DNS lookup of {name} failed: {source}")]
    Dns {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} resolved to no address")]
    Empty { name: String },
}

pub struct Destinations {
    statics: ArcSwap<HashMap<String, Arc<Destination>>>,
    dns: Mutex<HashMap<String, (Instant, Arc<Destination>)>>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    identity: Option<Arc<IdentityStore>>,
}

impl Destinations {
    pub fn new(
        statics: &[StaticDestination],
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
        identity: Option<Arc<IdentityStore>>,
    ) -> Self {
        let d = Destinations {
            statics: ArcSwap::from_pointee(HashMap::new()),
            dns: Mutex::new(HashMap::new()),
            connect_timeout,
            metrics,
            identity,
        };
        for s in statics {
            d.set(&s.name, &s.endpoints);
        }
        d
    }

    fn endpoint(&self, name: &str, s: &EndpointSpec) -> Arc<Endpoint> {
        let tls = match (&s.identity, &self.identity) {
            (Some(id), Some(store)) => Some(EndpointTls {
                id: id.clone(),
                store: store.clone(),
                metrics: self.metrics.clone(),
            }),
            // Validation refuses identities without REMORA_IDENTITY_DIR; an embedding caller
            // that skips it gets plaintext, and a warning.
            (Some(id), None) => {
                tracing::warn!(%id, addr = %s.addr, "endpoint has an identity but the proxy has none; using plaintext");
                None
            }
            (None, _) => None,
        };
        Arc::new(
            Endpoint::new(
                s.addr,
                s.weight,
                self.connect_timeout,
                Some(EndpointMetrics::new(&self.metrics, name, s.addr)),
            )
            .with_tls(tls),
        )
    }

    /// Creates a static destination, or replaces its endpoints. Requests in flight to removed
    /// endpoints finish; endpoints that stay keep their connections. `name` is `host:port`.
    pub fn set(&self, name: &str, specs: &[EndpointSpec]) {
        let name = name.to_ascii_lowercase();
        if let Some(d) = self.statics.load().get(&name) {
            // Reuse endpoints that stay, so their metric handles are not re-created.
            let current = d.endpoints();
            let next = specs
                .iter()
                .map(|s| {
                    current
                        .iter()
                        .find(|e| {
                            e.addr == s.addr
                                && e.weight == s.weight
                                && e.tls.as_ref().map(|t| &t.id) == s.identity.as_ref()
                        })
                        .cloned()
                        .unwrap_or_else(|| self.endpoint(&name, s))
                })
                .collect();
            d.update(next);
            return;
        }
        let eps = specs.iter().map(|s| self.endpoint(&name, s)).collect();
        let dest = Arc::new(Destination::new(name.clone(), eps));
        self.statics.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(name.clone(), dest.clone());
            map
        });
    }

    /// `authority` is normalised `host:port`.
    pub async fn resolve(&self, authority: &str) -> Result<Arc<Destination>, ResolveError> {
        if let Some(d) = self.statics.load().get(authority) {
            return Ok(d.clone());
        }
        let previous = {
            let cache = self.dns.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(authority) {
                Some((at, d)) if at.elapsed() < DNS_TTL => return Ok(d.clone()),
                Some((_, d)) => Some(d.clone()),
                None => None,
            }
        };
        let addrs: Vec<SocketAddr> = match (tokio::net::lookup_host(authority).await, previous) {
            (Ok(a), _) => a.collect(),
            // Keep serving the last answer when DNS is briefly unavailable.
            (Err(_), Some(previous)) => return Ok(previous),
            (Err(source), None) => {
                return Err(ResolveError::Dns {
                    name: authority.to_string(),
                    source,
                });
            }
        };
        if addrs.is_empty() {
            return Err(ResolveError::Empty {
                name: authority.to_string(),
            });
        }
        let specs: Vec<EndpointSpec> = addrs
            .iter()
            .map(|&addr| EndpointSpec {
                addr,
                weight: 1,
                identity: None,
            })
            .collect();
        let mut cache = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, d)) = cache.get_mut(authority) {
            // A refresh: the same destination, its endpoint set updated in place.
            let current = d.endpoints();
            let next = specs
                .iter()
                .map(|s| {
                    current
                        .iter()
                        .find(|e| e.addr == s.addr)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(Endpoint::new(s.addr, 1, self.connect_timeout, None))
                        })
                })
                .collect();
            d.update(next);
            *at = Instant::now();
            return Ok(d.clone());
        }
        if cache.len() >= DNS_CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < DNS_TTL);
            if cache.len() >= DNS_CACHE_MAX {
                cache.clear();
            }
        }
        // DNS destinations get no per-endpoint metrics: their names come from clients, and a
        // label per name would let a client grow the registry.
        let eps = specs
            .iter()
            .map(|s| Arc::new(Endpoint::new(s.addr, 1, self.connect_timeout, None)))
            .collect();
        let dest = Arc::new(Destination::new(authority.to_string(), eps));
        cache.insert(authority.to_string(), (Instant::now(), dest.clone()));
        Ok(dest)
    }
}

//! Where a destination's endpoints come from: static configuration, otherwise DNS.
//!
//! The control-plane issue adds a third source; all of them produce a [`Destination`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::balance::Destination;
use crate::config::StaticDestination;
use crate::endpoint::Endpoint;

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
    statics: HashMap<String, Arc<Destination>>,
    dns: Mutex<HashMap<String, (Instant, Arc<Destination>)>>,
    connect_timeout: Duration,
}

impl Destinations {
    pub fn new(statics: &[StaticDestination], connect_timeout: Duration) -> Self {
        let statics = statics
            .iter()
            .map(|d| {
                let eps = d
                    .addrs
                    .iter()
                    .map(|a| Arc::new(Endpoint::new(*a, connect_timeout)))
                    .collect();
                (
                    d.name.clone(),
                    Arc::new(Destination::new(d.name.clone(), eps)),
                )
            })
            .collect();
        Destinations {
            statics,
            dns: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// `authority` is normalised `host:port`.
    pub async fn resolve(&self, authority: &str) -> Result<Arc<Destination>, ResolveError> {
        if let Some(d) = self.statics.get(authority) {
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
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(authority).await {
            Ok(a) => a.collect(),
            // Keep serving the last answer when DNS is briefly unavailable.
            Err(_) if previous.is_some() => return Ok(previous.unwrap_or_else(|| unreachable!())),
            Err(source) => {
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
        // Endpoints whose address survives a refresh keep their pooled connections.
        let endpoints = addrs
            .iter()
            .map(|a| {
                previous
                    .as_ref()
                    .and_then(|p| p.endpoints().iter().find(|e| e.addr == *a).cloned())
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a, self.connect_timeout)))
            })
            .collect();
        let dest = Arc::new(Destination::new(authority.to_string(), endpoints));
        let mut cache = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= DNS_CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < DNS_TTL);
            if cache.len() >= DNS_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(authority.to_string(), (Instant::now(), dest.clone()));
        Ok(dest)
    }
}

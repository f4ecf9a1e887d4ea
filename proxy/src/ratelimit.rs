//! Inbound rate limits (`remora.io/rate-limit`, `remora.io/rate-limit-per-client`): a local
//! token bucket per address the app is reached on, one per calling identity, and one per route
//! prefix with a limit of its own (`remora.io/rate-limit: "100; /pkg.Reports/=5"`).
//!
//! The limits are the Service's, published by the control plane for each endpoint's own
//! address (`WatchAddr(pod IP:port)`), so the proxy learns them the way callers learn
//! endpoints, with no knob: the first request on an address starts following it (in the
//! background: requests never wait for the control plane) and is served; the limits apply as
//! soon as they are known. A bucket holds one second's worth of requests (the burst) and
//! refills at the rate. Everything is bounded: [`MAX_ADDRS`] addresses, [`MAX_CLIENTS`]
//! identities per address (then the idle ones are forgotten, and past that unknown callers
//! share one bucket).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::balance::Destination;
use crate::discover::Destinations;

/// Addresses followed for limits (ports × pod IPs: a handful).
const MAX_ADDRS: usize = 64;
/// Calling identities with a bucket of their own, per address.
const MAX_CLIENTS: usize = 1024;
/// How often an address's destination is asked for again (keeps its watch from going idle).
const REFRESH: Duration = Duration::from_secs(30);
/// How soon an address that could not be looked up is asked for again.
const RETRY: Duration = Duration::from_secs(1);
/// A client bucket unused this long is forgotten when the table is full.
const CLIENT_IDLE: Duration = Duration::from_secs(10);

/// A token bucket: `rate` per second, at most one second's worth saved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(rate),
            at: now,
        }
    }

    /// Refills for the time since the last look; then `Ok` when a token is there, or how
    /// long until one is. Takes nothing.
    fn ready(&mut self, rate: u32, now: Instant) -> Result<(), Duration> {
        let r = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * r).min(r);
        self.at = now;
        match self.tokens >= 1.0 {
            true => Ok(()),
            false => Err(Duration::from_secs_f64((1.0 - self.tokens) / r)),
        }
    }

    /// Takes one token, or says how long until one is there.
    #[cfg(test)]
    fn take(&mut self, rate: u32, now: Instant) -> Result<(), Duration> {
        self.ready(rate, now)?;
        self.tokens -= 1.0;
        Ok(())
    }
}

/// A request over its limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limited {
    /// The per-client limit (else the total, or a route's).
    pub per_client: bool,
    /// The route (path prefix) whose limit it hit, for a per-route limit.
    pub route: Option<Box<str>>,
    /// Requests per second of the limit hit.
    pub limit: u32,
    /// When a token is next available.
    pub retry_after: Duration,
}

struct AddrLimits {
    dest: ArcSwapOption<Destination>,
    total: Mutex<Option<Bucket>>,
    clients: Mutex<HashMap<Box<str>, Bucket>>,
    /// One bucket per route prefix with a limit (at most MAX_ROUTES in a policy; prefixes a
    /// changed policy dropped are forgotten when the table outgrows that).
    routes: Mutex<HashMap<Box<str>, Bucket>>,
}

pub(crate) struct RateLimits {
    destinations: Arc<Destinations>,
    addrs: Mutex<HashMap<SocketAddr, Arc<AddrLimits>>>,
    /// Kubelet probes (`REMORA_PROBE_PATHS`, GET/HEAD without a verified caller) are never
    /// limited: a refused liveness probe restarts the pod.
    probe_paths: Vec<String>,
}

impl RateLimits {
    pub(crate) fn new(destinations: Arc<Destinations>, probe_paths: Vec<String>) -> Self {
        RateLimits {
            destinations,
            addrs: Mutex::new(HashMap::new()),
            probe_paths,
        }
    }

    /// A kubelet probe (the same test strict mode applies: GET/HEAD to a probe path, no
    /// upgrade, no body) from no verified caller: exempt.
    pub(crate) fn is_probe<B: http_body::Body>(
        &self,
        req: &http::Request<B>,
        client: Option<&str>,
    ) -> bool {
        client.is_none() && crate::http::forward::is_probe(req, &self.probe_paths)
    }

    /// The limits of `local`, following it from the first call on.
    fn limits(&self, local: SocketAddr) -> Option<Arc<AddrLimits>> {
        let mut addrs = self.addrs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = addrs.get(&local) {
            return Some(a.clone());
        }
        if addrs.len() >= MAX_ADDRS {
            // Full: forget addresses known to have no limits (a caller touching many ports
            // must not crowd out the app's real one); their follow tasks end with them.
            addrs.retain(|_, a| {
                a.dest.load().as_ref().is_none_or(|d| {
                    let p = d.policy_now();
                    p.rate_limit.is_some()
                        || p.rate_limit_per_client.is_some()
                        || !p.route_rate_limits.is_empty()
                })
            });
            if addrs.len() >= MAX_ADDRS {
                return None;
            }
        }
        let a = Arc::new(AddrLimits {
            dest: ArcSwapOption::empty(),
            total: Mutex::new(None),
            clients: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        });
        addrs.insert(local, a.clone());
        drop(addrs);
        let (follow, destinations) = (Arc::downgrade(&a), self.destinations.clone());
        tokio::spawn(async move {
            let name = local.to_string();
            loop {
                let Some(a) = follow.upgrade() else { return };
                // Asked again soon when not known yet, then only to keep the watch alive
                // (the destination's policy follows the control plane in between).
                let wait = match destinations.resolve(&name).await {
                    Ok(d) => {
                        a.dest.store(Some(d));
                        REFRESH
                    }
                    Err(_) => RETRY,
                };
                drop(a);
                tokio::time::sleep(wait).await;
            }
        });
        Some(a)
    }

    /// Whether a request for `path` to `local` from `client` (its verified identity) may be
    /// served now.
    pub(crate) fn check(
        &self,
        local: SocketAddr,
        client: Option<&str>,
        path: &str,
    ) -> Result<(), Limited> {
        let Some(a) = self.limits(local) else {
            return Ok(());
        };
        let Some(dest) = a.dest.load_full() else {
            return Ok(());
        };
        let policy = dest.policy_now();
        let route = policy.route_rate_limit_for(path);
        if policy.rate_limit.is_none() && policy.rate_limit_per_client.is_none() && route.is_none()
        {
            return Ok(());
        }
        let now = Instant::now();
        // A request is served only when every bucket it counts against has a token, and takes
        // from them only then: one refused by the total must not spend its caller's share, nor
        // the reverse.
        let mut clients = a.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = a.total.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes = a.routes.lock().unwrap_or_else(|p| p.into_inner());
        let route_bucket = match route {
            None => None,
            Some((prefix, rate)) => {
                if routes.len() >= 2 * remora_certs::policy::MAX_ROUTES
                    && !routes.contains_key(prefix)
                {
                    routes.retain(|p, _| policy.route_rate_limits.iter().any(|(q, _)| **q == **p));
                }
                let bucket = routes
                    .entry(prefix.into())
                    .or_insert_with(|| Bucket::full(rate, now));
                bucket.ready(rate, now).map_err(|retry_after| Limited {
                    per_client: false,
                    route: Some(prefix.into()),
                    limit: rate,
                    retry_after,
                })?;
                Some(bucket)
            }
        };
        let client_bucket = match policy.rate_limit_per_client {
            None => None,
            Some(rate) => {
                let id = client.unwrap_or("");
                if clients.len() >= MAX_CLIENTS && !clients.contains_key(id) {
                    clients.retain(|_, b| now.saturating_duration_since(b.at) < CLIENT_IDLE);
                }
                // Still full: callers without a bucket share the anonymous one.
                let key = match clients.len() < MAX_CLIENTS || clients.contains_key(id) {
                    true => id,
                    false => "",
                };
                if !clients.contains_key(key) {
                    clients.insert(key.into(), Bucket::full(rate, now));
                }
                let Some(bucket) = clients.get_mut(key) else {
                    return Ok(());
                };
                bucket.ready(rate, now).map_err(|retry_after| Limited {
                    per_client: true,
                    route: None,
                    limit: rate,
                    retry_after,
                })?;
                Some(bucket)
            }
        };
        let total_bucket = match policy.rate_limit {
            None => None,
            Some(rate) => {
                let bucket = total.get_or_insert_with(|| Bucket::full(rate, now));
                bucket.ready(rate, now).map_err(|retry_after| Limited {
                    per_client: false,
                    route: None,
                    limit: rate,
                    retry_after,
                })?;
                Some(bucket)
            }
        };
        for b in [client_bucket, total_bucket, route_bucket]
            .into_iter()
            .flatten()
        {
            b.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_seconds_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10, t0);
        for i in 0..10 {
            assert!(b.take(10, t0).is_ok(), "burst {i}");
        }
        let wait = b.take(10, t0).expect_err("empty");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // 100 ms later one more; a long idle saves no more than the burst.
        assert!(b.take(10, t0 + Duration::from_millis(100)).is_ok());
        let later = t0 + Duration::from_secs(60);
        let served = (0..100).filter(|_| b.take(10, later).is_ok()).count();
        assert_eq!(served, 10);
    }
}

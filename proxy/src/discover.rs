//! Where a destination's endpoints come from, in order: static configuration (updatable at
//! run time through [`Destinations::set`]), the control plane (`REMORA_CONTROL_ADDR`), DNS.
//!
//! Control-plane discovery is lazy: the first request for an authority opens a
//! `Discovery.Watch` for it and waits (up to [`FIRST_ANSWER`]) for the first message. A set of
//! endpoints (even an empty one) makes the control plane the source for that name; "no such
//! service" sends the name to DNS, as does a control plane that cannot answer in time. The
//! watch then applies deltas as they come; when the stream breaks it reconnects with backoff
//! while requests keep using the last endpoints it knew. A watch nobody has used for
//! `discovery_idle_timeout` is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::balance::Destination;
use crate::config::{EndpointSpec, StaticDestination};
use crate::endpoint::{Endpoint, EndpointTls};
use crate::identity::IdentityStore;
use crate::metrics::{EndpointMetrics, Metrics};

/// How long a DNS answer is reused before resolving again.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Bound on cached DNS destinations, so a client cycling through names cannot grow memory.
const DNS_CACHE_MAX: usize = 1024;
/// How long the first request for a name waits for the control plane's first answer.
pub const FIRST_ANSWER: Duration = Duration::from_secs(3);
/// Bound on control-plane watches, so a client cycling through names cannot grow them.
const WATCH_MAX: usize = 4096;

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
    factory: Arc<Factory>,
    control: Option<Control>,
}

type Watches = Arc<Mutex<HashMap<String, Arc<Watch>>>>;

struct Control {
    client: crate::control::ControlClient,
    watches: Watches,
    idle: Duration,
    /// Ends every watch when the proxy has stopped.
    stop: tokio_util::sync::CancellationToken,
}

/// What a watch knows about its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// No answer yet.
    Waiting,
    /// The control plane serves this name (its endpoints are in `dest`).
    Service,
    /// The control plane does not know this name: use DNS.
    NoSuchService,
    /// No answer within [`FIRST_ANSWER`]: use DNS without waiting again until one comes.
    Unanswered,
}

struct Watch {
    dest: Arc<Destination>,
    known: watch::Sender<Known>,
    /// Milliseconds since `epoch` of the last request, for dropping idle watches.
    last_used: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

impl Watch {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_used
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_used.load(std::sync::atomic::Ordering::Relaxed);
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
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
            factory: Arc::new(Factory {
                connect_timeout,
                metrics,
                identity,
            }),
            control: None,
        };
        for s in statics {
            d.set(&s.name, &s.endpoints);
        }
        d
    }

    /// Ends control-plane watches (the proxy has stopped).
    pub fn stop(&self) {
        if let Some(c) = &self.control {
            c.stop.cancel();
        }
    }

    /// Sends names that are not static to the control plane first.
    pub fn with_control(mut self, client: crate::control::ControlClient, idle: Duration) -> Self {
        self.control = Some(Control {
            client,
            watches: Default::default(),
            idle,
            stop: Default::default(),
        });
        self
    }
}

/// Makes room in a full watch table by dropping watches unused for a minute; their tasks see
/// they are no longer in the table and end. Returns whether there is room now.
fn evict_idle(watches: &mut HashMap<String, Arc<Watch>>) -> bool {
    watches.retain(|_, w| w.idle_for() < Duration::from_secs(60));
    watches.len() < WATCH_MAX
}

/// Whether `w` is still the table's watch for `name` (eviction may have dropped it).
fn current(watches: &Watches, name: &str, w: &Arc<Watch>) -> bool {
    watches
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .is_some_and(|x| Arc::ptr_eq(x, w))
}

/// Removes `w` from the table if it is idle, checked under the lock so a request that just
/// picked it up keeps it alive. True when the watch should end.
fn retire_if_idle(watches: &Watches, name: &str, w: &Arc<Watch>, idle: Duration) -> bool {
    let mut map = watches.lock().unwrap_or_else(|p| p.into_inner());
    match map.get(name) {
        Some(x) if Arc::ptr_eq(x, w) => {
            if w.idle_for() >= idle {
                map.remove(name);
                true
            } else {
                false
            }
        }
        // Evicted (or replaced): this task has nothing left to do.
        _ => true,
    }
}

/// Makes endpoints for discovered destinations (static and control plane alike).
struct Factory {
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    identity: Option<Arc<IdentityStore>>,
}

impl Factory {
    /// The endpoint set `specs` for destination `name`, reusing endpoints in `current` that
    /// stay (same address, weight and identity) so they keep their connections and metrics.
    fn build(
        &self,
        name: &str,
        current: &[Arc<Endpoint>],
        specs: &[EndpointSpec],
    ) -> Vec<Arc<Endpoint>> {
        specs
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
                    .unwrap_or_else(|| self.endpoint(name, s))
            })
            .collect()
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
}

impl Destinations {
    /// Creates a static destination, or replaces its endpoints. Requests in flight to removed
    /// endpoints finish; endpoints that stay keep their connections. `name` is `host:port`.
    pub fn set(&self, name: &str, specs: &[EndpointSpec]) {
        let name = name.to_ascii_lowercase();
        if let Some(d) = self.statics.load().get(&name) {
            d.update(self.factory.build(&name, &d.endpoints(), specs));
            return;
        }
        let eps = specs
            .iter()
            .map(|s| self.factory.endpoint(&name, s))
            .collect();
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
        if let Some(d) = self.discover(authority).await {
            return Ok(d);
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

impl Destinations {
    /// The control plane's destination for `authority`, or `None` to fall back to DNS.
    async fn discover(&self, authority: &str) -> Option<Arc<Destination>> {
        let control = self.control.as_ref()?;
        let w = {
            let mut watches = control.watches.lock().unwrap_or_else(|p| p.into_inner());
            let existing = watches.get(authority).cloned();
            match existing {
                Some(w) => w,
                None if watches.len() >= WATCH_MAX && !evict_idle(&mut watches) => {
                    tracing::warn!(%authority, "{WATCH_MAX} control-plane watches are in use and none is idle; using DNS for this name");
                    return None;
                }
                None => {
                    let w = Arc::new(Watch {
                        dest: Arc::new(Destination::new(authority.to_string(), Vec::new())),
                        known: watch::channel(Known::Waiting).0,
                        last_used: Default::default(),
                        epoch: Instant::now(),
                    });
                    watches.insert(authority.to_string(), w.clone());
                    let stop = control.stop.clone();
                    let task = follow(
                        self.factory.clone(),
                        control.watches.clone(),
                        control.client.clone(),
                        authority.to_string(),
                        w.clone(),
                        control.idle,
                    );
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = task => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                    w
                }
            }
        };
        w.touch();
        // The common case, every request after the first: answered already, so no timer and
        // no subscription on the request path.
        let mut known = *w.known.borrow();
        if known == Known::Waiting {
            let mut rx = w.known.subscribe();
            known = match tokio::time::timeout(FIRST_ANSWER, rx.wait_for(|k| *k != Known::Waiting))
                .await
            {
                Ok(Ok(k)) => *k,
                _ => Known::Waiting,
            };
        }
        match known {
            Known::Service => Some(w.dest.clone()),
            Known::NoSuchService | Known::Unanswered => None,
            Known::Waiting => {
                // Later requests for this name go straight to DNS until the watch answers.
                w.known.send_if_modified(|k| {
                    let waiting = *k == Known::Waiting;
                    if waiting {
                        *k = Known::Unanswered;
                    }
                    waiting
                });
                tracing::warn!(%authority, "no answer from the control plane {} within {FIRST_ANSWER:?}; using DNS for this name until it answers", control.client.addr);
                None
            }
        }
    }
}

fn spec(e: &remora_api::Endpoint) -> Option<EndpointSpec> {
    let addr = match e.addr.parse() {
        Ok(a) => a,
        Err(_) => {
            tracing::warn!(addr = %e.addr, "control plane sent an endpoint that is not ip:port; ignoring it");
            return None;
        }
    };
    let identity = if e.identity.is_empty() {
        None
    } else {
        match e.identity.parse() {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::warn!(%addr, identity = %e.identity, "control plane sent a bad identity ({err}); ignoring the endpoint");
                return None;
            }
        }
    };
    Some(EndpointSpec {
        addr,
        weight: e.weight.clamp(1, crate::config::MAX_WEIGHT),
        identity,
    })
}

/// Follows one name on the control plane until it has been idle for `idle`.
async fn follow(
    factory: Arc<Factory>,
    watches: Watches,
    client: crate::control::ControlClient,
    name: String,
    w: Arc<Watch>,
    idle: Duration,
) {
    use remora_api::update::Kind;
    let metrics = factory.metrics.clone();
    metrics.discovery_watches.inc();
    struct Dec(Arc<Metrics>);
    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.discovery_watches.dec();
        }
    }
    let _dec = Dec(metrics.clone());
    let mut specs: std::collections::BTreeMap<SocketAddr, EndpointSpec> = Default::default();
    let mut backoff =
        crate::control::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let apply = |specs: &std::collections::BTreeMap<SocketAddr, EndpointSpec>| {
        let list: Vec<EndpointSpec> = specs.values().cloned().collect();
        w.dest
            .update(factory.build(&name, &w.dest.endpoints(), &list));
    };
    let mut idle_check = tokio::time::interval(
        (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
    );
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'outer: loop {
        let request = remora_api::WatchRequest {
            service: name.clone(),
            client: String::new(),
        };
        let mut stream = match client.discovery().watch(request).await {
            Ok(s) => Some(s.into_inner()),
            Err(status) => {
                metrics.discovery_stream_errors.inc();
                tracing::warn!(service = %name, "control plane {}: watch failed: {}: {}; keeping {} known endpoints", client.addr, status.code(), status.message(), specs.len());
                None
            }
        };
        while let Some(s) = stream.as_mut() {
            let msg = tokio::select! {
                m = s.message() => m,
                _ = idle_check.tick() => {
                    if retire_if_idle(&watches, &name, &w, idle) { break 'outer; }
                    continue;
                }
            };
            match msg {
                Ok(Some(update)) => {
                    backoff.reset();
                    metrics.discovery_updates.inc();
                    match update.kind {
                        Some(Kind::Snapshot(snap)) => {
                            specs = snap
                                .endpoints
                                .iter()
                                .filter_map(spec)
                                .map(|e| (e.addr, e))
                                .collect();
                            apply(&specs);
                            w.known.send_replace(Known::Service);
                            tracing::debug!(service = %name, endpoints = specs.len(), "snapshot from the control plane");
                        }
                        Some(Kind::Delta(d)) => {
                            for r in &d.remove {
                                if let Ok(a) = r.parse::<SocketAddr>() {
                                    specs.remove(&a);
                                }
                            }
                            for e in &d.add {
                                match spec(e) {
                                    Some(e) => {
                                        specs.insert(e.addr, e);
                                    }
                                    // An entry we cannot use must not leave its old version.
                                    None => {
                                        if let Ok(a) = e.addr.parse::<SocketAddr>() {
                                            specs.remove(&a);
                                        }
                                    }
                                }
                            }
                            apply(&specs);
                            tracing::debug!(service = %name, endpoints = specs.len(), "update from the control plane");
                        }
                        Some(Kind::NoSuchService(_)) => {
                            specs.clear();
                            apply(&specs);
                            w.known.send_replace(Known::NoSuchService);
                        }
                        None => {}
                    }
                }
                Ok(None) => {
                    metrics.discovery_stream_errors.inc();
                    tracing::warn!(service = %name, "control plane {} ended the watch; keeping {} known endpoints and reconnecting", client.addr, specs.len());
                    break;
                }
                Err(status) => {
                    metrics.discovery_stream_errors.inc();
                    tracing::warn!(service = %name, "control plane {}: watch broke: {}: {}; keeping {} known endpoints and reconnecting", client.addr, status.code(), status.message(), specs.len());
                    break;
                }
            }
        }
        if retire_if_idle(&watches, &name, &w, idle) || !current(&watches, &name, &w) {
            break;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    tracing::debug!(service = %name, "watch idle; dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(name: &str, idle: Duration) -> Arc<Watch> {
        Arc::new(Watch {
            dest: Arc::new(Destination::new(name.into(), Vec::new())),
            known: watch::channel(Known::Service).0,
            last_used: Default::default(),
            // The watch was made `idle` ago; touching it marks it used now.
            epoch: Instant::now()
                .checked_sub(idle)
                .expect("uptime exceeds the test's idle"),
        })
    }

    #[test]
    fn a_full_watch_table_makes_room_only_from_idle_watches() {
        let mut busy: HashMap<String, Arc<Watch>> = (0..WATCH_MAX)
            .map(|i| {
                let w = watch(&format!("n{i}:80"), Duration::from_secs(120));
                w.touch();
                (format!("n{i}:80"), w)
            })
            .collect();
        assert!(!evict_idle(&mut busy), "watches in use were evicted");
        assert_eq!(busy.len(), WATCH_MAX);
        // Half of them untouched for two minutes: those go.
        let mut mixed: HashMap<String, Arc<Watch>> = (0..WATCH_MAX)
            .map(|i| {
                let w = watch(&format!("n{i}:80"), Duration::from_secs(120));
                if i % 2 == 0 {
                    w.touch();
                }
                (format!("n{i}:80"), w)
            })
            .collect();
        assert!(evict_idle(&mut mixed));
        assert_eq!(mixed.len(), WATCH_MAX / 2);
        assert!(mixed.contains_key("n0:80") && !mixed.contains_key("n1:80"));
    }

    #[test]
    fn idle_retirement_spares_a_watch_just_used() {
        let watches: Watches = Default::default();
        let w = watch("web:80", Duration::from_secs(5));
        watches.lock().unwrap().insert("web:80".into(), w.clone());
        assert!(retire_if_idle(
            &watches,
            "web:80",
            &w,
            Duration::from_secs(1)
        ));
        assert!(watches.lock().unwrap().is_empty());
        let w = watch("web:80", Duration::from_secs(5));
        watches.lock().unwrap().insert("web:80".into(), w.clone());
        w.touch();
        assert!(!retire_if_idle(
            &watches,
            "web:80",
            &w,
            Duration::from_secs(1)
        ));
        assert!(current(&watches, "web:80", &w));
    }
}

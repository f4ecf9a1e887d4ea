//! Where a destination's endpoints come from: a chain of [`Discover`] sources — static
//! destinations first ([`Static`]), then the embedding application's sources, then the
//! control plane (`REMORA_CONTROL_ADDR`) — and DNS for names no source knows.
//!
//! Discovery is lazy: the first request for an authority starts following it (one task per
//! name) and waits (up to 3 s) for the first answer. The first source in the
//! chain that says the name exists answers it, even with an empty set (callers then get 503,
//! not DNS); a source that says "does not exist", or has not answered within
//! 3 s, passes the name to the next one, and keeps being listened to, so a later
//! answer from it takes over. A name nobody has used for `discovery_idle_timeout` is dropped,
//! and with it the sources' streams.

mod control_plane;
mod source;
mod statics;

pub(crate) use control_plane::{ControlPlane, Namespace};
pub use source::{Closed, Discover, Policy, Target, Update, UpdateSender, Updates};
pub use statics::Static;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balance::{Destination, Zone};
use crate::config::EndpointSpec;
use crate::endpoint::{Endpoint, EndpointTls};
use crate::identity::IdentityStore;
use crate::metrics::{EndpointMetrics, Metrics};

/// How long a DNS answer is reused before resolving again.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Bound on cached DNS destinations, so a client cycling through names cannot grow memory.
const DNS_CACHE_MAX: usize = 1024;
/// How long the first request for a name waits for the sources' first answer, and how long
/// one source may take before the next one is asked.
pub(crate) const FIRST_ANSWER: Duration = Duration::from_secs(3);
/// Bound on followed names, so a client cycling through names cannot grow them.
const WATCH_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ResolveError {
    #[error("DNS lookup of {name} failed: {source}")]
    Dns {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} resolved to no address")]
    Empty { name: String },
    #[error("no discovery source knows {name}, and DNS fallback is off")]
    Unknown { name: String },
}

/// A source in the chain, with the name its log lines use.
pub(crate) struct Source {
    pub(crate) label: String,
    pub(crate) source: Arc<dyn Discover>,
}

pub(crate) struct Destinations {
    sources: Arc<[Source]>,
    /// The static source (also in `sources`), whose names are never evicted.
    statics: Option<Arc<Static>>,
    /// `None`: names no source knows fail instead of going to DNS.
    dns: Option<DnsCache>,
    /// Intercepted connections' original destinations no source knows (addresses only).
    passthrough: DnsCache,
    connect_timeout: Duration,
    factory: Arc<Factory>,
    followed: Followed,
    idle: Duration,
    /// Ends every follow task when the proxy has stopped.
    stop: tokio_util::sync::CancellationToken,
    /// The proxy's zone (learned from the control plane), given to every destination.
    zone: Zone,
}

type Followed = Arc<Mutex<HashMap<String, Arc<Follow>>>>;
/// DNS answers by name, with when they were looked up.
type DnsCache = Mutex<HashMap<String, (Instant, Arc<Destination>)>>;

/// What the chain says about a name so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// No answer yet.
    Waiting,
    /// A source serves this name (its endpoints are in `dest`).
    Service,
    /// No source knows this name: use DNS.
    NoSuchService,
}

/// One followed name: its destination (shared by every request) and what is known of it.
struct Follow {
    dest: Arc<Destination>,
    known: watch::Sender<Known>,
    /// Milliseconds since `epoch` of the last request, for dropping idle names.
    last_used: std::sync::atomic::AtomicU64,
    epoch: Instant,
    /// A static name: never evicted to make room.
    pinned: bool,
    /// Ends this name's follow task (eviction, retirement, the proxy stopping).
    cancel: tokio_util::sync::CancellationToken,
}

impl Follow {
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
    /// Endpoints with an identity may be reached over QUIC, per the client's policy. Set
    /// before any endpoint is made.
    pub(crate) fn with_quic(mut self, quic: Option<Arc<crate::quic::client::QuicClient>>) -> Self {
        if let Some(f) = Arc::get_mut(&mut self.factory) {
            f.quic = quic;
        }
        self
    }

    pub(crate) fn new(
        statics: Option<Arc<Static>>,
        sources: Vec<Source>,
        dns_fallback: bool,
        connect_timeout: Duration,
        idle: Duration,
        metrics: Arc<Metrics>,
        identity: Option<Arc<IdentityStore>>,
    ) -> Self {
        Destinations {
            statics,
            sources: sources.into(),
            dns: dns_fallback.then(Default::default),
            passthrough: Default::default(),
            connect_timeout,
            factory: Arc::new(Factory {
                connect_timeout,
                metrics,
                identity,
                quic: None,
            }),
            followed: Default::default(),
            idle,
            stop: Default::default(),
            zone: Zone::default(),
        }
    }

    /// Shares the proxy's zone (learned by the control-plane source) with every destination.
    pub(crate) fn with_zone(mut self, zone: Zone) -> Self {
        self.zone = zone;
        self
    }

    /// Ends every follow task (the proxy has stopped).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// Makes room in a full table by dropping names unused for a minute; their tasks see they
/// are no longer in the table and end. Returns whether there is room now.
fn evict_idle(table: &mut HashMap<String, Arc<Follow>>) -> bool {
    table.retain(|_, w| {
        let keep = w.pinned || w.idle_for() < Duration::from_secs(60);
        if !keep {
            w.cancel.cancel();
        }
        keep
    });
    table.len() < WATCH_MAX
}

/// Whether `w` is still the table's entry for `name` (eviction may have dropped it).
fn current(table: &Followed, name: &str, w: &Arc<Follow>) -> bool {
    table
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .is_some_and(|x| Arc::ptr_eq(x, w))
}

/// Removes `w` from the table if it is idle, checked under the lock so a request that just
/// picked it up keeps it alive. True when the follow task should end.
fn retire_if_idle(table: &Followed, name: &str, w: &Arc<Follow>, idle: Duration) -> bool {
    let mut map = table.lock().unwrap_or_else(|p| p.into_inner());
    match map.get(name) {
        Some(x) if Arc::ptr_eq(x, w) => {
            if w.idle_for() >= idle {
                map.remove(name);
                w.cancel.cancel();
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
    /// The QUIC hop's client side (`None`: `REMORA_MESH_TRANSPORT=tcp`).
    quic: Option<Arc<crate::quic::client::QuicClient>>,
}

impl Factory {
    /// The endpoint set `specs` for destination `name`, reusing endpoints in `current` that
    /// stay (same address, weight, identity, protocol, QUIC port and locality) so they keep
    /// their connections and metrics.
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
                            && e.opaque == s.opaque
                            && e.quic == s.quic
                            && e.locality == s.locality
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
                label: id.to_string().into(),
                id: id.clone(),
                store: store.clone(),
                metrics: self.metrics.clone(),
                quic: self.quic.clone(),
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
            .with_tls(tls)
            .with_opaque(s.opaque)
            .with_quic(s.quic)
            .with_locality(s.locality.clone()),
        )
    }
}

impl Destinations {
    /// `authority` is normalised `host:port`.
    pub(crate) async fn resolve(&self, authority: &str) -> Result<Arc<Destination>, ResolveError> {
        if let Some(d) = self.discover(authority).await {
            return Ok(d);
        }
        let Some(dns) = &self.dns else {
            return Err(ResolveError::Unknown {
                name: authority.to_string(),
            });
        };
        Box::pin(self.dns(dns, authority)).await
    }

    /// An intercepted connection's destination: `authority` (the request's, if any) when a
    /// source knows it, else the original destination `ip:port` when a source knows it (a
    /// ClusterIP, a meshed pod), else `original` itself, passed through untouched. Never DNS:
    /// the app resolved the name already, and `original` is what it chose.
    pub(crate) async fn resolve_original(
        &self,
        authority: Option<&str>,
        original: SocketAddr,
    ) -> Result<(String, Arc<Destination>), ResolveError> {
        if let Some(a) = authority
            && let Some(d) = self.discover(a).await
        {
            return Ok((a.to_string(), d));
        }
        let key = original.to_string();
        if let Some(d) = self.discover(&key).await {
            return Ok((key, d));
        }
        // An address literal: `lookup_host` answers it without a query.
        let dest = Box::pin(self.dns(&self.passthrough, &key)).await?;
        Ok((key, dest))
    }

    async fn dns(&self, dns: &DnsCache, authority: &str) -> Result<Arc<Destination>, ResolveError> {
        let previous = {
            let cache = dns.lock().unwrap_or_else(|p| p.into_inner());
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
                opaque: false,
                quic: None,
                locality: Default::default(),
            })
            .collect();
        let mut cache = dns.lock().unwrap_or_else(|p| p.into_inner());
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
    /// The chain's destination for `authority`, or `None` to fall back to DNS.
    async fn discover(&self, authority: &str) -> Option<Arc<Destination>> {
        if self.sources.is_empty() {
            return None;
        }
        let w = {
            let mut table = self.followed.lock().unwrap_or_else(|p| p.into_inner());
            match table.get(authority).cloned() {
                Some(w) => w,
                None => {
                    // Static names are few (configuration) and never evicted: names a client
                    // cycles through cannot push them out, nor take their place.
                    let pinned = self.statics.as_ref().is_some_and(|s| s.contains(authority));
                    if table.len() >= WATCH_MAX && !evict_idle(&mut table) && !pinned {
                        tracing::warn!(%authority, "{WATCH_MAX} discovered names are in use and none is idle; using DNS for this name");
                        return None;
                    }
                    let w = Arc::new(Follow {
                        dest: Arc::new(
                            Destination::new(authority.to_string(), Vec::new())
                                .with_zone(self.zone.clone()),
                        ),
                        known: watch::channel(Known::Waiting).0,
                        last_used: Default::default(),
                        epoch: Instant::now(),
                        pinned,
                        cancel: self.stop.child_token(),
                    });
                    table.insert(authority.to_string(), w.clone());
                    let task = follow(
                        self.sources.clone(),
                        self.factory.clone(),
                        self.followed.clone(),
                        authority.to_string(),
                        w.clone(),
                        self.idle,
                    );
                    let (table, name, w2) =
                        (self.followed.clone(), authority.to_string(), w.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            // A panicking source must not leave the name waiting forever.
                            _ = crate::panics::catch("discovery", task) => {}
                            // Evicted, retired, or the proxy stopped.
                            _ = w2.cancel.cancelled() => {}
                        }
                        // However it ended, the name no longer has a follower: the next request
                        // follows it afresh, and requests waiting now go on.
                        let mut map = table.lock().unwrap_or_else(|p| p.into_inner());
                        if map.get(&name).is_some_and(|x| Arc::ptr_eq(x, &w2)) {
                            map.remove(&name);
                        }
                        drop(map);
                        w2.known.send_if_modified(|k| {
                            let waiting = *k == Known::Waiting;
                            if waiting {
                                *k = Known::NoSuchService;
                            }
                            waiting
                        });
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
            // Each source gets FIRST_ANSWER before the next is asked; the follow task decides
            // (and publishes) the moment the chain has answered, so this bound is a backstop.
            let bound = FIRST_ANSWER * self.sources.len() as u32 + Duration::from_millis(100);
            let mut rx = w.known.subscribe();
            known = match tokio::time::timeout(bound, rx.wait_for(|k| *k != Known::Waiting)).await {
                Ok(Ok(k)) => *k,
                _ => Known::Waiting,
            };
        }
        match known {
            Known::Service => Some(w.dest.clone()),
            Known::NoSuchService => None,
            Known::Waiting => {
                tracing::warn!(%authority, "no discovery source answered in time; using DNS for this request");
                None
            }
        }
    }
}

/// What one source has said about a name.
#[derive(Default)]
enum Said {
    /// Not asked (or no longer followed, because an earlier source answers).
    #[default]
    NotAsked,
    /// Asked at the instant, no answer yet.
    Waiting(Instant),
    /// No answer within [`FIRST_ANSWER`]: the next source is asked; a late answer counts.
    Late,
    /// Does not know the name (a later `Reset` counts).
    Missing,
    /// Knows it, with these endpoints; `fresh` until published.
    Known {
        endpoints: BTreeMap<SocketAddr, EndpointSpec>,
        fresh: bool,
    },
}

#[derive(Default)]
struct Slot {
    stream: Option<Updates>,
    said: Said,
    /// The source's policy for the name, kept across `Reset`s: a source sends it before the
    /// endpoints it goes with, so the first requests see both.
    policy: Arc<Policy>,
}

impl Slot {
    fn apply(&mut self, u: Update) {
        if let Update::Policy(p) = u {
            self.policy = Arc::from(p);
            if let Said::Known { fresh, .. } = &mut self.said {
                *fresh = true;
            }
            return;
        }
        let known = match std::mem::take(&mut self.said) {
            Said::Known { endpoints, .. } => Some(endpoints),
            _ => None,
        };
        self.said = match (u, known) {
            (Update::Reset(list), _) => Said::Known {
                endpoints: list.into_iter().map(|e| (e.addr, e)).collect(),
                fresh: true,
            },
            (Update::Add(list), known) => {
                let mut endpoints = known.unwrap_or_default();
                endpoints.extend(list.into_iter().map(|e| (e.addr, e)));
                Said::Known {
                    endpoints,
                    fresh: true,
                }
            }
            (Update::Remove(addrs), Some(mut endpoints)) => {
                for a in &addrs {
                    endpoints.remove(a);
                }
                Said::Known {
                    endpoints,
                    fresh: true,
                }
            }
            (Update::Remove(_), None) | (Update::DoesNotExist, _) | (Update::Policy(_), _) => {
                self.policy = Arc::default();
                Said::Missing
            }
        };
    }
}

/// Follows one name through the chain until it has been idle for `idle`.
async fn follow(
    sources: Arc<[Source]>,
    factory: Arc<Factory>,
    table: Followed,
    name: String,
    w: Arc<Follow>,
    idle: Duration,
) {
    let mut slots: Vec<Slot> = sources.iter().map(|_| Slot::default()).collect();
    let mut answering: Option<usize> = None;
    let mut idle_check = tokio::time::interval(
        (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
    );
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Ask sources in order until one knows the name or is still thinking.
        let mut answer = None;
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Said::NotAsked = slot.said {
                // An `ip:port` authority is an address the app dialled (a ClusterIP), asked
                // for as such: sources answer names and addresses apart.
                let target = match name.parse::<SocketAddr>() {
                    Ok(addr) => Target::Addr(addr),
                    Err(_) => Target::Name(&name),
                };
                match sources[i].source.resolve(target) {
                    Some(s) => {
                        slot.stream = Some(s);
                        slot.said = Said::Waiting(Instant::now());
                    }
                    None => slot.said = Said::Missing,
                }
            }
            match slot.said {
                Said::Waiting(_) => {
                    answer = Some(None);
                    break;
                }
                Said::Known { .. } => {
                    answer = Some(Some(i));
                    break;
                }
                _ => {}
            }
        }
        // Sources after the answering one are not needed until it stops knowing the name.
        if let Some(Some(i)) = answer {
            for s in &mut slots[i + 1..] {
                *s = Slot::default();
            }
        }
        match answer {
            Some(Some(i)) => {
                let policy = slots[i].policy.clone();
                if let Said::Known { endpoints, fresh } = &mut slots[i].said
                    && (*fresh || answering != Some(i))
                {
                    *fresh = false;
                    let list: Vec<EndpointSpec> = endpoints.values().cloned().collect();
                    w.dest.set_policy(policy);
                    w.dest
                        .update(factory.build(&name, &w.dest.endpoints(), &list));
                    if answering != Some(i) {
                        tracing::debug!(service = %name, source = %sources[i].label, "destination answered");
                    }
                    answering = Some(i);
                    w.known.send_replace(Known::Service);
                }
            }
            // Waiting for a source. If the one that answered no longer knows the name, nobody
            // does for now: its endpoints must not keep serving while the next one thinks.
            Some(None) => {
                if answering.is_some_and(|i| !matches!(slots[i].said, Said::Known { .. })) {
                    answering = None;
                    w.dest.update(Vec::new());
                    w.dest.set_policy(Arc::default());
                    w.known.send_replace(Known::NoSuchService);
                }
            }
            None => {
                if answering.take().is_some() || *w.known.borrow() == Known::Waiting {
                    w.dest.update(Vec::new());
                    w.dest.set_policy(Arc::default());
                    w.known.send_replace(Known::NoSuchService);
                }
            }
        }
        let deadline = slots
            .iter()
            .filter_map(|s| match s.said {
                Said::Waiting(at) => Some(at + FIRST_ANSWER),
                _ => None,
            })
            .min();
        enum Event {
            Update(usize, Option<Update>),
            Late,
            Tick,
        }
        let next = std::future::poll_fn(|cx| {
            for (i, s) in slots.iter_mut().enumerate() {
                if let Some(st) = s.stream.as_mut()
                    && let Poll::Ready(item) = st.poll_next_unpin(cx)
                {
                    return Poll::Ready((i, item));
                }
            }
            Poll::Pending
        });
        let event = tokio::select! {
            (i, item) = next => Event::Update(i, item),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Event::Late,
            _ = idle_check.tick() => Event::Tick,
        };
        match event {
            Event::Update(i, Some(u)) => slots[i].apply(u),
            Event::Update(i, None) => {
                // The source ended the stream: what it said last stands.
                slots[i].stream = None;
                if let Said::Waiting(_) = slots[i].said {
                    slots[i].said = Said::Missing;
                }
            }
            Event::Late => {
                let now = Instant::now();
                for (i, s) in slots.iter_mut().enumerate() {
                    if let Said::Waiting(at) = s.said
                        && now >= at + FIRST_ANSWER
                    {
                        s.said = Said::Late;
                        tracing::warn!(service = %name, source = %sources[i].label, "no answer within {FIRST_ANSWER:?}; asking the next source until it answers");
                    }
                }
            }
            Event::Tick => {
                if retire_if_idle(&table, &name, &w, idle) || !current(&table, &name, &w) {
                    break;
                }
            }
        }
    }
    tracing::debug!(service = %name, "name idle; no longer followed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(name: &str, idle: Duration) -> Arc<Follow> {
        Arc::new(Follow {
            dest: Arc::new(Destination::new(name.into(), Vec::new())),
            known: watch::channel(Known::Service).0,
            last_used: Default::default(),
            // The watch was made `idle` ago; touching it marks it used now.
            epoch: Instant::now()
                .checked_sub(idle)
                .expect("uptime exceeds the test's idle"),
            pinned: false,
            cancel: Default::default(),
        })
    }

    #[test]
    fn a_full_watch_table_makes_room_only_from_idle_watches() {
        let mut busy: HashMap<String, Arc<Follow>> = (0..WATCH_MAX)
            .map(|i| {
                let w = watch(&format!("n{i}:80"), Duration::from_secs(120));
                w.touch();
                (format!("n{i}:80"), w)
            })
            .collect();
        assert!(!evict_idle(&mut busy), "watches in use were evicted");
        assert_eq!(busy.len(), WATCH_MAX);
        // Half of them untouched for two minutes: those go.
        let mut mixed: HashMap<String, Arc<Follow>> = (0..WATCH_MAX)
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
        // Evicted followers are told to stop at once (their tasks hold streams and watches).
        let gone = watch("gone:80", Duration::from_secs(120));
        let mut one = HashMap::from([("gone:80".to_string(), gone.clone())]);
        assert!(evict_idle(&mut one));
        assert!(gone.cancel.is_cancelled());
        // A static name is never evicted, however idle.
        let mut pinned = watch("static:80", Duration::from_secs(120));
        Arc::get_mut(&mut pinned).unwrap().pinned = true;
        let mut one = HashMap::from([("static:80".to_string(), pinned)]);
        evict_idle(&mut one);
        assert!(one.contains_key("static:80"));
    }

    #[test]
    fn idle_retirement_spares_a_watch_just_used() {
        let watches: Followed = Default::default();
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

    /// A test double of a discovery source (a fake: no registry behind it), whose streams
    /// the test drives by hand.
    #[derive(Default)]
    struct Fake {
        senders: Mutex<Vec<UpdateSender>>,
    }

    impl Discover for Fake {
        fn resolve(&self, _: Target<'_>) -> Option<Updates> {
            let (tx, rx) = Updates::channel(8);
            self.senders.lock().unwrap().push(tx);
            Some(rx)
        }
    }

    impl Fake {
        async fn send(&self, u: Update) {
            let tx = self.senders.lock().unwrap().last().cloned().expect("asked");
            tx.send(u).await.expect("followed");
        }
    }

    fn chain(sources: Vec<(&str, Arc<dyn Discover>)>, dns: bool) -> Destinations {
        Destinations::new(
            None,
            sources
                .into_iter()
                .map(|(label, source)| Source {
                    label: label.into(),
                    source,
                })
                .collect(),
            dns,
            Duration::from_secs(1),
            Duration::from_secs(600),
            Arc::new(Metrics::new()),
            None,
        )
    }

    fn spec(port: u16) -> EndpointSpec {
        EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// An endpoint whose QUIC port changes is rebuilt (like one whose identity changes); one
    /// that stays the same is kept, with its connections.
    #[test]
    fn a_changed_quic_port_rebuilds_the_endpoint() {
        let f = Factory {
            connect_timeout: Duration::from_secs(1),
            metrics: Arc::new(Metrics::new()),
            identity: None,
            quic: None,
        };
        let quic = |port, q| EndpointSpec {
            quic: q,
            ..spec(port)
        };
        let first = f.build("web:80", &[], &[quic(1, None), quic(2, Some(4143))]);
        assert_eq!(first[0].quic, None);
        assert_eq!(first[1].quic, Some(4143));
        let same = f.build("web:80", &first, &[quic(1, None), quic(2, Some(4143))]);
        assert!(Arc::ptr_eq(&first[0], &same[0]) && Arc::ptr_eq(&first[1], &same[1]));
        let changed = f.build("web:80", &same, &[quic(1, Some(5143)), quic(2, None)]);
        assert!(!Arc::ptr_eq(&same[0], &changed[0]) && !Arc::ptr_eq(&same[1], &changed[1]));
        assert_eq!((changed[0].quic, changed[1].quic), (Some(5143), None));
    }

    fn ports(d: &Destination) -> Vec<u16> {
        d.endpoints().iter().map(|e| e.addr.port()).collect()
    }

    /// A fake that records what it was asked and knows nothing.
    #[derive(Default)]
    struct Recorder {
        asked: Mutex<Vec<String>>,
    }

    impl Discover for Recorder {
        fn resolve(&self, t: Target<'_>) -> Option<Updates> {
            let kind = match t {
                Target::Name(_) => "name",
                Target::Addr(_) => "addr",
            };
            self.asked.lock().unwrap().push(format!("{kind} {t}"));
            Some(Updates::once(Update::DoesNotExist))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ip_port_authorities_are_asked_as_addresses_and_names_as_names() {
        let r = Arc::new(Recorder::default());
        let d = chain(vec![("r", r.clone())], false);
        for authority in ["web:80", "198.18.0.10:80", "[fd00::1]:443"] {
            assert!(
                d.resolve(authority).await.is_err(),
                "nobody knows {authority}"
            );
        }
        assert_eq!(
            *r.asked.lock().unwrap(),
            ["name web:80", "addr 198.18.0.10:80", "addr [fd00::1]:443"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_source_that_knows_a_name_answers_it() {
        let (a, b) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
        let d = chain(vec![("a", a.clone()), ("b", b.clone())], false);
        let first = tokio::spawn({
            let (a, b) = (a.clone(), b.clone());
            async move {
                // `a` does not know it: `b` is asked, and answers.
                while a.senders.lock().unwrap().is_empty() {
                    tokio::task::yield_now().await;
                }
                a.send(Update::DoesNotExist).await;
                while b.senders.lock().unwrap().is_empty() {
                    tokio::task::yield_now().await;
                }
                b.send(Update::Reset(vec![spec(2)])).await;
            }
        });
        let dest = d.resolve("web:80").await.expect("b answers");
        first.await.unwrap();
        assert_eq!(ports(&dest), [2]);
        // `a` learns the name later: it comes first, so it takes over, in place.
        a.send(Update::Reset(vec![spec(1)])).await;
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [1] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a took over");
        // Deltas apply; `a` forgetting the name hands it back to `b`, asked again.
        a.send(Update::Add(vec![spec(3)])).await;
        a.send(Update::Remove(vec![spec(1).addr])).await;
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [3] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("deltas applied");
        let asked = b.senders.lock().unwrap().len();
        a.send(Update::DoesNotExist).await;
        tokio::time::timeout(FIRST_ANSWER, async {
            while b.senders.lock().unwrap().len() == asked {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("b asked again");
        // While b thinks, nobody knows the name: a's old endpoints no longer serve.
        tokio::time::timeout(FIRST_ANSWER, async {
            while !ports(&dest).is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a's endpoints withdrawn");
        assert!(matches!(
            d.resolve("web:80").await,
            Err(ResolveError::Unknown { .. })
        ));
        b.send(Update::Reset(vec![spec(4)])).await;
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [4] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("b answers again");
        d.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_is_skipped_after_the_first_answer_deadline() {
        let silent = Arc::new(Fake::default());
        let statics = Arc::new(Static::default());
        statics.set("web:80", vec![spec(7)]);
        let d = chain(vec![("silent", silent.clone()), ("static", statics)], false);
        let started = Instant::now();
        let dest = d
            .resolve("web:80")
            .await
            .expect("the static source answers");
        assert_eq!(ports(&dest), [7]);
        // Not before the silent source had its full chance (the clock is paused: exact).
        assert!(started.elapsed() >= FIRST_ANSWER, "{:?}", started.elapsed());
        // A late answer from the first source wins.
        silent.send(Update::Reset(vec![spec(8)])).await;
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [8] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("late answer took over");
        d.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn names_no_source_knows_fail_without_dns_and_static_names_added_later_are_found() {
        let statics = Arc::new(Static::default());
        let d = chain(vec![("static", statics.clone())], false);
        match d.resolve("web:80").await {
            Err(ResolveError::Unknown { name }) => assert_eq!(name, "web:80"),
            other => panic!("expected Unknown, got {:?}", other.map(|d| ports(&d))),
        }
        statics.set("web:80", vec![spec(9)]);
        let dest = tokio::time::timeout(FIRST_ANSWER, async {
            loop {
                if let Ok(d) = d.resolve("web:80").await {
                    return d;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("found once added");
        assert_eq!(ports(&dest), [9]);
        // An existing destination is updated in place (requests holding it see the change).
        statics.set("web:80", vec![spec(9), spec(10)]);
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [9, 10] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("updated in place");
        d.stop();
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_arrives_with_the_endpoints_it_goes_with_and_follows_changes() {
        let statics = Arc::new(Static::default());
        statics.set("web:80", vec![spec(9)]);
        let two_s = Policy::new(Some(Duration::from_secs(2)), 1).expect("policy");
        assert!(statics.set_policy("web:80", two_s.clone()));
        assert!(
            !statics.set_policy("other:80", two_s.clone()),
            "unknown name"
        );
        let d = chain(vec![("static", statics.clone())], false);
        // The first answer already carries the policy: no request runs without it.
        let dest = d.resolve("web:80").await.expect("known");
        assert_eq!(**dest.policy_now(), two_s);
        // Changed live; endpoints replaced later keep it.
        let three = Policy::new(None, 3).expect("policy");
        statics.set_policy("web:80", three.clone());
        statics.set("web:80", vec![spec(9), spec(10)]);
        tokio::time::timeout(FIRST_ANSWER, async {
            while ports(&dest) != [9, 10] || **dest.policy_now() != three {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("policy and endpoints followed");
        d.stop();
    }

    #[test]
    fn reset_keeps_the_policy_and_does_not_exist_clears_it() {
        let mut slot = Slot::default();
        let p = Policy::new(None, 2).expect("policy");
        slot.apply(Update::Policy(Box::new(p.clone())));
        slot.apply(Update::Reset(vec![spec(1)]));
        assert_eq!(*slot.policy, p);
        assert!(matches!(slot.said, Said::Known { fresh: true, .. }));
        if let Said::Known { fresh, .. } = &mut slot.said {
            *fresh = false;
        }
        // A policy change alone makes the set fresh (to be published).
        slot.apply(Update::Policy(Box::default()));
        assert!(matches!(slot.said, Said::Known { fresh: true, .. }));
        slot.apply(Update::Policy(Box::new(p)));
        slot.apply(Update::DoesNotExist);
        assert!(slot.policy.is_default());
    }
}

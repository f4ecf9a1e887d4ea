//! Gateway API routes as a policy source, the GAMMA way (the pattern Linkerd and Istio follow):
//! an `HTTPRoute` or `GRPCRoute` (`gateway.networking.k8s.io/v1`) whose `parentRefs` name a
//! Service (`group: ""`, `kind: Service`) of the route's own namespace gives that Service's
//! routes, split and timeouts. remora installs no CRD: where the cluster has none, the watches
//! find nothing and stop quietly ([`super::kubernetes`]).
//!
//! What converts, into the fragments [`Policy`] already has:
//!
//! - **A rule with `matches`** and one backend (weight > 0) → [`Policy::routes`], one per
//!   match: `path` `PathPrefix` (matched as a prefix of characters), one `headers` entry of
//!   type `Exact`, or (GRPCRoute) a `method` (`/service/` or `/service/method`, the latter a
//!   prefix too). A rule without `backendRefs` keeps its requests on the Service itself (as
//!   GAMMA does).
//! - **The default rule** (no `matches`, or a match on everything: `PathPrefix /`) → its
//!   weighted `backendRefs` become [`Policy::split`] in whole percents (largest remainders);
//!   the share of the Service itself stays with it.
//! - **`timeouts.request`** → the default rule's is [`Policy::timeout`], a path rule's is a
//!   route timeout for its prefix; `0s` on the default rule means none. Only rules that can
//!   be reached count: a rule shadowed by an earlier one with the same match, or a default
//!   rule after the first, sets nothing.
//! - **Order.** Rules from all the routes on a Service are merged the way the Gateway API ranks
//!   them: path prefixes, longest first, before header and method matches; then the older
//!   route, then the route's name, then the rule's order. The first match wins. Past
//!   [`MAX_ROUTES`] matched rules, the lowest-ranked are dropped (logged once, naming the
//!   routes that lost rules).
//!
//! Anything the model cannot express refuses the route, with an error naming the route, the
//! field and why: `filters`, `Exact` or regex paths, regex headers, `queryParams`, HTTP
//! `method`, a header AND a path in one match, more than one header, several backends on a
//! matched rule, a backend in another namespace (no ReferenceGrant is read) or of another kind,
//! `timeouts.backendRequest`, `retry`, `sessionPersistence`, non-empty `hostnames`, and any
//! unknown field. A refusal is per route, as the Gateway API's acceptance is: the Service's
//! other routes still apply, and the refused route applies as it last converted (when this
//! process saw it good), else not at all. Conversions are kept per route and Service and redone
//! only when the route's spec or the Service's ports change.
//!
//! Requests that no rule matches stay with the Service (the Gateway API would answer 404).
//! A Service's routes apply to all of its ports, so a `parentRefs[].port` or a
//! `backendRefs[].port` must be the Service's only port; a routed request goes to the same
//! port of the backend Service.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::Event;
use remora_certs::policy::{MAX_ROUTES, MAX_TIMEOUT, Match, Split};
use remora_certs::{Policy, Route as PolicyRoute};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::kubernetes::{ServiceKey, is_label};

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The version read: `v1`, where both route kinds are standard.
pub const VERSION: &str = "v1";

/// How long a route watch may fail (other than 404 or 403) before its first list before
/// publishing stops waiting for it: long enough for an API server hiccup at start not to
/// publish Services without their routes, short enough that a broken watch never holds back
/// discovery.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The two route kinds remora reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Http,
    Grpc,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Http, Kind::Grpc];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Http => "HTTPRoute",
            Kind::Grpc => "GRPCRoute",
        }
    }

    /// The plural resource name, as RBAC rules and URLs spell it.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Http => "httproutes",
            Kind::Grpc => "grpcroutes",
        }
    }

    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, VERSION, self.name()),
            self.plural(),
        )
    }
}

/// A route as kept between events: only what the conversion reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// For precedence between routes: the older one first.
    created: Option<Time>,
    /// The Services of the route's namespace it attaches to.
    parents: BTreeSet<String>,
    spec: Value,
    /// Changes whenever what the conversion reads changes: conversions made from another
    /// stamp are redone.
    stamp: u64,
}

/// A route's identity: kind, namespace, name.
type RouteKey = (Kind, String, String);

impl Route {
    /// The route kept from an object, or `None` when it attaches to no Service of its own
    /// namespace (a Gateway's route, or a consumer route: not remora's, not kept).
    pub fn from_object(kind: Kind, o: DynamicObject) -> Option<Route> {
        let namespace = o.metadata.namespace.filter(|n| !n.is_empty())?;
        let name = o.metadata.name.filter(|n| !n.is_empty())?;
        let mut data = o.data;
        let spec = data.get_mut("spec").map(Value::take).unwrap_or(Value::Null);
        let mut parents = BTreeSet::new();
        for p in spec
            .get("parentRefs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(svc) = service_parent(p) else {
                continue;
            };
            let ns = p.get("namespace").and_then(Value::as_str);
            if ns.is_none_or(|n| n == namespace) {
                parents.insert(svc.to_string());
            } else {
                // A consumer route applies to callers of one namespace only; the policy a
                // Service publishes applies to every caller, so it cannot be expressed.
                tracing::info!(route = %format!("{namespace}/{name}"),
                    "{} {namespace}/{name}: its parentRef to Service {}/{svc} is a consumer route (another namespace), which remora does not apply; attach the route from the Service's own namespace",
                    kind.name(), ns.unwrap_or_default());
            }
        }
        if parents.is_empty() {
            return None;
        }
        Some(Route {
            kind,
            namespace,
            name,
            created: o.metadata.creation_timestamp,
            parents,
            spec,
            stamp: 0,
        })
    }

    /// `HTTPRoute ns/name`.
    fn label(&self) -> String {
        format!("{} {}/{}", self.kind.name(), self.namespace, self.name)
    }

    fn key(&self) -> RouteKey {
        (self.kind, self.namespace.clone(), self.name.clone())
    }

    /// Whether `o` converts the same (a status-only update does).
    fn same(&self, o: &Route) -> bool {
        (&self.created, &self.parents, &self.spec) == (&o.created, &o.parents, &o.spec)
    }

    /// The Gateway API's precedence between routes: the older, then by name.
    fn precedence(&self) -> (&Option<Time>, &str, &str, Kind) {
        (&self.created, &self.namespace, &self.name, self.kind)
    }
}

/// The Service a parentRef names, if it names one (`group` `""` or `core`, `kind: Service`;
/// the Gateway API defaults are a Gateway).
fn service_parent(p: &Value) -> Option<&str> {
    let group = p.get("group").and_then(Value::as_str).unwrap_or(GROUP);
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    if !matches!(group, "" | "core") || kind != "Service" {
        return None;
    }
    p.get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

/// Whether the routes of one kind are being listed, and whether the API server serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listing {
    /// Not watched (tests of the source without routes).
    Off,
    /// Watched, first answer not in yet: publishing waits for it.
    Pending,
    Listed,
    /// The API server does not serve the kind (no CRD): no routes.
    Unavailable,
    /// Not listed yet, but publishing stopped waiting (403, or failures for [`PATIENCE`]): the
    /// routes already read stay, the watch goes on retrying.
    Unreadable,
}

#[derive(Debug)]
struct Kinded {
    items: BTreeMap<(String, String), Route>,
    relist: Option<BTreeMap<(String, String), Route>>,
    listing: Listing,
    /// While pending: when the watch first failed.
    failing_since: Option<Instant>,
}

impl Default for Kinded {
    fn default() -> Self {
        Kinded {
            items: BTreeMap::new(),
            relist: None,
            listing: Listing::Off,
            failing_since: None,
        }
    }
}

/// One route's conversion for one Service it attaches to.
#[derive(Debug, Default)]
struct Conversion {
    /// What it was converted from: the route's stamp and the Service's ports.
    from: Option<(u64, Vec<u16>)>,
    /// The last good conversion: this one's, or the one before a refused edit.
    good: Option<Arc<Converted>>,
}

/// The routes attached to Services, by kind, as last seen, and what they convert to.
#[derive(Debug, Default)]
pub struct Routes {
    http: Kinded,
    grpc: Kinded,
    /// The routes attached to each Service.
    by_service: BTreeMap<ServiceKey, BTreeSet<RouteKey>>,
    /// Each route's conversion for each Service (by name) it attaches to; dropped with the
    /// route, the attachment or the Service.
    converted: BTreeMap<(RouteKey, String), Conversion>,
    /// The overflow past [`MAX_ROUTES`] last logged for each Service.
    overflow: BTreeMap<ServiceKey, String>,
    last_stamp: u64,
}

/// What a route event changed.
pub enum RoutesChanged {
    Nothing,
    /// A list completed or the kind went away: every Service may have changed.
    All,
    /// These Services (the route's parents before and after).
    Services(BTreeSet<ServiceKey>),
}

fn parents_of(r: &Route) -> BTreeSet<ServiceKey> {
    r.parents
        .iter()
        .map(|p| (r.namespace.clone(), p.clone()))
        .collect()
}

impl Routes {
    fn kinded(&mut self, kind: Kind) -> &mut Kinded {
        match kind {
            Kind::Http => &mut self.http,
            Kind::Grpc => &mut self.grpc,
        }
    }

    fn stamp(&mut self) -> u64 {
        self.last_stamp += 1;
        self.last_stamp
    }

    /// Marks both kinds as watched: publishing waits for their first answer.
    pub fn follow(&mut self) {
        for k in Kind::ALL {
            self.kinded(k).listing = Listing::Pending;
        }
    }

    /// Whether a watched kind has not answered yet.
    pub fn pending(&self) -> bool {
        [&self.http, &self.grpc]
            .iter()
            .any(|k| k.listing == Listing::Pending)
    }

    /// Applies one watch event of `kind`.
    pub fn apply(&mut self, kind: Kind, ev: Event<DynamicObject>) -> RoutesChanged {
        let key =
            |o: &DynamicObject| Some((o.metadata.namespace.clone()?, o.metadata.name.clone()?));
        match ev {
            Event::Init => {
                self.kinded(kind).relist = Some(BTreeMap::new());
                RoutesChanged::Nothing
            }
            Event::InitApply(o) => {
                if let (Some(buf), Some(key)) = (&mut self.kinded(kind).relist, key(&o))
                    && let Some(r) = Route::from_object(kind, o)
                {
                    buf.insert(key, r);
                }
                RoutesChanged::Nothing
            }
            Event::InitDone => {
                if let Some(mut listed) = self.kinded(kind).relist.take() {
                    // A route the list shows unchanged keeps its conversions.
                    for (key, r) in &mut listed {
                        r.stamp = match self.kinded(kind).items.get(key) {
                            Some(old) if old.same(r) => old.stamp,
                            _ => self.stamp(),
                        };
                    }
                    self.kinded(kind).items = listed;
                    self.reindex();
                }
                let k = self.kinded(kind);
                if k.listing != Listing::Listed {
                    tracing::info!(routes = k.items.len(), "{}s listed", kind.name());
                }
                k.listing = Listing::Listed;
                k.failing_since = None;
                RoutesChanged::All
            }
            Event::Apply(o) => {
                let Some(key) = key(&o) else {
                    return RoutesChanged::Nothing;
                };
                let new = Route::from_object(kind, o);
                let old = self.kinded(kind).items.get(&key);
                if let (Some(old), Some(new)) = (old, &new)
                    && old.same(new)
                {
                    // A status update (the status is not kept): nothing to redo.
                    return RoutesChanged::Nothing;
                }
                let before = old.map(|r| r.parents.clone()).unwrap_or_default();
                let mut touched: BTreeSet<ServiceKey> = old.map(parents_of).unwrap_or_default();
                let rkey = (kind, key.0.clone(), key.1.clone());
                match new {
                    Some(mut new) => {
                        touched.extend(parents_of(&new));
                        let after = new.parents.clone();
                        new.stamp = self.stamp();
                        self.kinded(kind).items.insert(key, new);
                        self.attach(&rkey, &before, &after);
                    }
                    None => {
                        self.kinded(kind).items.remove(&key);
                        self.attach(&rkey, &before, &BTreeSet::new());
                    }
                }
                if touched.is_empty() {
                    return RoutesChanged::Nothing;
                }
                RoutesChanged::Services(touched)
            }
            Event::Delete(o) => {
                let Some(key) = key(&o) else {
                    return RoutesChanged::Nothing;
                };
                match self.kinded(kind).items.remove(&key) {
                    Some(r) => {
                        self.attach(&r.key(), &r.parents, &BTreeSet::new());
                        RoutesChanged::Services(parents_of(&r))
                    }
                    None => RoutesChanged::Nothing,
                }
            }
        }
    }

    /// Route `key` (of namespace `key.1`) moved from Services `before` to `after`: the index
    /// follows, and its conversions for Services it left go.
    fn attach(&mut self, key: &RouteKey, before: &BTreeSet<String>, after: &BTreeSet<String>) {
        for svc in before.difference(after) {
            let skey = (key.1.clone(), svc.clone());
            if let Some(set) = self.by_service.get_mut(&skey) {
                set.remove(key);
                if set.is_empty() {
                    self.by_service.remove(&skey);
                }
            }
            self.converted.remove(&(key.clone(), svc.clone()));
        }
        for svc in after.difference(before) {
            self.by_service
                .entry((key.1.clone(), svc.clone()))
                .or_default()
                .insert(key.clone());
        }
    }

    /// Rebuilds the index after a list or a kind going away; conversions of routes or
    /// attachments that are gone go too.
    fn reindex(&mut self) {
        let mut by: BTreeMap<ServiceKey, BTreeSet<RouteKey>> = BTreeMap::new();
        for r in self.http.items.values().chain(self.grpc.items.values()) {
            for p in &r.parents {
                by.entry((r.namespace.clone(), p.clone()))
                    .or_default()
                    .insert(r.key());
            }
        }
        self.converted.retain(|(key, svc), _| {
            by.get(&(key.1.clone(), svc.clone()))
                .is_some_and(|s| s.contains(key))
        });
        self.by_service = by;
    }

    /// Service `svc` is gone: its conversions and overflow note go (a Service of that name
    /// created later converts afresh).
    pub fn forget(&mut self, svc: &ServiceKey) {
        self.overflow.remove(svc);
        for key in self.by_service.get(svc).into_iter().flatten() {
            self.converted.remove(&(key.clone(), svc.1.clone()));
        }
    }

    /// The API server does not serve `kind` (404: no CRD): no routes of that kind. `All` when
    /// that changed something.
    pub fn unavailable(&mut self, kind: Kind) -> RoutesChanged {
        let k = self.kinded(kind);
        let was = k.listing;
        let had = !k.items.is_empty();
        k.items.clear();
        k.relist = None;
        k.listing = Listing::Unavailable;
        k.failing_since = None;
        if had {
            self.reindex();
        }
        if had || was == Listing::Pending {
            RoutesChanged::All
        } else {
            RoutesChanged::Nothing
        }
    }

    /// The watch of `kind` failed (other than 404). Before its first list: refused (403,
    /// `forbidden`), publishing stops waiting for it at once, since that lasts until someone
    /// fixes the RBAC; any other failure (a transport error, a 5xx while the API server
    /// starts) is waited out for up to [`PATIENCE`] from the first one, so a hiccup does not
    /// publish Services without their routes. The watch goes on retrying either way, and the
    /// routes already read stay.
    pub fn failed(&mut self, kind: Kind, forbidden: bool, now: Instant) -> RoutesChanged {
        let k = self.kinded(kind);
        if k.listing != Listing::Pending {
            return RoutesChanged::Nothing;
        }
        if forbidden {
            k.listing = Listing::Unreadable;
            return RoutesChanged::All;
        }
        k.failing_since.get_or_insert(now);
        self.overdue(now)
    }

    /// When publishing stops waiting for a failing route watch, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        [&self.http, &self.grpc]
            .iter()
            .filter(|k| k.listing == Listing::Pending)
            .filter_map(|k| k.failing_since)
            .map(|t| t + PATIENCE)
            .min()
    }

    /// Stops waiting for the route watches that have failed for [`PATIENCE`] (one log line
    /// each). `All` when one stopped.
    pub fn overdue(&mut self, now: Instant) -> RoutesChanged {
        let mut changed = RoutesChanged::Nothing;
        for kind in Kind::ALL {
            let k = self.kinded(kind);
            if k.listing == Listing::Pending && k.failing_since.is_some_and(|t| now >= t + PATIENCE)
            {
                k.listing = Listing::Unreadable;
                tracing::warn!(
                    "{}s could not be listed for {}s (the errors are above): Services are published without waiting for them; the watch goes on retrying and their routes apply once it lists them",
                    kind.name(),
                    PATIENCE.as_secs()
                );
                changed = RoutesChanged::All;
            }
        }
        changed
    }

    /// Whether `kind` was found unavailable (so its watch is stopped).
    pub fn is_unavailable(&self, kind: Kind) -> bool {
        match kind {
            Kind::Http => self.http.listing == Listing::Unavailable,
            Kind::Grpc => self.grpc.listing == Listing::Unavailable,
        }
    }

    /// The routes attached to Service `svc`.
    pub fn attached(&self, svc: &ServiceKey) -> Vec<&Route> {
        self.by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|(kind, ns, name)| {
                let k = match kind {
                    Kind::Http => &self.http,
                    Kind::Grpc => &self.grpc,
                };
                k.items.get(&(ns.clone(), name.clone()))
            })
            .collect()
    }

    /// What the routes attached to Service `svc` (whose TCP ports are `ports`) give: each
    /// route converted once per change of its spec or of the ports (a refusal logged then,
    /// naming the route and the field); a refused route applies as it last converted, if it
    /// ever did, else not at all. The rest of the Service's routes apply either way.
    pub fn fragment(&mut self, svc: &ServiceKey, ports: &[u16]) -> Fragment {
        let Some(keys) = self.by_service.get(svc) else {
            self.overflow.remove(svc);
            return Fragment::default();
        };
        let mut using: Vec<(&Route, Arc<Converted>)> = Vec::new();
        for key in keys {
            let (kind, ns, name) = key;
            let k = match kind {
                Kind::Http => &self.http,
                Kind::Grpc => &self.grpc,
            };
            let Some(route) = k.items.get(&(ns.clone(), name.clone())) else {
                continue;
            };
            let c = self
                .converted
                .entry((key.clone(), svc.1.clone()))
                .or_default();
            let from = (route.stamp, ports.to_vec());
            if c.from.as_ref() != Some(&from) {
                c.from = Some(from);
                match convert(route, svc, ports) {
                    Ok(v) => c.good = Some(Arc::new(v)),
                    Err(e) => {
                        let (ns, name) = svc;
                        let then = if c.good.is_some() {
                            format!("Service {ns}/{name} keeps the route's last good rules")
                        } else {
                            format!(
                                "the route does not apply to Service {ns}/{name} (its other routes and its annotations do)"
                            )
                        };
                        tracing::warn!(route = %route.label(), service = %format!("{ns}/{name}"), "{e}; {then}");
                    }
                }
            }
            if let Some(good) = &c.good {
                using.push((route, good.clone()));
            }
        }
        let using: Vec<(&Route, &Converted)> = using.iter().map(|(r, c)| (*r, &**c)).collect();
        let (f, overflow) = merge(&using);
        match overflow {
            Some(why) => {
                if self.overflow.get(svc) != Some(&why) {
                    let (ns, name) = svc;
                    tracing::warn!(service = %format!("{ns}/{name}"), "Service {ns}/{name}: {why}");
                    self.overflow.insert(svc.clone(), why);
                }
            }
            None => {
                self.overflow.remove(svc);
            }
        }
        f
    }
}

/// The policy of Service `svc` with what its routes give applied: routes and split from the
/// routes, timeouts from them when a reachable rule sets one (else the annotations'),
/// everything else as `annotated` has it. Unchanged when no route applies.
pub fn apply(annotated: Policy, svc: &ServiceKey, f: &Fragment) -> Result<Policy, String> {
    if !f.applied {
        return Ok(annotated);
    }
    let whose = || format!("the routes of Service {}/{}", svc.0, svc.1);
    let mut p = annotated
        .with_routes(f.routes.clone())
        .map_err(|e| format!("{}: {e}", whose()))?
        .with_split(f.split.clone())
        .map_err(|e| format!("{}: split: {e}", whose()))?;
    if f.sets_timeouts {
        p = p
            .with_route_timeouts(f.route_timeouts.clone())
            .map_err(|e| format!("{}: {e}", whose()))?;
        p.timeout = f.timeout;
    }
    Ok(p)
}

/// What the routes attached to one Service give.
#[derive(Debug, Default, PartialEq)]
pub struct Fragment {
    /// Targets are Service names of the namespace (expanded per port when published).
    pub routes: Vec<PolicyRoute>,
    pub split: Vec<Split>,
    pub timeout: Option<Duration>,
    pub route_timeouts: Vec<(String, Duration)>,
    /// A reachable rule set `timeouts.request`: the timeouts above replace the annotation's.
    pub sets_timeouts: bool,
    /// Some route applies: the routes and split above replace the annotations'.
    pub applied: bool,
}

/// One matched rule of a route.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    when: Match,
    to: String,
    /// The rule's `timeouts.request` (a path rule's only).
    timeout: Option<Duration>,
    /// Rule index, match index: the Gateway API's tie-breakers within a route.
    at: (usize, usize),
}

impl Entry {
    /// Longer path prefixes rank first; header and method matches (whose path is `/`) after
    /// every longer prefix.
    fn reach(&self) -> std::cmp::Reverse<usize> {
        std::cmp::Reverse(match &self.when {
            Match::PathPrefix(p) => p.len(),
            Match::Header { .. } => 1,
        })
    }
}

/// What one route gives one Service.
#[derive(Debug, PartialEq)]
pub struct Converted {
    /// Its matched rules in its own precedence order, repeats removed, at most
    /// [`MAX_ROUTES`] (a rule past those could not survive the merge either).
    entries: Vec<Entry>,
    /// Matched rules past [`MAX_ROUTES`] within this route alone.
    dropped: usize,
    /// Its first default rule's split and `timeouts.request` (`Some(None)`: `0s`).
    default: Option<(Vec<Split>, Option<Option<Duration>>)>,
}

/// Merges the conversions of the routes on one Service in the Gateway API's precedence; the
/// note to log when rules past [`MAX_ROUTES`] were dropped.
fn merge(routes: &[(&Route, &Converted)]) -> (Fragment, Option<String>) {
    let mut routes = routes.to_vec();
    routes.sort_by(|a, b| a.0.precedence().cmp(&b.0.precedence()));
    let mut all: Vec<(usize, &Entry)> = routes
        .iter()
        .enumerate()
        .flat_map(|(rank, (_, c))| c.entries.iter().map(move |e| (rank, e)))
        .collect();
    all.sort_by_key(|(rank, e)| (e.reach(), *rank, e.at));
    // A repeated match is never reached: the first one takes its requests.
    let mut seen = HashSet::new();
    let mut kept: Vec<(usize, &Entry)> = all
        .into_iter()
        .filter(|(_, e)| seen.insert(&e.when))
        .collect();
    // Past MAX_ROUTES: the lowest-ranked go, and the note names whose.
    let mut lost: BTreeMap<usize, usize> = routes
        .iter()
        .enumerate()
        .filter(|(_, (_, c))| c.dropped > 0)
        .map(|(rank, (_, c))| (rank, c.dropped))
        .collect();
    for (rank, _) in kept.iter().skip(MAX_ROUTES) {
        *lost.entry(*rank).or_default() += 1;
    }
    kept.truncate(MAX_ROUTES);
    let overflow = (!lost.is_empty()).then(|| {
        let whose: Vec<String> = lost
            .iter()
            .map(|(rank, n)| format!("{} ({n})", routes[*rank].0.label()))
            .collect();
        format!(
            "its routes have more than {MAX_ROUTES} matched rules; the lowest-ranked are not applied: {}; remove or merge rules",
            whose.join(", ")
        )
    });
    let mut f = Fragment {
        applied: !routes.is_empty(),
        ..Fragment::default()
    };
    // The first default rule in precedence order wins; a later one is never reached.
    if let Some((split, timeout)) = routes.iter().find_map(|(_, c)| c.default.as_ref()) {
        f.split = split.clone();
        if let Some(t) = timeout {
            f.sets_timeouts = true;
            f.timeout = *t;
        }
    }
    f.sets_timeouts |= kept.iter().any(|(_, e)| e.timeout.is_some());
    for (_, e) in &kept {
        let Match::PathPrefix(p) = &e.when else {
            continue;
        };
        match e.timeout {
            Some(d) => f.route_timeouts.push((p.clone(), d)),
            // A longer prefix without a timeout would take a shorter one's (the longest
            // matching prefix wins): it gets the default explicitly. With no default there is
            // nothing to give ("no timeout" per prefix cannot be expressed): it inherits.
            None => {
                let shadowed = kept.iter().any(|(_, o)| {
                    matches!(&o.when, Match::PathPrefix(q) if q.len() < p.len() && p.starts_with(q.as_str()))
                        && o.timeout.is_some()
                });
                if let (true, Some(d)) = (shadowed, f.timeout) {
                    f.route_timeouts.push((p.clone(), d));
                }
            }
        }
    }
    f.routes = kept
        .into_iter()
        .map(|(_, e)| PolicyRoute {
            when: e.when.clone(),
            to: e.to.clone(),
        })
        .collect();
    (f, overflow)
}

/// Converts one route for Service `svc` (whose TCP ports are `ports`); the error names the
/// route, the field and why.
fn convert(route: &Route, svc: &ServiceKey, ports: &[u16]) -> Result<Converted, String> {
    let cx = Cx { route, svc, ports };
    cx.check_spec()?;
    let rules = route.spec.get("rules").map(|r| cx.array(r, "spec.rules"));
    let rules = match rules {
        Some(r) => r?,
        None => &[][..],
    };
    let mut entries = Vec::new();
    let mut default = None;
    for (ri, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        let rule = cx.object(rule, &at)?;
        let allowed: &[&str] = match route.kind {
            Kind::Http => &["name", "matches", "backendRefs", "timeouts"],
            Kind::Grpc => &["name", "matches", "backendRefs"],
        };
        cx.only(rule, &at, allowed)?;
        let backends = cx.backends(rule, &at)?;
        let timeout = cx.timeout(rule, &at)?;
        let matches = match rule.get("matches") {
            Some(m) => cx.array(m, &format!("{at}.matches"))?,
            None => &[][..],
        };
        // No matches: the rule takes every request.
        let mut catch_all = matches.is_empty();
        for (mi, m) in matches.iter().enumerate() {
            let mat = format!("{at}.matches[{mi}]");
            match cx.one_match(m, &mat)? {
                None => catch_all = true,
                Some(when) => {
                    let to = cx.single_backend(&backends, &at)?;
                    let timeout = match (timeout, &when) {
                        (None, _) => None,
                        (Some(Some(d)), Match::PathPrefix(_)) => Some(d),
                        (Some(None), Match::PathPrefix(_)) => {
                            return Err(cx.refuse(
                                &format!("{at}.timeouts.request"),
                                "0s (no timeout) on a matched rule cannot be expressed; leave timeouts out so the default rule's applies",
                            ));
                        }
                        (Some(_), Match::Header { .. }) => {
                            return Err(cx.refuse(
                                &format!("{at}.timeouts"),
                                "a timeout on a header- or method-matched rule cannot be expressed (remora's per-route timeouts are by path prefix); put it on a path rule or the default rule",
                            ));
                        }
                    };
                    entries.push(Entry {
                        when,
                        to,
                        timeout,
                        at: (ri, mi),
                    });
                }
            }
        }
        if catch_all {
            // Every default rule is checked; only the first is ever reached.
            let split = cx.split(&backends, &at)?;
            Policy::default()
                .with_split(split.clone())
                .map_err(|e| cx.refuse(&format!("{at}.backendRefs"), &e))?;
            if default.is_none() {
                default = Some((split, timeout));
            }
        }
    }
    entries.sort_by_key(|e| (e.reach(), e.at));
    let mut seen = HashSet::new();
    let mut kept: Vec<Entry> = Vec::new();
    for e in entries {
        if seen.insert(e.when.clone()) {
            kept.push(e);
        }
    }
    let dropped = kept.len().saturating_sub(MAX_ROUTES);
    kept.truncate(MAX_ROUTES);
    Ok(Converted {
        entries: kept,
        dropped,
        default,
    })
}

/// One backend of a rule: a Service of the namespace and its weight.
struct Backend {
    name: String,
    weight: u64,
}

/// The conversion of one route for one Service: where errors point.
struct Cx<'a> {
    route: &'a Route,
    svc: &'a ServiceKey,
    ports: &'a [u16],
}

impl Cx<'_> {
    fn refuse(&self, field: &str, why: &str) -> String {
        format!("{}: refused: {field}: {why}", self.route.label())
    }

    fn object<'v>(&self, v: &'v Value, at: &str) -> Result<&'v Map<String, Value>, String> {
        v.as_object()
            .ok_or_else(|| self.refuse(at, "is not an object"))
    }

    fn array<'v>(&self, v: &'v Value, at: &str) -> Result<&'v [Value], String> {
        v.as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| self.refuse(at, "is not a list"))
    }

    fn string<'v>(
        &self,
        o: &'v Map<String, Value>,
        key: &str,
        at: &str,
    ) -> Result<Option<&'v str>, String> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.refuse(&format!("{at}.{key}"), "is not a string")),
        }
    }

    /// Refuses any field of `o` outside `allowed`, naming what it is when it is a known
    /// Gateway API feature remora does not do. Empty lists count as absent.
    fn only(&self, o: &Map<String, Value>, at: &str, allowed: &[&str]) -> Result<(), String> {
        for (k, v) in o {
            if allowed.contains(&k.as_str()) || v.is_null() {
                continue;
            }
            if v.as_array().is_some_and(Vec::is_empty) {
                continue;
            }
            let why = match k.as_str() {
                "filters" => {
                    "filters are not supported (remora does not rewrite, redirect or mirror requests); remove them"
                }
                "queryParams" => {
                    "query parameter matches are not supported; match a header or a path prefix"
                }
                "method" => {
                    "HTTP method matches are not supported; match a header or a path prefix"
                }
                "retry" => {
                    "route retries are not supported; use the Service's remora.io/retries annotation"
                }
                "sessionPersistence" => "session persistence is not supported; remove it",
                "backendRequest" => {
                    "timeouts.backendRequest is not supported; use timeouts.request"
                }
                "sectionName" => {
                    "sectionName is not supported; name the Service port with port, or leave it out"
                }
                "hostnames" => "hostnames do not apply to a Service parent; remove them",
                _ => "is not a field remora understands; remove it",
            };
            return Err(self.refuse(&format!("{at}.{k}"), why));
        }
        Ok(())
    }

    fn check_spec(&self) -> Result<(), String> {
        let spec = self.object(&self.route.spec, "spec")?;
        self.only(spec, "spec", &["parentRefs", "rules"])?;
        // The parentRefs to this Service: the port, when given, must be its only port.
        let refs = match spec.get("parentRefs") {
            Some(r) => self.array(r, "spec.parentRefs")?,
            None => &[][..],
        };
        for (i, p) in refs.iter().enumerate() {
            if service_parent(p) != Some(self.svc.1.as_str())
                || p.get("namespace")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n != self.svc.0)
            {
                continue;
            }
            let at = format!("spec.parentRefs[{i}]");
            let o = self.object(p, &at)?;
            self.only(o, &at, &["group", "kind", "namespace", "name", "port"])?;
            if let Some(port) = o.get("port") {
                self.port(port, &format!("{at}.port"))?;
            }
        }
        Ok(())
    }

    /// A port given in a parentRef or a backendRef: it must be the Service's only port, since
    /// a Service's policy applies to all its ports and routed requests keep their port.
    fn port(&self, v: &Value, at: &str) -> Result<(), String> {
        let Some(port) = v.as_u64().and_then(|p| u16::try_from(p).ok()) else {
            return Err(self.refuse(at, "is not a port number"));
        };
        let (ns, name) = self.svc;
        match self.ports {
            [only] if *only == port => Ok(()),
            [only] => Err(self.refuse(
                at,
                &format!("{port} is not the port of Service {ns}/{name} ({only}); remora sends a routed request to the same port of the backend Service, so give {only} or leave it out"),
            )),
            ports => Err(self.refuse(
                at,
                &format!("Service {ns}/{name} has ports {ports:?}; remora applies a Service's routes to all its ports and sends a routed request to the same port of the backend Service, so leave the port out"),
            )),
        }
    }

    fn backends(&self, rule: &Map<String, Value>, at: &str) -> Result<Vec<Backend>, String> {
        let refs = match rule.get("backendRefs") {
            Some(r) => self.array(r, &format!("{at}.backendRefs"))?,
            None => &[][..],
        };
        let mut out: Vec<Backend> = Vec::new();
        for (i, b) in refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{i}]");
            let o = self.object(b, &at)?;
            self.only(
                o,
                &at,
                &["group", "kind", "name", "namespace", "port", "weight"],
            )?;
            let group = self.string(o, "group", &at)?.unwrap_or("");
            let kind = self.string(o, "kind", &at)?.unwrap_or("Service");
            if !matches!(group, "" | "core") || kind != "Service" {
                return Err(self.refuse(
                    &format!("{at}.kind"),
                    &format!("a backend of kind {kind:?} (group {group:?}) is not supported; name a Service"),
                ));
            }
            if let Some(ns) = self.string(o, "namespace", &at)?
                && ns != self.route.namespace
            {
                return Err(self.refuse(
                    &format!("{at}.namespace"),
                    &format!("a backend in another namespace ({ns}) needs a ReferenceGrant, which remora does not read; name a Service of namespace {}", self.route.namespace),
                ));
            }
            let name = self.string(o, "name", &at)?.unwrap_or("");
            if !is_label(name) {
                return Err(self.refuse(
                    &format!("{at}.name"),
                    &format!("{name:?} is not a Service name"),
                ));
            }
            if let Some(p) = o.get("port") {
                self.port(p, &format!("{at}.port"))?;
            }
            let weight = match o.get("weight") {
                None | Some(Value::Null) => 1,
                Some(w) => w.as_u64().filter(|w| *w <= 1_000_000).ok_or_else(|| {
                    self.refuse(&format!("{at}.weight"), "is not a weight from 0 to 1000000")
                })?,
            };
            match out.iter_mut().find(|b| b.name == name) {
                Some(b) => b.weight += weight,
                None => out.push(Backend {
                    name: name.to_string(),
                    weight,
                }),
            }
        }
        Ok(out)
    }

    /// The one target of a matched rule: its one backend with weight, or the Service itself
    /// when it has none listed.
    fn single_backend(&self, backends: &[Backend], at: &str) -> Result<String, String> {
        if backends.is_empty() {
            return Ok(self.svc.1.clone());
        }
        let live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
        match live.as_slice() {
            [one] => Ok(one.name.clone()),
            [] => Err(self.refuse(
                &format!("{at}.backendRefs"),
                "every backend has weight 0, so the Gateway API would answer 500, which remora cannot; give one a weight",
            )),
            _ => Err(self.refuse(
                &format!("{at}.backendRefs"),
                "a rule with matches can send to one backend only (remora splits only the default rule); give it one backendRef, or move the split to a rule without matches",
            )),
        }
    }

    /// The default rule's backends as whole-percent shares (largest remainders, so they add up
    /// to 100); the Service's own share stays with it.
    fn split(&self, backends: &[Backend], at: &str) -> Result<Vec<Split>, String> {
        let total: u64 = backends.iter().map(|b| b.weight).sum();
        if backends.is_empty() {
            return Ok(Vec::new());
        }
        if total == 0 {
            return Err(self.refuse(
                &format!("{at}.backendRefs"),
                "every backend has weight 0, so the Gateway API would answer 500, which remora cannot; give one a weight",
            ));
        }
        let mut shares: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| (b.weight * 100 / total, b.weight * 100 % total))
            .collect();
        let short = 100 - shares.iter().map(|s| s.0).sum::<u64>();
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(shares[i].1));
        for &i in order.iter().take(short as usize) {
            shares[i].0 += 1;
        }
        let mut out = Vec::new();
        for (i, (b, (pct, _))) in backends.iter().zip(shares).enumerate() {
            if b.weight > 0 && pct == 0 {
                return Err(self.refuse(
                    &format!("{at}.backendRefs[{i}].weight"),
                    &format!(
                        "{} of {total} is less than 1 %; remora splits in whole percents",
                        b.weight
                    ),
                ));
            }
            if b.name != self.svc.1 && pct > 0 {
                out.push(Split {
                    to: b.name.clone(),
                    percent: u32::try_from(pct).unwrap_or(100),
                });
            }
        }
        Ok(out)
    }

    /// `timeouts.request`: `None` when not set, `Some(None)` for `0s` (no timeout).
    fn timeout(
        &self,
        rule: &Map<String, Value>,
        at: &str,
    ) -> Result<Option<Option<Duration>>, String> {
        let Some(t) = rule.get("timeouts").filter(|t| !t.is_null()) else {
            return Ok(None);
        };
        let at = format!("{at}.timeouts");
        let o = self.object(t, &at)?;
        self.only(o, &at, &["request"])?;
        let Some(v) = self.string(o, "request", &at)? else {
            return Ok(None);
        };
        let at = format!("{at}.request");
        let d = gateway_duration(v).ok_or_else(|| {
            self.refuse(
                &at,
                &format!("{v:?} is not a Gateway API duration; write e.g. 500ms, 10s or 1m30s"),
            )
        })?;
        if d.is_zero() {
            return Ok(Some(None));
        }
        if d < Duration::from_millis(1) || d > MAX_TIMEOUT {
            return Err(self.refuse(
                &at,
                &format!("{v} is out of range; use 1ms to {}s", MAX_TIMEOUT.as_secs()),
            ));
        }
        Ok(Some(Some(d)))
    }

    /// One match: `None` when it takes every request, else what the model matches.
    fn one_match(&self, m: &Value, at: &str) -> Result<Option<Match>, String> {
        let o = self.object(m, at)?;
        let header = self.header(o, at)?;
        let path = match self.route.kind {
            Kind::Http => {
                self.only(o, at, &["path", "headers"])?;
                self.path(o, at)?
            }
            Kind::Grpc => {
                self.only(o, at, &["method", "headers"])?;
                self.method(o, at)?
            }
        };
        match (path, header) {
            (None, None) => Ok(None),
            (Some(p), None) => Ok(Some(Match::PathPrefix(p))),
            (None, Some(h)) => Ok(Some(h)),
            (Some(_), Some(_)) => Err(self.refuse(
                at,
                "a match on a header and a path (or method) together cannot be expressed (each remora route matches one of them); split it into rules that match one",
            )),
        }
    }

    /// The one `Exact` header of a match, if any.
    fn header(&self, o: &Map<String, Value>, at: &str) -> Result<Option<Match>, String> {
        let headers = match o.get("headers") {
            Some(h) => self.array(h, &format!("{at}.headers"))?,
            None => &[][..],
        };
        match headers {
            [] => Ok(None),
            [h] => {
                let at = format!("{at}.headers[0]");
                let h = self.object(h, &at)?;
                self.only(h, &at, &["type", "name", "value"])?;
                let ty = self.string(h, "type", &at)?.unwrap_or("Exact");
                if ty != "Exact" {
                    return Err(self.refuse(
                        &format!("{at}.type"),
                        &format!("{ty} header matches are not supported; use Exact"),
                    ));
                }
                let name = self.string(h, "name", &at)?.unwrap_or("");
                let value = self.string(h, "value", &at)?.unwrap_or("");
                let m = PolicyRoute {
                    when: Match::Header {
                        name: name.to_ascii_lowercase(),
                        value: value.to_string(),
                    },
                    to: self.svc.1.clone(),
                };
                Policy::default()
                    .with_routes(vec![m.clone()])
                    .map_err(|e| self.refuse(&at, &e))?;
                Ok(Some(m.when))
            }
            _ => Err(self.refuse(
                &format!("{at}.headers"),
                "a match on more than one header cannot be expressed (each remora route matches one header); match one",
            )),
        }
    }

    /// An HTTPRoute path match: a prefix, or `None` for `/` (every request).
    fn path(&self, o: &Map<String, Value>, at: &str) -> Result<Option<String>, String> {
        let Some(p) = o.get("path").filter(|p| !p.is_null()) else {
            return Ok(None);
        };
        let at = format!("{at}.path");
        let p = self.object(p, &at)?;
        self.only(p, &at, &["type", "value"])?;
        let ty = self.string(p, "type", &at)?.unwrap_or("PathPrefix");
        let value = self.string(p, "value", &at)?.unwrap_or("/");
        match ty {
            "PathPrefix" => {}
            "Exact" => {
                return Err(self.refuse(
                    &format!("{at}.type"),
                    "Exact path matches cannot be expressed (remora matches path prefixes); use PathPrefix",
                ));
            }
            other => {
                return Err(self.refuse(
                    &format!("{at}.type"),
                    &format!("{other} path matches are not supported; use PathPrefix"),
                ));
            }
        }
        if !value.starts_with('/') || value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(self.refuse(
                &format!("{at}.value"),
                &format!("{value:?} is not a path prefix; start it with / and use no spaces"),
            ));
        }
        Ok((value != "/").then(|| value.to_string()))
    }

    /// A GRPCRoute method match as a path prefix: `/service/` or `/service/method`.
    fn method(&self, o: &Map<String, Value>, at: &str) -> Result<Option<String>, String> {
        let Some(m) = o.get("method").filter(|m| !m.is_null()) else {
            return Ok(None);
        };
        let at = format!("{at}.method");
        let m = self.object(m, &at)?;
        self.only(m, &at, &["type", "service", "method"])?;
        let ty = self.string(m, "type", &at)?.unwrap_or("Exact");
        if ty != "Exact" {
            return Err(self.refuse(
                &format!("{at}.type"),
                &format!("{ty} method matches are not supported; use Exact"),
            ));
        }
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
        };
        let service = self.string(m, "service", &at)?;
        let method = self.string(m, "method", &at)?;
        match (service, method) {
            (None, None) => Ok(None),
            (Some(s), _) if !ok(s) => Err(self.refuse(
                &format!("{at}.service"),
                &format!("{s:?} is not a gRPC service name"),
            )),
            (_, Some(m)) if !ok(m) => Err(self.refuse(
                &format!("{at}.method"),
                &format!("{m:?} is not a gRPC method name"),
            )),
            (Some(s), None) => Ok(Some(format!("/{s}/"))),
            (Some(s), Some(m)) => Ok(Some(format!("/{s}/{m}"))),
            (None, Some(_)) => Err(self.refuse(
                &format!("{at}.service"),
                "a method of any service cannot be expressed (remora matches path prefixes); name the service",
            )),
        }
    }
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>`, e.g. `1h30m`,
/// `500ms`, `0s`.
pub fn gateway_duration(v: &str) -> Option<Duration> {
    let mut rest = v;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SVC: (&str, &str) = ("shop", "web");

    fn route(kind: Kind, name: &str, spec: Value) -> Route {
        let o = DynamicObject::new(name, &kind.api_resource())
            .within("shop")
            .data(json!({ "spec": spec }));
        Route::from_object(kind, o).expect("attached to a Service")
    }

    fn http(spec: Value) -> Route {
        route(Kind::Http, "web-routes", spec)
    }

    fn parent() -> Value {
        json!([{"group": "", "kind": "Service", "name": "web", "port": 80}])
    }

    fn svc() -> ServiceKey {
        (SVC.0.into(), SVC.1.into())
    }

    /// What `routes` give Service shop/web on `ports`, or the first refusal.
    fn convert_on(ports: &[u16], routes: &[&Route]) -> Result<Fragment, String> {
        let converted = routes
            .iter()
            .map(|r| super::convert(r, &svc(), ports))
            .collect::<Result<Vec<_>, _>>()?;
        let with: Vec<(&Route, &Converted)> = routes.iter().copied().zip(&converted).collect();
        Ok(merge(&with).0)
    }

    fn convert(routes: &[&Route]) -> Result<Fragment, String> {
        convert_on(&[80], routes)
    }

    fn header(name: &str, value: &str, to: &str) -> PolicyRoute {
        PolicyRoute {
            when: Match::Header {
                name: name.into(),
                value: value.into(),
            },
            to: to.into(),
        }
    }

    fn prefix(p: &str, to: &str) -> PolicyRoute {
        PolicyRoute {
            when: Match::PathPrefix(p.into()),
            to: to.into(),
        }
    }

    fn split(to: &str, percent: u32) -> Split {
        Split {
            to: to.into(),
            percent,
        }
    }

    fn backend(name: &str, weight: u64) -> Value {
        json!({"name": name, "port": 80, "weight": weight})
    }

    #[test]
    fn only_service_parents_of_the_route_namespace_are_kept() {
        let o = |refs: Value| {
            DynamicObject::new("r", &Kind::Http.api_resource())
                .within("shop")
                .data(json!({"spec": {"parentRefs": refs}}))
        };
        assert!(Route::from_object(Kind::Http, o(json!([{"name": "gw"}]))).is_none());
        assert!(
            Route::from_object(
                Kind::Http,
                o(json!([{"kind": "Service", "group": "", "name": "web", "namespace": "other"}]))
            )
            .is_none()
        );
        let r = Route::from_object(
            Kind::Http,
            o(json!([{"name": "gw"}, {"kind": "Service", "group": "core", "name": "web"}])),
        )
        .unwrap();
        assert_eq!(r.parents.iter().collect::<Vec<_>>(), ["web"]);
    }

    #[test]
    fn good_routes_convert_to_routes_split_and_timeouts() {
        type Case = (&'static str, Value, Fragment);
        let cases: Vec<Case> = vec![
            (
                "a header route and a weighted default rule",
                json!({"parentRefs": parent(), "rules": [
                    {"matches": [{"headers": [{"name": "X-Canary", "value": "true"}]}],
                     "backendRefs": [backend("web-canary", 1)]},
                    {"backendRefs": [backend("web", 90), backend("web-canary", 10)]},
                ]}),
                Fragment {
                    routes: vec![header("x-canary", "true", "web-canary")],
                    split: vec![split("web-canary", 10)],
                    applied: true,
                    ..Fragment::default()
                },
            ),
            (
                "path prefixes, longest first, before headers; a default `/` match with timeout",
                json!({"parentRefs": parent(), "rules": [
                    {"matches": [{"headers": [{"type": "Exact", "name": "x-v", "value": "2"}]}],
                     "backendRefs": [backend("web-v2", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                     "backendRefs": [backend("api", 1)], "timeouts": {"request": "30s"}},
                    {"matches": [{"path": {"value": "/api/v2/"}}], "backendRefs": [backend("api-v2", 1)]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [backend("web", 1)], "timeouts": {"request": "1m30s"}},
                ]}),
                Fragment {
                    routes: vec![
                        prefix("/api/v2/", "api-v2"),
                        prefix("/api", "api"),
                        header("x-v", "2", "web-v2"),
                    ],
                    timeout: Some(Duration::from_secs(90)),
                    // /api/v2/ has no timeout of its own: the default, not /api's.
                    route_timeouts: vec![
                        ("/api/v2/".into(), Duration::from_secs(90)),
                        ("/api".into(), Duration::from_secs(30)),
                    ],
                    sets_timeouts: true,
                    applied: true,
                    ..Fragment::default()
                },
            ),
            (
                "weights in thirds round to whole percents adding up to 100, the parent absent",
                json!({"parentRefs": parent(), "rules": [{"backendRefs": [
                    backend("a", 1), backend("b", 1), backend("c", 1)]}]}),
                Fragment {
                    split: vec![split("a", 34), split("b", 33), split("c", 33)],
                    applied: true,
                    ..Fragment::default()
                },
            ),
            (
                "a weight of 0 sends nothing; a matched rule without backends stays; 0s: no timeout",
                json!({"parentRefs": parent(), "rules": [
                    {"matches": [{"path": {"value": "/health"}}]},
                    {"backendRefs": [backend("web", 1), backend("web-canary", 0)],
                     "timeouts": {"request": "0s"}},
                ]}),
                Fragment {
                    routes: vec![prefix("/health", "web")],
                    sets_timeouts: true,
                    applied: true,
                    ..Fragment::default()
                },
            ),
        ];
        for (what, spec, want) in cases {
            let r = http(spec);
            assert_eq!(convert(&[&r]), Ok(want), "{what}");
        }
    }

    #[test]
    fn grpc_methods_become_path_prefixes() {
        let r = route(
            Kind::Grpc,
            "web-grpc",
            json!({"parentRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": [
                {"matches": [{"method": {"service": "pkg.Echo", "method": "Call"}}],
                 "backendRefs": [backend("echo-v2", 1)]},
                {"matches": [{"method": {"type": "Exact", "service": "pkg.Reports"}},
                             {"headers": [{"name": "x-tenant", "value": "a"}]}],
                 "backendRefs": [backend("reports", 1)]},
            ]}),
        );
        assert_eq!(
            convert(&[&r]).unwrap().routes,
            [
                prefix("/pkg.Echo/Call", "echo-v2"),
                prefix("/pkg.Reports/", "reports"),
                header("x-tenant", "a", "reports"),
            ]
        );
    }

    #[test]
    fn older_routes_win_ties_and_the_first_default_rule_wins() {
        let mut a = http(json!({"parentRefs": parent(), "rules": [
            {"matches": [{"headers": [{"name": "x-a", "value": "1"}]}], "backendRefs": [backend("a", 1)]},
            {"backendRefs": [backend("a", 1)]},
        ]}));
        let mut b = route(
            Kind::Http,
            "b",
            json!({"parentRefs": parent(), "rules": [
                {"matches": [{"headers": [{"name": "x-b", "value": "1"}]}], "backendRefs": [backend("b", 1)]},
                {"backendRefs": [backend("b", 1)]},
            ]}),
        );
        let t = |s: &str| Some(Time(s.parse().unwrap()));
        a.created = t("2025-01-02T00:00:00Z");
        b.created = t("2025-01-01T00:00:00Z");
        let f = convert(&[&a, &b]).unwrap();
        assert_eq!(f.routes, [header("x-b", "1", "b"), header("x-a", "1", "a")]);
        assert_eq!(f.split, [split("b", 100)]);
    }

    #[test]
    fn what_the_model_cannot_express_is_refused_naming_route_and_field() {
        let rule = |r: Value| json!({"parentRefs": parent(), "rules": [{"backendRefs": [backend("web", 1)]}, r]});
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                rule(
                    json!({"filters": [{"type": "RequestHeaderModifier"}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].filters",
                "filters are not supported",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"type": "Exact", "value": "/a"}}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].matches[0].path.type",
                "Exact path matches",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"type": "RegularExpression", "value": "/a.*"}}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].matches[0].path.type",
                "RegularExpression",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"value": "/a"}, "headers": [{"name": "x", "value": "1"}]}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].matches[0]",
                "a header and a path",
            ),
            (
                rule(
                    json!({"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": ".*"}]}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].matches[0].headers[0].type",
                "use Exact",
            ),
            (
                rule(
                    json!({"matches": [{"queryParams": [{"name": "q", "value": "1"}]}], "backendRefs": [backend("x", 1)]}),
                ),
                "spec.rules[1].matches[0].queryParams",
                "query parameter",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"value": "/a"}}], "backendRefs": [backend("x", 1), backend("y", 1)]}),
                ),
                "spec.rules[1].backendRefs",
                "one backend only",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"value": "/a"}}], "backendRefs": [{"name": "x", "namespace": "other", "port": 80}]}),
                ),
                "spec.rules[1].backendRefs[0].namespace",
                "ReferenceGrant",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"value": "/a"}}], "backendRefs": [{"name": "x", "port": 8080}]}),
                ),
                "spec.rules[1].backendRefs[0].port",
                "same port",
            ),
            (
                rule(
                    json!({"matches": [{"headers": [{"name": "x", "value": "1"}]}], "backendRefs": [backend("x", 1)], "timeouts": {"request": "1s"}}),
                ),
                "spec.rules[1].timeouts",
                "by path prefix",
            ),
            (
                rule(json!({"backendRefs": [backend("x", 1)], "timeouts": {"request": "soon"}})),
                "spec.rules[1].timeouts.request",
                "not a Gateway API duration",
            ),
            (
                rule(
                    json!({"backendRefs": [backend("x", 1)], "timeouts": {"backendRequest": "1s"}}),
                ),
                "spec.rules[1].timeouts.backendRequest",
                "use timeouts.request",
            ),
            (
                rule(json!({"backendRefs": [{"kind": "Pod", "name": "x"}]})),
                "spec.rules[1].backendRefs[0].kind",
                "name a Service",
            ),
            (
                rule(
                    json!({"matches": [{"path": {"value": "/a"}}], "backendRefs": [backend("x", 1)], "mirror": true}),
                ),
                "spec.rules[1].mirror",
                "not a field remora understands",
            ),
            (
                json!({"parentRefs": parent(), "hostnames": ["web.example.com"]}),
                "spec.hostnames",
                "do not apply",
            ),
            (
                json!({"parentRefs": [{"kind": "Service", "group": "", "name": "web", "port": 81}]}),
                "spec.parentRefs[0].port",
                "81 is not the port",
            ),
            (
                json!({"parentRefs": parent(), "rules": [{"backendRefs": [backend("web", 999), backend("x", 1)]}]}),
                "spec.rules[0].backendRefs[1].weight",
                "whole percents",
            ),
        ];
        for (spec, field, why) in cases {
            let r = http(spec.clone());
            let e = convert(&[&r]).expect_err(&spec.to_string());
            assert!(
                e.starts_with(&format!("HTTPRoute shop/web-routes: refused: {field}: "))
                    && e.contains(why),
                "{spec}: {e}"
            );
        }
        let grpc = route(
            Kind::Grpc,
            "g",
            json!({"parentRefs": parent(), "rules": [{"matches": [{"method": {"method": "Call"}}], "backendRefs": [backend("x", 1)]}]}),
        );
        let e = convert(&[&grpc]).unwrap_err();
        assert!(
            e.starts_with("GRPCRoute shop/g: refused: spec.rules[0].matches[0].method.service: "),
            "{e}"
        );
    }

    #[test]
    fn a_service_with_several_ports_takes_routes_without_ports() {
        let r = http(
            json!({"parentRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "rules": [{"backendRefs": [{"name": "web", "weight": 1}, {"name": "b", "weight": 1}]}]}),
        );
        assert_eq!(
            convert_on(&[80, 9090], &[&r]).unwrap().split,
            [split("b", 50)]
        );
        let r = http(json!({"parentRefs": parent()}));
        let e = convert_on(&[80, 9090], &[&r]).unwrap_err();
        assert!(
            e.contains("spec.parentRefs[0].port: Service shop/web has ports [80, 9090]"),
            "{e}"
        );
    }

    #[test]
    fn routes_replace_the_annotations_routes_split_and_timeouts_and_keep_the_rest() {
        let svc = ("shop".to_string(), "web".to_string());
        let annotated = Policy::from_fields(|k| match k {
            "remora.io/timeout" => Some("2s"),
            "remora.io/retries" => Some("2"),
            "remora.io/split" => Some("old=50"),
            "remora.io/rate-limit" => Some("100"),
            _ => None,
        })
        .unwrap();
        let r = http(json!({"parentRefs": parent(), "rules": [
            {"backendRefs": [backend("web", 3), backend("new", 1)]}]}));
        let p = apply(annotated.clone(), &svc, &convert(&[&r]).unwrap()).unwrap();
        assert_eq!(p.split, [split("new", 25)]);
        // No rule sets a timeout: the annotation's stays.
        assert_eq!(
            (p.timeout, p.retries, p.rate_limit),
            (Some(Duration::from_secs(2)), 2, Some(100))
        );
        let r = http(json!({"parentRefs": parent(), "rules": [
            {"backendRefs": [backend("web", 1)], "timeouts": {"request": "300ms"}}]}));
        let p = apply(annotated.clone(), &svc, &convert(&[&r]).unwrap()).unwrap();
        assert_eq!(
            (p.timeout, p.split.len()),
            (Some(Duration::from_millis(300)), 0)
        );
        assert_eq!(
            apply(annotated.clone(), &svc, &convert(&[]).unwrap()).unwrap(),
            annotated
        );
    }

    /// An HTTPRoute object of namespace shop, created at `created` (a day of 2025-01).
    fn object(name: &str, day: u8, spec: Value) -> DynamicObject {
        let mut o = DynamicObject::new(name, &Kind::Http.api_resource())
            .within("shop")
            .data(json!({ "spec": spec }));
        let at = format!("2025-01-{day:02}T00:00:00Z");
        o.metadata.creation_timestamp = at.parse().ok().map(Time);
        o
    }

    /// Routes with both kinds listed, holding `objects` (HTTPRoutes).
    fn listed(objects: &[DynamicObject]) -> Routes {
        let mut routes = Routes::default();
        routes.follow();
        routes.unavailable(Kind::Grpc);
        routes.apply(Kind::Http, Event::Init);
        for o in objects {
            routes.apply(Kind::Http, Event::InitApply(o.clone()));
        }
        routes.apply(Kind::Http, Event::InitDone);
        routes
    }

    fn path_rule(p: &str, to: &str) -> Value {
        json!({"matches": [{"path": {"value": p}}], "backendRefs": [backend(to, 1)]})
    }

    #[test]
    fn a_refused_route_leaves_the_others_applied() {
        let good = object(
            "a",
            1,
            json!({"parentRefs": parent(), "rules": [
                path_rule("/a", "api-a"),
                {"backendRefs": [backend("web", 3), backend("web-v2", 1)]},
            ]}),
        );
        let bad_port = object(
            "b",
            2,
            json!({"parentRefs": [{"kind": "Service", "group": "", "name": "web", "port": 81}],
                "rules": [path_rule("/b", "api-b")]}),
        );
        let bad_filter = object(
            "b",
            2,
            json!({"parentRefs": parent(), "rules": [
            {"matches": [{"path": {"value": "/b"}}], "backendRefs": [backend("api-b", 1)],
             "filters": [{"type": "RequestHeaderModifier"}]}]}),
        );
        let good_b = object(
            "b",
            2,
            json!({"parentRefs": parent(), "rules": [path_rule("/b", "api-b")]}),
        );
        let a_only = Fragment {
            routes: vec![prefix("/a", "api-a")],
            split: vec![split("web-v2", 25)],
            applied: true,
            ..Fragment::default()
        };
        let b_only = Fragment {
            routes: vec![prefix("/b", "api-b")],
            applied: true,
            ..Fragment::default()
        };
        let both = Fragment {
            routes: vec![prefix("/a", "api-a"), prefix("/b", "api-b")],
            split: vec![split("web-v2", 25)],
            applied: true,
            ..Fragment::default()
        };
        for bad in [&bad_port, &bad_filter] {
            // A good route, then a bad one beside it: the good one stays applied.
            let mut routes = listed(std::slice::from_ref(&good));
            assert_eq!(routes.fragment(&svc(), &[80]), a_only);
            routes.apply(Kind::Http, Event::Apply(bad.clone()));
            assert_eq!(routes.fragment(&svc(), &[80]), a_only, "{bad:?}");
            // The good one deleted while the bad one stays: that takes effect.
            routes.apply(Kind::Http, Event::Delete(good.clone()));
            assert_eq!(routes.fragment(&svc(), &[80]), Fragment::default());
            // A restarted replica, listing both at once, agrees with the first.
            let mut fresh = listed(&[good.clone(), bad.clone()]);
            assert_eq!(fresh.fragment(&svc(), &[80]), a_only);
            // A route that was good keeps its last good rules when an edit is refused…
            let mut routes = listed(&[good.clone(), good_b.clone()]);
            assert_eq!(routes.fragment(&svc(), &[80]), both);
            routes.apply(Kind::Http, Event::Apply(bad.clone()));
            assert_eq!(routes.fragment(&svc(), &[80]), both);
            // …the others still follow their edits…
            routes.apply(Kind::Http, Event::Delete(good.clone()));
            assert_eq!(routes.fragment(&svc(), &[80]), b_only);
            // …and deleting it drops them: created again bad, it does not apply.
            routes.apply(Kind::Http, Event::Delete(bad.clone()));
            routes.apply(Kind::Http, Event::Apply(bad.clone()));
            assert_eq!(routes.fragment(&svc(), &[80]), Fragment::default());
        }
    }

    #[test]
    fn past_max_routes_the_lowest_ranked_rules_go_and_the_note_names_their_route() {
        // Ten rules each, all prefixes of one length: the older route's ten come first.
        let rules = |c: char| -> Vec<Value> {
            (0..10)
                .map(|i| path_rule(&format!("/{c}{i}"), &format!("s{c}{i}")))
                .collect()
        };
        let older = object(
            "z-older",
            1,
            json!({"parentRefs": parent(), "rules": rules('a')}),
        );
        let newer = object(
            "a-newer",
            2,
            json!({"parentRefs": parent(), "rules": rules('b')}),
        );
        let mut routes = listed(&[older, newer.clone()]);
        let f = routes.fragment(&svc(), &[80]);
        assert_eq!(f.routes.len(), MAX_ROUTES);
        assert!(f.routes[..10].iter().all(|r| r.to.starts_with("sa")));
        assert_eq!(f.routes[15], prefix("/b5", "sb5"));
        let note = routes.overflow.get(&svc()).cloned().unwrap_or_default();
        assert!(
            note.contains("HTTPRoute shop/a-newer (4)") && !note.contains("z-older"),
            "{note}"
        );
        // One route alone past the limit names itself.
        let many: Vec<Value> = (0..20)
            .map(|i| path_rule(&format!("/p{i:02}"), "x"))
            .collect();
        let mut routes = listed(&[object(
            "big",
            1,
            json!({"parentRefs": parent(), "rules": many}),
        )]);
        assert_eq!(routes.fragment(&svc(), &[80]).routes.len(), MAX_ROUTES);
        let note = routes.overflow.get(&svc()).cloned().unwrap_or_default();
        assert!(note.contains("HTTPRoute shop/big (4)"), "{note}");
        // Back under the limit: no note.
        routes.apply(Kind::Http, Event::Apply(newer));
        routes.apply(
            Kind::Http,
            Event::Delete(object("big", 1, json!({"parentRefs": parent()}))),
        );
        assert_eq!(routes.fragment(&svc(), &[80]).routes.len(), 10);
        assert!(!routes.overflow.contains_key(&svc()));
    }

    #[test]
    fn only_reachable_rules_give_timeouts_and_longer_prefixes_do_not_inherit() {
        let s = Duration::from_secs;
        let rule = |p: &str, to: &str, t: Option<&str>| {
            let mut r = path_rule(p, to);
            if let Some(t) = t {
                r["timeouts"] = json!({"request": t});
            }
            r
        };
        let default = |t: Option<&str>| match t {
            Some(t) => json!({"backendRefs": [backend("web", 1)], "timeouts": {"request": t}}),
            None => json!({"backendRefs": [backend("web", 1)]}),
        };
        type Case = (
            &'static str,
            Vec<Value>,
            Vec<Value>,
            Option<Duration>,
            Vec<(&'static str, Duration)>,
            bool,
        );
        let cases: Vec<Case> = vec![
            (
                "the older route's /api wins, with its own timeout",
                vec![rule("/api", "api-a", Some("10s"))],
                vec![rule("/api", "api-b", Some("1s"))],
                None,
                vec![("/api", s(10))],
                true,
            ),
            (
                "a shadowed rule's timeout is not used, so nothing sets one",
                vec![rule("/api", "api-a", None)],
                vec![rule("/api", "api-b", Some("1s"))],
                None,
                vec![],
                false,
            ),
            (
                "the newer route's default rule is never reached: its timeout is not used",
                vec![default(None)],
                vec![default(Some("5s"))],
                None,
                vec![],
                false,
            ),
            (
                "the older route's default rule wins, 0s meaning none",
                vec![default(Some("0s"))],
                vec![default(Some("5s"))],
                None,
                vec![],
                true,
            ),
            (
                "a longer prefix without a timeout gets the default, not the shorter one's",
                vec![
                    rule("/api", "api", Some("10s")),
                    rule("/api/v2", "api-v2", None),
                    rule("/apix", "apix", None),
                    rule("/other", "other", None),
                    default(Some("3s")),
                ],
                vec![],
                Some(s(3)),
                vec![("/api/v2", s(3)), ("/apix", s(3)), ("/api", s(10))],
                true,
            ),
            (
                "without a default timeout a longer prefix inherits (documented)",
                vec![
                    rule("/api", "api", Some("10s")),
                    rule("/api/v2", "api-v2", None),
                ],
                vec![],
                None,
                vec![("/api", s(10))],
                true,
            ),
            (
                "the longer prefix's own timeout, from the newer route",
                vec![rule("/api", "api", Some("10s"))],
                vec![rule("/api/v2", "api-v2", Some("1s"))],
                None,
                vec![("/api/v2", s(1)), ("/api", s(10))],
                true,
            ),
        ];
        for (what, older, newer, timeout, route_timeouts, sets) in cases {
            let older = object("a", 1, json!({"parentRefs": parent(), "rules": older}));
            let newer = object("b", 2, json!({"parentRefs": parent(), "rules": newer}));
            let f = listed(&[older, newer]).fragment(&svc(), &[80]);
            let want: Vec<(String, Duration)> = route_timeouts
                .into_iter()
                .map(|(p, d)| (p.to_string(), d))
                .collect();
            assert_eq!(
                (f.timeout, &f.route_timeouts, f.sets_timeouts),
                (timeout, &want, sets),
                "{what}"
            );
            // Every published prefix's timeout is the one its surviving rule asks for.
            let p = apply(Policy::default(), &svc(), &f).unwrap();
            for r in &f.routes {
                if let Match::PathPrefix(prefix) = &r.when
                    && let Some((_, d)) = f.route_timeouts.iter().find(|(q, _)| q == prefix)
                {
                    assert_eq!(p.timeout_for(prefix), Some(*d), "{what}: {prefix}");
                }
            }
        }
        // The shadowed-timeout case, end to end: /api is api-a's, with api-a's 10s.
        let a = object(
            "a",
            1,
            json!({"parentRefs": parent(), "rules": [rule("/api", "api-a", Some("10s"))]}),
        );
        let b = object(
            "b",
            2,
            json!({"parentRefs": parent(), "rules": [rule("/api", "api-b", Some("1s"))]}),
        );
        let f = listed(&[a, b]).fragment(&svc(), &[80]);
        let p = apply(Policy::default(), &svc(), &f).unwrap();
        assert_eq!(p.routes, [prefix("/api", "api-a")]);
        assert_eq!(p.timeout_for("/api/x"), Some(s(10)));
    }

    #[test]
    fn publishing_waits_out_transient_failures_but_not_a_403_nor_forever() {
        #[derive(Debug)]
        enum Step {
            /// A failure `secs` after the start; forbidden or not.
            Fail(bool, u64),
            /// The deadline timer fires at `secs`.
            Overdue(u64),
            List,
        }
        use Step::*;
        // Steps, each with whether it changed everything and whether HTTPRoutes still hold
        // publishing back after it.
        type Case = (&'static str, Vec<(Step, bool, bool)>);
        let cases: Vec<Case> = vec![
            ("a 403 settles at once", vec![(Fail(true, 0), true, false)]),
            (
                "a transient failure waits PATIENCE, then settles",
                vec![
                    (Fail(false, 0), false, true),
                    (Fail(false, 10), false, true),
                    (Overdue(29), false, true),
                    (Overdue(30), true, false),
                    (Overdue(31), false, false),
                ],
            ),
            (
                "a failure past PATIENCE settles without the timer",
                vec![
                    (Fail(false, 0), false, true),
                    (Fail(false, 31), true, false),
                ],
            ),
            (
                "a list in time: nothing to settle, and later failures change nothing",
                vec![
                    (Fail(false, 0), false, true),
                    (List, true, false),
                    (Overdue(40), false, false),
                    (Fail(true, 41), false, false),
                ],
            ),
            (
                "listed after settling: the routes apply",
                vec![(Fail(true, 0), true, false), (List, true, false)],
            ),
        ];
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        for (what, steps) in cases {
            let mut routes = Routes::default();
            routes.follow();
            routes.unavailable(Kind::Grpc);
            for (step, all, pending) in steps {
                let changed = match step {
                    Fail(forbidden, secs) => routes.failed(Kind::Http, forbidden, at(secs)),
                    Overdue(secs) => routes.overdue(at(secs)),
                    List => {
                        routes.apply(Kind::Http, Event::Init);
                        routes.apply(Kind::Http, Event::InitDone)
                    }
                };
                assert_eq!(
                    (matches!(changed, RoutesChanged::All), routes.pending()),
                    (all, pending),
                    "{what}: {step:?}"
                );
                if pending {
                    assert_eq!(routes.deadline(), Some(at(0) + PATIENCE), "{what}");
                } else {
                    assert_eq!(routes.deadline(), None, "{what}");
                }
            }
        }
    }

    #[test]
    fn a_route_converts_once_per_change_of_its_spec_or_the_ports() {
        let o = object(
            "a",
            1,
            json!({"parentRefs": parent(), "rules": [path_rule("/a", "x")]}),
        );
        let mut routes = listed(std::slice::from_ref(&o));
        let good = |routes: &Routes| {
            routes
                .converted
                .values()
                .next()
                .and_then(|c| c.good.clone())
        };
        routes.fragment(&svc(), &[80]);
        let first = good(&routes).expect("converted");
        // EndpointSlice churn recomputes the Service: the conversion is reused.
        routes.fragment(&svc(), &[80]);
        assert!(Arc::ptr_eq(&first, &good(&routes).expect("kept")));
        // A status-only update (the status is not kept) changes nothing.
        assert!(matches!(
            routes.apply(Kind::Http, Event::Apply(o.clone())),
            RoutesChanged::Nothing
        ));
        routes.fragment(&svc(), &[80]);
        assert!(Arc::ptr_eq(&first, &good(&routes).expect("kept")));
        // Nor does a relist showing it unchanged.
        routes.apply(Kind::Http, Event::Init);
        routes.apply(Kind::Http, Event::InitApply(o.clone()));
        routes.apply(Kind::Http, Event::InitDone);
        routes.fragment(&svc(), &[80]);
        assert!(Arc::ptr_eq(&first, &good(&routes).expect("kept")));
        // A spec edit converts again.
        let edited = object(
            "a",
            1,
            json!({"parentRefs": parent(), "rules": [path_rule("/b", "x")]}),
        );
        routes.apply(Kind::Http, Event::Apply(edited));
        assert_eq!(routes.fragment(&svc(), &[80]).routes, [prefix("/b", "x")]);
        // The Service gone: its conversions go.
        routes.forget(&svc());
        assert!(routes.converted.is_empty());
    }

    #[test]
    fn route_events_name_the_services_they_touch() {
        let mut routes = Routes::default();
        routes.follow();
        assert!(routes.pending());
        let obj = |name: &str, svc: &str| {
            DynamicObject::new(name, &Kind::Http.api_resource())
                .within("shop")
                .data(json!({"spec": {"parentRefs": [{"kind": "Service", "group": "", "name": svc}]}}))
        };
        routes.apply(Kind::Http, Event::Init);
        routes.apply(Kind::Http, Event::InitApply(obj("r1", "web")));
        assert!(matches!(
            routes.apply(Kind::Http, Event::InitDone),
            RoutesChanged::All
        ));
        // GRPCRoutes are not served: nothing to wait for any more.
        assert!(matches!(routes.unavailable(Kind::Grpc), RoutesChanged::All));
        assert!(!routes.pending() && routes.is_unavailable(Kind::Grpc));
        assert!(matches!(
            routes.unavailable(Kind::Grpc),
            RoutesChanged::Nothing
        ));
        assert_eq!(routes.attached(&svc()).len(), 1);
        let RoutesChanged::Services(s) = routes.apply(Kind::Http, Event::Apply(obj("r1", "api")))
        else {
            panic!("a moved route touches both Services");
        };
        let names: Vec<&str> = s.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        assert!(routes.attached(&svc()).is_empty());
        assert!(matches!(
            routes.apply(Kind::Http, Event::Delete(obj("r1", "api"))),
            RoutesChanged::Services(_)
        ));
        assert!(routes.attached(&("shop".into(), "api".into())).is_empty());
    }

    #[test]
    fn gateway_durations() {
        for (v, want) in [
            ("500ms", Some(Duration::from_millis(500))),
            ("1h30m", Some(Duration::from_secs(5400))),
            ("1m30s500ms", Some(Duration::from_millis(90_500))),
            ("0s", Some(Duration::ZERO)),
            ("", None),
            ("1.5s", None),
            ("123456s", None),
            ("1s1s1s1s1s", None),
            ("10", None),
            ("1d", None),
        ] {
            assert_eq!(gateway_duration(v), want, "{v:?}");
        }
    }
}

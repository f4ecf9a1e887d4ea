//! The control plane (`REMORA_CONTROL_ADDR`) as a discovery source: one `Discovery.Watch`
//! per name (with the proxy's namespace, so the control plane expands `web:80` the way the
//! pod's resolver would), one `Discovery.WatchAddr` per `ip:port` authority (a Service's
//! ClusterIP), reconnected with backoff when it breaks. While it is broken nothing is sent, so
//! the proxy keeps the last endpoints it knew. An alias (an ExternalName Service) is resolved
//! here through DNS and refreshed while the alias stands.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::source::{Discover, Target, Update, UpdateSender, Updates};
use crate::balance::Zone;
use crate::config::EndpointSpec;
use crate::control::ControlClient;
use crate::metrics::Metrics;

/// How often an alias's DNS answer is refreshed (the proxy's own DNS cache lifetime).
const ALIAS_REFRESH: Duration = Duration::from_secs(30);

/// The proxy's namespace, asked at each watch (the identity may arrive after start).
pub(crate) type Namespace = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Endpoints from remora's control plane.
pub(crate) struct ControlPlane {
    client: ControlClient,
    metrics: Arc<Metrics>,
    namespace: Namespace,
    /// The proxy's zone, as the control plane tells it in every snapshot.
    zone: Zone,
}

impl ControlPlane {
    pub(crate) fn new(
        client: ControlClient,
        metrics: Arc<Metrics>,
        namespace: Namespace,
        zone: Zone,
    ) -> Self {
        ControlPlane {
            client,
            metrics,
            namespace,
            zone,
        }
    }
}

/// What one follower asks for.
#[derive(Clone)]
enum Asked {
    Name(String),
    Addr(SocketAddr),
}

impl std::fmt::Display for Asked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Asked::Name(n) => f.write_str(n),
            Asked::Addr(a) => write!(f, "{a}"),
        }
    }
}

impl Discover for ControlPlane {
    fn resolve(&self, target: Target<'_>) -> Option<Updates> {
        let asked = match target {
            Target::Name(n) => Asked::Name(n.to_string()),
            Target::Addr(a) => Asked::Addr(a),
        };
        let (tx, updates) = Updates::channel(16);
        let (client, metrics, ns, zone) = (
            self.client.clone(),
            self.metrics.clone(),
            self.namespace.clone(),
            self.zone.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = follow(&client, &metrics, &ns, &zone, &asked, &tx) => {}
                _ = tx.closed() => {}
            }
        });
        Some(updates)
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
    // Zone names the proxy cannot use are dropped, not the endpoint: it still serves.
    let zone = |z: &String| remora_certs::is_zone_name(z).then(|| z.clone());
    Some(EndpointSpec {
        addr,
        weight: e.weight.clamp(1, crate::config::MAX_WEIGHT),
        identity,
        opaque: e.opaque,
        // 0 is "none"; a value no UDP port can have is ignored, not the endpoint: TCP
        // still reaches it.
        quic: u16::try_from(e.quic_port).ok().filter(|&p| p != 0),
        locality: remora_certs::Locality {
            zone: zone(&e.zone),
            for_zones: e.for_zones.iter().filter_map(zone).take(8).collect(),
        },
    })
}

fn durations(t: &[remora_api::RouteTimeout]) -> Vec<(String, std::time::Duration)> {
    t.iter()
        .map(|t| {
            (
                t.path_prefix.clone(),
                std::time::Duration::from_millis(t.timeout_ms),
            )
        })
        .collect()
}

fn counts(t: &[remora_api::RouteCount]) -> Vec<(String, u32)> {
    t.iter().map(|t| (t.path_prefix.clone(), t.count)).collect()
}

/// Milliseconds, 0 for none.
fn ms(v: u64) -> Option<std::time::Duration> {
    (v > 0).then(|| std::time::Duration::from_millis(v))
}

fn retry_on(r: Option<&remora_api::RetryOn>) -> Result<remora_certs::RetryOn, String> {
    let Some(r) = r else {
        return Ok(remora_certs::RetryOn::default());
    };
    let mut grpc = 0u32;
    for &c in &r.grpc_codes {
        if !(1..=16).contains(&c) {
            return Err(format!("retry-on gRPC code {c} is not 1 to 16"));
        }
        grpc |= 1 << c;
    }
    let mut statuses = Vec::with_capacity(r.statuses.len());
    for &c in &r.statuses {
        statuses.push(
            u16::try_from(c)
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| format!("retry-on status {c} is not 400 to 599"))?,
        );
    }
    statuses.sort_unstable();
    statuses.dedup();
    Ok(remora_certs::RetryOn {
        statuses,
        any_5xx: r.any_5xx,
        grpc,
        non_idempotent: r.non_idempotent,
    })
}

/// A policy from the control plane; one it should never have sent (out of range) is ignored
/// with a log line, and the last one stands.
fn policy(p: remora_api::Policy) -> Option<remora_certs::Policy> {
    let timeout = (p.timeout_ms > 0).then(|| std::time::Duration::from_millis(p.timeout_ms));
    let split = p
        .split
        .iter()
        .map(|s| match remora_certs::normalize_authority(&s.to) {
            Some(to) => Ok(remora_certs::Split {
                to,
                percent: s.percent,
            }),
            None => Err(format!("split target {:?} is not host:port", s.to)),
        })
        .collect::<Result<Vec<_>, _>>();
    let routes = p
        .routes
        .iter()
        .map(|r| {
            let to = remora_certs::normalize_authority(&r.to)
                .ok_or_else(|| format!("route target {:?} is not host:port", r.to))?;
            let when = match r.header.is_empty() {
                false => remora_certs::Match::Header {
                    name: r.header.clone(),
                    value: r.value.clone(),
                },
                true => remora_certs::Match::PathPrefix(r.path_prefix.clone()),
            };
            Ok(remora_certs::Route { when, to })
        })
        .collect::<Result<Vec<_>, String>>();
    let policy = split.and_then(|split| {
        remora_certs::Policy::with_accrual(timeout, p.retries, p.failure_accrual)?
            .with_split(split)?
            .with_routes(routes?)?
            .with_rate_limits(
                (p.rate_limit > 0).then_some(p.rate_limit),
                (p.rate_limit_per_client > 0).then_some(p.rate_limit_per_client),
            )?
            .with_route_timeouts(durations(&p.route_timeouts))?
            .with_retry_policy(
                counts(&p.route_retries),
                retry_on(p.retry_on.as_ref())?,
                ms(p.retry_timeout_ms),
            )?
            .with_idle_timeouts(ms(p.idle_timeout_ms), durations(&p.route_idle_timeouts))?
            .with_route_rate_limits(counts(&p.route_rate_limits))
    });
    match policy {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "control plane sent a policy this proxy refuses ({e}); keeping the last one"
            );
            None
        }
    }
}

/// One control-plane message, translated: updates to send, or an alias to resolve.
#[derive(Debug, PartialEq)]
enum Translated {
    Updates(Vec<Update>),
    Alias(String),
}

/// Translates one control-plane message. An entry that cannot be used is sent as a removal,
/// so its old version does not linger.
fn translate(update: remora_api::Update) -> Translated {
    use remora_api::update::Kind;
    Translated::Updates(match update.kind {
        Some(Kind::Snapshot(snap)) => {
            // The policy first (absent: none), so that it is in place with the endpoints.
            let p = match snap.policy {
                Some(p) => policy(p),
                None => Some(remora_certs::Policy::default()),
            };
            let mut out: Vec<Update> = p.into_iter().map(|p| Update::Policy(Box::new(p))).collect();
            out.push(Update::Reset(
                snap.endpoints.iter().filter_map(spec).collect(),
            ));
            out
        }
        Some(Kind::Delta(d)) => {
            let mut remove: Vec<SocketAddr> =
                d.remove.iter().filter_map(|r| r.parse().ok()).collect();
            let mut add = Vec::with_capacity(d.add.len());
            for e in &d.add {
                match spec(e) {
                    Some(s) => add.push(s),
                    None => remove.extend(e.addr.parse::<SocketAddr>().ok()),
                }
            }
            // A changed policy first, as with a snapshot: new endpoints never serve under the
            // old policy.
            let mut out: Vec<Update> = d
                .policy
                .and_then(policy)
                .map(|p| Update::Policy(Box::new(p)))
                .into_iter()
                .collect();
            if !remove.is_empty() {
                out.push(Update::Remove(remove));
            }
            if !add.is_empty() {
                out.push(Update::Add(add));
            }
            out
        }
        Some(Kind::NoSuchService(_)) => vec![Update::DoesNotExist],
        Some(Kind::Alias(a)) => return Translated::Alias(a.name),
        None => Vec::new(),
    })
}

/// The endpoints of `alias` at the port `asked` names, through the system resolver; `None`
/// when it does not resolve (the caller keeps what it had).
async fn resolve_alias(asked: &Asked, alias: &str) -> Option<Vec<EndpointSpec>> {
    let Asked::Name(name) = asked else {
        return None;
    };
    let port = name.rsplit_once(':').map(|(_, p)| p)?;
    let target = format!("{alias}:{port}");
    match tokio::net::lookup_host(&target).await {
        Ok(addrs) => Some(addrs.map(EndpointSpec::new).collect()),
        Err(e) => {
            tracing::warn!(service = %name, %alias, error = %e, "the alias (ExternalName) of this service does not resolve; keeping its last addresses");
            None
        }
    }
}

/// Follows `asked` until the proxy drops the stream.
async fn follow(
    client: &ControlClient,
    metrics: &Metrics,
    namespace: &Namespace,
    zone: &Zone,
    asked: &Asked,
    tx: &UpdateSender,
) {
    metrics.discovery_watches.inc();
    struct Dec<'a>(&'a Metrics);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.discovery_watches.dec();
        }
    }
    let _dec = Dec(metrics);
    let mut backoff =
        crate::control::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // What was sent, only to say in logs how many endpoints keep serving while it is away.
    let mut known = std::collections::BTreeSet::new();
    let mut alias: Option<String> = None;
    loop {
        let mut discovery = client.discovery();
        let stream = match asked {
            Asked::Name(name) => {
                discovery
                    .watch(remora_api::WatchRequest {
                        service: name.clone(),
                        client: String::new(),
                        namespace: namespace().unwrap_or_default(),
                    })
                    .await
            }
            Asked::Addr(addr) => {
                discovery
                    .watch_addr(remora_api::WatchAddrRequest {
                        addr: addr.to_string(),
                        client: String::new(),
                    })
                    .await
            }
        };
        match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    let refresh = async {
                        match &alias {
                            Some(_) => tokio::time::sleep(ALIAS_REFRESH).await,
                            None => std::future::pending().await,
                        }
                    };
                    let message = tokio::select! {
                        m = s.message() => m,
                        _ = refresh => {
                            if let Some(a) = &alias
                                && let Some(list) = resolve_alias(asked, a).await
                            {
                                known = list.iter().map(|e| e.addr).collect();
                                if tx.send(Update::Reset(list)).await.is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                    };
                    match message {
                        Ok(Some(update)) => {
                            backoff.reset();
                            metrics.discovery_updates.inc();
                            if let Some(remora_api::update::Kind::Snapshot(snap)) = &update.kind
                                && remora_certs::is_zone_name(&snap.caller_zone)
                            {
                                zone.learn(&snap.caller_zone);
                            }
                            let updates = match translate(update) {
                                Translated::Updates(u) => {
                                    alias = None;
                                    u
                                }
                                Translated::Alias(a) => {
                                    let list = resolve_alias(asked, &a).await;
                                    alias = Some(a);
                                    // Unresolvable at first: no endpoints rather than stale
                                    // ones from before the Service became an alias.
                                    // An alias carries no policy: what the name had
                                    // with endpoints goes.
                                    vec![
                                        Update::Policy(Box::default()),
                                        Update::Reset(list.unwrap_or_default()),
                                    ]
                                }
                            };
                            for u in updates {
                                match &u {
                                    Update::Reset(l) => {
                                        known = l.iter().map(|e| e.addr).collect();
                                    }
                                    Update::Add(l) => known.extend(l.iter().map(|e| e.addr)),
                                    Update::Remove(l) => l.iter().for_each(|a| {
                                        known.remove(a);
                                    }),
                                    Update::DoesNotExist => known.clear(),
                                    Update::Policy(_) => {}
                                }
                                if tx.send(u).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            metrics.discovery_stream_errors.inc();
                            tracing::warn!(service = %asked, "control plane {} ended the watch; keeping {} known endpoints and reconnecting", client.addr, known.len());
                            break;
                        }
                        Err(status) => {
                            metrics.discovery_stream_errors.inc();
                            tracing::warn!(service = %asked, "control plane {}: watch broke: {}: {}; keeping {} known endpoints and reconnecting", client.addr, status.code(), status.message(), known.len());
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                metrics.discovery_stream_errors.inc();
                tracing::warn!(service = %asked, "control plane {}: watch failed: {}: {}; keeping {} known endpoints", client.addr, status.code(), status.message(), known.len());
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_api::update::Kind;

    fn ep(addr: &str) -> remora_api::Endpoint {
        remora_api::Endpoint {
            addr: addr.into(),
            weight: 1,
            identity: String::new(),
            opaque: false,
            zone: String::new(),
            for_zones: Vec::new(),
            quic_port: 0,
        }
    }

    #[test]
    fn a_bad_entry_in_a_delta_removes_its_old_version() {
        let u = remora_api::Update {
            kind: Some(Kind::Delta(remora_api::Delta {
                policy: None,
                add: vec![ep("10.0.0.1:80"), ep("not-an-address")],
                remove: vec!["10.0.0.2:80".into()],
            })),
        };
        let out = translate(u);
        assert_eq!(
            out,
            Translated::Updates(vec![
                Update::Remove(vec!["10.0.0.2:80".parse().unwrap()]),
                Update::Add(vec![EndpointSpec::new("10.0.0.1:80".parse().unwrap())]),
            ])
        );
        let mut bad_id = ep("10.0.0.3:80");
        bad_id.identity = "not a spiffe id".into();
        let u = remora_api::Update {
            kind: Some(Kind::Delta(remora_api::Delta {
                policy: None,
                add: vec![bad_id],
                remove: vec![],
            })),
        };
        assert_eq!(
            translate(u),
            Translated::Updates(vec![Update::Remove(vec!["10.0.0.3:80".parse().unwrap()])])
        );
        let alias = remora_api::Update {
            kind: Some(Kind::Alias(remora_api::Alias {
                name: "db.example.org".into(),
            })),
        };
        assert_eq!(translate(alias), Translated::Alias("db.example.org".into()));
    }

    /// `quic_port` 0 means none; a number no UDP port can have is dropped with the endpoint
    /// kept (TCP still reaches it).
    #[test]
    fn quic_port_maps_to_an_optional_udp_port() {
        for (port, want) in [
            (0, None),
            (1, Some(1)),
            (4143, Some(4143)),
            (65535, Some(65535)),
            (65536, None),
            (u32::MAX, None),
        ] {
            let mut e = ep("10.0.0.1:4143");
            e.identity = "spiffe://cluster.local/ns/shop/sa/web".into();
            e.quic_port = port;
            let s = spec(&e).expect("the endpoint is kept");
            assert_eq!(s.quic, want, "quic_port {port}");
            assert!(s.identity.is_some());
        }
    }
}

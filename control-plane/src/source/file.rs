//! The file source: services and their endpoints in one TOML file, for machines without
//! Kubernetes and for `remora demo`.
//!
//! ```toml
//! [[service]]
//! name = "web.shop.svc.cluster.local:8080"      # host:port, as clients address it
//! endpoints = [
//!   { addr = "10.0.0.7:8080", identity = "spiffe://cluster.local/ns/shop/sa/web" },
//!   { addr = "10.0.0.8:8080", weight = 2 },     # no identity: plaintext to it
//!   { addr = "10.0.1.9:8080", zone = "eu-west-1b" }, # callers prefer their own zone
//!   { addr = "10.0.0.9:4143", identity = "spiffe://cluster.local/ns/shop/sa/web", quic = 4143 },
//! ]                    # quic: the UDP port where its proxy serves HTTP/3 (needs an identity)
//! timeout = "500ms"                               # policy (optional): as the Service
//! retries = 2                                     # annotations remora.io/timeout, /retries
//! failure_accrual = 5                             # and /failure-accrual
//! ```
//!
//! `quic = PORT` (optional, 1-65535) is the UDP port where the endpoint's proxy serves HTTP/3
//! over QUIC; it needs an `identity` (proxies speak QUIC to each other with mTLS only). Without
//! it callers reach the endpoint over TCP.
//!
//! The file is polled by content (like certificates, so editors, `mv` and Kubernetes'
//! ConfigMap symlink swaps all work). A new version is validated whole before it replaces the
//! table; an invalid one is refused with the line at fault, and the last good one keeps serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remora_certs::{EndpointSpec, SpiffeId};
use serde::Deserialize;
use toml::Spanned;

use crate::registry::{Published, Registry, Table};

/// How often the file is read for changes.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    service: Vec<Service>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    name: Spanned<String>,
    /// The port carries a non-HTTP or server-speaks-first protocol: callers skip detection.
    #[serde(default)]
    opaque: bool,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    /// Policy, as the Service annotations `remora.io/timeout` and `remora.io/retries`.
    timeout: Option<Spanned<String>>,
    /// A count, or `"2; /pkg.Orders/=0"` with routes.
    retries: Option<Spanned<CountOrRoutes>>,
    /// As `remora.io/retry-on`, `/retry-timeout`, `/idle-timeout`.
    retry_on: Option<Spanned<String>>,
    retry_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    failure_accrual: Option<Spanned<u32>>,
    /// `"other.service:80=5[,…]"`: as the annotation `remora.io/split`, with authorities.
    split: Option<Spanned<String>>,
    /// `"header:x-canary=true=>canary.svc:80; path:/v2/=>v2.svc:80"`: as `remora.io/routes`.
    routes: Option<Spanned<String>>,
    /// Requests per second each endpoint serves (`remora.io/rate-limit`), and per client.
    rate_limit: Option<Spanned<CountOrRoutes>>,
    rate_limit_per_client: Option<Spanned<u32>>,
}

/// `retries = 2` or `retries = "2; /pkg.Orders/=0"` (the annotation's form, with routes).
#[derive(Deserialize)]
#[serde(untagged)]
enum CountOrRoutes {
    Count(u32),
    Routes(String),
}

impl std::fmt::Display for CountOrRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CountOrRoutes::Count(n) => write!(f, "{n}"),
            CountOrRoutes::Routes(s) => f.write_str(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    addr: Spanned<String>,
    identity: Option<Spanned<String>>,
    weight: Option<Spanned<u32>>,
    /// Its zone: callers in the same zone prefer it (see the proxy's `balance`), and a proxy
    /// connecting from this endpoint's address learns it is in that zone.
    zone: Option<Spanned<String>>,
    /// The UDP port where its proxy serves HTTP/3 over QUIC (mTLS: only with an identity).
    quic: Option<Spanned<i64>>,
}

/// Parses and validates a whole endpoints file. Errors name the file and line.
pub fn parse(path: &Path, text: &str) -> Result<Table, String> {
    let line = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let at =
        |offset: usize, msg: String| format!("{}: line {}: {msg}", path.display(), line(offset));
    let file: File = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => at(span.start, e.message().to_string()),
        None => format!("{}: {}", path.display(), e.message()),
    })?;
    let mut table = HashMap::new();
    for s in file.service {
        let name = remora_certs::normalize_authority(s.name.get_ref())
            .filter(|n| {
                n.rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            })
            .ok_or_else(|| {
                at(
                    s.name.span().start,
                    format!(
                        "service name {:?} is not host:port (e.g. web.shop.svc.cluster.local:8080)",
                        s.name.get_ref()
                    ),
                )
            })?;
        let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(s.endpoints.len());
        for e in s.endpoints {
            let addr = e.addr.get_ref().parse().map_err(|_| {
                at(
                    e.addr.span().start,
                    format!("endpoint address {:?} is not ip:port", e.addr.get_ref()),
                )
            })?;
            if endpoints.iter().any(|x| x.addr == addr) {
                return Err(at(
                    e.addr.span().start,
                    format!("endpoint {addr} is listed twice in {name}"),
                ));
            }
            let identity = match &e.identity {
                None => None,
                Some(id) => Some(id.get_ref().parse::<SpiffeId>().map_err(|err| {
                    at(
                        id.span().start,
                        format!("identity {:?}: {err}", id.get_ref()),
                    )
                })?),
            };
            let weight = match &e.weight {
                None => 1,
                Some(w) if (1..=remora_certs::MAX_WEIGHT).contains(w.get_ref()) => *w.get_ref(),
                Some(w) => {
                    return Err(at(
                        w.span().start,
                        format!(
                            "weight {} is out of range 1..={}",
                            w.get_ref(),
                            remora_certs::MAX_WEIGHT
                        ),
                    ));
                }
            };
            let locality = match &e.zone {
                None => remora_certs::Locality::default(),
                Some(z) if remora_certs::is_zone_name(z.get_ref()) => {
                    remora_certs::Locality::zone(z.get_ref())
                }
                Some(z) => {
                    return Err(at(
                        z.span().start,
                        format!(
                            "zone {:?} is not a zone name (1-63 letters, digits, '-', '_', '.')",
                            z.get_ref()
                        ),
                    ));
                }
            };
            let quic = match &e.quic {
                None => None,
                Some(q) if identity.is_none() => {
                    return Err(at(
                        q.span().start,
                        format!(
                            "endpoint {addr}: quic = {} needs an identity (proxies speak HTTP/3 to each other with mTLS only); add identity = \"spiffe://…\" or remove quic",
                            q.get_ref()
                        ),
                    ));
                }
                Some(q) => match u16::try_from(*q.get_ref()) {
                    Ok(port) if port != 0 => Some(port),
                    _ => {
                        return Err(at(
                            q.span().start,
                            format!(
                                "endpoint {addr}: quic = {} is not a UDP port (1-65535)",
                                q.get_ref()
                            ),
                        ));
                    }
                },
            };
            endpoints.push(EndpointSpec {
                addr,
                weight,
                identity,
                opaque: s.opaque,
                quic,
                locality,
            });
        }
        let retries = s.retries.as_ref().map(|r| r.get_ref().to_string());
        let accrual = s.failure_accrual.as_ref().map(|r| r.get_ref().to_string());
        let rate = s.rate_limit.as_ref().map(|r| r.get_ref().to_string());
        let rate_per_client = s
            .rate_limit_per_client
            .as_ref()
            .map(|r| r.get_ref().to_string());
        let policy = remora_certs::Policy::from_fields(|k| match k {
            remora_certs::policy::TIMEOUT => s.timeout.as_ref().map(|t| t.get_ref().as_str()),
            remora_certs::policy::RETRIES => retries.as_deref(),
            remora_certs::policy::FAILURE_ACCRUAL => accrual.as_deref(),
            remora_certs::policy::SPLIT => s.split.as_ref().map(|t| t.get_ref().as_str()),
            remora_certs::policy::ROUTES => s.routes.as_ref().map(|t| t.get_ref().as_str()),
            remora_certs::policy::RATE_LIMIT => rate.as_deref(),
            remora_certs::policy::RATE_LIMIT_PER_CLIENT => rate_per_client.as_deref(),
            remora_certs::policy::RETRY_ON => s.retry_on.as_ref().map(|t| t.get_ref().as_str()),
            remora_certs::policy::RETRY_TIMEOUT => {
                s.retry_timeout.as_ref().map(|t| t.get_ref().as_str())
            }
            remora_certs::policy::IDLE_TIMEOUT => {
                s.idle_timeout.as_ref().map(|t| t.get_ref().as_str())
            }
            _ => None,
        })
        .map_err(|e| {
            use remora_certs::policy::{RETRIES, TIMEOUT};
            let start = match () {
                _ if e.starts_with(remora_certs::policy::RETRY_ON) => {
                    s.retry_on.as_ref().map(|t| t.span().start)
                }
                _ if e.starts_with(remora_certs::policy::RETRY_TIMEOUT) => {
                    s.retry_timeout.as_ref().map(|t| t.span().start)
                }
                _ if e.starts_with(remora_certs::policy::IDLE_TIMEOUT) => {
                    s.idle_timeout.as_ref().map(|t| t.span().start)
                }
                _ if e.starts_with(TIMEOUT) => s.timeout.as_ref().map(|t| t.span().start),
                _ if e.starts_with(RETRIES) => s.retries.as_ref().map(|r| r.span().start),
                _ if e.starts_with(remora_certs::policy::SPLIT) => {
                    s.split.as_ref().map(|r| r.span().start)
                }
                _ if e.starts_with(remora_certs::policy::ROUTES) => {
                    s.routes.as_ref().map(|r| r.span().start)
                }
                _ if e.starts_with(remora_certs::policy::RATE_LIMIT_PER_CLIENT) => {
                    s.rate_limit_per_client.as_ref().map(|r| r.span().start)
                }
                _ if e.starts_with(remora_certs::policy::RATE_LIMIT) => {
                    s.rate_limit.as_ref().map(|r| r.span().start)
                }
                _ => s.failure_accrual.as_ref().map(|r| r.span().start),
            };
            // The file's own key names: `timeout`, `retries`, `failure_accrual`.
            let e = e
                .replacen("remora.io/", "", 1)
                .replace("failure-accrual", "failure_accrual")
                .replace("rate-limit", "rate_limit")
                .replace("retry-on", "retry_on")
                .replace("retry-timeout", "retry_timeout")
                .replace("idle-timeout", "idle_timeout")
                .replace("_limit-per-client", "_limit_per_client");
            at(
                start.unwrap_or(s.name.span().start),
                format!("service {name}: {e}"),
            )
        })?;
        // Split and route targets are authorities here (host:port), as clients address them.
        let authority = |to: &str, field: &str, span: Option<usize>| {
            remora_certs::normalize_authority(to)
                .filter(|n| {
                    n.rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                })
                .ok_or_else(|| {
                    at(
                        span.unwrap_or(s.name.span().start),
                        format!("service {name}: {field}: target {to:?} is not host:port"),
                    )
                })
        };
        let split_at = s.split.as_ref().map(|r| r.span().start);
        let routes_at = s.routes.as_ref().map(|r| r.span().start);
        let mut split = Vec::with_capacity(policy.split.len());
        for t in &policy.split {
            split.push(remora_certs::Split {
                to: authority(&t.to, "split", split_at)?,
                percent: t.percent,
            });
        }
        let mut routes = Vec::with_capacity(policy.routes.len());
        for r in &policy.routes {
            routes.push(remora_certs::Route {
                when: r.when.clone(),
                to: authority(&r.to, "routes", routes_at)?,
            });
        }
        let policy = policy
            .with_split(split)
            .and_then(|p| p.with_routes(routes))
            .map_err(|e| at(s.name.span().start, format!("service {name}: {e}")))?;
        if table
            .insert(name.clone(), Published::with_policy(endpoints, policy))
            .is_some()
        {
            return Err(at(
                s.name.span().start,
                format!("service {name} is defined twice"),
            ));
        }
    }
    Ok(table)
}

/// What the file publishes by address, for intercepted connections (`WatchAddr`): a service
/// named by an IP literal (a virtual IP, like a ClusterIP), and every endpoint by its own
/// address, so a connection straight to a meshed endpoint gets its identity.
pub fn addresses(names: &Table) -> Table {
    let mut out = Table::new();
    for (name, p) in names {
        let Some(set) = p.set() else { continue };
        for e in set.values() {
            // With the part of the service's policy the endpoint's own proxy enforces.
            let inbound = p.policy().map(|p| p.inbound_part()).unwrap_or_default();
            out.entry(e.addr.to_string())
                .or_insert_with(|| Published::with_policy(vec![e.clone()], inbound));
        }
        let host = name.rsplit_once(':').map_or(name.as_str(), |(h, _)| h);
        if host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            out.insert(name.clone(), p.clone());
        }
    }
    out
}

/// Follows one endpoints file.
pub struct FileSource {
    pub path: PathBuf,
    /// The bytes [`FileSource::load`] applied, so a change made before `run` starts is seen.
    loaded: Option<Vec<u8>>,
    /// [`POLL`]; shorter in tests.
    poll: Duration,
}

/// Parses file bytes, refusing an empty file: that is what a write in progress looks like, and
/// applying it would delete every service.
fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Table, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!(
            "{}: the file is empty (a write in progress?); to serve no services on purpose, write a comment such as `# no services`",
            path.display()
        ));
    }
    parse(path, text)
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        FileSource {
            path,
            loaded: None,
            poll: POLL,
        }
    }

    /// Reads and validates the file once (startup: a bad file is a startup error).
    pub fn load(&mut self) -> Result<Table, String> {
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("{}: cannot read: {e}", self.path.display()))?;
        let table = parse_bytes(&self.path, &bytes)?;
        self.loaded = Some(bytes);
        Ok(table)
    }

    /// Polls forever, replacing the registry's table on every valid change. A file that goes
    /// missing, unreadable or invalid is reported once when that happens (not at every poll)
    /// and the last good table keeps serving; its recovery is reported too. `metrics` counts
    /// tables accepted and refused.
    pub async fn run(
        self,
        registry: Arc<Registry>,
        by_addr: Arc<Registry>,
        metrics: Arc<crate::metrics::Metrics>,
    ) {
        let mut follow = Follow {
            path: self.path.clone(),
            seen: self.loaded.clone().map(Seen::Bytes),
            failing: false,
        };
        loop {
            let read = std::fs::read(&follow.path);
            match follow.step(read) {
                None => {}
                Some(Ok((table, recovered))) => {
                    tracing::info!(
                        services = table.len(),
                        endpoints = table
                            .values()
                            .filter_map(Published::set)
                            .map(|s| s.len())
                            .sum::<usize>(),
                        "endpoints loaded from {}{}",
                        follow.path.display(),
                        if recovered {
                            " (the file is valid again)"
                        } else {
                            ""
                        }
                    );
                    by_addr.replace_all(addresses(&table));
                    registry.replace_all(table);
                    metrics.source_reloads.inc();
                    crate::release_memory();
                }
                Some(Err(e)) => {
                    metrics.source_reload_failures.inc();
                    tracing::warn!(
                        "endpoints file {e}; keeping the previous endpoints (said once; the next change is logged)"
                    );
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// What one poll saw, so that a state which lasts is acted on once.
enum Seen {
    /// These bytes, applied or refused.
    Bytes(Vec<u8>),
    /// The file could not be read, for this reason (a missing file stays missing).
    Unreadable(std::io::ErrorKind),
}

/// The polling state of [`FileSource::run`], apart from the I/O and the logging.
struct Follow {
    path: PathBuf,
    seen: Option<Seen>,
    /// The last change was refused: the next good table is a recovery.
    failing: bool,
}

impl Follow {
    /// Takes one read of the file. `None` when nothing changed since the last one; otherwise
    /// the table to apply (and whether it ends a failure), or why the file was refused.
    fn step(&mut self, read: std::io::Result<Vec<u8>>) -> Option<Result<(Table, bool), String>> {
        // Compared before parsing: an unchanged file costs a read, not a parse.
        let same = match (&self.seen, &read) {
            (Some(Seen::Bytes(before)), Ok(now)) => before == now,
            (Some(Seen::Unreadable(before)), Err(now)) => *before == now.kind(),
            _ => false,
        };
        if same {
            return None;
        }
        let (seen, result) = match read {
            Ok(bytes) => {
                let result = parse_bytes(&self.path, &bytes);
                (Seen::Bytes(bytes), result)
            }
            Err(e) => (
                Seen::Unreadable(e.kind()),
                Err(format!("{}: cannot read: {e}", self.path.display())),
            ),
        };
        self.seen = Some(seen);
        let recovered = std::mem::replace(&mut self.failing, result.is_err());
        Some(result.map(|table| (table, recovered)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Table, String> {
        parse(Path::new("eps.toml"), text)
    }

    #[test]
    fn parses_services_identities_and_weights() {
        let t = p(r#"
[[service]]
name = "Web.Shop.svc.cluster.local:8080"
endpoints = [
  { addr = "10.0.0.7:8080", identity = "spiffe://cluster.local/ns/shop/sa/web" },
  { addr = "10.0.0.8:8080", weight = 2 },
]
[[service]]
name = "empty:80"
"#)
        .unwrap();
        let web: Vec<_> = t["web.shop.svc.cluster.local:8080"]
            .set()
            .unwrap()
            .values()
            .cloned()
            .collect();
        assert_eq!(web.len(), 2);
        assert_eq!(
            web[0].identity.as_ref().unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web[1].weight, 2);
        assert!(!web[0].opaque);
        assert!(web.iter().all(|e| e.quic.is_none()));
        assert!(t["empty:80"].set().unwrap().is_empty());
    }

    #[test]
    fn quic_ports_need_an_identity_and_a_port_number() {
        let t = p(r#"
[[service]]
name = "web:80"
endpoints = [
  { addr = "10.0.0.7:4143", identity = "spiffe://cluster.local/ns/shop/sa/web", quic = 4143 },
  { addr = "10.0.0.8:4143", identity = "spiffe://cluster.local/ns/shop/sa/web", quic = 5143 },
  { addr = "10.0.0.9:4143", identity = "spiffe://cluster.local/ns/shop/sa/web" },
]
"#)
        .unwrap();
        let quic: Vec<_> = t["web:80"]
            .set()
            .unwrap()
            .values()
            .map(|e| (e.addr.to_string(), e.quic))
            .collect();
        assert_eq!(
            quic,
            [
                ("10.0.0.7:4143".to_string(), Some(4143)),
                ("10.0.0.8:4143".to_string(), Some(5143)),
                ("10.0.0.9:4143".to_string(), None),
            ]
        );
        // Carried to the endpoints' own addresses too.
        assert_eq!(
            addresses(&t)["10.0.0.8:4143"]
                .set()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .quic,
            Some(5143)
        );
        let id = "identity = \"spiffe://cluster.local/ns/shop/sa/web\"";
        let cases = [
            (
                "{ addr = \"1.2.3.4:5\", quic = 4143 }".to_string(),
                "endpoint 1.2.3.4:5: quic = 4143 needs an identity (proxies speak HTTP/3 to each other with mTLS only); add identity = \"spiffe://…\" or remove quic",
            ),
            (
                format!("{{ addr = \"1.2.3.4:5\", {id}, quic = 0 }}"),
                "endpoint 1.2.3.4:5: quic = 0 is not a UDP port (1-65535)",
            ),
            (
                format!("{{ addr = \"1.2.3.4:5\", {id}, quic = 65536 }}"),
                "endpoint 1.2.3.4:5: quic = 65536 is not a UDP port (1-65535)",
            ),
            (
                format!("{{ addr = \"1.2.3.4:5\", {id}, quic = -1 }}"),
                "endpoint 1.2.3.4:5: quic = -1 is not a UDP port (1-65535)",
            ),
            (
                format!("{{ addr = \"1.2.3.4:5\", {id}, quic = \"4143\" }}"),
                "invalid type",
            ),
        ];
        for (ep, want) in cases {
            let text = format!("[[service]]\nname = \"a:1\"\nendpoints = [\n  {ep},\n]\n");
            let e = p(&text).unwrap_err();
            assert!(
                e.starts_with("eps.toml: line 4: ") && e.contains(want),
                "{ep} gave {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"nope\" }]\n",
                "line 3",
                "not ip:port",
            ),
            ("[[service]]\nname = \"a\"\n", "line 2", "not host:port"),
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [\n {addr=\"1.2.3.4:5\", identity=\"http://x/bad\"}]\n",
                "line 4",
                "identity",
            ),
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"1.2.3.4:5\", weight = 0 }]\n",
                "line 3",
                "weight 0",
            ),
            (
                "[[service]]\nname = \"a:1\"\nendpoints = [{ addr = \"1.2.3.4:5\", zone = \"a b\" }]\n",
                "line 3",
                "zone \"a b\" is not a zone name",
            ),
            (
                "[[service]]\nname = \"a:1\"\n[[service]]\nname = \"a:1\"\n",
                "line 4",
                "defined twice",
            ),
            (
                "[[service]]\nname = \"a:1\"\nendpoint = []\n",
                "line 3",
                "endpoint",
            ),
            ("[[service]\n", "line 1", ""),
            (
                "[[service]]\nname = \"a:1\"\ntimeout = \"fast\"\n",
                "line 3",
                "service a:1: timeout: \"fast\" is not a duration",
            ),
            (
                "[[service]]\nname = \"a:1\"\n\nretries = 11\n",
                "line 4",
                "service a:1: retries: retries 11 is too many",
            ),
            (
                "[[service]]\nname = \"a:1\"\nfailure_accrual = 5000\n",
                "line 3",
                "service a:1: failure_accrual: failure_accrual 5000 is too many",
            ),
        ];
        for (text, line, what) in cases {
            let e = p(text).unwrap_err();
            assert!(
                e.starts_with("eps.toml: ") && e.contains(line) && e.contains(what),
                "{text:?} gave {e}"
            );
        }
    }

    #[test]
    fn policies_parse_with_their_service() {
        let t = p("[[service]]\nname = \"a:1\"\ntimeout = \"250ms\"\nretries = 2\nfailure_accrual = 0\n[[service]]\nname = \"b:1\"\n").unwrap();
        let a = t["a:1"].policy().unwrap();
        assert_eq!(
            (a.timeout, a.retries, a.accrual()),
            (Some(Duration::from_millis(250)), 2, 0)
        );
        assert!(t["b:1"].policy().unwrap().is_default());
        // The routed forms (strings) and the retry fields.
        let t = p("[[service]]\nname = \"a:1\"\nretries = \"2; /orders/=0\"\nretry_on = \"5xx,non-idempotent\"\nretry_timeout = \"200ms\"\nidle_timeout = \"30s\"\nrate_limit = \"1000; /heavy/=3\"\n").unwrap();
        let a = t["a:1"].policy().unwrap();
        assert_eq!((a.retries_for("/x"), a.retries_for("/orders/1")), (2, 0));
        assert!(a.retry_on.any_5xx && a.retry_on.non_idempotent);
        assert_eq!(a.retry_timeout, Some(Duration::from_millis(200)));
        assert_eq!(a.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(a.rate_limit, Some(1000));
        assert_eq!(a.route_rate_limit_for("/heavy/x"), Some(("/heavy/", 3)));
        let e = p("[[service]]\nname = \"a:1\"\nretry_on = \"teapot\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("retry_on: "), "{e}");
    }

    const GOOD: &str = "[[service]]\nname = \"web:80\"\nendpoints = [{ addr = \"10.0.0.1:80\" }]\n";

    #[test]
    fn a_lasting_failure_is_reported_once_per_state_change() {
        let mut f = Follow {
            path: PathBuf::from("eps.toml"),
            seen: Some(Seen::Bytes(GOOD.into())),
            failing: false,
        };
        let missing = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(f.step(Ok(GOOD.into())).is_none(), "unchanged file");
        assert!(matches!(f.step(missing()), Some(Err(e)) if e.contains("cannot read")));
        for _ in 0..5 {
            assert!(
                f.step(missing()).is_none(),
                "a file still missing is news only once"
            );
        }
        // missing → unreadable for another reason → invalid: each is a change.
        let denied = Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(f.step(denied), Some(Err(_))));
        assert!(
            matches!(f.step(Ok(b"[[service]\n".to_vec())), Some(Err(e)) if e.contains("line 1"))
        );
        assert!(
            f.step(Ok(b"[[service]\n".to_vec())).is_none(),
            "same bad bytes"
        );
        // Recovery says so, once.
        assert!(matches!(f.step(Ok(GOOD.into())), Some(Ok((t, true))) if t.len() == 1));
        assert!(f.step(Ok(GOOD.into())).is_none());
        // A later edit is an ordinary reload, not a recovery.
        let edited = GOOD.replace("10.0.0.1", "10.0.0.2");
        assert!(matches!(
            f.step(Ok(edited.into_bytes())),
            Some(Ok((_, false)))
        ));
    }

    /// Log lines written while the guard lives (this thread only, so parallel tests do not mix).
    #[derive(Clone, Default)]
    struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn a_deleted_file_logs_one_warning_across_many_polls() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        // current-thread runtime: the spawned poller runs on this thread, under this default.
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = std::env::temp_dir().join(format!("remora-file-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("endpoints.toml");
        std::fs::write(&path, GOOD).unwrap();
        let registry = Registry::new();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let mut source = FileSource::new(path.clone());
        source.poll = Duration::from_millis(10);
        registry.replace_all(source.load().unwrap());
        let task = tokio::spawn(source.run(registry.clone(), Registry::new(), metrics.clone()));

        std::fs::remove_file(&path).unwrap();
        // At least 20 polls of a missing file.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = logs.text();
        assert_eq!(
            text.matches("WARN").count(),
            1,
            "one warning for a file that stays missing:\n{text}"
        );
        assert!(text.contains("cannot read"), "{text}");
        assert_eq!(metrics.source_reload_failures.get(), 1);
        assert_eq!(registry.services(), 1, "the last good table keeps serving");

        std::fs::write(&path, GOOD).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        task.abort();
        let text = logs.text();
        assert_eq!(text.matches("WARN").count(), 1, "{text}");
        assert_eq!(
            text.matches("valid again").count(),
            1,
            "one line when the file is back:\n{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

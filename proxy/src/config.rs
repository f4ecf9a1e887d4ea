//! Knobs → a typed, validated [`Config`].
//!
//! Every knob is a flag and a `REMORA_*` environment variable with a safe default. Validation
//! happens once at start; its errors name the knob and the fix.

use std::net::SocketAddr;
use std::time::Duration;

/// The endpoint model and authority normalisation live in remora-certs, shared with the
/// control plane (which must not depend on the proxy for them): destination names here and
/// service names there are normalised by the same function, weights bounded by the same limit.
pub use remora_certs::EndpointSpec;
pub(crate) use remora_certs::{MAX_WEIGHT, normalize_authority};

/// Linkerd's default opaque ports: server-speaks-first protocols (SMTP, MySQL, PostgreSQL, Redis,
/// Elasticsearch transport, memcached…) where waiting for the client to speak would hang.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Headers stripped from every request and response that crosses the proxy. A trailing `*` is a
/// prefix match. `x-envoy-*` keeps Envoy-style debug headers from leaking internals, `x-remora-*`
/// keeps anyone from forging remora's own headers (the peer identity among them).
pub const DEFAULT_STRIP_HEADERS: &[&str] = &["x-envoy-*", "x-remora-*"];

/// The proxy's configuration, as the library takes it. [`Config::default`] is the embedded
/// default a sidecar runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where peers (and everything outside the pod) connect: `REMORA_INBOUND_ADDR`.
    pub inbound_addr: SocketAddr,
    /// Where the local application listens: `REMORA_APP_ADDR`.
    pub app_addr: SocketAddr,
    /// The local application's Unix domain socket (`REMORA_APP_ADDR=unix:PATH`): inbound
    /// connects there instead of `app_addr` (which then only names the app in logs).
    pub app_unix: Option<std::path::PathBuf>,
    /// Where the local application sends its outbound calls: `REMORA_OUTBOUND_ADDR`.
    pub outbound_addr: SocketAddr,
    /// A Unix domain socket the outbound side listens on as well (`REMORA_OUTBOUND_ADDR=
    /// IP:PORT,unix:PATH`); who may connect is decided by the file's and directory's modes.
    pub outbound_unix: Option<std::path::PathBuf>,
    /// The admin server (/live, /ready, /metrics, /shutdown): `REMORA_ADMIN_ADDR`.
    pub admin_addr: SocketAddr,
    /// Static destinations, used without a control plane: `REMORA_DESTINATIONS`.
    pub destinations: Vec<StaticDestination>,
    /// Ports whose traffic skips protocol detection: `REMORA_OPAQUE_PORTS`.
    pub opaque_ports: Vec<u16>,
    /// How long to wait for a client's first bytes: `REMORA_DETECT_TIMEOUT`.
    pub detect_timeout: Duration,
    /// Header names (or `prefix*`) stripped in both directions: `REMORA_STRIP_HEADERS`.
    pub strip_headers: Vec<String>,
    /// How long a shutdown waits for in-flight work: `REMORA_DRAIN_TIMEOUT`.
    pub drain_timeout: Duration,
    /// Timeout for connecting to an upstream endpoint.
    pub connect_timeout: Duration,
    /// Where `tls.crt`, `tls.key` and `ca.crt` live: `REMORA_IDENTITY_DIR`. Without it the
    /// proxy has no identity and speaks plaintext only.
    pub identity_dir: Option<std::path::PathBuf>,
    /// `REMORA_MTLS`: how inbound treats plaintext.
    pub mtls: MtlsMode,
    /// `REMORA_PROBE_PATHS`: in strict mode, plaintext HTTP/1.1 GET/HEAD requests to these
    /// paths (kubelet probes) still reach the app.
    pub probe_paths: Vec<String>,
    /// `REMORA_CONTROL_ADDR`: the control plane (`host:port`, optionally `#spiffe://…` for
    /// its identity). Outbound destinations that are not static are discovered from it.
    pub control: Option<ControlTarget>,
    /// `REMORA_IDENTITY_MODE`: where the proxy's certificate comes from.
    pub identity_mode: IdentityMode,
    /// How long a discovery subscription lives without requests before it is dropped.
    pub discovery_idle_timeout: Duration,
    /// Open connections each of the inbound and outbound listeners accepts at most; beyond it
    /// new connections are closed at once (and counted). `None` derives it from the
    /// descriptor limit (raised to the hard limit at start): a quarter of it per listener,
    /// since each proxied connection holds two descriptors.
    pub max_connections: Option<usize>,
    /// `REMORA_ACCESS_LOG`: the fraction of requests (0 < f ≤ 1) written to standard output
    /// as one JSON line each, with tap's fields; `None` (the default) writes none.
    pub access_log: Option<f64>,
    /// `REMORA_TRACE_COLLECTOR`: an OpenTelemetry collector's OTLP/gRPC address
    /// (`host:port`, plaintext). Set, sampled requests get a span each, exported there;
    /// `None` (the default) leaves trace headers untouched and exports nothing.
    pub trace_collector: Option<String>,
    /// `REMORA_MESH_TRANSPORT`: how requests reach peer proxies (endpoints with an identity).
    pub mesh_transport: MeshTransport,
}

/// The transport between two proxies (the meshed hop).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MeshTransport {
    /// HTTP/3 over QUIC to endpoints that advertise it (discovery's `quic` port), TCP + mTLS
    /// to the others.
    Auto,
    /// HTTP/3 over QUIC to every endpoint with an identity (its QUIC port, else the UDP port
    /// of the same number), TCP + mTLS when QUIC cannot be reached.
    Quic,
    /// TCP + mTLS (HTTP/2 multiplexed) only.
    #[default]
    Tcp,
}

/// Raises the soft descriptor limit to the hard one and returns the per-listener connection
/// limit derived from it.
pub fn derived_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            1024
        } else {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            lim.rlim_cur
        }
    };
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    // Leave room for the admin server, the control plane, logs; cap what one sidecar holds.
    (soft.saturating_sub(128) / 4).clamp(16, 100_000)
}

/// Where the control plane is, and who it must prove to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlTarget {
    /// `host:port`, or several separated by commas (replicas; the proxy uses one at a time
    /// and moves to the next when it cannot connect).
    pub addr: String,
    /// Default: `spiffe://<the proxy's trust domain>/ns/remora/sa/control`.
    pub identity: Option<remora_certs::SpiffeId>,
}

impl std::str::FromStr for ControlTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, id) = match s.split_once('#') {
            Some((a, id)) => (a, Some(id)),
            None => (s, None),
        };
        if addr
            .split(',')
            .any(|a| normalize_authority(a.trim()).is_none())
        {
            return Err(format!(
                "REMORA_CONTROL_ADDR `{s}`: expected host:port[,host:port…][#spiffe://<trust-domain>/ns/<ns>/sa/<sa>]"
            ));
        }
        let identity = match id {
            Some(id) => Some(
                id.parse()
                    .map_err(|e| format!("REMORA_CONTROL_ADDR identity `{id}`: {e}"))?,
            ),
            None => None,
        };
        Ok(ControlTarget {
            addr: addr.to_string(),
            identity,
        })
    }
}

impl ControlTarget {
    /// The replicas' addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.addr
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect()
    }
}

/// Where the proxy's certificate comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum IdentityMode {
    /// `tls.crt`/`tls.key`/`ca.crt` in `REMORA_IDENTITY_DIR`, written by someone else
    /// (cert-manager, `remora cert issue`); hot reloaded.
    #[default]
    Files,
    /// The proxy makes its key, sends a CSR to the control plane with a token proving `id`,
    /// and renews at 70 % of the lifetime. Only `ca.crt` is read from `REMORA_IDENTITY_DIR`.
    Control {
        /// `REMORA_IDENTITY`
        id: remora_certs::SpiffeId,
        /// `REMORA_IDENTITY_TOKEN`: a file holding the token (a projected ServiceAccount
        /// token, or a bootstrap token); re-read at every renewal.
        token: std::path::PathBuf,
    },
}

/// Common health-check paths; kubelet probes to them keep working under strict mTLS.
pub const DEFAULT_PROBE_PATHS: &[&str] = &[
    "/healthz", "/readyz", "/livez", "/health", "/ready", "/live",
];

/// Inbound mTLS policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// mTLS and plaintext on the same port (the default).
    #[default]
    Permissive,
    /// mTLS only: plaintext connections are refused.
    Strict,
    /// Plaintext only: TLS is passed to the app untouched.
    Disabled,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], 4143)),
            app_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            outbound_addr: SocketAddr::from(([127, 0, 0, 1], 4140)),
            app_unix: None,
            outbound_unix: None,
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 4191)),
            destinations: Vec::new(),
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            detect_timeout: Duration::from_secs(10),
            strip_headers: DEFAULT_STRIP_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            identity_dir: None,
            mtls: MtlsMode::Permissive,
            probe_paths: DEFAULT_PROBE_PATHS.iter().map(|p| p.to_string()).collect(),
            control: None,
            identity_mode: IdentityMode::Files,
            discovery_idle_timeout: Duration::from_secs(600),
            max_connections: None,
            access_log: None,
            trace_collector: None,
            mesh_transport: MeshTransport::default(),
        }
    }
}

/// One static destination: an authority (`host:port`, as the app writes it in a URL) and the
/// endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticDestination {
    /// `host:port`, normalised (lower case, port written).
    pub name: String,
    /// The endpoints; at least one.
    pub endpoints: Vec<EndpointSpec>,
}

impl StaticDestination {
    /// A destination whose endpoints all have weight 1.
    pub fn new(name: &str, addrs: &[SocketAddr]) -> Self {
        StaticDestination {
            name: name.to_string(),
            endpoints: addrs
                .iter()
                .map(|&addr| EndpointSpec {
                    addr,
                    weight: 1,
                    identity: None,
                    opaque: false,
                    quic: None,
                    locality: Default::default(),
                })
                .collect(),
        }
    }
}

impl std::str::FromStr for StaticDestination {
    type Err = String;

    /// Parses `NAME:PORT=IP:PORT[#SPIFFE-ID[+quic[:UDP-PORT]]][*WEIGHT][,…]`, e.g.
    /// `echo.test:80=127.0.0.1:9001,127.0.0.1:9002*3`. `+quic` says the endpoint's proxy
    /// serves HTTP/3 over QUIC on the UDP port of the same number (`+quic:UDP-PORT`: on that
    /// one); it needs the identity, as QUIC between proxies is mTLS only.
    fn from_str(s: &str) -> Result<Self, String> {
        const FIX: &str = "expected NAME:PORT=IP:PORT[#SPIFFE-ID[+quic[:UDP-PORT]]][*WEIGHT][,…], e.g. echo.test:80=127.0.0.1:9001,10.0.0.2:4143#spiffe://cluster.local/ns/default/sa/echo+quic*2";
        let s = s.trim();
        let (name, addrs) = s
            .split_once('=')
            .ok_or_else(|| format!("destination `{s}` has no `=`; {FIX}"))?;
        let name = normalize_authority(name.trim())
            .ok_or_else(|| format!("destination name `{name}` is not HOST:PORT; {FIX}"))?;
        let mut parsed = Vec::new();
        for a in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let (a, weight) = match a.split_once('*') {
                None => (a, 1),
                Some((a, w)) => match w.trim().parse::<u32>() {
                    Ok(w) if (1..=MAX_WEIGHT).contains(&w) => (a.trim(), w),
                    _ => {
                        return Err(format!(
                            "destination `{name}`: weight `{w}` is not a whole number from 1 to {MAX_WEIGHT}; {FIX}"
                        ));
                    }
                },
            };
            // `+quic[:UDP-PORT]` (no SPIFFE ID or address holds a `+`); `None`: TCP only,
            // `Some(None)`: the UDP port of the address's number.
            let (a, quic) = match a.split_once('+') {
                None => (a, None),
                Some((a, q)) => match q.trim() {
                    "quic" => (a.trim(), Some(None)),
                    q => match q.strip_prefix("quic:").map(|p| p.trim().parse::<u16>()) {
                        Some(Ok(p)) if p != 0 => (a.trim(), Some(Some(p))),
                        Some(_) => {
                            return Err(format!(
                                "destination `{name}`: `+{q}`: the QUIC port is not a UDP port from 1 to 65535; {FIX}"
                            ));
                        }
                        None => {
                            return Err(format!(
                                "destination `{name}`: `+{q}` is not `+quic` or `+quic:UDP-PORT` (after the #SPIFFE-ID); {FIX}"
                            ));
                        }
                    },
                },
            };
            let (a, identity) = match a.split_once('#') {
                None => (a, None),
                Some((a, id)) => match id.trim().parse::<remora_certs::SpiffeId>() {
                    Ok(id) => (a.trim(), Some(id)),
                    Err(e) => return Err(format!("destination `{name}`: {e}")),
                },
            };
            let addr = a.parse::<SocketAddr>().map_err(|_| {
                format!("destination `{name}`: address `{a}` is not IP:PORT; {FIX}")
            })?;
            if quic.is_some() && identity.is_none() {
                return Err(format!(
                    "destination `{name}`: `{a}+quic` needs the identity of the endpoint's proxy (HTTP/3 between proxies is mTLS only): write {a}#SPIFFE-ID+quic, or drop +quic"
                ));
            }
            parsed.push(EndpointSpec {
                addr,
                weight,
                identity,
                opaque: false,
                quic: quic.map(|q| q.unwrap_or(addr.port())),
                locality: Default::default(),
            });
        }
        if parsed.is_empty() {
            return Err(format!("destination `{name}` lists no address; {FIX}"));
        }
        Ok(StaticDestination {
            name,
            endpoints: parsed,
        })
    }
}

impl Config {
    /// Checks what clap's types cannot: listeners that collide, an app address that would loop.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_with(self.identity_dir.is_some())
    }

    /// `validate`, where `has_identity` says whether the proxy gets credentials (a directory,
    /// or an embedding application's identity source).
    pub(crate) fn validate_with(&self, has_identity: bool) -> Result<(), String> {
        let listeners = [
            ("REMORA_INBOUND_ADDR", self.inbound_addr),
            ("REMORA_OUTBOUND_ADDR", self.outbound_addr),
            ("REMORA_ADMIN_ADDR", self.admin_addr),
        ];
        for (i, (a_name, a)) in listeners.iter().enumerate() {
            for (b_name, b) in &listeners[i + 1..] {
                if a.port() != 0 && a.port() == b.port() && overlaps(a, b) {
                    return Err(format!(
                        "{a_name} and {b_name} are both {a}; give each listener its own port"
                    ));
                }
            }
        }
        if self.app_addr.port() == 0 {
            return Err("REMORA_APP_ADDR has port 0; set the port the application listens on (e.g. 127.0.0.1:8080)".into());
        }
        if self.app_addr.port() == self.inbound_addr.port()
            && overlaps(&self.app_addr, &self.inbound_addr)
        {
            return Err(format!(
                "REMORA_APP_ADDR {} is the inbound listener itself, so every request would loop; point it at the application's port",
                self.app_addr
            ));
        }
        if let Some(f) = self.access_log
            && !(f > 0.0 && f <= 1.0)
        {
            return Err(format!(
                "REMORA_ACCESS_LOG {f} is not a fraction of requests; use on, off or a number above 0 and at most 1 (e.g. 0.01)"
            ));
        }
        if let Some(c) = &self.trace_collector
            && c.parse::<http::uri::Authority>()
                .ok()
                .and_then(|a| a.port_u16())
                .is_none()
        {
            return Err(format!(
                "REMORA_TRACE_COLLECTOR {c:?} is not host:port; give the collector's OTLP/gRPC address (e.g. otel-collector.observability:4317)"
            ));
        }
        if self.mtls == MtlsMode::Strict && !has_identity {
            return Err("REMORA_MTLS=strict needs an identity: set REMORA_IDENTITY_DIR to a directory with tls.crt, tls.key and ca.crt".into());
        }
        if self.control.is_some() && self.identity_dir.is_none() {
            return Err("REMORA_CONTROL_ADDR needs a trust bundle to verify the control plane: set REMORA_IDENTITY_DIR to a directory with ca.crt".into());
        }
        if let IdentityMode::Control { .. } = self.identity_mode {
            if self.control.is_none() {
                return Err("REMORA_IDENTITY_MODE=control needs REMORA_CONTROL_ADDR (where to send the CSR)".into());
            }
            if self.identity_dir.is_none() {
                return Err("REMORA_IDENTITY_MODE=control needs REMORA_IDENTITY_DIR with ca.crt (the trust bundle)".into());
            }
        }
        if self.detect_timeout.is_zero() {
            return Err("REMORA_DETECT_TIMEOUT is 0; use a positive duration such as 10s".into());
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.destinations {
            if !has_identity && d.endpoints.iter().any(|e| e.identity.is_some()) {
                return Err(format!(
                    "REMORA_DESTINATIONS gives `{}` an identity (#spiffe://…), which needs mTLS: set REMORA_IDENTITY_DIR",
                    d.name
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(format!(
                    "REMORA_DESTINATIONS names `{}` twice; list all its addresses in one entry",
                    d.name
                ));
            }
        }
        for h in &self.strip_headers {
            let name = h.strip_suffix('*').unwrap_or(h);
            if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!(
                    "REMORA_STRIP_HEADERS entry `{h}` is not a header name (or `prefix*`)"
                ));
            }
        }
        Ok(())
    }
}

fn overlaps(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        let d: StaticDestination = "Echo.Test:80=127.0.0.1:9001, 127.0.0.1:9002"
            .parse()
            .unwrap();
        assert_eq!(d.name, "echo.test:80");
        assert_eq!(d.endpoints.len(), 2);
        let d: StaticDestination = "e:80=127.0.0.1:1*3,127.0.0.1:2".parse().unwrap();
        assert_eq!(d.endpoints[0].weight, 3);
        assert_eq!(d.endpoints[1].weight, 1);
        assert!("e:80=127.0.0.1:1*0".parse::<StaticDestination>().is_err());
        let d: StaticDestination = "e:80=127.0.0.1:1#spiffe://td/ns/a/sa/b*2".parse().unwrap();
        assert_eq!(d.endpoints[0].weight, 2);
        assert_eq!(
            d.endpoints[0]
                .identity
                .as_ref()
                .map(|i| i.to_string())
                .as_deref(),
            Some("spiffe://td/ns/a/sa/b")
        );
        assert!(
            "e:80=127.0.0.1:1#http://x"
                .parse::<StaticDestination>()
                .is_err()
        );
        assert!("e:80=127.0.0.1:1*x".parse::<StaticDestination>().is_err());
        assert!(
            "echo.test=127.0.0.1:1"
                .parse::<StaticDestination>()
                .is_err()
        );
        assert!("echo.test:80=".parse::<StaticDestination>().is_err());
        assert!("echo.test:80=nope".parse::<StaticDestination>().is_err());
        assert!("[::1]:80=[::1]:9000".parse::<StaticDestination>().is_ok());
    }

    #[test]
    fn destinations_advertise_quic_after_the_identity() {
        const ID: &str = "spiffe://td/ns/a/sa/b";
        // (input, [(quic, weight)] of its endpoints)
        type QuicAndWeight = (Option<u16>, u32);
        let good: &[(&str, &[QuicAndWeight])] = &[
            ("e:80=10.0.0.1:4143", &[(None, 1)]),
            ("e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b", &[(None, 1)]),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic",
                &[(Some(4143), 1)],
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:5143",
                &[(Some(5143), 1)],
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic*3",
                &[(Some(4143), 3)],
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:65535*2",
                &[(Some(65535), 2)],
            ),
            (
                "e:80=[::1]:4143#spiffe://td/ns/a/sa/b+quic",
                &[(Some(4143), 1)],
            ),
            (
                " e:80= 10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:6143*2 ",
                &[(Some(6143), 2)],
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic,10.0.0.2:8080",
                &[(Some(4143), 1), (None, 1)],
            ),
        ];
        for (input, want) in good {
            let d: StaticDestination = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            let got: Vec<_> = d.endpoints.iter().map(|e| (e.quic, e.weight)).collect();
            assert_eq!(got, *want, "{input}");
            for e in d.endpoints.iter().filter(|e| e.quic.is_some()) {
                assert_eq!(
                    e.identity.as_ref().map(|i| i.to_string()).as_deref(),
                    Some(ID)
                );
            }
        }
        // (input, what the error says)
        let bad = [
            (
                "e:80=10.0.0.1:4143+quic",
                "destination `e:80`: `10.0.0.1:4143+quic` needs the identity of the endpoint's proxy (HTTP/3 between proxies is mTLS only): write 10.0.0.1:4143#SPIFFE-ID+quic, or drop +quic",
            ),
            ("e:80=10.0.0.1:4143+quic:5143*2", "needs the identity"),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:0",
                "destination `e:80`: `+quic:0`: the QUIC port is not a UDP port from 1 to 65535; expected NAME:PORT=IP:PORT[#SPIFFE-ID[+quic[:UDP-PORT]]]",
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:65536",
                "`+quic:65536`: the QUIC port",
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic:",
                "`+quic:`: the QUIC port",
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+h3",
                "destination `e:80`: `+h3` is not `+quic` or `+quic:UDP-PORT` (after the #SPIFFE-ID)",
            ),
            (
                "e:80=10.0.0.1:4143+quic#spiffe://td/ns/a/sa/b",
                "`+quic#spiffe://td/ns/a/sa/b` is not `+quic` or `+quic:UDP-PORT` (after the #SPIFFE-ID)",
            ),
            (
                "e:80=10.0.0.1:4143#spiffe://td/ns/a/sa/b+quic+quic",
                "`+quic+quic` is not `+quic`",
            ),
        ];
        for (input, want) in bad {
            let e = input.parse::<StaticDestination>().unwrap_err();
            assert!(e.contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn rejects_colliding_listeners() {
        let c = Config {
            outbound_addr: "127.0.0.1:4143".parse().unwrap(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("REMORA_INBOUND_ADDR") && err.contains("REMORA_OUTBOUND_ADDR"),
            "{err}"
        );
        assert!(Config::default().validate().is_ok());
    }
}

//! remora's data plane as a library: run the sidecar's inbound and outbound proxies inside
//! your own program — as its ingress, egress or in-process sidecar — with your own logic at
//! named request phases ([`Hooks`]), your own endpoint sources ([`discover::Discover`]), and
//! its metrics in your Prometheus registry.
//!
//! ```no_run
//! use remora_proxy::{Hooks, Listen, Proxy, RequestContext};
//!
//! struct Tag;
//! impl Hooks for Tag {
//!     fn on_upstream_request(&self, req: &mut http::request::Parts, _: &RequestContext<'_>) {
//!         req.headers.insert("x-served-by", http::HeaderValue::from_static("my-app"));
//!     }
//! }
//!
//! # async fn demo() -> Result<(), remora_proxy::Error> {
//! let mut registry = prometheus_client::registry::Registry::default();
//! let proxy = Proxy::builder()
//!     .app("127.0.0.1:8080".parse().unwrap()) // inbound traffic goes here
//!     .inbound(Listen::Addr("0.0.0.0:4143".parse().unwrap()))
//!     .outbound(Listen::Off) // this program makes no calls through remora
//!     .admin(Listen::Off)
//!     .hooks(Tag)
//!     .registry(&mut registry) // remora_* metrics beside yours
//!     .bind()
//!     .await?;
//! let running = proxy.spawn();
//! running.ready().await;
//! // … later: drain connections in flight, then stop.
//! running.shutdown();
//! let report = running.wait().await;
//! # let _ = report; Ok(()) }
//! ```
//!
//! Everything that is not re-exported here is private: the request path inside
//! (detection, mTLS, scrubbing, balancing) is described in ARCHITECTURE.md.

#![warn(missing_docs)]

mod access_log;
mod admin;
pub mod alloc;
mod backoff;
mod balance;
mod config;
mod control;
mod deadline;
mod direction;
pub mod discover;
mod drain;
mod endpoint;
mod hooks;
mod http;
mod identity;
mod idle;
mod inbound;
mod io;
mod listener;
mod metrics;
mod outbound;
mod panics;
mod quic;
mod random;
mod ratelimit;
mod respond;
mod retry;
mod route_metrics;
mod scrub;
mod tap;
mod tls;
mod trace;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, ControlTarget, EndpointSpec, IdentityMode, MeshTransport, MtlsMode, StaticDestination,
};
pub use direction::Direction;
pub use hooks::{Completion, Hooks, NoHooks, RequestContext};
pub use identity::{CredentialSet, IdentitySource};
pub use panics::caught as panics_caught;

/// Why a proxy could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A knob has a value that cannot work; the message names it and the fix.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not bind.
    #[error("{knob} {addr}: cannot listen: {source}; choose a free port or stop what holds it")]
    Bind {
        /// The knob that names the address (`REMORA_INBOUND_ADDR`, …).
        knob: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Starts a graceful shutdown from anywhere (another task, a signal handler).
#[derive(Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts draining: inbound first, then outbound, bounded by `Config::drain_timeout`.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// What a finished run reports.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RunReport {
    /// Connections still open at the drain deadline, cut.
    pub cut: usize,
}

/// How one of the proxy's listeners gets its socket.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use remora_proxy::{Listen, Proxy};
/// // An egress proxy on a socket this program bound itself; no inbound, no admin.
/// let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let proxy = Proxy::builder()
///     .outbound(Listen::Listener(socket))
///     .inbound(Listen::Off)
///     .admin(Listen::Off)
///     .bind()
///     .await?;
/// assert!(proxy.inbound_addr().is_none());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub enum Listen {
    /// Bind this address (port 0 picks a free port).
    Addr(SocketAddr),
    /// Serve a socket the caller bound (and may have handed down, e.g. by socket activation).
    Listener(TcpListener),
    /// No such listener.
    Off,
}

/// Builds a [`Proxy`]: a [`Config`] (every `remora-proxy` knob as a typed value), plus what
/// only a program can give — listeners, hooks, discovery sources and a metrics registry.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use remora_proxy::{MtlsMode, Proxy, StaticDestination};
/// let proxy = Proxy::builder()
///     .configure(|c| {
///         c.mtls = MtlsMode::Strict;
///         c.identity_dir = Some("/var/run/remora/identity".into());
///     })
///     .destination("billing.internal:80=10.0.0.7:8080".parse::<StaticDestination>()?)
///     .dns_fallback(false)
///     .bind()
///     .await?;
/// let report = proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// println!("{} connections cut at the drain deadline", report.cut);
/// # Ok(()) }
/// ```
pub struct Builder {
    cfg: Config,
    listen: [Option<Listen>; 3],
    hooks: Option<Arc<dyn Hooks>>,
    sources: Vec<discover::Source>,
    dns_fallback: bool,
    metrics: Arc<metrics::Metrics>,
    identity: Option<Arc<dyn identity::IdentitySource>>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            cfg: Config::default(),
            listen: [None, None, None],
            hooks: None,
            sources: Vec::new(),
            dns_fallback: true,
            metrics: Arc::new(metrics::Metrics::new()),
            identity: None,
        }
    }
}

impl Builder {
    /// Replaces the whole configuration (listener addresses included, unless set with
    /// [`Builder::inbound`] and friends).
    pub fn config(mut self, cfg: Config) -> Self {
        self.cfg = cfg;
        self
    }

    /// Changes the configuration in place: `.configure(|c| c.mtls = MtlsMode::Strict)`.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.cfg);
        self
    }

    /// Where inbound requests go (`Config::app_addr`).
    pub fn app(mut self, addr: SocketAddr) -> Self {
        self.cfg.app_addr = addr;
        self
    }

    /// A static destination (`Config::destinations`).
    pub fn destination(mut self, d: StaticDestination) -> Self {
        self.cfg.destinations.push(d);
        self
    }

    /// The inbound listener (default: bind `Config::inbound_addr`).
    pub fn inbound(mut self, l: Listen) -> Self {
        self.listen[0] = Some(l);
        self
    }

    /// The outbound listener (default: bind `Config::outbound_addr`).
    pub fn outbound(mut self, l: Listen) -> Self {
        self.listen[1] = Some(l);
        self
    }

    /// The admin listener: `/ready`, `/live`, `/metrics`, `/shutdown` (default: bind
    /// `Config::admin_addr`).
    pub fn admin(mut self, l: Listen) -> Self {
        self.listen[2] = Some(l);
        self
    }

    /// The application's request phases (default: [`NoHooks`]).
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks = Some(Arc::new(hooks));
        self
    }

    /// Adds a discovery source, asked after static destinations and earlier sources, and
    /// before the control plane. `label` names it in logs.
    pub fn discover(mut self, label: &str, source: impl discover::Discover) -> Self {
        self.sources.push(discover::Source {
            label: label.to_string(),
            source: Arc::new(source),
        });
        self
    }

    /// Whether names no source knows are looked up in DNS (default: yes). Off, they get 503.
    pub fn dns_fallback(mut self, on: bool) -> Self {
        self.dns_fallback = on;
        self
    }

    /// The proxy's credentials come from `source` instead of `Config::identity_dir` (which
    /// then only supplies the control plane's trust bundle, if any).
    pub fn identity(mut self, source: impl identity::IdentitySource) -> Self {
        self.identity = Some(Arc::new(source));
        self
    }

    /// Registers remora's metrics (`remora_*`) into `registry`, beside the application's own;
    /// the admin listener, if any, serves them too.
    pub fn registry(self, registry: &mut prometheus_client::registry::Registry) -> Self {
        self.metrics
            .register(registry.sub_registry_with_prefix("remora"));
        self
    }

    /// Validates the configuration and binds the listeners.
    pub async fn bind(self) -> Result<Proxy, Error> {
        let Builder {
            cfg,
            listen,
            hooks,
            sources,
            dns_fallback,
            metrics,
            identity: source,
        } = self;
        // Validated with the addresses the builder will bind: a listener set with
        // `Listen::Addr` replaces the config's, and one that is off or pre-bound has none here
        // (port 0: no clash; the bound socket is checked after binding).
        let mut check = cfg.clone();
        for (slot, addr) in listen.iter().zip([
            &mut check.inbound_addr,
            &mut check.outbound_addr,
            &mut check.admin_addr,
        ]) {
            match slot {
                None => {}
                Some(Listen::Addr(a)) => *addr = *a,
                Some(_) => *addr = SocketAddr::from(([0, 0, 0, 0], 0)),
            }
        }
        check
            .validate_with(cfg.identity_dir.is_some() || source.is_some())
            .map_err(Error::Config)?;
        let [i, o, a] = listen;
        let inbound = listener(
            "REMORA_INBOUND_ADDR",
            i.unwrap_or(Listen::Addr(cfg.inbound_addr)),
        )
        .await?;
        let outbound = listener(
            "REMORA_OUTBOUND_ADDR",
            o.unwrap_or(Listen::Addr(cfg.outbound_addr)),
        )
        .await?;
        let admin = listener(
            "REMORA_ADMIN_ADDR",
            a.unwrap_or(Listen::Addr(cfg.admin_addr)),
        )
        .await?;
        // QUIC beside inbound mTLS, on the same port number over UDP (a peer proxy may carry
        // its requests over HTTP/3). A port taken over UDP leaves inbound on TCP only.
        let inbound_udp = match &inbound {
            Some((_, local))
                if cfg.mtls != MtlsMode::Disabled
                    && (cfg.identity_dir.is_some() || source.is_some()) =>
            {
                match listener::quic::bind(*local) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(addr = %local, error = %e, "cannot listen for QUIC (UDP); inbound is TCP only");
                        None
                    }
                }
            }
            _ => None,
        };
        let outbound_unix = match (&outbound, &cfg.outbound_unix) {
            (Some(_), Some(path)) => Some(unix_listener(path)?),
            _ => None,
        };
        // Checked again against what was bound: a pre-bound socket or an explicit address can
        // be the app's own port, and the inbound listener would then forward to itself.
        if let Some((_, local)) = &inbound
            && http::forward::same_listener(local, &cfg.app_addr, &[])
        {
            return Err(Error::Config(format!(
                "REMORA_APP_ADDR {} is the inbound listener itself ({local}), so every request would loop; point it at the application's port",
                cfg.app_addr
            )));
        }
        let identity = match source {
            Some(source) => Some(identity::IdentityStore::with_source(
                metrics.clone(),
                source,
            )),
            None => cfg
                .identity_dir
                .as_deref()
                .map(|dir| match &cfg.identity_mode {
                    config::IdentityMode::Files => {
                        identity::IdentityStore::new(dir, metrics.clone())
                    }
                    config::IdentityMode::Control { id, token } => {
                        identity::IdentityStore::with_certifier(
                            dir,
                            metrics.clone(),
                            identity::Certifier {
                                id: id.clone(),
                                token: token.clone(),
                                client: Default::default(),
                            },
                        )
                    }
                }),
        };
        // The chain: static destinations, the application's sources, the control plane.
        let statics = Arc::new(discover::Static::default());
        for d in &cfg.destinations {
            statics.set(&d.name, d.endpoints.clone());
        }
        // The proxy's zone: the control plane tells it (no knob); until then zones are ignored.
        let zone = balance::Zone::default();
        let mut chain = vec![discover::Source {
            label: "static".into(),
            source: statics.clone(),
        }];
        chain.extend(sources);
        if let (Some(target), Some(store)) = (&cfg.control, &identity) {
            let td = {
                let store = Arc::downgrade(store);
                Arc::new(move || store.upgrade().and_then(|s| s.trust_domain()))
            };
            // The bundle that verifies the control plane is the directory's (validation
            // requires the directory with REMORA_CONTROL_ADDR), whatever supplies the leaf.
            let ca = cfg
                .identity_dir
                .as_ref()
                .map(|d| d.join("ca.crt"))
                .unwrap_or_else(|| store.ca_path());
            let client = control::connect(target, ca, td).map_err(Error::Config)?;
            if let Some(c) = store.certifier() {
                let _ = c.client.set(client.clone());
            }
            // The namespace names expand in, as the pod's resolver would: the one in the
            // proxy's identity, else the pod's service-account namespace file. No knob.
            let namespace: discover::Namespace = {
                let store = Arc::downgrade(store);
                let asked = match &cfg.identity_mode {
                    IdentityMode::Control { id, .. } => id.namespace_and_account(),
                    IdentityMode::Files => None,
                }
                .map(|(ns, _)| ns.to_string());
                Arc::new(move || {
                    store
                        .upgrade()
                        .and_then(|s| s.current())
                        .and_then(|l| l.id().namespace_and_account().map(|(ns, _)| ns.to_string()))
                        .or_else(|| asked.clone())
                        .or_else(pod_namespace)
                })
            };
            chain.push(discover::Source {
                label: format!("control plane {}", client.addr),
                source: Arc::new(discover::ControlPlane::new(
                    client,
                    metrics.clone(),
                    namespace,
                    zone.clone(),
                )),
            });
        }
        let destinations = Arc::new(
            discover::Destinations::new(
                Some(statics.clone()),
                chain,
                dns_fallback,
                cfg.connect_timeout,
                cfg.discovery_idle_timeout,
                metrics.clone(),
                identity.clone(),
            )
            .with_zone(zone)
            .with_quic(quic::client::QuicClient::new(cfg.mesh_transport)),
        );
        let admin_state = Arc::new(admin::AdminState {
            metrics,
            identity,
            ready: Default::default(),
            draining: Default::default(),
            shutdown: CancellationToken::new(),
        });
        Ok(Proxy {
            cfg,
            inbound6: twin(&inbound).await,
            outbound6: twin(&outbound).await,
            inbound_udp,
            inbound,
            outbound,
            outbound_unix,
            admin,
            admin_state,
            destinations,
            statics,
            hooks,
        })
    }
}

/// Binds the outbound Unix socket at `path`. A socket file left by a proxy that is gone is
/// replaced; one that a live process still accepts on is an error (two proxies, one path).
fn unix_listener(path: &std::path::Path) -> Result<tokio::net::UnixListener, Error> {
    let err = |e: std::io::Error| {
        Error::Config(format!(
            "REMORA_OUTBOUND_ADDR unix:{}: cannot listen: {e}",
            path.display()
        ))
    };
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "REMORA_OUTBOUND_ADDR unix:{}: the path exists and is not a socket; choose another path",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "REMORA_OUTBOUND_ADDR unix:{}: another process is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    tokio::net::UnixListener::bind(path).map_err(err)
}

async fn listener(
    knob: &'static str,
    l: Listen,
) -> Result<Option<(TcpListener, SocketAddr)>, Error> {
    let (l, addr) = match l {
        Listen::Off => return Ok(None),
        Listen::Listener(l) => {
            let addr = l.local_addr().map_err(|source| Error::Bind {
                knob,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
            (l, addr)
        }
        Listen::Addr(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { knob, addr, source })?;
            (l, addr)
        }
    };
    let local = l
        .local_addr()
        .map_err(|source| Error::Bind { knob, addr, source })?;
    Ok(Some((l, local)))
}

/// The IPv6 twin of a listener on the IPv4 wildcard or loopback address, on the same port:
/// `remora-proxy init` redirects a pod's IPv6 TCP to the same ports, and an IPv6-only
/// listener beside the IPv4 one keeps peer addresses as they are. `None` without IPv6 (or
/// when the port is taken there); the IPv4 listener serves either way.
async fn twin(l: &Option<(TcpListener, SocketAddr)>) -> Option<TcpListener> {
    use std::net::{IpAddr, Ipv6Addr};
    use std::os::fd::AsRawFd;
    let (_, local) = l.as_ref()?;
    let ip = match local.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        IpAddr::V4(v4) if v4.is_loopback() => Ipv6Addr::LOCALHOST,
        _ => return None,
    };
    let sock = tokio::net::TcpSocket::new_v6().ok()?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return None;
    }
    sock.set_reuseaddr(true).ok()?;
    sock.bind(SocketAddr::new(ip.into(), local.port())).ok()?;
    sock.listen(1024).ok()
}

/// A bound, not yet running proxy.
pub struct Proxy {
    cfg: Config,
    inbound: Option<(TcpListener, SocketAddr)>,
    outbound: Option<(TcpListener, SocketAddr)>,
    outbound_unix: Option<tokio::net::UnixListener>,
    /// The IPv6 twins of the IPv4 inbound and outbound listeners (see [`twin`]).
    inbound6: Option<TcpListener>,
    outbound6: Option<TcpListener>,
    /// QUIC at the inbound listener's port number (mTLS peers only).
    inbound_udp: Option<std::net::UdpSocket>,
    admin: Option<(TcpListener, SocketAddr)>,
    admin_state: Arc<admin::AdminState>,
    destinations: Arc<discover::Destinations>,
    statics: Arc<discover::Static>,
    hooks: Option<Arc<dyn Hooks>>,
}

impl Proxy {
    /// Starts building a proxy from [`Config::default`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Validates `cfg` and binds every listener: `Proxy::builder().config(cfg).bind()`.
    pub async fn bind(cfg: Config) -> Result<Proxy, Error> {
        Proxy::builder().config(cfg).bind().await
    }

    /// The inbound listener's address, when it has one.
    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.as_ref().map(|l| l.1)
    }

    /// The outbound listener's address, when it has one.
    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound.as_ref().map(|l| l.1)
    }

    /// The admin listener's address, when it has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|l| l.1)
    }

    /// The metrics in Prometheus text form (what `/metrics` serves).
    pub fn encode_metrics(&self) -> String {
        self.admin_state.metrics.encode()
    }

    /// The static destinations, to change endpoint sets while the proxy runs (requests in
    /// flight are not disturbed).
    pub fn statics(&self) -> Arc<discover::Static> {
        self.statics.clone()
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.admin_state.shutdown.clone())
    }

    /// Runs on the caller's runtime in a task of its own, until shut down.
    pub fn spawn(self) -> Running {
        let state = self.admin_state.clone();
        let task = tokio::spawn(self.run(std::future::pending()));
        Running { state, task }
    }

    /// Serves until `signal` resolves or a shutdown is requested, then drains: inbound first
    /// (the app's callers), while the app's own outbound calls keep working, then outbound.
    /// Returns once nothing is in flight or the drain deadline has passed.
    pub async fn run(self, signal: impl Future<Output = ()>) -> RunReport {
        let state = self.admin_state.clone();
        let metrics = state.metrics.clone();
        let rules = Arc::new(scrub::Rules::new(&self.cfg.strip_headers));
        let (in_drain, out_drain) = (drain::Drain::new(), drain::Drain::new());
        let mut identity_task = None;
        let tracer = match &self.cfg.trace_collector {
            Some(c) => match trace::Tracer::spawn(c, state.identity.clone(), metrics.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "tracing is off");
                    None
                }
            },
            None => None,
        };
        // Rate limits come from the control plane (for the pod's own addresses).
        let limits = self.cfg.control.is_some().then(|| {
            Arc::new(ratelimit::RateLimits::new(
                self.destinations.clone(),
                self.cfg.probe_paths.clone(),
            ))
        });
        let mut inbound = inbound::listener(
            &self.cfg,
            limits,
            metrics.clone(),
            in_drain.clone(),
            rules.clone(),
            http::forward::PerRequest {
                hooks: self.hooks.clone(),
                tracer: tracer.clone(),
            },
        );
        if let Some(store) = &state.identity {
            inbound.tls = Some(listener::InboundTls {
                store: store.clone(),
                mode: self.cfg.mtls,
                probe_paths: Arc::new(self.cfg.probe_paths.clone()),
            });
            identity_task = Some(tokio::spawn(store.clone().watch()));
        }
        let inbound = Arc::new(inbound);
        let outbound = Arc::new(outbound::listener(
            &self.cfg,
            self.destinations.clone(),
            metrics.clone(),
            out_drain.clone(),
            rules,
            [&self.outbound, &self.admin]
                .into_iter()
                .flatten()
                .map(|l| l.1)
                .collect(),
            http::forward::PerRequest {
                hooks: self.hooks.clone(),
                tracer,
            },
        ));
        let addr = |l: &Option<(TcpListener, SocketAddr)>| match l {
            Some((_, a)) => a.to_string(),
            None => "off".to_string(),
        };
        let (in_addr, out_addr, admin_addr) =
            (addr(&self.inbound), addr(&self.outbound), addr(&self.admin));
        for l in self
            .inbound
            .map(|(l, _)| l)
            .into_iter()
            .chain(self.inbound6)
        {
            tokio::spawn(
                inbound
                    .clone()
                    .serve(listener::Acceptor::Tcp(l), in_drain.clone()),
            );
        }
        if let (Some(udp), Some(store)) = (self.inbound_udp, &state.identity) {
            tokio::spawn(listener::quic::serve(
                inbound.clone(),
                udp,
                store.clone(),
                in_drain.clone(),
            ));
        }
        for l in self
            .outbound
            .map(|(l, _)| l)
            .into_iter()
            .chain(self.outbound6)
        {
            tokio::spawn(
                outbound
                    .clone()
                    .serve(listener::Acceptor::Tcp(l), out_drain.clone()),
            );
        }
        if let Some(l) = self.outbound_unix {
            tokio::spawn(
                outbound
                    .clone()
                    .serve(listener::Acceptor::Unix(l), out_drain.clone()),
            );
        }
        // Bursts (many connections, large bodies) leave freed heap in glibc's arenas; hand it
        // back to the system so RSS returns to idle after the burst (cheap on a small heap).
        #[cfg(target_env = "gnu")]
        let trim = tokio::spawn(async {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tick.tick().await;
                // SAFETY: malloc_trim only walks the allocator's own free lists.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
        let stop_admin = CancellationToken::new();
        if let Some((l, _)) = self.admin {
            tokio::spawn(admin::serve(l, state.clone(), stop_admin.clone()));
        }
        state.ready.store(true, Ordering::Release);
        metrics.ready.set(1);
        tracing::info!(inbound = %in_addr, outbound = %out_addr, admin = %admin_addr,
            app = %self.cfg.app_addr, "remora-proxy ready");

        tokio::select! {
            _ = signal => {}
            _ = state.shutdown.cancelled() => {}
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.cfg.drain_timeout;
        state.draining.store(true, Ordering::Release);
        metrics.ready.set(0);
        metrics.draining.set(1);
        let requests: i64 = [metrics::Direction::Inbound, metrics::Direction::Outbound]
            .into_iter()
            .map(|direction| {
                metrics
                    .requests_in_flight
                    .get_or_create(&metrics::DirectionLabels { direction })
                    .get()
            })
            .sum();
        let connections = in_drain.in_flight() + out_drain.in_flight();
        metrics.drain_connections.set(connections as i64);
        metrics.drain_requests.set(requests);
        tracing::info!(
            inbound_connections = in_drain.in_flight(),
            outbound_connections = out_drain.in_flight(),
            requests_in_flight = requests,
            timeout = ?self.cfg.drain_timeout,
            "draining"
        );
        // Inbound first: the app keeps its outbound calls while its callers finish.
        let mut cut = in_drain.finish(deadline).await;
        cut += out_drain.finish(deadline).await;
        metrics.drain_cut.set(cut as i64);
        stop_admin.cancel();
        // Nothing of this proxy outlives its run (embedders may keep the runtime going).
        self.destinations.stop();
        if let Some(t) = identity_task {
            t.abort();
        }
        #[cfg(target_env = "gnu")]
        trim.abort();
        if cut > 0 {
            tracing::warn!(
                cut,
                "drain deadline reached; cut connections still in flight"
            );
        } else {
            tracing::info!(elapsed = ?started.elapsed(), "drained");
        }
        // The socket file would otherwise outlive the proxy (the next start replaces it).
        if let Some(path) = &self.cfg.outbound_unix {
            let _ = std::fs::remove_file(path);
        }
        RunReport { cut }
    }
}

/// A proxy running in a task of its own ([`Proxy::spawn`]).
pub struct Running {
    state: Arc<admin::AdminState>,
    task: tokio::task::JoinHandle<RunReport>,
}

impl Running {
    /// Whether it is ready as `/ready` says: listeners up, an identity in service when one
    /// is configured, not draining.
    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }

    /// Waits until [`Running::is_ready`] (or the run has ended). Readiness can wait on the
    /// first certificate from the control plane, so this polls the state every 10 ms.
    pub async fn ready(&self) {
        while !self.state.is_ready() && !self.task.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Starts the graceful shutdown.
    pub fn shutdown(&self) {
        self.state.shutdown.cancel();
    }

    /// A handle that starts the graceful shutdown from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.state.shutdown.clone())
    }

    /// Waits for the run to end (after a shutdown) and returns its report; an error when the
    /// run itself panicked (a bug, logged) or its task was aborted.
    pub async fn wait(self) -> Result<RunReport, tokio::task::JoinError> {
        self.task.await.inspect_err(|e| {
            tracing::error!(error = %e, "BUG: the proxy's run ended abnormally; please report it");
        })
    }
}

/// The pod's namespace as Kubernetes mounts it beside the ServiceAccount token; `None` off
/// Kubernetes. Read when asked (at each discovery watch), so it is never stale.
fn pod_namespace() -> Option<String> {
    const PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    let ns = std::fs::read_to_string(PATH).ok()?;
    let ns = ns.trim();
    (!ns.is_empty() && ns.len() <= 63).then(|| ns.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pre_bound_inbound_socket_on_the_app_port_is_refused() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = socket.local_addr().unwrap();
        let err = Proxy::builder()
            .app(app)
            .inbound(Listen::Listener(socket))
            .outbound(Listen::Off)
            .admin(Listen::Off)
            .bind()
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("would loop"), "{err}");
        // With no inbound listener at all, nothing can loop, even on the default inbound port.
        let proxy = Proxy::builder()
            .app(Config::default().inbound_addr)
            .inbound(Listen::Off)
            .outbound(Listen::Addr("127.0.0.1:0".parse().unwrap()))
            .admin(Listen::Off)
            .bind()
            .await
            .expect("binds");
        assert!(proxy.inbound_addr().is_none() && proxy.outbound_addr().is_some());
    }
}

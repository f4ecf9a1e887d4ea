//! `remora control` as a library: bind, then run the source, the issuer and both APIs.
//!
//! The gRPC APIs are served over TLS 1.3 (HTTP/2, ALPN h2) with a certificate from the issuer;
//! proxies verify it against their trust bundle and the control plane's SPIFFE ID. Clients need
//! no certificate: discovery data is not secret, and Certify is authorised by its token. A
//! plaintext admin listener serves `/live`, `/ready` (the source has synced) and `/metrics`.
//!
//! Because clients are anonymous, every resource a client can hold is bounded ([`Limits`]):
//! connections in total and per client IP (checked before TLS, so a refused connection costs
//! one accept), HTTP/2 streams per connection, and watches in total.
//!
//! The control plane keeps no state of its own: a restarted or second replica rebuilds
//! everything from the source and the issuer directory, and proxies re-subscribe.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use remora_certs::{Credentials, SpiffeId};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Service;

use crate::discovery::DiscoveryService;
use crate::issuer::{Authenticator, BootstrapTokens, IdentityService, Issuer};
use crate::metrics::{Metrics, ReasonLabels};
use crate::registry::Registry;
use crate::source::file::FileSource;
use crate::source::kubernetes::KubeSource;

/// The TCP peer of a request, for logs.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

pub enum Source {
    /// A TOML endpoints file ([`crate::source::file`]).
    File(PathBuf),
    /// EndpointSlices, from a kubeconfig path or the in-cluster configuration.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        cluster_domain: String,
    },
}

pub struct Options {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// A directory made by `remora ca init` (issuer.crt, issuer.key, ca.crt).
    pub issuer_dir: PathBuf,
    pub trust_domain: String,
    /// The control plane's own identity; default `spiffe://<td>/ns/remora/sa/control`.
    pub identity: Option<SpiffeId>,
    pub source: Source,
    pub bootstrap_tokens: Option<PathBuf>,
    /// Check ServiceAccount tokens with a TokenReview, through this kubeconfig (or in-cluster
    /// when `None`).
    pub token_review: Option<Option<PathBuf>>,
    pub token_audiences: Vec<String>,
    pub cert_lifetime: Duration,
    pub limits: Limits,
    /// The sidecar injection webhook; off when `None`.
    pub webhook: Option<WebhookOptions>,
}

/// Where and what the injection webhook serves ([`crate::webhook`]).
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    /// Certificate names beyond the control plane Service's.
    pub extra_names: Vec<String>,
    pub proxy_image: String,
    pub classic: bool,
}

/// The proxy's own cap on its control-plane watches (`WATCH_MAX` in remora-proxy's
/// `discover`). A proxy multiplexes all of them on one connection, so the per-connection
/// stream limit must not be below it.
pub const PROXY_WATCH_MAX: u32 = 4096;

/// Bounds on what anonymous clients can hold open. The defaults fit a fleet of a few thousand
/// proxies per replica; each is configurable (`remora control --max-*`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once. `None`: [`DEFAULT_MAX_CONNECTIONS`], lowered to three
    /// quarters of the descriptor limit when that is smaller (after raising the soft limit to
    /// the hard one), so accept never fails with EMFILE for want of a descriptor.
    pub connections: Option<usize>,
    /// Connections open at once from one client IP. A proxy holds one; the rest is headroom
    /// for reconnects and for proxies sharing an address (host network, NAT).
    pub connections_per_peer: usize,
    /// HTTP/2 streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// further ones are refused with REFUSED_STREAM.
    pub streams_per_connection: u32,
    /// Discovery watches open at once over all connections; further ones get
    /// RESOURCE_EXHAUSTED.
    pub watches: usize,
}

/// A few thousand proxies per replica; replicas scale out beyond that.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// 64 per IP: far above the one connection a proxy keeps, low enough that one host cannot
/// take more than 1/64 of the default total.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// The proxy's watch table (4096) plus room for Certify calls and for watches the proxy has
/// just dropped whose resets are still on the way.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = PROXY_WATCH_MAX + 64;
/// A watch costs about 12 KB here (5,000 watches measured +58 MB), so 65,536 is about 760 MB
/// at worst: 16 names for each of the default 4,096 connections, several times what an app
/// typically calls.
pub const DEFAULT_MAX_WATCHES: usize = 65_536;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: None,
            connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            watches: DEFAULT_MAX_WATCHES,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft limit in force
/// (`None` where it cannot be read). Connections are the control plane's main use of
/// descriptors, and the common soft default of 1024 would cap it at about a thousand proxies.
fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above. Failing (e.g. an unlimited hard limit on macOS) keeps the
            // current soft limit, which is what is then used.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim = raised;
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    None
}

impl Limits {
    /// The connection limit to enforce, and the descriptor limit when it was read.
    fn connections(&self) -> (usize, Option<u64>) {
        let fds = raise_descriptor_limit();
        // A quarter of the descriptors stays for listeners, files, the Kubernetes client and
        // admin connections.
        let by_fds = fds.map(|n| usize::try_from(n / 4 * 3).unwrap_or(usize::MAX).max(1));
        let n = match self.connections {
            Some(n) => n,
            None => by_fds.map_or(DEFAULT_MAX_CONNECTIONS, |f| f.min(DEFAULT_MAX_CONNECTIONS)),
        };
        (n, fds)
    }

    fn check(&self) -> Result<(), String> {
        let zero = [
            (self.connections == Some(0), "--max-connections"),
            (self.connections_per_peer == 0, "--max-connections-per-peer"),
            (self.streams_per_connection == 0, "streams per connection"),
            (self.watches == 0, "--max-watches"),
        ];
        match zero.iter().find(|(z, _)| *z) {
            Some((_, what)) => Err(format!("{what} must be at least 1")),
            None => Ok(()),
        }
    }
}

impl Options {
    /// Everything defaulted except the issuer and the source.
    pub fn new(issuer_dir: PathBuf, source: Source) -> Self {
        Options {
            addr: ([127, 0, 0, 1], 8086).into(),
            admin_addr: ([127, 0, 0, 1], 9996).into(),
            issuer_dir,
            trust_domain: "cluster.local".into(),
            identity: None,
            source,
            bootstrap_tokens: None,
            token_review: None,
            token_audiences: Vec::new(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
            webhook: None,
        }
    }
}

pub(crate) async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

fn server_config(creds: &Credentials) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(remora_certs::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            creds.certified.clone(),
        )));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Counts open connections, in total and per client IP.
struct ConnLimiter {
    max_total: usize,
    max_per_peer: usize,
    open: Mutex<OpenConns>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct OpenConns {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Total = 0,
    PerPeer = 1,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerPeer => "per_peer",
        }
    }
}

/// One connection's place in the counts, given back when the connection's task ends.
struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    fn try_acquire(self: &Arc<Self>, peer: SocketAddr) -> Result<ConnPermit, Refusal> {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; count them as the IPv4
        // address they are. IPv6 addresses count one by one, not per prefix: pods on one node
        // can share a /64, and the total limit bounds a client cycling through addresses.
        let ip = peer.ip().to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = open.per_peer.entry(ip).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(Refusal::PerPeer);
        }
        *n += 1;
        open.total += 1;
        self.metrics.connections.inc();
        Ok(ConnPermit {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.ip);
            }
        }
        self.limiter.metrics.connections.dec();
    }
}

/// Logs refused connections at most once a second, with the count since the last line, so
/// a flood of connects cannot become a flood of log lines; the first refusal after a quiet
/// second is logged at once.
struct RefusalLog {
    last: Option<Instant>,
    /// Refused since the last line: total limit, per-peer limit.
    pending: [u64; 2],
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

impl RefusalLog {
    fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY)
    }

    fn refused(&mut self, why: Refusal, peer: SocketAddr, limiter: &ConnLimiter) {
        self.pending[why as usize] += 1;
        let now = Instant::now();
        if !self.due(now) {
            return;
        }
        let [total, per_peer] = std::mem::take(&mut self.pending);
        self.last = Some(now);
        match why {
            Refusal::Total => tracing::warn!(
                %peer,
                refused_total_limit = total,
                refused_per_peer_limit = per_peer,
                "control plane: {} connections are open (its limit); new ones are closed before TLS until some end. Raise --max-connections (and the descriptor limit) or add replicas",
                limiter.max_total
            ),
            Refusal::PerPeer => tracing::warn!(
                %peer,
                refused_total_limit = total,
                refused_per_peer_limit = per_peer,
                "control plane: {} already has {} connections open (the per-client limit); new ones from it are closed before TLS. Raise --max-connections-per-peer if many proxies share this address",
                peer.ip().to_canonical(),
                limiter.max_per_peer
            ),
        }
    }

    /// After refusals, the first connection accepted once a second has passed says so (with
    /// the refusals not yet logged): the state changed back.
    fn accepted(&mut self) {
        if self.pending == [0, 0] || !self.due(Instant::now()) {
            return;
        }
        let [total, per_peer] = std::mem::take(&mut self.pending);
        self.last = Some(Instant::now());
        tracing::info!(
            refused_total_limit = total,
            refused_per_peer_limit = per_peer,
            "control plane accepting connections again"
        );
    }
}

pub struct ControlPlane {
    listener: TcpListener,
    admin: TcpListener,
    addrs: [SocketAddr; 2],
    registry: Arc<Registry>,
    by_addr: Arc<Registry>,
    metrics: Arc<Metrics>,
    issuer: Arc<Issuer>,
    auth: Arc<Authenticator>,
    tokens: Option<Arc<BootstrapTokens>>,
    source: Option<Source>,
    file: Option<FileSource>,
    cert_lifetime: Duration,
    limits: Limits,
    max_connections: usize,
    webhook: Option<crate::webhook::Webhook>,
}

impl ControlPlane {
    /// Checks every input (issuer, endpoints file, tokens, Kubernetes configuration) and binds;
    /// errors name the file or flag at fault.
    pub async fn bind(opts: Options) -> Result<ControlPlane, String> {
        opts.limits.check()?;
        let (max_connections, fds) = opts.limits.connections();
        if let Some(fds) = fds.filter(|&f| max_connections as u64 > f / 4 * 3) {
            tracing::warn!(
                "--max-connections {max_connections} is more than the descriptor limit ({fds}) leaves room for; accepting may fail with \"too many open files\" before the limit is reached (raise `ulimit -n`)"
            );
        }
        let metrics = Arc::new(Metrics::new());
        let identity = match opts.identity {
            Some(id) => id,
            None => remora_certs::identity::default_control_identity(&opts.trust_domain)?,
        };
        if identity.trust_domain() != opts.trust_domain {
            return Err(format!(
                "--identity {identity} is outside --trust-domain {}",
                opts.trust_domain
            ));
        }
        let issuer = Issuer::load(
            &opts.issuer_dir,
            &opts.trust_domain,
            identity,
            metrics.clone(),
        )?;
        let registry = Registry::new();
        let by_addr = Registry::new();
        let file = match &opts.source {
            Source::File(path) => {
                let mut f = FileSource::new(path.clone());
                let table = f.load()?;
                by_addr.replace_all(crate::source::file::addresses(&table));
                registry.replace_all(table);
                // The parser's temporaries for a large file stay resident otherwise (measured:
                // 176 → 111 MiB for 10,000 services, benches/results/kube-scale.md).
                crate::release_memory();
                Some(f)
            }
            Source::Kubernetes { .. } => None,
        };
        let tokens = match &opts.bootstrap_tokens {
            Some(p) => Some(Arc::new(BootstrapTokens::load(p)?)),
            None => None,
        };
        let token_review = match &opts.token_review {
            Some(kc) => Some(crate::tokenreview::Reviewer::new(
                kube_client(kc.as_ref()).await?,
                opts.token_audiences.clone(),
            )),
            None => None,
        };
        let auth = Arc::new(Authenticator {
            bootstrap: tokens.clone(),
            token_review,
            trust_domain: opts.trust_domain.clone(),
        });
        let bind = |what: &'static str, addr: SocketAddr| async move {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("{what} {addr}: cannot listen: {e}"))?;
            let local = l.local_addr().map_err(|e| format!("{what} {addr}: {e}"))?;
            Ok::<_, String>((l, local))
        };
        let (listener, a) = bind("--addr", opts.addr).await?;
        let (admin, b) = bind("--admin-addr", opts.admin_addr).await?;
        let webhook = match opts.webhook {
            Some(w) => {
                let (listener, _) = bind("--webhook-addr", w.addr).await?;
                let domain = match &opts.source {
                    Source::Kubernetes { cluster_domain, .. } => cluster_domain.clone(),
                    Source::File(_) => {
                        crate::source::kubernetes::DEFAULT_CLUSTER_DOMAIN.to_string()
                    }
                };
                let webhook = crate::webhook::Webhook {
                    listener,
                    issuer: issuer.clone(),
                    names: crate::webhook::server_names(&domain, &w.extra_names),
                    settings: crate::inject::Settings {
                        trust_bundle: issuer.current().issuer.bundle_pem.clone(),
                        trust_domain: opts.trust_domain.clone(),
                        control_addr: format!("remora-control.remora.svc.{domain}:8086"),
                        proxy_image: w.proxy_image,
                        classic: w.classic,
                    },
                };
                webhook.check()?;
                Some(webhook)
            }
            None => None,
        };
        Ok(ControlPlane {
            listener,
            admin,
            addrs: [a, b],
            registry,
            by_addr,
            metrics,
            issuer,
            auth,
            tokens,
            source: Some(opts.source),
            file,
            cert_lifetime: opts.cert_lifetime,
            limits: opts.limits,
            max_connections,
            webhook,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs[1]
    }

    /// Where the injection webhook listens, when it is on.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook
            .as_ref()
            .and_then(|w| w.listener.local_addr().ok())
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// ClusterIP:port and endpoint ip:port → endpoints (interception's `WatchAddr`).
    pub fn addresses(&self) -> Arc<Registry> {
        self.by_addr.clone()
    }

    pub fn identity(&self) -> SpiffeId {
        self.issuer.identity.clone()
    }

    /// Serves until `signal` resolves, then closes every connection at once (watches are
    /// endless, so there is nothing to drain): proxies keep their last endpoints and
    /// re-subscribe to another replica, or to this one when it is back.
    pub async fn run(mut self, signal: impl Future<Output = ()>) {
        let stop = tokio_util::sync::CancellationToken::new();
        let (synced_tx, synced) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let mut domain = crate::source::kubernetes::DEFAULT_CLUSTER_DOMAIN.to_string();
        match (self.file.take(), self.source.take()) {
            (Some(f), _) => {
                let _ = synced_tx.send(true);
                tasks.spawn(f.run(
                    self.registry.clone(),
                    self.by_addr.clone(),
                    self.metrics.clone(),
                ));
            }
            (
                None,
                Some(Source::Kubernetes {
                    kubeconfig,
                    cluster_domain,
                }),
            ) => match kube_client(kubeconfig.as_ref()).await {
                Ok(client) => {
                    domain.clone_from(&cluster_domain);
                    let src = KubeSource {
                        client,
                        cluster_domain,
                        trust_domain: self.issuer.trust_domain.clone(),
                    };
                    tasks.spawn(src.run(self.registry.clone(), self.by_addr.clone(), synced_tx));
                }
                Err(e) => {
                    tracing::error!("{e}; no endpoints will be served");
                }
            },
            _ => {}
        }
        if let Some(t) = self.tokens.clone() {
            tasks.spawn(t.watch());
        }
        let tls = Arc::new(ArcSwap::new(
            match server_config(&self.issuer.current().serving) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("control plane TLS configuration: {e}");
                    return;
                }
            },
        ));
        {
            let tls = tls.clone();
            tasks.spawn(
                self.issuer
                    .clone()
                    .watch(move |creds| match server_config(creds) {
                        Ok(c) => tls.store(c),
                        Err(e) => tracing::warn!(
                            "control plane TLS configuration: {e}; keeping the previous one"
                        ),
                    }),
            );
        }
        let discovery = remora_api::discovery_server::DiscoveryServer::new(
            DiscoveryService::new(
                self.registry.clone(),
                self.metrics.clone(),
                synced.clone(),
                self.limits.watches,
            )
            .with_addresses(self.by_addr.clone())
            .with_cluster_domain(&domain),
        );
        let identity = remora_api::identity_server::IdentityServer::new(IdentityService {
            issuer: self.issuer.clone(),
            auth: self.auth.clone(),
            lifetime: self.cert_lifetime,
            metrics: self.metrics.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                crate::issuer::MAX_CERTIFY_IN_FLIGHT,
            )),
        });
        let limiter = Arc::new(ConnLimiter {
            max_total: self.max_connections,
            max_per_peer: self.limits.connections_per_peer,
            open: Default::default(),
            metrics: self.metrics.clone(),
        });
        tasks.spawn(serve_grpc(
            self.listener,
            tls,
            discovery,
            identity,
            limiter,
            self.limits.streams_per_connection,
            stop.clone(),
        ));
        // Bursts (reconnecting fleets, large files) leave freed memory resident; hand it back.
        tasks.spawn(async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                crate::release_memory();
            }
        });
        if let Some(w) = self.webhook.take() {
            tasks.spawn(w.serve(stop.clone()));
        }
        tasks.spawn(serve_admin(
            self.admin,
            self.metrics.clone(),
            self.registry.clone(),
            synced,
            stop.clone(),
        ));
        tracing::info!(
            addr = %self.addrs[0],
            admin = %self.addrs[1],
            identity = %self.issuer.identity,
            services = self.registry.services(),
            max_connections = self.max_connections,
            max_connections_per_peer = self.limits.connections_per_peer,
            max_watches = self.limits.watches,
            "remora control plane ready"
        );
        signal.await;
        stop.cancel();
        tasks.abort_all();
    }
}

type Discovery = remora_api::discovery_server::DiscoveryServer<DiscoveryService>;
type IdentitySvc = remora_api::identity_server::IdentityServer<IdentityService>;

async fn serve_grpc(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    discovery: Discovery,
    identity: IdentitySvc,
    limiter: Arc<ConnLimiter>,
    max_streams: u32,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut refusals = RefusalLog {
        last: None,
        pending: [0, 0],
    };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "control plane accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Checked before TLS: a refused connection costs an accept and a close, nothing more.
        let permit = match limiter.try_acquire(peer) {
            Ok(p) => p,
            Err(why) => {
                drop(tcp);
                limiter
                    .metrics
                    .connections_refused
                    .get_or_create(&ReasonLabels {
                        reason: why.label(),
                    })
                    .inc();
                refusals.refused(why, peer, &limiter);
                continue;
            }
        };
        refusals.accepted();
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let (discovery, identity) = (discovery.clone(), identity.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            // Held for the connection's life, handshake included.
            let _permit = permit;
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "control plane TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "control plane TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                let (mut discovery, mut identity) = (discovery.clone(), identity.clone());
                async move {
                    let path = req.uri().path();
                    let rsp = if path.starts_with("/remora.v1.Discovery/") {
                        discovery.call(req).await
                    } else if path.starts_with("/remora.v1.Identity/") {
                        identity.call(req).await
                    } else {
                        Ok(
                            tonic::Status::unimplemented(format!("no service at {path}"))
                                .into_http(),
                        )
                    };
                    Ok::<_, Infallible>(rsp.unwrap_or_else(|never| match never {}))
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                // Finds proxies that vanished without closing, so their watches end.
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                // Each stream is a watch or a Certify call; see `Limits`. Beyond it the
                // client's HTTP/2 stack queues (or is refused with REFUSED_STREAM).
                .max_concurrent_streams(max_streams);
            let builder = builder.http2_only();
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "control plane connection ended");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    synced: watch::Receiver<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, registry, synced) = (metrics.clone(), registry.clone(), synced.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (metrics, registry, synced) =
                    (metrics.clone(), registry.clone(), synced.clone());
                async move {
                    let (status, body) = match req.uri().path() {
                        "/live" => (StatusCode::OK, "live\n".to_string()),
                        "/ready" if *synced.borrow() => (StatusCode::OK, "ready\n".to_string()),
                        "/ready" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the endpoint source has not synced yet\n".to_string(),
                        ),
                        "/metrics" => {
                            metrics.services.set(registry.services() as i64);
                            (StatusCode::OK, metrics.encode())
                        }
                        p => (
                            StatusCode::NOT_FOUND,
                            format!("no {p}; try /live, /ready, /metrics\n"),
                        ),
                    };
                    let mut rsp = Response::new(Full::new(Bytes::from(body)).boxed());
                    *rsp.status_mut() = status;
                    Ok::<_, Infallible>(rsp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_the_descriptor_limit() {
        let (n, fds) = Limits::default().connections();
        assert!((1..=DEFAULT_MAX_CONNECTIONS).contains(&n), "{n}");
        if let Some(fds) = fds {
            assert!(
                n as u64 <= fds / 4 * 3,
                "{n} connections with {fds} descriptors"
            );
        }
        let explicit = Limits {
            connections: Some(7),
            ..Limits::default()
        };
        assert_eq!(explicit.connections().0, 7);
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        let zero = Limits {
            watches: 0,
            ..Limits::default()
        };
        assert_eq!(zero.check(), Err("--max-watches must be at least 1".into()));
        assert!(Limits::default().check().is_ok());
    }

    #[test]
    fn per_peer_counts_are_given_back() {
        let limiter = Arc::new(ConnLimiter {
            max_total: 3,
            max_per_peer: 2,
            open: Default::default(),
            metrics: Arc::new(Metrics::new()),
        });
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        // The same client through a dual-stack listener.
        let a6: SocketAddr = "[::ffff:10.0.0.1]:1001".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let p1 = limiter.try_acquire(a).unwrap();
        let _p2 = limiter.try_acquire(a6).unwrap();
        assert_eq!(limiter.try_acquire(a).err(), Some(Refusal::PerPeer));
        let _p3 = limiter.try_acquire(b).unwrap();
        assert_eq!(limiter.try_acquire(b).err(), Some(Refusal::Total));
        drop(p1);
        let _p4 = limiter.try_acquire(a).unwrap();
        assert_eq!(limiter.metrics.connections.get(), 3);
    }
}

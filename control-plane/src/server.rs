//! `remora control` as a library: bind, then run the source, the issuer and both APIs.
//!
//! The gRPC APIs are served over TLS 1.3 (HTTP/2, ALPN h2) with a certificate from the issuer;
//! proxies verify it against their trust bundle and the control plane's SPIFFE ID. Clients need
//! no certificate: discovery data is not secret, and Certify is authorised by its token. A
//! plaintext admin listener serves `/live`, `/ready` (the source has synced) and `/metrics`.
//!
//! The control plane keeps no state of its own: a restarted or second replica rebuilds
//! everything from the source and the issuer directory, and proxies re-subscribe.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
use crate::metrics::Metrics;
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
        }
    }
}

/// The default identity of the control plane in `trust_domain`.
pub fn default_identity(trust_domain: &str) -> Result<SpiffeId, String> {
    format!("spiffe://{trust_domain}/ns/remora/sa/control")
        .parse()
        .map_err(|e| format!("trust domain {trust_domain:?}: {e}"))
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, String> {
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(remora_proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            creds.certified.clone(),
        )));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

pub struct ControlPlane {
    listener: TcpListener,
    admin: TcpListener,
    addrs: [SocketAddr; 2],
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    issuer: Arc<Issuer>,
    auth: Arc<Authenticator>,
    tokens: Option<Arc<BootstrapTokens>>,
    source: Option<Source>,
    file: Option<FileSource>,
    cert_lifetime: Duration,
}

impl ControlPlane {
    /// Checks every input (issuer, endpoints file, tokens, Kubernetes configuration) and binds;
    /// errors name the file or flag at fault.
    pub async fn bind(opts: Options) -> Result<ControlPlane, String> {
        let metrics = Arc::new(Metrics::new());
        let identity = match opts.identity {
            Some(id) => id,
            None => default_identity(&opts.trust_domain)?,
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
        let file = match &opts.source {
            Source::File(path) => {
                let mut f = FileSource::new(path.clone());
                registry.replace_all(f.load()?);
                Some(f)
            }
            Source::Kubernetes { .. } => None,
        };
        let tokens = match &opts.bootstrap_tokens {
            Some(p) => Some(Arc::new(BootstrapTokens::load(p)?)),
            None => None,
        };
        let token_review = match &opts.token_review {
            Some(kc) => Some((
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
        Ok(ControlPlane {
            listener,
            admin,
            addrs: [a, b],
            registry,
            metrics,
            issuer,
            auth,
            tokens,
            source: Some(opts.source),
            file,
            cert_lifetime: opts.cert_lifetime,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs[1]
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
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
        match (self.file.take(), self.source.take()) {
            (Some(f), _) => {
                let _ = synced_tx.send(true);
                tasks.spawn(f.run(self.registry.clone(), self.metrics.clone()));
            }
            (
                None,
                Some(Source::Kubernetes {
                    kubeconfig,
                    cluster_domain,
                }),
            ) => match kube_client(kubeconfig.as_ref()).await {
                Ok(client) => {
                    let src = KubeSource {
                        client,
                        cluster_domain,
                        trust_domain: self.issuer.trust_domain.clone(),
                    };
                    tasks.spawn(src.run(self.registry.clone(), synced_tx));
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
        let discovery = remora_api::discovery_server::DiscoveryServer::new(DiscoveryService {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            synced: synced.clone(),
        });
        let identity = remora_api::identity_server::IdentityServer::new(IdentityService {
            issuer: self.issuer.clone(),
            auth: self.auth.clone(),
            lifetime: self.cert_lifetime,
            metrics: self.metrics.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                crate::issuer::MAX_CERTIFY_IN_FLIGHT,
            )),
        });
        tasks.spawn(serve_grpc(
            self.listener,
            tls,
            discovery,
            identity,
            stop.clone(),
        ));
        // Bursts (reconnecting fleets, large files) leave freed memory resident; hand it back.
        tasks.spawn(async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                crate::release_memory();
            }
        });
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
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "control plane accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let (discovery, identity) = (discovery.clone(), identity.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
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
                .max_concurrent_streams(10_000);
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

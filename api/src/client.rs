//! A client's connection to the control plane: one lazily connected gRPC channel over TLS,
//! shared by the Discovery and Identity clients. Proxies use it (`REMORA_CONTROL_ADDR`), and
//! so do the benches and tests that stand in for proxies, so the control plane sees exactly
//! what real proxies send.
//!
//! The channel verifies the control plane against a trust bundle (`ca.crt`, re-read at every
//! connect so a rotated bundle applies) and requires its SPIFFE ID: by default
//! `spiffe://<trust-domain>/ns/remora/sa/control`. It sends no client certificate: a proxy may
//! not have one yet, and Certify is authorised by its token instead. tonic's channel reconnects
//! on its own after a failure; callers add their own backoff.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remora_certs::SpiffeId;
use rustls::pki_types::TrustAnchor;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::discovery_client::DiscoveryClient;
use crate::identity_client::IdentityClient;

/// How long one replica gets to accept a connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Gives the trust domain the default control-plane identity is in. It is asked for at
/// connect time, since a proxy with file credentials learns it only once they load; `None`
/// fails that connect.
pub type TrustDomain = Arc<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct ControlClient {
    pub channel: Channel,
    /// The replicas' addresses, comma-separated, for logs.
    pub addr: String,
}

impl ControlClient {
    /// Builds the channel; nothing connects until the first call. `addrs` are the replicas
    /// (`host:port`): the channel uses one at a time, starting with the one that worked last,
    /// and moves to the next when it cannot connect. `identity` is the control plane's SPIFFE
    /// ID; `None` expects the default one in the domain `trust_domain` gives. `ca` is the trust
    /// bundle's file.
    pub fn new(
        addrs: Vec<String>,
        identity: Option<SpiffeId>,
        ca: PathBuf,
        trust_domain: TrustDomain,
    ) -> Result<Self, String> {
        let first = addrs.first().ok_or("no control-plane address given")?;
        let endpoint = Endpoint::from_shared(format!("http://{first}"))
            .map_err(|e| format!("{first}: {e}"))?
            // Each replica gets CONNECT_TIMEOUT (below); this bounds the whole attempt.
            .connect_timeout(CONNECT_TIMEOUT * addrs.len() as u32 + Duration::from_secs(1))
            // Notices a control plane that vanished without closing, so watches reconnect.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let addr = addrs.join(",");
        let addrs = Arc::new(addrs);
        // The replica that worked last; a failed connect moves on to the next one.
        let preferred = Arc::new(AtomicUsize::new(0));
        // The last bundle that parsed, used when the file is briefly unreadable (mid-write).
        let last_good: Arc<Mutex<Option<Arc<Vec<TrustAnchor<'static>>>>>> = Default::default();
        let connector = tower::service_fn(move |_: Uri| {
            let (addrs, preferred, ca, identity, trust_domain, last_good) = (
                addrs.clone(),
                preferred.clone(),
                ca.clone(),
                identity.clone(),
                trust_domain.clone(),
                last_good.clone(),
            );
            async move {
                let err = |e: String| std::io::Error::other(format!("control plane: {e}"));
                let expected = match identity {
                    Some(id) => id,
                    None => {
                        let td = trust_domain().ok_or_else(|| {
                            err("no trust domain yet to name the control plane's identity; add #spiffe://… to REMORA_CONTROL_ADDR".into())
                        })?;
                        remora_certs::identity::default_control_identity(&td).map_err(err)?
                    }
                };
                let anchors = match remora_certs::tls::read_anchors(&ca) {
                    Ok(a) => {
                        *last_good.lock().unwrap_or_else(|p| p.into_inner()) = Some(a.clone());
                        a
                    }
                    Err(e) => match last_good.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        Some(a) => {
                            tracing::warn!("{e}; using the last trust bundle that was valid");
                            a
                        }
                        None => return Err(err(e)),
                    },
                };
                let cfg = remora_certs::tls::control_client_config(anchors, expected.clone())
                    .map_err(|e| err(e.to_string()))?;
                let name = remora_certs::tls::server_name(&expected).map_err(err)?;
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let start = preferred.load(Ordering::Relaxed);
                let mut failures = Vec::new();
                for i in 0..addrs.len() {
                    let idx = (start + i) % addrs.len();
                    let addr = &addrs[idx];
                    let attempt = async {
                        let tcp = tokio::net::TcpStream::connect(addr.as_str())
                            .await
                            .map_err(|e| e.to_string())?;
                        let _ = tcp.set_nodelay(true);
                        connector
                            .connect(name.clone(), tcp)
                            .await
                            .map_err(|e| format!("TLS: {e}"))
                    };
                    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                        Ok(Ok(tls)) => {
                            preferred.store(idx, Ordering::Relaxed);
                            return Ok(hyper_util::rt::TokioIo::new(tls));
                        }
                        Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                        Err(_) => failures
                            .push(format!("{addr}: no connection within {CONNECT_TIMEOUT:?}")),
                    }
                }
                Err(err(failures.join("; ")))
            }
        });
        Ok(ControlClient {
            channel: endpoint.connect_with_connector_lazy(connector),
            addr,
        })
    }

    pub fn discovery(&self) -> DiscoveryClient<Channel> {
        DiscoveryClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }
}

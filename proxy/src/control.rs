//! The proxy's connection to the control plane (`REMORA_CONTROL_ADDR`): one lazily connected
//! gRPC channel over TLS, shared by discovery ([`crate::discover`]) and certificate requests
//! ([`crate::identity`]).
//!
//! The channel verifies the control plane against the trust bundle in `REMORA_IDENTITY_DIR`
//! (`ca.crt`, re-read at every connect so a rotated bundle applies) and requires its SPIFFE
//! ID: by default `spiffe://<trust-domain>/ns/remora/sa/control`. The proxy sends no client
//! certificate: it may not have one yet, and Certify is authorised by its token instead.
//! tonic's channel reconnects on its own after a failure; callers add their own backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use remora_certs::SpiffeId;
use rustls::pki_types::TrustAnchor;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::ControlTarget;

/// Backoff lives in [`crate::backoff`] now; the old path stays for the watch in
/// [`crate::discover`].
pub(crate) use crate::backoff::Backoff;

/// How long one replica gets to accept a connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct ControlClient {
    pub channel: Channel,
    pub addr: String,
}

/// Reads and parses the trust bundle.
pub fn read_anchors(ca: &std::path::Path) -> Result<Arc<Vec<TrustAnchor<'static>>>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: cannot read: {e}", ca.display()))?;
    let roots = remora_certs::validate::parse_certs(ca, &pem).map_err(|e| e.to_string())?;
    let anchors =
        remora_certs::validate::anchors(&roots).map_err(|e| format!("{}: {e}", ca.display()))?;
    Ok(Arc::new(anchors))
}

/// The control plane's identity when REMORA_CONTROL_ADDR does not name one.
pub fn default_identity(trust_domain: &str) -> Result<SpiffeId, String> {
    format!("spiffe://{trust_domain}/ns/remora/sa/control")
        .parse()
        .map_err(|e| format!("trust domain {trust_domain:?}: {e}"))
}

impl ControlClient {
    /// Builds the channel; nothing connects until the first call. `trust_domain` gives the
    /// default control-plane identity; it is asked for at connect time, since a proxy with
    /// file credentials learns it only once they load.
    pub fn new(
        target: &ControlTarget,
        ca: PathBuf,
        trust_domain: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    ) -> Result<Self, String> {
        let addrs = target.addrs();
        let first = addrs
            .first()
            .ok_or("REMORA_CONTROL_ADDR names no address")?;
        let endpoint = Endpoint::from_shared(format!("http://{first}"))
            .map_err(|e| format!("REMORA_CONTROL_ADDR {first}: {e}"))?
            // Each replica gets CONNECT_TIMEOUT (below); this bounds the whole attempt.
            .connect_timeout(CONNECT_TIMEOUT * addrs.len().max(1) as u32 + Duration::from_secs(1))
            // Notices a control plane that vanished without closing, so watches reconnect.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let addrs = Arc::new(addrs);
        // The replica that worked last; a failed connect moves on to the next one.
        let preferred = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let expected = target.identity.clone();
        // The last bundle that parsed, used when the file is briefly unreadable (mid-write).
        let last_good: Arc<std::sync::Mutex<Option<Arc<Vec<TrustAnchor<'static>>>>>> =
            Default::default();
        let connector = tower::service_fn(move |_: Uri| {
            let (addrs, preferred, ca, expected, trust_domain, last_good) = (
                addrs.clone(),
                preferred.clone(),
                ca.clone(),
                expected.clone(),
                trust_domain.clone(),
                last_good.clone(),
            );
            async move {
                let err = |e: String| std::io::Error::other(format!("control plane: {e}"));
                let expected = match expected {
                    Some(id) => id,
                    None => {
                        let td = trust_domain().ok_or_else(|| {
                            err("no trust domain yet to name the control plane's identity; add #spiffe://… to REMORA_CONTROL_ADDR".into())
                        })?;
                        default_identity(&td).map_err(err)?
                    }
                };
                let anchors = match read_anchors(&ca) {
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
                let cfg = crate::tls::control_client_config(anchors, expected.clone())
                    .map_err(|e| err(e.to_string()))?;
                let name = crate::tls::server_name(&expected).map_err(err)?;
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let start = preferred.load(std::sync::atomic::Ordering::Relaxed);
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
                            preferred.store(idx, std::sync::atomic::Ordering::Relaxed);
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
            addr: target.addr.clone(),
        })
    }

    pub fn discovery(&self) -> remora_api::discovery_client::DiscoveryClient<Channel> {
        remora_api::discovery_client::DiscoveryClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> remora_api::identity_client::IdentityClient<Channel> {
        remora_api::identity_client::IdentityClient::new(self.channel.clone())
    }
}

//! The proxy's identity: the current validated credentials, hot-reloaded from a directory.
//!
//! The directory has the cert-manager / Kubernetes TLS Secret layout (contract): `tls.crt`
//! (leaf first, then chain), `tls.key`, `ca.crt` (the trust bundle, possibly several roots). It is
//! polled: the three files are read every [`POLL`] and, when their bytes change, validated in
//! full ([`remora_certs::validate`]) before the new set replaces the current one. Reading
//! contents (not watching inodes) survives everything that replaces files: Kubernetes' atomic
//! `..data` symlink swap, `mv` over the file, and editors that write in place. A set that fails
//! validation is logged once, counted, and ignored; the last good set keeps serving. New
//! handshakes use a new set at once; established connections keep the one they started with.
//!
//! In `REMORA_IDENTITY_MODE=control` ([`Certifier`]) only `ca.crt` comes from the directory:
//! the proxy makes a key in memory (it never leaves the process), sends a CSR with its token to
//! the control plane, validates what comes back exactly as it would validate files, and renews
//! at 70 % of the remaining lifetime, with backoff on failure. A failed renewal keeps the
//! current certificate while it is valid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use remora_certs::{Credentials, SpiffeId};
use rustls::pki_types::TrustAnchor;

use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// How often the identity directory is read for changes.
pub const POLL: Duration = Duration::from_millis(500);

/// The three files of a credential set: `tls.crt`, `tls.key`, `ca.crt`.
const FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// Client configurations kept per credential set before the cache starts over: far more
/// peer identities × ALPNs than one proxy talks to, yet a bound on what discovery can grow.
const MAX_CLIENT_CONFIGS: usize = 4096;

/// Client configurations by the peer identity they expect and the ALPN they offer.
type ClientConfigs = HashMap<(SpiffeId, Vec<u8>), Arc<rustls::ClientConfig>>;

/// One validated credential set, with the TLS configurations built from it.
pub struct Loaded {
    pub creds: Credentials,
    pub server: Arc<rustls::ServerConfig>,
    pub anchors: Arc<Vec<TrustAnchor<'static>>>,
    /// The TLS server name peers use to reach this proxy (and its DNS SAN).
    pub sni: String,
    /// Outbound client configurations built from this set, by peer identity and ALPN. Each
    /// keeps rustls's in-memory session cache, so reusing it is what lets the next connection
    /// to a peer resume. It lives here, in the set, so a new set (rotation, a new bundle)
    /// starts with none: rotated credentials apply at the next connection, and no session
    /// made under the old ones is offered again.
    clients: Mutex<ClientConfigs>,
    /// The inbound QUIC server configuration built from this set, once.
    quic_server: std::sync::OnceLock<Result<Arc<quinn::ServerConfig>, String>>,
}

impl Loaded {
    pub fn id(&self) -> &SpiffeId {
        &self.creds.id
    }

    /// The mTLS client configuration for a peer that must prove `peer`, offering `alpn`
    /// (empty: none), built on first use and then shared.
    pub(crate) fn client_config(
        &self,
        peer: &SpiffeId,
        alpn: &[u8],
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let key = (peer.clone(), alpn.to_vec());
        if let Some(cfg) = self.lock_clients().get(&key) {
            return Ok(cfg.clone());
        }
        // Built outside the lock (it is the slow part); when two connects to a new peer race,
        // both use the one stored first, so they share its session cache.
        let cfg = crate::tls::client_config(&self.creds, self.anchors.clone(), peer.clone(), alpn)?;
        let mut clients = self.lock_clients();
        if clients.len() >= MAX_CLIENT_CONFIGS && !clients.contains_key(&key) {
            clients.clear();
        }
        Ok(clients.entry(key).or_insert(cfg).clone())
    }

    /// The inbound QUIC configuration of this set, built by `make` on first use and then
    /// shared (it carries the session ticket keys resumption needs).
    pub(crate) fn quic_server(
        &self,
        make: impl FnOnce(&Loaded) -> Result<Arc<quinn::ServerConfig>, String>,
    ) -> Result<Arc<quinn::ServerConfig>, String> {
        self.quic_server.get_or_init(|| make(self)).clone()
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, ClientConfigs> {
        // A panic while holding it leaves a map that is still whole: keep using it.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct IdentityStore {
    dir: PathBuf,
    current: ArcSwapOption<Loaded>,
    metrics: Arc<Metrics>,
    certifier: Option<Certifier>,
    /// The embedding application's source, instead of the directory or the control plane.
    source: Option<Arc<dyn IdentitySource>>,
}

/// One credential set as PEM, whole: it is validated (chain to the bundle, key matches, one
/// SPIFFE ID, in its validity period) before it replaces the current set.
#[derive(Clone)]
#[non_exhaustive]
pub struct CredentialSet {
    /// The leaf first, then intermediates (`tls.crt`).
    pub chain: Vec<u8>,
    /// The leaf's private key (`tls.key`).
    pub key: Vec<u8>,
    /// The trust bundle: one or more roots (`ca.crt`).
    pub bundle: Vec<u8>,
}

impl CredentialSet {
    /// A set from the three PEM documents.
    pub fn new(chain: Vec<u8>, key: Vec<u8>, bundle: Vec<u8>) -> Self {
        CredentialSet { chain, key, bundle }
    }
}

/// Where the proxy's workload credentials come from, when neither the identity directory nor
/// the control plane fits: a secret store, an in-process CA, a test.
///
/// The proxy follows the stream for its whole run. Every set is validated whole; a bad one is
/// logged, counted in `remora_identity_reload_failures_total` and ignored (the previous set
/// keeps serving), exactly as with files.
///
/// ```
/// use remora_proxy::{CredentialSet, IdentitySource};
///
/// /// Sets pushed by the application (e.g. after each rotation of its secret store).
/// struct Pushed(std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<CredentialSet>>>);
///
/// impl IdentitySource for Pushed {
///     fn credentials(&self) -> futures_util::stream::BoxStream<'static, CredentialSet> {
///         let rx = self.0.lock().unwrap().take();
///         Box::pin(futures_util::stream::unfold(rx, |rx| async move {
///             let mut rx = rx?;
///             let set = rx.recv().await?;
///             Some((set, Some(rx)))
///         }))
///     }
/// }
/// ```
pub trait IdentitySource: Send + Sync + 'static {
    /// The credential sets, the first as soon as there is one, then each replacement.
    fn credentials(&self) -> futures_util::stream::BoxStream<'static, CredentialSet>;
}

/// Certificates from the control plane instead of files.
pub struct Certifier {
    pub id: SpiffeId,
    /// The token file, re-read at every request (projected tokens rotate).
    pub token: PathBuf,
    pub client: std::sync::OnceLock<crate::control::ControlClient>,
}

/// When to renew a certificate received at `received`: at 70 % of what was left of its
/// life, and at least a second before it expires.
pub fn renew_at(received: SystemTime, not_after: SystemTime) -> SystemTime {
    let left = not_after.duration_since(received).unwrap_or_default();
    (received + left.mul_f64(0.7)).min(not_after - Duration::from_secs(1).min(left))
}

impl IdentityStore {
    /// Creates an empty store; [`IdentityStore::watch`] loads the directory and keeps it
    /// current. Until a valid set arrives the proxy is not ready and cannot speak mTLS.
    pub fn new(dir: &Path, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(IdentityStore {
            dir: dir.to_path_buf(),
            current: ArcSwapOption::empty(),
            metrics,
            certifier: None,
            source: None,
        })
    }

    /// A store fed by the embedding application's [`IdentitySource`].
    pub(crate) fn with_source(metrics: Arc<Metrics>, source: Arc<dyn IdentitySource>) -> Arc<Self> {
        Arc::new(IdentityStore {
            dir: PathBuf::from("(identity source)"),
            current: ArcSwapOption::empty(),
            metrics,
            certifier: None,
            source: Some(source),
        })
    }

    /// A store fed by the control plane; set `certifier.client` before [`IdentityStore::watch`].
    pub fn with_certifier(dir: &Path, metrics: Arc<Metrics>, certifier: Certifier) -> Arc<Self> {
        Arc::new(IdentityStore {
            dir: dir.to_path_buf(),
            current: ArcSwapOption::empty(),
            metrics,
            certifier: Some(certifier),
            source: None,
        })
    }

    pub fn certifier(&self) -> Option<&Certifier> {
        self.certifier.as_ref()
    }

    /// The trust domain of this proxy's identity, once known.
    pub fn trust_domain(&self) -> Option<String> {
        match &self.certifier {
            Some(c) => Some(c.id.trust_domain().to_string()),
            None => self.current().map(|l| l.id().trust_domain().to_string()),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    /// Reads the set off the runtime's thread (`tokio::fs` runs the reads on the blocking
    /// pool): the proxy runs on one thread, and a slow volume must not stall its traffic.
    /// A missing or unreadable file reads as empty, which validation then explains.
    async fn read(&self) -> [Vec<u8>; 3] {
        let mut files: [Vec<u8>; 3] = Default::default();
        for (f, name) in files.iter_mut().zip(FILES) {
            *f = tokio::fs::read(self.dir.join(name))
                .await
                .unwrap_or_default();
        }
        files
    }

    /// Validates `files` and swaps them in, or explains why not.
    fn consider(&self, files: &[Vec<u8>; 3]) -> Result<Arc<Loaded>, String> {
        self.consider_from(&self.dir, files, None)
    }

    /// `origin` names where the set came from in errors; `expected`, when set, is the identity
    /// the set must carry.
    fn consider_from(
        &self,
        origin: &Path,
        files: &[Vec<u8>; 3],
        expected: Option<&SpiffeId>,
    ) -> Result<Arc<Loaded>, String> {
        let creds = remora_certs::validate::validate(
            origin,
            &files[0],
            &files[1],
            &files[2],
            std::time::SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(want) = expected
            && &creds.id != want
        {
            return Err(format!(
                "{}: the certificate is for {}, not {want}",
                origin.display(),
                creds.id
            ));
        }
        let server = crate::tls::server_config(&creds)
            .map_err(|e| format!("{}: TLS configuration: {e}", self.dir.display()))?;
        let anchors = remora_certs::validate::anchors(&creds.roots)
            .map_err(|e| format!("{}: {e}", self.dir.join("ca.crt").display()))?;
        let loaded = Arc::new(Loaded {
            sni: creds.id.dns_name(),
            creds,
            server,
            anchors: Arc::new(anchors),
            clients: Mutex::default(),
            quic_server: Default::default(),
        });
        self.current.store(Some(loaded.clone()));
        Ok(loaded)
    }

    fn loaded(&self, l: &Loaded, from: &str) {
        let expiry = l
            .creds
            .not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics.identity_expiry.set(expiry.as_secs() as i64);
        self.metrics.identity_reloads.inc();
        tracing::info!(
            identity = %l.id(),
            expires = %remora_certs::validate::human_time(l.creds.not_after),
            roots = l.creds.roots.len(),
            "identity loaded from {from}"
        );
    }

    fn keeping(&self) -> String {
        match self.current.load().as_ref() {
            Some(l) => format!(
                "keeping the previous certificate (expires {})",
                remora_certs::validate::human_time(l.creds.not_after)
            ),
            None => "no identity yet: mTLS is unavailable and the proxy is not ready until a valid set arrives".into(),
        }
    }

    /// One Certify round trip: a new key, a CSR, the token; the answer validated against the
    /// local trust bundle (not the one the control plane sends).
    async fn certify(&self, c: &Certifier) -> Result<Arc<Loaded>, String> {
        let client = c
            .client
            .get()
            .ok_or("no control plane configured (REMORA_CONTROL_ADDR)")?;
        let token = tokio::fs::read_to_string(&c.token).await.map_err(|e| {
            format!(
                "token {}: cannot read: {e}; set REMORA_IDENTITY_TOKEN",
                c.token.display()
            )
        })?;
        let bundle = tokio::fs::read(self.ca_path()).await.unwrap_or_default();
        let (key, csr) = remora_certs::ca::new_key_and_csr(&c.id).map_err(|e| e.to_string())?;
        let request = remora_api::CertifyRequest {
            identity: c.id.to_string(),
            token: token.trim().to_string(),
            csr,
        };
        let rsp = tokio::time::timeout(Duration::from_secs(10), client.identity().certify(request))
            .await
            .map_err(|_| format!("control plane {}: no answer within 10s", client.addr))?
            .map_err(|s| {
                format!(
                    "control plane {}: {}: {}",
                    client.addr,
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        self.consider(&[
            rsp.chain.into_bytes(),
            key.serialize_pem().into_bytes(),
            bundle,
        ])
    }

    /// Keeps a control-plane certificate current: fetch at start, renew at 70 %, retry with
    /// backoff, and fetch again at once when the trust bundle changes.
    async fn certify_loop(&self, c: &Certifier) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        // The retry is timed on tokio's clock; renewal on the wall clock, since it is measured
        // against the certificate's validity, which is wall-clock time.
        let mut next_attempt = tokio::time::Instant::now();
        let mut renew = SystemTime::now();
        let mut bundle = tokio::fs::read(self.ca_path()).await.unwrap_or_default();
        loop {
            let b = tokio::fs::read(self.ca_path()).await.unwrap_or_default();
            let bundle_changed = b != bundle;
            if (SystemTime::now() >= renew || bundle_changed)
                && tokio::time::Instant::now() >= next_attempt
            {
                match self.certify(c).await {
                    Ok(l) => {
                        // Only a success settles a bundle change; a failure retries it.
                        bundle = b;
                        self.loaded(&l, "the control plane");
                        renew = renew_at(SystemTime::now(), l.creds.not_after);
                        backoff.reset();
                    }
                    Err(e) => {
                        self.metrics.identity_reload_failures.inc();
                        let delay = backoff.next_delay();
                        next_attempt = tokio::time::Instant::now() + delay;
                        tracing::warn!(
                            "identity {}: cannot get a certificate: {e}; retrying in {delay:.1?}; {}",
                            c.id,
                            self.keeping()
                        );
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Keeps the identity current: polls the directory, or talks to the control plane.
    pub async fn watch(self: Arc<Self>) {
        if let Some(c) = &self.certifier {
            return self.certify_loop(c).await;
        }
        if let Some(source) = &self.source {
            let mut sets = source.credentials();
            while let Some(set) = futures_util::StreamExt::next(&mut sets).await {
                match self.consider(&[set.chain, set.key, set.bundle]) {
                    Ok(l) => self.loaded(&l, "the identity source"),
                    Err(e) => {
                        self.metrics.identity_reload_failures.inc();
                        tracing::warn!("identity {e}; {}", self.keeping());
                    }
                }
            }
            tracing::info!("the identity source ended; keeping the current identity");
            return;
        }
        let mut last: Option<[Vec<u8>; 3]> = None;
        loop {
            let files = self.read().await;
            if last.as_ref() != Some(&files) {
                match self.consider(&files) {
                    Ok(l) => self.loaded(&l, &self.dir.display().to_string()),
                    Err(e) => {
                        self.metrics.identity_reload_failures.inc();
                        tracing::warn!("identity {e}; {}", self.keeping());
                    }
                }
                last = Some(files);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A throwaway CA issuing identity directories, for tests here and in [`crate::endpoint`].
#[cfg(test)]
impl IdentityStore {
    /// Loads once, synchronously (tests outside the watch loop).
    pub(crate) fn load_now(&self) -> Result<Arc<Loaded>, String> {
        let files = FILES.map(|f| std::fs::read(self.dir.join(f)).unwrap_or_default());
        self.consider(&files)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::time::Duration;

    use remora_certs::SpiffeId;

    pub(crate) const TD: &str = "remora.test";

    /// A CA and the identity directories it issued, under a fresh temporary directory that
    /// is removed on drop.
    pub(crate) struct Pki {
        root: PathBuf,
        issuer: remora_certs::ca::LoadedIssuer,
    }

    impl Pki {
        pub(crate) fn new(name: &str) -> Pki {
            let root = std::env::temp_dir().join(format!(
                "remora-{name}-{}-{}",
                std::process::id(),
                crate::random::u64()
            ));
            let ca = root.join("ca");
            remora_certs::ca::init_dir(&ca, TD).unwrap();
            let issuer = remora_certs::ca::LoadedIssuer::from_dir(&ca).unwrap();
            Pki { root, issuer }
        }

        pub(crate) fn id(sa: &str) -> SpiffeId {
            SpiffeId::workload(TD, "default", sa).unwrap()
        }

        /// Issues a new key and leaf for `sa` into its directory, replacing any before.
        pub(crate) fn issue(&self, sa: &str) -> PathBuf {
            let dir = self.root.join(sa);
            remora_certs::ca::issue_with_new_key(
                &self.issuer,
                &Pki::id(sa),
                Duration::from_secs(3600),
            )
            .unwrap()
            .write(&dir)
            .unwrap();
            dir
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Pki;
    use super::*;

    /// The watch loop (async reads) loads the directory, then a rotated set, whose client
    /// configurations are new while the old set's stay as they were.
    #[tokio::test]
    async fn the_watch_loads_rotations_with_fresh_client_configs() {
        let pki = Pki::new("identity-watch");
        let dir = pki.issue("client");
        let store = IdentityStore::new(&dir, Arc::new(Metrics::new()));
        let watch = tokio::spawn(store.clone().watch());
        let loaded_after = |previous: Option<Arc<Loaded>>| {
            let store = store.clone();
            async move {
                for _ in 0..100 {
                    if let Some(l) = store.current()
                        && previous.as_ref().is_none_or(|p| !Arc::ptr_eq(p, &l))
                    {
                        return l;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("the watch loaded nothing new in 5 s");
            }
        };
        let first = loaded_after(None).await;
        let peer = Pki::id("server");
        let cfg = first.client_config(&peer, b"h2").unwrap();
        assert!(Arc::ptr_eq(
            &cfg,
            &first.client_config(&peer, b"h2").unwrap()
        ));

        pki.issue("client");
        let second = loaded_after(Some(first.clone())).await;
        let rotated = second.client_config(&peer, b"h2").unwrap();
        assert!(!Arc::ptr_eq(&cfg, &rotated));
        // Connections still on the old set keep its configuration.
        assert!(Arc::ptr_eq(
            &cfg,
            &first.client_config(&peer, b"h2").unwrap()
        ));
        watch.abort();
    }
}

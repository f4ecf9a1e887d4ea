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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use remora_certs::{Credentials, SpiffeId};
use rustls::pki_types::TrustAnchor;

use crate::metrics::Metrics;

/// How often the identity directory is read for changes.
pub const POLL: Duration = Duration::from_millis(500);

/// One validated credential set, with the TLS configurations built from it.
pub struct Loaded {
    pub creds: Credentials,
    pub server: Arc<rustls::ServerConfig>,
    pub anchors: Arc<Vec<TrustAnchor<'static>>>,
    /// The TLS server name peers use to reach this proxy (and its DNS SAN).
    pub sni: String,
}

impl Loaded {
    pub fn id(&self) -> &SpiffeId {
        &self.creds.id
    }
}

pub struct IdentityStore {
    dir: PathBuf,
    current: ArcSwapOption<Loaded>,
    metrics: Arc<Metrics>,
}

impl IdentityStore {
    /// Creates an empty store; [`IdentityStore::watch`] loads the directory and keeps it
    /// current. Until a valid set arrives the proxy is not ready and cannot speak mTLS.
    pub fn new(dir: &Path, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(IdentityStore {
            dir: dir.to_path_buf(),
            current: ArcSwapOption::empty(),
            metrics,
        })
    }

    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    fn read(&self) -> [Vec<u8>; 3] {
        ["tls.crt", "tls.key", "ca.crt"]
            .map(|f| std::fs::read(self.dir.join(f)).unwrap_or_default())
    }

    /// Validates `files` and swaps them in, or explains why not.
    fn consider(&self, files: &[Vec<u8>; 3]) -> Result<Arc<Loaded>, String> {
        let creds = remora_certs::validate::validate(
            &self.dir,
            &files[0],
            &files[1],
            &files[2],
            std::time::SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
        let server = crate::tls::server_config(&creds)
            .map_err(|e| format!("{}: TLS configuration: {e}", self.dir.display()))?;
        let anchors = remora_certs::validate::anchors(&creds.roots)
            .map_err(|e| format!("{}: {e}", self.dir.join("ca.crt").display()))?;
        let loaded = Arc::new(Loaded {
            sni: creds.id.dns_name(),
            creds,
            server,
            anchors: Arc::new(anchors),
        });
        self.current.store(Some(loaded.clone()));
        Ok(loaded)
    }

    /// Polls the directory forever.
    pub async fn watch(self: Arc<Self>) {
        let mut last: Option<[Vec<u8>; 3]> = None;
        loop {
            let files = self.read();
            if last.as_ref() != Some(&files) {
                match self.consider(&files) {
                    Ok(l) => {
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
                            "identity loaded from {}",
                            self.dir.display()
                        );
                    }
                    Err(e) => {
                        self.metrics.identity_reload_failures.inc();
                        let keeping = if self.current.load().is_some() {
                            "keeping the previous certificate"
                        } else {
                            "no identity yet: mTLS is unavailable until a valid set arrives"
                        };
                        tracing::warn!("identity {e}; {keeping}");
                    }
                }
                last = Some(files);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Loads once, synchronously (startup, tests).
    pub fn load_now(&self) -> Result<Arc<Loaded>, String> {
        self.consider(&self.read())
    }
}

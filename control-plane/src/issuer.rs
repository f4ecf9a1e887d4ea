//! `Identity.Certify`: a proxy proves who it is with a token and gets its CSR signed.
//!
//! - **Issuer**: the directory `remora ca init` writes (`issuer.crt`, `issuer.key`, `ca.crt`),
//!   polled like every other file here. A new version is used only once it has signed a test
//!   leaf that verifies to the bundle; otherwise the previous issuer keeps signing.
//! - **Proof of identity** ([`Authenticator`]): a bootstrap token from a file (token →
//!   identity; for machines without Kubernetes), or a Kubernetes ServiceAccount token checked
//!   with a TokenReview, whose user `system:serviceaccount:<ns>:<sa>` must be the identity
//!   asked for. The CSR only supplies the public key; the identity is the proven one.
//! - The control plane's own serving certificate comes from the same issuer, renewed at 70 %
//!   of its lifetime and whenever the issuer changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use remora_api::{CertifyRequest, CertifyResponse};
use remora_certs::ca::{self, LoadedIssuer};
use remora_certs::{Credentials, SpiffeId};
use tonic::{Request, Response, Status};

use crate::metrics::{Metrics, ResultLabels};

/// How often the issuer directory and the token file are read for changes.
pub const POLL: Duration = Duration::from_millis(500);
/// Lifetime of the control plane's own serving certificate.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A validated issuer and the control plane's serving credentials made with it.
pub struct Signing {
    pub issuer: LoadedIssuer,
    pub serving: Credentials,
    /// When the issuer certificate itself expires: no leaf may outlive it.
    pub not_after: SystemTime,
}

pub struct Issuer {
    dir: PathBuf,
    pub trust_domain: String,
    pub identity: SpiffeId,
    current: ArcSwap<Signing>,
    metrics: Arc<Metrics>,
    /// The files as they were read for the first load: what `watch` compares with first. Read
    /// again when the watch starts, a change made in between (a key replaced right after
    /// start-up) would look like the starting point and never be noticed.
    loaded: std::sync::Mutex<Option<[Vec<u8>; 3]>>,
}

fn read_dir(dir: &Path) -> [Vec<u8>; 3] {
    ["issuer.crt", "issuer.key", "ca.crt"].map(|f| std::fs::read(dir.join(f)).unwrap_or_default())
}

/// Loads the issuer in `dir` and proves it works: it signs our serving certificate, which must
/// validate against the bundle like any workload's.
fn load(dir: &Path, identity: &SpiffeId) -> Result<Signing, String> {
    let issuer =
        LoadedIssuer::from_dir(dir).map_err(|e| format!("issuer {}: {e}", dir.display()))?;
    let crt = dir.join("issuer.crt");
    let not_after = remora_certs::validate::parse_certs(&crt, issuer.issuer_pem.as_bytes())
        .ok()
        .and_then(|c| c.first().and_then(|c| remora_certs::validate::validity(c)))
        .map(|(_, not_after)| not_after)
        .ok_or_else(|| format!("issuer {}: cannot read its validity", crt.display()))?;
    let left = not_after.duration_since(SystemTime::now()).map_err(|_| {
        format!(
            "issuer {}: expired {}",
            crt.display(),
            remora_certs::validate::human_time(not_after)
        )
    })?;
    let leaf = ca::issue_with_new_key(&issuer, identity, SERVING_LIFETIME.min(left))
        .map_err(|e| format!("issuer {}: cannot sign: {e}", dir.display()))?;
    let serving = remora_certs::validate::validate(
        dir,
        leaf.chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        leaf.bundle_pem.as_bytes(),
        SystemTime::now(),
    )
    .map_err(|e| {
        format!(
            "issuer {}: a certificate it signs does not verify: {e}; is issuer.crt signed by ca.crt?",
            dir.display()
        )
    })?;
    Ok(Signing {
        issuer,
        serving,
        not_after,
    })
}

impl Issuer {
    pub fn load(
        dir: &Path,
        trust_domain: &str,
        identity: SpiffeId,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Issuer>, String> {
        // Read before loading: a change between the two is then seen by the first poll.
        let files = read_dir(dir);
        let signing = load(dir, &identity)?;
        Ok(Arc::new(Issuer {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            identity,
            current: ArcSwap::from_pointee(signing),
            metrics,
            loaded: std::sync::Mutex::new(Some(files)),
        }))
    }

    pub fn current(&self) -> Arc<Signing> {
        self.current.load_full()
    }

    /// Re-reads the directory on change and renews the serving certificate at 70 % of its
    /// life; calls `on_serving` with each new serving credential set.
    pub async fn watch(self: Arc<Self>, on_serving: impl Fn(&Credentials)) {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut last = loaded.unwrap_or_else(|| read_dir(&self.dir));
        let mut retry_at = SystemTime::now();
        loop {
            tokio::time::sleep(POLL).await;
            let files = read_dir(&self.dir);
            let serving = &self.current.load().serving;
            let life = serving
                .not_after
                .duration_since(serving.not_before)
                .unwrap_or_default();
            let renew_at = serving.not_before + life.mul_f64(0.7);
            if files == last && (SystemTime::now() < renew_at || SystemTime::now() < retry_at) {
                continue;
            }
            match load(&self.dir, &self.identity) {
                Ok(signing) => {
                    if files != last {
                        tracing::info!("issuer reloaded from {}", self.dir.display());
                    }
                    on_serving(&signing.serving);
                    self.current.store(Arc::new(signing));
                }
                Err(e) => {
                    self.metrics.issuer_reload_failures.inc();
                    // A renewal that failed is retried every 10 s, not at every poll.
                    retry_at = SystemTime::now() + Duration::from_secs(10);
                    tracing::warn!("{e}; keeping the previous issuer");
                }
            }
            last = files;
        }
    }
}

/// Bootstrap tokens: one `TOKEN SPIFFE-ID` pair per line; `#` starts a comment.
pub fn parse_tokens(path: &Path, text: &str) -> Result<HashMap<String, SpiffeId>, String> {
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}: line {}", path.display(), n + 1);
        let mut parts = line.split_whitespace();
        let (Some(token), Some(id), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{at}: expected `TOKEN spiffe://<trust-domain>/ns/<ns>/sa/<sa>`"
            ));
        };
        let id: SpiffeId = id.parse().map_err(|e| format!("{at}: {e}"))?;
        if token.len() < 16 {
            return Err(format!(
                "{at}: token is {} characters; use at least 16 random ones",
                token.len()
            ));
        }
        if map.insert(token.to_string(), id).is_some() {
            return Err(format!("{at}: this token is listed twice"));
        }
    }
    Ok(map)
}

/// Decides whether a token proves an identity.
pub struct Authenticator {
    pub bootstrap: Option<Arc<BootstrapTokens>>,
    /// TokenReviews, when ServiceAccount tokens are accepted.
    pub token_review: Option<crate::tokenreview::Reviewer>,
    pub trust_domain: String,
}

pub struct BootstrapTokens {
    pub path: PathBuf,
    tokens: ArcSwapOption<HashMap<String, SpiffeId>>,
    /// The bytes the first load parsed: what `watch` compares with first, so that an edit made
    /// before the watch starts (a token revoked right after start-up) is not taken for the
    /// starting point and missed.
    loaded: std::sync::Mutex<Option<Vec<u8>>>,
}

impl BootstrapTokens {
    /// Loads the file now (a bad file is a startup error).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("bootstrap tokens {}: cannot read: {e}", path.display()))?;
        let tokens = parse_tokens(path, &text).map_err(|e| format!("bootstrap tokens {e}"))?;
        Ok(BootstrapTokens {
            path: path.to_path_buf(),
            tokens: ArcSwapOption::from_pointee(tokens),
            loaded: std::sync::Mutex::new(Some(text.into_bytes())),
        })
    }

    /// Follows the file; an invalid version is refused and the previous tokens stay.
    pub async fn watch(self: Arc<Self>) {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut last = loaded.or_else(|| std::fs::read(&self.path).ok());
        loop {
            tokio::time::sleep(POLL).await;
            let bytes = std::fs::read(&self.path);
            if bytes.as_ref().ok() == last.as_ref() {
                continue;
            }
            let parsed = match &bytes {
                Ok(b) => parse_tokens(&self.path, &String::from_utf8_lossy(b)),
                Err(e) => Err(format!("{}: cannot read: {e}", self.path.display())),
            };
            match parsed {
                Ok(t) => {
                    tracing::info!(
                        tokens = t.len(),
                        "bootstrap tokens reloaded from {}",
                        self.path.display()
                    );
                    self.tokens.store(Some(Arc::new(t)));
                }
                Err(e) => tracing::warn!("bootstrap tokens {e}; keeping the previous tokens"),
            }
            last = bytes.ok();
        }
    }

    fn get(&self, token: &str) -> Option<SpiffeId> {
        self.tokens
            .load()
            .as_ref()
            .and_then(|t| t.get(token).cloned())
    }
}

impl Authenticator {
    /// `Ok` when `token` proves `id`; otherwise the reason, fit to show the caller.
    pub async fn check(&self, token: &str, id: &SpiffeId) -> Result<(), String> {
        if token.is_empty() {
            return Err("no token was sent; set REMORA_IDENTITY_TOKEN to a token file".into());
        }
        if let Some(allowed) = self.bootstrap.as_ref().and_then(|b| b.get(token)) {
            return if &allowed == id {
                Ok(())
            } else {
                Err(format!("this bootstrap token is for {allowed}, not {id}"))
            };
        }
        let Some(reviewer) = &self.token_review else {
            return Err(match &self.bootstrap {
                Some(b) => format!(
                    "the token is not in the bootstrap tokens ({})",
                    b.path.display()
                ),
                None => "no way to check tokens is configured on the control plane".into(),
            });
        };
        let user = reviewer
            .review(token)
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        let proven = crate::tokenreview::service_account_identity(&user, &self.trust_domain)
            .ok_or_else(|| {
                format!("the token belongs to {user}, which is not a service account")
            })?;
        if &proven == id {
            Ok(())
        } else {
            Err(format!("the token belongs to {user} ({proven}), not {id}"))
        }
    }
}

pub struct IdentityService {
    pub issuer: Arc<Issuer>,
    pub auth: Arc<Authenticator>,
    pub lifetime: Duration,
    pub metrics: Arc<Metrics>,
    /// Bounds Certify calls in progress, so a flood of bogus tokens cannot turn into a flood
    /// of TokenReviews against the API server; callers over the limit retry with backoff.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// Certify calls served at once.
pub const MAX_CERTIFY_IN_FLIGHT: usize = 32;

impl IdentityService {
    fn refuse(&self, result: &'static str, status: Status) -> Status {
        self.metrics
            .certify
            .get_or_create(&ResultLabels { result })
            .inc();
        status
    }
}

#[tonic::async_trait]
impl remora_api::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request
            .extensions()
            .get::<crate::server::PeerAddr>()
            .map(|p| p.0);
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(self.refuse(
                "busy",
                Status::resource_exhausted(format!(
                    "{MAX_CERTIFY_IN_FLIGHT} certificate requests are already in progress; retry shortly"
                )),
            ));
        };
        let r = request.into_inner();
        let id: SpiffeId = r.identity.parse().map_err(|e| {
            self.refuse(
                "invalid",
                Status::invalid_argument(format!("identity {:?}: {e}", r.identity)),
            )
        })?;
        if id.trust_domain() != self.issuer.trust_domain {
            return Err(self.refuse(
                "denied",
                Status::permission_denied(format!(
                    "{id} is outside this control plane's trust domain {}",
                    self.issuer.trust_domain
                )),
            ));
        }
        if let Err(reason) = self.auth.check(&r.token, &id).await {
            tracing::warn!(identity = %id, ?peer, "certify refused: {reason}");
            return Err(self.refuse(
                "denied",
                Status::permission_denied(format!("cannot certify {id}: {reason}")),
            ));
        }
        let signing = self.issuer.current();
        // Never past the issuer's own expiry: the chain would break before renewal.
        let lifetime = self.lifetime.min(
            signing
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        );
        if lifetime < Duration::from_secs(1) {
            return Err(self.refuse(
                "invalid",
                Status::unavailable(
                    "the issuer certificate has expired; rotate it (remora ca init)",
                ),
            ));
        }
        let chain = signing
            .issuer
            .issue_from_csr(&r.csr, &id, lifetime)
            .map_err(|e| self.refuse("invalid", Status::invalid_argument(e.to_string())))?;
        let not_after = (SystemTime::now() + lifetime)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        self.metrics
            .certify
            .get_or_create(&ResultLabels { result: "issued" })
            .inc();
        tracing::info!(identity = %id, ?peer, ?lifetime, "certified");
        Ok(Response::new(CertifyResponse {
            chain,
            bundle: signing.issuer.bundle_pem.clone(),
            not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_errors_name_the_line() {
        let p = Path::new("tokens");
        let ok = parse_tokens(
            p,
            "# comment\n0123456789abcdef spiffe://cluster.local/ns/a/sa/b\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        for (text, want) in [
            (
                "\nshort spiffe://cluster.local/ns/a/sa/b\n",
                "line 2: token is 5",
            ),
            ("0123456789abcdef\n", "line 1: expected"),
            ("0123456789abcdef http://x\n", "line 1:"),
        ] {
            let e = parse_tokens(p, text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[tokio::test]
    async fn certify_answers_busy_beyond_its_limit_and_signs_otherwise() {
        use remora_api::identity_server::Identity as _;
        let dir = std::env::temp_dir().join(format!("remora-issuer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ca::init_dir(&dir, "cluster.local").unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(
            &tokens,
            "0123456789abcdef spiffe://cluster.local/ns/a/sa/b\n",
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let control: SpiffeId = "spiffe://cluster.local/ns/remora/sa/control"
            .parse()
            .unwrap();
        let svc = |permits| IdentityService {
            issuer: Issuer::load(&dir, "cluster.local", control.clone(), metrics.clone()).unwrap(),
            auth: Arc::new(Authenticator {
                bootstrap: Some(Arc::new(BootstrapTokens::load(&tokens).unwrap())),
                token_review: None,
                trust_domain: "cluster.local".into(),
            }),
            lifetime: Duration::from_secs(3600),
            metrics: metrics.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(permits)),
        };
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let req = || {
            let (_key, csr) = ca::new_key_and_csr(&id).unwrap();
            Request::new(CertifyRequest {
                identity: id.to_string(),
                token: "0123456789abcdef".into(),
                csr,
            })
        };
        let busy = svc(0).certify(req()).await.unwrap_err();
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        let ok = svc(1).certify(req()).await.unwrap().into_inner();
        let chain =
            remora_certs::validate::parse_certs(Path::new("chain"), ok.chain.as_bytes()).unwrap();
        assert_eq!(
            remora_certs::validate::spiffe_id(&chain[0]),
            Some(id.clone())
        );
        let wrong = Request::new(CertifyRequest {
            identity: "spiffe://other.domain/ns/a/sa/b".into(),
            token: "0123456789abcdef".into(),
            csr: String::new(),
        });
        assert_eq!(
            svc(1).certify(wrong).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A key replaced after the first load but before the watch's first look (a control plane
    /// starting under load) is still noticed, and refused: before, the watch took the changed
    /// files as its starting point and never looked at them again.
    #[tokio::test]
    async fn a_change_before_the_watch_starts_is_noticed() {
        let base = std::env::temp_dir().join(format!("remora-issuer-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (dir, other) = (base.join("issuer"), base.join("other"));
        ca::init_dir(&dir, "cluster.local").unwrap();
        ca::init_dir(&other, "cluster.local").unwrap();
        let metrics = Arc::new(Metrics::new());
        let control: SpiffeId = "spiffe://cluster.local/ns/remora/sa/control"
            .parse()
            .unwrap();
        let issuer = Issuer::load(&dir, "cluster.local", control, metrics.clone()).unwrap();
        let before = issuer.current();
        // Another CA's key: it does not match issuer.crt.
        std::fs::copy(other.join("issuer.key"), dir.join("issuer.key")).unwrap();
        let watch = tokio::spawn(issuer.clone().watch(|_| {}));
        let deadline = tokio::time::Instant::now() + POLL * 20;
        while metrics.issuer_reload_failures.get() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replaced key was never looked at"
            );
            tokio::time::sleep(POLL / 5).await;
        }
        assert!(
            Arc::ptr_eq(&before, &issuer.current()),
            "kept the working issuer"
        );
        watch.abort();
        std::fs::remove_dir_all(&base).ok();
    }

    #[tokio::test]
    async fn bootstrap_tokens_prove_only_their_identity() {
        let dir = std::env::temp_dir().join(format!("remora-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "0123456789abcdef spiffe://cluster.local/ns/a/sa/b\n").unwrap();
        let auth = Authenticator {
            bootstrap: Some(Arc::new(BootstrapTokens::load(&path).unwrap())),
            token_review: None,
            trust_domain: "cluster.local".into(),
        };
        let b: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let c: SpiffeId = "spiffe://cluster.local/ns/a/sa/c".parse().unwrap();
        assert!(auth.check("0123456789abcdef", &b).await.is_ok());
        let e = auth.check("0123456789abcdef", &c).await.unwrap_err();
        assert!(e.contains("is for spiffe://cluster.local/ns/a/sa/b"), "{e}");
        let e = auth.check("nope", &b).await.unwrap_err();
        assert!(e.contains("not in the bootstrap tokens"), "{e}");
        assert!(auth.check("", &b).await.unwrap_err().contains("no token"));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A token revoked after the first load but before the watch's first look is revoked.
    #[tokio::test]
    async fn a_token_revoked_before_the_watch_starts_is_revoked() {
        let dir = std::env::temp_dir().join(format!("remora-revoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "0123456789abcdef spiffe://cluster.local/ns/a/sa/b\n").unwrap();
        let tokens = Arc::new(BootstrapTokens::load(&path).unwrap());
        assert!(tokens.get("0123456789abcdef").is_some());
        std::fs::write(&path, "# revoked\n").unwrap();
        let watch = tokio::spawn(tokens.clone().watch());
        let deadline = tokio::time::Instant::now() + POLL * 20;
        while tokens.get("0123456789abcdef").is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the revoked token still proves its identity"
            );
            tokio::time::sleep(POLL / 5).await;
        }
        watch.abort();
        std::fs::remove_dir_all(&dir).ok();
    }
}

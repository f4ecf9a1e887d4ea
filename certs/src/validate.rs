//! Validation every certificate set goes through before anything uses it: the PEM parses, the
//! key matches the certificate, the validity window holds (with a small clock-skew allowance),
//! the chain verifies to the trust bundle, and a SPIFFE identity is present. Errors name the
//! file and what failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::SpiffeId;

/// Clocks between issuer and workload may disagree by this much.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot read it: {0}")]
    Unreadable(String),
    #[error("it is empty")]
    Empty,
    #[error("it holds no PEM {0}")]
    NoPem(&'static str),
    #[error("it is not valid PEM/DER: {0}")]
    Garbage(String),
    #[error("the key does not match the certificate in tls.crt")]
    KeyMismatch,
    #[error("not valid until {0}")]
    NotYetValid(String),
    #[error("expired {0}")]
    Expired(String),
    #[error("the chain does not verify to ca.crt: {0}")]
    Untrusted(String),
    #[error("the leaf carries no spiffe:// URI SAN")]
    NoIdentity,
}

/// A file and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct ValidationError {
    pub file: PathBuf,
    pub problem: Problem,
}

/// A validated identity: what a proxy serves and verifies peers with.
#[derive(Clone)]
pub struct Credentials {
    pub id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// `2026-01-02 03:04:05 UTC`
pub fn human_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!("{} {} UTC", t.date(), t.time()),
        Err(_) => format!("{secs} (unix)"),
    }
}

fn err(file: &Path, problem: Problem) -> ValidationError {
    ValidationError {
        file: file.to_path_buf(),
        problem,
    }
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(
    file: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ValidationError> {
    if pem.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(err(file, Problem::Empty));
    }
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| err(file, Problem::Garbage(e.to_string())))?;
    if certs.is_empty() {
        return Err(err(file, Problem::NoPem("CERTIFICATE")));
    }
    for c in &certs {
        X509Certificate::from_der(c).map_err(|e| err(file, Problem::Garbage(e.to_string())))?;
    }
    Ok(certs)
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// The validity window of a certificate.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    Some((
        to_system_time(c.validity().not_before.timestamp()),
        to_system_time(c.validity().not_after.timestamp()),
    ))
}

/// Why a peer's certificate does not carry a usable mesh identity.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate has no SPIFFE ID (a URI SAN spiffe://<trust-domain>/...)")]
    Missing,
    #[error("the certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    Several(usize),
    #[error("the URI SAN {0:?} is not a valid SPIFFE ID")]
    Invalid(String),
    #[error("{id} is in trust domain {found:?}, not this mesh's {want:?}")]
    ForeignTrustDomain {
        id: String,
        found: String,
        want: String,
    },
}

/// The identity of a peer whose chain already verified: exactly one URI SAN (the X.509-SVID
/// rule), a SPIFFE ID, in `trust_domain`. Federation would widen the last check to a set of
/// trust domains, each with its own bundle; until then one domain is the mesh.
pub fn peer_identity(der: &[u8], trust_domain: &str) -> Result<SpiffeId, PeerIdError> {
    let (_, c) = X509Certificate::from_der(der).map_err(|_| PeerIdError::Unparsable)?;
    let mut uris = Vec::new();
    for ext in c.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(PeerIdError::Missing),
        [one] => *one,
        many => return Err(PeerIdError::Several(many.len())),
    };
    if !uri.starts_with("spiffe://") {
        return Err(PeerIdError::Missing);
    }
    let id: SpiffeId = uri
        .parse()
        .map_err(|_| PeerIdError::Invalid(uri.to_string()))?;
    if !id.trust_domain().eq_ignore_ascii_case(trust_domain) {
        return Err(PeerIdError::ForeignTrustDomain {
            id: id.to_string(),
            found: id.trust_domain().to_string(),
            want: trust_domain.to_string(),
        });
    }
    Ok(id)
}

/// The SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    for ext in c.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    return uri.parse().ok();
                }
            }
        }
    }
    None
}

/// Trust anchors from a bundle's certificates.
pub fn anchors(roots: &[CertificateDer<'static>]) -> Result<Vec<TrustAnchor<'static>>, String> {
    roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| {
                    format!("a certificate in the bundle is not a usable trust anchor: {e}")
                })
        })
        .collect()
}

/// Verifies `chain` (leaf first) to `anchors` at `now`, for client or server use.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'_>],
    now: SystemTime,
    server: bool,
) -> Result<(), String> {
    let leaf = chain.first().ok_or("no certificate")?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let usage = if server {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    let t = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        &chain[1..],
        t,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// Validates an identity from PEM texts. `dir` names the files in errors.
pub fn validate(
    dir: &Path,
    chain_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
    now: SystemTime,
) -> Result<Credentials, ValidationError> {
    let (crt, key_file, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    let chain = parse_certs(&crt, chain_pem)?;
    let roots = parse_certs(&ca, bundle_pem)?;
    if key_pem.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(err(&key_file, Problem::Empty));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => err(&key_file, Problem::NoPem("PRIVATE KEY")),
        e => err(&key_file, Problem::Garbage(e.to_string())),
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| err(&key_file, Problem::Garbage(e.to_string())))?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    certified
        .keys_match()
        .map_err(|_| err(&key_file, Problem::KeyMismatch))?;
    let (not_before, not_after) =
        validity(&chain[0]).ok_or_else(|| err(&crt, Problem::Garbage("no validity".into())))?;
    if now + CLOCK_SKEW < not_before {
        return Err(err(&crt, Problem::NotYetValid(human_time(not_before))));
    }
    if now > not_after {
        return Err(err(&crt, Problem::Expired(human_time(not_after))));
    }
    let anchors = anchors(&roots).map_err(|e| err(&ca, Problem::Untrusted(e)))?;
    // Inside the skew allowance, verify as of the start of validity.
    let at = now.max(not_before);
    verify_chain(&chain, &anchors, at, true).map_err(|e| err(&crt, Problem::Untrusted(e)))?;
    let id = spiffe_id(&chain[0]).ok_or_else(|| err(&crt, Problem::NoIdentity))?;
    Ok(Credentials {
        id,
        certified: Arc::new(certified),
        roots,
        not_before,
        not_after,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, ValidationError> {
    std::fs::read(path).map_err(|e| err(path, Problem::Unreadable(e.to_string())))
}

/// Reads and validates the identity directory layout (contract): `tls.crt`, `tls.key`,
/// `ca.crt`.
pub fn load_dir(dir: &Path) -> Result<Credentials, ValidationError> {
    let chain = read(&dir.join("tls.crt"))?;
    let key = read(&dir.join("tls.key"))?;
    let bundle = read(&dir.join("ca.crt"))?;
    validate(dir, &chain, &key, &bundle, SystemTime::now())
}

/// A human-readable account of a PEM certificate file (`remora cert inspect`).
pub fn inspect(path: &Path) -> Result<String, ValidationError> {
    let pem = read(path)?;
    let certs = parse_certs(path, &pem)?;
    let mut out = String::new();
    let now = SystemTime::now();
    for (i, der) in certs.iter().enumerate() {
        let Ok((_, c)) = X509Certificate::from_der(der) else {
            continue;
        };
        out.push_str(&format!("certificate {} of {}\n", i + 1, certs.len()));
        out.push_str(&format!("  subject:  {}\n", c.subject()));
        out.push_str(&format!("  issuer:   {}\n", c.issuer()));
        for ext in c.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    out.push_str(&format!("  SAN:      {n}\n"));
                }
            }
        }
        let (nb, na) = validity(der).unwrap_or((UNIX_EPOCH, UNIX_EPOCH));
        let state = if now + CLOCK_SKEW < nb {
            "NOT YET VALID".to_string()
        } else if now > na {
            "EXPIRED".to_string()
        } else {
            let left = na.duration_since(now).unwrap_or_default().as_secs();
            format!("valid, {}d {}h left", left / 86400, left % 86400 / 3600)
        };
        out.push_str(&format!(
            "  valid:    {} → {} ({state})\n",
            human_time(nb),
            human_time(na)
        ));
        out.push_str(&format!("  CA:       {}\n", c.is_ca()));
    }
    // A chain next to its bundle (the identity layout) is verified too.
    if let Some(dir) = path.parent() {
        let ca = dir.join("ca.crt");
        if ca != path && ca.exists() {
            let bundle = read(&ca)?;
            let roots = parse_certs(&ca, &bundle)?;
            let status = anchors(&roots)
                .and_then(|a| verify_chain(&certs, &a, now, true))
                .map(|()| format!("verifies to {}", ca.display()))
                .unwrap_or_else(|e| format!("does NOT verify to {}: {e}", ca.display()));
            out.push_str(&format!("chain:      {status}\n"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca;

    fn fresh() -> (tempdir::Dir, ca::LoadedIssuer) {
        let d = tempdir::Dir::new();
        ca::init_dir(&d.0, "cluster.local").unwrap();
        let issuer = ca::LoadedIssuer::from_dir(&d.0).unwrap();
        (d, issuer)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("remora-certs-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn issued_leaf_validates_and_carries_identity() {
        let (d, issuer) = fresh();
        let id = SpiffeId::workload("cluster.local", "default", "web").unwrap();
        let leaf = ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600)).unwrap();
        leaf.write(&d.0.join("id")).unwrap();
        let c = load_dir(&d.0.join("id")).unwrap();
        assert_eq!(c.id, id);
        assert_eq!(c.certified.cert.len(), 2, "leaf + issuer");
        assert!(
            inspect(&d.0.join("id/tls.crt"))
                .unwrap()
                .contains("verifies to")
        );
    }

    #[test]
    fn leaf_from_a_csr_uses_the_proven_identity_and_the_workloads_key() {
        let (d, issuer) = fresh();
        let id = SpiffeId::workload("cluster.local", "default", "web").unwrap();
        let (key, csr) = ca::new_key_and_csr(&id).unwrap();
        let chain = issuer
            .issue_from_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        let c = validate(
            &d.0,
            chain.as_bytes(),
            key.serialize_pem().as_bytes(),
            issuer.bundle_pem.as_bytes(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(c.id, id);
        assert!(
            issuer
                .issue_from_csr("not a csr", &id, Duration::from_secs(60))
                .is_err()
        );
    }

    #[test]
    fn bad_sets_are_refused_with_the_file_and_reason() {
        let (d, issuer) = fresh();
        let id = SpiffeId::workload("cluster.local", "default", "web").unwrap();
        let good = ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600)).unwrap();
        let other = ca::issue_with_new_key(&issuer, &id, Duration::from_secs(3600)).unwrap();
        let (_d2, foreign) = fresh();
        let alien = ca::issue_with_new_key(&foreign, &id, Duration::from_secs(3600)).unwrap();
        let now = SystemTime::now();
        let v = |c: &str, k: &str, b: &str, at| {
            validate(&d.0, c.as_bytes(), k.as_bytes(), b.as_bytes(), at)
        };
        let p = |r: Result<Credentials, ValidationError>| r.unwrap_err().problem;
        assert_eq!(
            p(v("", &good.key_pem, &good.bundle_pem, now)),
            Problem::Empty
        );
        assert!(matches!(
            p(v("garbage", &good.key_pem, &good.bundle_pem, now)),
            Problem::NoPem(_)
        ));
        let truncated = &good.chain_pem[..good.chain_pem.len() / 2];
        assert!(matches!(
            p(v(truncated, &good.key_pem, &good.bundle_pem, now)),
            Problem::Garbage(_) | Problem::NoPem(_)
        ));
        assert_eq!(
            p(v(&good.chain_pem, &other.key_pem, &good.bundle_pem, now)),
            Problem::KeyMismatch
        );
        let later = now + Duration::from_secs(7200);
        assert!(matches!(
            p(v(&good.chain_pem, &good.key_pem, &good.bundle_pem, later)),
            Problem::Expired(_)
        ));
        let earlier = now - Duration::from_secs(3600);
        assert!(matches!(
            p(v(&good.chain_pem, &good.key_pem, &good.bundle_pem, earlier)),
            Problem::NotYetValid(_)
        ));
        assert!(matches!(
            p(v(&alien.chain_pem, &alien.key_pem, &good.bundle_pem, now)),
            Problem::Untrusted(_)
        ));
        assert!(v(&good.chain_pem, &good.key_pem, &good.bundle_pem, now).is_ok());
        // Two roots in the bundle (a CA rotation in progress): both chains verify.
        let both = format!("{}{}", good.bundle_pem, alien.bundle_pem);
        assert!(v(&alien.chain_pem, &alien.key_pem, &both, now).is_ok());
        let e = v(&good.chain_pem, &other.key_pem, &good.bundle_pem, now).unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
    }
}

//! Trust anchors, issuers and workload leaves, with rcgen. ECDSA P-256 throughout.
//!
//! `remora ca init` writes a directory a user can mount as is:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt` | the trust anchor (root): the trust bundle proxies verify peers with |
//! | `root.key` | the root's key: keep it offline; only needed to make a new issuer |
//! | `issuer.crt`, `issuer.key` | the intermediate that signs workload certificates |

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `contents` to `dir/name`; keys are made readable by the owner only.
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<(), CaError> {
    let path = dir.join(name);
    let io = |source| CaError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(&path, contents).map_err(io)?;
    #[cfg(unix)]
    if name.ends_with(".key") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

/// PEM texts of a freshly made CA.
pub struct NewCa {
    pub root_crt: String,
    pub root_key: String,
    pub issuer_crt: String,
    pub issuer_key: String,
}

fn ca_params(cn: String, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA parameters"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + lifetime;
    Ok(p)
}

/// A root (10 years) and an issuer signed by it (1 year) for `trust_domain`.
pub fn new_ca(trust_domain: &str) -> Result<NewCa, CaError> {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let root_key = KeyPair::generate().map_err(rc("root key"))?;
    let root_params = ca_params(format!("remora root {trust_domain}"), 10 * YEAR)?;
    let root_crt = root_params
        .self_signed(&root_key)
        .map_err(rc("root certificate"))?;
    let root = Issuer::new(root_params, &root_key);
    let issuer_key = KeyPair::generate().map_err(rc("issuer key"))?;
    let issuer_params = ca_params(format!("remora issuer {trust_domain}"), YEAR)?;
    let issuer_crt = issuer_params
        .signed_by(&issuer_key, &root)
        .map_err(rc("issuer certificate"))?;
    Ok(NewCa {
        root_crt: root_crt.pem(),
        root_key: root_key.serialize_pem(),
        issuer_crt: issuer_crt.pem(),
        issuer_key: issuer_key.serialize_pem(),
    })
}

/// An issuer loaded from a CA directory (`issuer.crt`, `issuer.key`, `ca.crt`).
pub struct LoadedIssuer {
    issuer: Issuer<'static, KeyPair>,
    pub issuer_pem: String,
    pub bundle_pem: String,
}

impl LoadedIssuer {
    pub fn from_dir(dir: &Path) -> Result<Self, CaError> {
        let issuer_pem = read(&dir.join("issuer.crt"))?;
        let key = KeyPair::from_pem(&read(&dir.join("issuer.key"))?).map_err(rc("issuer.key"))?;
        let bundle_pem = read(&dir.join("ca.crt"))?;
        let issuer = Issuer::from_ca_cert_pem(&issuer_pem, key).map_err(rc("issuer.crt"))?;
        Ok(LoadedIssuer {
            issuer,
            issuer_pem,
            bundle_pem,
        })
    }

    /// Signs a workload leaf for `id` over `public_key` (from a CSR, or a key made here). The
    /// leaf carries the SPIFFE ID as a URI SAN and the identity's DNS name as a DNS SAN, and is
    /// good for both server and client authentication. Returns the leaf followed by the issuer.
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        // A little backdating absorbs clock skew between the issuer and the peers.
        let from = now - time::Duration::minutes(1);
        self.issue_window(Some(id), &id.dns_name(), public_key, from, now + lifetime)
    }

    /// Like [`LoadedIssuer::issue`] with every field chosen: an explicit validity window, and
    /// optionally no SPIFFE ID at all (tests of what validation refuses use this).
    pub fn issue_window(
        &self,
        id: Option<&SpiffeId>,
        dns_name: &str,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc("leaf parameters"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_name);
        p.distinguished_name = dn;
        let dns = dns_name
            .to_string()
            .try_into()
            .map_err(rc("identity DNS name"))?;
        p.subject_alt_names = vec![SanType::DnsName(dns)];
        if let Some(id) = id {
            let uri = id.to_string().try_into().map_err(rc("SPIFFE URI"))?;
            p.subject_alt_names.insert(0, SanType::URI(uri));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = not_before;
        p.not_after = not_after;
        let leaf = p
            .signed_by(public_key, &self.issuer)
            .map_err(rc("leaf certificate"))?;
        Ok(format!("{}{}", leaf.pem(), self.issuer_pem))
    }
}

impl LoadedIssuer {
    /// A TLS server certificate without a SPIFFE ID, for a server that clients outside the mesh
    /// verify by name (the API server calling the injection webhook). Each of `names` is a DNS
    /// name, or an IP address when it parses as one. Returns `(chain PEM, key PEM)`: the leaf,
    /// then the issuer.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), CaError> {
        let first = names
            .first()
            .ok_or_else(|| CaError::Invalid("a server certificate needs a name".into()))?;
        let mut p =
            CertificateParams::new(Vec::<String>::new()).map_err(rc("server parameters"))?;
        p.distinguished_name
            .push(DnType::CommonName, first.as_str());
        for n in names {
            p.subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => {
                        SanType::DnsName(n.clone().try_into().map_err(rc("server DNS name"))?)
                    }
                });
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + lifetime;
        let key = KeyPair::generate().map_err(rc("server key"))?;
        let leaf = p
            .signed_by(&key, &self.issuer)
            .map_err(rc("server certificate"))?;
        Ok((
            format!("{}{}", leaf.pem(), self.issuer_pem),
            key.serialize_pem(),
        ))
    }

    /// Issues a leaf for `id` from a PEM CSR. Only the CSR's public key is used: the identity
    /// is the one the caller proved, never what the CSR asks for, and the key never leaves the
    /// workload. The CSR's signature is checked (proof it holds the key).
    pub fn issue_from_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::Invalid(format!(
                "the CSR is not a valid PEM certificate request: {e}"
            ))
        })?;
        self.issue(id, &csr.public_key, lifetime)
    }
}

/// A key and a CSR for it, made where the key will live.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate().map_err(rc("workload key"))?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc("CSR parameters"))?;
    p.distinguished_name.push(DnType::CommonName, id.dns_name());
    let csr = p.serialize_request(&key).map_err(rc("CSR"))?;
    let pem = csr.pem().map_err(rc("CSR PEM"))?;
    Ok((key, pem))
}

/// A workload's key and certificate files, ready to write as `tls.crt`, `tls.key`, `ca.crt`.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
}

/// Makes a key here and issues a leaf for it (what `remora cert issue` does).
pub fn issue_with_new_key(
    issuer: &LoadedIssuer,
    id: &SpiffeId,
    lifetime: Duration,
) -> Result<Leaf, CaError> {
    let key = KeyPair::generate().map_err(rc("workload key"))?;
    let chain_pem = issuer.issue(id, &key, lifetime)?;
    Ok(Leaf {
        chain_pem,
        key_pem: key.serialize_pem(),
        bundle_pem: issuer.bundle_pem.clone(),
    })
}

impl Leaf {
    /// Writes the identity-directory layout (contract): `tls.crt`, `tls.key`, `ca.crt`.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        write(dir, "tls.crt", &self.chain_pem)?;
        write(dir, "tls.key", &self.key_pem)?;
        write(dir, "ca.crt", &self.bundle_pem)
    }
}

/// Writes a new CA directory.
pub fn init_dir(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    if dir.join("issuer.key").exists() {
        return Err(CaError::Invalid(format!(
            "{} already holds a CA (issuer.key); choose another --out, or remove it to start over",
            dir.display()
        )));
    }
    let ca = new_ca(trust_domain)?;
    write(dir, "ca.crt", &ca.root_crt)?;
    write(dir, "root.key", &ca.root_key)?;
    write(dir, "issuer.crt", &ca.issuer_crt)?;
    write(dir, "issuer.key", &ca.issuer_key)
}

//! Client-side TLS to a remora peer: a server is accepted only if its chain verifies to the
//! trust bundle and its leaf carries exactly the expected SPIFFE ID (DNS names are not
//! checked: SPIFFE identities are the names here). Used by proxies towards peer proxies
//! ([`client_config`]) and by anything that talks to the control plane
//! ([`control_client_config`]: proxies, the benches and tests that stand in for them), so all
//! of them check the server the same way. Pure rustls: no sockets, no runtime.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WantsClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{ClientConfig, ConfigBuilder, DigitallySignedStruct, SignatureScheme};

use crate::crypto::provider;
use crate::identity::SpiffeId;
use crate::validate::Credentials;

/// The ALPN id of HTTP/2, which the control plane's gRPC APIs speak.
const ALPN_H2: &[u8] = b"h2";

/// Reads and parses a trust bundle (`ca.crt`). Errors name the file.
pub fn read_anchors(ca: &Path) -> Result<Arc<Vec<TrustAnchor<'static>>>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: cannot read: {e}", ca.display()))?;
    let roots = crate::validate::parse_certs(ca, &pem).map_err(|e| e.to_string())?;
    let anchors = crate::validate::anchors(&roots).map_err(|e| format!("{}: {e}", ca.display()))?;
    Ok(Arc::new(anchors))
}

/// The mTLS client configuration between proxies: our certificate, and a server that must
/// prove `expected`. `alpn` empty offers none.
pub fn client_config(
    creds: &Credentials,
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: SpiffeId,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut cfg = spiffe_client(anchors, expected)?.with_client_cert_resolver(Arc::new(
        rustls::sign::SingleCertAndKey::from(creds.certified.clone()),
    ));
    if !alpn.is_empty() {
        cfg.alpn_protocols = vec![alpn.to_vec()];
    }
    // No SNI between proxies: a ClientHello without a server name is always terminated by the
    // peer proxy, so it presents its certificate and the verifier above can say exactly which
    // identity it found (with SNI, a peer with another identity would pass the bytes to its
    // app and the failure would read as a protocol error).
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The client configuration for the control plane's APIs: no client certificate (a proxy may
/// not have one yet: it is asking for it), a server that must prove `expected`, ALPN h2.
pub fn control_client_config(
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut cfg = spiffe_client(anchors, expected)?.with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The server name to ask for when connecting to `id`. With SNI off it is not sent; rustls
/// still needs one, and the verifier ignores it.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, String> {
    ServerName::try_from(id.dns_name()).map_err(|e| format!("{id}: no usable TLS server name: {e}"))
}

/// TLS 1.3 to a server that must chain to `anchors` and prove `expected`.
fn spiffe_client(
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: SpiffeId,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, rustls::Error> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        anchors,
        expected,
        provider: provider.clone(),
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// Accepts a server whose chain verifies to the trust bundle and whose leaf carries exactly the
/// expected SPIFFE ID. DNS names are not checked: SPIFFE identities are the names here.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        crate::validate::verify_chain(&chain, &self.anchors, now, true).map_err(|e| {
            rustls::Error::General(format!("server certificate does not verify: {e}"))
        })?;
        match crate::validate::spiffe_id(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server presented identity {id}, expected {}",
                self.expected
            ))),
            None => Err(rustls::Error::General(format!(
                "server presented no SPIFFE identity, expected {}",
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

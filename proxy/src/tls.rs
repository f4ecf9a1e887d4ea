//! TLS between proxies: reading a ClientHello's server name without consuming it, the inbound
//! server configuration (TLS 1.3, client certificate required and verified against the trust
//! bundle), and the outbound client configuration that accepts a server only if it presents
//! the expected SPIFFE identity.

use std::sync::Arc;

use remora_certs::{Credentials, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// ALPN ids remora offers and accepts.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the first bytes of a TLS connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not (yet) enough bytes for the ClientHello record.
    Partial,
    /// A ClientHello, with its server name if it sent one.
    Complete { sni: Option<String> },
    /// A handshake record that is not a well-formed ClientHello.
    Malformed,
}

/// Parses the ClientHello in the first TLS record of `buf` (which starts with 0x16).
pub fn client_hello(buf: &[u8]) -> Hello {
    if buf.len() < 5 {
        return Hello::Partial;
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf[1] != 3 || len == 0 || len > 16 * 1024 + 256 {
        return Hello::Malformed;
    }
    if buf.len() < 5 + len {
        return Hello::Partial;
    }
    match parse_hello(&buf[5..5 + len]) {
        Some(sni) => Hello::Complete { sni },
        None => Hello::Malformed,
    }
}

/// Walks the ClientHello: `None` when malformed, `Some(None)` when it has no server name.
fn parse_hello(b: &[u8]) -> Option<Option<String>> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| b[0] as usize)
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        }
    }
    let mut r = R(b);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let hs_len = r
        .take(3)
        .map(|l| (l[0] as usize) << 16 | (l[1] as usize) << 8 | l[2] as usize)?;
    // A ClientHello split across records: take what this record has.
    let mut r = R(&r.0[..hs_len.min(r.0.len())]);
    r.take(2 + 32)?; // version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    if r.0.is_empty() {
        return Some(None);
    }
    let ext_len = r.u16()?;
    let mut exts = R(r.take(ext_len.min(r.0.len()))?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len)?;
        if ty == 0 {
            let mut d = R(data);
            let _list = d.u16()?;
            if d.u8()? != 0 {
                return Some(None);
            }
            let n = d.u16()?;
            let name = d.take(n)?;
            // An absolute name (`web.example.`) is the same name; rustls drops the dot too
            // (a difference the fuzzer's differential found).
            return Some(
                std::str::from_utf8(name)
                    .ok()
                    .map(|s| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase()),
            );
        }
    }
    Some(None)
}

fn root_store(creds: &Credentials) -> RootCertStore {
    let mut store = RootCertStore::empty();
    for r in &creds.roots {
        // Validation already parsed every root; one that rustls rejects is skipped.
        let _ = store.add(r.clone());
    }
    store
}

/// The inbound mTLS server configuration for one credential set.
pub fn server_config(creds: &Credentials) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(creds)),
        provider.clone(),
    )
    .build()
    .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            creds.certified.clone(),
        )));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(cfg))
}

/// The outbound mTLS client configuration: our certificate, and a server that must prove
/// `expected`.
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

/// TLS 1.3 to a server that must chain to `anchors` and prove `expected`.
fn spiffe_client(
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: SpiffeId,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
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

/// The server name to ask for when connecting to `id`.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, String> {
    ServerName::try_from(id.dns_name()).map_err(|e| format!("{id}: no usable TLS server name: {e}"))
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
        remora_certs::validate::verify_chain(&chain, &self.anchors, now, true).map_err(|e| {
            rustls::Error::General(format!("server certificate does not verify: {e}"))
        })?;
        match remora_certs::validate::spiffe_id(end_entity) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sni_from_a_real_client_hello() {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from("web.default.sa.cluster.local").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        let sni = Some("web.default.sa.cluster.local".to_string());
        assert_eq!(client_hello(&buf), Hello::Complete { sni });
        assert_eq!(client_hello(&buf[..buf.len() - 1]), Hello::Partial);
    }

    #[test]
    fn truncated_and_garbage_hellos() {
        assert_eq!(client_hello(&[0x16, 3, 1]), Hello::Partial);
        assert_eq!(client_hello(&[0x16, 3, 1, 0, 10, 1, 0]), Hello::Partial);
        assert_eq!(client_hello(&[0x16, 9, 9, 0, 10]), Hello::Malformed);
        assert_eq!(
            client_hello(&[0x16, 3, 1, 0, 4, 1, 0, 0, 99]),
            Hello::Malformed
        );
    }
}

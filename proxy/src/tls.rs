//! TLS between proxies: reading a ClientHello's server name without consuming it and the
//! inbound server configuration (TLS 1.3, client certificate required and verified against the
//! trust bundle). The outbound client configuration, which accepts a server only if it presents
//! the expected SPIFFE identity, is `remora_certs::tls`, re-exported here.

use std::sync::Arc;

use remora_certs::Credentials;
use rustls::{RootCertStore, ServerConfig};

/// The client side (a server must prove the expected SPIFFE ID) and the crypto provider live in
/// remora-certs: the control plane, and the benches and tests that stand in for proxies, check
/// servers the same way without depending on the proxy.
pub(crate) use remora_certs::crypto::provider;
pub(crate) use remora_certs::tls::{client_config, server_name};

/// ALPN ids remora offers and accepts.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Offered by an outbound proxy tunnelling to a port published as opaque (a Kubernetes
/// `appProtocol` such as `mysql`): the inbound skips detection, so a server-speaks-first
/// protocol gets its first bytes at once instead of after the detection timeout.
pub const ALPN_OPAQUE: &[u8] = b"remora-opaque";

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
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ClientConfig;
    use rustls::pki_types::ServerName;

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

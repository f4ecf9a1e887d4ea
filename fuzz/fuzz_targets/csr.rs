//! `remora_certs::ca::LoadedIssuer::issue_from_csr`: what the control plane's Certify call
//! does with the CSR a proxy sends over the network (PEM text, or DER wrapped here into a
//! `CERTIFICATE REQUEST` block when byte 0 is odd).
//!
//! Invariants when a leaf is issued: the CSR's signature verifies (x509-parser, independent of
//! the issuer's own check: proof of possession), the leaf carries exactly the identity the
//! caller proved and not what the CSR asks for, over the CSR's own public key, is not a CA,
//! and chains to the issuer's bundle.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use remora_certs::SpiffeId;
use remora_certs::ca::{LoadedIssuer, init_dir};
use remora_certs::validate::{anchors, parse_certs, spiffe_id, verify_chain};
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};

struct Fixture {
    issuer: LoadedIssuer,
    id: SpiffeId,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("remora-fuzz-csr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_dir(&dir, "cluster.local").unwrap();
        let issuer = LoadedIssuer::from_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Fixture {
            issuer,
            id: SpiffeId::workload("cluster.local", "default", "proven").unwrap(),
        }
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn pem(label: &str, der: &[u8]) -> String {
    let mut b = String::with_capacity(der.len() * 4 / 3 + 4);
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        b.push(B64[(n >> 18) as usize & 63] as char);
        b.push(B64[(n >> 12) as usize & 63] as char);
        b.push(if c.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        b.push(if c.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block, read by the `pem` crate as rcgen reads it (it is more
/// lenient than rustls-pki-types: text before `-----BEGIN` on its line, any label).
fn der_of(pem_text: &str) -> Option<Vec<u8>> {
    pem::parse(pem_text).ok().map(|p| p.contents().to_vec())
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let text = if mode & 1 == 1 {
        pem("CERTIFICATE REQUEST", data)
    } else {
        match std::str::from_utf8(data) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    };
    let f = fixture();
    let Ok(chain_pem) = f
        .issuer
        .issue_from_csr(&text, &f.id, Duration::from_secs(3600))
    else {
        return;
    };

    // rcgen accepted it: check it independently.
    let der = der_of(&text).expect("an accepted CSR is a PEM CERTIFICATE REQUEST");
    let (_, csr) = X509CertificationRequest::from_der(&der).expect("an accepted CSR parses");
    csr.verify_signature()
        .expect("a leaf was issued for a CSR whose signature does not verify");

    let chain = parse_certs(std::path::Path::new("issued"), chain_pem.as_bytes())
        .expect("the issued chain parses");
    assert_eq!(chain.len(), 2, "leaf + issuer");
    assert_eq!(
        spiffe_id(&chain[0]).as_ref(),
        Some(&f.id),
        "the leaf names the proven identity"
    );
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert!(!leaf.is_ca());
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        uris,
        [f.id.to_string()],
        "exactly the proven identity, nothing from the CSR"
    );
    assert_eq!(
        leaf.public_key().subject_public_key.data,
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data,
        "the leaf is not over the CSR's key"
    );
    let roots = parse_certs(
        std::path::Path::new("ca.crt"),
        f.issuer.bundle_pem.as_bytes(),
    )
    .unwrap();
    let a = anchors(&roots).unwrap();
    verify_chain(&chain, &a, SystemTime::now(), true).expect("the leaf chains to the bundle");
});

//! `remora_certs::validate::validate` (what `load_dir` runs on `tls.crt`, `tls.key` and
//! `ca.crt`) on fuzzed contents, plus `parse_certs`, `validity`, `spiffe_id`, `anchors` and
//! `verify_chain` on what parses.
//!
//! Input: byte 0 is a mode; the rest is split in three at 0xff 0x00 separators (chain, key,
//! bundle). Mode bit 0: the parts are PEM text as is, or DER wrapped here into PEM
//! (`CERTIFICATE` blocks for chain and bundle, split further at 0xff 0x01; `PRIVATE KEY` for
//! the key) so the fuzzer mutates DER directly. Bit 1: validate at the leaf's notBefore + 1 s
//! (so committed seeds reach the chain checks whenever they run), else at a fixed time.
//!
//! Invariants: no panic; accepted credentials carry the leaf's SPIFFE ID, a window that holds
//! at the time validated, the chain as given, and a non-empty bundle.
#![no_main]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use remora_certs::validate::{
    CLOCK_SKEW, anchors, parse_certs, spiffe_id, validate, validity, verify_chain,
};

fn split<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        out.push(&rest[..i]);
        rest = &rest[i + sep.len()..];
    }
    out.push(rest);
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(der.len() * 4 / 3 + 4);
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        b.push(B64[(n >> 18) as usize & 63]);
        b.push(B64[(n >> 12) as usize & 63]);
        b.push(if c.len() > 1 {
            B64[(n >> 6) as usize & 63]
        } else {
            b'='
        });
        b.push(if c.len() > 2 {
            B64[n as usize & 63]
        } else {
            b'='
        });
    }
    let mut out = format!("-----BEGIN {label}-----\n").into_bytes();
    for line in b.chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

fn certs_pem(ders: &[u8]) -> Vec<u8> {
    split(ders, &[0xff, 0x01])
        .into_iter()
        .flat_map(|d| pem("CERTIFICATE", d))
        .collect()
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let parts = split(data, &[0xff, 0x00]);
    let get = |i: usize| parts.get(i).copied().unwrap_or(&[]);
    let (chain, key, bundle) = if mode & 1 == 0 {
        (get(0).to_vec(), get(1).to_vec(), get(2).to_vec())
    } else {
        (
            certs_pem(get(0)),
            pem("PRIVATE KEY", get(1)),
            certs_pem(get(2)),
        )
    };

    let dir = Path::new("/identity");
    let parsed = parse_certs(&dir.join("tls.crt"), &chain);
    let now = match (&parsed, mode & 2 != 0) {
        (Ok(c), true) => validity(&c[0])
            .map(|(nb, _)| nb + Duration::from_secs(1))
            .unwrap_or(UNIX_EPOCH),
        // 2026-01-01 00:00:00 UTC
        _ => UNIX_EPOCH + Duration::from_secs(1_767_225_600),
    };

    // The helpers on their own, on whatever parses.
    if let (Ok(c), Ok(roots)) = (&parsed, parse_certs(&dir.join("ca.crt"), &bundle)) {
        let _ = spiffe_id(&c[0]);
        if let Ok(a) = anchors(&roots) {
            let _ = verify_chain(c, &a, now, true);
            let _ = verify_chain(c, &a, now, false);
        }
    }

    match validate(dir, &chain, &key, &bundle, now) {
        Ok(creds) => {
            let c = parsed.expect("validate accepted a chain parse_certs refuses");
            assert_eq!(spiffe_id(&c[0]).as_ref(), Some(&creds.id));
            assert!(now + CLOCK_SKEW >= creds.not_before && now <= creds.not_after);
            assert!(!creds.roots.is_empty());
            assert_eq!(creds.certified.cert, c);
        }
        Err(e) => {
            let f = e.file.file_name().and_then(|f| f.to_str()).unwrap_or("");
            assert!(["tls.crt", "tls.key", "ca.crt"].contains(&f), "{e}");
            let _ = e.to_string();
        }
    }
    let _: SystemTime = now;
});

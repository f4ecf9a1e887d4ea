//! `remora_proxy::tls::client_hello` on bytes starting with 0x16 (the fuzzer's input follows
//! that byte).
//!
//! Invariants:
//! - Only the first record counts: bytes after it change nothing, a `Complete` or `Malformed`
//!   answer stays the same whatever follows, and every strict prefix of a whole record with a
//!   sane header is `Partial`.
//! - A server name is handed back lower-cased.
//! - Differential: when rustls' server side (`rustls::server::Acceptor`, what terminates the
//!   connection) reads a ClientHello that fits in this one record and finds server name X, the
//!   peek finds X too: routing (terminate or pass through) must agree with the handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proxy::fuzzing::tls::{Hello, client_hello};

fuzz_target!(|rest: &[u8]| {
    let mut buf = Vec::with_capacity(rest.len() + 1);
    buf.push(0x16);
    buf.extend_from_slice(rest);
    let got = client_hello(&buf);

    if let Hello::Complete { sni: Some(name) } = &got {
        assert_eq!(name, &name.to_ascii_lowercase());
    }

    if buf.len() >= 5 {
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        let sane = buf[1] == 3 && len != 0 && len <= 16 * 1024 + 256;
        if sane && buf.len() >= 5 + len {
            let record = &buf[..5 + len];
            assert_ne!(got, Hello::Partial, "a whole record is never Partial");
            assert_eq!(
                client_hello(record),
                got,
                "bytes after the record changed the answer"
            );
            for cut in [5, 5 + len / 2, 5 + len - 1] {
                assert_eq!(client_hello(&buf[..cut]), Hello::Partial, "cut at {cut}");
            }
            differential(record, &got);
        }
    }
});

fn differential(record: &[u8], got: &Hello) {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = record;
    if acceptor.read_tls(&mut rd).is_err() {
        return;
    }
    let Ok(Some(accepted)) = acceptor.accept() else {
        return;
    };
    let theirs = accepted
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    match got {
        Hello::Complete { sni } => assert_eq!(
            sni, &theirs,
            "rustls read server name {theirs:?}, the peek read {sni:?}"
        ),
        other => panic!(
            "rustls accepted this ClientHello (server name {theirs:?}), the peek said {other:?}"
        ),
    }
}

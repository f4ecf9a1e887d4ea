//! `remora_certs::normalize_authority` and `remora_proxy::forward::request_authority`
//! on fuzzed strings, used as the Host header and as the request URI.
//!
//! Invariants:
//! - `normalize_authority` only lower-cases, is idempotent, and what it accepts ends in a
//!   numeric port;
//! - `request_authority` hands back a normalized `host:port` (the port defaulting to 80, or
//!   443 for https), whichever way the authority came, and never for an authority with
//!   userinfo (`user@host`);
//! - the same authority reaches the same destination name whether it came as the Host header
//!   (`GET / HTTP/1.1` + `Host: X`) or in the URI (`GET http://X/`).
#![no_main]

use arbitrary::Arbitrary;
use http::uri::Authority;
use http::{HeaderValue, Request, Uri};
use libfuzzer_sys::fuzz_target;
use remora_certs::normalize_authority;
use remora_proxy::fuzzing::request_authority;

#[derive(Arbitrary, Debug)]
struct Input {
    text: String,
    https: bool,
    host_too: bool,
}

fn check_normalized(a: &str) {
    assert_eq!(
        normalize_authority(a).as_deref(),
        Some(a),
        "request_authority handed back {a:?}, which is not normalized"
    );
    let (_, port) = a.rsplit_once(':').unwrap();
    port.parse::<u16>().unwrap();
}

fn req(uri: Uri, host: Option<HeaderValue>) -> Request<()> {
    let mut r = Request::new(());
    *r.uri_mut() = uri;
    if let Some(h) = host {
        r.headers_mut().insert(http::header::HOST, h);
    }
    r
}

fuzz_target!(|input: Input| {
    let s = input.text.as_str();
    if let Some(n) = normalize_authority(s) {
        assert_eq!(n, s.to_ascii_lowercase());
        assert_eq!(normalize_authority(&n).as_deref(), Some(n.as_str()));
        let (host, port) = n.rsplit_once(':').unwrap();
        assert!(!host.is_empty());
        port.parse::<u16>().unwrap();
    }

    // The text as the request target itself (origin, absolute or authority form).
    if let Ok(uri) = s.parse::<Uri>() {
        let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
        if let Ok(Some(a)) = request_authority(&req(uri, None)) {
            assert!(!userinfo, "{s:?}: userinfo passed as {a:?}");
            check_normalized(&a);
        }
    }

    // As the Host header, with an origin-form target.
    let host = HeaderValue::from_str(s).ok();
    let from_host = host.map(|h| request_authority(&req(Uri::from_static("/"), Some(h))));
    if let Some(Ok(Some(a))) = &from_host {
        assert!(!s.contains('@'), "Host {s:?}: userinfo passed as {a:?}");
        check_normalized(a);
    }

    // In an absolute URI.
    let scheme = if input.https { "https" } else { "http" };
    if let Ok(uri) = format!("{scheme}://{s}/").parse::<Uri>() {
        let same = uri.authority().map(Authority::as_str) == Some(s);
        let default = if input.https { 443 } else { 80 };
        let port = uri
            .authority()
            .and_then(Authority::port_u16)
            .unwrap_or(default);
        // A Host header that disagrees is ignored when the URI has an authority.
        let noise = input
            .host_too
            .then(|| HeaderValue::from_static("decoy.example:1"));
        let from_uri = request_authority(&req(uri, noise));
        if let Ok(Some(a)) = &from_uri {
            check_normalized(a);
            assert!(
                a.ends_with(&format!(":{port}")),
                "{a:?} from {s:?}: port should be {port}"
            );
        }
        if same && !input.https && s.parse::<Authority>().is_ok() {
            assert_eq!(
                from_host,
                Some(from_uri),
                "Host: {s:?} and GET http://{s}/ reach different destinations"
            );
        }
    }
});

//! `remora_proxy::scrub::Rules::{request, response}` on requests and responses built from
//! fuzzed header names and values, with the default strip list (`x-envoy-*`, `x-remora-*`)
//! plus fuzzed extra entries.
//!
//! Invariants afterwards:
//! - no `x-remora-client-id`, no `x-envoy-*`, no `x-remora-*`, nothing an extra entry names;
//! - no `keep-alive`, `proxy-connection`, `transfer-encoding`, `proxy-authorization`,
//!   `proxy-authenticate`;
//! - `connection` and `upgrade` only when it is an upgrade (request: `request` returned true;
//!   response: 101), and then `connection` is exactly `upgrade`; `te` at most `trailers`;
//! - a header that the Connection header named (a valid token list) is gone, bar `upgrade`
//!   on an upgrade;
//! - every other header is untouched (same values, same order).
#![no_main]

use arbitrary::Arbitrary;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use remora_proxy::fuzzing::scrub::Rules;

const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "proxy-authorization",
    "proxy-authenticate",
    "x-remora-client-id",
    "x-remora-anything",
    "x-envoy-upstream-service-time",
    "x-envoy",
    "x-remora",
    "x-foo",
    "host",
    "content-length",
    "x-kept",
];

const VALUES: &[&str] = &[
    "upgrade",
    "Upgrade, keep-alive",
    "keep-alive, x-foo",
    "close",
    "x-kept",
    "te",
    "trailers",
    "gzip, trailers",
    "websocket",
    "h2c",
    "x-remora-client-id",
    "connection",
    "",
];

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Known(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    response: bool,
    http2: bool,
    status: u16,
    headers: Vec<(Name, Value)>,
    extra_rules: Vec<String>,
}

fn name(n: &Name) -> Option<HeaderName> {
    match n {
        Name::Known(i) => Some(HeaderName::from_static(NAMES[*i as usize % NAMES.len()])),
        Name::Raw(b) => HeaderName::from_bytes(b).ok(),
    }
}

fn value(v: &Value) -> Option<HeaderValue> {
    match v {
        Value::Known(i) => Some(HeaderValue::from_static(VALUES[*i as usize % VALUES.len()])),
        Value::Raw(b) => HeaderValue::from_bytes(b).ok(),
    }
}

const ALWAYS_GONE: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
    "x-remora-client-id",
];

/// Header names the Connection header lists, when all its values are valid token lists.
fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// A name as CGI/WSGI servers see it: `_` and `-` are the same (the proxy strips by this).
fn norm(n: &HeaderName) -> String {
    n.as_str().replace('_', "-")
}

fn check(before: &HeaderMap, after: &HeaderMap, upgrade: bool, rules: &[String]) {
    // An entry strips a name as written, or with `_` read as `-` (both, as `Rules` does: a
    // `_*` entry strips `_`, whose `-` spelling it does not match).
    let rule_hit = |n: &HeaderName| {
        let hit = |n: &str| {
            rules.iter().any(|r| {
                let r = r.to_ascii_lowercase();
                match r.strip_suffix('*') {
                    Some(p) => n.starts_with(p),
                    None => n == r,
                }
            })
        };
        hit(n.as_str()) || hit(&norm(n))
    };
    for n in after.keys() {
        assert!(!ALWAYS_GONE.contains(&n.as_str()), "{n} survived");
        assert!(norm(n) != "x-remora-client-id", "{n} survived");
        assert!(!norm(n).starts_with("x-envoy-"), "{n} survived");
        assert!(!norm(n).starts_with("x-remora-"), "{n} survived");
        assert!(!rule_hit(n), "{n} survived although a strip entry names it");
        assert!(n != "http2-settings", "http2-settings survived");
    }
    let conn: Vec<_> = after.get_all("connection").iter().collect();
    if upgrade && !rule_hit(&http::header::CONNECTION) {
        assert_eq!(
            conn,
            ["upgrade"],
            "an upgrade keeps exactly `connection: upgrade`"
        );
    } else if !upgrade {
        assert!(conn.is_empty(), "connection survived: {conn:?}");
        assert!(!after.contains_key("upgrade"), "upgrade survived");
    }
    let te: Vec<_> = after.get_all("te").iter().collect();
    assert!(te.is_empty() || te == ["trailers"], "te: {te:?}");

    let named = connection_named(before);
    for n in &named {
        if upgrade && (n == "upgrade" || n == "connection") {
            continue;
        }
        assert!(
            !after.contains_key(n),
            "{n} survived although Connection named it"
        );
    }
    // Everything else is left alone.
    let scrubbed = |n: &HeaderName| {
        ALWAYS_GONE.contains(&n.as_str())
            || norm(n).starts_with("x-envoy-")
            || norm(n).starts_with("x-remora-")
            || n == "http2-settings"
            || rule_hit(n)
            || named.contains(n)
            || n == "connection"
            || n == "upgrade"
            || n == "te"
    };
    for n in before.keys() {
        if scrubbed(n) {
            continue;
        }
        let a: Vec<_> = before.get_all(n).iter().collect();
        let b: Vec<_> = after.get_all(n).iter().collect();
        assert_eq!(a, b, "{n} was changed");
    }
    for n in after.keys() {
        // A 101 response gets `connection: upgrade` whether or not it had a Connection header.
        if upgrade && n == "connection" {
            continue;
        }
        assert!(before.contains_key(n), "{n} appeared from nowhere");
    }
}

fuzz_target!(|input: Input| {
    let mut rules: Vec<String> = vec!["x-envoy-*".into(), "x-remora-*".into()];
    rules.extend(input.extra_rules.iter().take(4).cloned());
    let scrub = Rules::new(&rules);
    // Only entries Rules::new keeps: prefixes, and exact names that are valid header names.
    let kept: Vec<String> = rules
        .iter()
        .filter(|r| {
            let l = r.to_ascii_lowercase();
            l.ends_with('*') || HeaderName::from_bytes(l.as_bytes()).is_ok()
        })
        .cloned()
        .collect();

    let mut headers = HeaderMap::new();
    for (n, v) in input.headers.iter().take(32) {
        if let (Some(n), Some(v)) = (name(n), value(v)) {
            headers.append(n, v);
        }
    }
    let before = headers.clone();
    if input.response {
        let status = StatusCode::from_u16(100 + input.status % 500).unwrap();
        let mut rsp = Response::new(());
        *rsp.status_mut() = status;
        *rsp.headers_mut() = headers;
        scrub.response(&mut rsp);
        let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
        check(&before, rsp.headers(), upgrade, &kept);
    } else {
        let mut req = Request::new(());
        *req.version_mut() = if input.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = headers;
        let upgrade = scrub.request(&mut req);
        if upgrade {
            assert!(!input.http2, "no upgrade over HTTP/2");
            assert!(before.contains_key("upgrade"));
        }
        check(&before, req.headers(), upgrade, &kept);
    }
});

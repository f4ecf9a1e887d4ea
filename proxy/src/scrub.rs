//! Header scrubbing, as a tower layer: hop-by-hop headers (RFC 9110 §7.6.1) in both directions,
//! internal headers (`x-envoy-*`, `x-remora-*`, configurable) in both directions, and the peer
//! identity header always removed from what arrives so no client can spoof it.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

/// A response body: the upstream's, streamed through (scrubbed, and under the idle watchdog
/// when the destination's policy has one), or one the proxy wrote itself.
pub type Body = http_body_util::Either<crate::idle::Streamed, http_body_util::Full<bytes::Bytes>>;

/// Remora's peer identity header (contract): set only from a verified client certificate.
pub const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-remora-client-id");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// `Upgrade` names exactly one protocol, WebSocket (any version suffix).
fn is_websocket(headers: &HeaderMap) -> bool {
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim);
    matches!(
        (protocols.next(), protocols.next()),
        (Some(p), None) if p.eq_ignore_ascii_case("websocket")
            || p.get(..10).is_some_and(|h| h.eq_ignore_ascii_case("websocket/"))
    )
}

/// What to strip besides hop-by-hop headers.
#[derive(Debug, Default)]
pub struct Rules {
    exact: Vec<HeaderName>,
    prefixes: Vec<String>,
    /// First bytes that no rule, nor the identity header, starts with (a bit per byte): a
    /// name starting with one is kept without comparing it to each rule, which most names
    /// are. None set (`Default`) compares every name.
    cannot_start: [u64; 4],
}

impl Rules {
    /// `list` entries are header names, or prefixes ending in `*`. Invalid names are skipped
    /// (config validation reports them first).
    pub fn new(list: &[String]) -> Self {
        let mut rules = Rules::default();
        for item in list {
            let lower = item.to_ascii_lowercase();
            match lower.strip_suffix('*') {
                Some(prefix) => rules.prefixes.push(prefix.to_string()),
                None => {
                    if let Ok(n) = HeaderName::from_bytes(lower.as_bytes()) {
                        rules.exact.push(n);
                    }
                }
            }
        }
        let mut starts = [false; 256];
        let id = CLIENT_ID_HEADER;
        let firsts = std::iter::once(id.as_str())
            .chain(rules.exact.iter().map(|e| e.as_str()))
            .chain(rules.prefixes.iter().map(String::as_str));
        for rule in firsts {
            match rule.as_bytes().first() {
                Some(&b) => starts[usize::from(b)] = true,
                // An empty prefix (`*`) matches every name.
                None => starts = [true; 256],
            }
        }
        for (b, starts) in starts.iter().enumerate() {
            if !starts {
                rules.cannot_start[b / 64] |= 1 << (b % 64);
            }
        }
        rules
    }

    fn cannot_start_with(&self, b: u8) -> bool {
        self.cannot_start[usize::from(b / 64)] & (1 << (b % 64)) != 0
    }

    /// Scrubs a request arriving at the proxy. Returns true when it asks for a protocol upgrade
    /// (then `Connection: upgrade` and `Upgrade` are kept for the upstream).
    pub fn request<B>(&self, req: &mut Request<B>) -> bool {
        // Only WebSocket may turn a connection into a byte stream. h2c above all must not: the
        // app would then speak HTTP/2 on a connection the proxy no longer parses, and every
        // later stream on it would skip scrubbing and identity. Any other Upgrade is dropped
        // and the request goes on as a plain request.
        // One pass over the names first: most requests have no hop-by-hop field at all, and
        // then neither the upgrade check nor a removal needs a hashed lookup.
        let hop = req.headers().keys().any(is_hop_by_hop);
        let upgrade = hop
            && req.version() < http::Version::HTTP_2
            && connection_has(req.headers(), "upgrade")
            && is_websocket(req.headers());
        if hop {
            strip_hop_by_hop(req.headers_mut(), upgrade);
        }
        self.internal(req.headers_mut());
        // Always, whatever the configured list says: nobody may forge the peer identity.
        if req.headers().contains_key(&CLIENT_ID_HEADER) {
            req.headers_mut().remove(&CLIENT_ID_HEADER);
        }
        upgrade
    }

    /// Scrubs a response on its way back to the client.
    pub fn response<B>(&self, rsp: &mut Response<B>) {
        let upgrade = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
        hop_by_hop(rsp.headers_mut(), upgrade);
        self.internal(rsp.headers_mut());
    }

    /// True when `name` is stripped: by the list, or always (the peer identity). Names with
    /// `_` are judged as if it were `-`: CGI/WSGI servers map both to `HTTP_X_REMORA_CLIENT_ID`,
    /// so `x_remora_client_id` would otherwise be a forgery (found in review).
    fn doomed(&self, name: &HeaderName) -> bool {
        let matches = |n: &str| {
            n == CLIENT_ID_HEADER.as_str()
                || self.exact.iter().any(|e| e.as_str() == n)
                || self.prefixes.iter().any(|p| n.starts_with(p.as_str()))
        };
        let n = name.as_str();
        // Both comparisons below need the name's first byte (`_` read as `-` in the second)
        // to start some rule.
        if let Some(&b) = n.as_bytes().first()
            && self.cannot_start_with(b)
            && (b != b'_' || self.cannot_start_with(b'-'))
        {
            return false;
        }
        matches(n) || (n.contains('_') && matches(&n.replace('_', "-")))
    }

    fn internal(&self, headers: &mut HeaderMap) {
        // One pass over the names; allocates only when something matches.
        if !headers.keys().any(|k| self.doomed(k)) {
            return;
        }
        let doomed: Vec<HeaderName> = headers.keys().filter(|k| self.doomed(k)).cloned().collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True when `name` is one of the fixed hop-by-hop headers (those named by `Connection` are
/// found through `Connection` itself), or `HTTP2-Settings` (only ever part of an h2c upgrade,
/// which never crosses the proxy).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == HTTP2_SETTINGS
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::UPGRADE
}

fn hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The common case has none of them: one pass over the names instead of a hashed removal
    // per hop-by-hop header (profiling showed scrubbing at ~5 % of the proxy's CPU).
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    strip_hop_by_hop(headers, upgrade);
}

/// Removes the hop-by-hop fields, keeping `Connection: upgrade` and `Upgrade` for `upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    headers.remove(&HTTP2_SETTINGS);
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !(upgrade && t.eq_ignore_ascii_case("upgrade")))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::PROXY_AUTHENTICATE);
    // Each hop frames its own body; hyper sets Transfer-Encoding again where it is needed.
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE) {
        let trailers = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        headers.remove(header::TE);
        // gRPC servers require `te: trailers`; it is the one TE value that may cross.
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

impl Rules {
    /// Scrubs trailers (HTTP/1 chunked trailers, HTTP/2 trailing HEADERS), either way: the
    /// same internal and identity headers as a head, which a trailer could otherwise smuggle.
    pub fn trailers(&self, trailers: &mut HeaderMap) {
        hop_by_hop(trailers, false);
        self.internal(trailers);
        trailers.remove(&CLIENT_ID_HEADER);
    }
}

/// A body passed through the proxy (request or response) whose trailers are scrubbed.
pub struct Scrubbed {
    inner: Incoming,
    rules: Arc<Rules>,
    /// An outbound request body under an idle timeout: each frame counts as activity of its
    /// exchange (a client still uploading keeps the stream alive). `None` otherwise, which
    /// costs one branch per frame and no allocation.
    activity: Option<Arc<crate::idle::Activity>>,
}

impl Scrubbed {
    pub fn new(inner: Incoming, rules: Arc<Rules>) -> Self {
        Scrubbed {
            inner,
            rules,
            activity: None,
        }
    }

    /// Makes every frame of this body count as activity of its exchange.
    pub(crate) fn count_activity(&mut self, activity: Arc<crate::idle::Activity>) {
        self.activity = Some(activity);
    }
}

impl http_body::Body for Scrubbed {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        if let (Some(activity), Some(Ok(_))) = (&this.activity, &frame) {
            activity.touch();
        }
        Poll::Ready(frame.map(|f| {
            f.map(|f| match f.into_trailers() {
                Ok(mut t) => {
                    this.rules.trailers(&mut t);
                    http_body::Frame::trailers(t)
                }
                Err(f) => f,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The scrubbing layer around the forwarder.
#[derive(Clone)]
pub struct Scrub<S> {
    inner: S,
    rules: Arc<Rules>,
    /// The connection's verified peer identity, set after the spoofable one is stripped.
    client_id: Option<HeaderValue>,
}

impl<S> Scrub<S> {
    pub fn new(inner: S, rules: Arc<Rules>, client_id: Option<HeaderValue>) -> Self {
        Scrub {
            inner,
            rules,
            client_id,
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for Scrub<S>
where
    S: tower::Service<Request<Scrubbed>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ScrubFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let upgrade = self.rules.request(&mut req);
        if let Some(id) = &self.client_id {
            req.headers_mut().insert(CLIENT_ID_HEADER, id.clone());
        }
        let rules = self.rules.clone();
        ScrubFuture {
            inner: self.inner.call(req.map(|b| Scrubbed::new(b, rules))),
            rules: self.rules.clone(),
            upgrade,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ScrubFuture<F> {
        #[pin]
        inner: F,
        rules: Arc<Rules>,
        upgrade: bool,
    }
}

impl<F, E> std::future::Future for ScrubFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut rsp = std::task::ready!(this.inner.poll(cx))?;
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS && !*this.upgrade {
            // The app switched protocols unasked (the proxy forwarded no Upgrade): nothing
            // after this could be parsed, so it must not reach the client as a tunnel.
            tracing::info!(
                "the app answered 101 to a request without an allowed Upgrade; answering 502"
            );
            return Poll::Ready(Ok(crate::respond::local_response(
                StatusCode::BAD_GATEWAY,
                false,
                "the app switched protocols without an Upgrade the proxy allows (WebSocket only)",
            )
            .map(http_body_util::Either::Right)));
        }
        this.rules.response(&mut rsp);
        Poll::Ready(Ok(rsp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_internal() {
        let rules = Rules::new(&["x-envoy-*".into(), "x-remora-*".into(), "x-debug".into()]);
        let mut req = Request::builder()
            .header("connection", "keep-alive, x-foo")
            .header("x-foo", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "gzip, trailers")
            .header("upgrade", "h2c")
            .header("x-envoy-upstream-service-time", "3")
            .header("x-remora-client-id", "spiffe://evil")
            .header("x_remora_client_id", "spiffe://evil")
            .header("X_Envoy_Original_Path", "/x")
            .header("x-debug", "1")
            .header("x-kept", "1")
            .body(())
            .unwrap();
        assert!(!rules.request(&mut req));
        let h = req.headers();
        for gone in [
            "connection",
            "x-foo",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "x-envoy-upstream-service-time",
            "x-remora-client-id",
            "x_remora_client_id",
            "x_envoy_original_path",
            "x-debug",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn strips_each_hop_by_hop_field_even_alone_both_ways() {
        // Each on its own, without a `Connection` naming it: the one-pass check must still
        // catch it (`HTTP2-Settings` was once removed unconditionally, outside that check).
        let rules = Rules::new(&[]);
        for (name, value) in [
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-authenticate", "Basic"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
        ] {
            let mut req = Request::builder()
                .header(name, value)
                .header("x-kept", "1")
                .body(())
                .unwrap();
            assert!(!rules.request(&mut req), "{name}: no upgrade");
            assert!(
                !req.headers().contains_key(name),
                "{name} survived a request"
            );
            assert_eq!(req.headers()["x-kept"], "1");
            let mut rsp = Response::builder()
                .header(name, value)
                .header("x-kept", "1")
                .body(())
                .unwrap();
            rules.response(&mut rsp);
            assert!(
                !rsp.headers().contains_key(name),
                "{name} survived a response"
            );
            assert_eq!(rsp.headers()["x-kept"], "1");
        }
    }

    #[test]
    fn the_first_byte_shortcut_strips_exactly_what_the_full_comparison_does() {
        // The full comparison, as `doomed` makes it without the shortcut.
        fn reference(rules: &Rules, n: &str) -> bool {
            let matches = |n: &str| {
                n == CLIENT_ID_HEADER.as_str()
                    || rules.exact.iter().any(|e| e.as_str() == n)
                    || rules.prefixes.iter().any(|p| n.starts_with(p.as_str()))
            };
            matches(n) || (n.contains('_') && matches(&n.replace('_', "-")))
        }
        let lists: [&[&str]; 7] = [
            &[],
            &["-dash*"],
            &["x-envoy-*", "x-remora-*", "x-debug"],
            &["l5d-*", "server", "_odd", "-dash*"],
            &["*"],
            &["a*", "b_c", "Z-Upper"],
            &["x_under*", "y-"],
        ];
        let names = [
            "x-remora-client-id",
            "x_remora_client_id",
            "x_remora-client_id",
            "x-remora-anything",
            "x-envoy-upstream",
            "x_envoy_original_path",
            "x-debug",
            "x_debug",
            "l5d-dst",
            "l5d_dst",
            "server",
            "_odd",
            "-odd",
            "-dash-x",
            "_dash_x",
            "abc",
            "b_c",
            "b-c",
            "z-upper",
            "x_under_score",
            "x-under-score",
            "y-",
            "y_",
            "host",
            "user-agent",
            "content-type",
            "accept",
            "1a",
            "~tilde",
        ];
        for list in lists {
            let owned: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            for rules in [Rules::new(&owned), Rules::default()] {
                for n in names {
                    let name = HeaderName::from_bytes(n.as_bytes()).unwrap();
                    assert_eq!(
                        rules.doomed(&name),
                        reference(&rules, name.as_str()),
                        "{n} with {list:?}"
                    );
                }
            }
        }
        // The identity header goes whatever the list, in every spelling.
        for rules in [Rules::new(&[]), Rules::default()] {
            for n in [
                "x-remora-client-id",
                "x_remora_client_id",
                "x-remora_client-id",
            ] {
                assert!(
                    rules.doomed(&HeaderName::from_bytes(n.as_bytes()).unwrap()),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn keeps_websocket_upgrade() {
        let rules = Rules::new(&[]);
        let mut req = Request::builder()
            .header("connection", "Upgrade, keep-alive")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(rules.request(&mut req));
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["connection"], "upgrade");
    }
}

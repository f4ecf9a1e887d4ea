//! Protocol detection: HTTP/2 prior knowledge, HTTP/1.x, or opaque TCP.
//!
//! Reads at most [`MAX_DETECT_BYTES`] from a fresh connection and classifies it. The bytes read
//! are handed back so they can be replayed in front of the stream ([`crate::io::ProxyIo`]).

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::tls::{Hello, client_hello};

/// A ClientHello is read whole (to learn its server name), up to one TLS record.
pub const MAX_HELLO_BYTES: usize = 5 + 16 * 1024 + 256;

/// Detection never buffers more than this; a request line longer than this that still looks
/// like HTTP/1 is handed to the HTTP/1 server, which has its own limits.
pub const MAX_DETECT_BYTES: usize = 4096;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What detection saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    /// A protocol, decided from the bytes read. `Opaque` means provably not HTTP: the first
    /// bytes are not a method token followed by a space.
    Protocol(Protocol),
    /// Starts like an HTTP/1 request (a token and a space) but fails the strict parse. Lenient
    /// app servers accept much of this (a double space, a leading CRLF, `HTTP/1.2`, no
    /// version), so it must never reach the app as opaque bytes that skip scrubbing: refused.
    Malformed,
    /// The client sent nothing within the timeout: a server-speaks-first protocol on a port not
    /// listed as opaque. Treated as opaque so the server can speak.
    Idle,
    /// The client started something HTTP-shaped and stalled (slowloris): the connection is closed.
    Stalled,
    /// The client closed before sending anything.
    Closed,
    /// A TLS ClientHello, with the server name it asks for.
    Tls { sni: Option<String> },
    /// A TLS handshake record that stalled, ended or was malformed before a whole ClientHello.
    BadHello,
}

/// Reads from `io` until the protocol is known, the timeout passes, or the buffer is full.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    detect_after(io, timeout, Vec::new()).await
}

/// [`detect`], continuing from bytes already read from `io` (`initial`, at most
/// [`MAX_DETECT_BYTES`]).
pub async fn detect_after<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
    initial: Vec<u8>,
) -> std::io::Result<(Detected, Bytes)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut n = initial.len();
    let mut buf = initial;
    buf.resize(MAX_DETECT_BYTES.max(n), 0);
    if n > 0
        && buf[0] != 0x16
        && let Some(d) = decide(&buf[..n], n >= MAX_DETECT_BYTES)
    {
        buf.truncate(n);
        return Ok((d, Bytes::from(buf)));
    }
    let detected = loop {
        if n > 0 && buf[0] == 0x16 {
            match client_hello(&buf[..n]) {
                Hello::Complete { sni } => break Detected::Tls { sni },
                Hello::Malformed => break Detected::BadHello,
                Hello::Partial if n == buf.len() && buf.len() < MAX_HELLO_BYTES => {
                    buf.resize(MAX_HELLO_BYTES, 0)
                }
                Hello::Partial if n == buf.len() => break Detected::BadHello,
                Hello::Partial => {}
            }
        }
        match tokio::time::timeout_at(deadline, io.read(&mut buf[n..])).await {
            Err(_elapsed) if n == 0 => break Detected::Idle,
            Err(_elapsed) if buf[0] == 0x16 => break Detected::BadHello,
            Err(_elapsed) => break Detected::Stalled,
            Ok(Ok(0)) if n == 0 => break Detected::Closed,
            Ok(Ok(0)) if buf[0] == 0x16 => break Detected::BadHello,
            // EOF after a partial prefix: not a complete HTTP request. Bytes that could still be
            // HTTP to a lenient server are refused; anything else goes on as opaque data.
            Ok(Ok(0)) => match http_like(&buf[..n]) {
                Like::No => break Detected::Protocol(Protocol::Opaque),
                Like::Yes | Like::Partial => break Detected::Malformed,
            },
            Ok(Ok(read)) => {
                n += read;
                if buf[0] == 0x16 {
                    continue;
                }
                if let Some(d) = decide(&buf[..n], n == MAX_DETECT_BYTES) {
                    break d;
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    };
    buf.truncate(n);
    Ok((detected, Bytes::from(buf)))
}

/// What `buf` (not TLS) says, or `None` for more bytes; `full` when no more fit.
fn decide(buf: &[u8], full: bool) -> Option<Detected> {
    match classify(buf) {
        Some(Class::Protocol(p)) => Some(Detected::Protocol(p)),
        Some(Class::Malformed) => Some(Detected::Malformed),
        // Still a consistent HTTP/1 prefix at the cap: let the HTTP/1 server judge.
        None if full => Some(Detected::Protocol(Protocol::Http1)),
        None => None,
    }
}

/// What a connection's first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Protocol(Protocol),
    /// HTTP-like, but not a request line that passes the strict parse.
    Malformed,
}

/// Classifies a connection's first bytes; `None` means more bytes are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Class> {
    if buf.len() >= H2_PREFACE.len() && &buf[..H2_PREFACE.len()] == H2_PREFACE {
        return Some(Class::Protocol(Protocol::Http2));
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    match http1_request_line(buf) {
        Line::Complete => Some(Class::Protocol(Protocol::Http1)),
        Line::Partial => None,
        Line::Invalid => match http_like(buf) {
            Like::No => Some(Class::Protocol(Protocol::Opaque)),
            Like::Yes => Some(Class::Malformed),
            // A short token with no space yet, or a leading run of white space, e.g. `GET`
            // arriving alone: wait for the rest.
            Like::Partial => None,
        },
    }
}

enum Like {
    Yes,
    No,
    Partial,
}

/// White space as the most lenient HTTP/1 parsers split a request line on: Python's
/// `str.split()` over the latin-1 line (http.server, wsgiref) splits on all of these, so
/// `\x0cGET\x0b/\xa0HTTP/1.1` is a request there (found in review).
fn is_lenient_ws(b: u8) -> bool {
    matches!(
        b,
        b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f | b' ' | 0x85 | 0xa0
    )
}

/// Could a lenient HTTP/1 server take these bytes for a request? Optional leading white space,
/// a method-like token, white space, then anything on the same line (a target). That is what
/// every HTTP/1 parser needs at the least (HTTP/0.9's `GET /a` included). A one-word line
/// (`PING\r\n`, RESP's `*1\r\n`) is no request line anywhere, and binary framing starts with
/// a byte outside the token and white-space sets (`\x00`, `\x16`...).
fn http_like(buf: &[u8]) -> Like {
    // Judged on the first bytes only, so that the answer never depends on how many bytes
    // arrived (found by fuzzing: 64 token bytes were refused in small reads but passed as
    // opaque in one read when a non-token byte followed). Undecided after them: refused.
    const WINDOW: usize = 64;
    let buf = &buf[..buf.len().min(WINDOW)];
    let undecided = if buf.len() == WINDOW {
        Like::Yes
    } else {
        Like::Partial
    };
    let ws = buf.iter().take_while(|b| is_lenient_ws(**b)).count();
    let rest = &buf[ws..];
    let token = rest.iter().take_while(|b| is_tchar(**b)).count();
    if token == 0 {
        return if rest.is_empty() { undecided } else { Like::No };
    }
    let rest = &rest[token..];
    let gap = rest
        .iter()
        .take_while(|b| is_lenient_ws(**b) && **b != b'\n')
        .count();
    match (gap, rest.get(gap)) {
        (_, None) => undecided,
        // The line ended after one word.
        (_, Some(b'\n')) => Like::No,
        (0, Some(_)) => Like::No,
        (_, Some(_)) => Like::Yes,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

enum Line {
    Complete,
    Partial,
    Invalid,
}

/// Checks `METHOD SP request-target SP HTTP/1.x CRLF` byte by byte, so a prefix of it is
/// recognised as `Partial` and anything that strays from it as `Invalid` at once.
fn http1_request_line(buf: &[u8]) -> Line {
    const VERSION: &[u8] = b"HTTP/1.";
    enum S {
        Method(usize),
        Target(usize),
        Version(usize),
        Cr,
        Lf,
    }
    let mut s = S::Method(0);
    for &b in buf {
        s = match s {
            S::Method(n) if b == b' ' && n > 0 => S::Target(0),
            // Any token (RFC 9110 tchar), not just upper-case: a lenient app server would accept
            // `get / HTTP/1.1`, and an HTTP request must never bypass the HTTP stack (scrubbing).
            S::Method(n) if n < 24 && is_tchar(b) => S::Method(n + 1),
            S::Target(n) if b == b' ' && n > 0 => S::Version(0),
            S::Target(n) if (0x21..0x7f).contains(&b) => S::Target(n + 1),
            S::Version(n) if n < VERSION.len() && b == VERSION[n] => S::Version(n + 1),
            S::Version(n) if n == VERSION.len() && (b == b'0' || b == b'1') => S::Cr,
            S::Cr if b == b'\r' => S::Lf,
            S::Cr | S::Lf if b == b'\n' => return Line::Complete,
            _ => return Line::Invalid,
        };
    }
    Line::Partial
}

impl From<Protocol> for crate::metrics::ProtocolLabel {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Http1 => crate::metrics::ProtocolLabel::Http1,
            Protocol::Http2 => crate::metrics::ProtocolLabel::Http2,
            Protocol::Opaque => crate::metrics::ProtocolLabel::Opaque,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        use Class::Malformed as M;
        let p = |p| Some(Class::Protocol(p));
        let (h1, h2, opaque) = (p(Protocol::Http1), p(Protocol::Http2), p(Protocol::Opaque));
        let table: &[(&[u8], Option<Class>)] = &[
            (H2_PREFACE, h2),
            (&H2_PREFACE[..10], None),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h1),
            (b"GET http://a:80/x HTTP/1.0\n", h1),
            (b"CONNECT a:80 HTTP/1.1\r\n", h1),
            (b"GET /", None),
            (b"P", None),
            (b"GET", None),
            (b"\r\n", None),
            (b"PRI * HTTP/1.1\r\n", h1),
            (b"get / HTTP/1.1\r\n", h1),
            // Provably not HTTP: no token-and-space start.
            (b"hello\n", opaque),
            (b"PING\r\n", opaque),
            (b"*1\r\n$4\r\nPING\r\n", opaque),
            (b"\x16\x03\x01\x02\x00", opaque),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", opaque),
            // What lenient servers (Node, Python's http.server) parse as requests: refused.
            (b"GET  / HTTP/1.1\r\n", Some(M)),
            (b"\r\nGET / HTTP/1.1\r\n", Some(M)),
            (b"GET /a\r\n", Some(M)),
            (b"GET\t/ HTTP/1.1\r\n", Some(M)),
            (b"GET / HTTP/1.1 \r\n", Some(M)),
            (b"GET / HTTP/1.2\r\n", Some(M)),
            (b"GET / HTTP/2.0\r\n", Some(M)),
            (b"GET /\xc3\xa9 HTTP/1.1\r\n", Some(M)),
            (b"hello world\n", Some(M)),
            (&[b' '; 100], Some(M)),
            // Review findings: Python splits on these, so they are HTTP-like.
            (b"\x0cGET / HTTP/1.1\r\n", Some(M)),
            (b"\x0bGET / HTTP/1.1\r\n", Some(M)),
            (b"\x1fGET / HTTP/1.1\r\n", Some(M)),
            (b"GET\x0c/\x0cHTTP/1.1\r\n", Some(M)),
            (b"GET\x85/\x85HTTP/1.1\r\n", Some(M)),
            (b"GET\xa0/\xa0HTTP/1.1\r\n", Some(M)),
            (b"GET\x1d/\x1eHTTP/1.1\r\n", Some(M)),
            (b"GET\r/\rHTTP/1.1\r\n", Some(M)),
            // One-word lines and binary framing stay opaque.
            (b"PING\r\n", opaque),
            (b"*1\r\n", opaque),
            (
                b"\x00\x00\x00\x45\x00\x03\x00\x09\x00\x00\x00\x01\x00\x0aconsumer-1\x00",
                opaque,
            ),
            // Fuzzer finding: the decision at 64 bytes holds whatever follows.
            (&[b'A'; 64], Some(M)),
            (
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@",
                Some(M),
            ),
        ];
        for (bytes, want) in table {
            assert_eq!(
                classify(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    use std::sync::Arc;
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A client that writes `parts`, each after its delay, then holds the connection open
    /// (or closes it, with `close`); detection runs on the other end. Returns what detection
    /// said, the bytes it handed back, and how long it took on the (paused) clock.
    async fn run(parts: &[(Duration, &[u8])], close: bool) -> (Detected, Bytes, Duration) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let parts: Vec<(Duration, Vec<u8>)> = parts.iter().map(|(d, b)| (*d, b.to_vec())).collect();
        let writer = tokio::spawn(async move {
            for (delay, bytes) in parts {
                tokio::time::sleep(delay).await;
                client.write_all(&bytes).await.unwrap();
            }
            if close {
                drop(client);
                None
            } else {
                Some(client)
            }
        });
        let started = Instant::now();
        let (d, bytes) = detect(&mut server, TIMEOUT).await.unwrap();
        let took = started.elapsed();
        // Keeps the client's end open until detection is done.
        let _client: Option<DuplexStream> = writer.await.unwrap();
        (d, bytes, took)
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test(start_paused = true)]
    async fn silence_is_idle_at_exactly_the_timeout() {
        let (d, bytes, took) = run(&[], false).await;
        assert_eq!(d, Detected::Idle);
        assert!(bytes.is_empty());
        assert_eq!(took, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_line_in_two_parts_is_http1() {
        let rest: &[u8] = b"ex.html HTTP/1.1\r\nHost: a\r\n\r\n";
        let (d, bytes, took) =
            run(&[(NOW, b"GET /ind"), (Duration::from_secs(2), rest)], false).await;
        assert_eq!(d, Detected::Protocol(Protocol::Http1));
        assert_eq!(&bytes[..], b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(took, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_counts_from_the_start_not_from_the_last_byte() {
        // A byte every 4 s keeps no connection in detection past the timeout (slowloris).
        let step = Duration::from_secs(4);
        let (d, bytes, took) = run(
            &[(NOW, b"G"), (step, b"E"), (step, b"T"), (step, b" ")],
            false,
        )
        .await;
        assert_eq!(d, Detected::Stalled);
        assert_eq!(&bytes[..], b"GET");
        assert_eq!(took, TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_h2_preface_in_pieces_is_http2() {
        let (d, bytes, took) = run(
            &[
                (NOW, &H2_PREFACE[..5]),
                (Duration::from_millis(300), &H2_PREFACE[5..]),
            ],
            false,
        )
        .await;
        assert_eq!(d, Detected::Protocol(Protocol::Http2));
        assert_eq!(&bytes[..], H2_PREFACE);
        assert_eq!(took, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn endings_before_a_decision() {
        let (d, _, took) = run(&[], true).await;
        assert_eq!((d, took), (Detected::Closed, NOW));
        // HTTP-shaped, then the end: refused, since a lenient server could take it.
        let (d, bytes, _) = run(&[(NOW, b"GET /a")], true).await;
        assert_eq!(d, Detected::Malformed);
        assert_eq!(&bytes[..], b"GET /a");
        // Binary, then the end: opaque bytes.
        let (d, _, _) = run(&[(NOW, b"\x00\x01")], true).await;
        assert_eq!(d, Detected::Protocol(Protocol::Opaque));
        // Not HTTP-shaped as soon as the first bytes arrive: decided without waiting.
        let (d, _, took) = run(&[(NOW, b"PING\r\n")], false).await;
        assert_eq!((d, took), (Detected::Protocol(Protocol::Opaque), NOW));
    }

    fn client_hello_bytes() -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("web.default.sa.mesh").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        buf
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_hello_in_pieces_is_read_whole() {
        let hello = client_hello_bytes();
        let (d, bytes, took) = run(
            &[
                (NOW, &hello[..3]),
                (Duration::from_secs(1), &hello[3..40]),
                (Duration::from_secs(1), &hello[40..]),
            ],
            false,
        )
        .await;
        assert_eq!(
            d,
            Detected::Tls {
                sni: Some("web.default.sa.mesh".into())
            }
        );
        assert_eq!(&bytes[..], &hello[..]);
        assert_eq!(took, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_hello_that_stalls_or_ends_is_bad() {
        let hello = client_hello_bytes();
        let (d, bytes, took) = run(&[(NOW, &hello[..hello.len() - 1])], false).await;
        assert_eq!((d, took), (Detected::BadHello, TIMEOUT));
        assert_eq!(bytes.len(), hello.len() - 1);
        let (d, _, _) = run(&[(NOW, &hello[..20])], true).await;
        assert_eq!(d, Detected::BadHello);
    }

    #[tokio::test(start_paused = true)]
    async fn detection_continues_from_bytes_already_read() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        // Decided by what was read before: nothing more is read.
        let (d, bytes) = detect_after(&mut server, TIMEOUT, b"GET / HTTP/1.1\r\n".to_vec())
            .await
            .unwrap();
        assert_eq!(d, Detected::Protocol(Protocol::Http1));
        assert_eq!(&bytes[..], b"GET / HTTP/1.1\r\n");
        // Undecided: the rest comes from the stream.
        client.write_all(b" / HTTP/1.0\r\n").await.unwrap();
        let (d, bytes) = detect_after(&mut server, TIMEOUT, b"GET".to_vec())
            .await
            .unwrap();
        assert_eq!(d, Detected::Protocol(Protocol::Http1));
        assert_eq!(&bytes[..], b"GET / HTTP/1.0\r\n");
    }
}

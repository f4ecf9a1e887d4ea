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
    /// A protocol, decided from the bytes read.
    Protocol(Protocol),
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
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_DETECT_BYTES];
    let mut n = 0;
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
            // EOF after a partial prefix: whatever it is, it is not a complete HTTP request, so
            // hand the bytes (and the half-close) to the app as opaque data.
            Ok(Ok(0)) => break Detected::Protocol(Protocol::Opaque),
            Ok(Ok(read)) => {
                n += read;
                if buf[0] == 0x16 {
                    continue;
                }
                match classify(&buf[..n]) {
                    Some(p) => break Detected::Protocol(p),
                    // Still a consistent HTTP/1 prefix at the cap: let the HTTP/1 server judge.
                    None if n == MAX_DETECT_BYTES => break Detected::Protocol(Protocol::Http1),
                    None => {}
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    };
    buf.truncate(n);
    Ok((detected, Bytes::from(buf)))
}

/// Classifies a connection's first bytes; `None` means more bytes are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.len() >= H2_PREFACE.len() && &buf[..H2_PREFACE.len()] == H2_PREFACE {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(buf) {
        return None;
    }
    match http1_request_line(buf) {
        Line::Complete => Some(Protocol::Http1),
        Line::Partial => None,
        Line::Invalid => Some(Protocol::Opaque),
    }
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
            S::Method(n)
                if n < 24 && (b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
            {
                S::Method(n + 1)
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"GET http://a:80/x HTTP/1.0\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"CONNECT a:80 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET /"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"hello\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"hello world\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET  / HTTP/1.1\r\n"), Some(Protocol::Opaque));
    }
}

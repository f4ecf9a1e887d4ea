//! Two helper roles the harness runs as child processes (pinned to the load CPU):
//!
//! - `benches backend PORT`: an HTTP/1.1 + HTTP/2 backend (hyper): `GET /small` → 128 bytes,
//!   `GET /slow` → 128 bytes after 1 s (to hold streams open), and any gRPC `POST` → its request
//!   echoed with `grpc-status: 0` in trailers.
//! - `benches grpc-load ADDR AUTHORITY RPS SECS [CONNS [grpc|h2c]]`: an open-loop load generator
//!   at a fixed rate over CONNS HTTP/2 connections (1 by default; request i goes to connection
//!   i mod CONNS), gRPC unary calls by default or, with `h2c`, `GET /small` (128-byte answers).
//!   Requests are sent on schedule whether or not earlier ones have answered, so queueing shows
//!   up in the latency. The first half second is a warm-up, not counted. Prints
//!   `ok errors p50_us p99_us p999_us sent`, `sent` being every request sent, the warm-up's
//!   included (what the proxy served while its CPU was read). h2load reports no percentiles,
//!   hence this.
//! - `benches idle-conns ADDR AUTHORITY N`: opens N HTTP/2 connections one after the other, each
//!   through the preface and the SETTINGS exchange (both sides acknowledged) and one `GET /small`
//!   answered in full, and keeps them open and idle. Prints `opened N_OPEN failed N_FAILED` once
//!   all are open (it gives up after three failures in a row: a proxy at its connection limit),
//!   then waits for a line (or the end) on its standard input, prints `held N_STILL_OPEN` (the
//!   connections the proxy has not closed meanwhile) and exits, closing them all.
//! - `benches grpc-closed ADDR AUTHORITY STREAMS WARMUP_MS DURATION_MS`: a closed-loop gRPC
//!   unary load generator on one HTTP/2 connection: STREAMS calls are always in flight (each
//!   stream sends its next call when the last one has answered), for WARMUP_MS uncounted and
//!   then DURATION_MS counted (calls started in that window), printing
//!   `ok errors p50_us p99_us p999_us max_us`. A call that has not answered in 10 s counts as an
//!   error; a closed connection ends the run with an error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

const SMALL: &[u8] = &[b'x'; 128];

async fn handle(
    req: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let msg = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Full::new(msg)
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let mut rsp = Response::new(body);
        rsp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(rsp);
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Response::new(Full::new(Bytes::from_static(SMALL)).boxed()))
}

pub fn backend(port: u16) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                b.http2().max_concurrent_streams(10_000);
                b.http1().keep_alive(true);
                let _ = b
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle))
                    .await;
            });
        }
    })
}

fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// What the fixed-rate generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// gRPC unary calls (`POST /bench.Echo/Unary`, a 64-byte message), ok when `grpc-status: 0`.
    Grpc,
    /// `GET /small` over h2c, ok when the status is 200 and the body arrives.
    H2c,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Kind::Grpc),
            "h2c" => Ok(Kind::H2c),
            other => Err(format!("unknown load kind `{other}` (grpc or h2c)")),
        }
    }
}

/// The open-loop generator: `rps` requests a second for `secs` seconds (plus a half-second
/// warm-up) over `conns` HTTP/2 connections, round robin.
pub fn rate_load(
    addr: SocketAddr,
    authority: &str,
    rps: u64,
    secs: u64,
    conns: usize,
    kind: Kind,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let authority = authority.to_string();
    let warmup = rps / 2; // the first half second is not counted
    let total = rps * secs + warmup;
    let (ok, errors, mut lat) = rt.block_on(async move {
        let mut senders = Vec::with_capacity(conns.max(1));
        for _ in 0..conns.max(1) {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_reset_streams(1024)
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            senders.push(sender);
        }
        let body = frame(&[7u8; 64]);
        let results = Arc::new(Mutex::new((
            0u64,
            0u64,
            Vec::with_capacity((rps * secs) as usize),
        )));
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rps.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            tick.tick().await;
            let mut s = senders[i as usize % senders.len()].clone();
            let results = results.clone();
            let req = match kind {
                Kind::Grpc => Request::post(format!("http://{authority}/bench.Echo/Unary"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(body.clone())),
                Kind::H2c => {
                    Request::get(format!("http://{authority}/small")).body(Full::new(Bytes::new()))
                }
            };
            tasks.push(tokio::spawn(async move {
                let Ok(req) = req else { return };
                let start = Instant::now();
                let ok = match s.send_request(req).await {
                    Ok(rsp) => {
                        let status = rsp.status();
                        match (kind, rsp.into_body().collect().await) {
                            (Kind::Grpc, Ok(b)) => b
                                .trailers()
                                .and_then(|t| t.get("grpc-status"))
                                .is_some_and(|v| v == "0"),
                            (Kind::H2c, Ok(b)) => {
                                status == http::StatusCode::OK && !b.to_bytes().is_empty()
                            }
                            (_, Err(_)) => false,
                        }
                    }
                    Err(_) => false,
                };
                let us = start.elapsed().as_micros() as u64;
                if i < warmup {
                    return;
                }
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                if ok {
                    r.0 += 1;
                    r.2.push(us);
                } else {
                    r.1 += 1;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let r = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
        Ok::<_, String>(r)
    })?;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{ok} {errors} {} {} {} {total}",
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    Ok(())
}

/// How long one call of the closed loop may take before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn grpc_closed(
    addr: SocketAddr,
    authority: &str,
    streams: usize,
    warmup: Duration,
    window: Duration,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let authority = authority.to_string();
    let (ok, errors, mut lat) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_reset_streams(1024)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let body = frame(&[7u8; 64]);
        let counted_from = Instant::now() + warmup;
        let end = counted_from + window;
        let results = Arc::new(Mutex::new((0u64, 0u64, Vec::with_capacity(1 << 16))));
        let mut tasks = Vec::with_capacity(streams);
        for _ in 0..streams {
            let mut s = sender.clone();
            let results = results.clone();
            let body = body.clone();
            let uri = format!("http://{authority}/bench.Echo/Unary");
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let req = Request::post(uri.as_str())
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(Full::new(body.clone()))
                        .map_err(|e| e.to_string())?;
                    let start = Instant::now();
                    let call = async {
                        match s.send_request(req).await {
                            Ok(rsp) => match rsp.into_body().collect().await {
                                Ok(b) => b
                                    .trailers()
                                    .and_then(|t| t.get("grpc-status"))
                                    .is_some_and(|v| v == "0"),
                                Err(_) => false,
                            },
                            Err(_) => false,
                        }
                    };
                    let ok = tokio::time::timeout(CALL_TIMEOUT, call)
                        .await
                        .unwrap_or(false);
                    if start >= counted_from {
                        let us = start.elapsed().as_micros() as u64;
                        let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                        if ok {
                            r.0 += 1;
                            r.2.push(us);
                        } else {
                            r.1 += 1;
                        }
                    }
                    if !ok && s.is_closed() {
                        return Err(format!("the HTTP/2 connection to {addr} closed"));
                    }
                }
                Ok::<_, String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let r = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
        Ok::<_, String>(r)
    })?;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{ok} {errors} {} {} {} {}",
        pct(0.5),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0)
    );
    Ok(())
}

/// HTTP/2 frame types and flags the idle-connection client reads.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const PADDED: u8 = 0x8;

fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
}

/// What a client writes first on an idle-test connection: the preface, empty SETTINGS, and
/// `GET /small` on stream 1 (HPACK: indexed `:method GET` and `:scheme http`, `:path` and
/// `:authority` as literals without indexing, no Huffman coding).
fn idle_conn_hello(authority: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 6];
    block.extend_from_slice(b"/small");
    block.push(0x01);
    block.push(authority.len().min(127) as u8);
    block.extend_from_slice(&authority.as_bytes()[..authority.len().min(127)]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&frame_head(0, SETTINGS, 0, 0));
    out.extend_from_slice(&frame_head(block.len(), HEADERS, 0x4 | END_STREAM, 1));
    out.extend_from_slice(&block);
    out
}

/// Opens one HTTP/2 connection and takes it through the SETTINGS exchange (both sides
/// acknowledged) and one request answered with a body, END_STREAM included.
fn idle_conn(addr: SocketAddr, hello: &[u8]) -> Result<std::net::TcpStream, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(hello).map_err(|e| format!("write: {e}"))?;
    let (mut acked, mut answered, mut body) = (false, false, 0usize);
    let mut payload = Vec::new();
    while !(acked && answered) {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).map_err(|e| format!("read: {e}"))?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        payload.resize(len, 0);
        s.read_exact(&mut payload)
            .map_err(|e| format!("read: {e}"))?;
        match kind {
            SETTINGS if flags & ACK != 0 => acked = true,
            SETTINGS => s
                .write_all(&frame_head(0, SETTINGS, ACK, 0))
                .map_err(|e| format!("write: {e}"))?,
            PING if flags & ACK == 0 => {
                let mut pong = frame_head(8, PING, ACK, 0).to_vec();
                pong.extend_from_slice(&payload);
                s.write_all(&pong).map_err(|e| format!("write: {e}"))?;
            }
            GOAWAY => return Err("GOAWAY".into()),
            RST_STREAM if stream == 1 => return Err("stream reset".into()),
            DATA | HEADERS if stream == 1 => {
                if kind == DATA {
                    let pad = match flags & PADDED {
                        0 => 0,
                        _ => 1 + payload.first().copied().unwrap_or(0) as usize,
                    };
                    body += len.saturating_sub(pad);
                }
                if flags & END_STREAM != 0 {
                    if body == 0 {
                        return Err("answer without a body".into());
                    }
                    answered = true;
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Whether the peer has closed the connection (read end of stream or an error); data still
/// waiting (a PING, a WINDOW_UPDATE) is read and does not count as closed.
fn closed(mut s: &std::net::TcpStream) -> bool {
    use std::io::Read;
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

pub fn idle_conns(addr: SocketAddr, authority: &str, n: usize) -> Result<(), String> {
    use std::io::{BufRead, Write};
    let hello = idle_conn_hello(authority);
    let (mut open, mut failed, mut in_a_row, mut last_err) = (Vec::new(), 0, 0, String::new());
    while open.len() + failed < n && in_a_row < 3 {
        match idle_conn(addr, &hello) {
            Ok(s) => {
                open.push(s);
                in_a_row = 0;
            }
            Err(e) => {
                failed += 1;
                in_a_row += 1;
                last_err = e;
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "idle-conns: {failed} connection(s) to {addr} failed after {} opened, the last: {last_err}",
            open.len()
        );
    }
    println!("opened {} failed {failed}", open.len());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let held = open.iter().filter(|s| !closed(s)).count();
    println!("held {held}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_conn_hello_is_a_preface_settings_and_one_get() {
        let hello = idle_conn_hello("echo.test:80");
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(hello.starts_with(preface));
        let rest = &hello[preface.len()..];
        assert_eq!(&rest[..9], &[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        let h = &rest[9..18];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        assert_eq!((h[3], h[4]), (HEADERS, 0x5));
        assert_eq!(u32::from_be_bytes([h[5], h[6], h[7], h[8]]), 1);
        assert_eq!(rest.len(), 18 + len);
        let block = &rest[18..];
        assert_eq!(&block[..4], &[0x82, 0x86, 0x04, 6]);
        assert_eq!(&block[4..10], b"/small");
        assert_eq!(&block[10..12], &[0x01, 12]);
        assert_eq!(&block[12..], b"echo.test:80");
    }

    /// The client against the benches' own backend: every connection opened, answered and
    /// held.
    #[test]
    fn idle_conns_open_against_the_backend() {
        let port = crate::free_port();
        std::thread::spawn(move || backend(port));
        crate::wait_port(port).unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let hello = idle_conn_hello("echo.test:80");
        let conns: Vec<_> = (0..20).map(|_| idle_conn(addr, &hello).unwrap()).collect();
        assert!(conns.iter().all(|s| !closed(s)));
    }
}

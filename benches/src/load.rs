//! Two helper roles the harness runs as child processes (pinned to the load CPU):
//!
//! - `benches backend PORT`: an HTTP/1.1 + HTTP/2 backend (hyper): `GET /small` → 128 bytes,
//!   `GET /slow` → 128 bytes after 1 s (to hold streams open), and any gRPC `POST` → its request
//!   echoed with `grpc-status: 0` in trailers.
//! - `benches grpc-load ADDR AUTHORITY RPS SECS`: an open-loop gRPC unary load generator on
//!   one HTTP/2 connection at a fixed rate (requests are sent on schedule whether or not earlier
//!   ones have answered, so queueing shows up in the latency), printing
//!   `ok errors p50_us p99_us p999_us`. h2load reports no percentiles, hence this.
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

pub fn grpc_load(addr: SocketAddr, authority: &str, rps: u64, secs: u64) -> Result<(), String> {
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
        let results = Arc::new(Mutex::new((
            0u64,
            0u64,
            Vec::with_capacity((rps * secs) as usize),
        )));
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rps.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let warmup = rps / 2; // the first half second is not counted
        let total = rps * secs + warmup;
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            tick.tick().await;
            let mut s = sender.clone();
            let results = results.clone();
            let req = Request::post(format!("http://{authority}/bench.Echo/Unary"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(body.clone()));
            tasks.push(tokio::spawn(async move {
                let Ok(req) = req else { return };
                let start = Instant::now();
                let ok = match s.send_request(req).await {
                    Ok(rsp) => match rsp.into_body().collect().await {
                        Ok(b) => b
                            .trailers()
                            .and_then(|t| t.get("grpc-status"))
                            .is_some_and(|v| v == "0"),
                        Err(_) => false,
                    },
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
    println!("{ok} {errors} {} {} {}", pct(0.5), pct(0.99), pct(0.999));
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

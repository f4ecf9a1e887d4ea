//! The soak: a long run of gRPC unary calls at a fixed rate through a client proxy's outbound
//! into server proxies' inbound over mTLS, while the endpoint set and every certificate change.
//!
//!   cargo run -p benches --release -- soak [--duration 30m] [--interval 60s] [--rps 1000] [--quick]
//!
//! ```text
//!  load (open loop, 1 HTTP/2 conn) ─► client proxy (outbound) ─mTLS─► server proxy k (inbound, strict) ─► echo bk
//!                                          │ discovers echo.soak:80
//!                                          └─► remora control (file source: endpoints.toml)
//! ```
//!
//! - Four server proxies, each in front of its own gRPC echo backend; three are published in
//!   the control plane's endpoints file at a time. Every `--interval` the file is rewritten
//!   (write + rename): the longest-published endpoint is removed and the spare one added.
//! - Every proxy (client and servers) has a file identity from a throwaway CA, laid out like a
//!   Kubernetes Secret volume (`tls.crt` → `..data/tls.crt`, `..data` → `..gen-N`). Half an
//!   interval after each endpoint change, every proxy gets a fresh key and leaf (lifetime: three
//!   intervals, so a proxy that missed rotations would fail its next handshakes) by an atomic
//!   swap of `..data`; the proxy polls its directory every 500 ms.
//! - The backends echo the caller identity the server proxy verified (`x-remora-client-id`); a
//!   call only counts as OK with grpc-status 0 in its trailers, a known backend and the client
//!   proxy's SPIFFE ID as the verified peer.
//! - Every second: calls sent, OK, failed (by status), p50/p99 latency of the calls finished in
//!   that second, calls per backend, and each process's RSS (`VmRSS`) and open descriptors
//!   (`/proc/PID/fd`). Written to `benches/results/soak.{md,csv}` and `soak-*.svg`.
//!
//! Fails (non-zero exit) when any call failed, when a proxy's descriptors end more than 20
//! above the start, when a proxy's RSS ends above 1.5 × its RSS at minute 2 (a quarter of the
//! run if shorter), or when the run did not exercise what it claims (an added endpoint not
//! served within 5 s, a removed one still answering 5 s after the edit, a rotation not loaded
//! by every proxy within 5 s).
//!
//! Processes: the proxies on CPU 0; the control plane, the backends and the load on CPU 1.
//! `--quick` is a 20 s smoke with events every 5 s; `all` runs the soak only with `--soak`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{Guard, admin_get, free_port, proxy_env, rss_kib, wait_ready, workspace};

const TD: &str = "soak.local";
const SERVICE: &str = "echo.soak:80";
/// Server proxies (each with its backend); `LIVE` of them are published at a time.
const POOL: usize = 4;
const LIVE: usize = 3;
/// Per-call deadline; a call still unanswered then counts as failed (`timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event may take to show: an added endpoint served, a removed one quiet, a new
/// certificate loaded by every proxy.
const EVENT_BOUND: Duration = Duration::from_secs(5);
const FD_SLACK: u64 = 20;
const RSS_FACTOR: f64 = 1.5;

struct Opts {
    duration: Duration,
    interval: Duration,
    rps: u64,
    quick: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("duration `{s}`: expected e.g. 30m, 90s, 1h, 500ms");
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn opts(quick: bool, args: &[String]) -> Result<Opts, String> {
    let mut o = if quick {
        Opts {
            duration: Duration::from_secs(20),
            interval: Duration::from_secs(5),
            rps: 1000,
            quick,
        }
    } else {
        Opts {
            duration: Duration::from_secs(30 * 60),
            interval: Duration::from_secs(60),
            rps: 1000,
            quick,
        }
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (k, inline) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (a, None),
        };
        let mut value = || -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or(format!("soak: {k} needs a value"))
        };
        match k {
            "--duration" => o.duration = parse_duration(&value()?)?,
            "--interval" => o.interval = parse_duration(&value()?)?,
            "--rps" => o.rps = value()?.parse().map_err(|e| format!("soak: --rps: {e}"))?,
            "--quick" | "--soak" => {}
            other => {
                return Err(format!(
                    "soak: unknown argument `{other}`; flags: --duration 30m --interval 60s --rps 1000 --quick"
                ));
            }
        }
        i += 1;
    }
    if o.interval < Duration::from_secs(2) || o.rps == 0 {
        return Err("soak: --interval must be at least 2s and --rps above 0".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Identities: a Kubernetes-Secret-like directory per proxy, rotated by swapping `..data`.

struct Identity {
    id: remora_certs::SpiffeId,
    dir: PathBuf,
    generation: u32,
}

impl Identity {
    fn new(root: &Path, sa: &str) -> Result<Self, String> {
        let id =
            remora_certs::SpiffeId::workload(TD, "soak", sa).map_err(|e| format!("{sa}: {e}"))?;
        let dir = root.join(sa);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Identity {
            id,
            dir,
            generation: 0,
        })
    }

    /// Writes a fresh key and leaf into a new generation directory and swaps `..data` to it.
    fn rotate(
        &mut self,
        issuer: &remora_certs::ca::LoadedIssuer,
        lifetime: Duration,
    ) -> Result<(), String> {
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        let n = self.generation + 1;
        let generation = self.dir.join(format!("..gen-{n}"));
        let leaf = remora_certs::ca::issue_with_new_key(issuer, &self.id, lifetime)
            .map_err(|e| e.to_string())?;
        leaf.write(&generation).map_err(|e| e.to_string())?;
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..gen-{n}"), &tmp).map_err(|e| io(&tmp, e))?;
        let data = self.dir.join("..data");
        std::fs::rename(&tmp, &data).map_err(|e| io(&data, e))?;
        if n == 1 {
            for f in ["tls.crt", "tls.key", "ca.crt"] {
                let link = self.dir.join(f);
                std::os::unix::fs::symlink(format!("..data/{f}"), &link)
                    .map_err(|e| io(&link, e))?;
            }
        }
        if n > 2 {
            let _ = std::fs::remove_dir_all(self.dir.join(format!("..gen-{}", n - 2)));
        }
        self.generation = n;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Backends: gRPC echo servers (in this process, on their own runtime thread) that name
// themselves and the caller identity their proxy verified.

async fn echo(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let peer = req.headers().get("x-remora-client-id").cloned();
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
    let h = rsp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert("backend", v);
    }
    if let Some(p) = peer {
        h.insert("peer", p);
    }
    Ok(rsp)
}

fn start_backends(n: usize) -> Result<Vec<u16>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            let mut ports = Vec::new();
            for i in 0..n {
                let l = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                ports.push(l.local_addr().map(|a| a.port()).unwrap_or(0));
                let name: Arc<str> = Arc::from(format!("b{}", i + 1));
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = l.accept().await {
                        let _ = tcp.set_nodelay(true);
                        let name = name.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |r| echo(name.clone(), r));
                            let mut b =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            b.http2().max_concurrent_streams(10_000);
                            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                        });
                    }
                });
            }
            let _ = tx.send(Ok(ports));
            std::future::pending::<()>().await;
        });
    });
    rx.recv().map_err(|e| e.to_string())?
}

// ---------------------------------------------------------------------------------------------
// The load: open loop on one HTTP/2 connection (reconnected if it closes, counted).

struct Failure {
    seq: u64,
    sent_ms: u64,
    took_ms: u64,
    kind: String,
    detail: String,
    backend: String,
}

#[derive(Default)]
struct Shared {
    t0: OnceLock<Instant>,
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    reconnects: AtomicU64,
    fails: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<Vec<Failure>>,
    /// Latencies (µs) of OK calls finished since the last per-second sample.
    window: Mutex<Vec<u32>>,
    all: Mutex<Vec<u32>>,
    per_backend: [AtomicU64; POOL],
    /// When each backend last answered, in ms since t0 (0: never).
    last_seen_ms: [AtomicU64; POOL],
    done: AtomicBool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.t0
            .get()
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0)
    }
}

fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "?",
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_reset_streams(1024)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// One call: Ok(backend index) or Err((kind, detail, backend)).
async fn call(sender: &mut Sender, client_id: &str) -> Result<usize, (String, String, String)> {
    let req = Request::post(format!("http://{SERVICE}/soak.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame(&[7u8; 64])))
        .map_err(|e| ("request".to_string(), e.to_string(), String::new()))?;
    let rsp = sender
        .send_request(req)
        .await
        .map_err(|e| ("transport".to_string(), format!("{e:?}"), String::new()))?;
    let h = rsp.headers();
    let text = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, backend, peer) = (rsp.status(), text("backend"), text("peer"));
    let (head_code, head_msg) = (text("grpc-status"), text("grpc-message"));
    let body = rsp.into_body().collect().await.map_err(|e| {
        (
            "transport (response body)".to_string(),
            format!("{e:?}"),
            backend.clone(),
        )
    })?;
    let (code, msg) = match body.trailers() {
        Some(t) if t.contains_key("grpc-status") => (
            t.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            t.get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        ),
        _ => (head_code, head_msg),
    };
    if status != http::StatusCode::OK {
        return Err((
            format!("http {}", status.as_u16()),
            format!("grpc-status {code:?} {msg}"),
            backend,
        ));
    }
    if code.is_empty() {
        return Err(("no grpc-status".into(), String::new(), backend));
    }
    if code != "0" {
        return Err((
            format!("grpc-status {code} {}", grpc_code_name(&code)),
            msg,
            backend,
        ));
    }
    let idx = backend
        .strip_prefix('b')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=POOL).contains(n))
        .map(|n| n - 1);
    let Some(idx) = idx else {
        return Err(("no backend header".into(), String::new(), backend));
    };
    if peer != client_id {
        return Err((
            "peer not verified".into(),
            format!("backend saw x-remora-client-id {peer:?}"),
            backend,
        ));
    }
    Ok(idx)
}

fn record(
    shared: &Shared,
    seq: u64,
    sent_ms: u64,
    took: Duration,
    r: Result<usize, (String, String, String)>,
) {
    match r {
        Ok(b) => {
            shared.ok.fetch_add(1, Ordering::Relaxed);
            shared.per_backend[b].fetch_add(1, Ordering::Relaxed);
            shared.last_seen_ms[b].fetch_max(shared.now_ms().max(1), Ordering::Relaxed);
            let us = took.as_micros().min(u32::MAX as u128) as u32;
            shared
                .window
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(us);
            shared
                .all
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(us);
        }
        Err((kind, detail, backend)) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            *shared
                .fails
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kind.clone())
                .or_default() += 1;
            let mut f = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
            if f.len() < 10_000 {
                f.push(Failure {
                    seq,
                    sent_ms,
                    took_ms: took.as_millis() as u64,
                    kind,
                    detail,
                    backend,
                });
            }
        }
    }
}

async fn load(
    addr: SocketAddr,
    shared: Arc<Shared>,
    rps: u64,
    duration: Duration,
    client_id: String,
    warm: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut sender = match connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            let _ = warm.send(Err(e));
            return;
        }
    };
    // Warm-up (not counted): until 50 calls in a row succeed (discovery, first handshakes).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    let mut last_err = String::new();
    while streak < 50 {
        if Instant::now() > deadline {
            let _ = warm.send(Err(format!(
                "warm-up: no 50 successful calls in a row within 30 s; last error: {last_err}"
            )));
            return;
        }
        match call(&mut sender, &client_id).await {
            Ok(_) => streak += 1,
            Err((k, d, _)) => {
                streak = 0;
                last_err = format!("{k} {d}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let t0 = Instant::now();
    let _ = shared.t0.set(t0);
    let _ = warm.send(Ok(()));
    let total = (rps as f64 * duration.as_secs_f64()) as u64;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let client_id: Arc<str> = Arc::from(client_id);
    for seq in 0..total {
        tick.tick().await;
        let sent_ms = shared.now_ms();
        shared.sent.fetch_add(1, Ordering::Relaxed);
        if sender.is_closed() {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
            match connect(addr).await {
                Ok(s) => sender = s,
                Err(e) => {
                    record(
                        &shared,
                        seq,
                        sent_ms,
                        Duration::ZERO,
                        Err(("reconnect".into(), e, String::new())),
                    );
                    continue;
                }
            }
        }
        let (mut s, shared, client_id) = (sender.clone(), shared.clone(), client_id.clone());
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let start = Instant::now();
            let r = match tokio::time::timeout(CALL_TIMEOUT, call(&mut s, &client_id)).await {
                Ok(r) => r,
                Err(_) => Err((
                    "timeout".into(),
                    format!("no answer within {CALL_TIMEOUT:?}"),
                    String::new(),
                )),
            };
            record(&shared, seq, sent_ms, start.elapsed(), r);
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let deadline = Instant::now() + CALL_TIMEOUT + Duration::from_secs(2);
    while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.done.store(true, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Processes.

fn spawn_logged(
    cpu: &str,
    program: &str,
    args: &[&str],
    envs: &[(&str, String)],
    log: &Path,
) -> Result<Guard, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(cpu)
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(f);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().map(Guard).map_err(|e| format!("{program}: {e}"))
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Sum of the samples of one metric family whose line contains every `filter` substring.
fn metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics(admin: u16) -> String {
    admin_get(admin, "/metrics")
}

struct Proc {
    name: String,
    pid: u32,
    /// The admin port (proxies only; the control plane's is kept apart).
    admin: Option<u16>,
}

// ---------------------------------------------------------------------------------------------
// Per-second samples.

struct Sample {
    t: u64,
    sent: u64,
    ok: u64,
    failed: u64,
    fails: String,
    p50_us: u32,
    p99_us: u32,
    backends: [u64; POOL],
    rss: Vec<u64>,
    fds: Vec<u64>,
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sampler(shared: Arc<Shared>, pids: Vec<u32>, out: Arc<Mutex<Vec<Sample>>>) {
    let Some(t0) = shared.t0.get().copied() else {
        return;
    };
    let (mut sent0, mut ok0, mut failed0) = (0, 0, 0);
    let mut fails0: BTreeMap<String, u64> = BTreeMap::new();
    let mut b0 = [0u64; POOL];
    for t in 1u64.. {
        let at = t0 + Duration::from_secs(t);
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let (sent, ok, failed) = (
            shared.sent.load(Ordering::Relaxed),
            shared.ok.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
        );
        let fails = shared
            .fails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut fails_s = String::new();
        for (k, v) in &fails {
            let d = v - fails0.get(k).copied().unwrap_or(0);
            if d > 0 {
                let _ = write!(
                    fails_s,
                    "{}{k}: {d}",
                    if fails_s.is_empty() { "" } else { "; " }
                );
            }
        }
        let mut w = std::mem::take(&mut *shared.window.lock().unwrap_or_else(|p| p.into_inner()));
        w.sort_unstable();
        let b: [u64; POOL] = std::array::from_fn(|i| shared.per_backend[i].load(Ordering::Relaxed));
        let s = Sample {
            t,
            sent: sent - sent0,
            ok: ok - ok0,
            failed: failed - failed0,
            fails: fails_s,
            p50_us: pct(&w, 0.50),
            p99_us: pct(&w, 0.99),
            backends: std::array::from_fn(|i| b[i] - b0[i]),
            rss: pids.iter().map(|&p| rss_kib(p)).collect(),
            fds: pids.iter().map(|&p| fd_count(p)).collect(),
        };
        (sent0, ok0, failed0, fails0, b0) = (sent, ok, failed, fails, b);
        out.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        if shared.done.load(Ordering::Relaxed) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events.

#[derive(Clone)]
struct Event {
    t_ms: u64,
    kind: &'static str,
    what: String,
}

fn endpoints_toml(published: &VecDeque<usize>, inbound: &[u16], ids: &[Identity]) -> String {
    let mut t = format!("[[service]]\nname = \"{SERVICE}\"\nendpoints = [\n");
    let mut sorted: Vec<usize> = published.iter().copied().collect();
    sorted.sort_unstable();
    for i in sorted {
        let _ = writeln!(
            t,
            "  {{ addr = \"127.0.0.1:{}\", identity = \"{}\" }},",
            inbound[i],
            ids[i + 1].id
        );
    }
    t.push_str("]\n");
    t
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn sleep_until(at: Instant) {
    if let Some(d) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn set_name(published: &VecDeque<usize>) -> String {
    let mut v: Vec<usize> = published.iter().copied().collect();
    v.sort_unstable();
    v.iter()
        .map(|i| format!("s{}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

struct Findings {
    /// ms from the edit to the added endpoint's first answer.
    added: Vec<u64>,
    /// ms from the edit to the removed endpoint's last answer.
    removed: Vec<u64>,
    /// ms from the swap to the slowest proxy's reload.
    rotated: Vec<u64>,
    problems: Vec<String>,
}

// ---------------------------------------------------------------------------------------------

pub fn run(quick: bool, args: &[String]) -> Result<(), String> {
    let o = opts(quick, args)?;
    let proxy_bin = crate::build_proxy()?;
    let proxy_bin = proxy_bin.to_str().unwrap_or("remora-proxy").to_string();
    let cp_bin = crate::build_bin("remora")?;
    let built = provenance();
    // This process (the load, the backends, the sampler) runs on CPU 1; the proxies on CPU 0.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();

    let tmp = std::env::temp_dir().join(format!("remora-bench-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let ca = tmp.join("ca");
    remora_certs::ca::init_dir(&ca, TD).map_err(|e| e.to_string())?;
    let issuer = remora_certs::ca::LoadedIssuer::from_dir(&ca).map_err(|e| e.to_string())?;
    let lifetime = o.interval * 3;
    // ids[0]: the client's proxy; ids[1..]: the server proxies.
    let mut ids = vec![Identity::new(&tmp, "client")?];
    for i in 1..=POOL {
        ids.push(Identity::new(&tmp, &format!("echo-{i}"))?);
    }
    for id in &mut ids {
        id.rotate(&issuer, lifetime)?;
    }

    let backends = start_backends(POOL)?;
    let inbound: Vec<u16> = (0..POOL).map(|_| free_port()).collect();
    let mut published: VecDeque<usize> = (0..LIVE).collect();
    let mut spare = LIVE;
    let eps = tmp.join("endpoints.toml");
    write_atomic(&eps, &endpoints_toml(&published, &inbound, &ids))?;
    std::fs::write(tmp.join("tokens"), "").map_err(|e| e.to_string())?;

    let (cp_port, cp_admin) = (free_port(), free_port());
    let cp = spawn_logged(
        "1",
        cp_bin.to_str().unwrap_or("remora"),
        &[
            "control",
            "--issuer",
            ca.to_str().unwrap_or(""),
            "--trust-domain",
            TD,
            "--endpoints-file",
            eps.to_str().unwrap_or(""),
            "--bootstrap-tokens",
            tmp.join("tokens").to_str().unwrap_or(""),
            "--addr",
            &format!("127.0.0.1:{cp_port}"),
            "--admin-addr",
            &format!("127.0.0.1:{cp_admin}"),
        ],
        &[("REMORA_LOG", "info".into())],
        &tmp.join("control.log"),
    )?;
    wait_ready(cp_admin)?;

    let mut guards = Vec::new();
    let mut procs = Vec::new();
    for i in 0..POOL {
        let (out, adm) = (free_port(), free_port());
        let mut env = proxy_env(inbound[i], out, adm, backends[i]);
        env.push(("REMORA_IDENTITY_DIR", ids[i + 1].dir.display().to_string()));
        env.push(("REMORA_MTLS", "strict".into()));
        env.push(("REMORA_LOG", "info".into()));
        let name = format!("server s{}", i + 1);
        guards.push(spawn_logged(
            "0",
            &proxy_bin,
            &[],
            &env,
            &tmp.join(format!("s{}.log", i + 1)),
        )?);
        wait_ready(adm)?;
        procs.push(Proc {
            name,
            pid: guards[i].0.id(),
            admin: Some(adm),
        });
    }
    let (c_in, c_out, c_adm) = (free_port(), free_port(), free_port());
    let mut env = proxy_env(c_in, c_out, c_adm, 9);
    env.push(("REMORA_IDENTITY_DIR", ids[0].dir.display().to_string()));
    env.push((
        "REMORA_CONTROL_ADDR",
        format!("127.0.0.1:{cp_port}#spiffe://{TD}/ns/remora/sa/control"),
    ));
    env.push(("REMORA_LOG", "info".into()));
    let client = spawn_logged("0", &proxy_bin, &[], &env, &tmp.join("client.log"))?;
    wait_ready(c_adm)?;
    procs.insert(
        0,
        Proc {
            name: "client".into(),
            pid: client.0.id(),
            admin: Some(c_adm),
        },
    );
    procs.push(Proc {
        name: "control plane".into(),
        pid: cp.0.id(),
        admin: None,
    });

    println!(
        "soak: {:?} at {} rps, endpoint change every {:?}, certificate rotation every {:?} (offset {:?}); logs in {}",
        o.duration,
        o.rps,
        o.interval,
        o.interval,
        o.interval / 2,
        tmp.display()
    );

    // The load, on its own runtime thread.
    let shared = Arc::new(Shared::default());
    let (warm_tx, warm_rx) = std::sync::mpsc::channel();
    let load_thread = {
        let (shared, client_id, rps, duration) =
            (shared.clone(), ids[0].id.to_string(), o.rps, o.duration);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(load(
                    SocketAddr::from(([127, 0, 0, 1], c_out)),
                    shared,
                    rps,
                    duration,
                    client_id,
                    warm_tx,
                )),
                Err(e) => {
                    let _ = warm_tx.send(Err(e.to_string()));
                }
            }
        })
    };
    warm_rx
        .recv()
        .map_err(|_| "the load thread ended before its warm-up".to_string())??;
    let t0 = shared.t0.get().copied().ok_or("no start time")?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler_thread = {
        let (shared, pids, samples) = (
            shared.clone(),
            procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
            samples.clone(),
        );
        std::thread::spawn(move || sampler(shared, pids, samples))
    };

    // The events: rotation at (k - ½)·interval, endpoint change at k·interval.
    let mut events: Vec<Event> = Vec::new();
    let mut f = Findings {
        added: Vec::new(),
        removed: Vec::new(),
        rotated: Vec::new(),
        problems: Vec::new(),
    };
    let mut last_change: Option<(usize, u64)> = None; // (removed endpoint, edit time ms)
    let reloads = |adm: u16| metric(&metrics(adm), "remora_identity_reloads_total", &[]);
    let mut step = 1u32;
    loop {
        let at = t0 + o.interval * step / 2;
        if at >= t0 + o.duration {
            break;
        }
        sleep_until(at);
        if step % 2 == 1 {
            // Rotate every proxy's certificate.
            let before: Vec<f64> = procs.iter().filter_map(|p| p.admin).map(reloads).collect();
            let t_ms = shared.now_ms();
            for id in &mut ids {
                id.rotate(&issuer, lifetime)?;
            }
            let g = ids[0].generation;
            events.push(Event {
                t_ms,
                kind: "rotation",
                what: format!("every proxy's certificate rotated (generation {g})"),
            });
            let swapped = Instant::now();
            let admins: Vec<(String, u16)> = procs
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.admin?)))
                .collect();
            let mut pending: Vec<usize> = (0..admins.len()).collect();
            while !pending.is_empty() && swapped.elapsed() < EVENT_BOUND {
                pending.retain(|&i| reloads(admins[i].1) <= before[i]);
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if pending.is_empty() {
                f.rotated.push(swapped.elapsed().as_millis() as u64);
            } else {
                let names: Vec<&str> = pending.iter().map(|&i| admins[i].0.as_str()).collect();
                f.problems.push(format!(
                    "rotation at {:.1} s (generation {g}): not loaded within {EVENT_BOUND:?} by {}",
                    t_ms as f64 / 1000.0,
                    names.join(", ")
                ));
            }
        } else {
            // The previous change's removed endpoint: when did it answer last?
            if let Some((r, t)) = last_change {
                let last = shared.last_seen_ms[r].load(Ordering::Relaxed);
                let after = last.saturating_sub(t);
                f.removed.push(after);
                if last > t + EVENT_BOUND.as_millis() as u64 {
                    f.problems.push(format!(
                        "endpoint s{} removed at {:.1} s still answered {after} ms later",
                        r + 1,
                        t as f64 / 1000.0
                    ));
                }
            }
            let removed = published.pop_front().unwrap_or(0);
            let added = spare;
            published.push_back(added);
            spare = removed;
            write_atomic(&eps, &endpoints_toml(&published, &inbound, &ids))?;
            let t_ms = shared.now_ms();
            events.push(Event {
                t_ms,
                kind: "endpoints",
                what: format!(
                    "removed s{}, added s{} → {}",
                    removed + 1,
                    added + 1,
                    set_name(&published)
                ),
            });
            last_change = Some((removed, t_ms));
            let edited = Instant::now();
            while shared.last_seen_ms[added].load(Ordering::Relaxed) <= t_ms
                && edited.elapsed() < EVENT_BOUND
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let seen = shared.last_seen_ms[added].load(Ordering::Relaxed);
            if seen > t_ms {
                f.added.push(seen - t_ms);
            } else {
                f.problems.push(format!(
                    "endpoint s{} added at {:.1} s got no call within {EVENT_BOUND:?}",
                    added + 1,
                    t_ms as f64 / 1000.0
                ));
            }
        }
        step += 1;
    }
    let _ = load_thread.join();
    let _ = sampler_thread.join();
    if let Some((r, t)) = last_change {
        let last = shared.last_seen_ms[r].load(Ordering::Relaxed);
        f.removed.push(last.saturating_sub(t));
        if last > t + EVENT_BOUND.as_millis() as u64 {
            f.problems.push(format!(
                "endpoint s{} removed at {:.1} s still answered {} ms later",
                r + 1,
                t as f64 / 1000.0,
                last - t
            ));
        }
    }

    // Final counters from the proxies, and what their logs complained about.
    let mut end_metrics = Vec::new();
    for p in &procs {
        if let Some(adm) = p.admin {
            let m = metrics(adm);
            let tls = |dir: &str, result: &str| {
                metric(
                    &m,
                    "remora_tls_connections_total",
                    &[
                        &format!("direction=\"{dir}\""),
                        &format!("result=\"{result}\""),
                    ],
                )
            };
            end_metrics.push(EndMetrics {
                name: p.name.clone(),
                reloads: metric(&m, "remora_identity_reloads_total", &[]),
                reload_failures: metric(&m, "remora_identity_reload_failures_total", &[]),
                tls_in: tls("inbound", "mtls"),
                tls_in_failed: tls("inbound", "handshake_failed"),
                tls_out: tls("outbound", "established"),
                tls_out_failed: tls("outbound", "failed"),
                errors: metric(&m, "remora_errors_total", &[]),
                panics: metric(&m, "remora_panics_total", &[]),
            });
        }
    }
    drop(client);
    drop(guards);
    drop(cp);
    let mut log_lines = Vec::new();
    for name in ["client", "s1", "s2", "s3", "s4", "control"] {
        let text = std::fs::read_to_string(tmp.join(format!("{name}.log"))).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        if !bad.is_empty() {
            log_lines.push(format!(
                "{name}.log: {} warning/error lines, first: `{}`",
                bad.len(),
                bad[0].trim().replace('`', "'")
            ));
        }
    }

    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let report = Report {
        o: &o,
        procs: &procs,
        samples: &samples,
        shared: &shared,
        events: &events,
        f: &f,
        end_metrics: &end_metrics,
        log_lines: &log_lines,
        command: std::iter::once("soak")
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        built,
    };
    let (text, failed_checks) = report.render();
    println!("{text}");
    if !o.quick {
        let dir = workspace().join("benches/results");
        let w = |name: &str, body: String| {
            std::fs::write(dir.join(name), body).map_err(|e| format!("{name}: {e}"))
        };
        w("soak.md", text.clone())?;
        w("soak.csv", report.csv())?;
        write_plots(&dir, &procs, &samples, &events)?;
        println!(
            "wrote benches/results/soak.md, soak.csv, soak-rss.svg, soak-fds.svg, soak-latency.svg"
        );
    }
    if failed_checks.is_empty() {
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(())
    } else {
        Err(format!(
            "soak failed: {}; logs kept in {}",
            failed_checks.join("; "),
            tmp.display()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

/// Which source the binaries were built from (others may be editing the tree).
fn provenance() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).trim().to_string();
    let dirty: Vec<String> = git(&[
        "status",
        "--porcelain",
        "--",
        "proxy",
        "control-plane",
        "certs",
        "api",
    ])
    .lines()
    .filter_map(|l| l.get(3..).map(str::to_string))
    .collect();
    if dirty.is_empty() {
        format!("Binaries built from commit {head}.")
    } else {
        format!(
            "Binaries built from commit {head} plus uncommitted changes in {} (work in progress by others at the time).",
            dirty.join(", ")
        )
    }
}

struct Report<'a> {
    o: &'a Opts,
    procs: &'a [Proc],
    samples: &'a [Sample],
    shared: &'a Shared,
    events: &'a [Event],
    f: &'a Findings,
    end_metrics: &'a [EndMetrics],
    log_lines: &'a [String],
    command: String,
    built: String,
}

struct EndMetrics {
    name: String,
    reloads: f64,
    reload_failures: f64,
    tls_in: f64,
    tls_in_failed: f64,
    tls_out: f64,
    tls_out_failed: f64,
    errors: f64,
    panics: f64,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

fn median_max(v: &[u64]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    format!("median {} ms, max {} ms", s[s.len() / 2], s[s.len() - 1])
}

impl Report<'_> {
    /// The sample nearest to second `t` (clamped).
    fn at(&self, t: u64) -> Option<&Sample> {
        let i = (t.max(1) as usize - 1).min(self.samples.len().saturating_sub(1));
        self.samples.get(i)
    }

    fn rss_ref_t(&self) -> u64 {
        (self.o.duration.as_secs() / 4).clamp(1, 120)
    }

    fn render(&self) -> (String, Vec<String>) {
        let mut o = String::new();
        let mut failed_checks = Vec::new();
        let sh = self.shared;
        let (sent, ok, failed) = (
            sh.sent.load(Ordering::Relaxed),
            sh.ok.load(Ordering::Relaxed),
            sh.failed.load(Ordering::Relaxed),
        );
        let dur = fmt_dur(self.o.duration);
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let built = &self.built;
        let _ = writeln!(
            o,
            "# Soak: {dur} at {} rps of gRPC through mTLS, endpoints and certificates changing every {}\n",
            self.o.rps,
            fmt_dur(self.o.interval)
        );
        let _ = writeln!(
            o,
            "Made by `cargo run -p benches --release -- {}` (run under `nice -n 10`) on {date}, this project's 2-core VM (shared with other work while it ran). \
             Open-loop gRPC unary calls (64-byte message) on one HTTP/2 connection → client proxy outbound (discovers `{SERVICE}` from `remora control`, file source) → mTLS → \
             one of {LIVE} published server proxies (inbound, `REMORA_MTLS=strict`) → its gRPC echo backend. {POOL} server proxies in all; every {} the endpoints file is \
             rewritten: the longest-published endpoint out, the spare in. Half an interval later every proxy's key and leaf (lifetime {}) are replaced by an atomic swap of a \
             Kubernetes-Secret-style `..data` symlink. A call is OK only with grpc-status 0 in its trailers, from a known backend, whose proxy verified the client's SPIFFE ID. \
             Proxies on CPU 0; the load, the backends and the control plane on CPU 1. {built}\n",
            self.command,
            fmt_dur(self.o.interval),
            fmt_dur(self.o.interval * 3),
        );

        // Checks.
        let mut checks: Vec<(String, String, bool)> = Vec::new();
        checks.push((
            "failed calls".into(),
            format!("{failed} of {sent}"),
            failed == 0,
        ));
        let ref_t = self.rss_ref_t();
        let first = self.samples.first();
        let last = self.samples.last();
        for (i, p) in self.procs.iter().enumerate() {
            let (Some(first), Some(last), Some(r)) = (first, last, self.at(ref_t)) else {
                continue;
            };
            let proxy = p.admin.is_some();
            let fd_ok = last.fds[i] <= first.fds[i] + FD_SLACK;
            let rss_ok = (last.rss[i] as f64) <= RSS_FACTOR * r.rss[i] as f64;
            let tag = if proxy { "" } else { " (informational)" };
            checks.push((
                format!("{}: fds end ≤ start + {FD_SLACK}{tag}", p.name),
                format!("{} → {}", first.fds[i], last.fds[i]),
                fd_ok || !proxy,
            ));
            checks.push((
                format!(
                    "{}: RSS end ≤ {RSS_FACTOR} × RSS at {}{tag}",
                    p.name,
                    fmt_dur(Duration::from_secs(ref_t))
                ),
                format!("{} → {} MiB", mib(r.rss[i]), mib(last.rss[i])),
                rss_ok || !proxy,
            ));
        }
        let n_changes = self.events.iter().filter(|e| e.kind == "endpoints").count();
        let n_rot = self.events.iter().filter(|e| e.kind == "rotation").count();
        checks.push((
            format!("endpoint changes took effect within {EVENT_BOUND:?}"),
            format!(
                "{n_changes} changes; added endpoint's first answer {}; removed endpoint's last answer {}",
                median_max(&self.f.added),
                median_max(&self.f.removed)
            ),
            self.f.problems.iter().all(|p| !p.starts_with("endpoint")),
        ));
        checks.push((
            format!("rotations loaded by every proxy within {EVENT_BOUND:?}"),
            format!(
                "{n_rot} rotations; slowest proxy's reload {}",
                median_max(&self.f.rotated)
            ),
            self.f.problems.iter().all(|p| !p.starts_with("rotation")),
        ));
        let reload_failures: f64 = self.end_metrics.iter().map(|m| m.reload_failures).sum();
        let panics: f64 = self.end_metrics.iter().map(|m| m.panics).sum();
        checks.push((
            "identity reload failures, panics (all proxies)".into(),
            format!("{}, {}", reload_failures as u64, panics as u64),
            reload_failures == 0.0 && panics == 0.0,
        ));
        let all_ok = checks.iter().all(|c| c.2);
        let _ = writeln!(
            o,
            "## Result: {}\n\n| check | value | |\n|---|---|---|",
            if all_ok { "PASS" } else { "FAIL" }
        );
        for (k, v, good) in &checks {
            let _ = writeln!(
                o,
                "| {k} | {v} | {} |",
                if *good { "ok" } else { "**FAIL**" }
            );
            if !good {
                failed_checks.push(format!("{k}: {v}"));
            }
        }
        for p in &self.f.problems {
            let _ = writeln!(o, "\n- {p}");
        }

        // Calls.
        let mut all = std::mem::take(&mut *sh.all.lock().unwrap_or_else(|p| p.into_inner()));
        all.sort_unstable();
        let ms = |us: u32| format!("{:.2}", us as f64 / 1000.0);
        let _ = writeln!(
            o,
            "\n## Calls\n\n{sent} sent, {ok} OK, {failed} failed; the load's connection to the client proxy was re-established {} times.\n",
            sh.reconnects.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "Latency of OK calls (ms): p50 {}, p99 {}, p99.9 {}, max {}. Per second: median of the per-second p99s {} ms, worst per-second p99 {} ms.\n",
            ms(pct(&all, 0.5)),
            ms(pct(&all, 0.99)),
            ms(pct(&all, 0.999)),
            ms(all.last().copied().unwrap_or(0)),
            {
                let mut v: Vec<u32> = self.samples.iter().map(|s| s.p99_us).collect();
                v.sort_unstable();
                ms(pct(&v, 0.5))
            },
            ms(self.samples.iter().map(|s| s.p99_us).max().unwrap_or(0)),
        );
        let fails = sh.fails.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !fails.is_empty() {
            let _ = writeln!(o, "| failure | calls |\n|---|---|");
            for (k, v) in &fails {
                let _ = writeln!(o, "| {k} | {v} |");
            }
            let _ = writeln!(o);
        }
        let served: Vec<String> = (0..POOL)
            .map(|i| format!("s{}: {}", i + 1, sh.per_backend[i].load(Ordering::Relaxed)))
            .collect();
        let _ = writeln!(o, "Calls answered per backend: {}.\n", served.join(", "));

        // Memory and descriptors.
        if let (Some(first), Some(last)) = (first, last) {
            let mid = self.at(last.t / 2).unwrap_or(first);
            let r = self.at(ref_t).unwrap_or(first);
            let _ = writeln!(
                o,
                "## Memory and descriptors\n\nSampled every second from `/proc/PID/status` (VmRSS) and `/proc/PID/fd`; start = {} s, middle = {} s, end = {} s.\n",
                first.t, mid.t, last.t
            );
            let _ = writeln!(
                o,
                "| process | RSS MiB start | at {} | middle | end | max | fds start | middle | end | max |\n|---|---|---|---|---|---|---|---|---|---|",
                fmt_dur(Duration::from_secs(ref_t))
            );
            for (i, p) in self.procs.iter().enumerate() {
                let max_rss = self.samples.iter().map(|s| s.rss[i]).max().unwrap_or(0);
                let max_fd = self.samples.iter().map(|s| s.fds[i]).max().unwrap_or(0);
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.name,
                    mib(first.rss[i]),
                    mib(r.rss[i]),
                    mib(mid.rss[i]),
                    mib(last.rss[i]),
                    mib(max_rss),
                    first.fds[i],
                    mid.fds[i],
                    last.fds[i],
                    max_fd
                );
            }
            let _ = writeln!(
                o,
                "\n![RSS over time](soak-rss.svg)\n\n![Open descriptors over time](soak-fds.svg)\n\n![Latency per second](soak-latency.svg)\n\nPer-second record: [soak.csv](soak.csv).\n"
            );
        }

        let _ = writeln!(
            o,
            "## Proxies at the end\n\nFrom each proxy's `/metrics` after the run.\n\n| proxy | certificates loaded | reload failures | inbound mTLS handshakes (failed) | outbound TLS connections (failed) | errors | panics |\n|---|---|---|---|---|---|---|"
        );
        for m in self.end_metrics {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} ({}) | {} ({}) | {} | {} |",
                m.name,
                m.reloads as u64,
                m.reload_failures as u64,
                m.tls_in as u64,
                m.tls_in_failed as u64,
                m.tls_out as u64,
                m.tls_out_failed as u64,
                m.errors as u64,
                m.panics as u64
            );
        }
        if self.log_lines.is_empty() {
            let _ = writeln!(
                o,
                "\nNo WARN or ERROR lines in any proxy's or the control plane's log (`REMORA_LOG=info`)."
            );
        } else {
            let _ = writeln!(o, "\nLogs (`REMORA_LOG=info`):\n");
            for l in self.log_lines {
                let _ = writeln!(o, "- {l}");
            }
        }

        // Failures, each next to the event before it.
        let failures = sh.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.is_empty() {
            let _ = writeln!(
                o,
                "\n## Failed calls (first {} of {failed}), with the event before each\n\n| call # | sent at s | took ms | failure | detail | backend | previous event |\n|---|---|---|---|---|---|---|",
                failures.len().min(100)
            );
            for fl in failures.iter().take(100) {
                let prev = self
                    .events
                    .iter()
                    .rev()
                    .find(|e| e.t_ms <= fl.sent_ms)
                    .map(|e| {
                        format!(
                            "{} ms after {} at {:.1} s: {}",
                            fl.sent_ms - e.t_ms,
                            e.kind,
                            e.t_ms as f64 / 1000.0,
                            e.what
                        )
                    })
                    .unwrap_or_else(|| "none".into());
                let _ = writeln!(
                    o,
                    "| {} | {:.3} | {} | {} | {} | {} | {prev} |",
                    fl.seq,
                    fl.sent_ms as f64 / 1000.0,
                    fl.took_ms,
                    fl.kind,
                    fl.detail.replace('|', "/"),
                    if fl.backend.is_empty() {
                        "–"
                    } else {
                        &fl.backend
                    }
                );
            }
        }
        (o, failed_checks)
    }

    fn csv(&self) -> String {
        let mut o = String::from("t_s,sent,ok,failed,failed_by_status,p50_us,p99_us");
        for i in 0..POOL {
            let _ = write!(o, ",calls_s{}", i + 1);
        }
        for p in self.procs {
            let _ = write!(o, ",rss_kib_{}", p.name.replace(' ', "_"));
        }
        for p in self.procs {
            let _ = write!(o, ",fds_{}", p.name.replace(' ', "_"));
        }
        o.push('\n');
        for s in self.samples {
            let _ = write!(
                o,
                "{},{},{},{},\"{}\",{},{}",
                s.t, s.sent, s.ok, s.failed, s.fails, s.p50_us, s.p99_us
            );
            for b in s.backends {
                let _ = write!(o, ",{b}");
            }
            for v in s.rss.iter().chain(&s.fds) {
                let _ = write!(o, ",{v}");
            }
            o.push('\n');
        }
        o
    }
}

/// `soak-rss.svg`, `soak-fds.svg` and `soak-latency.svg` in `dir`, drawn by `plot`: one line
/// per process (per percentile for latency) over the run, the endpoint changes and the
/// certificate rotations as vertical markers.
fn write_plots(
    dir: &Path,
    procs: &[Proc],
    samples: &[Sample],
    events: &[Event],
) -> Result<(), String> {
    let secs = |events: Vec<&Event>| events.iter().map(|e| e.t_ms as f64 / 1000.0).collect();
    let (rotations, changes): (Vec<&Event>, Vec<&Event>) =
        events.iter().partition(|e| e.kind == "rotation");
    let markers = [
        ("endpoint change".to_string(), secs(changes)),
        ("certificate rotation".to_string(), secs(rotations)),
    ];
    let per_proc = |f: &dyn Fn(&Sample, usize) -> f64| -> Vec<crate::plot::Series> {
        procs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    p.name.clone(),
                    samples.iter().map(|s| (s.t as f64, f(s, i))).collect(),
                )
            })
            .collect()
    };
    let latency = |name: &str, f: fn(&Sample) -> u32| -> crate::plot::Series {
        (
            name.to_string(),
            samples
                .iter()
                .map(|s| (s.t as f64, f(s) as f64 / 1000.0))
                .collect(),
        )
    };
    crate::plot::time_series(
        &dir.join("soak-rss.svg"),
        "RSS per process",
        "MiB",
        &per_proc(&|s, i| s.rss.get(i).copied().unwrap_or(0) as f64 / 1024.0),
        &markers,
    )?;
    crate::plot::time_series(
        &dir.join("soak-fds.svg"),
        "Open file descriptors per process",
        "fds",
        &per_proc(&|s, i| s.fds.get(i).copied().unwrap_or(0) as f64),
        &markers,
    )?;
    crate::plot::time_series(
        &dir.join("soak-latency.svg"),
        "Latency of the calls finished each second",
        "ms",
        &[latency("p50", |s| s.p50_us), latency("p99", |s| s.p99_us)],
        &markers,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{TempDir, polylines, well_formed};

    #[test]
    fn write_plots_draws_the_three_time_series() {
        let dir = TempDir::new("soak");
        let procs: Vec<Proc> = ["client", "server s1", "control plane"]
            .iter()
            .map(|n| Proc {
                name: n.to_string(),
                pid: 1,
                admin: None,
            })
            .collect();
        let samples: Vec<Sample> = (1..=120)
            .map(|t| Sample {
                t,
                sent: 1000,
                ok: 1000,
                failed: 0,
                fails: String::new(),
                p50_us: 700,
                p99_us: 4000 + t as u32,
                backends: [250; POOL],
                rss: vec![9800, 9400, 12600],
                fds: vec![19, 16, 14],
            })
            .collect();
        let events = [
            Event {
                t_ms: 30_000,
                kind: "rotation",
                what: String::new(),
            },
            Event {
                t_ms: 60_000,
                kind: "endpoints",
                what: String::new(),
            },
            Event {
                t_ms: 90_000,
                kind: "rotation",
                what: String::new(),
            },
        ];
        write_plots(&dir.0, &procs, &samples, &events).unwrap();
        for (file, title, names) in [
            (
                "soak-rss.svg",
                "RSS per process",
                &["client", "server s1", "control plane"][..],
            ),
            (
                "soak-fds.svg",
                "Open file descriptors per process",
                &["client", "server s1", "control plane"][..],
            ),
            (
                "soak-latency.svg",
                "Latency of the calls finished each second",
                &["p50", "p99"][..],
            ),
        ] {
            let svg = std::fs::read_to_string(dir.0.join(file)).unwrap();
            let svg = well_formed(&svg);
            assert!(svg.contains(title), "{file}: no title");
            for name in names
                .iter()
                .chain(&["endpoint change", "certificate rotation"])
            {
                assert!(
                    svg.contains(&format!("{name}\n</text>")),
                    "{file}: no {name}"
                );
            }
            // One polyline through every sample per series.
            let lines = polylines(svg);
            assert_eq!(
                lines.iter().filter(|n| **n == samples.len()).count(),
                names.len(),
                "{file}: {lines:?}"
            );
        }
    }
}

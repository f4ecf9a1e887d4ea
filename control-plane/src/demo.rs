//! `remora demo`: a small mesh on loopback, in one process, on the embedded defaults.
//!
//! ```text
//!  client ──► proxy (outbound) ──► proxy b1 (inbound) ──► gRPC echo b1
//!                              ├─► proxy b2 (inbound) ──► gRPC echo b2
//!                              └─► proxy b3 (inbound) ──► gRPC echo b3
//! ```
//!
//! The backends and the client speak gRPC framing over HTTP/2 with hyper (unary calls with the
//! status in trailers), so the demo needs nothing beyond the binary.
//!
//! By default a control plane runs too (in the same process, on the file source): it issues
//! every proxy's certificate from a CSR and a bootstrap token, and the client's proxy discovers
//! the three backends from it. `--plaintext` runs the mesh without certificates or control
//! plane, on static destinations.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_proxy::{Config, Proxy, ShutdownHandle, StaticDestination};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cli::DemoArgs;

const SERVICE: &str = "echo.demo:80";
const METHOD: &str = "/remora.demo.Echo/Say";

#[derive(Debug, Default)]
pub struct Report {
    pub ok: usize,
    pub failed: usize,
    pub per_backend: BTreeMap<String, usize>,
    /// (backend, the caller identity its proxy verified)
    pub peers: std::collections::BTreeSet<(String, String)>,
}

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A gRPC echo backend: answers every call with its own message and the backend's name.
async fn backend(name: String) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(loopback0()).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move {
                        // The verified identity of the caller, as the backend's proxy saw it.
                        let peer = req.headers().get("x-remora-client-id").cloned();
                        let msg = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let body = Full::new(msg).with_trailers(async move { Some(Ok(trailers)) });
                        let mut rsp = Response::new(body);
                        rsp.headers_mut()
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        if let Ok(v) = HeaderValue::from_str(&name) {
                            rsp.headers_mut().insert("backend", v);
                        }
                        if let Some(p) = peer {
                            rsp.headers_mut().insert("peer", p);
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// A gRPC message frame: uncompressed flag, big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

struct Running {
    role: String,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    shutdown: ShutdownHandle,
    task: JoinHandle<remora_proxy::RunReport>,
}

async fn start_proxy(role: String, cfg: Config) -> Result<Running, String> {
    let proxy = Proxy::bind(cfg).await.map_err(|e| format!("{role}: {e}"))?;
    // `Proxy::bind` binds all three listeners; a missing one would be a library bug.
    let bound = |a: Option<SocketAddr>, which: &str| {
        a.ok_or_else(|| format!("{role}: the {which} listener is not bound"))
    };
    let running = Running {
        inbound: bound(proxy.inbound_addr(), "inbound")?,
        outbound: bound(proxy.outbound_addr(), "outbound")?,
        admin: bound(proxy.admin_addr(), "admin")?,
        role,
        shutdown: proxy.shutdown_handle(),
        task: tokio::spawn(proxy.run(std::future::pending())),
    };
    Ok(running)
}

fn demo_config(app: SocketAddr) -> Config {
    Config {
        inbound_addr: loopback0(),
        outbound_addr: loopback0(),
        admin_addr: loopback0(),
        app_addr: app,
        drain_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// One gRPC client connection (like a gRPC channel) making `requests` calls, `concurrency` at a
/// time, through the outbound proxy.
async fn client(
    outbound: SocketAddr,
    requests: usize,
    concurrency: usize,
) -> Result<(Report, Vec<Duration>), String> {
    let tcp = TcpStream::connect(outbound)
        .await
        .map_err(|e| format!("connect to the client proxy {outbound}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake with the client proxy: {e}"))?;
    tokio::spawn(conn);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(Mutex::new((
        Report::default(),
        Vec::with_capacity(requests),
    )));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut sender, next, results) = (sender.clone(), next.clone(), results.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let req = Request::post(format!("http://{SERVICE}{METHOD}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(grpc_frame(b"hello from the demo client")));
                let Ok(req) = req else { continue };
                let start = Instant::now();
                let outcome = async {
                    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let backend = rsp
                        .headers()
                        .get("backend")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let peer = rsp
                        .headers()
                        .get("peer")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none (plaintext)")
                        .to_string();
                    let header_status = rsp.headers().get("grpc-status").cloned();
                    let body = rsp.into_body().collect().await.map_err(|e| e.to_string())?;
                    let status = body
                        .trailers()
                        .and_then(|t| t.get("grpc-status").cloned())
                        .or(header_status);
                    match (status.as_ref().map(|s| s.as_bytes()), backend) {
                        (Some(b"0"), Some(b)) => Ok((b, peer)),
                        (s, _) => Err(format!("grpc-status {s:?}")),
                    }
                }
                .await;
                let elapsed = start.elapsed();
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Ok((b, peer)) => {
                        r.0.ok += 1;
                        r.0.peers.insert((b.clone(), peer));
                        *r.0.per_backend.entry(b).or_default() += 1;
                        r.1.push(elapsed);
                    }
                    Err(e) => {
                        if r.0.failed == 0 {
                            eprintln!("first failed call: {e}");
                        }
                        r.0.failed += 1;
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
    Ok((std::mem::take(&mut r.0), std::mem::take(&mut r.1)))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// A throwaway CA and one identity per workload, in a temporary directory.
struct DemoPki {
    dir: std::path::PathBuf,
    issuer: remora_certs::ca::LoadedIssuer,
}

impl DemoPki {
    fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("remora-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        remora_certs::ca::init_dir(&dir.join("ca"), TRUST_DOMAIN).map_err(|e| e.to_string())?;
        let issuer =
            remora_certs::ca::LoadedIssuer::from_dir(&dir.join("ca")).map_err(|e| e.to_string())?;
        Ok(DemoPki { dir, issuer })
    }

    /// A directory for workload `sa` holding only the trust bundle and a bootstrap token;
    /// its certificate will come from the control plane.
    fn identity(&self, sa: &str) -> Result<(remora_certs::SpiffeId, std::path::PathBuf), String> {
        let id = remora_certs::SpiffeId::workload(TRUST_DOMAIN, "demo", sa)
            .map_err(|e| e.to_string())?;
        let out = self.dir.join(sa);
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        remora_certs::ca::write(&out, "ca.crt", &self.issuer.bundle_pem)
            .map_err(|e| e.to_string())?;
        let token = random_token()?;
        remora_certs::ca::write(&out, "token", &token).map_err(|e| e.to_string())?;
        let line = format!("{token} {id}\n");
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tokens"))
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("bootstrap tokens: {e}"))?;
        Ok((id, out))
    }
}

fn random_token() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Points `cfg` at the control plane for its certificate (identity `id`) and its endpoints.
fn use_control(
    cfg: &mut Config,
    control: &remora_proxy::ControlTarget,
    id: remora_certs::SpiffeId,
    dir: std::path::PathBuf,
) {
    cfg.identity_mode = remora_proxy::IdentityMode::Control {
        id,
        token: dir.join("token"),
    };
    cfg.identity_dir = Some(dir);
    cfg.control = Some(control.clone());
}

/// The demo's control plane: file source (written once the backends' proxies are up),
/// bootstrap tokens, the throwaway CA as issuer.
struct DemoControl {
    target: remora_proxy::ControlTarget,
    registry: Arc<crate::registry::Registry>,
    endpoints: std::path::PathBuf,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DemoControl {
    async fn start(pki: &DemoPki) -> Result<Self, String> {
        let endpoints = pki.dir.join("endpoints.toml");
        std::fs::write(&endpoints, "# written once the backends are up\n")
            .map_err(|e| e.to_string())?;
        let mut o = crate::server::Options::new(
            pki.dir.join("ca"),
            crate::server::Source::File(endpoints.clone()),
        );
        o.addr = loopback0();
        o.admin_addr = loopback0();
        o.trust_domain = TRUST_DOMAIN.into();
        o.bootstrap_tokens = Some(pki.dir.join("tokens"));
        o.cert_lifetime = Duration::from_secs(3600);
        let cp = crate::server::ControlPlane::bind(o).await?;
        let target = remora_proxy::ControlTarget {
            addr: cp.addr().to_string(),
            identity: Some(cp.identity()),
        };
        let (registry, admin) = (cp.registry(), cp.admin_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(cp.run(async move {
            let _ = rx.await;
        }));
        Ok(DemoControl {
            target,
            registry,
            endpoints,
            admin,
            stop: Some(tx),
        })
    }

    /// Publishes the backends and waits until the control plane serves them.
    async fn publish(&self, endpoints: &[remora_proxy::EndpointSpec]) -> Result<(), String> {
        let mut toml = format!("[[service]]\nname = \"{SERVICE}\"\nendpoints = [\n");
        for e in endpoints {
            let id = e
                .identity
                .as_ref()
                .map(|i| format!(", identity = \"{i}\""))
                .unwrap_or_default();
            toml.push_str(&format!("  {{ addr = \"{}\"{id} }},\n", e.addr));
        }
        toml.push_str("]\n");
        std::fs::write(&self.endpoints, toml)
            .map_err(|e| format!("{}: {e}", self.endpoints.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .registry
            .get(SERVICE)
            .is_none_or(|s| s.len() < endpoints.len())
        {
            if Instant::now() > deadline {
                return Err(
                    "the control plane did not pick up the endpoints file within 30 s".into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for DemoControl {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for DemoPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const TRUST_DOMAIN: &str = "demo.local";

/// Polls a proxy's /ready (it waits for its identity when it has one).
async fn wait_ready(admin: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the proxy with admin {admin} was not ready within 30 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(args: DemoArgs) -> Result<Report, String> {
    let pki = if args.plaintext {
        None
    } else {
        Some(DemoPki::new()?)
    };
    // Identities (trust bundle + bootstrap token each) first: the control plane reads the
    // tokens file at start.
    let mut ids = Vec::new();
    if let Some(pki) = &pki {
        for sa in ["echo-b1", "echo-b2", "echo-b3", "client"] {
            ids.push(pki.identity(sa)?);
        }
    }
    let control = match &pki {
        Some(pki) => Some(DemoControl::start(pki).await?),
        None => None,
    };
    let mut proxies = Vec::new();
    let mut backends = Vec::new();
    let mut endpoints = Vec::new();
    for i in 1..=3 {
        let name = format!("b{i}");
        let (addr, task) = backend(name.clone())
            .await
            .map_err(|e| format!("backend {name}: {e}"))?;
        backends.push(task);
        let mut cfg = demo_config(addr);
        let mut identity = None;
        if let (Some((id, dir)), Some(control)) = (ids.get(i - 1), &control) {
            let (id, dir) = (id.clone(), dir.clone());
            use_control(&mut cfg, &control.target, id.clone(), dir);
            identity = Some(id);
        }
        let p = start_proxy(format!("backend {name}'s proxy (app {addr})"), cfg).await?;
        wait_ready(p.admin).await?;
        endpoints.push(remora_proxy::EndpointSpec {
            addr: p.inbound,
            weight: 1,
            identity,
            opaque: false,
            quic: None,
            locality: Default::default(),
        });
        proxies.push(p);
    }
    // The client app only calls out; nothing listens behind its inbound side.
    let mut cfg = demo_config(SocketAddr::from(([127, 0, 0, 1], 9)));
    match (ids.get(3), &control) {
        (Some((id, dir)), Some(control)) => {
            use_control(&mut cfg, &control.target, id.clone(), dir.clone());
            control.publish(&endpoints).await?;
        }
        _ => {
            cfg.destinations = vec![StaticDestination {
                name: SERVICE.into(),
                endpoints,
            }]
        }
    }
    let client_proxy = start_proxy("client's proxy".into(), cfg).await?;
    wait_ready(client_proxy.admin).await?;
    let outbound = client_proxy.outbound;
    proxies.push(client_proxy);

    println!(
        "remora demo: 3 gRPC backends, each behind its own remora-proxy; a client calling `{SERVICE}` through its proxy"
    );
    match &control {
        Some(c) => println!(
            "control plane at {} ({}): issued all 4 proxy certificates from CSRs + bootstrap tokens; the client's proxy discovered `{SERVICE}` from it (file source {})\n",
            c.target.addr,
            c.target
                .identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            c.endpoints.display()
        ),
        None => println!("no control plane (--plaintext): static destinations\n"),
    }
    let started = Instant::now();
    let run = tokio::select! {
        r = tokio::time::timeout(args.timeout, client(outbound, args.requests, args.concurrency)) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("interrupted");
            Ok(Err("interrupted".to_string()))
        }
    };
    let elapsed = started.elapsed();
    let result = match run {
        Err(_) => Err(format!("the run did not finish within {:?}", args.timeout)),
        Ok(r) => r,
    };
    if let Ok((report, latencies)) = &result {
        let mut sorted = latencies.clone();
        sorted.sort();
        println!(
            "{} calls in {:.2?} over one HTTP/2 connection, {} at a time: {} ok, {} failed ({:.0} calls/s)",
            args.requests,
            elapsed,
            args.concurrency,
            report.ok,
            report.failed,
            report.ok as f64 / elapsed.as_secs_f64().max(1e-9)
        );
        println!(
            "
calls per backend (the proxy balances each request, not each connection):"
        );
        for (b, n) in &report.per_backend {
            println!(
                "  {b}: {n:>6}  {}",
                "#".repeat(n * 40 / args.requests.max(1))
            );
        }
        if pki.is_some() {
            println!(
                "
identities (each backend's proxy verified the caller's certificate; the client's proxy
verified each backend's):"
            );
        } else {
            println!("\nidentities: none, the mesh runs in plaintext (--plaintext)");
        }
        for (b, peer) in &report.peers {
            println!("  {b} was called by {peer}");
        }
        if pki.is_some() {
            println!(
                "  client's proxy expected echo-b1, echo-b2, echo-b3 under spiffe://{TRUST_DOMAIN}/ns/demo/sa/"
            );
        }
        println!(
            "
latency through two proxies (client → outbound → inbound → backend):"
        );
        for (label, p) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)] {
            println!(
                "  {label}: {:>9.3} ms",
                percentile(&sorted, p).as_secs_f64() * 1000.0
            );
        }
    }
    println!(
        "
proxies (admin: /live /ready /metrics):"
    );
    for p in &proxies {
        println!(
            "  {:<40} inbound {}  outbound {}  admin http://{}/metrics",
            p.role, p.inbound, p.outbound, p.admin
        );
    }
    if let Some(c) = &control {
        println!(
            "  {:<40} gRPC (TLS) {}  admin http://{}/metrics",
            "control plane", c.target.addr, c.admin
        );
    }
    if args.hold {
        println!(
            "
holding the mesh up; Ctrl-C to stop"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    for p in &proxies {
        p.shutdown.shutdown();
    }
    for p in proxies {
        let _ = p.task.await;
    }
    for b in backends {
        b.abort();
    }
    drop(control);
    result.map(|(r, _)| r)
}

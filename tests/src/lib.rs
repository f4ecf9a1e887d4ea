//! Shared helpers for remora's end-to-end tests: proxies on loopback ports, backends, third-party
//! clients (curl, h2load, Python grpcio and websockets), and readiness polling.
//!
//! Every wait is bounded and synchronises on a real condition (a bound port, `/ready`, a line
//! printed by a child), never on a fixed sleep.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_proxy::{Config, Proxy, ShutdownHandle, StaticDestination};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits on; generous so a loaded CI machine does not flake.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A config with every listener on a free loopback port, forwarding inbound to `app`.
pub fn config(app: SocketAddr) -> Config {
    Config {
        inbound_addr: loopback0(),
        outbound_addr: loopback0(),
        admin_addr: loopback0(),
        app_addr: app,
        ..Config::default()
    }
}

pub fn dest(name: &str, addrs: &[SocketAddr]) -> StaticDestination {
    StaticDestination::new(name, addrs)
}

/// A proxy running in this test's runtime (the same library the binary runs).
pub struct TestProxy {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: ShutdownHandle,
    pub task: Option<JoinHandle<remora_proxy::RunReport>>,
    /// The test's own Prometheus registry, with the proxy's metrics registered into it the way
    /// an embedding application does it; readable after the proxy's admin server has stopped.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// The static destinations, to change endpoint sets while the proxy runs.
    pub destinations: Arc<remora_proxy::discover::Static>,
}

impl TestProxy {
    pub async fn start(cfg: Config) -> TestProxy {
        let mut registry = prometheus_client::registry::Registry::default();
        let proxy = Proxy::builder()
            .config(cfg)
            .registry(&mut registry)
            .bind()
            .await
            .expect("proxy binds");
        let (inbound, outbound, admin) = (
            proxy.inbound_addr().expect("inbound listener"),
            proxy.outbound_addr().expect("outbound listener"),
            proxy.admin_addr().expect("admin listener"),
        );
        let shutdown = proxy.shutdown_handle();
        let registry = Arc::new(registry);
        let destinations = proxy.statics();
        let task = tokio::spawn(proxy.run(std::future::pending()));
        wait_ready(admin).await;
        TestProxy {
            inbound,
            outbound,
            admin,
            shutdown,
            task: Some(task),
            registry,
            destinations,
        }
    }

    /// The test registry in Prometheus text form (remora's metrics as the embedder sees them).
    pub fn encode_registry(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encodes");
        out
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await.expect("metrics");
        assert_eq!(status, 200);
        body
    }

    /// Stops the proxy and waits for its run to finish.
    pub async fn stop(mut self) -> remora_proxy::RunReport {
        self.shutdown.shutdown();
        let task = self.task.take().expect("running");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("proxy stops in time")
            .expect("proxy task")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        // A panic anywhere on the request path (caught, so the request only failed) is a test
        // failure, whatever the test itself checked.
        if !std::thread::panicking() {
            assert_eq!(
                remora_proxy::panics_caught(),
                0,
                "a proxy in this test binary caught a panic on the request path (see the BUG log line)"
            );
        }
    }
}

/// Polls `/ready` until it answers 200.
pub async fn wait_ready(admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok((200, _)) = http_get(admin, "/ready").await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.0 exchange for the admin server: returns status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("admin response timed out"))??;
    Ok(status_and_body(&buf))
}

/// Splits a raw HTTP/1 response into its status code and body.
pub fn status_and_body(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// Sums the values of every sample line that starts with `prefix` (name plus labels).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An HTTP app (HTTP/1.1 and HTTP/2) that reports what it received: status 200, headers
/// `x-echo-*` describing the request, the request body echoed back. Path `/headers` answers
/// with the received request headers as text, `/trailers` with the received request trailers; `/leaky` adds internal and hop-by-hop headers to
/// its response.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoApp {
    pub async fn start() -> EchoApp {
        let listener = TcpListener::bind(loopback0()).await.expect("bind echo app");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicU64::new(0));
        let conns = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let conn_id = conns.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| echo(req, conn_id));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        EchoApp {
            addr,
            connections,
            task,
        }
    }
}

async fn echo(req: Request<Incoming>, conn_id: u64) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut headers = String::new();
    for (k, v) in &parts.headers {
        headers.push_str(&format!(
            "{}: {}\n",
            k,
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    let (body, trailers) = match body.collect().await {
        Ok(b) => {
            let t = b.trailers().cloned();
            (b.to_bytes(), t)
        }
        Err(_) => (Bytes::new(), None),
    };
    let out = match parts.uri.path() {
        "/headers" => Bytes::from(headers),
        "/trailers" => {
            let mut text = String::new();
            for (k, v) in trailers.iter().flatten() {
                text.push_str(&format!(
                    "{}: {}\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            Bytes::from(text)
        }
        _ => body,
    };
    let mut rsp = Response::new(Full::new(out));
    let h = rsp.headers_mut();
    h.insert(
        "x-echo-method",
        parts.method.as_str().parse().expect("method"),
    );
    h.insert(
        "x-echo-version",
        format!("{:?}", parts.version).parse().expect("version"),
    );
    h.insert("x-echo-path", parts.uri.path().parse().expect("path"));
    h.insert(
        "x-echo-connection",
        conn_id.to_string().parse().expect("id"),
    );
    if parts.uri.path() == "/leaky" {
        h.insert("x-envoy-upstream-service-time", "7".parse().expect("v"));
        h.insert("x-remora-internal", "secret".parse().expect("v"));
        if parts.version < hyper::Version::HTTP_2 {
            h.insert("connection", "x-hop".parse().expect("v"));
            h.insert("x-hop", "1".parse().expect("v"));
            h.insert("keep-alive", "timeout=5".parse().expect("v"));
        }
    }
    Ok(rsp)
}

/// A TCP server that echoes until EOF, then closes its side (half-close round trip). With a
/// banner it speaks first, like SMTP or MySQL.
pub async fn tcp_echo(banner: Option<&'static [u8]>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(loopback0()).await.expect("bind tcp echo");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Some(b) = banner
                    && tcp.write_all(b).await.is_err()
                {
                    return;
                }
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// An address whose connects are refused: a loopback port bound but never listening.
///
/// The port stays bound (without `listen`, so connecting is refused) for the life of the test
/// binary: a released port could be handed straight to a proxy listener bound to port 0 in the
/// same test, which the proxy then rightly refuses as a loop, or to another test's server.
pub async fn refused_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(loopback0()).expect("bind");
    let a = socket.local_addr().expect("addr");
    // Leaked on purpose: the reservation must outlive every use of the address.
    std::mem::forget(socket);
    a
}

/// A server that accepts and immediately resets each connection.
pub async fn resetting_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(loopback0()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // Linger 0 makes the close an RST: the rudest upstream there is.
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(Duration::ZERO));
            drop(tcp);
        }
    });
    (addr, task)
}

pub fn py(script: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script)
}

/// A child process that printed `PORT <n>`; killed on drop (stdin closing also ends it).
pub struct Served {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts a Python helper that prints `PORT <n>` when it serves.
pub async fn python_server(script: &str, args: &[&str]) -> Served {
    let mut child = Command::new("python3")
        .arg(py(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("python3 {script}: {e}; run .ci/setup to install what the tests need")
        });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{script} did not start within {WAIT:?}"))
        .expect("read stdout")
        .unwrap_or_else(|| {
            panic!(
                "{script} exited before serving (is its Python package installed? run .ci/setup)"
            )
        });
    let port: u16 = line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{script} printed {line:?}, expected PORT <n>"));
    Served {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    }
}

/// Output of a finished client command.
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a client command to completion (bounded by [`WAIT`]).
pub async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}; run .ci/setup to install what the tests need"));
    let out = tokio::time::timeout(WAIT * 2, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .expect("wait");
    Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Runs the Python gRPC client and parses its JSON report.
pub async fn grpc_client(
    target: SocketAddr,
    authority: Option<&str>,
    args: &[&str],
) -> serde_json::Value {
    let script = py("grpc_client.py");
    let target = target.to_string();
    let mut all: Vec<&str> = vec![script.to_str().expect("utf-8 path"), &target];
    if let Some(a) = authority {
        all.push("--authority");
        all.push(a);
    }
    all.extend_from_slice(args);
    let out = run("python3", &all).await;
    assert_eq!(out.status, 0, "grpc client failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("grpc client output {:?}: {e}", out.stdout))
}

/// Opens a CONNECT tunnel through an outbound proxy; returns the stream after the 200.
pub async fn connect_tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    // Read the response head byte by byte so no tunnel byte is consumed.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("CONNECT reply")
            .expect("read");
        assert!(
            n == 1,
            "proxy closed during CONNECT: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "CONNECT answered {head:?}"
    );
    s
}

/// Two proxies in front of one app, giving the three paths every feature is tested through:
/// inbound (client → server proxy → app), outbound (client → client proxy → app) and
/// outbound→inbound (client → client proxy → server proxy → app).
pub struct Paths {
    pub server: TestProxy,
    pub client: TestProxy,
}

/// One way to reach the app: where to connect, and the authority to ask for.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub authority: &'static str,
}

impl Paths {
    pub async fn start(app: SocketAddr, tweak: impl Fn(&mut Config)) -> Paths {
        let mut cfg = config(app);
        tweak(&mut cfg);
        let server = TestProxy::start(cfg).await;
        let mut cfg = config(refused_addr().await);
        cfg.destinations = vec![
            dest("direct.test:80", &[app]),
            dest("mesh.test:80", &[server.inbound]),
        ];
        tweak(&mut cfg);
        let client = TestProxy::start(cfg).await;
        Paths { server, client }
    }

    pub fn routes(&self) -> [Route; 3] {
        [
            Route {
                name: "inbound",
                addr: self.server.inbound,
                authority: "app.test:80",
            },
            Route {
                name: "outbound",
                addr: self.client.outbound,
                authority: "direct.test:80",
            },
            Route {
                name: "outbound->inbound",
                addr: self.client.outbound,
                authority: "mesh.test:80",
            },
        ]
    }
}

impl Route {
    /// curl's `--connect-to` value that sends `http://AUTHORITY/` to this route's listener.
    pub fn connect_to(&self) -> String {
        format!("{}:{}:{}", self.authority, self.addr.ip(), self.addr.port())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.authority, path)
    }
}

/// Runs curl against a route: `curl -sS --connect-to … ARGS… URL`.
pub async fn curl(route: &Route, path: &str, args: &[&str]) -> Output {
    let connect_to = route.connect_to();
    let url = route.url(path);
    let mut all = vec!["-sS", "--max-time", "60", "--connect-to", &connect_to];
    all.extend_from_slice(args);
    all.push(&url);
    run("curl", &all).await
}

/// Header value from a `curl -D -` dump (last response wins), lower-cased name.
pub fn header<'a>(dump: &'a str, name: &str) -> Option<&'a str> {
    dump.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .next_back()
}

/// The status code of the last response in a `curl -D -` dump.
pub fn status(dump: &str) -> u16 {
    dump.lines()
        .filter(|l| l.starts_with("HTTP/"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// A file of `len` pseudo-random bytes in a fresh temporary directory.
pub fn random_file(len: usize) -> (PathBuf, Vec<u8>) {
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let dir = fresh_temp_dir();
    let path = dir.join("body.bin");
    std::fs::write(&path, &data).expect("write body");
    (path, data)
}

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// A directory no one has used before. The process id alone is not enough: PIDs are small and
/// reused in CI containers, and a directory left by an earlier test binary with the same PID
/// once made `Pki::new` find "a CA already there". `create_dir` (not `_all`) refuses an
/// existing directory, so a collision moves on to the next name instead of sharing it.
pub fn fresh_temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "remora-test-{}-{nanos:x}-{}",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("temp dir {}: {e}", dir.display()),
        }
    }
}

/// Polls `cond` until it holds (bounded by [`WAIT`]).
pub async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A throwaway PKI for mTLS tests: a CA (`remora ca init` layout) and workload identities in
/// the Secret layout (`tls.crt`, `tls.key`, `ca.crt`).
pub struct Pki {
    pub dir: PathBuf,
    pub issuer: remora_certs::ca::LoadedIssuer,
    pub trust_domain: String,
}

impl Pki {
    pub fn new(trust_domain: &str) -> Pki {
        let (file, _) = random_file(1);
        let dir = file.with_file_name("ca");
        remora_certs::ca::init_dir(&dir, trust_domain).expect("CA");
        let issuer = remora_certs::ca::LoadedIssuer::from_dir(&dir).expect("issuer");
        Pki {
            dir,
            issuer,
            trust_domain: trust_domain.to_string(),
        }
    }

    pub fn id(&self, sa: &str) -> remora_certs::SpiffeId {
        remora_certs::SpiffeId::workload(&self.trust_domain, "default", sa).expect("id")
    }

    pub fn leaf(&self, sa: &str) -> remora_certs::ca::Leaf {
        remora_certs::ca::issue_with_new_key(&self.issuer, &self.id(sa), Duration::from_secs(3600))
            .expect("leaf")
    }

    /// A fresh identity directory for service account `sa`.
    pub fn identity_dir(&self, sa: &str) -> PathBuf {
        let (file, _) = random_file(1);
        let dir = file.with_file_name(format!("id-{sa}"));
        self.leaf(sa).write(&dir).expect("write identity");
        dir
    }
}

/// Files of an identity dir, as curl and Python want them.
pub struct IdFiles {
    pub ca: String,
    pub crt: String,
    pub key: String,
}

pub fn id_files(dir: &std::path::Path) -> IdFiles {
    let s = |f: &str| dir.join(f).to_str().expect("utf-8").to_string();
    IdFiles {
        ca: s("ca.crt"),
        crt: s("tls.crt"),
        key: s("tls.key"),
    }
}

/// curl over mTLS to a proxy's inbound, asking for `sni` (`--resolve` maps it to `addr`).
pub async fn curl_mtls(
    addr: SocketAddr,
    sni: &str,
    path: &str,
    id: Option<&IdFiles>,
    ca: &str,
    extra: &[&str],
) -> Output {
    let resolve = format!("{sni}:{}:{}", addr.port(), addr.ip());
    let url = format!("https://{sni}:{}{path}", addr.port());
    let mut args = vec![
        "-sS",
        "--max-time",
        "30",
        "--resolve",
        &resolve,
        "--cacert",
        ca,
    ];
    if let Some(id) = id {
        args.extend(["--cert", &id.crt, "--key", &id.key]);
    }
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args).await
}
pub mod control;
pub mod kube;
pub mod netns;

/// Asserts that an h2load run (its `Output`) completed requests and none failed: no failed,
/// errored or timed-out request and no 4xx/5xx answer.
pub fn assert_no_failures(out: &Output) {
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default();
    assert!(
        line.contains(" 0 failed, 0 errored, 0 timeout"),
        "{line}\n{}",
        out.stdout
    );
    assert!(out.stdout.contains(" 0 4xx, 0 5xx"), "{}", out.stdout);
    assert!(!line.contains(" 0 succeeded"), "{line}");
}

/// Bounded steady load: h2load for `secs` seconds at 100 requests/s (2 connections, 4 streams
/// each) through `outbound` to `authority`; await the handle for its output.
pub fn steady_h2load(
    outbound: SocketAddr,
    authority: &str,
    secs: u64,
) -> tokio::task::JoinHandle<Output> {
    let url = format!("http://{outbound}/");
    let authority = format!(":authority: {authority}");
    tokio::spawn(async move {
        run(
            "h2load",
            &[
                "-c",
                "2",
                "-m",
                "4",
                "--rps",
                "100",
                "-D",
                &secs.to_string(),
                "-H",
                &authority,
                &url,
            ],
        )
        .await
    })
}

//! Issue 12's scale figures: the control plane on a real kube-apiserver with 1,000 Services × 10
//! endpoints and 100 watching proxies, then 10,000 services × 10 endpoints on the file source,
//! with memory per service and per watch.
//!
//! Part 1 (Kubernetes). `tests/kube/cluster.sh start` runs etcd + kube-apiserver on loopback,
//! pinned with this process to CPU 1; `remora control --kubernetes` runs alone on CPU 0, so the
//! CPU and RSS read from /proc are its own. No controllers run, so this process writes what the
//! endpointslice controller would: one Namespace, the Services (port `http` 80 → 8080) and one
//! EndpointSlice per Service (port `http` 8080, 10 ready endpoints), by server-side apply over
//! one HTTP/2 connection (the admin client certificate), 8 requests in flight. Write latency is
//! measured from just before the PATCH is sent, so it includes the API server and etcd.
//!   - A first control plane starts on the empty cluster (RSS with nothing listed) and follows
//!     the whole load as watch events; a fence write after the load tells when it has caught up.
//!   - A second control plane starts on the loaded cluster: time, CPU and RSS to its first
//!     synced table (/ready). The watchers then connect to it: one TLS connection per proxy,
//!     10 watches each, of which 5 are the same "hot" services for every proxy (so one write
//!     fans out to every proxy) and 5 are spread over the rest.
//!   - Single writes: one hot service's slice gets a new last endpoint; the time until every
//!     watcher of it has a delta with that address. Then a burst: 100 slices applied at once.
//!
//! Part 2 (file source). The same table shape in a generated TOML file, in fresh processes
//! with 0, 1,000 and 10,000 services (RSS once ready, the lowest over 1 s), then 100 connections × 100 watches on the
//! 10,000 (one connection with one watch each first, so connection and watch costs separate),
//! and one file edit moving an endpoint in 100 services.
//!
//! Every wait is bounded; readiness is /ready of the control plane and the watchers' messages.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use remora_api::client::ControlClient;
use remora_api::update::Kind;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{Guard, cpu_seconds, rss_kib, workspace};

const TD: &str = "bench.local";
const NS: &str = "bench";
/// Endpoints per service.
const PER: usize = 10;
/// Services every proxy watches (the fan-out targets of the single writes).
const HOT: usize = 5;
/// Requests in flight to the API server while loading.
const LOAD_CONCURRENCY: usize = 8;

fn name(i: usize) -> String {
    format!("svc-{i}.{NS}.svc.cluster.local:80")
}

/// Endpoint `e` of service `i`; the last one moves with the service's generation, so every
/// write puts an address no watcher has seen yet.
fn endpoint_ip(i: usize, e: usize, generation: u32) -> String {
    let last = if e + 1 == PER { generation as usize } else { 0 };
    format!("10.{}.{}.{}", i / 250, i % 250, e + 1 + last)
}

fn moved_addr(i: usize, generation: u32) -> String {
    format!("{}:8080", endpoint_ip(i, PER - 1, generation))
}

/// `n` distinct free loopback ports, held together while picking so they differ.
fn ports<const N: usize>() -> Result<[u16; N], String> {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind a free port: {e}")))
        .collect::<Result<_, _>>()?;
    let mut out = [0u16; N];
    for (o, l) in out.iter_mut().zip(&held) {
        *o = l.local_addr().map_err(|e| e.to_string())?.port();
    }
    Ok(out)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The API server.

/// etcd + kube-apiserver from `tests/kube/cluster.sh`, stopped on drop.
struct ApiServer {
    dir: PathBuf,
    port: u16,
    script: PathBuf,
}

impl ApiServer {
    fn start(dir: PathBuf) -> Result<ApiServer, String> {
        let script = workspace().join("tests/kube/cluster.sh");
        let mut last = String::new();
        // A port picked here can be taken before the server binds it; a new set fixes that.
        for _ in 0..3 {
            let [kube, etcd, peer] = ports::<3>()?;
            // Pinned to CPU 1 with the watchers (children inherit the affinity): CPU 0 is the
            // control plane's alone.
            let out = Command::new("taskset")
                .args(["-c", "1", "bash"])
                .arg(&script)
                .arg("start")
                .arg(&dir)
                .env("KUBE_PORT", kube.to_string())
                .env("ETCD_PORT", etcd.to_string())
                .env("ETCD_PEER_PORT", peer.to_string())
                .output()
                .map_err(|e| format!("bash {}: {e}", script.display()))?;
            let server = ApiServer {
                dir: dir.clone(),
                port: kube,
                script: script.clone(),
            };
            if out.status.success() && dir.join("kubeconfig").exists() {
                return Ok(server);
            }
            last = format!(
                "{}{}\n--- apiserver.log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&dir.join("apiserver.log"), 20)
            );
        }
        Err(format!(
            "the API server did not start ({} start, 3 tries; run `{} build` once per machine):\n{last}",
            script.display(),
            script.display()
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // `stop` waits until both have exited.
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// One HTTP/2 connection to the API server as the cluster admin.
#[derive(Clone)]
struct Kube {
    port: u16,
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl Kube {
    async fn connect(dir: &Path, port: u16) -> Result<Kube, String> {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
        };
        let pki = dir.join("pki");
        let certs = |f: &str| -> Result<Vec<CertificateDer<'static>>, String> {
            CertificateDer::pem_file_iter(pki.join(f))
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", pki.join(f).display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("ca.crt")? {
            roots.add(c).map_err(|e| format!("ca.crt: {e}"))?;
        }
        let key = PrivateKeyDer::from_pem_file(pki.join("admin.key"))
            .map_err(|e| format!("admin.key: {e}"))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(remora_certs::crypto::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs("admin.crt")?, key)
            .map_err(|e| format!("admin client certificate: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("API server 127.0.0.1:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST)), tcp)
            .await
            .map_err(|e| format!("API server TLS: {e}"))?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .map_err(|e| format!("API server HTTP/2: {e}"))?;
        tokio::spawn(conn);
        Ok(Kube { port, send })
    }

    /// Server-side apply (JSON is YAML) of the object at `path`.
    async fn apply(&self, path: &str, body: String) -> Result<(), String> {
        let req = http::Request::builder()
            .method("PATCH")
            .uri(format!(
                "https://127.0.0.1:{}{path}?fieldManager=bench&force=true",
                self.port
            ))
            .header("content-type", "application/apply-patch+yaml")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let mut send = self.send.clone();
        send.ready()
            .await
            .map_err(|e| format!("PATCH {path}: {e}"))?;
        let rsp = send
            .send_request(req)
            .await
            .map_err(|e| format!("PATCH {path}: {e}"))?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("PATCH {path}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "PATCH {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(())
    }

    /// Applies every `(path, body)`, `LOAD_CONCURRENCY` at a time.
    async fn apply_all(&self, items: Vec<(String, String)>) -> Result<(), String> {
        let permits = Arc::new(tokio::sync::Semaphore::new(LOAD_CONCURRENCY));
        let mut set = tokio::task::JoinSet::new();
        for (path, body) in items {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let kube = self.clone();
            set.spawn(async move {
                let r = kube.apply(&path, body).await;
                drop(permit);
                r
            });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        Ok(())
    }
}

fn namespace_item() -> (String, String) {
    (
        format!("/api/v1/namespaces/{NS}"),
        format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{NS}"}}}}"#),
    )
}

fn service_item(i: usize) -> (String, String) {
    (
        format!("/api/v1/namespaces/{NS}/services/svc-{i}"),
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{i}","namespace":"{NS}"}},"spec":{{"ports":[{{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}}]}}}}"#
        ),
    )
}

fn slice_item(i: usize, generation: u32) -> (String, String) {
    let endpoints: Vec<String> = (0..PER)
        .map(|e| {
            format!(
                r#"{{"addresses":["{}"],"conditions":{{"ready":true,"serving":true,"terminating":false}}}}"#,
                endpoint_ip(i, e, generation)
            )
        })
        .collect();
    (
        format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/svc-{i}-x1"),
        format!(
            r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"svc-{i}-x1","namespace":"{NS}","labels":{{"kubernetes.io/service-name":"svc-{i}"}}}},"addressType":"IPv4","ports":[{{"name":"http","port":8080,"protocol":"TCP"}}],"endpoints":[{}]}}"#,
            endpoints.join(",")
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// The control plane and its watchers.

/// `remora control` on CPU 0, stderr kept in a log for the error message if it fails.
struct Control {
    guard: Guard,
    port: u16,
    admin: u16,
    log: PathBuf,
    dir: PathBuf,
    started: Instant,
}

impl Control {
    fn start(bin: &Path, dir: &Path, tag: &str, source: &[&str]) -> Result<Control, String> {
        let [port, admin] = ports::<2>()?;
        let log = dir.join(format!("control-{tag}.log"));
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let ca = dir.join("ca");
        let tokens = dir.join("tokens");
        let (addr, admin_addr) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
        let mut args: Vec<&str> = vec![
            "control",
            "--issuer",
            ca.to_str().unwrap_or(""),
            "--trust-domain",
            TD,
            "--bootstrap-tokens",
            tokens.to_str().unwrap_or(""),
            "--addr",
            &addr,
            "--admin-addr",
            &admin_addr,
            // Every proxy here connects from 127.0.0.1; in a cluster each has its own IP, so
            // the per-client limit (64) would not apply to them.
            "--max-connections-per-peer",
            "1024",
        ];
        args.extend_from_slice(source);
        let started = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin)
            .args(&args)
            .env("REMORA_LOG", "warn")
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(Control {
            guard: Guard(child),
            port,
            admin,
            log,
            dir: dir.to_path_buf(),
            started,
        })
    }

    fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    /// Blocks until /ready answers 200 (the source has published its first table); how long
    /// that took from the start.
    fn wait_ready(&mut self, limit: Duration) -> Result<Duration, String> {
        let deadline = self.started + limit;
        loop {
            if let Ok(Some(status)) = self.guard.0.try_wait() {
                return Err(format!(
                    "the control plane exited ({status}) before it was ready; its log:\n{}",
                    tail(&self.log, 20)
                ));
            }
            if crate::admin_get(self.admin, "/ready").starts_with("HTTP/1.1 200")
                || crate::admin_get(self.admin, "/ready").starts_with("HTTP/1.0 200")
            {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the control plane was not ready after {limit:?}; its log:\n{}",
                    tail(&self.log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn client(&self) -> Result<ControlClient, String> {
        ControlClient::new(
            vec![format!("127.0.0.1:{}", self.port)],
            Some(remora_certs::identity::default_control_identity(TD)?),
            self.dir.join("ca/ca.crt"),
            Arc::new(|| Some(TD.to_string())),
        )
    }

    /// A gauge from /metrics, e.g. `remora_control_watches`.
    fn gauge(&self, metric: &str) -> Option<f64> {
        crate::admin_get(self.admin, "/metrics")
            .lines()
            .find_map(|l| {
                l.strip_prefix(metric)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
    }
}

/// The lowest RSS over one second, sampled every 50 ms: the file source re-reads its whole
/// file every 500 ms (9.6 MB at 10,000 services), and a reading taken while that buffer is
/// live would charge it to whatever was just added.
async fn settled_rss(pid: u32) -> u64 {
    let mut low = u64::MAX;
    for _ in 0..20 {
        low = low.min(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    low
}

/// RSS after the control plane reloaded the file: the same table with a new first line, so
/// nothing changes for watchers, but every reload ends in `release_memory` (malloc_trim), which
/// gives back the heap the TOML parse freed. The RSS at /ready still holds that garbage (the
/// first load is not trimmed), and later allocations reuse it, which made watch costs
/// measured against it vary by 2× between runs.
async fn trimmed_rss(cp: &Control, eps: &Path, text: &str) -> Result<u64, String> {
    const RELOADS: &str = "remora_control_source_reloads_total";
    let before = cp
        .gauge(RELOADS)
        .ok_or("no source_reloads counter in /metrics")?;
    write_atomic(eps, &format!("# reload {before}\n{text}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cp.gauge(RELOADS).unwrap_or(before) <= before {
        if Instant::now() > deadline {
            return Err("the control plane did not reload the endpoints file in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(settled_rss(cp.pid()).await)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// One message a watcher got.
struct Seen {
    service: usize,
    /// Snapshot: the endpoint count; `None` for a delta (or anything else).
    snapshot: Option<usize>,
    added: Vec<String>,
    error: Option<String>,
    at: Instant,
}

/// Starts one watch of service `i` on `client`; every message is reported on `tx`.
fn watch(client: &ControlClient, i: usize, who: String, tx: UnboundedSender<Seen>) {
    let client = client.clone();
    tokio::spawn(async move {
        let req = remora_api::WatchRequest {
            service: name(i),
            client: who,
            namespace: String::new(),
        };
        let seen = |snapshot, added, error| Seen {
            service: i,
            snapshot,
            added,
            error,
            at: Instant::now(),
        };
        let mut stream = match client.discovery().watch(req).await {
            Ok(rsp) => rsp.into_inner(),
            Err(s) => {
                let _ = tx.send(seen(None, vec![], Some(s.message().to_string())));
                return;
            }
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(u)) => match u.kind {
                    Some(Kind::Snapshot(s)) => seen(
                        Some(s.endpoints.len()),
                        s.endpoints.into_iter().map(|e| e.addr).collect(),
                        None,
                    ),
                    Some(Kind::Delta(d)) => {
                        seen(None, d.add.into_iter().map(|e| e.addr).collect(), None)
                    }
                    Some(Kind::NoSuchService(_)) | Some(Kind::Alias(_)) | None => {
                        seen(None, vec![], None)
                    }
                },
                Ok(None) => seen(None, vec![], Some("the watch ended".into())),
                Err(s) => seen(None, vec![], Some(s.message().to_string())),
            };
            let end = msg.error.is_some();
            if tx.send(msg).is_err() || end {
                return;
            }
        }
    });
}

/// Receives until `n` messages matched `want`; the arrival time of the last one. A watch error
/// ends the wait with it.
async fn collect(
    rx: &mut UnboundedReceiver<Seen>,
    n: usize,
    limit: Duration,
    what: &str,
    mut want: impl FnMut(&Seen) -> Result<bool, String>,
) -> Result<Instant, String> {
    let deadline = tokio::time::Instant::now() + limit;
    let (mut got, mut last) = (0, Instant::now());
    while got < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(s)) => {
                if let Some(e) = &s.error {
                    return Err(format!(
                        "{what}: a watch of {} failed: {e}",
                        name(s.service)
                    ));
                }
                if want(&s)? {
                    got += 1;
                    last = s.at;
                }
            }
            Ok(None) => return Err(format!("{what}: every watcher is gone")),
            Err(_) => return Err(format!("{what}: {got} of {n} arrived within {limit:?}")),
        }
    }
    Ok(last)
}

/// A snapshot with all `PER` endpoints, counted once per watch.
fn full_snapshot(s: &Seen) -> Result<bool, String> {
    match s.snapshot {
        Some(PER) => Ok(true),
        Some(n) => Err(format!(
            "{} came with {n} endpoints, not {PER}",
            name(s.service)
        )),
        None => Ok(false),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------

struct Sizes {
    services: usize,
    proxies: usize,
    writes: usize,
    burst: usize,
    file_steps: Vec<usize>,
    file_conns: usize,
    file_watches_each: usize,
}

pub fn run(quick: bool) -> Result<(), String> {
    let sizes = if quick {
        Sizes {
            services: 50,
            proxies: 10,
            writes: 5,
            burst: 20,
            file_steps: vec![0, 500],
            file_conns: 10,
            file_watches_each: 10,
        }
    } else {
        Sizes {
            services: 1000,
            proxies: 100,
            writes: 20,
            burst: 100,
            file_steps: vec![0, 1000, 10_000],
            file_conns: 100,
            file_watches_each: 100,
        }
    };
    let total = Instant::now();
    let bin = crate::build_bin("remora")?;
    // Before the pinning below, which would make it 1.
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // This process (the watchers' client code, and the API server it starts) on CPU 1; the
    // control plane gets CPU 0 alone. Threads made later inherit the affinity.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let dir = std::env::temp_dir().join(format!("remora-bench-kube-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    remora_certs::ca::init_dir(&dir.join("ca"), TD).map_err(|e| e.to_string())?;
    // No proxy certifies here: Watch needs no client certificate. The flag is still required.
    std::fs::write(dir.join("tokens"), "").map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // tonic's lazy channels spawn their workers on the current runtime.
    let _enter = rt.enter();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut report = String::new();
    let mut row = |k: &str, v: String| {
        println!("  {k}: {v}");
        let _ = writeln!(report, "| {k} | {v} |");
    };
    let result = rt.block_on(async {
        kube_part(&bin, &dir, &sizes, &mut row).await?;
        file_part(&bin, &dir, &sizes, &mut row).await
    });
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let took = total.elapsed();
    println!("kube-scale took {:.0} s", took.as_secs_f64());
    if !quick {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                Some(
                    l.strip_prefix("model name")?
                        .trim_start_matches([' ', '\t', ':'])
                        .to_string(),
                )
            })
            .unwrap_or_default();
        let out = workspace().join("benches/results/kube-scale.md");
        let text = format!(
            "# Control plane at scale: {} Services on a real API server, {} on the file source\n\n\
             Made by `cargo run -p benches --release -- kube-scale` ({:.0} s in all). Machine: {cores} × {cpu}, \
             load average at the start `{}` (a shared VM: other builds may run alongside). \
             `remora control` (release) runs alone on CPU 0; etcd, kube-apiserver v1.20.2 \
             (`tests/kube/cluster.sh`) and the watchers' client code share CPU 1. CPU is utime+stime and \
             memory VmRSS of the control plane process, from /proc.\n\n\
             Kubernetes: one Namespace, Services with one port (`http` 80 → 8080) and one EndpointSlice \
             each (10 ready endpoints), written by server-side apply over one HTTP/2 connection, {LOAD_CONCURRENCY} \
             requests in flight. Each of the {} proxies has its own TLS connection and watches 10 services: \
             the same {HOT} hot ones, and 5 of the rest. A write's latency runs from just before its PATCH \
             is sent until the last watcher of that service has the delta, so it includes the API server \
             and etcd.\n\n\
             File source: a generated TOML file, every step in a fresh process. RSS is the lowest over 1 s (the file's 500 ms re-read would add its buffer otherwise), \
             read once ready and after a reload of the same table: each reload ends in malloc_trim, which returns the heap the first parse left behind; \
             connection and watch costs are measured between such readings. \
             The watches are {} connections × {}.\n\n\
             | measure | result |\n|---|---|\n{report}",
            sizes.services,
            sizes.file_steps.last().copied().unwrap_or(0),
            took.as_secs_f64(),
            load.trim(),
            sizes.proxies,
            sizes.file_conns,
            sizes.file_watches_each,
        );
        std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

async fn kube_part(
    bin: &Path,
    dir: &Path,
    sz: &Sizes,
    row: &mut impl FnMut(&str, String),
) -> Result<(), String> {
    let n = sz.services;
    println!(
        "Kubernetes: {n} Services × {PER} endpoints, {} proxies × 10 watches",
        sz.proxies
    );
    let t0 = Instant::now();
    let api = ApiServer::start(dir.join("kube"))?;
    row(
        "etcd + kube-apiserver start (script, until EndpointSlices are served)",
        format!("{:.1} s", t0.elapsed().as_secs_f64()),
    );
    let kubeconfig = api.dir.join("kubeconfig");
    let kube_args = [
        "--kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap_or(""),
    ];
    let kube = Kube::connect(&api.dir, api.port).await?;
    kube.apply_all(vec![namespace_item()]).await?;
    let mut generation = vec![0u32; n];

    // A control plane on the empty cluster follows the load as it happens.
    let mut cp1 = Control::start(bin, dir, "follow", &kube_args)?;
    cp1.wait_ready(Duration::from_secs(60))?;
    let (rss_empty, cpu_empty) = (rss_kib(cp1.pid()), cpu_seconds(cp1.pid()));
    row(
        "control plane RSS, synced on the empty cluster",
        mib(rss_empty),
    );
    // Its own channel: this watch fails when cp1 is stopped, and must not end a later wait.
    let (fence_tx, mut fence_rx) = unbounded_channel();
    let fence_client = cp1.client()?;
    watch(&fence_client, 0, "fence".into(), fence_tx);

    let t0 = Instant::now();
    kube.apply_all((0..n).map(service_item).collect()).await?;
    let services_took = t0.elapsed();
    kube.apply_all((0..n).map(|i| slice_item(i, 0)).collect())
        .await?;
    let load_took = t0.elapsed();
    row(
        &format!("load: {n} Services + {n} EndpointSlices ({LOAD_CONCURRENCY} in flight)"),
        format!(
            "{:.1} s ({:.1} s for the Services), {:.1} ms per object",
            load_took.as_secs_f64(),
            services_took.as_secs_f64(),
            load_took.as_secs_f64() * 1e3 / (2 * n) as f64
        ),
    );
    // The fence: slice 0 rewritten after everything; slice events arrive in order, so when it
    // shows the control plane has seen every slice before it.
    generation[0] += 1;
    let fence = moved_addr(0, generation[0]);
    let (path, body) = slice_item(0, generation[0]);
    kube.apply(&path, body).await?;
    collect(
        &mut fence_rx,
        1,
        Duration::from_secs(60),
        "the fence",
        |s| Ok(s.added.contains(&fence)),
    )
    .await?;
    let caught_up = t0.elapsed();
    let services_known = cp1.gauge("remora_control_services").unwrap_or(0.0);
    let rss_followed = rss_kib(cp1.pid());
    row(
        "control plane following the load as watch events",
        format!(
            "caught up {:.2} s after the load ended, {:.2} s CPU for {} objects, RSS {} ({services_known:.0} names published)",
            (caught_up - load_took).as_secs_f64(),
            cpu_seconds(cp1.pid()) - cpu_empty,
            2 * n,
            mib(rss_followed)
        ),
    );
    drop(fence_client);
    drop(cp1);
    drop(fence_rx);

    // A control plane that starts on the loaded cluster: the initial list.
    let (tx, mut rx) = unbounded_channel();
    let mut cp = Control::start(bin, dir, "sync", &kube_args)?;
    let ready = cp.wait_ready(Duration::from_secs(120))?;
    let pid = cp.pid();
    let (rss_sync, cpu_sync) = (rss_kib(pid), cpu_seconds(pid));
    row(
        "fresh control plane on the loaded cluster: start to /ready (listed, table published)",
        format!(
            "{:.2} s, {:.2} s CPU (start-up included), RSS {}",
            ready.as_secs_f64(),
            cpu_sync,
            mib(rss_sync)
        ),
    );
    row(
        "memory per Service (10 endpoints), Kubernetes source",
        format!(
            "{:.1} KiB ((RSS synced − RSS synced on the empty cluster) / {n})",
            (rss_sync as f64 - rss_empty as f64) / n as f64
        ),
    );

    // The fleet: one connection per proxy, the hot services plus 5 spread ones each.
    let spread = n - HOT;
    let watched: Vec<Vec<usize>> = (0..sz.proxies)
        .map(|p| {
            (0..HOT)
                .chain((0..5).map(|k| HOT + (p * 5 + k) % spread))
                .collect()
        })
        .collect();
    let watchers: HashMap<usize, usize> =
        watched.iter().flatten().fold(HashMap::new(), |mut m, &s| {
            *m.entry(s).or_default() += 1;
            m
        });
    let total_watches: usize = watched.iter().map(Vec::len).sum();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let clients: Vec<ControlClient> = (0..sz.proxies)
        .map(|_| cp.client())
        .collect::<Result<_, _>>()?;
    for (p, list) in watched.iter().enumerate() {
        for &s in list {
            watch(&clients[p], s, format!("proxy-{p}"), tx.clone());
        }
    }
    collect(
        &mut rx,
        total_watches,
        Duration::from_secs(60),
        "snapshots",
        full_snapshot,
    )
    .await?;
    let rss_watched = rss_kib(pid);
    row(
        &format!(
            "{} proxies (one TLS connection each) × 10 watches = {total_watches}: all snapshots",
            sz.proxies
        ),
        format!(
            "{:.0} ms, {:.2} s CPU, RSS {} ({:.1} KiB per watch, connections included)",
            t0.elapsed().as_secs_f64() * 1e3,
            cpu_seconds(pid) - cpu0,
            mib(rss_watched),
            (rss_watched as f64 - rss_sync as f64) / total_watches as f64
        ),
    );

    // Single writes, each to a hot service: every proxy watches it.
    let (mut last_lat, mut first_lat) = (Vec::new(), Vec::new());
    for w in 0..sz.writes {
        let s = w % HOT;
        generation[s] += 1;
        let addr = moved_addr(s, generation[s]);
        let (path, body) = slice_item(s, generation[s]);
        let start = Instant::now();
        kube.apply(&path, body).await?;
        let mut first = None;
        let last = collect(
            &mut rx,
            watchers[&s],
            Duration::from_secs(30),
            "a write's deltas",
            |m| {
                let hit = m.service == s && m.added.contains(&addr);
                if hit && first.is_none() {
                    first = Some(m.at);
                }
                Ok(hit)
            },
        )
        .await?;
        last_lat.push((last - start).as_secs_f64() * 1e3);
        first_lat.push((first.unwrap_or(last) - start).as_secs_f64() * 1e3);
    }
    last_lat.sort_by(f64::total_cmp);
    first_lat.sort_by(f64::total_cmp);
    row(
        &format!(
            "one slice write → every watcher ({} watchers, {} writes)",
            watchers[&0], sz.writes
        ),
        format!(
            "last watcher p50 {:.1} ms, max {:.1} ms; first watcher p50 {:.1} ms",
            percentile(&last_lat, 0.5),
            percentile(&last_lat, 1.0),
            percentile(&first_lat, 0.5)
        ),
    );

    // The burst: `burst` slices at once (the hot ones among them).
    let mut want: HashMap<usize, String> = HashMap::new();
    let mut items = Vec::new();
    for (s, g) in generation.iter_mut().enumerate().take(sz.burst) {
        *g += 1;
        want.insert(s, moved_addr(s, *g));
        items.push(slice_item(s, *g));
    }
    let expect: usize = want
        .keys()
        .map(|s| watchers.get(s).copied().unwrap_or(0))
        .sum();
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let k2 = kube.clone();
    let writes = tokio::spawn(async move {
        let r = k2.apply_all(items).await;
        (r, Instant::now())
    });
    let last = collect(
        &mut rx,
        expect,
        Duration::from_secs(60),
        "the burst's deltas",
        |m| Ok(want.get(&m.service).is_some_and(|a| m.added.contains(a))),
    )
    .await?;
    let (written, acked) = writes.await.map_err(|e| e.to_string())?;
    written?;
    let cpu_burst = cpu_seconds(pid) - cpu0;
    row(
        &format!(
            "burst: {} slices applied at once ({LOAD_CONCURRENCY} in flight) → {expect} deltas",
            sz.burst.min(n)
        ),
        format!(
            "all delivered {:.0} ms after the first PATCH (writes acknowledged at {:.0} ms), {:.0} ms control-plane CPU",
            (last - start).as_secs_f64() * 1e3,
            (acked - start).as_secs_f64() * 1e3,
            cpu_burst * 1e3
        ),
    );
    row("control plane RSS at the end", mib(rss_kib(pid)));
    drop(clients);
    drop(cp);
    drop(api);
    Ok(())
}

/// The endpoints file; `generation` moves the last endpoint of the first `moved` services.
fn endpoints_file(services: usize, moved: usize, generation: u32) -> String {
    // An empty file is refused as a write in progress; a comment says "no services" on purpose.
    let mut out = String::with_capacity(services * PER * 100);
    out.push_str("# generated by benches kube-scale\n");
    for i in 0..services {
        let _ = writeln!(out, "[[service]]\nname = \"{}\"\nendpoints = [", name(i));
        let g = if i < moved { generation } else { 0 };
        for e in 0..PER {
            let _ = writeln!(
                out,
                "  {{ addr = \"{}:8080\", identity = \"spiffe://{TD}/ns/{NS}/sa/svc-{i}\" }},",
                endpoint_ip(i, e, g)
            );
        }
        out.push_str("]\n");
    }
    out
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn file_part(
    bin: &Path,
    dir: &Path,
    sz: &Sizes,
    row: &mut impl FnMut(&str, String),
) -> Result<(), String> {
    let n = sz.file_steps.last().copied().unwrap_or(0);
    println!(
        "file source: {:?} services × {PER} endpoints, {} connections × {} watches",
        sz.file_steps, sz.file_conns, sz.file_watches_each
    );
    let eps = dir.join("endpoints.toml");
    let eps_arg = eps.to_str().unwrap_or("").to_string();
    let (mut rss_empty, mut trimmed_empty) = (0, 0);
    let mut last = None;
    for (k, &services) in sz.file_steps.iter().enumerate() {
        let text = endpoints_file(services, 0, 0);
        write_atomic(&eps, &text)?;
        let mut cp = Control::start(
            bin,
            dir,
            &format!("file-{services}"),
            &["--endpoints-file", &eps_arg],
        )?;
        let ready = cp.wait_ready(Duration::from_secs(120))?;
        let cpu = cpu_seconds(cp.pid());
        let rss = settled_rss(cp.pid()).await;
        let trimmed = trimmed_rss(&cp, &eps, &text).await?;
        if services == 0 {
            (rss_empty, trimmed_empty) = (rss, trimmed);
            row(
                "file source, 0 services: RSS once ready; after a reload",
                format!("{}; {}", mib(rss), mib(trimmed)),
            );
        } else {
            let per = |a: u64, b: u64| (a as f64 - b as f64) / services as f64;
            row(
                &format!(
                    "file source, {services} services ({:.1} MB of TOML): RSS once ready; after a reload",
                    text.len() as f64 / 1e6
                ),
                format!(
                    "ready in {:.2} s ({cpu:.2} s CPU); {} = {:.1} KiB per service; {} = {:.1} KiB per service",
                    ready.as_secs_f64(),
                    mib(rss),
                    per(rss, rss_empty),
                    mib(trimmed),
                    per(trimmed, trimmed_empty)
                ),
            );
        }
        if k + 1 == sz.file_steps.len() {
            last = Some((cp, text));
        }
    }
    let (cp, text) = last.ok_or("no file-source steps")?;
    let pid = cp.pid();
    let rss_loaded = trimmed_rss(&cp, &eps, &text).await?;
    let (tx, mut rx) = unbounded_channel();
    let clients: Vec<ControlClient> = (0..sz.file_conns)
        .map(|_| cp.client())
        .collect::<Result<_, _>>()?;
    // Service of watch k on connection c: every watch a different service (as far as they go).
    let svc = |c: usize, k: usize| (c * sz.file_watches_each + k) % n;
    // One watch per connection first, so the connection's own cost shows apart from a watch's.
    let t0 = Instant::now();
    for (c, client) in clients.iter().enumerate() {
        watch(client, svc(c, 0), format!("conn-{c}"), tx.clone());
    }
    collect(
        &mut rx,
        sz.file_conns,
        Duration::from_secs(60),
        "snapshots",
        full_snapshot,
    )
    .await?;
    let took = t0.elapsed();
    let rss_conns = trimmed_rss(&cp, &eps, &text).await?;
    row(
        &format!("{} connections with 1 watch each", sz.file_conns),
        format!(
            "{:.0} ms, RSS {} ({:+.1} MiB; two readings of one table differ by MiBs, too coarse for a cost per connection)",
            took.as_secs_f64() * 1e3,
            mib(rss_conns),
            (rss_conns as f64 - rss_loaded as f64) / 1024.0
        ),
    );
    let more = sz.file_conns * (sz.file_watches_each - 1);
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    for (c, client) in clients.iter().enumerate() {
        for k in 1..sz.file_watches_each {
            watch(client, svc(c, k), format!("conn-{c}"), tx.clone());
        }
    }
    collect(
        &mut rx,
        more,
        Duration::from_secs(120),
        "snapshots",
        full_snapshot,
    )
    .await?;
    let took = t0.elapsed();
    let cpu_watches = cpu_seconds(pid) - cpu0;
    let rss_watches = trimmed_rss(&cp, &eps, &text).await?;
    let open = cp.gauge("remora_control_watches").unwrap_or(0.0);
    row(
        &format!(
            "+{more} watches ({} in all, {open:.0} open by /metrics)",
            sz.file_conns * sz.file_watches_each
        ),
        format!(
            "all snapshots in {:.0} ms, {:.2} s CPU, RSS {}: {:.1} KiB per watch",
            took.as_secs_f64() * 1e3,
            cpu_watches,
            mib(rss_watches),
            (rss_watches as f64 - rss_conns as f64) / more as f64
        ),
    );

    // One edit of the whole file, moving an endpoint in the first 100 services (each watched
    // once): the cost of re-reading a large table for a small change.
    let moved = 100.min(n);
    let expect = (0..moved)
        .filter(|&s| (0..sz.file_conns).any(|c| (0..sz.file_watches_each).any(|k| svc(c, k) == s)))
        .count();
    let text = endpoints_file(n, moved, 1);
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    write_atomic(&eps, &text)?;
    let last = collect(
        &mut rx,
        expect,
        Duration::from_secs(60),
        "the edit's deltas",
        |m| Ok(m.service < moved && m.added.contains(&moved_addr(m.service, 1))),
    )
    .await?;
    // The reload's CPU, not just until the deltas left: let it finish first.
    tokio::time::sleep(Duration::from_millis(600)).await;
    row(
        &format!(
            "file edit: {} endpoints re-read, {moved} services changed",
            n * PER
        ),
        format!(
            "{expect} deltas in {:.0} ms (includes up to 500 ms of file poll), {:.0} ms CPU",
            (last - start).as_secs_f64() * 1e3,
            (cpu_seconds(pid) - cpu0) * 1e3
        ),
    );
    row("file source: RSS at the end", mib(settled_rss(pid).await));
    drop(clients);
    drop(cp);
    Ok(())
}

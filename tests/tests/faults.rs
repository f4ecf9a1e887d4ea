//! Faults, each through real sockets: a backend killed mid-load, a backend that accepts and
//! never answers (hung), a slow backend, the control plane killed while certificates come due,
//! the identity files unreadable, and the proxy's clock jumping past its certificate's expiry
//! and back (libfaketime on the `remora-proxy` binary).
//!
//! Behaviour found missing is documented by `#[ignore]`d tests that say what is missing and
//! where; run them with `cargo test -p remora-tests --test faults -- --ignored`.
//!
//! Already covered elsewhere, not repeated here: the control plane down for 30 s while a proxy
//! serves its last endpoints and picks up new ones once it is back
//! (`control.rs::control_plane_down_for_30s_costs_no_request`), a replica dying
//! (`control.rs::two_replicas_one_dies`), and a killed gRPC backend under grpcio load
//! (`balance.rs::killed_backend_fails_only_requests_it_had`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::*;
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

// ---------------------------------------------------------------------------------------------
// Helpers (local to this file: tests/src/lib.rs is shared and edited by others).

/// An HTTP/1.1 + HTTP/2 backend that answers every request with its name, after `delay`.
/// [`Backend::kill`] drops its listener and every connection at once, as the kernel does for a
/// killed process.
struct Backend {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    async fn start(name: &'static str, delay: Duration) -> Backend {
        let listener = TcpListener::bind(loopback0()).await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let served = Arc::new(AtomicU64::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            // The connections live in this task's set, so aborting the task closes them all.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let count = count.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |_req| {
                                let count = count.clone();
                                async move {
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    count.fetch_add(1, Ordering::Relaxed);
                                    Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                        Bytes::from_static(name.as_bytes()),
                                    )))
                                }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(
                                TokioExecutor::new(),
                            )
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Backend {
            addr,
            served,
            task: Some(task),
        }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Kills it: the port refuses connections and every open connection closes.
    async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A backend that is hung: it accepts TCP connections and holds them, never reading or
/// answering (a deadlocked process whose kernel still completes handshakes).
struct Hung {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Hung {
    async fn start() -> Hung {
        let listener = TcpListener::bind(loopback0()).await.expect("bind hung");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(tcp);
            }
        });
        Hung {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An outbound-only proxy with one static destination `echo.test:80` over `addrs`.
async fn outbound_to(addrs: &[SocketAddr]) -> TestProxy {
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("echo.test:80", addrs)];
    TestProxy::start(cfg).await
}

async fn metrics_of(admin: SocketAddr) -> String {
    http_get(admin, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default()
}

/// `n` HTTP/2 GETs for `http://AUTHORITY/` on one connection to `proxy`, `c` in flight at a
/// time. Each result is the body of a 200 (the backend's name) or what went wrong.
async fn h2_gets(
    proxy: SocketAddr,
    authority: &str,
    n: usize,
    c: usize,
) -> Vec<Result<String, String>> {
    let tcp = TcpStream::connect(proxy).await.expect("connect proxy");
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake with the proxy");
    tokio::spawn(conn);
    let remaining = Arc::new(AtomicUsize::new(n));
    let uri = format!("http://{authority}/");
    let mut workers = JoinSet::new();
    for _ in 0..c {
        let (mut sender, remaining, uri) = (sender.clone(), remaining.clone(), uri.clone());
        workers.spawn(async move {
            let mut out = Vec::new();
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
                .is_ok()
            {
                let req = hyper::Request::get(&uri)
                    .version(hyper::Version::HTTP_2)
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let one = async {
                    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = rsp.status();
                    let body = rsp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("{status}, body cut: {e}"))?
                        .to_bytes();
                    let body = String::from_utf8_lossy(&body).to_string();
                    if status == 200 {
                        Ok(body)
                    } else {
                        Err(format!("{status}: {body}"))
                    }
                };
                out.push(
                    tokio::time::timeout(WAIT, one)
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}"))),
                );
            }
            out
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(w) = workers.join_next().await {
        all.extend(w.expect("load worker"));
    }
    all
}

/// Counts results per backend name; failures are returned apart.
fn tally(
    results: &[Result<String, String>],
) -> (std::collections::BTreeMap<&str, usize>, Vec<&str>) {
    let mut per = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(name) => *per.entry(name.as_str()).or_default() += 1,
            Err(e) => failed.push(e.as_str()),
        }
    }
    (per, failed)
}

/// `tests/py/grpc_deadline.py`: `n` unary calls with a `deadline_ms` deadline, `c` at a time.
async fn grpc_deadline(
    target: SocketAddr,
    authority: &str,
    deadline_ms: u64,
    n: usize,
    c: usize,
) -> serde_json::Value {
    let script = py("grpc_deadline.py");
    let out = run(
        "python3",
        &[
            script.to_str().expect("utf-8 path"),
            &target.to_string(),
            "--authority",
            authority,
            "--deadline-ms",
            &deadline_ms.to_string(),
            &n.to_string(),
            &c.to_string(),
        ],
    )
    .await;
    assert_eq!(out.status, 0, "grpc_deadline.py failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("grpc_deadline.py output {:?}: {e}", out.stdout))
}

fn code(r: &serde_json::Value, c: &str) -> u64 {
    r["codes"][c].as_u64().unwrap_or(0)
}

fn endpoint_metric(m: &str, name: &str, ep: SocketAddr) -> f64 {
    metric(m, name, &[("endpoint", &ep.to_string())])
}

/// One fresh TLS handshake to `inbound` as a peer proxy would; whether it succeeded and
/// whether the served leaf is the first certificate in `expect`.
async fn probe_tls(inbound: SocketAddr, client: &IdFiles, expect: &Path) -> (bool, bool) {
    let out = run(
        "python3",
        &[
            py("tls_probe.py").to_str().expect("utf-8"),
            "127.0.0.1",
            &inbound.port().to_string(),
            WEB_SNI,
            &client.ca,
            &client.crt,
            &client.key,
            expect.to_str().expect("utf-8"),
        ],
    )
    .await;
    let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap_or_default();
    (r["ok"] == true, r["match"] == true)
}

/// An mTLS request from `client` to `inbound`; returns the app's view of the request headers
/// on success, or curl's complaint.
async fn mtls_get(inbound: SocketAddr, client: &IdFiles) -> Result<String, String> {
    let out = curl_mtls(inbound, WEB_SNI, "/headers", Some(client), &client.ca, &[]).await;
    if out.status == 0 {
        Ok(out.stdout)
    } else {
        Err(format!("curl exit {}: {}", out.status, out.stderr.trim()))
    }
}

const WEB_SNI: &str = "web.default.sa.cluster.local";
const PROBE_ID: &str = "x-remora-client-id: spiffe://cluster.local/ns/default/sa/probe";

// ---------------------------------------------------------------------------------------------
// 1. A backend killed mid-load.

/// 1000 HTTP/2 GETs over two endpoints, one killed (listener and connections) once it has
/// served 20: the GETs it held are retried on the other endpoint (they are idempotent), the
/// ones not yet sent go to the other endpoint, so none fails; the dead endpoint is marked not
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_fails_no_get() {
    let first = Backend::start("a", Duration::ZERO).await;
    let second = Backend::start("b", Duration::ZERO).await;
    let proxy = outbound_to(&[first.addr, second.addr]).await;
    let outbound = proxy.outbound;
    let load = tokio::spawn(async move { h2_gets(outbound, "echo.test:80", 1000, 8).await });
    // Kill an endpoint while it holds requests: whichever serves 20 first. Which one a cold
    // start favours is random (P2C draws real random numbers, and the slower first answer is
    // avoided for a while); a fixed victim was once starved so completely that it never
    // reached 20 before the load ended (CI, stop 25).
    wait_until("an endpoint to serve 20 requests", async || {
        first.served() >= 20 || second.served() >= 20
    })
    .await;
    let (mut a, b) = if first.served() >= 20 {
        (first, second)
    } else {
        (second, first)
    };
    a.kill().await;
    let b_at_kill = b.served();
    let results = tokio::time::timeout(WAIT * 2, load)
        .await
        .expect("the load ends")
        .expect("load task");
    let (per, failed) = tally(&results);
    eprintln!(
        "killed {}: {per:?}, the other served {b_at_kill} before the kill",
        a.addr
    );
    assert!(
        failed.is_empty(),
        "{} of 1000 GETs failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(results.len(), 1000);
    // The kill came mid-load: a good share of the run was served after it, all by b.
    let after = b.served() - b_at_kill;
    assert!(
        after >= 100,
        "only {after} requests after the kill; the load ended too early to test anything"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        endpoint_metric(&m, "remora_endpoint_ready", a.addr),
        0.0,
        "the killed endpoint is marked not ready: {m}"
    );
    assert_eq!(
        endpoint_metric(&m, "remora_endpoint_ready", b.addr),
        1.0,
        "{m}"
    );
    assert!(
        endpoint_metric(&m, "remora_endpoint_failures_total", a.addr) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "remora_requests_total",
            &[("direction", "outbound"), ("status", "200")]
        ),
        1000.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A hung backend (accepts, never answers).
//
// What the code does (proxy/src/endpoint.rs, forward.rs, balance.rs): the connect timeout
// (3 s) covers TCP and the TLS handshake only. HTTP/2's client handshake does not wait for the
// server's SETTINGS, so requests are written to the hung backend and then wait: there is no
// response timeout and `grpc-timeout` is not read. A gRPC caller with a deadline gets
// DEADLINE_EXCEEDED from its own library at the deadline and resets the stream, which drops
// the proxy's request. The hung endpoint is never marked down (only connect failures do
// that); what keeps traffic off it is P2C's cost, which grows with its pending requests.

/// gRPC calls with a 3 s deadline to a destination whose only endpoint is hung end with
/// DEADLINE_EXCEEDED at the deadline; while they hang the proxy keeps serving another
/// destination at full speed, and afterwards it is ready with nothing left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_backend_grpc_deadline_is_exceeded_and_other_destinations_keep_working() {
    let hung = Hung::start().await;
    let good = Backend::start("good", Duration::ZERO).await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![
        dest("hung.test:80", &[hung.addr]),
        dest("echo.test:80", &[good.addr]),
    ];
    let proxy = TestProxy::start(cfg).await;
    let outbound = proxy.outbound;
    let started = Instant::now();
    let calls =
        tokio::spawn(async move { grpc_deadline(outbound, "hung.test:80", 3000, 4, 4).await });
    let admin = proxy.admin;
    wait_until("the 4 calls to hang on the backend", async || {
        endpoint_metric(
            &metrics_of(admin).await,
            "remora_endpoint_requests_in_flight",
            hung.addr,
        ) >= 4.0
    })
    .await;
    assert!(hung.accepted.load(Ordering::Relaxed) >= 1);
    // Meanwhile: another destination is served, and the proxy is ready.
    let results = h2_gets(proxy.outbound, "echo.test:80", 200, 4).await;
    let (per, failed) = tally(&results);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(per.get("good"), Some(&200));
    assert!(
        !calls.is_finished(),
        "the hung calls ended before the other destination was checked ({:?})",
        started.elapsed()
    );
    assert_eq!(http_get(proxy.admin, "/ready").await.unwrap().0, 200);

    let r = tokio::time::timeout(WAIT, calls)
        .await
        .expect("the calls end at their deadline")
        .expect("calls task");
    eprintln!("hung: {r}");
    assert_eq!(code(&r, "DEADLINE_EXCEEDED"), 4, "{r}");
    let took = &r["deadline_s"];
    let (min, max) = (took[0].as_f64().unwrap(), took[1].as_f64().unwrap());
    assert!(min >= 2.9, "ended before the deadline: {r}");
    assert!(max < 3.0 + 2.0, "ended long after the deadline: {r}");
    // The cancelled calls are gone from the proxy's request count, and it still serves.
    wait_until("no outbound request in flight", async || {
        metric(
            &metrics_of(admin).await,
            "remora_requests_in_flight",
            &[("direction", "outbound")],
        ) == 0.0
    })
    .await;
    let again = h2_gets(proxy.outbound, "echo.test:80", 20, 2).await;
    let (per, failed) = tally(&again);
    assert!(
        failed.is_empty() && per.get("good") == Some(&20),
        "{failed:?}"
    );
    assert_eq!(http_get(proxy.admin, "/ready").await.unwrap().0, 200);
}

/// One endpoint healthy, one hung: 200 gRPC calls (1 s deadline, 4 at a time) all end — OK, or
/// DEADLINE_EXCEEDED for the few the hung endpoint got before its pending requests made P2C
/// avoid it — and at least 90 % are answered by the healthy endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_avoids_a_hung_endpoint() {
    let hung = Hung::start().await;
    let good = python_server("grpc_backend.py", &["--name", "good"]).await;
    let proxy = outbound_to(&[good.addr, hung.addr]).await;
    let r = grpc_deadline(proxy.outbound, "echo.test:80", 1000, 200, 4).await;
    eprintln!("hung+healthy: {r}");
    let (ok, late) = (code(&r, "OK"), code(&r, "DEADLINE_EXCEEDED"));
    assert_eq!(
        ok + late,
        200,
        "every call ends, OK or at its deadline: {r}"
    );
    assert!(
        ok >= 180,
        "only {ok} of 200 went to the healthy endpoint: {r}"
    );
    assert_eq!(r["backends"]["good"].as_u64(), Some(ok), "{r}");
    if let Some(max) = r["deadline_s"][1].as_f64() {
        assert!(max < 3.0, "a call outlived its 1 s deadline by far: {r}");
    }
    assert_eq!(http_get(proxy.admin, "/ready").await.unwrap().0, 200);
}

/// Found missing while writing the tests above, fixed (a drop guard in `Endpoint::send`): a request cancelled by its caller — a gRPC
/// deadline, a client that gave up — is never taken off its endpoint's load. In
/// `proxy/src/endpoint.rs`, `Endpoint::send` calls `self.load.start()` and
/// `m.in_flight.inc()` before awaiting the upstream and only undoes them after the await
/// (`finish`/`abandon`, `in_flight.dec()`); when hyper drops the request future on the
/// client's RST_STREAM, neither runs. Each cancelled request therefore leaves P2C's pending
/// count (`PeakEwma::pending`) and `remora_endpoint_requests_in_flight` one higher forever, so
/// an endpoint that was merely slow while callers had deadlines is shunned for good, and the
/// gauge never returns to 0. (It is the leak that makes `p2c_avoids_a_hung_endpoint` look so
/// good: the hung endpoint's 4 cancelled calls never leave its cost.) Fix: a drop guard in
/// `Endpoint::send` that calls `abandon()` and `in_flight.dec()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_leave_the_endpoint_load() {
    let hung = Hung::start().await;
    let proxy = outbound_to(&[hung.addr]).await;
    let r = grpc_deadline(proxy.outbound, "echo.test:80", 500, 4, 4).await;
    assert_eq!(code(&r, "DEADLINE_EXCEEDED"), 4, "{r}");
    let admin = proxy.admin;
    wait_until("outbound requests in flight back to 0", async || {
        metric(
            &metrics_of(admin).await,
            "remora_requests_in_flight",
            &[("direction", "outbound")],
        ) == 0.0
    })
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        endpoint_metric(&m, "remora_endpoint_requests_in_flight", hung.addr),
        0.0,
        "the 4 cancelled calls are still counted on the endpoint: {m}"
    );
}

/// MISSING: there is no upstream response timeout (nothing in `Shared::send` in
/// `proxy/src/forward.rs` or `Endpoint::send_h1`/`send_h2` in `proxy/src/endpoint.rs` bounds
/// the wait for response headers), and `grpc-timeout` is not used. A caller without a deadline
/// of its own waits on a hung backend forever over HTTP/1.1; over HTTP/2 until the upstream
/// keep-alive ping times out (30 s interval + 10 s timeout), then gets a 502. Envoy answers
/// 504 after its 15 s route timeout by default. This test expects an answer from the proxy
/// (504 Gateway Timeout, or any 5xx) within 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "missing: no upstream response timeout (forward.rs Shared::send, endpoint.rs Endpoint::send): a request to a hung backend waits forever over HTTP/1.1"]
async fn hung_backend_is_answered_without_a_client_deadline() {
    let hung = Hung::start().await;
    let proxy = outbound_to(&[hung.addr]).await;
    let route = Route {
        name: "hung",
        addr: proxy.outbound,
        authority: "echo.test:80",
    };
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let started = Instant::now();
        let out = curl(&route, "/", &[proto, "--max-time", "20", "-D", "-"]).await;
        eprintln!(
            "{proto}: curl exit {} after {:?}: {}",
            out.status,
            started.elapsed(),
            out.stdout
        );
        assert_eq!(
            out.status, 0,
            "{proto}: no answer within 20 s: {}",
            out.stderr
        );
        assert!(status(&out.stdout) >= 500, "{proto}: {}", out.stdout);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A slow backend.

/// One endpoint answers at once, the other after 200 ms: of 400 HTTP/2 GETs (4 at a time)
/// none fails and at most 10 % go to the slow one, whose 200 ms the balancer has measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_little_traffic() {
    let fast = Backend::start("fast", Duration::ZERO).await;
    let slow = Backend::start("slow", Duration::from_millis(200)).await;
    let proxy = outbound_to(&[fast.addr, slow.addr]).await;
    let started = Instant::now();
    let results = h2_gets(proxy.outbound, "echo.test:80", 400, 4).await;
    let took = started.elapsed();
    let (per, failed) = tally(&results);
    eprintln!("slow: {per:?} in {took:?}");
    assert!(failed.is_empty(), "{failed:?}");
    let slow_n = per.get("slow").copied().unwrap_or(0);
    assert!(
        slow_n <= 40,
        "the slow endpoint got {slow_n} of 400: {per:?}"
    );
    assert_eq!(per.get("fast").copied().unwrap_or(0) + slow_n, 400);
    let m = proxy.metrics().await;
    if slow_n > 0 {
        let ewma = endpoint_metric(&m, "remora_endpoint_latency_ewma_seconds", slow.addr);
        assert!(ewma > 0.1, "slow endpoint's EWMA {ewma}: {m}");
    }
    // Even split would have cost 200 × 200 ms / 4 = 10 s.
    assert!(took < Duration::from_secs(10), "400 GETs took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. The control plane killed while certificates come due.

const TOKEN: &str = "client-token-0123456789";
const WEB_TOKEN: &str = "web-token-0123456789abc";
/// Renewal is due at 70 % (21 s); the certificate is good until 30 s.
const LIFETIME: Duration = Duration::from_secs(30);

/// Two proxies with 30 s certificates from the control plane, mTLS between them; the control
/// plane is killed right away. When renewal comes due (21 s) it fails, is counted, and the
/// proxies keep serving mTLS with the certificates they hold (requests through the mesh and
/// fresh handshakes from a peer). Once the control plane is back at the same address both
/// renew before their certificates expire, and no request fails throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_certificates_keep_serving_and_renew_when_it_is_back() {
    let pki = Pki::new("cluster.local");
    let (client_id, web_id) = (pki.id("client"), pki.id("web"));
    let app = NamedApp::start("web").await;
    let endpoints = scratch("endpoints.toml");
    write_atomic(&endpoints, "# no services\n");
    let tokens = scratch("tokens");
    std::fs::write(
        &tokens,
        format!("{TOKEN} {client_id}\n{WEB_TOKEN} {web_id}\n"),
    )
    .unwrap();
    let cp = TestControl::start_with(
        loopback0(),
        &pki,
        endpoints.clone(),
        Some(tokens.clone()),
        LIFETIME,
    )
    .await;
    let addr = cp.addr;
    let server =
        TestProxy::start(proxy_config(app.addr, &pki, &cp.target(), "web", WEB_TOKEN)).await;
    let client = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    cp.set_endpoints(&endpoints_toml(&[(
        "web.test:80",
        vec![(server.inbound, Some(web_id.to_string()))],
    )]));
    let outbound = client.outbound;
    wait_until("the endpoint is discovered", async || {
        get_via(outbound, "web.test:80")
            .await
            .is_ok_and(|(s, b)| s == 200 && b == "web")
    })
    .await;
    let state = async |p: &TestProxy| {
        let m = p.metrics().await;
        (
            metric(&m, "remora_identity_reloads_total", &[]),
            metric(&m, "remora_identity_reload_failures_total", &[]),
            metric(&m, "remora_identity_expiry_timestamp_seconds", &[]),
        )
    };
    let (s0, c0) = (state(&server).await, state(&client).await);

    cp.kill().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let start = Instant::now();
            // Bounded: 90 s or 20k requests at most; normally stopped by the test.
            while !stop.load(Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(90)
                && ok < 20_000
            {
                match get_via(outbound, "web.test:80").await {
                    Ok((200, b)) if b == "web" => ok += 1,
                    other => failed.push(format!("{:?}: {other:?}", start.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        })
    };
    let probe = id_files(&pki.identity_dir("probe"));
    wait_until("both proxies to fail a renewal", async || {
        state(&server).await.1 > s0.1 && state(&client).await.1 > c0.1
    })
    .await;
    // Renewal failed; the certificates held keep serving: ready, fresh handshakes accepted.
    for p in [&server, &client] {
        assert_eq!(http_get(p.admin, "/ready").await.unwrap().0, 200);
    }
    let seen = mtls_get(server.inbound, &probe)
        .await
        .expect("mTLS during the outage");
    assert_eq!(seen, "web");

    let back = TestControl::start_with(addr, &pki, endpoints, Some(tokens), LIFETIME).await;
    wait_until("both proxies to renew from the control plane", async || {
        let (s, c) = (state(&server).await, state(&client).await);
        s.0 > s0.0 && s.2 > s0.2 && c.0 > c0.0 && c.2 > c0.2
    })
    .await;
    let seen = mtls_get(server.inbound, &probe)
        .await
        .expect("mTLS after the renewal");
    assert_eq!(seen, "web");
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::time::timeout(WAIT, load)
        .await
        .expect("load ends")
        .expect("load task");
    eprintln!(
        "{ok} requests through the outage and the renewals, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 300, "only {ok} requests");
    drop(back);
}

// ---------------------------------------------------------------------------------------------
// 5. The identity files unreadable.

/// Writes `bytes` to `path` atomically (a temporary file renamed over it).
fn put_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-put");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Replaces `path` atomically with a symlink to `target`.
fn put_symlink(path: &Path, target: &Path) {
    let tmp = path.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Root reads files whatever their mode, so "unreadable" is made in ways root cannot read
/// either: `tls.crt` a directory (EISDIR), `tls.key` a dangling symlink (ENOENT), `ca.crt` a
/// symlink to itself (ELOOP), and the whole directory gone (an unmounted volume). Each time
/// the proxy counts one reload failure and keeps serving mTLS with the last good identity,
/// ready; each time the files come back it loads them, and a new certificate put there while
/// the directory was gone is the one served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_identity_files_keep_the_last_good_identity() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let dir = pki.identity_dir("web");
    let mut cfg = config(app.addr);
    cfg.identity_dir = Some(dir.clone());
    let proxy = TestProxy::start(cfg).await;
    let probe_dir = pki.identity_dir("probe");
    let probe = id_files(&probe_dir);
    let good_crt = probe_dir.join("web-good.crt");
    std::fs::copy(dir.join("tls.crt"), &good_crt).unwrap();
    let (crt, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    let original = |p: &Path| std::fs::read(p).unwrap();
    let (crt0, key0, ca0) = (original(&crt), original(&key), original(&ca));
    let admin = proxy.admin;
    let counter = async |name: &str| metric(&metrics_of(admin).await, name, &[]);
    let wait_counter = async |name: &str, at_least: f64| {
        wait_until(&format!("{name} >= {at_least}"), async || {
            counter(name).await >= at_least
        })
        .await
    };
    // Serving mTLS with the certificate in `expect`, and ready.
    let assert_serving = async |what: &str, expect: &Path| {
        let seen = mtls_get(proxy.inbound, &probe)
            .await
            .unwrap_or_else(|e| panic!("{what}: mTLS failed: {e}"));
        assert!(seen.contains(PROBE_ID), "{what}: {seen}");
        assert_eq!(
            probe_tls(proxy.inbound, &probe, expect).await,
            (true, true),
            "{what}: served certificate"
        );
        assert_eq!(
            http_get(admin, "/ready").await.unwrap().0,
            200,
            "{what}: ready"
        );
    };
    assert_serving("at start", &good_crt).await;
    assert_eq!(counter("remora_identity_reloads_total").await, 1.0);

    // tls.crt is a directory.
    std::fs::remove_file(&crt).unwrap();
    std::fs::create_dir(&crt).unwrap();
    wait_counter("remora_identity_reload_failures_total", 1.0).await;
    assert_serving("tls.crt a directory", &good_crt).await;
    std::fs::remove_dir(&crt).unwrap();
    put_file(&crt, &crt0);
    wait_counter("remora_identity_reloads_total", 2.0).await;

    // tls.key is a dangling symlink.
    put_symlink(&key, Path::new("/nonexistent/remora/tls.key"));
    wait_counter("remora_identity_reload_failures_total", 2.0).await;
    assert_serving("tls.key a dangling symlink", &good_crt).await;
    put_file(&key, &key0);
    wait_counter("remora_identity_reloads_total", 3.0).await;

    // ca.crt is a symlink loop.
    put_symlink(&ca, Path::new("ca.crt"));
    assert!(
        std::fs::read(&ca).is_err(),
        "a symlink to itself is unreadable"
    );
    wait_counter("remora_identity_reload_failures_total", 3.0).await;
    assert_serving("ca.crt a symlink loop", &good_crt).await;
    put_file(&ca, &ca0);
    wait_counter("remora_identity_reloads_total", 4.0).await;

    // The whole directory gone; it comes back holding a new certificate.
    let away = dir.with_file_name("id-web-away");
    std::fs::rename(&dir, &away).unwrap();
    wait_counter("remora_identity_reload_failures_total", 4.0).await;
    assert_serving("the directory gone", &good_crt).await;
    pki.leaf("web").write(&away).unwrap();
    let new_crt = probe_dir.join("web-new.crt");
    std::fs::copy(away.join("tls.crt"), &new_crt).unwrap();
    std::fs::rename(&away, &dir).unwrap();
    wait_counter("remora_identity_reloads_total", 5.0).await;
    assert_serving("the directory back with a new certificate", &new_crt).await;
    // One failure per fault, none on the way back (every change above is one atomic step).
    assert_eq!(counter("remora_identity_reload_failures_total").await, 4.0);
    assert_eq!(counter("remora_identity_reloads_total").await, 5.0);
}

// ---------------------------------------------------------------------------------------------
// 6. The clock jumping past the certificate's expiry and back (libfaketime).

/// libfaketime's multithreaded preload library (Debian's `faketime` package).
fn libfaketime() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1")];
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        for d in dirs.flatten() {
            candidates.push(d.path().join("faketime/libfaketimeMT.so.1"));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("libfaketimeMT.so.1 not found; run .ci/setup (apt-get install faketime)")
}

/// The `remora-proxy` binary of this build profile, built once.
fn proxy_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| remora_tests::netns::workspace_binary("remora-proxy"))
        .clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `remora-proxy` process whose wall clock (CLOCK_REALTIME: what certificate checks read) is
/// shifted by the offset written in `clock` (libfaketime, re-read on every call). The
/// monotonic clock is left alone, as a real clock step (NTP, a VM resumed) leaves it.
struct FakedProxy {
    inbound: SocketAddr,
    admin: SocketAddr,
    clock: PathBuf,
    log: PathBuf,
    child: tokio::process::Child,
}

impl FakedProxy {
    async fn start(app: SocketAddr, identity: &Path) -> FakedProxy {
        let bin = tokio::task::spawn_blocking(proxy_binary)
            .await
            .expect("build");
        let clock = scratch("faketime.rc");
        write_atomic(&clock, "+0\n");
        let log = scratch("remora-proxy.log");
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = tokio::process::Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REMORA_INBOUND_ADDR", inbound.to_string())
            .env("REMORA_OUTBOUND_ADDR", outbound.to_string())
            .env("REMORA_ADMIN_ADDR", admin.to_string())
            .env("REMORA_APP_ADDR", app.to_string())
            .env("REMORA_IDENTITY_DIR", identity)
            .env("REMORA_LOG", "info")
            .env("LD_PRELOAD", libfaketime())
            .env("FAKETIME_TIMESTAMP_FILE", &clock)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn remora-proxy");
        let p = FakedProxy {
            inbound,
            admin,
            clock,
            log,
            child,
        };
        let deadline = Instant::now() + WAIT;
        while !matches!(http_get(admin, "/ready").await, Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "remora-proxy never became ready:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Shifts the proxy's wall clock by `offset_s` from the real time (libfaketime reads the
    /// file at every clock call, so the proxy sees it at once).
    fn set_clock(&self, offset_s: i64) {
        write_atomic(&self.clock, &format!("{offset_s:+}\n"));
    }

    /// Jumps the clock forward and waits until the proxy's own `Date` header shows it. (Only
    /// forward: hyper caches the `Date` value until the wall clock passes the next second it
    /// computed, so after a backward jump the header stays ahead for as long as the jump.)
    async fn jump_forward(&self, offset_s: i64) {
        self.set_clock(offset_s);
        let admin = self.admin;
        wait_until(
            &format!("the proxy's clock at {offset_s:+} s"),
            async || {
                let real = time::OffsetDateTime::now_utc().unix_timestamp();
                proxy_clock(admin)
                    .await
                    .is_some_and(|t| (t - real - offset_s).abs() <= 5)
            },
        )
        .await;
    }

    async fn metrics(&self) -> String {
        metrics_of(self.admin).await
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The proxy's wall clock, from the `Date` header its admin server sends.
async fn proxy_clock(admin: SocketAddr) -> Option<i64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /live HTTP/1.0\r\nHost: admin\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let date = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("date"))
        })?
        .1;
    parse_http_date(date.trim())
}

/// `Tue, 01 Dec 2026 23:01:35 GMT` → Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    let p: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = p.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == mon)? as u8 + 1;
    let mut t = hms.split(':').map(|x| x.parse::<u8>().ok());
    let (h, m, sec) = (t.next()??, t.next()??, t.next()??);
    let date = time::Date::from_calendar_date(
        year.parse().ok()?,
        time::Month::try_from(month).ok()?,
        day.parse().ok()?,
    )
    .ok()?;
    let time = time::Time::from_hms(h, m, sec).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

const TWO_HOURS: i64 = 2 * 3600;

/// The proxy's clock jumps 2 h forward, past the expiry of its 1 h certificate and of its
/// peers' 1 h certificates, then back. While it is ahead, peers whose certificates have
/// expired by its clock are refused (counted as `handshake_failed`) — a peer holding a 24 h
/// certificate still gets through — plaintext is still served and the process stays up. When
/// the clock is back, the same process (no restart, no reload) serves mTLS to every peer
/// again. What it does *not* do while ahead is in
/// `a_clock_past_the_leafs_expiry_makes_the_proxy_not_ready` (was missing; fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_jump_past_expiry_and_back() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let identity = pki.identity_dir("web");
    let proxy = FakedProxy::start(app.addr, &identity).await;
    let pid = proxy.pid();
    let short = id_files(&pki.identity_dir("probe"));
    let long_dir = scratch("id-probe-24h");
    remora_certs::ca::issue_with_new_key(
        &pki.issuer,
        &pki.id("probe"),
        Duration::from_secs(86_400),
    )
    .unwrap()
    .write(&long_dir)
    .unwrap();
    let long = id_files(&long_dir);
    let plain = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "app.test:80",
    };
    let failed_handshakes = |m: &str| {
        metric(
            m,
            "remora_tls_connections_total",
            &[("direction", "inbound"), ("result", "handshake_failed")],
        )
    };
    for who in [&short, &long] {
        let seen = mtls_get(proxy.inbound, who)
            .await
            .expect("mTLS at the real time");
        assert!(seen.contains(PROBE_ID), "{seen}");
    }
    let m = proxy.metrics().await;
    let expiry = metric(&m, "remora_identity_expiry_timestamp_seconds", &[]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(
        expiry > now + 3000.0 && expiry < now + 3700.0,
        "the 1 h leaf's expiry {expiry} (now {now})"
    );
    let failed_before = failed_handshakes(&m);

    proxy.jump_forward(TWO_HOURS).await;
    let refused = mtls_get(proxy.inbound, &short).await;
    assert!(
        refused.is_err(),
        "a peer certificate expired by the proxy's clock was accepted: {refused:?}"
    );
    let m = proxy.metrics().await;
    assert!(failed_handshakes(&m) > failed_before, "{m}");
    let seen = mtls_get(proxy.inbound, &long)
        .await
        .expect("a 24 h peer certificate is still valid 2 h ahead");
    assert!(seen.contains(PROBE_ID), "{seen}");
    let out = curl(&plain, "/", &["-D", "-"]).await;
    assert_eq!(
        status(&out.stdout),
        200,
        "plaintext while ahead: {}",
        out.stdout
    );
    assert_eq!(http_get(proxy.admin, "/live").await.unwrap().0, 200);
    eprintln!(
        "2 h ahead: /ready answers {:?}; expiry metric {}",
        http_get(proxy.admin, "/ready").await.ok(),
        metric(&m, "remora_identity_expiry_timestamp_seconds", &[])
    );

    proxy.set_clock(0);
    // The clock is back when the 1 h peer certificate is accepted again.
    wait_until(
        "mTLS with the 1 h peer certificate works again",
        async || {
            mtls_get(proxy.inbound, &short)
                .await
                .is_ok_and(|seen| seen.contains(PROBE_ID))
        },
    )
    .await;
    let seen = mtls_get(proxy.inbound, &long)
        .await
        .unwrap_or_else(|e| panic!("mTLS after the clock came back: {e}\n{}", proxy.log()));
    assert!(seen.contains(PROBE_ID), "{seen}");
    assert_eq!(http_get(proxy.admin, "/ready").await.unwrap().0, 200);
    assert_eq!(proxy.pid(), pid, "same process: no restart");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "remora_identity_reloads_total", &[]), 1.0, "{m}");
    assert_eq!(
        metric(&m, "remora_identity_reload_failures_total", &[]),
        0.0,
        "{m}"
    );
}

/// Found missing, fixed (`AdminState::is_ready` checks the validity window): a proxy whose clock has passed its own certificate's expiry does not notice. The
/// identity is validated only when the files' bytes change (`IdentityStore::watch` in
/// `proxy/src/identity.rs` compares contents; `consider_from` checks the validity window),
/// and `/ready` only asks whether an identity is held (`AdminState::is_ready` in
/// `proxy/src/admin.rs`: `current().is_some()`), so 2 h ahead the proxy stays ready, logs
/// nothing and counts nothing, and keeps presenting a certificate it would itself refuse to
/// load (a restart at that moment would leave it not ready). The expiry gauge stays the
/// absolute timestamp, which only an alert on the monitoring side's clock can compare.
/// Expected: `/ready` 503 naming the expiry while the current identity is outside its
/// validity window (with the 60 s skew), ready again when the clock comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_past_the_leafs_expiry_makes_the_proxy_not_ready() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let proxy = FakedProxy::start(app.addr, &pki.identity_dir("web")).await;
    proxy.jump_forward(TWO_HOURS).await;
    let admin = proxy.admin;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ready = http_get(admin, "/ready").await.unwrap();
    // Bounded: the identity is polled every 500 ms, so 5 s is ten chances to notice.
    while ready.0 == 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = http_get(admin, "/ready").await.unwrap();
    }
    assert_eq!(
        ready.0,
        503,
        "2 h past the certificate's expiry the proxy is still ready: {ready:?}\n{}",
        proxy.log()
    );
    assert!(ready.1.contains("expired"), "{ready:?}");
    proxy.set_clock(0);
    wait_ready(admin).await;
}

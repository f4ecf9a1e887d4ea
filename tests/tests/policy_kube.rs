//! Traffic policy from Kubernetes Service annotations, on a real kube-apiserver
//! (`tests/kube/cluster.sh`): `remora.io/timeout` and `remora.io/retries` written on a Service
//! reach the proxies through `remora control`'s discovery stream and change what callers see —
//! a `504` / `grpc-status: 4` instead of a late answer, a `200` instead of a backend's `503` —
//! and follow live edits of the annotations. A bad annotation is refused with one log line
//! naming the Service and the field, and the Service's last good policy keeps applying.
//!
//! As in `services.rs`, no controllers run: the test writes the EndpointSlices, and "pods" are
//! apps on loopback addresses 127.0.0.x sharing one port. The proxies reach them in plaintext
//! (the endpoints have no identity).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_certs::SpiffeId;
use remora_control_plane::registry::Published;

use remora_tests::control::{TestControl, capture_logs, captured_logs, get_via, meshed, port_on};
use remora_tests::kube::ApiServer;
use remora_tests::{Pki, TestProxy, header, metric, refused_addr, run, status, wait_until};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An annotation change must show in what callers get within this long after the API write
/// (generous: a 2-core CI machine runs an etcd and an API server per test beside the proxies).
const CHANGE: Duration = Duration::from_secs(10);

/// How long the slow app takes to answer.
const SLOW: Duration = Duration::from_secs(2);

/// The wait before each request to the Service with a 503 pod, so the policy's retries stay
/// within the retry budget: it refills 10 a second and each request deposits 0.2, so every
/// request brings at least 1.2 while taking at most one retry (the second try goes to a pod
/// that answers 200) — none is refused, even if every first try went to the 503 pod (the
/// balancer favours it: it answers fastest), whatever the budget was left at before.
const PACE: Duration = Duration::from_millis(100);

fn namespace(server: &ApiServer, ns: &str) {
    server.apply_path(
        &format!("/api/v1/namespaces/{ns}"),
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    );
}

/// Service `shop/name` with `annotations` and one port 80 → `target`.
fn service(server: &ApiServer, name: &str, annotations: Value, target: u16) {
    server.apply_path(
        &format!("/api/v1/namespaces/shop/services/{name}"),
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": target,
                                    "protocol": "TCP"}]}}),
    );
}

/// EndpointSlice `shop/name` of `svc`: port `http` → `port`, ready endpoints at `ips`.
fn slice(server: &ApiServer, name: &str, svc: &str, port: u16, ips: &[&str]) {
    server.apply_path(
        &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}"),
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| ep(ip)).collect::<Vec<_>>(),
        }),
    );
}

fn ep(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}})
}

/// The flaky Service's `annotations`, with failure accrual off: the test is about retries, and
/// an always-503 pod ejected from balancing would hide both the retries and their removal.
fn flaky(mut annotations: Value) -> Value {
    annotations["remora.io/failure-accrual"] = json!("0");
    annotations
}

/// A control plane on the API server (with the permissions `remora install` gives it) and a
/// proxy for `shop/client` fed by it.
async fn mesh(server: &ApiServer) -> (TestControl, TestProxy) {
    remora_tests::control::kube_mesh(server, &Pki::new("cluster.local")).await
}

/// An HTTP/1.1 + HTTP/2 "pod" that answers every request after `delay`: with `status` and its
/// name as the body, or, to a gRPC request, trailers-only with `grpc-status` 14 (UNAVAILABLE)
/// when `status` is 503 and 0 otherwise. It counts the requests it received.
struct App {
    hits: Arc<AtomicU64>,
    grpc_hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start(name: &'static str, addr: SocketAddr, status: u16, delay: Duration) -> App {
        let listener = TcpListener::bind(addr).await.expect("bind app");
        let (hits, grpc_hits) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counts = (hits.clone(), grpc_hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let counts = counts.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let counts = counts.clone();
                        async move {
                            let grpc = req
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            counts.0.fetch_add(1, Ordering::Relaxed);
                            if grpc {
                                counts.1.fetch_add(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(delay).await;
                            let rsp = if grpc {
                                Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", if status == 503 { "14" } else { "0" })
                                    .body(Full::new(Bytes::new()))
                            } else {
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(name.as_bytes())))
                            };
                            Ok::<_, Infallible>(rsp.expect("response"))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        App {
            hits,
            grpc_hits,
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn grpc_hits(&self) -> u64 {
        self.grpc_hits.load(Ordering::Relaxed)
    }
}

/// Waits until the control plane publishes `name` with `endpoints` endpoints and `check`
/// holding for its policy.
async fn published(
    cp: &TestControl,
    name: &str,
    endpoints: usize,
    check: impl Fn(&remora_certs::Policy) -> bool,
) {
    let since = Instant::now();
    loop {
        let now = cp.registry.lookup(name);
        if let Some(p @ Published::Endpoints(..)) = &now
            && p.set().is_some_and(|s| s.len() == endpoints)
            && p.policy().is_some_and(&check)
        {
            return;
        }
        assert!(
            since.elapsed() < CHANGE,
            "{name} is not published as expected after {:?}: {now:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC-looking call (HTTP/2 prior knowledge, `content-type: application/grpc`) to
/// `http://host/shop.Svc/Call` through `proxy`, with curl; returns the header dump and how
/// long it took.
async fn grpc_call(proxy: SocketAddr, host: &str) -> (String, Duration) {
    let connect_to = format!("{host}:80:{}:{}", proxy.ip(), proxy.port());
    let url = format!("http://{host}/shop.Svc/Call");
    let t = Instant::now();
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "30",
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--connect-to",
            &connect_to,
            &url,
        ],
    )
    .await;
    let took = t.elapsed();
    assert_eq!(out.status, 0, "curl {url}: {}", out.stderr);
    (out.stdout, took)
}

/// A plain GET through `proxy`, timed.
async fn timed_get(proxy: SocketAddr, authority: &str) -> ((u16, String), Duration) {
    let t = Instant::now();
    let r = get_via(proxy, authority)
        .await
        .unwrap_or_else(|e| panic!("GET {authority} through the proxy: {e}"));
    (r, t.elapsed())
}

/// Paced GETs of `flaky.shop:80` through `proxy`: at least 40, and on until `done` holds
/// (within [`CHANGE`] more); `check` judges every answer. Returns how many were sent.
///
/// The balancer prefers the pod with the lowest recent latency and lets a pod's estimate decay
/// while it is not picked, so after one slow sample a pod may be skipped for seconds: a phase
/// runs until the pod it is about has been tried, not for a fixed count.
async fn paced(
    proxy: SocketAddr,
    what: &str,
    done: impl Fn() -> bool,
    mut check: impl FnMut(u16, &str),
) -> usize {
    let since = Instant::now();
    let mut n = 0;
    while n < 40 || !done() {
        assert!(
            since.elapsed() < PACE * 40 + CHANGE,
            "{what}: not done after {n} requests"
        );
        tokio::time::sleep(PACE).await;
        let ((code, body), _) = timed_get(proxy, "flaky.shop:80").await;
        check(code, &body);
        n += 1;
    }
    n
}

/// [`paced`] until `broken` has been tried again, every answer a 200 from one of `answers`
/// (the broken pod's 503s retried on another pod).
async fn all_ok(proxy: SocketAddr, what: &str, broken: &App, answers: &[&str]) -> usize {
    let before = broken.hits();
    paced(
        proxy,
        what,
        || broken.hits() > before,
        |code, body| {
            assert!(
                code == 200 && answers.contains(&body),
                "{what}: got {code} {body:?}"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_annotation_answers_504_or_deadline_exceeded_and_follows_live_edits() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let ip = [127, 0, 0, 30];
    let port = port_on(&[ip]);
    let slow = App::start("slow", SocketAddr::from((ip, port)), 200, SLOW).await;
    let (cp, proxy) = mesh(&server).await;

    // The proxy follows the Service before it has a policy: the annotation then comes as a
    // change on a live watch. (A policy present before the proxy watches the name is
    // `the_first_request_to_a_name_already_follows_its_policy`.)
    service(&server, "slow", json!({}), port);
    slice(&server, "slow-x", "slow", port, &["127.0.0.30"]);
    let name = "slow.shop.svc.cluster.local:80";
    published(&cp, name, 1, |p| *p == remora_certs::Policy::default()).await;
    let ((code, body), took) = timed_get(proxy.outbound, "slow.shop:80").await;
    assert_eq!((code, body.as_str()), (200, "slow"), "no policy yet");
    assert!(took >= SLOW, "{took:?}");

    let t = Instant::now();
    service(&server, "slow", json!({"remora.io/timeout": "200ms"}), port);
    let mut late = 0;
    loop {
        let ((code, body), _) = timed_get(proxy.outbound, "slow.shop:80").await;
        if code == 504 {
            break;
        }
        assert_eq!((code, body.as_str()), (200, "slow"));
        late += 1;
        assert!(
            t.elapsed() < CHANGE,
            "no 504 {:?} after the annotation was written",
            t.elapsed()
        );
    }
    eprintln!(
        "timeout 200ms: the first 504 {:?} after the write ({late} answers before it)",
        t.elapsed()
    );
    published(&cp, name, 1, |p| {
        p.timeout == Some(Duration::from_millis(200)) && p.retries == 0
    })
    .await;

    // Plain HTTP: 504 from the proxy once 200 ms have passed, long before the app's answer.
    for i in 0..3 {
        let ((code, body), took) = timed_get(proxy.outbound, "slow.shop:80").await;
        eprintln!("GET #{i} through a 200ms timeout: {code} after {took:?}");
        assert_eq!(code, 504, "request #{i}: {body}");
        assert!(
            body.contains("the destination's timeout policy"),
            "the 504 does not say why: {body}"
        );
        assert!(
            took >= Duration::from_millis(190) && took < SLOW * 3 / 4,
            "request #{i}: 504 after {took:?}, want 200ms (the app answers after {SLOW:?})"
        );
    }
    // gRPC over HTTP/2: DEADLINE_EXCEEDED, trailers-only, in the caller's protocol.
    let (dump, took) = grpc_call(proxy.outbound, "slow.shop").await;
    eprintln!("gRPC call through a 200ms timeout: answered after {took:?}");
    assert_eq!(status(&dump), 200, "{dump}");
    assert_eq!(header(&dump, "grpc-status"), Some("4"), "{dump}");
    assert!(
        header(&dump, "grpc-message").is_some_and(|m| m.contains("timeout policy")),
        "{dump}"
    );
    assert!(took < SLOW * 3 / 4, "DEADLINE_EXCEEDED after {took:?}");
    // The requests did reach the app: the timeout is on the answer, not on the connect.
    assert!(slow.hits() >= 1 && slow.grpc_hits() >= 1);
    let m = proxy.metrics().await;
    let timeouts = metric(
        &m,
        "remora_errors_total",
        &[("direction", "outbound"), ("kind", "timeout")],
    );
    assert!(timeouts >= 5.0, "timeouts counted: {timeouts}\n{m}");

    // The annotation edited live to 5s: the app's 2 s answers get through again.
    let t = Instant::now();
    service(&server, "slow", json!({"remora.io/timeout": "5s"}), port);
    let mut answers = Vec::new();
    loop {
        let ((code, body), took) = timed_get(proxy.outbound, "slow.shop:80").await;
        answers.push(code);
        if code == 200 {
            assert_eq!(body, "slow");
            assert!(took >= SLOW, "a 200 after {took:?}: the app waits {SLOW:?}");
            break;
        }
        assert_eq!(code, 504, "{body}");
        assert!(
            t.elapsed() < CHANGE,
            "still 504 {:?} after the edit: {answers:?}",
            t.elapsed()
        );
    }
    eprintln!(
        "timeout 200ms → 5s: answered 200 {:?} after the write ({answers:?})",
        t.elapsed()
    );
    let (dump, took) = grpc_call(proxy.outbound, "slow.shop").await;
    assert_eq!(header(&dump, "grpc-status"), Some("0"), "{dump}");
    assert!(took >= SLOW, "{took:?}");
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retries_annotation_hides_503s_and_a_refused_edit_keeps_the_last_good_policy() {
    capture_logs();
    let server = ApiServer::start();
    namespace(&server, "shop");
    let ips = [[127, 0, 0, 40], [127, 0, 0, 41], [127, 0, 0, 42]];
    let port = port_on(&ips);
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let broken = App::start("broken", at(ips[0]), 503, Duration::ZERO).await;
    let ok = App::start("ok", at(ips[1]), 200, Duration::ZERO).await;
    let (cp, proxy) = mesh(&server).await;
    let retries = async || {
        metric(
            &proxy.metrics().await,
            "remora_policy_retries_total",
            &[("direction", "outbound")],
        )
    };

    // Followed by the proxy before it has retries (see the timeout test for why).
    service(&server, "flaky", flaky(json!({})), port);
    slice(
        &server,
        "flaky-x",
        "flaky",
        port,
        &["127.0.0.40", "127.0.0.41"],
    );
    let name = "flaky.shop.svc.cluster.local:80";
    published(&cp, name, 2, |p| p.retries == 0 && p.timeout.is_none()).await;
    let ((code, _), _) = timed_get(proxy.outbound, "flaky.shop:80").await;
    assert!(code == 200 || code == 503, "{code}");

    let t = Instant::now();
    service(
        &server,
        "flaky",
        flaky(json!({"remora.io/retries": "2"})),
        port,
    );
    let mut before = Vec::new();
    while retries().await == 0.0 {
        let ((code, body), _) = timed_get(proxy.outbound, "flaky.shop:80").await;
        assert!(code == 200 || code == 503, "{code} {body}");
        before.push(code);
        assert!(
            t.elapsed() < CHANGE,
            "no retry {:?} after the annotation was written: {before:?}",
            t.elapsed()
        );
    }
    eprintln!(
        "retries: 2: the first retry {:?} after the write ({} answers before it)",
        t.elapsed(),
        before.len()
    );
    published(&cp, name, 2, |p| p.retries == 2 && p.timeout.is_none()).await;
    let (hit0, retried0) = (broken.hits(), retries().await);

    // Every request gets a 200: the broken pod's 503s are retried on the other pod.
    let n = all_ok(proxy.outbound, "retries: 2", &broken, &["ok"]).await;
    let (hit, retried) = (broken.hits() - hit0, retries().await - retried0);
    eprintln!(
        "retries: 2: {n} × 200; {hit} went to the broken pod first and were retried ({retried} retries); the good pod served {} requests in all",
        ok.hits()
    );
    assert!(hit >= 1, "the broken pod was never tried");
    assert!(retried >= hit as f64, "{retried} retries for {hit} 503s");
    // gRPC: UNAVAILABLE in the response head is retried too.
    let since = Instant::now();
    while broken.grpc_hits() == 0 {
        assert!(
            since.elapsed() < CHANGE,
            "no gRPC call reached the broken pod"
        );
        let (dump, _) = grpc_call(proxy.outbound, "flaky.shop").await;
        assert_eq!(header(&dump, "grpc-status"), Some("0"), "{dump}");
    }

    // A bad timeout beside the retries: refused, logged once, and the retries stay.
    let refused =
        "Service shop/flaky: annotation refused: remora.io/timeout: \"fast\" is not a duration";
    service(
        &server,
        "flaky",
        flaky(json!({"remora.io/retries": "2", "remora.io/timeout": "fast"})),
        port,
    );
    let since = Instant::now();
    while !captured_logs().contains(refused) {
        assert!(
            since.elapsed() < CHANGE,
            "the control plane did not log the refusal: {}",
            captured_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("refusal logged {:?} after the write", since.elapsed());
    let line = captured_logs()
        .lines()
        .find(|l| l.contains(refused))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("keeping its last good policy"),
        "{line}"
    );
    // The control plane still publishes the last good policy.
    published(&cp, name, 2, |p| p.retries == 2 && p.timeout.is_none()).await;
    let (hit, retried) = (broken.hits(), retries().await);
    let n = all_ok(
        proxy.outbound,
        "retries: 2 + a refused timeout",
        &broken,
        &["ok"],
    )
    .await;
    eprintln!(
        "retries: 2 + a refused timeout: {n} × 200, {} of them retried",
        broken.hits() - hit
    );
    assert!(
        retries().await >= retried + (broken.hits() - hit) as f64,
        "the broken pod's 503s were not retried under the last good policy"
    );

    // An endpoint change while the annotation stays bad: the policy stays (it is not re-sent
    // with the endpoints), and the refusal is not logged again.
    let ok2 = App::start("ok2", at(ips[2]), 200, Duration::ZERO).await;
    slice(
        &server,
        "flaky-x",
        "flaky",
        port,
        &["127.0.0.40", "127.0.0.41", "127.0.0.42"],
    );
    let since = Instant::now();
    while ok2.hits() == 0 {
        tokio::time::sleep(PACE).await;
        assert!(since.elapsed() < CHANGE, "the new pod was never reached");
        let ((code, body), _) = timed_get(proxy.outbound, "flaky.shop:80").await;
        assert_eq!(code, 200, "{body}");
    }
    let (hit, retried) = (broken.hits(), retries().await);
    all_ok(proxy.outbound, "a pod added", &broken, &["ok", "ok2"]).await;
    assert!(retries().await >= retried + (broken.hits() - hit) as f64);
    let logged = captured_logs().matches(refused).count();
    assert_eq!(logged, 1, "the refusal was logged {logged} times");

    // Valid again, without the retries: the broken pod's 503s reach the caller.
    let t = Instant::now();
    service(
        &server,
        "flaky",
        flaky(json!({"remora.io/timeout": "5s"})),
        port,
    );
    // Paced too: a retry refused for want of budget would also let a 503 through.
    let mut codes = Vec::new();
    loop {
        tokio::time::sleep(PACE).await;
        let ((code, body), _) = timed_get(proxy.outbound, "flaky.shop:80").await;
        codes.push(code);
        if code == 503 {
            assert_eq!(body, "broken");
            break;
        }
        assert_eq!(code, 200, "{body}");
        assert!(
            t.elapsed() < CHANGE,
            "no 503 in {} requests {:?} after the retries annotation went",
            codes.len(),
            t.elapsed()
        );
    }
    eprintln!(
        "retries removed: a 503 {:?} after the write, request #{}",
        t.elapsed(),
        codes.len()
    );
    published(&cp, name, 3, |p| {
        p.retries == 0 && p.timeout == Some(Duration::from_secs(5))
    })
    .await;
    // Without retries the broken pod's answers reach the caller whenever it is picked.
    let retried = retries().await;
    let n503 = std::cell::Cell::new(0);
    let n = paced(
        proxy.outbound,
        "retries removed",
        || n503.get() > 0,
        |code, body| {
            assert!(code == 200 || code == 503, "{code} {body}");
            n503.set(n503.get() + usize::from(code == 503));
        },
    )
    .await;
    eprintln!(
        "retries removed: {} of {n} requests answered 503",
        n503.get()
    );
    assert_eq!(
        retries().await,
        retried,
        "a request was retried with retries off"
    );
    assert_eq!(captured_logs().matches(refused).count(), 1);
    drop(cp);
}

/// The first requests through a new watch already follow the policy the control plane
/// publishes for the name: the proxy applies a Snapshot's policy before its endpoints, so no
/// request runs with the endpoints and without the policy. One Service under four names is
/// four watches; ten Services give 40 first requests, each of which must time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_to_a_name_already_follows_its_policy() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let ip = [127, 0, 0, 50];
    let port = port_on(&[ip]);
    let _slow = App::start("slow", SocketAddr::from((ip, port)), 200, SLOW).await;
    let (cp, proxy) = mesh(&server).await;
    let n = 10;
    for i in 0..n {
        let s = format!("slow{i}");
        service(&server, &s, json!({"remora.io/timeout": "200ms"}), port);
        slice(&server, &format!("{s}-x"), &s, port, &["127.0.0.50"]);
        published(&cp, &format!("{s}.shop.svc.cluster.local:80"), 1, |p| {
            p.timeout == Some(Duration::from_millis(200))
        })
        .await;
    }
    let mut escaped = Vec::new();
    for i in 0..n {
        for name in [
            format!("slow{i}:80"),
            format!("slow{i}.shop:80"),
            format!("slow{i}.shop.svc:80"),
            format!("slow{i}.shop.svc.cluster.local:80"),
        ] {
            let ((code, _), took) = timed_get(proxy.outbound, &name).await;
            if code != 504 {
                escaped.push((name, code, took));
            }
        }
    }
    assert!(
        escaped.is_empty(),
        "{} of {} first requests went out without the published timeout: {escaped:?}",
        escaped.len(),
        n * 4
    );
    drop(cp);
}

/// An ExternalName Service carries no policy (the control plane publishes only the alias), so
/// a Service that had a policy with its endpoints and became an ExternalName leaves it behind:
/// the alias's addresses are not held to the old 200ms timeout. (An alias reaches the proxy
/// as a `Reset`, which keeps the policy, so the alias must clear it explicitly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_turned_external_name_leaves_its_policy_behind() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let (pod_ip, localhost) = ([127, 0, 0, 60], [127, 0, 0, 1]);
    let port = port_on(&[pod_ip, localhost]);
    let _pod = App::start("pod", SocketAddr::from((pod_ip, port)), 200, SLOW).await;
    let _ext = App::start("external", SocketAddr::from((localhost, port)), 200, SLOW).await;
    let (cp, proxy) = mesh(&server).await;
    // An ExternalName answers on the port the caller asked for: the Service port is the apps'.
    let edge = |annotations: Value, spec: Value| {
        server.apply_path(
            "/api/v1/namespaces/shop/services/edge",
            &json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "edge", "namespace": "shop", "annotations": annotations},
                    "spec": spec}),
        )
    };
    let ports = json!([{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]);
    edge(json!({}), json!({"ports": ports}));
    slice(&server, "edge-x", "edge", port, &["127.0.0.60"]);
    let name = format!("edge.shop.svc.cluster.local:{port}");
    published(&cp, &name, 1, |p| p.timeout.is_none()).await;
    let auth = format!("edge.shop:{port}");
    assert_eq!(
        timed_get(proxy.outbound, &auth).await.0,
        (200, "pod".into())
    );
    edge(
        json!({"remora.io/timeout": "200ms"}),
        json!({"ports": ports}),
    );
    let t = Instant::now();
    while timed_get(proxy.outbound, &auth).await.0.0 != 504 {
        assert!(t.elapsed() < CHANGE, "the timeout never applied");
    }
    // Now an ExternalName for localhost, without the annotation.
    edge(
        json!({}),
        json!({"type": "ExternalName", "externalName": "localhost", "ports": ports}),
    );
    let t = Instant::now();
    while !matches!(cp.registry.lookup(&name), Some(Published::Alias(_))) {
        assert!(t.elapsed() < CHANGE, "{name} never became an alias");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut answers = Vec::new();
    loop {
        let ((code, body), took) = timed_get(proxy.outbound, &auth).await;
        if code == 200 && body == "external" {
            assert!(took >= SLOW, "{took:?}");
            break;
        }
        answers.push(code);
        assert!(
            t.elapsed() < CHANGE,
            "the alias still answers with the old policy {:?} after the change: {answers:?}",
            t.elapsed()
        );
    }
    drop(cp);
}

/// Split, header routes, a per-route rate limit and `retry-on` from Service annotations on the
/// real API server: the split and the route steer callers, and the per-route limit is enforced
/// by the endpoint's own proxy (published for its pod address), while the rest of the Service
/// is served; a changed split applies under a request loop with no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_routes_and_a_per_route_rate_limit_from_annotations() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let (web_ip, canary_ip, app_ip) = ([127, 0, 0, 41], [127, 0, 0, 42], [127, 0, 0, 43]);
    let port = port_on(&[web_ip, canary_ip]);
    // web's pod is its proxy's inbound on 127.0.0.41 in front of the app; the canary is a
    // bare app (its endpoint has no proxy and no limit).
    // Another port than the inbound's: the proxy refuses an app address that could loop.
    let app_port = std::iter::repeat_with(|| port_on(&[app_ip]))
        .find(|p| *p != port)
        .expect("a port");
    let web_app = SocketAddr::from((app_ip, app_port));
    let _web = App::start("web", web_app, 200, Duration::ZERO).await;
    let canary = App::start(
        "canary",
        SocketAddr::from((canary_ip, port)),
        200,
        Duration::ZERO,
    )
    .await;
    let pki = Pki::new("cluster.local");
    let client_id = SpiffeId::workload("cluster.local", "shop", "client").expect("id");
    let web_id = SpiffeId::workload("cluster.local", "shop", "web").expect("id");
    let cp = TestControl::start_kube(
        &pki,
        &server.installed_control_plane_kubeconfig(),
        &[
            ("token-client-0123456789", &client_id),
            ("token-web-0123456789ab", &web_id),
        ],
    )
    .await;
    let mut web_cfg = meshed(&pki, &cp, web_app, "shop", "web", "token-web-0123456789ab");
    web_cfg.inbound_addr = SocketAddr::from((web_ip, port));
    let web_proxy = TestProxy::start(web_cfg).await;
    let client = TestProxy::start(meshed(
        &pki,
        &cp,
        refused_addr().await,
        "shop",
        "client",
        "token-client-0123456789",
    ))
    .await;
    let annotations = |split: u32| {
        json!({
            "remora.io/split": format!("canary={split}"),
            "remora.io/routes": "header:x-canary=always=>canary",
            "remora.io/rate-limit": "1000; /heavy/=3",
            "remora.io/retry-on": "gateway-error,grpc:unavailable",
        })
    };
    service(&server, "web", annotations(50), port);
    service(&server, "canary", json!({}), port);
    slice(&server, "web-x", "web", port, &["127.0.0.41"]);
    slice(&server, "canary-x", "canary", port, &["127.0.0.42"]);
    published(&cp, "web.shop.svc.cluster.local:80", 1, |p| {
        p.split.len() == 1 && p.routes.len() == 1 && p.retry_on.statuses == [502, 503, 504]
    })
    .await;
    let web = "web.shop:80";
    let body = |args: Vec<String>| async move {
        let mut a: Vec<&str> = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
        a.extend(args.iter().map(String::as_str));
        let out = run("curl", &a).await;
        assert_eq!(out.status, 0, "curl: {}", out.stderr);
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let url = |path: &str| format!("http://{}{path}", client.outbound);
    let host = format!("host: {web}");

    // The header route always wins; without the header, the split draws about half.
    for _ in 0..10 {
        let got = body(vec![
            "-H".into(),
            host.clone(),
            "-H".into(),
            "x-canary: always".into(),
            url("/"),
        ])
        .await;
        assert_eq!(got, (200, "canary".to_string()));
    }
    let mut to_canary = 0;
    for _ in 0..60 {
        let (code, b) = body(vec!["-H".into(), host.clone(), url("/")]).await;
        assert_eq!(code, 200);
        to_canary += u32::from(b == "canary");
    }
    assert!(
        (15..=45).contains(&to_canary),
        "the canary got {to_canary} of 60"
    );

    // The per-route limit, enforced by web's own proxy: 429 on /heavy/ after its burst of 3,
    // while other paths are served.
    wait_until("the route's limit to apply", async || {
        body(vec![
            "-H".into(),
            host.clone(),
            "-H".into(),
            "x-canary: never".into(),
            url("/heavy/x"),
        ])
        .await
        .0 == 429
    })
    .await;
    let (code, _) = body(vec!["-H".into(), host.clone(), url("/light")]).await;
    assert!(code == 200, "{code}");
    let m = web_proxy.metrics().await;
    assert!(
        metric(
            &m,
            "remora_rate_limited_total",
            &[("scope", "route"), ("route", "/heavy/")]
        ) >= 1.0,
        "{m}"
    );

    // The split moved to 100 live, under a request loop that must not fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (stop, out) = (stop.clone(), client.outbound);
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 3000 {
                let (code, _) = get_via(out, web).await.expect("request");
                assert_eq!(code, 200, "request {n}");
                n += 1;
            }
            n
        })
    };
    service(&server, "web", annotations(100), port);
    wait_until("everything to the canary", async || {
        let before = canary.hits.load(Ordering::Relaxed);
        for _ in 0..10 {
            if body(vec!["-H".into(), host.clone(), url("/")]).await != (200, "canary".to_string())
            {
                return false;
            }
        }
        canary.hits.load(Ordering::Relaxed) >= before + 10
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    assert!(looping.await.expect("no request of the loop failed") > 0);
}

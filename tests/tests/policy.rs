//! Traffic policy from the file source, end to end: `timeout` and `retries` of a service in
//! the control plane's TOML reach a proxy through the discovery stream and are enforced on
//! real requests (curl over HTTP/1.1 and HTTP/2 with gRPC framing); changed live with a request
//! loop running and no failed request; a bad policy refused while the last good one serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::*;
use remora_tests::*;
use tokio::net::TcpListener;

const TOKEN: &str = "client-token-0123456789";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// What a [`PolicyApp`] does with every request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// `200` with its name.
    Ok,
    /// `503`, or for gRPC a trailers-only `grpc-status: 14`.
    Unavailable,
    /// `200` after this long.
    Slow(Duration),
    /// This status, for every method.
    Status(u16),
}

/// An HTTP/1.1 + HTTP/2 app with a fixed behaviour that counts the requests it gets.
struct PolicyApp {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PolicyApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PolicyApp {
    async fn start(name: &'static str, b: Behaviour) -> PolicyApp {
        let listener = TcpListener::bind(loopback0()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let hits = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        async move {
                            let mut rsp = hyper::Response::new(Full::new(Bytes::from_static(
                                name.as_bytes(),
                            )));
                            match b {
                                Behaviour::Ok => {}
                                Behaviour::Status(code) => {
                                    *rsp.status_mut() = code.try_into().unwrap()
                                }
                                Behaviour::Slow(d) => tokio::time::sleep(d).await,
                                Behaviour::Unavailable if grpc => {
                                    *rsp.body_mut() = Full::new(Bytes::new());
                                    let h = rsp.headers_mut();
                                    h.insert("content-type", "application/grpc".parse().unwrap());
                                    h.insert("grpc-status", "14".parse().unwrap());
                                }
                                Behaviour::Unavailable => {
                                    *rsp.status_mut() = 503.try_into().unwrap()
                                }
                            }
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        PolicyApp { addr, hits, task }
    }
}

/// A control plane serving `toml` (file source) and a client proxy fed by it.
async fn client_mesh(pki: &Pki, toml: &str) -> (TestControl, TestProxy) {
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), pki, toml, &[(TOKEN, &client_id)], DAY).await;
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    (cp, proxy)
}

/// The file-source TOML of one service with `policy` lines (`timeout = …`, `retries = …`).
fn service(name: &str, apps: &[&PolicyApp], policy: &str) -> String {
    let eps: Vec<String> = apps
        .iter()
        .map(|a| format!("  {{ addr = \"{}\" }},", a.addr))
        .collect();
    format!(
        "[[service]]\nname = \"{name}\"\n{policy}\nendpoints = [\n{}\n]\n",
        eps.join("\n")
    )
}

/// A gRPC-framed unary call through the outbound proxy with curl (HTTP/2 prior knowledge);
/// returns the `grpc-status` it ended with and how long it took.
async fn grpc_call(proxy: SocketAddr, authority: &str, extra: &[&str]) -> (String, Duration) {
    let url = format!("http://{proxy}/pkg.Svc/Get");
    let host = format!("host: {authority}");
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        &host,
        "--data-binary",
        "@-",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let started = Instant::now();
    let out = run("curl", &args).await;
    assert_eq!(out.status, 0, "curl: {}", out.stderr);
    let status = header(&out.stdout, "grpc-status")
        .unwrap_or("none")
        .to_string();
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_retries_from_the_file_source_are_enforced_changed_live_and_kept_when_bad() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let slow = PolicyApp::start("slow", Behaviour::Slow(Duration::from_millis(600))).await;
    let down = PolicyApp::start("down", Behaviour::Unavailable).await;
    let up = PolicyApp::start("up", Behaviour::Ok).await;
    let file = |slow_policy: &str, flaky_policy: &str| {
        service("slow.test:80", &[&slow], slow_policy)
            + &service("flaky.test:80", &[&down, &up], flaky_policy)
            + &service("broken.test:80", &[&down], "retries = 2")
    };
    let (cp, proxy) = client_mesh(&pki, &file("timeout = \"150ms\"", "retries = 2")).await;

    // Timeout: HTTP gets 504 naming the policy, well before the app's 600 ms.
    let started = Instant::now();
    let (status, body) = get_via(proxy.outbound, "slow.test:80").await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout policy"), "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    // gRPC gets DEADLINE_EXCEEDED.
    let (grpc_status, took) = grpc_call(proxy.outbound, "slow.test:80", &[]).await;
    assert_eq!(grpc_status, "4");
    assert!(took < Duration::from_millis(550), "{took:?}");

    // Retries: every request succeeds although one of two endpoints always answers 503 —
    // for GET and for gRPC (a body, replayed).
    for _ in 0..30 {
        let (status, body) = get_via(proxy.outbound, "flaky.test:80").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "up"));
    }
    for _ in 0..10 {
        let (grpc_status, _) = grpc_call(proxy.outbound, "flaky.test:80", &[]).await;
        assert_eq!(
            grpc_status, "none",
            "answered by the app that works, no grpc-status"
        );
    }
    assert!(
        down.hits.load(Ordering::Relaxed) > 0,
        "P2C sent some to the 503 endpoint"
    );
    // Failure accrual (on by default, 7 in a row): the endpoint answering only 503 is ejected
    // once it has failed 7 times in a row, and then gets only the odd probe.
    // P2C picks the 503 endpoint only while its latency estimate is below the other's, and an
    // avoided endpoint's estimate fades over seconds, not requests: the wait is bounded by time
    // (and a count), not by 500 requests, which a loaded CI machine once ran through first.
    let (mut n, since) = (0, Instant::now());
    while !captured_logs().contains("ejected by failure accrual (remora.io/failure-accrual: 7)") {
        assert!(
            n < 50_000 && since.elapsed() < WAIT,
            "no ejection after {n} requests in {:?}; the 503 endpoint had {} hits",
            since.elapsed(),
            down.hits.load(Ordering::Relaxed)
        );
        let (status, body) = get_via(proxy.outbound, "flaky.test:80").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "up"));
        n += 1;
    }
    let (before, started) = (down.hits.load(Ordering::Relaxed), Instant::now());
    for _ in 0..20 {
        let (status, body) = get_via(proxy.outbound, "flaky.test:80").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "up"));
    }
    // Probes come after a backoff of 100 ms, doubling: at most one per 100 ms here.
    let probes = down.hits.load(Ordering::Relaxed) - before;
    let allowed = 1 + started.elapsed().as_millis() as u64 / 100;
    assert!(
        probes <= allowed,
        "{probes} requests reached the ejected endpoint"
    );
    let flaky_down_hits = down.hits.load(Ordering::Relaxed) as f64;
    // Never the last ready endpoint: a service whose only endpoint fails keeps reaching it
    // (the app's own 503), instead of the proxy answering for an empty set; with retries and
    // nowhere else to go, the client gets the backend's own answer.
    for _ in 0..20 {
        let (status, body) = get_via(proxy.outbound, "broken.test:80").await.unwrap();
        assert_eq!((status, body.as_str()), (503, "down"));
    }
    let m = proxy.metrics().await;
    let retried = metric(
        &m,
        "remora_policy_retries_total",
        &[("direction", "outbound")],
    );
    assert!(retried >= flaky_down_hits, "{m}");
    assert_eq!(
        metric(
            &m,
            "remora_errors_total",
            &[("direction", "outbound"), ("kind", "timeout")]
        ),
        2.0,
        "{m}"
    );

    // The timeout raised live (1 s), with a request loop on the flaky service running: the
    // slow service answers 200 after the change, and no flaky request fails meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        let out = proxy.outbound;
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let (status, body) = get_via(out, "flaky.test:80").await.unwrap();
                assert_eq!((status, body.as_str()), (200, "up"), "request {n}");
                n += 1;
            }
            n
        })
    };
    cp.set_endpoints(&file("timeout = \"1s\"", "retries = 2"));
    wait_until("the new timeout", async || {
        get_via(proxy.outbound, "slow.test:80")
            .await
            .is_ok_and(|(s, b)| s == 200 && b == "slow")
    })
    .await;

    // A bad policy is refused whole (the file source keeps the last good table), with a line
    // naming the file, the service and the field.
    cp.set_endpoints(&file("timeout = \"fast\"", "retries = 2"));
    wait_until("the refusal", async || {
        captured_logs().contains("service slow.test:80: timeout: \"fast\" is not a duration")
    })
    .await;
    let (status, _) = get_via(proxy.outbound, "slow.test:80").await.unwrap();
    assert_eq!(status, 200, "the last good timeout (1 s) still applies");

    stop.store(true, Ordering::Relaxed);
    let n = looping.await.expect("the loop's requests all succeeded");
    assert!(n > 0);

    // Retries off (valid again): the 503 endpoint's answers now reach the client.
    cp.set_endpoints(&file("", "failure_accrual = 0"));
    wait_until("retries off", async || {
        get_via(proxy.outbound, "flaky.test:80")
            .await
            .is_ok_and(|(s, _)| s == 503)
    })
    .await;

    // A caller's own gRPC deadline is honoured without any policy.
    let (grpc_status, took) = grpc_call(
        proxy.outbound,
        "slow.test:80",
        &["-H", "grpc-timeout: 100m"],
    )
    .await;
    assert_eq!(grpc_status, "4");
    assert!(took < Duration::from_millis(550), "{took:?}");
}

/// `h2load -n N` of GETs for `authority` through `proxy`; returns how many succeeded (2xx).
async fn h2load(proxy: SocketAddr, authority: &str, n: u32) -> u32 {
    h2load_path(proxy, authority, "/", n).await
}

async fn h2load_path(proxy: SocketAddr, authority: &str, path: &str, n: u32) -> u32 {
    let url = format!("http://{proxy}{path}");
    let auth = format!(":authority: {authority}");
    let n = n.to_string();
    let out = run(
        "h2load",
        &["-n", &n, "-c", "4", "-m", "8", "-H", &auth, &url],
    )
    .await;
    assert_eq!(out.status, 0, "h2load: {}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_default()
        .to_string();
    // "status codes: 10000 2xx, 0 3xx, 0 4xx, 0 5xx"
    line.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no status codes in: {}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_sends_its_share_to_the_canary_and_follows_changes_without_failures() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let stable = PolicyApp::start("stable", Behaviour::Ok).await;
    let canary = PolicyApp::start("canary", Behaviour::Ok).await;
    let file = |split: &str| {
        service("web.test:80", &[&stable], split) + &service("web-canary.test:80", &[&canary], "")
    };
    let (cp, proxy) = client_mesh(&pki, &file("split = \"web-canary.test:80=5\"")).await;
    let share = |before: (u64, u64)| {
        let s = stable.hits.load(Ordering::Relaxed) - before.0;
        let c = canary.hits.load(Ordering::Relaxed) - before.1;
        (c as f64 * 100.0 / (s + c) as f64, s + c)
    };
    let hits = || {
        (
            stable.hits.load(Ordering::Relaxed),
            canary.hits.load(Ordering::Relaxed),
        )
    };

    // 5 % over 10,000 requests, within one point (the binomial spread is 0.2 points).
    let before = hits();
    assert_eq!(h2load(proxy.outbound, "web.test:80", 10_000).await, 10_000);
    let (pct, n) = share(before);
    assert_eq!(n, 10_000);
    assert!((4.0..=6.0).contains(&pct), "canary got {pct:.2} %");
    let m = proxy.metrics().await;
    let split = metric(
        &m,
        "remora_policy_routed_total",
        &[
            ("destination", "web.test:80"),
            ("to", "web-canary.test:80"),
            ("by", "split"),
        ],
    );
    assert!((400.0..=600.0).contains(&split), "{m}");

    // To 50 % while a run is under way: nothing fails, and then half go to the canary.
    let during = tokio::spawn(h2load(proxy.outbound, "web.test:80", 20_000));
    cp.set_endpoints(&file("split = \"web-canary.test:80=50\""));
    assert_eq!(
        during.await.expect("h2load"),
        20_000,
        "every request succeeded"
    );
    let before = hits();
    assert_eq!(h2load(proxy.outbound, "web.test:80", 10_000).await, 10_000);
    let (pct, _) = share(before);
    assert!((47.0..=53.0).contains(&pct), "canary got {pct:.2} %");

    // Over 100 % in all: refused with the line and the service named; 50 % keeps serving.
    cp.set_endpoints(&file("split = \"web-canary.test:80=50,other.test:80=60\""));
    wait_until("the refusal", async || {
        captured_logs().contains("service web.test:80: split:")
            && captured_logs().contains("add up to 110")
    })
    .await;
    let before = hits();
    assert_eq!(h2load(proxy.outbound, "web.test:80", 4_000).await, 4_000);
    let (pct, _) = share(before);
    assert!((44.0..=56.0).contains(&pct), "canary got {pct:.2} %");
}

/// `GET path` for `authority` through the outbound proxy with extra curl arguments; the body.
async fn curl_via(proxy: SocketAddr, authority: &str, path: &str, extra: &[&str]) -> String {
    let url = format!("http://{proxy}{path}");
    let host = format!("host: {authority}");
    let mut args = vec!["-sS", "--max-time", "10", "-H", &host];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = run("curl", &args).await;
    assert_eq!(out.status, 0, "curl: {}", out.stderr);
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_path_routes_send_matching_requests_elsewhere_first_match_wins() {
    let pki = Pki::new("cluster.local");
    let stable = PolicyApp::start("stable", Behaviour::Ok).await;
    let canary = PolicyApp::start("canary", Behaviour::Ok).await;
    let v2 = PolicyApp::start("v2", Behaviour::Ok).await;
    let routes = "routes = \"header:x-canary=true=>web-canary.test:80; path:/v2/=>web-v2.test:80\"";
    let toml = service("web.test:80", &[&stable], routes)
        + &service("web-canary.test:80", &[&canary], "")
        + &service("web-v2.test:80", &[&v2], "");
    let (_cp, proxy) = client_mesh(&pki, &toml).await;
    let out = proxy.outbound;
    let canary_hdr = ["-H", "x-canary: true"];
    for _ in 0..20 {
        assert_eq!(curl_via(out, "web.test:80", "/", &[]).await, "stable");
        assert_eq!(
            curl_via(out, "web.test:80", "/", &canary_hdr).await,
            "canary"
        );
        // Exact values only: another value stays.
        let other = ["-H", "x-canary: yes"];
        assert_eq!(curl_via(out, "web.test:80", "/", &other).await, "stable");
        assert_eq!(curl_via(out, "web.test:80", "/v2/items", &[]).await, "v2");
        assert_eq!(curl_via(out, "web.test:80", "/v1/v2/", &[]).await, "stable");
        // Both match: the first rule wins.
        assert_eq!(
            curl_via(out, "web.test:80", "/v2/x", &canary_hdr).await,
            "canary"
        );
    }
    let m = proxy.metrics().await;
    for (to, by, n) in [
        ("web-canary.test:80", "header", 40.0),
        ("web-v2.test:80", "path", 20.0),
    ] {
        let labels = [("destination", "web.test:80"), ("to", to), ("by", by)];
        assert_eq!(metric(&m, "remora_policy_routed_total", &labels), n, "{m}");
    }
}

/// GET `/` for `authority` through `proxy` with curl; (status, retry-after header).
async fn status_via(proxy: SocketAddr, authority: &str) -> (u16, Option<String>) {
    let url = format!("http://{proxy}/");
    let host = format!("host: {authority}");
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            &host,
            &url,
        ],
    )
    .await;
    assert_eq!(out.status, 0, "curl: {}", out.stderr);
    (
        status(&out.stdout),
        header(&out.stdout, "retry-after").map(str::to_string),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_enforced_by_the_endpoints_own_proxy_per_client_and_in_total() {
    let pki = Pki::new("cluster.local");
    let app = PolicyApp::start("web", Behaviour::Ok).await;
    let (a_id, b_id, web_id) = (pki.id("a"), pki.id("b"), pki.id("web"));
    const A: &str = "a-token-0123456789abcdef";
    const B: &str = "b-token-0123456789abcdef";
    const WEB: &str = "web-token-0123456789abcd";
    let cp = TestControl::start(
        loopback0(),
        &pki,
        "",
        &[(A, &a_id), (B, &b_id), (WEB, &web_id)],
        DAY,
    )
    .await;
    let server = TestProxy::start(proxy_config(app.addr, &pki, &cp.target(), "web", WEB)).await;
    cp.set_endpoints(&format!(
        "[[service]]\nname = \"web.test:80\"\nrate_limit = 15\nrate_limit_per_client = 10\n\
         endpoints = [{{ addr = \"{}\", identity = \"{web_id}\" }}]\n",
        server.inbound
    ));
    let refused = refused_addr().await;
    let a = TestProxy::start(proxy_config(refused, &pki, &cp.target(), "a", A)).await;
    let b = TestProxy::start(proxy_config(refused, &pki, &cp.target(), "b", B)).await;

    // The server's proxy learns its limits in the background after its first request.
    wait_until("the limits to apply", async || {
        status_via(a.outbound, "web.test:80").await.0 == 429
    })
    .await;
    // Let both buckets fill again (1 s holds one second's worth).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Per client: A's burst of 40 (h2load: milliseconds) gets its 10, give or take what
    // refills meanwhile, and a refusal says when to come back.
    let a_ok = h2load(a.outbound, "web.test:80", 40).await;
    assert!((9..=13).contains(&a_ok), "A got {a_ok} of 40");
    // A refusal says when to come back. A token may refill while curl starts (one per 100 ms;
    // a loaded machine took longer, and the call was let through): drain, then call, until a
    // call meets the empty bucket.
    let mut refusal = None;
    for _ in 0..20 {
        match status_via(a.outbound, "web.test:80").await {
            (429, after) => {
                refusal = Some(after);
                break;
            }
            (200, _) => h2load(a.outbound, "web.test:80", 30).await,
            other => panic!("A's call after its burst: {other:?}"),
        };
    }
    assert_eq!(
        refusal,
        Some(Some("1".to_string())),
        "no call after the burst was refused"
    );
    // gRPC callers get RESOURCE_EXHAUSTED, drained the same way.
    let mut refused = false;
    for _ in 0..20 {
        h2load(a.outbound, "web.test:80", 30).await;
        match grpc_call(a.outbound, "web.test:80", &[]).await.0.as_str() {
            "8" => {
                refused = true;
                break;
            }
            "none" => continue,
            other => panic!("grpc-status {other}"),
        }
    }
    assert!(refused, "no gRPC call was refused with RESOURCE_EXHAUSTED");
    // Let A's share refill: B's burst below must meet only the total.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h2load(a.outbound, "web.test:80", 10).await;
    // B has a bucket of its own, but the total (15 a second) has about 5 left.
    let b_ok = h2load(b.outbound, "web.test:80", 40).await;
    assert!((3..=9).contains(&b_ok), "B got {b_ok} of 40");
    let m = server.metrics().await;
    let limited = |scope| {
        metric(
            &m,
            "remora_rate_limited_total",
            &[("direction", "inbound"), ("scope", scope)],
        )
    };
    assert!(limited("client") >= 20.0, "{m}");
    assert!(limited("total") >= 20.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_timeouts_take_the_longest_matching_prefix() {
    let pki = Pki::new("cluster.local");
    let slow = PolicyApp::start("slow", Behaviour::Slow(Duration::from_millis(600))).await;
    let toml = service(
        "slow.test:80",
        &[&slow],
        "timeout = \"2s; /pkg.Reports/=150ms; /pkg.Reports/Year=5s\"",
    );
    let (_cp, proxy) = client_mesh(&pki, &toml).await;
    let code = async |path: &str| {
        let url = format!("http://{}{path}", proxy.outbound);
        let out = run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "host: slow.test:80",
                &url,
            ],
        )
        .await;
        out.stdout
    };
    // The route's 150 ms cuts the 600 ms app short; the longer prefix's 5 s and the default 2 s
    // do not.
    assert_eq!(code("/pkg.Reports/Month").await, "504");
    assert_eq!(code("/pkg.Reports/Year").await, "200");
    assert_eq!(code("/other").await, "200");
}

/// curl through the outbound proxy: (status, body), with `extra` arguments (a method, data).
async fn call_via(proxy: SocketAddr, authority: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{proxy}{path}");
    let host = format!("host: {authority}");
    let mut args = vec![
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        "-H",
        &host,
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = run("curl", &args).await;
    assert_eq!(out.status, 0, "curl: {}", out.stderr);
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Which answers are retried (`retry_on`), per-route retry counts, the opt-in for
/// non-idempotent requests and the per-try timeout, from the file source, each checked against
/// its absence: without it the failing endpoint's answers reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_per_route_retries_non_idempotent_opt_in_and_per_try_timeout() {
    let pki = Pki::new("cluster.local");
    let bad = PolicyApp::start("bad", Behaviour::Status(502)).await;
    let down = PolicyApp::start("down", Behaviour::Unavailable).await;
    let hung = PolicyApp::start("hung", Behaviour::Slow(Duration::from_secs(3))).await;
    let up = PolicyApp::start("up", Behaviour::Ok).await;
    // Failure accrual off: an ejected failing endpoint would hide whether retries happen.
    let file = |gw: &str, post: &str, hang: &str| {
        service(
            "gw.test:80",
            &[&bad, &up],
            &format!("failure_accrual = 0\n{gw}"),
        ) + &service(
            "post.test:80",
            &[&down, &up],
            &format!("failure_accrual = 0\n{post}"),
        ) + &service(
            "hang.test:80",
            &[&hung, &up],
            &format!("failure_accrual = 0\n{hang}"),
        )
    };
    let (cp, proxy) = client_mesh(
        &pki,
        &file(
            "retries = 2",
            "retries = 2",
            "retries = 2\ntimeout = \"10s\"",
        ),
    )
    .await;
    let out = proxy.outbound;
    // The default retry-on is 503 and UNAVAILABLE: a 502 reaches the client.
    wait_until("a 502 passed through", async || {
        call_via(out, "gw.test:80", "/", &[]).await.0 == 502
    })
    .await;
    // A POST answered 503 is not repeated without the opt-in.
    wait_until("a POST's 503 passed through", async || {
        call_via(out, "post.test:80", "/", &["-d", "x"]).await.0 == 503
    })
    .await;

    cp.set_endpoints(&file(
        "retries = \"2; /orders/=0\"\nretry_on = \"gateway-error\"",
        "retries = 2\nretry_on = \"non-idempotent\"",
        "retries = 2\ntimeout = \"10s\"\nretry_timeout = \"200ms\"",
    ));
    // Now every GET outside /orders/ and every POST ends on the endpoint that works. Each
    // service's policy arrives on its own watch: wait until ten of each in a row succeed (by
    // chance alone, with the failing endpoint answering faster, one time in a million).
    wait_until("the new policies", async || {
        for _ in 0..10 {
            if call_via(out, "gw.test:80", "/", &[]).await != (200, "up".into())
                || call_via(out, "post.test:80", "/", &["-d", "x"]).await != (200, "up".into())
            {
                return false;
            }
        }
        true
    })
    .await;
    // Paced: retries draw on the destination's retry budget (10 a second plus a fifth per
    // request); back-to-back curls would outrun it and rightly see the 502 / 503.
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            call_via(out, "gw.test:80", "/items", &[]).await,
            (200, "up".to_string()),
            "GET {i}"
        );
        assert_eq!(
            call_via(out, "post.test:80", "/", &["-d", "x"]).await,
            (200, "up".to_string()),
            "POST {i}"
        );
    }
    // /orders/ has 0 retries of its own: its 502s reach the client again.
    wait_until("no retries under /orders/", async || {
        call_via(out, "gw.test:80", "/orders/1", &[]).await.0 == 502
    })
    .await;

    // The hung endpoint never answers within the 200 ms per-try timeout: each request that
    // goes there first is abandoned and answered by the other, far sooner than the app's 3 s.
    let before = hung.hits.load(Ordering::Relaxed);
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        assert_eq!(
            call_via(out, "hang.test:80", "/", &[]).await,
            (200, "up".to_string()),
            "request {i}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(2_000),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    assert!(
        hung.hits.load(Ordering::Relaxed) > before,
        "the hung endpoint was tried (and abandoned)"
    );
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "remora_policy_retries_total",
            &[("direction", "outbound")]
        ) >= 20.0,
        "{m}"
    );
}

/// A per-route limit (`rate_limit = "1000; /heavy/=3"`) holds the route to its rate while the
/// rest of the Service runs under the total, counted with the route's prefix as a label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_route_rate_limit_holds_its_route_and_leaves_the_others() {
    let pki = Pki::new("cluster.local");
    let app = PolicyApp::start("web", Behaviour::Ok).await;
    let (a_id, web_id) = (pki.id("a"), pki.id("web"));
    const A: &str = "a-token-0123456789abcdef";
    const WEB: &str = "web-token-0123456789abcd";
    let cp = TestControl::start(loopback0(), &pki, "", &[(A, &a_id), (WEB, &web_id)], DAY).await;
    let server = TestProxy::start(proxy_config(app.addr, &pki, &cp.target(), "web", WEB)).await;
    cp.set_endpoints(&format!(
        "[[service]]\nname = \"web.test:80\"\nrate_limit = \"1000; /heavy/=3\"\n\
         endpoints = [{{ addr = \"{}\", identity = \"{web_id}\" }}]\n",
        server.inbound
    ));
    let a = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "a",
        A,
    ))
    .await;
    // The server's proxy learns its limits in the background after its first request.
    wait_until("the route's limit to apply", async || {
        call_via(a.outbound, "web.test:80", "/heavy/report", &[])
            .await
            .0
            == 429
    })
    .await;
    // Let the route's bucket fill again (1 s holds one second's worth).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A burst of 40 on the route: about its 3 (plus what refills in the milliseconds it
    // takes); 40 elsewhere: all served.
    let heavy = h2load_path(a.outbound, "web.test:80", "/heavy/report", 40).await;
    assert!((3..=6).contains(&heavy), "the route served {heavy} of 40");
    assert_eq!(
        h2load_path(a.outbound, "web.test:80", "/light", 40).await,
        40
    );
    let m = server.metrics().await;
    assert!(
        metric(
            &m,
            "remora_rate_limited_total",
            &[
                ("direction", "inbound"),
                ("scope", "route"),
                ("route", "/heavy/")
            ]
        ) >= 34.0,
        "{m}"
    );
}

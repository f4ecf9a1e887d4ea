//! Per-request load balancing (P2C + PeakEWMA) with the real grpcio client on one channel:
//! slow endpoints avoided, dead ones skipped without failing unsent requests, endpoint set
//! changes that leave streams in flight alone, backend GOAWAYs, weights, failfast.

use std::time::{Duration, Instant};

use remora_proxy::EndpointSpec;
use remora_tests::*;

async fn backends(names: &[&str], extra: &[&str]) -> Vec<Served> {
    let mut out = Vec::new();
    for n in names {
        let mut args = vec!["--name", n];
        args.extend_from_slice(extra);
        out.push(python_server("grpc_backend.py", &args).await);
    }
    out
}

async fn outbound_to(addrs: &[std::net::SocketAddr]) -> TestProxy {
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("echo.test:80", addrs)];
    TestProxy::start(cfg).await
}

fn count(r: &serde_json::Value, b: &str) -> u64 {
    r["backends"][b].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_is_avoided() {
    let mut bs = backends(&["b1", "b2"], &[]).await;
    bs.push(python_server("grpc_backend.py", &["--name", "slow", "--delay-ms", "50"]).await);
    let proxy = outbound_to(&bs.iter().map(|b| b.addr).collect::<Vec<_>>()).await;
    let r = grpc_client(
        proxy.outbound,
        Some("echo.test:80"),
        &["concurrent", "1000", "8"],
    )
    .await;
    eprintln!("slow: {r}");
    assert_eq!(r["codes"]["OK"], 1000, "{r}");
    assert!(
        count(&r, "slow") <= 100,
        "the slow endpoint got {} of 1000: {r}",
        count(&r, "slow")
    );
    // The balancer's view is in the metrics.
    let m = proxy.metrics().await;
    let slow = bs[2].addr.to_string();
    let ewma = metric(
        &m,
        "remora_endpoint_latency_ewma_seconds",
        &[("endpoint", &slow)],
    );
    assert!(ewma > 0.03, "slow endpoint's EWMA {ewma}: {m}");
    assert_eq!(
        metric(
            &m,
            "remora_endpoint_requests_total",
            &[("destination", "echo.test:80")]
        ),
        1000.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_fails_only_requests_it_had() {
    let mut bs = backends(&["b1", "b2", "b3"], &[]).await;
    let proxy = outbound_to(&bs.iter().map(|b| b.addr).collect::<Vec<_>>()).await;
    let outbound = proxy.outbound;
    let calls = tokio::spawn(async move {
        grpc_client(outbound, Some("echo.test:80"), &["concurrent", "3000", "8"]).await
    });
    let b1 = bs[0].addr.to_string();
    let admin = proxy.admin;
    wait_until("b1 to serve", async || {
        let m = http_get(admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&m, "remora_endpoint_requests_total", &[("endpoint", &b1)]) >= 100.0
    })
    .await;
    drop(bs.remove(0)); // SIGKILL b1 mid-run
    let r = tokio::time::timeout(WAIT * 2, calls)
        .await
        .expect("client ends")
        .unwrap();
    eprintln!("killed: {r}");
    let ok = r["codes"]["OK"].as_u64().unwrap_or(0);
    // At most the 8 calls in flight (some on b1 when it died) may fail; every call after that
    // is either balanced away or retried on another endpoint before it was ever sent.
    assert!(ok >= 3000 - 8, "{ok} of 3000 OK: {r}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "remora_endpoint_ready", &[("endpoint", &b1)]),
        0.0,
        "b1 is marked down: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_leaves_its_streams_running() {
    let bs = backends(&["b1", "b2"], &[]).await;
    let proxy = outbound_to(&[bs[0].addr]).await;
    let outbound = proxy.outbound;
    // 20 messages, 100 ms apart: a two-second stream on b1.
    let stream = tokio::spawn(async move {
        grpc_client(outbound, Some("echo.test:80"), &["stream", "20", "100"]).await
    });
    let admin = proxy.admin;
    wait_until("the stream to be in flight", async || {
        let m = http_get(admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(
            &m,
            "remora_requests_in_flight",
            &[("direction", "outbound")],
        ) == 1.0
    })
    .await;
    proxy.destinations.set(
        "echo.test:80",
        vec![EndpointSpec {
            addr: bs[1].addr,
            weight: 1,
            identity: None,
            opaque: false,
            quic: None,
            locality: Default::default(),
        }],
    );
    // New calls go to the new set at once…
    let r = grpc_client(proxy.outbound, Some("echo.test:80"), &["unary", "5"]).await;
    assert_eq!(r["backends"]["b2"], 5, "{r}");
    // …and the stream on the removed endpoint runs to its end.
    let r = tokio::time::timeout(WAIT, stream)
        .await
        .expect("stream ends")
        .unwrap();
    let msgs: Vec<&str> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(msgs.len(), 20, "{r}");
    assert!(msgs.iter().all(|m| m.starts_with("b1:")), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_goaways_fail_no_request() {
    // grpcio servers close every connection after 300 ms with a graceful GOAWAY.
    let bs = backends(&["b1", "b2"], &["--max-age-ms", "300"]).await;
    let proxy = outbound_to(&bs.iter().map(|b| b.addr).collect::<Vec<_>>()).await;
    let r = grpc_client(
        proxy.outbound,
        Some("echo.test:80"),
        &["concurrent", "3000", "8"],
    )
    .await;
    eprintln!("goaway: {r}");
    assert_eq!(r["codes"]["OK"], 3000, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_shift_the_share() {
    let bs = backends(&["light", "heavy"], &[]).await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![
        format!("echo.test:80={}*1,{}*4", bs[0].addr, bs[1].addr)
            .parse()
            .unwrap(),
    ];
    let proxy = TestProxy::start(cfg).await;
    let r = grpc_client(
        proxy.outbound,
        Some("echo.test:80"),
        &["concurrent", "800", "8"],
    )
    .await;
    eprintln!("weights: {r}");
    // P2C divides the cost by the weight; with two endpoints that skews, not splits, 4:1
    // (about 590:210 on an idle machine). With both cores loaded, latency noise dominates the
    // cost and the skew shrinks (426:374 seen in CI under load), but never reverses.
    assert!(count(&r, "heavy") > count(&r, "light"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoints_down_fails_fast() {
    let (a, b) = (refused_addr().await, refused_addr().await);
    let proxy = outbound_to(&[a, b]).await;
    let route = Route {
        name: "dead",
        addr: proxy.outbound,
        authority: "echo.test:80",
    };
    let started = Instant::now();
    // Every request gets an honest answer, never a hang; as the backoff grows past the
    // failfast window the proxy stops trying and says why.
    let mut failing = false;
    for _ in 0..40 {
        let out = curl(&route, "/", &["-D", "-", "--http2-prior-knowledge"]).await;
        let s = status(&out.stdout);
        assert!(s == 502 || s == 503, "{}", out.stdout);
        if s == 503 && out.stdout.contains("failing") {
            failing = true;
            break;
        }
    }
    assert!(failing, "never answered 503 'endpoints failing'");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // The next request is answered at once while the soonest retry is more than the
    // failfast window (3 s) away, and within it plus a connect attempt when the backoff has
    // just come under it (the proxy then waits for that endpoint and tries it: 502). Either
    // way an honest answer, never a hang.
    let quick = Instant::now();
    let out = curl(&route, "/", &["-D", "-", "--http2-prior-knowledge"]).await;
    let s = status(&out.stdout);
    assert!(s == 502 || s == 503, "{}", out.stdout);
    assert!(
        quick.elapsed() < Duration::from_secs(5),
        "failfast answered in {:?}",
        quick.elapsed()
    );
}

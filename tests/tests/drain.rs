//! Graceful draining: in-flight work finishes, new work goes elsewhere, the deadline cuts what
//! is left, and readiness turns 503 at once.

use std::time::{Duration, Instant};

use remora_tests::*;

async fn in_flight(p: &TestProxy, direction: &str) -> f64 {
    metric(
        &p.metrics().await,
        "remora_requests_in_flight",
        &[("direction", direction)],
    )
}

/// curl uploading `len` bytes at 20 KB/s through `route`: a request that streams for a while.
async fn slow_upload(
    route: Route,
    len: usize,
) -> (tokio::task::JoinHandle<Output>, Vec<u8>, std::path::PathBuf) {
    let (file, data) = random_file(len);
    let out_file = file.with_extension("out");
    let (f, o) = (
        format!("@{}", file.display()),
        out_file.to_str().unwrap().to_string(),
    );
    let task = tokio::spawn(async move {
        curl(
            &route,
            "/slow",
            &[
                "-D",
                "-",
                "--limit-rate",
                "20K",
                "--data-binary",
                &f,
                "-o",
                &o,
            ],
        )
        .await
    });
    (task, data, out_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_finishes_during_drain() {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.drain_timeout = Duration::from_secs(25);
    let proxy = TestProxy::start(cfg).await;
    let route = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "app.test:80",
    };
    // ~5 s of body streaming.
    let (upload, data, out_file) = slow_upload(route, 100 * 1024).await;
    wait_until("the upload to be in flight", async || {
        in_flight(&proxy, "inbound").await == 1.0
    })
    .await;

    let started = Instant::now();
    proxy.shutdown.shutdown();
    wait_until("/ready to turn 503", async || {
        matches!(http_get(proxy.admin, "/ready").await, Ok((503, _)))
    })
    .await;
    assert_eq!(metric(&proxy.metrics().await, "remora_draining", &[]), 1.0);
    assert_eq!(
        metric(&proxy.metrics().await, "remora_drain_start_requests", &[]),
        1.0
    );
    // The listener no longer accepts.
    wait_until("the inbound listener to close", async || {
        tokio::net::TcpStream::connect(proxy.inbound).await.is_err()
    })
    .await;

    let out = tokio::time::timeout(WAIT, upload)
        .await
        .expect("upload finishes")
        .unwrap();
    assert_eq!(status(&out.stdout), 200, "{} {}", out.stdout, out.stderr);
    assert_eq!(
        header(&out.stdout, "connection"),
        Some("close"),
        "HTTP/1.1 responses during a drain close the connection: {}",
        out.stdout
    );
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "the body arrived whole"
    );
    let report = proxy.stop().await;
    assert_eq!(report.cut, 0);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "exited as soon as the request was done"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_still_running_at_the_deadline_is_cut() {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.drain_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start(cfg).await;
    let route = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "app.test:80",
    };
    // ~25 s of body streaming: far past the deadline.
    let (upload, _, _) = slow_upload(route, 500 * 1024).await;
    wait_until("the upload to be in flight", async || {
        in_flight(&proxy, "inbound").await == 1.0
    })
    .await;
    let started = Instant::now();
    let report = proxy.stop().await;
    let took = started.elapsed();
    assert_eq!(report.cut, 1);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(1) + WAIT,
        "{took:?}"
    );
    let out = tokio::time::timeout(WAIT, upload)
        .await
        .expect("curl ends")
        .unwrap();
    assert_ne!(
        out.status, 0,
        "the cut request fails at the client: {}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_load_through_a_drain_loses_nothing_the_proxy_accepted() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let url = format!("http://{}/", proxy.inbound);
    let load = tokio::spawn(async move {
        run("h2load", &["-n", "1000000", "-c", "4", "-m", "10", &url]).await
    });
    let ok = [("direction", "inbound"), ("status", "200")];
    let admin = proxy.admin;
    wait_until("load to flow", async || {
        let m = http_get(admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&m, "remora_requests_total", &ok) >= 2000.0
    })
    .await;
    let started = Instant::now();
    proxy.shutdown.shutdown();
    let out = tokio::time::timeout(WAIT, load)
        .await
        .expect("h2load ends")
        .unwrap();
    // Read from the registry: the admin server stops with the proxy.
    let registry = proxy.registry.clone();
    let encode = |r: &prometheus_client::registry::Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).expect("encodes");
        out
    };
    let report = proxy.stop().await;
    let served = metric(&encode(&registry), "remora_requests_total", &ok);
    assert!(
        started.elapsed() < Duration::from_secs(31),
        "exits within the drain timeout + 1 s"
    );
    assert_eq!(report.cut, 0);
    // Every request the proxy accepted completed with a 200 at the client…
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default()
        .to_string();
    let num = |key: &str| -> f64 {
        line.split(", ")
            .find(|p| p.ends_with(key))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or(-1.0)
    };
    let succeeded = num("succeeded");
    let started_n = line
        .split(", ")
        .nth(1)
        .and_then(|p| p.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(-1.0);
    assert!(out.stdout.contains(" 0 5xx"), "{}", out.stdout);
    assert_eq!(
        succeeded, served,
        "h2load's successes are exactly the proxy's answers: {line}"
    );
    // …and what h2load counts beyond that are requests it tried to open after the GOAWAY, at
    // most its in-flight window (4 connections × 10 streams); the proxy never saw them.
    assert!(started_n - succeeded <= 40.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_survive_a_backend_proxy_shutdown() {
    let b1 = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let b2 = python_server("grpc_backend.py", &["--name", "b2"]).await;
    let p1 = TestProxy::start(config(b1.addr)).await;
    let p2 = TestProxy::start(config(b2.addr)).await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("echo.test:80", &[p1.inbound, p2.inbound])];
    let client = TestProxy::start(cfg).await;
    let outbound = client.outbound;
    let calls = tokio::spawn(async move {
        grpc_client(outbound, Some("echo.test:80"), &["concurrent", "3000", "8"]).await
    });
    let admin = p1.admin;
    wait_until("calls to reach b1", async || {
        let m = http_get(admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&m, "remora_requests_total", &[("direction", "inbound")]) >= 300.0
    })
    .await;
    let report = p1.stop().await;
    assert_eq!(report.cut, 0);
    let r = tokio::time::timeout(WAIT * 2, calls)
        .await
        .expect("client ends")
        .unwrap();
    eprintln!("backend proxy shutdown: {r}");
    assert_eq!(
        r["codes"]["OK"], 3000,
        "every call succeeded across the shutdown: {r}"
    );
    assert!(
        r["backends"]["b2"].as_u64().unwrap_or(0) > 1500,
        "b2 took over: {r}"
    );
}

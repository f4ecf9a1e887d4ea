//! Seeing the mesh: per-route metrics by gRPC method and peer identity (grpcio through two
//! proxies over mTLS), their cap under a path-scanning client (h2load), and `remora tap`
//! against a live h2load run, including its refusal of callers that are not on loopback.

use std::time::Duration;

use remora_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

fn route(direction: &str, peer: &'static str, method: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("direction", direction.to_string()),
        ("peer_identity", peer.to_string()),
        ("route", "grpc".into()),
        ("grpc_service", "remora.test.Echo".into()),
        ("grpc_method", method.to_string()),
    ]
}

fn get(m: &str, name: &str, labels: &[(&'static str, String)]) -> f64 {
    let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    metric(m, name, &l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_methods_get_their_own_route_metrics_with_the_peer_identity() {
    let pki = Pki::new("cluster.local");
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let mut cfg = config(backend.addr);
    cfg.identity_dir = Some(pki.identity_dir("web"));
    let server = TestProxy::start(cfg).await;
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir("client"));
    cfg.destinations = vec![
        format!("web.test:80={}#{WEB_ID}", server.inbound)
            .parse()
            .unwrap(),
    ];
    let client = TestProxy::start(cfg).await;
    let calls = [
        ("Unary", "x", 20, "OK"),
        ("Slow", "40", 4, "OK"),
        ("Fail", "14:down", 6, "UNAVAILABLE"),
    ];
    for (method, payload, n, code) in calls {
        let n_text = n.to_string();
        let r = grpc_client(
            client.outbound,
            Some("web.test:80"),
            &[
                "concurrent",
                &n_text,
                "2",
                "--method",
                method,
                "--payload",
                payload,
            ],
        )
        .await;
        assert_eq!(r["codes"][code], n, "{method}: {r}");
    }
    for (proxy, direction, peer) in [
        (&server, "inbound", CLIENT_ID),
        (&client, "outbound", WEB_ID),
    ] {
        let m = proxy.metrics().await;
        for (method, _, n, code) in calls {
            let labels = route(direction, peer, method);
            assert_eq!(
                get(&m, "remora_route_requests_total", &labels),
                n as f64,
                "{direction} {method}:\n{m}"
            );
            let failures = if code == "OK" { 0.0 } else { n as f64 };
            assert_eq!(
                get(&m, "remora_route_failures_total", &labels),
                failures,
                "{direction} {method}:\n{m}"
            );
            assert_eq!(
                get(&m, "remora_route_request_duration_seconds_count", &labels),
                n as f64,
                "{direction} {method}:\n{m}"
            );
        }
        // Slow sleeps 40 ms in the app: none of its calls is in a bucket below 25.6 ms, all
        // are below 52 s; the sum is at least 4 × 40 ms.
        let mut slow = route(direction, peer, "Slow");
        slow.push(("le", "0.0256".into()));
        assert_eq!(
            get(&m, "remora_route_request_duration_seconds_bucket", &slow),
            0.0,
            "{m}"
        );
        slow.pop();
        slow.push(("le", "+Inf".into()));
        assert_eq!(
            get(&m, "remora_route_request_duration_seconds_bucket", &slow),
            4.0,
            "{m}"
        );
        slow.pop();
        assert!(get(&m, "remora_route_request_duration_seconds_sum", &slow) >= 0.16);
        let sets = m
            .lines()
            .filter(|l| l.starts_with("remora_route_requests_total{"))
            .count();
        assert_eq!(sets, 3, "one label set per method:\n{m}");
    }
}

/// 10,000 distinct gRPC paths leave the per-route label sets at their cap; the rest are counted
/// under route="other".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_scanning_client_cannot_grow_the_route_labels_past_their_cap() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let dir = remora_tests::fresh_temp_dir();
    let uris = dir.join("uris.txt");
    let list: String = (0..10_000)
        .map(|i| format!("http://{}/scan.Svc{i}/M{i}\n", proxy.inbound))
        .collect();
    std::fs::write(&uris, list).unwrap();
    let out = run(
        "h2load",
        &[
            "-n",
            "10000",
            // One client: h2load starts every client at the top of the URI list.
            "-c",
            "1",
            "-m",
            "10",
            "-H",
            "content-type: application/grpc",
            "-i",
            uris.to_str().unwrap(),
        ],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.stdout.contains("10000 succeeded"),
        "h2load: {}",
        out.stdout
    );
    let m = proxy.metrics().await;
    let sets = m
        .lines()
        .filter(|l| l.starts_with("remora_route_requests_total{"))
        .count();
    let cap = metric(&m, "remora_route_label_sets", &[]);
    assert!(cap >= 100.0, "{m}");
    assert_eq!(
        sets as f64,
        cap + 1.0,
        "the capped sets and one overflow set"
    );
    let other = metric(
        &m,
        "remora_route_requests_total",
        &[("direction", "inbound"), ("route", "other")],
    );
    assert_eq!(other, 10_000.0 - cap, "{m}");
    assert_eq!(metric(&m, "remora_route_overflow_total", &[]), other);
    let total = metric(
        &m,
        "remora_route_requests_total",
        &[("direction", "inbound")],
    );
    assert_eq!(total, 10_000.0, "every request counted once");
}

/// `remora tap` as a child process, its stdout read line by line.
struct Tap {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Tap {
    async fn start(admin: std::net::SocketAddr, args: &[&str]) -> Tap {
        let bin = netns::workspace_binary("remora");
        let mut child = tokio::process::Command::new(bin)
            .args(["tap", "--proxy", &admin.to_string(), "--json"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("remora tap");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Tap { child, lines }
    }

    async fn next(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a tap line in time")
            .expect("read")
            .expect("tap ended early");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

/// Waits until the proxy counts `n` tap watchers (the watch is registered: no event is missed).
async fn watchers(proxy: &TestProxy, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = proxy.metrics().await;
        if metric(&m, "remora_tap_watchers", &[]) == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tap watchers never {n}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_exactly_the_matching_requests_of_a_live_h2load_run() {
    let app = EchoApp::start().await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("web.test:80", &[app.addr])];
    let proxy = TestProxy::start(cfg).await;
    let mut tap = Tap::start(
        proxy.admin,
        &[
            "--path", "/tapme", "--method", "GET", "--rate", "1000", "--max", "101",
        ],
    )
    .await;
    watchers(&proxy, 1.0).await;
    let url = |path: &str| format!("http://{}{path}", proxy.outbound);
    // Other paths and another method first: any of them in the tap output is a filter bug.
    for (path, extra) in [
        ("/other", &[][..]),
        ("/tapme/post", &["-d", "/etc/hostname"][..]),
    ] {
        let mut args = vec![
            "-n",
            "150",
            "-c",
            "2",
            "-m",
            "5",
            "-H",
            ":authority: web.test:80",
        ];
        args.extend_from_slice(extra);
        let u = url(path);
        args.push(&u);
        let out = run("h2load", &args).await;
        assert!(out.stdout.contains("150 succeeded"), "{}", out.stdout);
    }
    let u = url("/tapme/x?token=secret");
    let out = run(
        "h2load",
        &[
            "-n",
            "100",
            "-c",
            "2",
            "-m",
            "5",
            "-H",
            ":authority: web.test:80",
            &u,
        ],
    )
    .await;
    assert!(out.stdout.contains("100 succeeded"), "{}", out.stdout);
    // A last matching request: once tap shows it, everything before it has been shown.
    let last = curl(
        &Route {
            name: "outbound",
            addr: proxy.outbound,
            authority: "web.test:80",
        },
        "/tapme/last",
        &["-o", "/dev/null"],
    )
    .await;
    assert_eq!(last.status, 0, "{}", last.stderr);
    for i in 0..100 {
        let e = tap.next().await;
        assert_eq!(e["path"], "/tapme/x", "event {i}: {e}");
        assert_eq!(e["method"], "GET", "{e}");
        assert_eq!(e["direction"], "outbound", "{e}");
        assert_eq!(e["authority"], "web.test:80", "{e}");
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["endpoint"], app.addr.to_string(), "{e}");
        assert_eq!(e["finished"], true, "{e}");
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0, "{e}");
        assert!(
            !e.to_string().contains("secret"),
            "the query never shows: {e}"
        );
    }
    let e = tap.next().await;
    assert_eq!(e["path"], "/tapme/last", "{e}");
    let status = tokio::time::timeout(WAIT, tap.child.wait())
        .await
        .expect("tap exits after --max")
        .unwrap();
    assert!(status.success());
    // The watcher is gone once tap hangs up.
    let _ = proxy.metrics().await;
    curl(
        &Route {
            name: "outbound",
            addr: proxy.outbound,
            authority: "web.test:80",
        },
        "/tapme/after",
        &["-o", "/dev/null"],
    )
    .await;
    watchers(&proxy, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_is_refused_to_callers_off_loopback_and_past_the_watcher_cap() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let bin = netns::workspace_binary("remora");
    let bad = run(
        bin.to_str().unwrap(),
        &[
            "tap",
            "--proxy",
            &proxy.admin.to_string(),
            "--direction",
            "sideways",
        ],
    )
    .await;
    assert_eq!(bad.status, 1);
    assert!(
        bad.stderr
            .contains("direction=sideways: use inbound or outbound"),
        "{}",
        bad.stderr
    );
    // Eight watchers at once, then a ninth is turned away.
    let mut taps = Vec::new();
    for _ in 0..8 {
        taps.push(Tap::start(proxy.admin, &[]).await);
    }
    watchers(&proxy, 8.0).await;
    let ninth = run(
        bin.to_str().unwrap(),
        &["tap", "--proxy", &proxy.admin.to_string()],
    )
    .await;
    assert_eq!(ninth.status, 1);
    assert!(ninth.stderr.contains("429"), "{}", ninth.stderr);
    drop(taps);

    if let Err(why) = netns::available() {
        eprintln!("SKIPPED the off-loopback half: {why}");
        return;
    }
    // A proxy whose admin port is on a pod address: a caller from another pod, and even one
    // in the same pod using that address, is not on loopback.
    let mut lan = netns::Lan::new();
    let pod = lan.pod("tap", 2);
    let other = lan.pod("peer", 3);
    let admin = format!("{}:4191", lan.ip(2));
    let proxy_bin = netns::workspace_binary("remora-proxy");
    let _proxy = lan.spawn(
        &pod,
        None,
        &[
            ("REMORA_ADMIN_ADDR", admin.clone()),
            ("REMORA_INBOUND_ADDR", "0.0.0.0:4143".into()),
            ("REMORA_OUTBOUND_ADDR", "127.0.0.1:4140".into()),
        ],
        &[proxy_bin.to_str().unwrap()],
    );
    lan.wait_ready(&pod, &format!("http://{admin}/ready")).await;
    for ns in [&other, &pod] {
        let out = lan
            .run(ns, &[bin.to_str().unwrap(), "tap", "--proxy", &admin])
            .await;
        assert_eq!(out.status, 1, "{ns}: {}", out.stdout);
        assert!(
            out.stderr.contains("403") && out.stderr.contains("loopback only"),
            "{ns}: {}",
            out.stderr
        );
    }
}

/// The spans the OTLP receiver has written, once `want` of them are there for `trace_id`.
async fn spans(out: &std::path::Path, trace_id: &str, want: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let got: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|s| s["trace_id"] == trace_id)
            .collect();
        if got.len() >= want {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{want} spans of {trace_id} never arrived: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn traceparent_seen_by_app(headers_dump: &str) -> String {
    headers_dump
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent reached the app: {headers_dump}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_trace_continues_through_both_proxies_and_reaches_the_collector() {
    let out = std::env::temp_dir().join(format!("remora-otlp-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let receiver = python_server("otlp_receiver.py", &["--out", out.to_str().unwrap()]).await;
    let collector = receiver.addr.to_string();
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.identity_dir = Some(pki.identity_dir("web"));
    cfg.trace_collector = Some(collector.clone());
    let server = TestProxy::start(cfg).await;
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir("client"));
    cfg.trace_collector = Some(collector);
    cfg.destinations = vec![
        format!("web.test:80={}#{WEB_ID}", server.inbound)
            .parse()
            .unwrap(),
    ];
    let client = TestProxy::start(cfg).await;
    let route = Route {
        name: "mesh",
        addr: client.outbound,
        authority: "web.test:80",
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let sent = format!("traceparent: 00-{trace}-{parent}-01");
    let got = curl(
        &route,
        "/headers",
        &["-H", &sent, "-H", "tracestate: vendor=1"],
    )
    .await;
    assert_eq!(got.status, 0, "{}", got.stderr);
    let at_app = traceparent_seen_by_app(&got.stdout);
    let fields: Vec<&str> = at_app.split('-').collect();
    assert_eq!(fields.len(), 4, "{at_app}");
    assert_eq!(fields[1], trace, "the trace id is kept: {at_app}");
    assert_ne!(fields[2], parent, "a new parent span id: {at_app}");
    assert_eq!(fields[3], "01");
    assert!(
        got.stdout.contains("tracestate: vendor=1"),
        "{}",
        got.stdout
    );

    let spans = spans(&out, trace, 2).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let client_span = spans
        .iter()
        .find(|s| s["kind"] == 3)
        .expect("a CLIENT span");
    let server_span = spans
        .iter()
        .find(|s| s["kind"] == 2)
        .expect("a SERVER span");
    // The chain: the client's parent → outbound's span → inbound's span → the app.
    assert_eq!(client_span["parent_span_id"], parent, "{client_span}");
    assert_eq!(
        server_span["parent_span_id"], client_span["span_id"],
        "{server_span}"
    );
    assert_eq!(
        server_span["span_id"], fields[2],
        "the app's parent is inbound's span"
    );
    for (s, service, peer_key, peer) in [
        (client_span, "client", "remora.server.identity", WEB_ID),
        (server_span, "web", "remora.client.identity", CLIENT_ID),
    ] {
        let a = &s["attributes"];
        assert_eq!(s["name"], "GET", "{s}");
        assert_eq!(a["http.request.method"], "GET", "{s}");
        assert_eq!(a["url.path"], "/headers", "{s}");
        assert_eq!(a["http.response.status_code"], 200, "{s}");
        assert_eq!(a[peer_key], peer, "{s}");
        assert_eq!(s["resource"]["service.name"], service, "{s}");
        assert_eq!(s["resource"]["service.namespace"], "default", "{s}");
        assert_eq!(s["trace_state"], "vendor=1", "{s}");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
    }
    assert_eq!(client_span["attributes"]["server.address"], "web.test");
    assert_eq!(client_span["attributes"]["server.port"], 80);
    assert_eq!(
        server_span["attributes"]["network.peer.address"],
        app.addr.ip().to_string()
    );

    // Unsampled: no span, the header reaches the app as sent.
    let unsampled = format!("traceparent: 00-{}-{parent}-00", "1".repeat(32));
    let got = curl(&route, "/headers", &["-H", &unsampled]).await;
    assert_eq!(
        traceparent_seen_by_app(&got.stdout),
        unsampled.trim_start_matches("traceparent: ")
    );
    let m = client.metrics().await;
    assert_eq!(
        metric(&m, "remora_trace_spans_dropped_total", &[]),
        0.0,
        "{m}"
    );
    drop(receiver);
    let _ = std::fs::remove_file(&out);
}

/// Without a collector, trace headers are the client's, untouched (W3C and B3 alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_collector_trace_headers_pass_untouched() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for route in paths.routes() {
        let got = curl(
            &route,
            "/headers",
            &[
                "-H",
                &format!("traceparent: {sent}"),
                "-H",
                "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
                "-H",
                "x-b3-sampled: 1",
            ],
        )
        .await;
        assert_eq!(traceparent_seen_by_app(&got.stdout), sent, "{}", route.name);
        assert!(
            got.stdout
                .contains("x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7"),
            "{}: {}",
            route.name,
            got.stdout
        );
    }
}

/// The RPS `remora top` shows for `route` in a captured pane, if the row is there.
fn top_rps(pane: &str, route: &str) -> Option<f64> {
    let line = pane.lines().find(|l| l.contains(route))?;
    let after = line.split(route).nth(1)?;
    after.split_whitespace().find_map(|t| t.parse::<f64>().ok())
}

async fn tmux(args: &[&str]) -> Output {
    run("tmux", args).await
}

/// Waits until the pane satisfies `ok`; returns it.
async fn pane_until(session: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pane = tmux(&["capture-pane", "-p", "-t", session]).await.stdout;
        if ok(&pane) {
            return pane;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "top never showed {what}:\n{pane}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_renders_live_figures_that_follow_the_load() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        panic!("tmux is not installed; run .ci/setup");
    }
    let app = EchoApp::start().await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("web.test:80", &[app.addr])];
    let proxy = TestProxy::start(cfg).await;
    let bin = netns::workspace_binary("remora");
    let session = format!("remora-top-{}", std::process::id());
    let cmd = format!(
        "{} top --proxy {} --interval 300ms",
        bin.display(),
        proxy.admin
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "40",
        &cmd,
    ])
    .await;
    assert_eq!(started.status, 0, "{}", started.stderr);
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    pane_until(&session, "its header", |p| {
        p.contains("remora top") && p.contains("ROUTE")
    })
    .await;

    // gRPC-looking load at a steady rate, bounded: 2 clients × 100 rps for up to 60 s.
    let url = format!("http://{}/pkg.Svc/Hot", proxy.outbound);
    let mut load = tokio::process::Command::new("h2load")
        .args([
            "-D",
            "60",
            "-c",
            "2",
            "--rps",
            "100",
            "-H",
            "content-type: application/grpc",
            "-H",
            ":authority: web.test:80",
            &url,
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("h2load");
    let busy = pane_until(&session, "the route under load", |p| {
        top_rps(p, "pkg.Svc/Hot").is_some_and(|r| r > 50.0)
    })
    .await;
    assert!(busy.contains("100.0%"), "all requests succeed:\n{busy}");
    assert!(
        busy.contains(&app.addr.to_string()),
        "the endpoint row:\n{busy}"
    );
    assert!(busy.contains("web.test:80"), "{busy}");
    let _ = load.kill().await;
    pane_until(&session, "the route idle", |p| {
        top_rps(p, "pkg.Svc/Hot") == Some(0.0)
    })
    .await;
    // `q` quits: the session ends with its only command.
    tmux(&["send-keys", "-t", &session, "q"]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tmux(&["has-session", "-t", &session]).await.status == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "top did not quit on q"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request the proxy could not deliver leaves one log line that names its route, the
/// endpoint tried and the verified client — never the query string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_is_logged_with_its_route_endpoint_and_client_identity() {
    remora_tests::control::capture_logs();
    let pki = Pki::new("cluster.local");
    let app = refused_addr().await;
    let mut cfg = config(app);
    cfg.identity_dir = Some(pki.identity_dir("web"));
    let proxy = TestProxy::start(cfg).await;
    let client = id_files(&pki.identity_dir("client"));
    let out = curl_mtls(
        proxy.inbound,
        "web.default.sa.cluster.local",
        "/pkg.Svc/Refused?token=s3cret",
        Some(&client),
        &client.ca,
        &["--http2", "-o", "/dev/null", "-w", "%{http_code}"],
    )
    .await;
    assert_eq!(out.stdout, "502", "{}", out.stderr);
    let line = remora_tests::control::captured_logs()
        .lines()
        .find(|l| l.contains("request failed") && l.contains("/pkg.Svc/Refused"))
        .map(str::to_string);
    let line = line.expect("a log line for the failed request");
    for want in [
        "direction=\"inbound\"".to_string(),
        "route=/pkg.Svc/Refused".to_string(),
        format!("client_identity=\"{CLIENT_ID}\""),
        app.to_string(),
    ] {
        assert!(line.contains(&want), "{want} missing from: {line}");
    }
    assert!(!line.contains("s3cret"), "the query leaked: {line}");
}

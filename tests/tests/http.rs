//! HTTP/1.1 and HTTP/2 through inbound, outbound and outbound→inbound, driven by curl and
//! h2load; header scrubbing; metrics; the admin server.

use remora_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_chunked_and_expect_continue() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    let (file, data) = random_file(300 * 1024);
    let file_arg = format!("@{}", file.display());
    let out_file = file.with_extension("out");
    for route in paths.routes() {
        // Two requests on one client connection: the client keeps it alive, and the proxy
        // reuses its pooled upstream connection (the app sees one connection for both).
        let url2 = route.url("/second");
        let out = curl(
            &route,
            "/first",
            &["-v", "-D", "-", "-o", "/dev/null", &url2, "-o", "/dev/null"],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        assert!(
            out.stderr.contains("Re-using existing connection"),
            "{}: client connection not kept alive: {}",
            route.name,
            out.stderr
        );
        let conns: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-echo-connection"))
            .collect();
        assert_eq!(conns.len(), 2, "{}: {}", route.name, out.stdout);
        assert_eq!(
            conns[0], conns[1],
            "{}: upstream connection not reused",
            route.name
        );

        // Chunked request body, echoed back intact.
        let out = curl(
            &route,
            "/upload",
            &[
                "-D",
                "-",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &file_arg,
                "-o",
                out_file.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        assert_eq!(status(&out.stdout), 200, "{}", route.name);
        assert_eq!(header(&out.stdout, "x-echo-method"), Some("POST"));
        assert_eq!(header(&out.stdout, "x-echo-version"), Some("HTTP/1.1"));
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{}: chunked body changed in transit",
            route.name
        );

        // Expect: 100-continue: the client gets its 100 and then the full echo.
        let out = curl(
            &route,
            "/expect",
            &[
                "-v",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                &file_arg,
                "-o",
                out_file.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        assert!(
            out.stderr.contains("HTTP/1.1 100 Continue"),
            "{}: no 100 Continue: {}",
            route.name,
            out.stderr
        );
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{}: body changed",
            route.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_large_bodies() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    // Larger than every flow-control window on the way, so WINDOW_UPDATEs must flow.
    let (file, data) = random_file(8 * 1024 * 1024);
    let file_arg = format!("@{}", file.display());
    let out_file = file.with_extension("out");
    for route in paths.routes() {
        let out = curl(
            &route,
            "/big",
            &[
                "--http2-prior-knowledge",
                "-D",
                "-",
                "--data-binary",
                &file_arg,
                "-o",
                out_file.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        assert!(
            out.stdout.starts_with("HTTP/2 200"),
            "{}: {}",
            route.name,
            out.stdout
        );
        assert_eq!(
            header(&out.stdout, "x-echo-version"),
            Some("HTTP/2.0"),
            "{}",
            route.name
        );
        assert!(
            std::fs::read(&out_file).unwrap() == data,
            "{}: 8 MiB body changed in transit",
            route.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_many_concurrent_streams() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    for route in paths.routes() {
        let authority = format!(":authority: {}", route.authority);
        let url = format!("http://{}/", route.addr);
        let out = run(
            "h2load",
            &["-n", "3000", "-c", "2", "-m", "100", "-H", &authority, &url],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        assert!(
            out.stdout.contains("3000 succeeded, 0 failed, 0 errored"),
            "{}: {}",
            route.name,
            out.stdout
        );
        assert!(
            out.stdout.contains("status codes: 3000 2xx"),
            "{}: {}",
            route.name,
            out.stdout
        );
    }
    // The HTTP/2 client connections were multiplexed: 2 per route, not one per request.
    let m = paths.server.metrics().await;
    assert!(
        metric(
            &m,
            "remora_connections_total",
            &[("direction", "inbound"), ("protocol", "http2")]
        ) <= 4.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrubs_hop_by_hop_internal_and_identity_headers() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |cfg| cfg.strip_headers.push("x-secret".into())).await;
    for route in paths.routes() {
        for proto in ["--http1.1", "--http2-prior-knowledge"] {
            let mut args = vec![proto];
            let headers = [
                "Connection: x-hop",
                "x-hop: 1",
                "Keep-Alive: timeout=5",
                "Proxy-Connection: keep-alive",
                "Proxy-Authorization: Basic c2VjcmV0",
                "x-envoy-force-trace: true",
                "x-remora-client-id: spiffe://evil.example/ns/x/sa/admin",
                "x-secret: hunter2",
                "x-custom: kept",
            ];
            if proto == "--http2-prior-knowledge" {
                // Connection-specific headers are illegal in HTTP/2; curl would refuse them.
                args.extend([
                    "-H",
                    "x-envoy-force-trace: true",
                    "-H",
                    "x-remora-client-id: spiffe://evil",
                    "-H",
                    "x-secret: 1",
                    "-H",
                    "x-custom: kept",
                ]);
            } else {
                for h in &headers {
                    args.extend(["-H", h]);
                }
            }
            let out = curl(&route, "/headers", &args).await;
            assert_eq!(out.status, 0, "{} {proto}: {}", route.name, out.stderr);
            let seen = out.stdout.to_ascii_lowercase();
            for gone in [
                "x-hop",
                "keep-alive",
                "proxy-connection",
                "proxy-authorization",
                "x-envoy-",
                "x-remora-client-id",
                "x-secret",
                "connection:",
            ] {
                assert!(
                    !seen.contains(gone),
                    "{} {proto}: `{gone}` reached the app:\n{seen}",
                    route.name
                );
            }
            assert!(
                seen.contains("x-custom: kept"),
                "{} {proto}: {seen}",
                route.name
            );

            // The app's internal and hop-by-hop response headers do not reach the client, and
            // the proxy adds no banner of its own.
            let out = curl(&route, "/leaky", &[proto, "-D", "-", "-o", "/dev/null"]).await;
            assert_eq!(
                status(&out.stdout),
                200,
                "{} {proto}: {}",
                route.name,
                out.stdout
            );
            let seen = out.stdout.to_ascii_lowercase();
            for gone in ["x-envoy-", "x-remora-", "x-hop", "keep-alive", "server:"] {
                assert!(
                    !seen.contains(gone),
                    "{} {proto}: `{gone}` leaked to the client:\n{seen}",
                    route.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_requests_pass() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    let route = paths.routes()[0];
    let before = paths.server.metrics().await;
    let ok = [("direction", "inbound"), ("status", "200")];
    assert_eq!(metric(&before, "remora_requests_total", &ok), 0.0);
    for _ in 0..5 {
        let out = curl(&route, "/m", &["-o", "/dev/null"]).await;
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
    let url = format!("http://{}/", route.addr);
    let out = run(
        "h2load",
        &["-n", "20", "-c", "1", "-H", ":authority: app.test:80", &url],
    )
    .await;
    assert!(out.stdout.contains("20 succeeded"), "{}", out.stdout);

    let after = paths.server.metrics().await;
    assert_eq!(
        metric(&after, "remora_requests_total", &ok),
        25.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "remora_request_duration_seconds_count",
            &[("direction", "inbound")]
        ),
        25.0
    );
    assert_eq!(
        metric(
            &after,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "http1")]
        ),
        5.0
    );
    assert_eq!(
        metric(
            &after,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "http2")]
        ),
        1.0
    );
    assert!(
        metric(
            &after,
            "remora_transport_bytes_total",
            &[("direction", "inbound"), ("flow", "read")]
        ) > 0.0
    );
    assert!(
        metric(
            &after,
            "remora_transport_bytes_total",
            &[("direction", "inbound"), ("flow", "write")]
        ) > 0.0
    );
    assert_eq!(metric(&after, "remora_ready", &[]), 1.0);
    // Outbound requests are counted on their own side.
    let out = curl(&paths.routes()[1], "/m", &["-o", "/dev/null"]).await;
    assert_eq!(out.status, 0);
    let client = paths.client.metrics().await;
    assert_eq!(
        metric(
            &client,
            "remora_requests_total",
            &[("direction", "outbound"), ("status", "200")]
        ),
        1.0,
        "{client}"
    );
    assert_eq!(
        metric(
            &client,
            "remora_requests_total",
            &[("direction", "inbound")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_shutdown() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    assert_eq!(http_get(proxy.admin, "/live").await.unwrap().0, 200);
    assert_eq!(http_get(proxy.admin, "/ready").await.unwrap().0, 200);
    assert_eq!(http_get(proxy.admin, "/nope").await.unwrap().0, 404);
    assert_eq!(
        http_get(proxy.admin, "/shutdown").await.unwrap().0,
        405,
        "shutdown needs POST"
    );
    let m = proxy.metrics().await;
    assert!(m.contains("remora_ready 1"), "{m}");
    assert!(
        m.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let (status, _) = http_request(proxy.admin, "POST", "/shutdown")
        .await
        .unwrap();
    assert_eq!(status, 202);
    let report = proxy.stop().await;
    assert_eq!(report.cut, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_falls_back_to_dns_and_refuses_loops() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    // No static destination: `localhost:PORT` is resolved by DNS and forwarded directly.
    let route = Route {
        name: "dns",
        addr: proxy.outbound,
        authority: "localhost:0",
    };
    let url = format!("http://localhost:{}/dns", app.addr.port());
    let connect_to = format!(
        "localhost:{}:{}:{}",
        app.addr.port(),
        proxy.outbound.ip(),
        proxy.outbound.port()
    );
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let out = run(
            "curl",
            &[
                "-sS",
                "-D",
                "-",
                "-o",
                "/dev/null",
                proto,
                "--connect-to",
                &connect_to,
                &url,
            ],
        )
        .await;
        assert_eq!(
            status(&out.stdout),
            200,
            "{} {proto}: {} {}",
            route.name,
            out.stdout,
            out.stderr
        );
        assert_eq!(header(&out.stdout, "x-echo-path"), Some("/dns"));
    }
    // A request addressed to the proxy's own outbound listener would loop forever.
    let own = format!("http://{}/loop", proxy.outbound);
    let out = run(
        "curl",
        &[
            "-sS",
            "-D",
            "-",
            "-x",
            &format!("http://{}", proxy.outbound),
            &own,
        ],
    )
    .await;
    assert_eq!(status(&out.stdout), 502, "{}", out.stdout);
    assert!(out.stdout.contains("refusing to loop"), "{}", out.stdout);
}

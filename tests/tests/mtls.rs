//! mTLS with real TLS clients: curl and grpcio against permissive and strict inbound, SNI
//! passthrough of the app's own TLS, and outbound identity checks between proxies.

use remora_proxy::MtlsMode;
use remora_tests::*;

fn mtls_config(app: std::net::SocketAddr, identity: &std::path::Path) -> remora_proxy::Config {
    let mut cfg = config(app);
    cfg.identity_dir = Some(identity.to_path_buf());
    cfg
}

const WEB_SNI: &str = "web.default.sa.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_mtls_and_plaintext_on_one_port() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"))).await;
    let client = id_files(&pki.identity_dir("client"));

    // mTLS (HTTP/1.1 and, by ALPN, HTTP/2): the app learns the verified peer identity, and a
    // forged one is replaced.
    for proto in ["--http1.1", "--http2"] {
        let out = curl_mtls(
            proxy.inbound,
            WEB_SNI,
            "/headers",
            Some(&client),
            &client.ca,
            &[
                proto,
                "-H",
                "x-remora-client-id: spiffe://evil.example/ns/x/sa/admin",
                "-D",
                "-",
            ],
        )
        .await;
        assert_eq!(out.status, 0, "{proto}: {}", out.stderr);
        assert_eq!(status(&out.stdout), 200, "{proto}: {}", out.stdout);
        assert!(
            out.stdout
                .contains("x-remora-client-id: spiffe://cluster.local/ns/default/sa/client"),
            "{proto}: {}",
            out.stdout
        );
        assert!(!out.stdout.contains("evil"), "{proto}: {}", out.stdout);
    }
    let out = curl_mtls(
        proxy.inbound,
        WEB_SNI,
        "/headers",
        Some(&client),
        &client.ca,
        &["--http2", "-D", "-", "-o", "/dev/null"],
    )
    .await;
    assert!(
        out.stdout.starts_with("HTTP/2 200"),
        "ALPN h2: {}",
        out.stdout
    );

    // Plaintext on the same port: served, and no identity reaches the app — not even a forged one.
    let route = Route {
        name: "plain",
        addr: proxy.inbound,
        authority: "web.test:80",
    };
    let out = curl(
        &route,
        "/headers",
        &[
            "-H",
            "x-remora-client-id: spiffe://cluster.local/ns/default/sa/client",
        ],
    )
    .await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(!out.stdout.contains("x-remora-client-id"), "{}", out.stdout);

    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "remora_tls_connections_total", &[("result", "mtls")]),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("result", "plaintext")]
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(&m, "remora_identity_expiry_timestamp_seconds", &[]) > 1.7e9,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_trusted_certificate_are_refused() {
    let pki = Pki::new("cluster.local");
    let other = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"))).await;
    let trusted = id_files(&pki.identity_dir("client"));
    let foreign = id_files(&other.identity_dir("client"));
    // No client certificate.
    let out = curl_mtls(proxy.inbound, WEB_SNI, "/", None, &trusted.ca, &[]).await;
    assert_ne!(
        out.status, 0,
        "served without a client certificate: {}",
        out.stdout
    );
    // A certificate from another CA (with the right name and even the right trust domain).
    let out = curl_mtls(
        proxy.inbound,
        WEB_SNI,
        "/",
        Some(&foreign),
        &trusted.ca,
        &[],
    )
    .await;
    assert_ne!(
        out.status, 0,
        "served a foreign client certificate: {}",
        out.stdout
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("result", "handshake_failed")]
        ),
        2.0,
        "{m}"
    );
    // A truncated ClientHello is closed and counted, and the proxy keeps serving.
    let mut s = tokio::net::TcpStream::connect(proxy.inbound).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3])
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut s).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf))
        .await
        .expect("closed");
    let out = curl_mtls(
        proxy.inbound,
        WEB_SNI,
        "/",
        Some(&trusted),
        &trusted.ca,
        &["-D", "-", "-o", "/dev/null"],
    )
    .await;
    assert_eq!(status(&out.stdout), 200, "{} {}", out.stdout, out.stderr);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("result", "bad_hello")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_over_mtls() {
    let pki = Pki::new("cluster.local");
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let proxy = TestProxy::start(mtls_config(backend.addr, &pki.identity_dir("web"))).await;
    let c = id_files(&pki.identity_dir("client"));
    let tls = format!("{},{},{}", c.ca, c.crt, c.key);
    let r = grpc_client(
        proxy.inbound,
        None,
        &["--tls", &tls, "--server-name", WEB_SNI, "check"],
    )
    .await;
    assert_eq!(r["unary_body"], "hello remora", "{r}");
    assert_eq!(r["fail_code"], "NOT_FOUND", "{r}");
    assert_eq!(r["fail_trailer"], "because-b1", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_tls_passes_through_untouched() {
    let pki = Pki::new("cluster.local");
    let apps_pki = Pki::new("app.example");
    let app_id = apps_pki.identity_dir("shop");
    let app = python_server(
        "tls_app.py",
        &[
            &app_id.join("tls.crt").to_string_lossy(),
            &app_id.join("tls.key").to_string_lossy(),
        ],
    )
    .await;
    let proxy = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"))).await;
    // The client talks TLS to the app (its own CA, its own name); the proxy only sees the SNI.
    let ca = app_id.join("ca.crt").to_string_lossy().to_string();
    let out = curl_mtls(
        proxy.inbound,
        "shop.default.sa.app.example",
        "/",
        None,
        &ca,
        &[],
    )
    .await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "app tls ok");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("result", "passthrough")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_speaks_mtls_and_checks_the_servers_identity() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let server = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"))).await;
    let mut cfg = mtls_config(refused_addr().await, &pki.identity_dir("client"));
    cfg.destinations = vec![
        format!(
            "web.test:80={}#spiffe://cluster.local/ns/default/sa/web",
            server.inbound
        )
        .parse()
        .unwrap(),
        format!(
            "impostor.test:80={}#spiffe://cluster.local/ns/default/sa/billing",
            server.inbound
        )
        .parse()
        .unwrap(),
    ];
    let client = TestProxy::start(cfg).await;
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let route = Route {
            name: "mtls",
            addr: client.outbound,
            authority: "web.test:80",
        };
        let out = curl(&route, "/headers", &[proto]).await;
        assert_eq!(out.status, 0, "{proto}: {}", out.stderr);
        assert!(
            out.stdout
                .contains("x-remora-client-id: spiffe://cluster.local/ns/default/sa/client"),
            "{proto}: {}",
            out.stdout
        );
        // Right CA, wrong identity: refused.
        let route = Route {
            name: "impostor",
            addr: client.outbound,
            authority: "impostor.test:80",
        };
        let out = curl(&route, "/", &[proto, "-D", "-"]).await;
        assert_eq!(status(&out.stdout), 502, "{proto}: {}", out.stdout);
        assert!(
            out.stdout
                .contains("expected spiffe://cluster.local/ns/default/sa/billing"),
            "{proto}: {}",
            out.stdout
        );
    }
    let m = client.metrics().await;
    assert!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("direction", "outbound"), ("result", "established")]
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("direction", "outbound"), ("result", "failed")]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_refuses_plaintext() {
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let mut cfg = mtls_config(app.addr, &pki.identity_dir("web"));
    cfg.mtls = MtlsMode::Strict;
    let proxy = TestProxy::start(cfg).await;
    let route = Route {
        name: "plain",
        addr: proxy.inbound,
        authority: "web.test:80",
    };
    // Plaintext HTTP/1.1 to an application path: refused with a reason.
    let out = curl(&route, "/orders", &["-D", "-"]).await;
    assert_eq!(status(&out.stdout), 403, "{}", out.stdout);
    assert!(out.stdout.contains("REMORA_PROBE_PATHS"), "{}", out.stdout);
    // A kubelet-style probe still reaches the app.
    let out = curl(&route, "/healthz", &["-D", "-"]).await;
    assert_eq!(status(&out.stdout), 200, "{}", out.stdout);
    assert_eq!(header(&out.stdout, "x-echo-path"), Some("/healthz"));
    // Plaintext HTTP/2 (no probe speaks it): the connection is refused.
    let out = curl(&route, "/healthz", &["--http2-prior-knowledge"]).await;
    assert_ne!(
        out.status, 0,
        "plaintext h2 served in strict mode: {}",
        out.stdout
    );
    let c = id_files(&pki.identity_dir("client"));
    let out = curl_mtls(
        proxy.inbound,
        WEB_SNI,
        "/orders",
        Some(&c),
        &c.ca,
        &["-D", "-", "-o", "/dev/null"],
    )
    .await;
    assert_eq!(status(&out.stdout), 200, "{}", out.stderr);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_tls_connections_total",
            &[("result", "refused_plaintext")]
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_rides_mtls_between_proxies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new("cluster.local");
    let (echo, _task) = tcp_echo(None).await;
    let server = TestProxy::start(mtls_config(echo, &pki.identity_dir("db"))).await;
    let mut cfg = mtls_config(refused_addr().await, &pki.identity_dir("client"));
    cfg.destinations = vec![
        format!(
            "db.test:5000={}#spiffe://cluster.local/ns/default/sa/db",
            server.inbound
        )
        .parse()
        .unwrap(),
    ];
    let client = TestProxy::start(cfg).await;
    let mut s = connect_tunnel(client.outbound, "db.test:5000").await;
    let payload = b"\x00opaque bytes over mTLS";
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("echo")
        .unwrap();
    assert_eq!(got, payload);
    let m = server.metrics().await;
    assert_eq!(
        metric(&m, "remora_tls_connections_total", &[("result", "mtls")]),
        1.0,
        "{m}"
    );
}

/// The embedding API's identity seam: credentials pushed by the application (here from a
/// channel), validated whole like files, a bad set refused while the good one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_source_supplies_and_rotates_credentials() {
    use remora_proxy::{CredentialSet, IdentitySource};
    struct Pushed(std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<CredentialSet>>>);
    impl IdentitySource for Pushed {
        fn credentials(&self) -> futures_util::stream::BoxStream<'static, CredentialSet> {
            let rx = self.0.lock().unwrap().take();
            Box::pin(futures_util::stream::unfold(rx, |rx| async move {
                let mut rx = rx?;
                let set = rx.recv().await?;
                Some((set, Some(rx)))
            }))
        }
    }
    let read_set = |dir: &std::path::Path| {
        let f = |n: &str| std::fs::read(dir.join(n)).expect("read");
        CredentialSet::new(f("tls.crt"), f("tls.key"), f("ca.crt"))
    };
    let pki = Pki::new("cluster.local");
    let app = EchoApp::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut registry = prometheus_client::registry::Registry::default();
    let mut cfg = config(app.addr);
    cfg.mtls = MtlsMode::Strict;
    let proxy = remora_proxy::Proxy::builder()
        .config(cfg)
        .identity(Pushed(std::sync::Mutex::new(Some(rx))))
        .registry(&mut registry)
        .bind()
        .await
        .expect("binds without an identity directory");
    let inbound = proxy.inbound_addr().expect("inbound");
    let running = proxy.spawn();
    let counter = |name: &str| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        metric(&out, name, &[])
    };
    // No credentials yet: not ready (strict mTLS could serve nobody).
    assert!(!running.is_ready());
    // A broken set is refused, and changes nothing.
    let mut bad = read_set(&pki.identity_dir("web"));
    bad.key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec();
    tx.send(bad).await.expect("sent");
    wait_until("the bad set is refused", async || {
        counter("remora_identity_reload_failures_total") == 1.0
    })
    .await;
    assert!(!running.is_ready());
    // A good set: ready, and peers are verified against its bundle.
    tx.send(read_set(&pki.identity_dir("web")))
        .await
        .expect("sent");
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready");
    let client = id_files(&pki.identity_dir("client"));
    let call = async || {
        curl_mtls(
            inbound,
            WEB_SNI,
            "/headers",
            Some(&client),
            &client.ca,
            &["-D", "-"],
        )
        .await
    };
    let out = call().await;
    assert_eq!(status(&out.stdout), 200, "{} {}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("x-remora-client-id: spiffe://cluster.local/ns/default/sa/client"),
        "{}",
        out.stdout
    );
    // A rotation through the source: in service at once, still serving.
    tx.send(read_set(&pki.identity_dir("web")))
        .await
        .expect("sent");
    wait_until("the rotated set is loaded", async || {
        counter("remora_identity_reloads_total") == 2.0
    })
    .await;
    let out = call().await;
    assert_eq!(status(&out.stdout), 200, "{} {}", out.stdout, out.stderr);
    running.shutdown();
    running.wait().await.expect("clean stop");
}

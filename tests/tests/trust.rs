//! The trust findings, each as the attack was made: forged peer identities through upgrades, the
//! opaque fallback, opaque ports, trailers and odd certificates; exhaustion of connections;
//! loops through unspecified addresses; malformed authorities. Real sockets, real TLS, real
//! lenient servers (Python's http.server, Hypercorn).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use remora_proxy::MtlsMode;
use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FORGED: &str = "spiffe://cluster.local/ns/default/sa/admin";
const DETECT: Duration = Duration::from_millis(300);

/// Writes `req` and reads until the server closes (bounded).
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the connection ends");
    String::from_utf8_lossy(&got).into_owned()
}

fn mtls_config(
    app: SocketAddr,
    identity: &std::path::Path,
    mode: MtlsMode,
) -> remora_proxy::Config {
    let mut cfg = config(app);
    cfg.identity_dir = Some(identity.to_path_buf());
    cfg.mtls = mode;
    cfg.detect_timeout = DETECT;
    cfg
}

/// One TLS connection with a client certificate and no ALPN (tests/py/tls_send.py).
async fn tls_send(addr: SocketAddr, id: &IdFiles, payload: &[u8]) -> serde_json::Value {
    tls_send_expect(addr, id, payload, None).await
}

/// [`tls_send`], reading only `expect` bytes back (for a server that does not close).
async fn tls_send_expect(
    addr: SocketAddr,
    id: &IdFiles,
    payload: &[u8],
    expect: Option<usize>,
) -> serde_json::Value {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let port = addr.port().to_string();
    let script = py("tls_send.py");
    let expect = expect.map(|n| n.to_string()).unwrap_or_default();
    let mut args = vec![
        script.to_str().expect("utf-8"),
        "127.0.0.1",
        &port,
        &id.ca,
        &id.crt,
        &id.key,
        &hex,
    ];
    if !expect.is_empty() {
        args.push(&expect);
    }
    let out = run("python3", &args).await;
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("tls_send.py: {e}: {} {}", out.stdout, out.stderr))
}

/// Finding 1: an `Upgrade: h2c` (to a probe path in strict mode, or anywhere in permissive
/// mode) must not give the client an HTTP/2 connection straight to the app, whose later
/// streams would carry a forged identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_never_reaches_the_app() {
    let app = python_server("h2c_app.py", &[]).await;
    let pki = Pki::new("cluster.local");
    let id = pki.identity_dir("web");
    for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
        let proxy = TestProxy::start(mtls_config(app.addr, &id, mode)).await;
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        s.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut b))
                .await
                .expect("a response head")
                .expect("read");
            assert_eq!(n, 1, "closed early: {:?}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(!head.starts_with("HTTP/1.1 101"), "{mode:?}: {head}");
        assert!(head.starts_with("HTTP/1.1 200"), "{mode:?}: {head}");
        // Speak HTTP/2 on the connection anyway, as the attacker would after a 101.
        let io = hyper_util::rt::TokioIo::new(s);
        let attempt = async {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            tokio::spawn(conn);
            let req = hyper::Request::get("http://web/admin/secret")
                .header("x-remora-client-id", FORGED)
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            let rsp = send.send_request(req).await?;
            let body = rsp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(String::from_utf8_lossy(&body).into_owned())
        };
        // Bounded short: a refusal may also look like a connection that never answers.
        if let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            panic!("{mode:?}: an HTTP/2 stream reached the app after h2c: {body}");
        }
    }
}

/// Finding 1: a WebSocket upgrade on a probe path is no probe in strict mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_on_a_probe_path_is_refused_in_strict_mode() {
    let app = EchoApp::start().await;
    let pki = Pki::new("cluster.local");
    let proxy = TestProxy::start(mtls_config(
        app.addr,
        &pki.identity_dir("web"),
        MtlsMode::Strict,
    ))
    .await;
    let reply = exchange(
        proxy.inbound,
        b"GET /healthz HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("REMORA_PROBE_PATHS"), "{reply}");
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the app was reached"
    );
    // A real probe still passes.
    let reply = exchange(
        proxy.inbound,
        b"GET /healthz HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// Finding 2: request lines a lenient server parses but the detector's strict parse rejects
/// are refused with 400, never tunnelled; silence past the detect timeout hides nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_like_bytes_are_refused_not_tunnelled() {
    let app = python_server("lenient_app.py", &[]).await;
    let mut cfg = config(app.addr);
    cfg.detect_timeout = DETECT;
    let proxy = TestProxy::start(cfg).await;
    let tail = format!("x-remora-client-id: {FORGED}\r\nConnection: close\r\n\r\n");
    // Each of these reached the app with the forged header before.
    for line in [
        "GET  /a HTTP/1.1\r\n",
        "\r\nGET /a HTTP/1.1\r\n",
        "GET\t/a HTTP/1.1\r\n",
        "GET /a HTTP/1.1 \r\n",
        "GET /a HTTP/1.2\r\n",
        "GET /\u{e9} HTTP/1.1\r\n",
        // Found in review: Python's str.split() white space.
        "\x0cGET /a HTTP/1.1\r\n",
        "GET\x0b/a HTTP/1.1\r\n",
        "GET\x1c/a\x1dHTTP/1.1\r\n",
        "GET\r/a\rHTTP/1.1\r\n",
    ] {
        // The app itself takes it (shown on a direct connection), forged header and all...
        let direct = exchange(app.addr, format!("{line}{tail}").as_bytes()).await;
        if direct.contains(FORGED) {
            // ...but not through the proxy.
            let reply = exchange(proxy.inbound, format!("{line}{tail}").as_bytes()).await;
            assert!(reply.starts_with("HTTP/1.1 400"), "{line:?}: {reply}");
            assert!(!reply.contains(FORGED), "{line:?}: {reply}");
        }
    }
    // HTTP/0.9-style, no version, no headers after it.
    let reply = exchange(proxy.inbound, b"GET /a\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    // Silence past the detect timeout, then a valid request: it goes through the HTTP stack.
    let idle = |m: &str| {
        metric(
            m,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "idle")],
        )
    };
    let before = idle(&proxy.metrics().await);
    let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
    wait_until("the connection is seen idle", async || {
        idle(&proxy.metrics().await) > before
    })
    .await;
    s.write_all(format!("GET /late HTTP/1.1\r\nHost: web\r\n{tail}").as_bytes())
        .await
        .expect("write");
    let reply = read_to_close(&mut s).await;
    assert!(reply.contains("path: /late"), "{reply}");
    assert!(reply.contains("client-id: none"), "{reply}");

    // Silence, then a malformed line: refused as well.
    let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
    let before = idle(&proxy.metrics().await);
    wait_until("the connection is seen idle", async || {
        idle(&proxy.metrics().await) > before
    })
    .await;
    s.write_all(format!("GET  /late HTTP/1.1\r\n{tail}").as_bytes())
        .await
        .expect("write");
    let reply = read_to_close(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    // A server-speaks-first app on an unlisted port still works after the silence.
    let (banner_app, _t) = tcp_echo(Some(b"220 ready\r\n")).await;
    let mut cfg = config(banner_app);
    cfg.detect_timeout = DETECT;
    let smtp = TestProxy::start(cfg).await;
    let mut s = TcpStream::connect(smtp.inbound).await.expect("connect");
    let mut banner = [0u8; 11];
    tokio::time::timeout(WAIT, s.read_exact(&mut banner))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(&banner, b"220 ready\r\n");
    s.write_all(b"EHLO x\r\n").await.expect("write");
    let mut echo = [0u8; 8];
    s.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"EHLO x\r\n");
}

/// Finding 2, inside mTLS: a peer with a valid certificate for `sa/client` and no ALPN cannot
/// make the app see another identity, neither by a malformed line nor by silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inside_mtls_without_alpn_no_identity_can_be_forged() {
    let app = python_server("lenient_app.py", &[]).await;
    let pki = Pki::new("cluster.local");
    let proxy = TestProxy::start(mtls_config(
        app.addr,
        &pki.identity_dir("web"),
        MtlsMode::Permissive,
    ))
    .await;
    let client = id_files(&pki.identity_dir("client"));
    let tail = format!("x-remora-client-id: {FORGED}\r\nConnection: close\r\n\r\n");
    let r = tls_send(
        proxy.inbound,
        &client,
        format!("GET /a HTTP/1.2\r\n{tail}").as_bytes(),
    )
    .await;
    let reply = r["reply"].as_str().unwrap_or_default();
    assert!(reply.starts_with("HTTP/1.1 400"), "{r}");
    let r = tls_send(
        proxy.inbound,
        &client,
        format!("GET /ok HTTP/1.1\r\nHost: web\r\n{tail}").as_bytes(),
    )
    .await;
    let reply = r["reply"].as_str().unwrap_or_default();
    assert!(
        reply.contains("client-id: spiffe://cluster.local/ns/default/sa/client"),
        "{r}"
    );
    assert!(!reply.contains(FORGED), "{r}");
}

/// The opaque-port hint (ALPN `remora-opaque`, offered by a caller's proxy for Kubernetes
/// ports with an opaque `appProtocol`) only skips the wait: a peer that offers it and then
/// sends HTTP, at once or after a silence, is still detected, scrubbed and given its verified
/// identity — it cannot carry a forged `x-remora-client-id` to an HTTP app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opaque_alpn_hint_cannot_carry_http_past_scrubbing() {
    let app = python_server("lenient_app.py", &[]).await;
    let pki = Pki::new("cluster.local");
    for mode in [MtlsMode::Permissive, MtlsMode::Strict] {
        let proxy = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"), mode)).await;
        let client = id_files(&pki.identity_dir("client"));
        let request = format!(
            "GET /ok HTTP/1.1\r\nHost: web\r\nx-remora-client-id: {FORGED}\r\nConnection: close\r\n\r\n"
        );
        for delay_ms in ["0", "300"] {
            let hex: String = request.bytes().map(|b| format!("{b:02x}")).collect();
            let port = proxy.inbound.port().to_string();
            let out = tokio::process::Command::new("python3")
                .arg(py("tls_send.py"))
                .args([
                    "127.0.0.1",
                    &port,
                    &client.ca,
                    &client.crt,
                    &client.key,
                    &hex,
                ])
                .env("TLS_SEND_ALPN", "remora-opaque")
                .env("TLS_SEND_DELAY_MS", delay_ms)
                .output()
                .await
                .expect("run tls_send.py");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let r: serde_json::Value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("tls_send.py: {e}: {stdout}"));
            let reply = r["reply"].as_str().unwrap_or_default();
            assert!(
                reply.contains("client-id: spiffe://cluster.local/ns/default/sa/client"),
                "{mode:?}, {delay_ms} ms: {r}"
            );
            assert!(!reply.contains(FORGED), "{mode:?}, {delay_ms} ms: {r}");
        }
    }
}

/// Finding 3: strict means mTLS on opaque ports too, and mTLS works there (it used to hang:
/// the ClientHello went to the app).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_holds_on_opaque_ports() {
    let (app, _t) = tcp_echo(None).await;
    let pki = Pki::new("cluster.local");
    let id = pki.identity_dir("db");
    let client = id_files(&pki.identity_dir("client"));
    for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
        let mut cfg = mtls_config(app, &id, mode);
        cfg.opaque_ports = vec![app.port()];
        let proxy = TestProxy::start(cfg).await;
        let r = tls_send_expect(proxy.inbound, &client, b"over mTLS\n", Some(10)).await;
        assert_eq!(r["ok"], true, "{mode:?}: {r}");
        assert_eq!(r["reply"], "over mTLS\n", "{mode:?}: {r}");
        let plain = format!("GET / HTTP/1.1\r\nx-remora-client-id: {FORGED}\r\n\r\n");
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        s.write_all(plain.as_bytes()).await.expect("write");
        let _ = s.shutdown().await;
        let reply = read_to_close(&mut s).await;
        match mode {
            MtlsMode::Strict => assert_eq!(reply, "", "strict passed plaintext: {reply}"),
            // Permissive: a declared opaque port carries plaintext untouched, by design.
            _ => assert_eq!(reply, plain),
        }
    }
}

/// A hyper app whose response carries trailers, internal ones among them.
async fn trailer_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback0())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut t = http::HeaderMap::new();
                    t.insert("x-envoy-leak", "1".parse().expect("v"));
                    t.insert("x-remora-client-id", FORGED.parse().expect("v"));
                    t.insert("x-kept", "1".parse().expect("v"));
                    let body = Frames(
                        [
                            hyper::body::Frame::data(Bytes::from_static(b"body")),
                            hyper::body::Frame::trailers(t),
                        ]
                        .into(),
                    );
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

/// A body of data frames, then trailers.
struct Frames(std::collections::VecDeque<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

/// Finding 4: trailers are scrubbed both ways, HTTP/1 chunked and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_are_scrubbed_both_ways() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    // HTTP/1.1 chunked request trailers.
    let reply = exchange(
        proxy.inbound,
        format!(
            "POST /trailers HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\
             Trailer: x-remora-client-id, x-envoy-x, x-kept\r\nConnection: close\r\n\r\n\
             4\r\nbody\r\n0\r\nx-remora-client-id: {FORGED}\r\nx-envoy-x: 1\r\nx-kept: 1\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(!reply.contains(FORGED), "{reply}");
    assert!(!reply.contains("x-envoy-x"), "{reply}");
    // HTTP/2 request trailers.
    let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let mut t = http::HeaderMap::new();
    t.insert("x-remora-client-id", FORGED.parse().expect("v"));
    t.insert("x-envoy-x", "1".parse().expect("v"));
    t.insert("x-kept", "1".parse().expect("v"));
    let body = http_body_util::Full::new(Bytes::from_static(b"body"))
        .with_trailers(std::future::ready(Some(Ok(t))));
    let rsp = send
        .send_request(
            hyper::Request::post("http://web/trailers")
                .body(body)
                .expect("request"),
        )
        .await
        .expect("response");
    let text = rsp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("x-kept: 1"),
        "trailers did not arrive: {text}"
    );
    assert!(!text.contains("x-remora-client-id"), "{text}");
    assert!(!text.contains("x-envoy-x"), "{text}");

    // Response trailers from the app, over HTTP/2 through the proxy.
    let app = trailer_app().await;
    let proxy = TestProxy::start(config(app)).await;
    let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let rsp = send
        .send_request(
            hyper::Request::get("http://web/")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("response");
    let collected = rsp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("x-kept").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(trailers.get("x-envoy-leak").is_none(), "{trailers:?}");
    assert!(trailers.get("x-remora-client-id").is_none(), "{trailers:?}");
}

/// Finding 5: a CA-signed certificate with no SPIFFE ID, or with a foreign trust domain, is not
/// a mesh identity: the connection gets nothing through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_need_one_spiffe_id_in_the_trust_domain() {
    let app = EchoApp::start().await;
    let pki = Pki::new("cluster.local");
    let key = rcgen::KeyPair::generate().expect("key");
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let foreign = remora_certs::SpiffeId::workload("evil.example", "ns", "admin").expect("id");
    let chains = [
        (
            "no SPIFFE ID",
            pki.issuer
                .issue_window(None, "client.example", &key, now - hour, now + hour)
                .expect("leaf"),
        ),
        (
            "foreign trust domain",
            pki.issuer
                .issue(&foreign, &key, Duration::from_secs(3600))
                .expect("leaf"),
        ),
    ];
    for mode in [MtlsMode::Permissive, MtlsMode::Strict] {
        let proxy = TestProxy::start(mtls_config(app.addr, &pki.identity_dir("web"), mode)).await;
        for (what, chain) in &chains {
            let (file, _) = random_file(1);
            let dir = file.with_file_name(format!("odd-{}", what.replace(' ', "-")));
            remora_certs::ca::Leaf {
                chain_pem: chain.clone(),
                key_pem: key.serialize_pem(),
                bundle_pem: pki.issuer.bundle_pem.clone(),
            }
            .write(&dir)
            .expect("write");
            let r = tls_send(
                proxy.inbound,
                &id_files(&dir),
                b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            )
            .await;
            let reply = r["reply"].as_str().unwrap_or_default();
            assert!(!reply.contains("HTTP/1.1 200"), "{mode:?} {what}: {r}");
        }
        let m = proxy.metrics().await;
        assert_eq!(
            metric(
                &m,
                "remora_tls_connections_total",
                &[("direction", "inbound"), ("result", "bad_identity")]
            ),
            2.0,
            "{m}"
        );
    }
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Finding 8: a listener holds at most its connection limit; beyond it new connections are
/// closed at once and counted, and the proxy serves again once connections go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_beyond_it() {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.max_connections = Some(20);
    let proxy = TestProxy::start(cfg).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(proxy.inbound).await.expect("connect"));
    }
    wait_until("20 connections open", async || {
        metric(
            &proxy.metrics().await,
            "remora_open_connections",
            &[("direction", "inbound")],
        ) == 20.0
    })
    .await;
    for _ in 0..30 {
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await;
        let reply = read_to_close(&mut s).await;
        assert_eq!(reply, "", "served beyond the limit");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_connections_refused_total",
            &[("direction", "inbound")]
        ),
        30.0,
        "{m}"
    );
    drop(silent);
    wait_until("connections closed", async || {
        metric(
            &proxy.metrics().await,
            "remora_open_connections",
            &[("direction", "inbound")],
        ) == 0.0
    })
    .await;
    let reply = exchange(
        proxy.inbound,
        b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// Finding 9: the unspecified address and every local address with an own port is the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_and_local_addresses_are_the_proxy_itself() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let out = proxy.outbound.port();
    let admin = proxy.admin.port();
    for host in [
        format!("0.0.0.0:{out}"),
        format!("[::]:{out}"),
        format!("127.0.0.2:{out}"),
        format!("0.0.0.0:{admin}"),
    ] {
        let reply = exchange(
            proxy.outbound,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 502"), "{host}: {reply}");
        assert!(reply.contains("refusing to loop"), "{host}: {reply}");
        let reply = exchange(
            proxy.outbound,
            format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 502"), "CONNECT {host}: {reply}");
    }
    let m = proxy.metrics().await;
    // One refusal per request: nothing chained.
    assert_eq!(
        metric(
            &m,
            "remora_errors_total",
            &[("direction", "outbound"), ("kind", "loop")]
        ),
        8.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "remora_connections_total",
            &[("direction", "outbound"), ("protocol", "http1")]
        ),
        8.0,
        "{m}"
    );
}

/// Finding 11: an admin server on `[::]` takes `POST /shutdown` from 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_admin_takes_shutdown_from_ipv4_loopback() {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.admin_addr = "[::]:0".parse().expect("addr");
    let mut proxy = TestProxy::start(cfg).await;
    let admin = SocketAddr::from(([127, 0, 0, 1], proxy.admin.port()));
    let reply = exchange(
        admin,
        b"POST /shutdown HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    let task = proxy.task.take().expect("running");
    let report = tokio::time::timeout(WAIT, task)
        .await
        .expect("the proxy stops")
        .expect("run");
    assert_eq!(report.cut, 0);
}

/// Finding 12: malformed authorities get 400, not a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorities_get_400() {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.destinations = vec![dest("a:80", &[app.addr]), dest("server:80", &[app.addr])];
    let proxy = TestProxy::start(cfg).await;
    for req in [
        "GET / HTTP/1.1\r\nHost: a:99999\r\nConnection: close\r\n\r\n",
        "GET http://user:pw@server/ HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@server\r\nConnection: close\r\n\r\n",
    ] {
        let reply = exchange(proxy.outbound, req.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{req:?}: {reply}");
    }
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// An HTTP/2 + HTTP/1 app: `GET` answers 4 MiB; `POST` never reads the body (a slow app).
async fn big_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(loopback0())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.method() == hyper::Method::POST {
                            // Hold the body unread for a long time.
                            tokio::time::sleep(Duration::from_secs(120)).await;
                            drop(req);
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::from(vec![7u8; 4 << 20])),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2");
    tokio::spawn(conn);
    send
}

/// Finding 6: clients whose streams stop reading (zero window) must not stall the other
/// clients sharing the proxy's upstream HTTP/2 connection — inbound, and outbound→inbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_streams_do_not_delay_other_clients() {
    let app = big_app().await;
    let paths = Paths::start(app, |_| {}).await;
    let [inbound, _, mesh] = paths.routes();
    for route in [inbound, mesh] {
        // The attacker: five streams that never read their 4 MiB answers.
        let mut attacker = h2_client(route.addr).await;
        let mut held = Vec::new();
        for _ in 0..5 {
            let req = hyper::Request::get(format!("http://{}/big", route.authority))
                .body(http_body_util::Full::new(Bytes::new()))
                .expect("request");
            let rsp = tokio::time::timeout(WAIT, attacker.send_request(req))
                .await
                .expect("head in time")
                .expect("head");
            held.push(rsp); // body never polled
        }
        // Another client is served whole, in time.
        let mut other = h2_client(route.addr).await;
        for _ in 0..3 {
            let req = hyper::Request::get(format!("http://{}/big", route.authority))
                .body(http_body_util::Full::new(Bytes::new()))
                .expect("request");
            let got = tokio::time::timeout(Duration::from_secs(10), async {
                let rsp = other.send_request(req).await.expect("head");
                rsp.into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes()
                    .len()
            })
            .await
            .unwrap_or_else(|_| panic!("{}: another client was stalled", route.name));
            assert_eq!(got, 4 << 20, "{}", route.name);
        }
        drop(held);
    }
}

/// Finding 7: what one client connection can make the proxy buffer for an app that does not
/// read is bounded by the connection's HTTP/2 window, not megabytes per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_buffered_per_connection_are_bounded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let app = big_app().await;
    let proxy = TestProxy::start(config(app)).await;
    const CONNS: usize = 10;
    const CHUNK: usize = 64 * 1024;
    let pulled: Vec<Arc<AtomicUsize>> = (0..CONNS).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for counter in &pulled {
        let counter = counter.clone();
        let addr = proxy.inbound;
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let (mut send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake::<_, CountingBody>(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .expect("h2");
            tokio::spawn(conn);
            // Four uploads on the one connection: its window, not each stream's, is the bound.
            let mut uploads = Vec::new();
            for _ in 0..4 {
                let body = CountingBody {
                    left: 16 << 20,
                    chunk: CHUNK,
                    pulled: counter.clone(),
                };
                let req = hyper::Request::post("http://web/upload")
                    .body(body)
                    .expect("request");
                uploads.push(send.send_request(req));
            }
            for u in uploads {
                let _ = u.await;
            }
        }));
    }
    // Wait until every upload has stopped moving (flow control holds it).
    let total = || {
        pulled
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<usize>()
    };
    let mut last = usize::MAX;
    let mut stable = 0;
    wait_until("uploads stop moving", async || {
        let now = total();
        if now == last && now > 0 {
            stable += 1;
        } else {
            stable = 0;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stable >= 5
    })
    .await;
    for (i, c) in pulled.iter().enumerate() {
        let n = c.load(Ordering::Relaxed);
        // The proxy's connection window (1 MiB), what the app's stream windows took (4 × 64
        // KiB) and the client's own send buffers: 2 MiB measured. With the old 4 MiB window this
        // was 4.5 MiB.
        assert!(n <= 3 << 20, "connection {i}: the proxy took {n} bytes");
    }
    for t in tasks {
        t.abort();
    }
}

/// A request body of `left` bytes, counting what the client stack pulled from it.
struct CountingBody {
    left: usize,
    chunk: usize,
    pulled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl hyper::body::Body for CountingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = this.chunk.min(this.left);
        this.left -= n;
        this.pulled
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            1u8;
            n
        ])))))
    }
}

/// Finding 13: HTTP/2 to an app that speaks only HTTP/1 is translated (not 502), and broken
/// chunk framing from a client is the client's error (400), not the app's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_reaches_an_http1_only_app_and_bad_chunks_are_400() {
    let app = python_server("lenient_app.py", &[]).await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let route = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "web.test:80",
    };
    for _ in 0..3 {
        let out = curl(&route, "/h2", &["--http2-prior-knowledge", "-D", "-"]).await;
        assert_eq!(status(&out.stdout), 200, "{} {}", out.stdout, out.stderr);
        assert!(out.stdout.contains("path: /h2"), "{}", out.stdout);
    }
    let echo = EchoApp::start().await;
    let proxy = TestProxy::start(config(echo.addr)).await;
    let reply = exchange(
        proxy.inbound,
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          zz\r\nbody\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

/// Found by CI (the interception test): on first contact, many HTTP/2 streams at once to an
/// HTTP/1-only app. The app answers the preface and closes; the streams queued behind it broke
/// the pipe before the proxy read that answer, and all of them got 502. A fresh proxy each
/// time (the verdict is per endpoint), h2load with 16 streams in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_h2_streams_reach_an_http1_only_app() {
    for round in 0..5 {
        let app = python_server("lenient_app.py", &[]).await;
        let proxy = TestProxy::start(config(app.addr)).await;
        let url = format!("http://{}/", proxy.inbound);
        let out = run("h2load", &["-n", "200", "-c", "2", "-m", "8", &url]).await;
        assert_eq!(out.status, 0, "h2load: {}", out.stderr);
        assert!(
            out.stdout.contains("200 succeeded, 0 failed"),
            "round {round}: {}",
            out.stdout
        );
    }
}

/// Found in review: CGI/WSGI servers map `x_remora_client_id` to the same variable as
/// `x-remora-client-id`, so the underscore spelling is stripped as well (HTTP/1 and HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_internal_headers_are_stripped() {
    let app = EchoApp::start().await;
    let proxy = TestProxy::start(config(app.addr)).await;
    let route = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "web.test:80",
    };
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let out = curl(
            &route,
            "/headers",
            &[
                proto,
                "-H",
                &format!("x_remora_client_id: {FORGED}"),
                "-H",
                "X_Envoy_Internal: true",
                "-H",
                "x_kept: 1",
            ],
        )
        .await;
        assert!(out.stdout.contains("x_kept: 1"), "{proto}: {}", out.stdout);
        assert!(!out.stdout.contains(FORGED), "{proto}: {}", out.stdout);
        assert!(!out.stdout.contains("envoy"), "{proto}: {}", out.stdout);
    }
}

//! Hooks under attack, through real sockets: a forged identity header never reaches a hook, and
//! a panicking hook costs its own request only.

use std::net::SocketAddr;

use bytes::Bytes;
use remora_proxy::{Hooks, Listen, Proxy, RequestContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request locally with what the hook saw of the caller's identity.
struct Report;

impl Hooks for Report {
    fn on_request(
        &self,
        req: &mut http::request::Parts,
        cx: &RequestContext<'_>,
    ) -> Option<http::Response<Bytes>> {
        if req.uri.path() == "/panic" {
            panic!("a bug in the embedding application");
        }
        let header = req
            .headers
            .get("x-remora-client-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = format!(
            "header={} identity={}",
            header.as_deref().unwrap_or("none"),
            cx.client_identity.unwrap_or("none")
        );
        Some(http::Response::new(Bytes::from(body)))
    }
}

/// One HTTP/1.1 request on its own connection; the whole response as text.
async fn get(addr: SocketAddr, path: &str, extra: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let req = format!("GET {path} HTTP/1.1\r\nHost: app\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("writes");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("reads");
    out
}

#[tokio::test]
async fn a_forged_identity_never_reaches_a_hook_and_a_panicking_hook_fails_only_its_request() {
    // Nothing listens on the app port: every answer below comes from the hook or the proxy.
    let proxy = Proxy::builder()
        .app("127.0.0.1:9".parse().unwrap())
        .inbound(Listen::Addr("127.0.0.1:0".parse().unwrap()))
        .outbound(Listen::Off)
        .admin(Listen::Off)
        .hooks(Report)
        .bind()
        .await
        .expect("binds");
    let inbound = proxy.inbound_addr().expect("inbound");
    let running = proxy.spawn();
    running.ready().await;

    // Plaintext caller forging the identity header, in both spellings: scrubbed before phase 1.
    for forged in [
        "x-remora-client-id: spiffe://cluster.local/ns/default/sa/admin\r\n",
        "x_remora_client_id: spiffe://cluster.local/ns/default/sa/admin\r\n",
    ] {
        let rsp = get(inbound, "/", forged).await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with("header=none identity=none"), "{rsp}");
    }

    // A panic in the hook: that request gets a 500, counted as a hook error …
    let rsp = get(inbound, "/panic", "").await;
    assert!(rsp.starts_with("HTTP/1.1 500"), "{rsp}");
    assert!(rsp.contains("hook panicked"), "{rsp}");
    // … and the proxy goes on serving, without counting it as a bug of its own.
    let rsp = get(inbound, "/", "").await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(remora_proxy::panics_caught(), 0);

    running.shutdown();
    running.wait().await.expect("clean stop");
}

/// Changes the head at phases 1 and 3, and says at phase 4 who answered; the app below reports
/// what reached it.
struct Rewrite;

impl Hooks for Rewrite {
    fn on_request(
        &self,
        req: &mut http::request::Parts,
        _: &RequestContext<'_>,
    ) -> Option<http::Response<Bytes>> {
        req.headers
            .insert("x-phase-1", http::HeaderValue::from_static("seen"));
        req.headers.remove("x-drop-me");
        req.uri = "/rewritten?by=phase1".parse().expect("a URI");
        None
    }

    fn on_upstream_request(&self, req: &mut http::request::Parts, cx: &RequestContext<'_>) {
        let to = cx.endpoint.map(|a| a.to_string()).unwrap_or_default();
        req.headers.insert(
            "x-phase-3",
            http::HeaderValue::from_str(&to).expect("an address"),
        );
        req.method = http::Method::PUT;
    }

    fn on_response(&self, rsp: &mut http::response::Parts, cx: &RequestContext<'_>) {
        let by = cx.endpoint.map(|a| a.to_string()).unwrap_or_default();
        rsp.headers.insert(
            "x-answered-by",
            http::HeaderValue::from_str(&by).expect("an address"),
        );
    }
}

#[tokio::test]
async fn head_changes_made_by_hooks_reach_the_app_and_the_body_follows_them() {
    // The app: one connection, reads the request head and its 5-byte body, answers with both.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let app_addr = app.local_addr().expect("addr");
    let seen = tokio::spawn(async move {
        let (mut s, _) = app.accept().await.expect("accepts");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"hello") {
            let n = s.read(&mut buf).await.expect("reads");
            assert!(
                n > 0,
                "the request ended early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await
            .expect("answers");
        String::from_utf8_lossy(&got).to_lowercase()
    });
    let proxy = Proxy::builder()
        .app(app_addr)
        .inbound(Listen::Addr("127.0.0.1:0".parse().unwrap()))
        .outbound(Listen::Off)
        .admin(Listen::Off)
        .hooks(Rewrite)
        .bind()
        .await
        .expect("binds");
    let inbound = proxy.inbound_addr().expect("inbound");
    let running = proxy.spawn();
    running.ready().await;

    let mut s = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connects");
    s.write_all(
        b"POST /original HTTP/1.1\r\nHost: app\r\nx-drop-me: 1\r\nx-kept: 2\r\ncontent-length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await
    .expect("writes");
    let mut rsp = String::new();
    s.read_to_string(&mut rsp).await.expect("reads");
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    // Phase 4 is told which endpoint answered.
    assert!(
        rsp.to_lowercase()
            .contains(&format!("\r\nx-answered-by: {app_addr}\r\n")),
        "{rsp}"
    );

    let got = seen.await.expect("the app ran");
    assert!(
        got.starts_with("put /rewritten?by=phase1 http/1.1\r\n"),
        "{got}"
    );
    assert!(got.contains("\r\nx-phase-1: seen\r\n"), "{got}");
    assert!(
        got.contains(&format!("\r\nx-phase-3: {app_addr}\r\n")),
        "{got}"
    );
    assert!(got.contains("\r\nx-kept: 2\r\n"), "{got}");
    assert!(!got.contains("x-drop-me"), "{got}");
    assert!(got.ends_with("\r\n\r\nhello"), "{got}");

    running.shutdown();
    running.wait().await.expect("clean stop");
}

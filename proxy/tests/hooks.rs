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

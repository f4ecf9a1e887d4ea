//! Connection-specific header fields over HTTP/2 (RFC 9113 §8.2.2), through the patched
//! hyper and h2 in `vendor/`: both now look for these fields in one pass over a message's
//! names instead of one lookup per forbidden name (vendor/README.md). These tests pin what
//! that fast path must keep: hyper strips the fields (and the names `connection` lists) from
//! what it sends, keeps a request's `te: trailers`, and h2 refuses to send any that remain.
//! Real sockets on loopback, hyper's and h2's own clients and servers.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/2 server that answers every request with the request's header names (in a
/// response header, `seen`) and adds the connection-specific fields `respond_with` lists.
async fn server(respond_with: &'static [(&'static str, &'static str)]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut seen: Vec<String> = req
                    .headers()
                    .iter()
                    .map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?")))
                    .collect();
                seen.sort();
                let mut rsp = Response::builder().header("seen", seen.join(","));
                for (n, v) in respond_with {
                    rsp = rsp.header(*n, *v);
                }
                let rsp = rsp.body(Empty::<Bytes>::new()).expect("response");
                async move { Ok::<_, Infallible>(rsp) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// Sends one request with `headers` through hyper's HTTP/2 client; the response's headers.
async fn send(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> HeaderMap {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let mut req = Request::builder().uri(format!("http://{addr}/"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let rsp = sender
        .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .expect("response");
    rsp.headers().clone()
}

fn seen(h: &HeaderMap) -> String {
    h.get("seen")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn hyper_strips_connection_specific_fields_from_requests_and_keeps_te_trailers() {
    let addr = server(&[]).await;

    // gRPC's `te: trailers` is the one such field a request keeps.
    let h = send(addr, &[("te", "trailers"), ("x-a", "1")]).await;
    assert_eq!(seen(&h), "te=trailers,x-a=1");

    // Any other TE goes.
    let h = send(addr, &[("te", "gzip"), ("x-a", "1")]).await;
    assert_eq!(seen(&h), "x-a=1");

    // Every connection-specific field goes, with the names `connection` lists.
    let h = send(
        addr,
        &[
            ("connection", "x-b, x-c"),
            ("x-b", "1"),
            ("x-c", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
        ],
    )
    .await;
    assert_eq!(seen(&h), "x-a=1");

    // One forbidden field alone is found too, wherever it is among the names.
    for field in [
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        let h = send(addr, &[("x-a", "1"), (field, "x"), ("x-z", "1")]).await;
        assert_eq!(seen(&h), "x-a=1,x-z=1", "{field}");
    }
}

#[tokio::test]
async fn hyper_strips_connection_specific_fields_from_responses() {
    let addr = server(&[
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("x-kept", "1"),
    ])
    .await;
    let h = send(addr, &[]).await;
    for gone in ["connection", "x-hop", "keep-alive", "te"] {
        assert!(!h.contains_key(gone), "{gone} reached the client: {h:?}");
    }
    assert_eq!(h.get("x-kept").map(|v| v.as_bytes()), Some(&b"1"[..]));

    // Only `te` (illegal in any HTTP/2 response) is found too.
    let addr = server(&[("te", "trailers"), ("x-kept", "1")]).await;
    let h = send(addr, &[]).await;
    assert!(!h.contains_key("te"), "{h:?}");
}

/// h2 itself (under hyper) refuses to send a HEADERS frame with a connection-specific field:
/// the second line, for users of h2 without hyper.
#[tokio::test]
async fn h2_refuses_to_send_connection_specific_fields() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            let _ = respond.send_response(Response::new(()), true);
        }
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");

    let request = |fields: &[(&str, &str)]| {
        let mut req = Request::builder().uri(format!("http://{addr}/"));
        for (n, v) in fields {
            req = req.header(*n, *v);
        }
        req.body(()).expect("request")
    };
    for (n, v) in [
        ("connection", "close"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "gzip"),
    ] {
        let err = client
            .send_request(request(&[("x-a", "1"), (n, v)]), true)
            .err()
            .unwrap_or_else(|| panic!("h2 sent `{n}: {v}`"));
        assert!(err.to_string().contains("malformed headers"), "{n}: {err}");
    }
    // What may be sent is sent.
    let (rsp, _) = client
        .send_request(request(&[("te", "trailers"), ("x-a", "1")]), true)
        .expect("te: trailers is allowed");
    assert_eq!(rsp.await.expect("response").status(), 200);
}

//! When an HTTP/2 connection is woken for a stream whose last reference goes, through the
//! patched h2 in `vendor/` (`h2-stream-drop-wake.patch`, vendor/README.md). h2 woke the
//! connection whenever a closed stream's last reference dropped; the patch skips that wake
//! when other handles remain and no stream is open, since the connection has nothing to do
//! then. These tests pin what the wake is still for: a client whose `SendRequest` is gone
//! closes once its last stream's reference goes (and not before); a server shutting down
//! closes after its last stream; and a connection keeps serving, one request at a time and
//! with a stream held open while others come and go. Real sockets on loopback, h2's own
//! client and server.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::net::{TcpListener, TcpStream};

/// Long enough for a loaded machine; a connection that should close and does not hangs here.
const PATIENCE: Duration = Duration::from_secs(10);

/// An h2 server: answers `/slow` after `/release` has been asked for, everything else at
/// once, each with the body `ok`.
async fn server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let release = std::sync::Arc::new(tokio::sync::Notify::new());
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let release = release.clone();
                    tokio::spawn(async move {
                        match req.uri().path() {
                            "/slow" => release.notified().await,
                            "/release" => release.notify_one(),
                            _ => {}
                        }
                        let Ok(mut body) = respond.send_response(Response::new(()), false) else {
                            return;
                        };
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    });
                }
            });
        }
    });
    addr
}

/// Reads a response body to its end.
async fn read_all(mut body: h2::RecvStream) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    all
}

fn get(addr: std::net::SocketAddr, path: &str) -> Request<()> {
    Request::get(format!("http://{addr}{path}"))
        .body(())
        .expect("request")
}

#[tokio::test]
async fn a_client_closes_once_its_last_stream_goes_after_its_sender() {
    let addr = server().await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let mut conn = tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let (rsp, _) = send.send_request(get(addr, "/"), true).expect("send");
    let mut body = rsp.await.expect("response").into_body();
    // Read to the end without letting go of the body: the stream is closed, still referenced.
    assert_eq!(body.data().await.expect("data").expect("chunk"), "ok");
    assert!(body.data().await.is_none());
    assert!(body.is_end_stream());
    drop(send);
    // Only the stream's reference is left: the connection must not close under it...
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut conn)
            .await
            .is_err(),
        "the connection closed while a stream was still referenced"
    );
    // ...and must close once it goes (the wake this test exists for).
    drop(body);
    let closed = tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the client connection did not close after its last stream went");
    closed.expect("connection task").expect("clean close");
}

#[tokio::test]
async fn a_server_shutting_down_closes_after_its_last_stream() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(tcp).await.expect("h2 handshake");
        let (_req, mut respond) = conn.accept().await.expect("a request").expect("request");
        let mut stream = respond
            .send_response(Response::new(()), false)
            .expect("respond");
        stream
            .send_data(Bytes::from_static(b"ok"), true)
            .expect("send the end");
        // The stream is closed (its end queued), then let go; the server shuts down. A server
        // counts streams, not references: it may close as soon as the end is written.
        drop((stream, respond));
        conn.graceful_shutdown();
        let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
        tokio::time::timeout(PATIENCE, closed)
            .await
            .expect("the server connection did not close after its last stream went")
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let (rsp, _) = send.send_request(get(addr, "/"), true).expect("send");
    let body = rsp.await.expect("response").into_body();
    assert_eq!(read_all(body).await, b"ok");
    served
        .await
        .expect("server task")
        .expect("server closed cleanly");
    drop(send);
    let _ = tokio::time::timeout(PATIENCE, conn).await;
}

#[tokio::test]
async fn a_connection_keeps_serving_as_streams_come_and_go() {
    let addr = server().await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    // One at a time: each request's stream is closed and let go before the next (the
    // connection is idle, with its buffers given back, between them).
    for _ in 0..50 {
        let (rsp, _) = send.send_request(get(addr, "/"), true).expect("send");
        let body = tokio::time::timeout(PATIENCE, rsp)
            .await
            .expect("an answer")
            .expect("response")
            .into_body();
        assert_eq!(read_all(body).await, b"ok");
        send = send.ready().await.expect("ready");
    }
    // A stream held open while others come and go; then it is answered too.
    let (slow, _) = send.send_request(get(addr, "/slow"), true).expect("send");
    for _ in 0..10 {
        send = send.ready().await.expect("ready");
        let (rsp, _) = send.send_request(get(addr, "/"), true).expect("send");
        let body = rsp.await.expect("response").into_body();
        assert_eq!(read_all(body).await, b"ok");
    }
    send = send.ready().await.expect("ready");
    let (rsp, _) = send
        .send_request(get(addr, "/release"), true)
        .expect("send");
    let body = rsp.await.expect("response").into_body();
    assert_eq!(read_all(body).await, b"ok");
    let body = tokio::time::timeout(PATIENCE, slow)
        .await
        .expect("the held stream was answered")
        .expect("response")
        .into_body();
    assert_eq!(read_all(body).await, b"ok");
}

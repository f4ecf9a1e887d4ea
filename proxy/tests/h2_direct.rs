//! hyper's HTTP/2 client sending from the caller's task (`http2::Builder::handshake_direct`,
//! our patch in vendor/hyper-direct-send.patch), which `endpoint` uses for every HTTP/2
//! upstream connection. What the dispatch task used to guarantee, the caller's future must
//! now: a streamed request body, a response, a stream reset when the caller gives up (with and
//! without a body still being sent), and a request handed back unsent when the connection can
//! no longer take it. Real sockets on loopback; the server is h2's own, so the test sees the
//! frames (resets) a hyper server would hide.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the server saw of each stream.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A stream's head arrived (sent before anything else about that stream).
    Accepted,
    /// The request body's length, answered with it in a `len` header.
    Body(usize),
    /// The client reset the stream with this reason before it ended.
    Reset(h2::Reason),
}

/// An h2 server: answers each request after reading its whole body, or reports the reset.
/// `hold` delays each answer, so that the client can give up first.
async fn server(hold: Duration) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let _ = tx.send(Seen::Accepted);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut len = 0;
                        loop {
                            tokio::select! {
                                chunk = body.data() => match chunk {
                                    Some(Ok(b)) => {
                                        len += b.len();
                                        let _ = body.flow_control().release_capacity(b.len());
                                    }
                                    Some(Err(e)) => {
                                        let reason = e.reason().unwrap_or(h2::Reason::NO_ERROR);
                                        let _ = tx.send(Seen::Reset(reason));
                                        return;
                                    }
                                    None => break,
                                },
                                reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                                    let _ = tx.send(Seen::Reset(reason.unwrap_or(h2::Reason::NO_ERROR)));
                                    return;
                                }
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(hold) => {}
                            reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                                let _ = tx.send(Seen::Reset(reason.unwrap_or(h2::Reason::NO_ERROR)));
                                return;
                            }
                        }
                        let rsp = Response::builder()
                            .header("len", len.to_string())
                            .body(())
                            .expect("response");
                        let _ = respond.send_response(rsp, true);
                        let _ = tx.send(Seen::Body(len));
                    });
                }
            });
        }
    });
    (addr, rx)
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn client(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake_direct(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

fn request(addr: std::net::SocketAddr, body: Body) -> Request<Body> {
    Request::post(format!("http://{addr}/"))
        .body(body)
        .expect("request")
}

/// A body that sends `chunks` of 16 KiB when told to, and never ends unless `end` is sent.
fn streamed() -> (mpsc::Sender<Option<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<Option<Bytes>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Some(b)) => Some((Ok(Frame::data(b)), rx)),
            _ => None,
        }
    });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

#[tokio::test]
async fn requests_with_and_without_bodies_are_answered_from_the_callers_task() {
    let (addr, mut seen) = server(Duration::ZERO).await;
    let mut sender = client(addr).await;

    // Without a body (the head ends the stream), and with one sent at once.
    for len in [0usize, 1000] {
        let body = Full::new(Bytes::from(vec![b'x'; len])).boxed();
        let rsp = sender
            .try_send_request(request(addr, body))
            .await
            .expect("response");
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["len"], len.to_string().as_str());
        assert_eq!(seen.recv().await, Some(Seen::Accepted));
        assert_eq!(seen.recv().await, Some(Seen::Body(len)));
    }

    // A body larger than the stream's first window (64 KiB) and sent in pieces: its sending
    // goes on in a task of its own after the head.
    let (chunks, body) = streamed();
    let rsp = tokio::spawn(sender.send_request(request(addr, body)));
    for _ in 0..8 {
        chunks
            .send(Some(Bytes::from(vec![b'y'; 16 * 1024])))
            .await
            .expect("body chunk");
    }
    drop(chunks);
    let rsp = rsp.await.expect("task").expect("response");
    assert_eq!(rsp.headers()["len"], (8 * 16 * 1024).to_string().as_str());
    assert_eq!(seen.recv().await, Some(Seen::Accepted));
    assert_eq!(seen.recv().await, Some(Seen::Body(8 * 16 * 1024)));

    // Many at once on the one connection.
    let mut all = Vec::new();
    for i in 0..50usize {
        let body = Full::new(Bytes::from(vec![b'z'; i])).boxed();
        all.push(sender.try_send_request(request(addr, body)));
    }
    for (i, f) in all.into_iter().enumerate() {
        let rsp = f.await.expect("response");
        assert_eq!(rsp.headers()["len"], i.to_string().as_str());
    }
}

#[tokio::test]
async fn a_caller_that_gives_up_resets_the_stream_even_while_its_body_is_being_sent() {
    let (addr, mut seen) = server(Duration::from_secs(30)).await;
    let mut sender = client(addr).await;

    // Waiting for the answer (the server holds it): dropping the future resets the stream.
    let body = Full::new(Bytes::from_static(b"abc")).boxed();
    let waiting = sender.try_send_request(request(addr, body));
    give_up_once_accepted(waiting, &mut seen).await;
    assert_eq!(next(&mut seen).await, Seen::Reset(h2::Reason::CANCEL));

    // Still sending its body (the body's task holds the stream too): the same.
    let (chunks, body) = streamed();
    chunks
        .send(Some(Bytes::from_static(b"part")))
        .await
        .expect("body chunk");
    let waiting = sender.try_send_request(request(addr, body));
    give_up_once_accepted(waiting, &mut seen).await;
    assert_eq!(next(&mut seen).await, Seen::Reset(h2::Reason::CANCEL));
    drop(chunks);

    // The connection serves on: a third request reaches the server (and is reset in turn).
    let body = Full::new(Bytes::from_static(b"again")).boxed();
    let waiting = sender.try_send_request(request(addr, body));
    give_up_once_accepted(waiting, &mut seen).await;
    assert_eq!(next(&mut seen).await, Seen::Reset(h2::Reason::CANCEL));
}

/// Polls a request's future until the server has its head, then drops it.
async fn give_up_once_accepted<F: std::future::Future>(
    waiting: F,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
) {
    tokio::pin!(waiting);
    tokio::select! {
        _ = &mut waiting => panic!("answered: the server holds its answers"),
        s = seen.recv() => assert_eq!(s, Some(Seen::Accepted)),
    }
}

async fn next(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the server reports the stream")
        .expect("server running")
}

#[tokio::test]
async fn a_request_the_connection_can_no_longer_take_comes_back_unsent() {
    // A server that completes the handshake, then goes away (GOAWAY) and closes.
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
        conn.graceful_shutdown();
        while let Some(Ok(_)) = conn.accept().await {}
    });
    let mut sender = client(addr).await;
    // Wait until the client has seen the connection end.
    for _ in 0..200 {
        if sender.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sender.is_closed(), "the connection ended");
    let body = Full::new(Bytes::from_static(b"kept")).boxed();
    let mut err = sender
        .try_send_request(request(addr, body))
        .await
        .expect_err("the connection is gone");
    let req = err.take_message().expect("handed back unsent");
    let body = req.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"kept", "with its body");
}

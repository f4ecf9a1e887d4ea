//! hyper's HTTP/2 client sending from the caller's task (`http2::Builder::handshake_direct`,
//! our patch in vendor/hyper-direct-send.patch), which `endpoint` uses for every HTTP/2
//! upstream connection. What the dispatch task guarantees, the direct sender must keep: a
//! streamed request body, a response, a stream reset when the caller gives up (with and without
//! a body still being sent), a request handed back unsent when the connection can no longer take
//! it; and the three a first version lost (found in review, reverted): at the peer's stream
//! limit requests wait unsent, so callers that give up put nothing on the wire; a GOAWAY with
//! streams still open is noticed (requests come back, the sender reports closed); an idle
//! connection is not pinged. Real sockets on loopback; the server is h2's own, so the test sees
//! the frames (resets, streams, pings) a hyper server would hide.

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

    // Many at once on the one connection: polled together, so all are sent before the
    // connection's task next runs (a direct send happens when its future is first polled).
    let all = (0..50usize).map(|i| {
        let body = Full::new(Bytes::from(vec![b'z'; i])).boxed();
        sender.try_send_request(request(addr, body))
    });
    for (i, rsp) in futures_util::future::join_all(all)
        .await
        .into_iter()
        .enumerate()
    {
        let rsp = rsp.expect("response");
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

/// An h2 server allowing `limit` concurrent streams that reports the path of every stream it
/// accepts; `/hold…` is answered only when the client resets it, anything else at once.
async fn limited_server(limit: u32) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(limit)
                    .handshake::<_, Bytes>(tcp)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let _ = tx.send(req.uri().path().to_string());
                    tokio::spawn(async move {
                        if req.uri().path().starts_with("/hold") {
                            let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
                        } else {
                            let _ = respond.send_response(Response::new(()), true);
                        }
                    });
                }
            });
        }
    });
    (addr, rx)
}

fn get(addr: std::net::SocketAddr, path: &str) -> Request<Body> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()).boxed())
        .expect("request")
}

#[tokio::test]
async fn at_the_peers_stream_limit_requests_wait_unsent_and_callers_that_give_up_send_nothing() {
    let (addr, mut seen) = limited_server(1).await;
    let mut sender = client(addr).await;
    // The one stream the server allows, held open.
    let mut held = Box::pin(sender.try_send_request(get(addr, "/hold")));
    tokio::select! {
        _ = &mut held => panic!("answered: the server holds /hold"),
        path = seen.recv() => assert_eq!(path.as_deref(), Some("/hold")),
    }
    // Twenty callers that wait at the limit, then give up.
    for i in 0..20 {
        let waiting = sender.try_send_request(get(addr, &format!("/abandoned-{i}")));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiting)
                .await
                .is_err(),
            "answered past the server's stream limit"
        );
    }
    // The held stream goes (reset); a new request gets through.
    drop(held);
    let rsp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.try_send_request(get(addr, "/after")),
    )
    .await
    .expect("answered once a stream is free")
    .expect("response");
    assert_eq!(rsp.status(), 200);
    // What reached the server after /hold: the requests whose callers waited and gave up
    // stayed unsent, but for the one or two that hyper's dispatch task had already handed to
    // h2 to open (it keeps one while its stream waits to open, as with `handshake`); the
    // direct sender queues none of its own. Bounded, not one per caller (the first version
    // sent all of them, each followed by a reset).
    let mut reached = Vec::new();
    while let Ok(path) = seen.try_recv() {
        reached.push(path);
    }
    assert_eq!(
        reached.last().map(String::as_str),
        Some("/after"),
        "{reached:?}"
    );
    assert!(
        reached.len() <= 3,
        "abandoned requests reached the server: {reached:?}"
    );
}

#[tokio::test]
async fn a_burst_past_the_stream_limit_sends_only_what_fits() {
    let (addr, mut seen) = limited_server(4).await;
    let mut sender = client(addr).await;
    // Two of the four streams held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut h = Box::pin(sender.try_send_request(get(addr, "/hold")));
        tokio::select! {
            _ = &mut h => panic!("answered: the server holds /hold"),
            path = seen.recv() => assert_eq!(path.as_deref(), Some("/hold")),
        }
        held.push(h);
    }
    // Twelve at once, in one poll (before the connection's task runs): two fit; the rest wait
    // unsent, then their callers give up.
    let burst = (0..12).map(|i| sender.try_send_request(get(addr, &format!("/hold-burst-{i}"))));
    assert!(
        tokio::time::timeout(
            Duration::from_millis(50),
            futures_util::future::join_all(burst)
        )
        .await
        .is_err(),
        "answered: the server holds /hold…"
    );
    drop(held);
    let rsp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.try_send_request(get(addr, "/after")),
    )
    .await
    .expect("answered once streams are free")
    .expect("response");
    assert_eq!(rsp.status(), 200);
    let mut reached = Vec::new();
    while let Ok(path) = seen.try_recv() {
        reached.push(path);
    }
    assert_eq!(
        reached.last().map(String::as_str),
        Some("/after"),
        "{reached:?}"
    );
    // The two that fit, and at most one the dispatch task held waiting to open; not one per
    // caller (counting only the open streams, all twelve went).
    let burst = reached
        .iter()
        .filter(|p| p.starts_with("/hold-burst-"))
        .count();
    assert!(
        burst <= 3,
        "{burst} of the burst reached the server: {reached:?}"
    );
}

#[tokio::test]
async fn a_goaway_with_streams_still_open_sends_new_requests_back_and_closes_the_sender() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        let Some(Ok((_req, mut respond))) = conn.accept().await else {
            return;
        };
        // Going away, with this stream open: its answer starts after the GOAWAY on the wire.
        conn.graceful_shutdown();
        tokio::spawn(async move {
            let Ok(mut body) = respond.send_response(Response::new(()), false) else {
                return;
            };
            let _ = finish_rx.await;
            let _ = body.send_data(Bytes::from_static(b"done"), true);
        });
        while let Some(Ok(_)) = conn.accept().await {}
    });
    let mut sender = client(addr).await;
    let rsp = sender
        .try_send_request(get(addr, "/open"))
        .await
        .expect("the open stream's head");
    // The GOAWAY came before that head: a new request comes back unsent, whole (h2 checks the
    // connection and would open the stream in one step, and gives back what it took)...
    #[derive(Clone, Debug, PartialEq)]
    struct Marker(u32);
    let body = Full::new(Bytes::from_static(b"kept")).boxed();
    let mut req = request(addr, body);
    req.extensions_mut().insert(Marker(7));
    req.headers_mut()
        .insert("x-kept", http::HeaderValue::from_static("yes"));
    let mut err = sender
        .try_send_request(req)
        .await
        .expect_err("the connection is going away");
    let req = err.take_message().expect("handed back unsent");
    assert_eq!(
        req.extensions().get::<Marker>(),
        Some(&Marker(7)),
        "with its extensions"
    );
    assert_eq!(req.headers()["x-kept"], "yes", "with its fields");
    assert_eq!(req.uri().path(), "/", "with its target");
    let body = req.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"kept", "with its body");
    // ...and the sender says so, though the connection still carries the open stream.
    assert!(
        sender.is_closed(),
        "the sender still offers a connection going away"
    );
    assert!(!sender.is_ready());
    let _ = finish_tx.send(());
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"done", "the open stream finishes");
}

/// Counts the PING frames (not acks) a client sends, relaying its bytes to `upstream`.
async fn ping_counting_relay(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let pings = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = pings.clone();
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        // Client to server: the preface, then frames, whose headers are read here.
        let mut preface = [0u8; 24];
        if cr.read_exact(&mut preface).await.is_err() || sw.write_all(&preface).await.is_err() {
            return;
        }
        let mut head = [0u8; 9];
        while cr.read_exact(&mut head).await.is_ok() {
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if cr.read_exact(&mut payload).await.is_err() {
                return;
            }
            if head[3] == 0x6 && head[4] & 0x1 == 0 {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            if sw.write_all(&head).await.is_err() || sw.write_all(&payload).await.is_err() {
                return;
            }
        }
    });
    (addr, pings)
}

#[tokio::test]
async fn an_idle_connection_gets_no_keep_alive_pings_and_a_busy_one_does() {
    use std::sync::atomic::Ordering;
    let (upstream, _seen) = limited_server(100).await;
    let (addr, pings) = ping_counting_relay(upstream).await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false)
        .handshake_direct::<_, Body>(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let rsp = sender
        .try_send_request(get(addr, "/"))
        .await
        .expect("response");
    assert_eq!(rsp.status(), 200);
    drop(rsp);
    // Idle: ten keep-alive intervals, no ping (a sender that counted as a request in flight
    // would make the connection look busy for ever).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pings.load(Ordering::SeqCst),
        0,
        "an idle connection was pinged"
    );
    // A request held open: the connection is busy and is pinged.
    let held = tokio::spawn(sender.try_send_request(get(addr, "/hold")));
    let mut pinged = false;
    for _ in 0..200 {
        if pings.load(Ordering::SeqCst) > 0 {
            pinged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        pinged,
        "a busy connection was never pinged: is keep-alive on?"
    );
    held.abort();
}

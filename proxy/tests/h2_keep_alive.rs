//! hyper's HTTP/2 keep-alive, whose timer our patch polls only after the timer's own wake-up
//! (vendor/hyper-keepalive-gate.patch; `endpoint` enables keep-alive on every HTTP/2 upstream
//! connection). With the real tokio timer and real sockets: a peer that answers pings is pinged
//! again and again (each pong sets the timer anew, so every new deadline must be seen), and a
//! peer that goes silent loses the connection once the ping's timeout runs out. The peer is a
//! few lines of raw HTTP/2 framing, so the test counts the PING frames themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(300);

/// An HTTP/2 peer that acknowledges SETTINGS and counts PINGs, answering them if `answer`.
async fn peer(answer: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let pings = Arc::new(AtomicUsize::new(0));
    let counted = pings.clone();
    tokio::spawn(async move {
        let Ok((mut io, _)) = listener.accept().await else {
            return;
        };
        let mut preface = [0u8; 24];
        if io.read_exact(&mut preface).await.is_err() {
            return;
        }
        // Our SETTINGS (none changed).
        if io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.is_err() {
            return;
        }
        loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return;
            }
            let (kind, ack) = (head[3], head[4] & 1 != 0);
            let reply: Vec<u8> = match kind {
                4 if !ack => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                6 if !ack => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if !answer {
                        continue;
                    }
                    [&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat()
                }
                _ => continue,
            };
            if io.write_all(&reply).await.is_err() {
                return;
            }
        }
    });
    (addr, pings)
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>;
type Conn =
    hyper::client::conn::http2::Connection<TokioIo<TcpStream>, Empty<bytes::Bytes>, TokioExecutor>;

/// A hyper HTTP/2 client connection to `addr` that pings every `INTERVAL`, idle or not. The
/// sender must be kept: without one the connection closes.
async fn client(addr: std::net::SocketAddr) -> (Sender, Conn) {
    let tcp = TcpStream::connect(addr).await.expect("connect to the peer");
    hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(INTERVAL)
        .keep_alive_timeout(TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake")
}

// Two worker threads: the timer can fire on another thread than the one polling the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_is_pinged_again_and_again() {
    let (addr, pings) = peer(true).await;
    let (_sender, conn) = client(addr).await;
    // Twelve intervals: the connection must stay up, pinging after each pong.
    let res = tokio::time::timeout(INTERVAL * 12, conn).await;
    assert!(
        res.is_err(),
        "the connection ended although every ping was answered: {res:?}"
    );
    let n = pings.load(Ordering::SeqCst);
    // About 12 at 50 ms; at least 3 even on a loaded machine, where each pong takes longer.
    assert!(n >= 3, "{n} pings in 12 intervals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_loses_the_connection_after_the_timeout() {
    let (addr, pings) = peer(false).await;
    let (_sender, conn) = client(addr).await;
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection outlived its unanswered ping by 10 s");
    let took = started.elapsed();
    let err = res.expect_err("the connection ended without an error");
    let cause = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(
        cause.as_deref(),
        Some("keep-alive timed out"),
        "not a keep-alive timeout: {err}"
    );
    assert_eq!(pings.load(Ordering::SeqCst), 1, "pings sent");
    assert!(
        took >= INTERVAL + TIMEOUT - Duration::from_millis(20),
        "timed out after {took:?}, before interval + timeout"
    );
}

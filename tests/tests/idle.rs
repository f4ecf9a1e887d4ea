//! The destination policy's idle timeout (`idle_timeout` in the file source,
//! `remora.io/idle-timeout` on a Service), end to end: a control plane serving it, a client
//! proxy enforcing it on real streams. A gRPC stream that goes quiet ends with
//! DEADLINE_EXCEEDED (Python grpcio client) and the app sees its stream cancelled; streams that
//! keep sending in either direction are never cut; a plain body that stalls is reset (curl
//! reports an error, over HTTP/1.1 and HTTP/2); a route with a longer idle timeout is spared.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::*;
use remora_tests::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const TOKEN: &str = "client-token-0123456789";
const DAY: Duration = Duration::from_secs(24 * 3600);
const AUTHORITY: &str = "watch.test:80";
/// The idle timeout under test, and a longer one for `/slow/`.
const POLICY: &str = "idle_timeout = \"500ms; /slow/=3s\"";

type Chunks =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// An HTTP/1.1 + HTTP/2 app whose response bodies are written by a task per request:
/// - `/pkg.Watch/Silent` (gRPC): one message, then silence (30 s);
/// - `/pkg.Watch/Ticks` (gRPC): 20 messages 100 ms apart, then `grpc-status: 0`;
/// - `/pkg.Upload/Collect` (gRPC, client streaming): its head at once, then, once the whole
///   upload is in, one message `got N` and `grpc-status: 0`;
/// - anything else (plain text): `first`, a stall of 1 s, then `rest`.
///
/// It records the paths whose response body was dropped unfinished (the stream cancelled).
struct IdleApp {
    addr: SocketAddr,
    cancelled: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdleApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn grpc_message(text: &str) -> Bytes {
    let mut b = Vec::with_capacity(5 + text.len());
    b.push(0);
    b.extend_from_slice(&(text.len() as u32).to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b.into()
}

fn grpc_ok() -> Frame<Bytes> {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("0"));
    Frame::trailers(t)
}

/// gRPC messages in a whole (length-prefixed) request body.
fn count_messages(mut b: &[u8]) -> usize {
    let mut n = 0;
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        b = &b[(5 + len).min(b.len())..];
        n += 1;
    }
    n
}

impl IdleApp {
    async fn start() -> IdleApp {
        let listener = TcpListener::bind(loopback0()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancelled = Arc::new(Mutex::new(Vec::new()));
        let record = cancelled.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
                        let path = req.uri().path().to_string();
                        let grpc = path.starts_with("/pkg.");
                        let record = record.clone();
                        tokio::spawn(async move {
                            if !Self::write(&path, req.into_body(), &tx).await {
                                record.lock().unwrap().push(path);
                            }
                        });
                        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                            let f = rx.recv().await?;
                            Some((Ok::<_, Infallible>(f), rx))
                        });
                        let body: Chunks = StreamBody::new(Box::pin(frames) as _);
                        let content_type = match grpc {
                            true => "application/grpc",
                            false => "text/plain",
                        };
                        let rsp = hyper::Response::builder()
                            .header("content-type", content_type)
                            .body(body)
                            .unwrap();
                        std::future::ready(Ok::<_, Infallible>(rsp))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        IdleApp {
            addr,
            cancelled,
            task,
        }
    }

    /// Writes the body `path` asks for; false when the client went away first (cancelled).
    async fn write(path: &str, upload: Incoming, tx: &mpsc::Sender<Frame<Bytes>>) -> bool {
        let send = async |f: Frame<Bytes>| tx.send(f).await.is_ok();
        // A stall the proxy may cut: true when it lasted, false when the body was dropped.
        let stall = async |d: Duration| {
            tokio::select! {
                _ = tokio::time::sleep(d) => true,
                _ = tx.closed() => false,
            }
        };
        match path {
            "/pkg.Watch/Silent" => {
                send(Frame::data(grpc_message("hello"))).await
                    && stall(Duration::from_secs(30)).await
                    && send(grpc_ok()).await
            }
            "/pkg.Watch/Ticks" => {
                for i in 0..20 {
                    if !(stall(Duration::from_millis(100)).await
                        && send(Frame::data(grpc_message(&format!("tick {i}")))).await)
                    {
                        return false;
                    }
                }
                send(grpc_ok()).await
            }
            "/pkg.Upload/Collect" => {
                let Ok(all) = upload.collect().await else {
                    return false;
                };
                let n = count_messages(&all.to_bytes());
                send(Frame::data(grpc_message(&format!("got {n}")))).await && send(grpc_ok()).await
            }
            _ => {
                send(Frame::data(Bytes::from_static(b"first\n"))).await
                    && stall(Duration::from_secs(1)).await
                    && send(Frame::data(Bytes::from_static(b"rest\n"))).await
            }
        }
    }

    fn cancelled(&self) -> Vec<String> {
        self.cancelled.lock().unwrap().clone()
    }
}

/// A control plane serving the app as `watch.test:80` under [`POLICY`], and a client proxy fed
/// by it.
async fn mesh(pki: &Pki, app: &IdleApp) -> (TestControl, TestProxy) {
    let toml = format!(
        "[[service]]\nname = \"{AUTHORITY}\"\n{POLICY}\nendpoints = [ {{ addr = \"{}\" }} ]\n",
        app.addr
    );
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), pki, &toml, &[(TOKEN, &client_id)], DAY).await;
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    (cp, proxy)
}

/// One call with the grpcio client (`grpc_idle.py`) through the outbound proxy.
async fn grpc(proxy: SocketAddr, args: &[&str]) -> serde_json::Value {
    let script = py("grpc_idle.py");
    let target = proxy.to_string();
    let mut all = vec![
        script.to_str().expect("utf-8 path"),
        &target,
        "--authority",
        AUTHORITY,
    ];
    all.extend_from_slice(args);
    let out = run("python3", &all).await;
    assert_eq!(out.status, 0, "grpc_idle.py failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("grpc_idle.py output {:?}: {e}", out.stdout))
}

fn idle_ended(metrics: &str) -> f64 {
    metric(
        metrics,
        "remora_errors_total",
        &[("direction", "outbound"), ("kind", "idle_timeout")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_grpc_stream_ends_with_deadline_exceeded_and_busy_ones_run_to_the_end() {
    let pki = Pki::new("cluster.local");
    let app = IdleApp::start().await;
    let (_cp, proxy) = mesh(&pki, &app).await;

    // One message, then silence: DEADLINE_EXCEEDED about 500 ms later, naming the policy, and
    // the app's stream is cancelled (not left to run for its 30 s).
    let r = grpc(proxy.outbound, &["server", "/pkg.Watch/Silent"]).await;
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");
    assert_eq!(
        r["details"], "idle timeout (remora.io/idle-timeout 500ms)",
        "{r}"
    );
    assert_eq!(r["messages"].as_array().map(Vec::len), Some(1), "{r}");
    let took = r["seconds"].as_f64().unwrap_or(f64::MAX);
    assert!((0.45..5.0).contains(&took), "ended after {took} s: {r}");
    wait_until("the app's stream to be cancelled", async || {
        app.cancelled().contains(&"/pkg.Watch/Silent".to_string())
    })
    .await;

    // A message every 100 ms under an idle timeout of 500 ms: the whole 2 s stream, OK.
    let r = grpc(proxy.outbound, &["server", "/pkg.Watch/Ticks"]).await;
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(r["messages"].as_array().map(Vec::len), Some(20), "{r}");
    assert!(r["seconds"].as_f64().unwrap_or(0.0) >= 1.9, "{r}");

    // Client streaming: the app answers only once the upload is in, and the upload (a message
    // every 100 ms for about 2 s) is what keeps the exchange alive.
    let r = grpc(
        proxy.outbound,
        &["client", "/pkg.Upload/Collect", "20", "100"],
    )
    .await;
    assert_eq!(r["code"], "OK", "{r}");
    assert_eq!(r["messages"][0], "got 20", "{r}");
    assert!(r["seconds"].as_f64().unwrap_or(0.0) >= 1.9, "{r}");

    assert_eq!(app.cancelled(), ["/pkg.Watch/Silent"]);
    assert_eq!(idle_ended(&proxy.metrics().await), 1.0);
}

/// `GET path` for [`AUTHORITY`] through the outbound proxy with curl; its exit status, body and
/// error output.
async fn curl_get(proxy: SocketAddr, path: &str, extra: &[&str]) -> Output {
    let url = format!("http://{proxy}{path}");
    let host = format!("host: {AUTHORITY}");
    let mut args = vec!["-sS", "--max-time", "10", "-H", &host];
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_plain_body_is_reset_unless_its_route_allows_a_longer_silence() {
    let pki = Pki::new("cluster.local");
    let app = IdleApp::start().await;
    let (_cp, proxy) = mesh(&pki, &app).await;

    for (proto, extra) in [
        ("HTTP/1.1", &[][..]),
        ("HTTP/2", &["--http2-prior-knowledge"][..]),
    ] {
        // A 1 s stall under the default 500 ms: an error for curl, never a short success.
        let started = Instant::now();
        let out = curl_get(proxy.outbound, "/download", extra).await;
        assert_ne!(out.status, 0, "{proto}: curl succeeded: {:?}", out.stdout);
        assert_eq!(out.stdout, "first\n", "{proto}: {}", out.stderr);
        assert!(started.elapsed() < Duration::from_secs(5), "{proto}");

        // The same stall on /slow/, whose idle timeout is 3 s: the whole body.
        let out = curl_get(proxy.outbound, "/slow/download", extra).await;
        assert_eq!(out.status, 0, "{proto}: {}", out.stderr);
        assert_eq!(out.stdout, "first\nrest\n", "{proto}");
    }
    wait_until("both stalled downloads to be cancelled", async || {
        app.cancelled().len() == 2
    })
    .await;
    assert_eq!(app.cancelled(), ["/download", "/download"]);
    assert_eq!(idle_ended(&proxy.metrics().await), 2.0);
}

//! The control plane's bounds on anonymous clients, over real sockets: connections per client
//! IP and in total (closed before TLS, counted, logged without flooding), and HTTP/2 streams
//! per connection (advertised in SETTINGS, the excess refused with REFUSED_STREAM).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remora_api::client::ControlClient;
use remora_certs::SpiffeId;
use remora_control_plane::server::{ControlPlane, Limits, Options, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(10);
const SERVICE: &str = "web.shop:80";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-cp-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    remora_certs::ca::init_dir(&dir.join("ca"), "cluster.local").unwrap();
    std::fs::write(
        dir.join("endpoints.toml"),
        format!("[[service]]\nname = \"{SERVICE}\"\nendpoints = [{{ addr = \"10.0.0.1:80\" }}]\n"),
    )
    .unwrap();
    dir
}

struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    identity: SpiffeId,
    ca: PathBuf,
    registry: Arc<remora_control_plane::registry::Registry>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(name: &str, limits: Limits) -> Running {
    let dir = scratch(name);
    let mut o = Options::new(dir.join("ca"), Source::File(dir.join("endpoints.toml")));
    o.addr = ([127, 0, 0, 1], 0).into();
    o.admin_addr = ([127, 0, 0, 1], 0).into();
    o.limits = limits;
    let cp = ControlPlane::bind(o).await.expect("control plane binds");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = Running {
        addr: cp.addr(),
        admin: cp.admin_addr(),
        identity: cp.identity(),
        ca: dir.join("ca/ca.crt"),
        registry: cp.registry(),
        _stop: tx,
    };
    tokio::spawn(cp.run(async move {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + WAIT;
    while !get(running.admin, "/ready")
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(Instant::now() < deadline, "control plane not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running
}

/// A plain HTTP/1.1 GET to the admin listener: the whole response, or "" when it fails.
async fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    if tcp.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the metric line starting with `name` (labels included), or 0 when absent.
async fn metric(cp: &Running, name: &str) -> f64 {
    let text = get(cp.admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A TLS connection to the gRPC port, as a proxy makes it (no client certificate, ALPN h2,
/// the control plane's SPIFFE ID checked).
async fn tls(cp: &Running) -> std::io::Result<TlsStream<TcpStream>> {
    let anchors = remora_certs::tls::read_anchors(&cp.ca).map_err(std::io::Error::other)?;
    let cfg = remora_certs::tls::control_client_config(anchors, cp.identity.clone())
        .map_err(std::io::Error::other)?;
    let name = remora_certs::tls::server_name(&cp.identity).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(cp.addr).await?;
    match tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other("TLS handshake hung")),
    }
}

fn client(cp: &Running) -> ControlClient {
    ControlClient::new(
        vec![cp.addr.to_string()],
        Some(cp.identity.clone()),
        cp.ca.clone(),
        Arc::new(|| Some("cluster.local".to_string())),
    )
    .expect("control client")
}

async fn watch(c: &ControlClient, service: &str) -> tonic::Streaming<remora_api::Update> {
    let req = remora_api::WatchRequest {
        service: service.into(),
        client: String::new(),
        namespace: String::new(),
    };
    let mut s = tokio::time::timeout(WAIT, c.discovery().watch(req))
        .await
        .expect("watch answered in time")
        .expect("watch accepted")
        .into_inner();
    let first = tokio::time::timeout(WAIT, s.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(_)))),
        "first message of {service}: {first:?}"
    );
    s
}

/// Log lines captured on this thread (the test's current-thread runtime runs the control
/// plane's tasks here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    (logs, tracing::subscriber::set_default(sub))
}

#[tokio::test]
async fn connections_beyond_the_per_peer_limit_are_closed_before_tls() {
    let (logs, _guard) = capture();
    let cp = start(
        "per-peer",
        Limits {
            connections_per_peer: 4,
            ..Limits::default()
        },
    )
    .await;
    // Connection 1: a proxy's channel with a watch open.
    let proxy = client(&cp);
    let mut first = watch(&proxy, SERVICE).await;
    // Connections 2 to 4 fill the per-peer allowance of 127.0.0.1.
    let mut held = Vec::new();
    for i in 2..=4 {
        held.push(
            tls(&cp)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}")),
        );
    }
    let started = Instant::now();
    for i in 5..=7 {
        let r = tls(&cp).await;
        assert!(
            r.is_err(),
            "connection {i} over the per-peer limit got through TLS"
        );
    }
    let elapsed = started.elapsed();
    assert_eq!(
        metric(
            &cp,
            "remora_control_connections_refused_total{reason=\"per_peer\"}"
        )
        .await,
        3.0
    );
    assert_eq!(metric(&cp, "remora_control_connections").await, 4.0);

    // The connection that was already open keeps working: its watch sees a change, and a new
    // watch on it (a new stream, no new connection) is answered.
    cp.registry.set(
        SERVICE,
        Some(vec![remora_certs::EndpointSpec {
            addr: "10.0.0.2:80".parse().unwrap(),
            weight: 1,
            identity: None,
            opaque: false,
            quic: None,
            locality: Default::default(),
        }]),
    );
    let update = tokio::time::timeout(WAIT, first.message()).await;
    assert!(
        matches!(update, Ok(Ok(Some(_)))),
        "the open watch stopped: {update:?}"
    );
    let _second = watch(&proxy, "other.shop:80").await;
    assert_eq!(metric(&cp, "remora_control_connections").await, 4.0);

    // A closed connection gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        match tls(&cp).await {
            Ok(c) => {
                held.push(c);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no place freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let warnings = text.matches("the per-client limit").count() as u64;
    assert!(
        warnings >= 1 && warnings <= 1 + elapsed.as_secs(),
        "{warnings} warnings for 3 refusals in {elapsed:?} (at most one a second):\n{text}"
    );
    assert!(
        text.contains("127.0.0.1"),
        "the warning names the peer:\n{text}"
    );
}

#[tokio::test]
async fn connections_beyond_the_total_limit_are_closed_and_counted() {
    let (logs, _guard) = capture();
    let cp = start(
        "total",
        Limits {
            connections: Some(2),
            ..Limits::default()
        },
    )
    .await;
    let _a = tls(&cp).await.expect("connection 1");
    let _b = tls(&cp).await.expect("connection 2");
    let started = Instant::now();
    for i in 3..=12 {
        assert!(
            tls(&cp).await.is_err(),
            "connection {i} over the total limit"
        );
    }
    let elapsed = started.elapsed();
    assert_eq!(
        metric(
            &cp,
            "remora_control_connections_refused_total{reason=\"total\"}"
        )
        .await,
        10.0
    );
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let warnings = text.matches("--max-connections").count() as u64;
    assert!(
        warnings >= 1 && warnings <= 1 + elapsed.as_secs(),
        "{warnings} warnings for 10 refusals in {elapsed:?} (at most one a second):\n{text}"
    );
}

// Raw HTTP/2 frames, so the test can open more streams than the server allows (a conforming
// client would queue them instead).
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A Watch request's header block (HPACK: static-table entries and literals, no Huffman).
fn watch_headers() -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    let path = "/remora.v1.Discovery/Watch";
    let mut b = vec![0x83, 0x87, 0x04, path.len() as u8]; // POST, https, :path
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 7]); // :authority
    b.extend_from_slice(b"control");
    literal(&mut b, "content-type", "application/grpc");
    literal(&mut b, "te", "trailers");
    b
}

/// One gRPC message: WatchRequest { service } (field 1, a string).
fn watch_body(service: &str) -> Vec<u8> {
    let mut msg = vec![0x0a, service.len() as u8];
    msg.extend_from_slice(service.as_bytes());
    let mut b = vec![0];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(&msg);
    b
}

async fn read_frame(io: &mut TlsStream<TcpStream>) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    tokio::time::timeout(WAIT, io.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("the connection stays open");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.expect("frame payload");
    (head[3], head[4], stream, payload)
}

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_are_refused() {
    let cp = start(
        "streams",
        Limits {
            streams_per_connection: 4,
            ..Limits::default()
        },
    )
    .await;
    let mut io = tls(&cp).await.expect("TLS");
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // The server says its limit in its first SETTINGS.
    let advertised = loop {
        let (kind, flags, _, payload) = read_frame(&mut io).await;
        if kind == SETTINGS && flags & ACK == 0 {
            break payload.chunks_exact(6).find_map(|p| {
                (u16::from_be_bytes([p[0], p[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
                    .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
            });
        }
    };
    assert_eq!(advertised, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");
    io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();

    // Five streams opened and left waiting for their request message: the fifth is one too
    // many.
    let headers = watch_headers();
    for id in [1, 3, 5, 7, 9] {
        io.write_all(&frame(HEADERS, END_HEADERS, id, &headers))
            .await
            .unwrap();
    }
    loop {
        let (kind, _, stream, payload) = read_frame(&mut io).await;
        assert_ne!(kind, GOAWAY, "the server closed the connection");
        if kind == RST_STREAM {
            assert_eq!(
                stream, 9,
                "stream {stream} reset; only the fifth is over the limit"
            );
            assert_eq!(
                payload
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])),
                Some(REFUSED_STREAM)
            );
            break;
        }
    }

    // Ending one stream frees its place: a whole Watch on a new stream is answered.
    io.write_all(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()))
        .await
        .unwrap();
    io.write_all(&frame(HEADERS, END_HEADERS, 11, &headers))
        .await
        .unwrap();
    io.write_all(&frame(DATA, END_STREAM, 11, &watch_body(SERVICE)))
        .await
        .unwrap();
    let (mut answered, mut data) = (false, false);
    while !data {
        let (kind, _, stream, payload) = read_frame(&mut io).await;
        assert_ne!(kind, GOAWAY, "the server closed the connection");
        assert!(
            !(kind == RST_STREAM && stream == 11),
            "stream 11 was refused after a place was freed"
        );
        if stream == 11 {
            answered |= kind == HEADERS;
            // The snapshot: a gRPC message longer than its 5-byte prefix.
            data |= kind == DATA && payload.len() > 5;
        }
    }
    assert!(answered, "response headers before the snapshot");
}

#[test]
fn defaults_cover_the_proxy_watch_table() {
    let l = Limits::default();
    assert!(l.streams_per_connection >= remora_control_plane::server::PROXY_WATCH_MAX);
    assert!(l.connections.is_none(), "sized from the descriptor limit");
    assert_eq!(l.connections_per_peer, 64);
}

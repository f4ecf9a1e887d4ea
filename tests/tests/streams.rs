//! Byte streams: WebSocket upgrades, opaque TCP with half-close, and a server-speaks-first
//! protocol on an opaque port — through inbound, outbound (CONNECT) and outbound→inbound.

use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echo() {
    let ws = python_server("ws.py", &["server"]).await;
    let paths = Paths::start(ws.addr, |_| {}).await;
    for route in paths.routes() {
        let uri = format!("ws://{}/chat", route.authority);
        let out = run(
            "python3",
            &[
                py("ws.py").to_str().unwrap(),
                "client",
                &route.addr.to_string(),
                &uri,
                "20",
            ],
        )
        .await;
        assert_eq!(out.status, 0, "{}: {}", route.name, out.stderr);
        let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        assert_eq!(r["echoed"], 20, "{}: {r}", route.name);
        assert_eq!(r["binary"], true, "{}: {r}", route.name);
    }
}

/// Sends `data`, half-closes, and reads until the server closes.
async fn round_trip(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut got = Vec::new();
    let read = async {
        tokio::time::timeout(WAIT, r.read_to_end(&mut got))
            .await
            .expect("echo in time")
            .expect("read")
    };
    tokio::join!(write, read);
    got
}

async fn open(paths: &Paths, route: &Route) -> TcpStream {
    if route.name == "inbound" {
        TcpStream::connect(route.addr).await.expect("connect")
    } else {
        connect_tunnel(paths.client.outbound, route.authority).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_echo_with_half_close() {
    let (echo, _task) = tcp_echo(None).await;
    let paths = Paths::start(echo, |_| {}).await;
    // Not HTTP from the first byte, so detection decides "opaque" at once.
    let (_, mut data) = random_file(256 * 1024);
    data[0] = 0;
    for route in paths.routes() {
        let s = open(&paths, &route).await;
        let got = round_trip(s, &data).await;
        assert!(
            got == data,
            "{}: {} bytes back of {}",
            route.name,
            got.len(),
            data.len()
        );
    }
    let m = paths.server.metrics().await;
    assert!(
        metric(
            &m,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "opaque")]
        ) >= 2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_on_an_opaque_port() {
    const BANNER: &[u8] = b"220 mail.test ESMTP ready\r\n";
    let (server, _task) = tcp_echo(Some(BANNER)).await;
    // A long detect timeout: if detection were not skipped, the banner would come too late.
    let paths = Paths::start(server, |cfg| {
        cfg.opaque_ports.push(server.port());
        cfg.detect_timeout = std::time::Duration::from_secs(120);
    })
    .await;
    for route in paths.routes() {
        let mut s = open(&paths, &route).await;
        let mut banner = vec![0u8; BANNER.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut banner))
            .await
            .unwrap_or_else(|_| panic!("{}: no banner", route.name))
            .expect("read banner");
        assert_eq!(banner, BANNER, "{}", route.name);
        let got = round_trip(s, b"EHLO client.test\r\nQUIT\r\n").await;
        assert_eq!(got, b"EHLO client.test\r\nQUIT\r\n", "{}", route.name);
    }
    let m = paths.server.metrics().await;
    assert!(
        metric(
            &m,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "opaque_port")]
        ) >= 2.0,
        "{m}"
    );
}

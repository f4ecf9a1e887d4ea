//! Bad input: garbage, truncated and malformed HTTP/2, slow clients, oversized headers, dead
//! and resetting upstreams. The proxy answers honestly or closes cleanly, and keeps serving.

use std::time::Duration;

use remora_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DETECT: Duration = Duration::from_millis(500);

/// Reads until the peer closes; panics if it does not within `bound`.
async fn closed_within(s: &mut TcpStream, bound: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(bound, read)
        .await
        .expect("the proxy closes the connection");
    got
}

async fn still_serves(route: &Route) {
    let out = curl(route, "/alive", &["-D", "-", "-o", "/dev/null"]).await;
    assert_eq!(
        status(&out.stdout),
        200,
        "proxy stopped serving: {} {}",
        out.stdout,
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_malformed_http2() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |c| c.detect_timeout = DETECT).await;
    let [inbound, outbound, _] = paths.routes();

    // Random bytes: inbound forwards them to the app as opaque data (the app closes);
    // outbound has no destination for them and closes at once.
    let (_, mut junk) = random_file(10_000);
    junk[0] = 0xff;
    for route in [inbound, outbound] {
        let mut s = TcpStream::connect(route.addr).await.unwrap();
        s.write_all(&junk).await.unwrap();
        closed_within(&mut s, WAIT).await;
        still_serves(&route).await;
    }
    let m = paths.client.metrics().await;
    assert_eq!(
        metric(
            &m,
            "remora_errors_total",
            &[("direction", "outbound"), ("kind", "no_destination")]
        ),
        1.0,
        "{m}"
    );

    for route in [inbound, outbound] {
        // A truncated preface that then stalls: closed at the detect timeout.
        let mut s = TcpStream::connect(route.addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        closed_within(&mut s, DETECT + WAIT).await;

        // A truncated preface and EOF.
        let mut s = TcpStream::connect(route.addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nS").await.unwrap();
        s.shutdown().await.unwrap();
        closed_within(&mut s, WAIT).await;

        // A full preface followed by a frame that is not HTTP/2: the proxy answers with a
        // GOAWAY (frame type 0x7) and closes.
        let mut s = TcpStream::connect(route.addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 4, 0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4])
            .await
            .unwrap();
        s.write_all(&[
            0, 0, 8, 1, 4, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0,
        ])
        .await
        .unwrap();
        let got = closed_within(&mut s, WAIT).await;
        assert!(
            has_goaway(&got),
            "{}: expected a GOAWAY, got {got:?}",
            route.name
        );
        still_serves(&route).await;
    }
    let m = paths.server.metrics().await;
    assert!(
        metric(
            &m,
            "remora_detect_total",
            &[("direction", "inbound"), ("result", "timeout")]
        ) >= 1.0,
        "{m}"
    );
}

/// Walks HTTP/2 frames (after the server's SETTINGS) looking for a GOAWAY.
fn has_goaway(mut b: &[u8]) -> bool {
    while b.len() >= 9 {
        let len = ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize;
        if b[3] == 0x7 {
            return true;
        }
        b = &b[(9 + len).min(b.len())..];
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_and_others_are_served() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |c| c.detect_timeout = DETECT).await;
    for route in paths.routes().into_iter().take(2) {
        // Stalls inside the request line: closed by the detect timeout.
        let mut line = TcpStream::connect(route.addr).await.unwrap();
        line.write_all(b"GET /slow").await.unwrap();
        // Completes the request line, then dribbles headers: closed by the header timeout.
        let mut headers = TcpStream::connect(route.addr).await.unwrap();
        headers
            .write_all(b"GET /slow HTTP/1.1\r\nHost: app.test\r\n")
            .await
            .unwrap();
        let dribble = async {
            for _ in 0..200 {
                if headers.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let (_, (), ()) = tokio::join!(
            // Meanwhile, everyone else is served.
            async {
                for _ in 0..3 {
                    still_serves(&route).await;
                }
            },
            async {
                closed_within(&mut line, DETECT + WAIT).await;
            },
            async {
                tokio::time::timeout(WAIT, dribble)
                    .await
                    .expect("header dribbler cut off in time");
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_cleanly() {
    let app = EchoApp::start().await;
    let paths = Paths::start(app.addr, |_| {}).await;
    // Past the proxy's 64 KiB header limit; from a file, as it is longer than one argv entry may be.
    let (file, _) = random_file(1);
    std::fs::write(&file, format!("x-big: {}\r\n", "a".repeat(200 * 1024))).unwrap();
    let big = format!("@{}", file.display());
    for route in paths.routes().into_iter().take(2) {
        let out = curl(
            &route,
            "/big-header",
            &["-D", "-", "-o", "/dev/null", "-H", &big],
        )
        .await;
        assert_eq!(
            status(&out.stdout),
            431,
            "{}: {} {}",
            route.name,
            out.stdout,
            out.stderr
        );
        // HTTP/2: a 431 or a reset stream, never a crash.
        let out = curl(
            &route,
            "/big-header",
            &[
                "--http2-prior-knowledge",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-H",
                &big,
            ],
        )
        .await;
        assert!(
            out.status != 0 || status(&out.stdout) == 431,
            "{}: {}",
            route.name,
            out.stdout
        );
        still_serves(&route).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_resetting_upstreams_get_honest_errors() {
    let dead = refused_addr().await;
    let (reset, _task) = resetting_server().await;
    let mut cfg = config(dead);
    cfg.destinations = vec![
        dest("dead.test:80", &[dead]),
        dest("reset.test:80", &[reset]),
    ];
    let proxy = TestProxy::start(cfg).await;
    let inbound = Route {
        name: "inbound",
        addr: proxy.inbound,
        authority: "app.test:80",
    };
    let dead_out = Route {
        name: "outbound dead",
        addr: proxy.outbound,
        authority: "dead.test:80",
    };
    let reset_out = Route {
        name: "outbound reset",
        addr: proxy.outbound,
        authority: "reset.test:80",
    };
    let unknown = Route {
        name: "outbound unknown",
        addr: proxy.outbound,
        authority: "nothing-here.invalid:80",
    };
    for (route, want, says) in [
        (&inbound, 502, "app"),
        (&dead_out, 502, "dead.test:80"),
        (&reset_out, 502, "reset.test:80"),
        (&unknown, 503, "nothing-here.invalid:80"),
    ] {
        for proto in ["--http1.1", "--http2-prior-knowledge"] {
            let out = curl(route, "/x", &[proto, "-D", "-"]).await;
            assert_eq!(
                status(&out.stdout),
                want,
                "{} {proto}: {}",
                route.name,
                out.stdout
            );
            assert!(
                out.stdout.contains(says),
                "{} {proto}: the error names the destination: {}",
                route.name,
                out.stdout
            );
        }
    }
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "remora_errors_total", &[("kind", "connect_failed")]) >= 4.0,
        "{m}"
    );
    assert!(
        metric(&m, "remora_errors_total", &[("kind", "no_endpoints")]) >= 2.0,
        "{m}"
    );
    assert_eq!(http_get(proxy.admin, "/live").await.unwrap().0, 200);
}

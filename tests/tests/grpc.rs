//! gRPC through the proxy with the real grpcio client and server (Python), one channel.

use remora_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_streaming_status_and_trailers_on_every_path() {
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let paths = Paths::start(backend.addr, |_| {}).await;
    for route in paths.routes() {
        let r = grpc_client(route.addr, Some(route.authority), &["check"]).await;
        assert_eq!(r["unary_body"], "hello remora", "{}: {r}", route.name);
        assert_eq!(
            r["unary_backend"], "b1",
            "{}: initial metadata lost: {r}",
            route.name
        );
        assert_eq!(
            r["unary_trailer"], "b1",
            "{}: trailing metadata lost: {r}",
            route.name
        );
        let stream: Vec<&str> = r["stream"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            stream,
            ["b1:0", "b1:1", "b1:2", "b1:3", "b1:4"],
            "{}",
            route.name
        );
        assert_eq!(r["fail_code"], "NOT_FOUND", "{}: {r}", route.name);
        assert_eq!(r["fail_details"], "no such thing", "{}: {r}", route.name);
        assert_eq!(r["fail_trailer"], "because-b1", "{}: {r}", route.name);
    }
    // grpc-status is read from trailers into the request metrics.
    let m = paths.server.metrics().await;
    let not_found = [("direction", "inbound"), ("grpc_status", "5")];
    assert_eq!(metric(&m, "remora_requests_total", &not_found), 2.0, "{m}");
    let ok = [("direction", "inbound"), ("grpc_status", "0")];
    assert_eq!(metric(&m, "remora_requests_total", &ok), 4.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_channel_spread_over_endpoints() {
    let b1 = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let b2 = python_server("grpc_backend.py", &["--name", "b2"]).await;
    let b3 = python_server("grpc_backend.py", &["--name", "b3"]).await;
    let mut cfg = config(refused_addr().await);
    cfg.destinations = vec![dest("echo.test:80", &[b1.addr, b2.addr, b3.addr])];
    let proxy = TestProxy::start(cfg).await;
    let r = grpc_client(
        proxy.outbound,
        Some("echo.test:80"),
        &["concurrent", "600", "8"],
    )
    .await;
    eprintln!("spread: {r}");
    assert_eq!(r["codes"]["OK"], 600, "{r}");
    for b in ["b1", "b2", "b3"] {
        // One client connection, yet every backend serves a share: per-request balancing.
        let n = r["backends"][b].as_u64().unwrap_or(0);
        assert!(n >= 90, "{b} got {n} of 600: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_upstreams_are_grpc_errors() {
    let dead = refused_addr().await;
    let mut cfg = config(dead);
    cfg.destinations = vec![dest("dead.test:80", &[dead])];
    let proxy = TestProxy::start(cfg).await;
    for (addr, authority) in [
        (proxy.inbound, "app.test:80"),
        (proxy.outbound, "dead.test:80"),
        (proxy.outbound, "unknown.invalid:80"),
    ] {
        let r = grpc_client(addr, Some(authority), &["unary", "3"]).await;
        assert_eq!(r["codes"]["UNAVAILABLE"], 3, "{authority}: {r}");
        let detail = r["details"][0].as_str().unwrap_or_default();
        assert!(
            detail.contains(authority.split(':').next().unwrap()) || detail.contains("app"),
            "{authority}: the error names the destination: {r}"
        );
    }
}

/// An HTTP/2 connection gives its buffers back whenever it has no streams (vendor/h2) and takes
/// them again for the next request. grpcio calls on one channel, 300 ms apart so that every
/// connection on the way goes idle in between, each with 6,000 bytes of metadata and 1 MiB
/// each way: every one arrives whole, on the same connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_idle_pauses_arrive_whole_on_the_same_connections() {
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let paths = Paths::start(backend.addr, |_| {}).await;
    for route in paths.routes() {
        let r = grpc_client(route.addr, Some(route.authority), &["idle", "4", "300"]).await;
        assert_eq!(r["ok"], 4, "{}: {r}", route.name);
    }
    // One connection per channel (inbound: the direct route's and the outbound proxy's pooled
    // one), not one per call: the calls did follow idle pauses on open connections.
    let http2 = |dir| [("direction", dir), ("protocol", "http2")];
    let server = paths.server.metrics().await;
    assert_eq!(
        metric(&server, "remora_connections_total", &http2("inbound")),
        2.0,
        "{server}"
    );
    let client = paths.client.metrics().await;
    assert_eq!(
        metric(&client, "remora_connections_total", &http2("outbound")),
        2.0,
        "{client}"
    );
}

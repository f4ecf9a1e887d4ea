//! The meshed hop over QUIC: between two proxies, requests ride HTTP/3 over QUIC with the same
//! mTLS identities as on TCP. Real grpcio clients and servers (Python) at both ends, real
//! certificates, real UDP sockets on loopback; every call shape, wrong identities, certificate
//! rotation and draining under load, and the fall back to TCP + mTLS when UDP is blocked.
//!
//! That a request really crossed on QUIC is read from the proxies' own counters:
//! `remora_mesh_connections_total{direction,transport}` (established mTLS connections to or
//! from peer proxies) and `remora_quic_fallbacks_total` (handshakes that never completed, after
//! which the request went over TCP).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use remora_proxy::{Config, EndpointSpec, MeshTransport, StaticDestination};
use remora_tests::*;

/// A proxy with an identity in front of `app`, dialling peers with `transport`. Its inbound also
/// serves QUIC (UDP, same port number) because it has an identity and mTLS is on.
fn meshed(app: SocketAddr, identity: &Path, transport: MeshTransport) -> Config {
    let mut cfg = config(app);
    cfg.identity_dir = Some(identity.to_path_buf());
    cfg.mesh_transport = transport;
    cfg
}

/// A client-side proxy (its own app is nowhere) with `destinations`.
async fn client_proxy(
    identity: &Path,
    transport: MeshTransport,
    destinations: Vec<StaticDestination>,
) -> TestProxy {
    let mut cfg = meshed(refused_addr().await, identity, transport);
    cfg.destinations = destinations;
    TestProxy::start(cfg).await
}

/// A peer proxy's endpoint that must prove `id`; `quic` is the UDP port it advertises.
fn peer(addr: SocketAddr, id: &remora_certs::SpiffeId, quic: Option<u16>) -> EndpointSpec {
    EndpointSpec {
        addr,
        weight: 1,
        identity: Some(id.clone()),
        opaque: false,
        quic,
        locality: Default::default(),
    }
}

fn destination(name: &str, endpoints: Vec<EndpointSpec>) -> StaticDestination {
    StaticDestination {
        name: name.to_string(),
        endpoints,
    }
}

/// `remora_mesh_connections_total{direction, transport}` in a metrics text.
fn mesh_conns(text: &str, direction: &str, transport: &str) -> f64 {
    metric(
        text,
        "remora_mesh_connections_total",
        &[("direction", direction), ("transport", transport)],
    )
}

fn fallbacks(text: &str) -> f64 {
    metric(text, "remora_quic_fallbacks_total", &[])
}

/// Metrics of a proxy still running, read from its admin server.
async fn scrape(admin: SocketAddr) -> String {
    http_get(admin, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default()
}

/// Asserts that everything between `client` and `server` went over QUIC: connections counted
/// on both sides with transport="quic", none with "tcp", no fallback.
fn assert_quic_only(client: &str, server: &str) {
    assert!(
        mesh_conns(client, "outbound", "quic") >= 1.0,
        "the client proxy established no QUIC connection:\n{client}"
    );
    assert_eq!(
        mesh_conns(client, "outbound", "tcp"),
        0.0,
        "the client proxy used TCP:\n{client}"
    );
    assert_eq!(
        fallbacks(client),
        0.0,
        "a QUIC handshake fell back:\n{client}"
    );
    assert!(
        mesh_conns(server, "inbound", "quic") >= 1.0,
        "the server proxy accepted no QUIC connection:\n{server}"
    );
    assert_eq!(
        mesh_conns(server, "inbound", "tcp"),
        0.0,
        "the server proxy accepted a meshed TCP connection:\n{server}"
    );
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_call_shape_rides_quic_between_proxies() {
    let pki = Pki::new("cluster.local");
    let backend = python_server(
        "grpc_backend.py",
        &["--name", "b1", "--max-message-mb", "40"],
    )
    .await;
    let server = TestProxy::start(meshed(
        backend.addr,
        &pki.identity_dir("web"),
        MeshTransport::Quic,
    ))
    .await;
    let client = client_proxy(
        &pki.identity_dir("client"),
        MeshTransport::Quic,
        vec![destination(
            "web.test:80",
            vec![peer(server.inbound, &pki.id("web"), None)],
        )],
    )
    .await;

    // Unary, server streaming, a non-OK status with trailing metadata.
    let r = grpc_client(client.outbound, Some("web.test:80"), &["check"]).await;
    assert_eq!(r["unary_body"], "hello remora", "{r}");
    assert_eq!(r["unary_backend"], "b1", "initial metadata lost: {r}");
    assert_eq!(r["unary_trailer"], "b1", "trailing metadata lost: {r}");
    assert_eq!(
        strings(&r["stream"]),
        ["b1:0", "b1:1", "b1:2", "b1:3", "b1:4"],
        "{r}"
    );
    assert_eq!(r["fail_code"], "NOT_FOUND", "{r}");
    assert_eq!(r["fail_details"], "no such thing", "{r}");
    assert_eq!(r["fail_trailer"], "because-b1", "{r}");

    // Client streaming, bidirectional ping-pong, cancellation, 16 MiB each way.
    let f = grpc_client(
        client.outbound,
        Some("web.test:80"),
        &["--max-message-mb", "40", "--big-mb", "16", "features"],
    )
    .await;
    eprintln!("features over QUIC: {f}");
    assert_eq!(f["client_stream"], "b1:5:10:m0,m1,m2,m3,m4", "{f}");
    assert_eq!(f["client_stream_backend"], "b1", "{f}");
    assert_eq!(
        strings(&f["bidi"]),
        ["b1:ping0", "b1:ping1", "b1:ping2", "b1:ping3", "b1:ping4"],
        "each answer arrives before the next message is sent: {f}"
    );
    assert_eq!(f["cancel_first"], "b1:ready", "{f}");
    assert_eq!(
        f["cancel_seen"], "cancelled",
        "the client's cancellation reached the server through both proxies: {f}"
    );
    assert_eq!(f["big_up"], true, "16 MiB request arrived whole: {f}");
    assert_eq!(f["big_down"], true, "16 MiB response arrived whole: {f}");
    assert_eq!(f["big_down_len"], 16 * 1024 * 1024, "{f}");
    assert_eq!(f["big_echo"], true, "16 MiB echoed both ways: {f}");

    let (c, s) = (client.metrics().await, server.metrics().await);
    assert_quic_only(&c, &s);
    // The request metrics read gRPC status from trailers carried over HTTP/3.
    for (text, direction) in [(&c, "outbound"), (&s, "inbound")] {
        let not_found = [("direction", direction), ("grpc_status", "5")];
        assert_eq!(
            metric(text, "remora_requests_total", &not_found),
            1.0,
            "{direction}:\n{text}"
        );
        let ok = [("direction", direction), ("grpc_status", "0")];
        // check: unary, stream; features: collect, chat, every Seen poll, digest, blob, echo.
        assert!(
            metric(text, "remora_requests_total", &ok) >= 8.0,
            "{direction}:\n{text}"
        );
    }
}

/// The text from "(expecting" on: who was expected and why the handshake failed.
fn expecting_part(detail: &str) -> &str {
    let at = detail
        .find("(expecting")
        .unwrap_or_else(|| panic!("no \"(expecting\" in {detail:?}"));
    &detail[at..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_identity_is_refused_over_quic_with_the_tcp_message() {
    let pki = Pki::new("cluster.local");
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let server = TestProxy::start(meshed(
        backend.addr,
        &pki.identity_dir("web"),
        MeshTransport::Quic,
    ))
    .await;
    let (web, other) = (pki.id("web"), pki.id("other"));
    // QUIC reaches the server's UDP port while TCP to the endpoint's address is refused: an
    // answer naming the identity can only have come from the QUIC handshake (no TCP fallback).
    let no_tcp = SocketAddr::new(server.inbound.ip(), refused_addr().await.port());
    let quic_port = Some(server.inbound.port());
    let mut details = Vec::new();
    for (transport, other_ep) in [
        (MeshTransport::Tcp, peer(server.inbound, &other, None)),
        (MeshTransport::Quic, peer(server.inbound, &other, None)),
        (MeshTransport::Quic, peer(no_tcp, &other, quic_port)),
    ] {
        let what = format!("{transport:?} to {}", other_ep.addr);
        let client = client_proxy(
            &pki.identity_dir("client"),
            transport,
            vec![
                destination("other.test:80", vec![other_ep.clone()]),
                destination("web.test:80", vec![peer(server.inbound, &web, None)]),
            ],
        )
        .await;
        let r = grpc_client(client.outbound, Some("other.test:80"), &["unary", "1"]).await;
        assert_eq!(r["codes"]["UNAVAILABLE"], 1, "{what}: {r}");
        let detail = r["details"][0].as_str().unwrap_or_default().to_string();
        eprintln!("{what}: {detail}");
        assert!(
            detail.contains(&format!("mTLS to {}", other_ep.addr.ip())),
            "{what}: an mTLS failure: {detail}"
        );
        assert!(
            detail.contains(&format!("(expecting {other})")),
            "{what}: {detail}"
        );
        assert!(
            detail.contains(&format!(
                "server presented identity {web}, expected {other}"
            )),
            "{what}: the verifier's reason: {detail}"
        );
        // The right identity on the same client: served (so QUIC itself works here).
        let ok = grpc_client(client.outbound, Some("web.test:80"), &["unary", "2"]).await;
        assert_eq!(ok["codes"]["OK"], 2, "{what}: {ok}");
        let m = client.metrics().await;
        match transport {
            MeshTransport::Quic => {
                assert_eq!(fallbacks(&m), 0.0, "{what}: a refusal is no timeout:\n{m}");
                assert_eq!(mesh_conns(&m, "outbound", "tcp"), 0.0, "{what}:\n{m}");
                assert!(mesh_conns(&m, "outbound", "quic") >= 1.0, "{what}:\n{m}");
            }
            _ => {
                assert_eq!(mesh_conns(&m, "outbound", "quic"), 0.0, "{what}:\n{m}");
                assert!(mesh_conns(&m, "outbound", "tcp") >= 1.0, "{what}:\n{m}");
            }
        }
        details.push((what, detail));
    }
    let tcp = expecting_part(&details[0].1);
    for (what, detail) in &details[1..] {
        assert_eq!(
            expecting_part(detail),
            tcp,
            "{what} says something else than TCP"
        );
    }
    // Same address, same words: the whole message matches TCP's. (A request that queued
    // behind another's failed connect gets that error wrapped in "connect to ADDR failed: "
    // on either transport; which request meets the failure first is up to timing.)
    let unwrap = |d: &str| d.replacen(&format!("connect to {} failed: ", server.inbound), "", 1);
    assert_eq!(
        unwrap(&details[1].1),
        unwrap(&details[0].1),
        "QUIC and TCP to one address"
    );
}

/// A directory in the layout of a Kubernetes Secret volume (`..data` swapped atomically).
struct SecretDir {
    dir: PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(leaf: &remora_certs::ca::Leaf) -> SecretDir {
        let (f, _) = random_file(1);
        let dir = f.with_file_name("secret");
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = SecretDir { dir, version: 0 };
        s.swap(leaf, &leaf.bundle_pem);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), s.dir.join(name)).unwrap();
        }
        s
    }

    /// The kubelet's way: a new version directory, then `..data` repointed in one rename.
    fn swap(&mut self, leaf: &remora_certs::ca::Leaf, bundle: &str) {
        self.version += 1;
        let v = format!("..2026_12_01_{:04}", self.version);
        let vdir = self.dir.join(&v);
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("tls.crt"), &leaf.chain_pem).unwrap();
        std::fs::write(vdir.join("tls.key"), &leaf.key_pem).unwrap();
        std::fs::write(vdir.join("ca.crt"), bundle).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

async fn wait_counter(p: &TestProxy, name: &str, at_least: f64) {
    let admin = p.admin;
    wait_until(&format!("{name} >= {at_least}"), async || {
        metric(&scrape(admin).await, name, &[]) >= at_least
    })
    .await;
}
/// A new client proxy (so a new QUIC handshake) with `identity`, one request to web.test.
async fn fresh_request(
    identity: &Path,
    server: &TestProxy,
    web: &remora_certs::SpiffeId,
) -> (u16, String, String) {
    let client = client_proxy(
        identity,
        MeshTransport::Quic,
        vec![destination(
            "web.test:80",
            vec![peer(server.inbound, web, None)],
        )],
    )
    .await;
    let route = Route {
        name: "fresh",
        addr: client.outbound,
        authority: "web.test:80",
    };
    let out = curl(&route, "/", &["-D", "-", "--http2-prior-knowledge"]).await;
    (status(&out.stdout), out.stdout, client.metrics().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_quic_load_without_failures() {
    let old = Pki::new("cluster.local");
    let new = Pki::new("cluster.local");
    let web_id = old.id("web");
    assert_eq!(web_id, new.id("web"), "one trust domain, one name");
    let mut web = SecretDir::new(&old.leaf("web"));
    let mut cl = SecretDir::new(&old.leaf("client"));
    let app = EchoApp::start().await;
    let server = TestProxy::start(meshed(app.addr, &web.dir, MeshTransport::Quic)).await;
    let client = client_proxy(
        &cl.dir,
        MeshTransport::Quic,
        vec![destination(
            "web.test:80",
            vec![peer(server.inbound, &web_id, None)],
        )],
    )
    .await;
    let running = steady_h2load(client.outbound, "web.test:80", 20);
    let ok = [("direction", "inbound"), ("status", "200")];
    let admin = server.admin;
    wait_until("load to flow over QUIC", async || {
        let m = scrape(admin).await;
        metric(&m, "remora_requests_total", &ok) >= 50.0 && mesh_conns(&m, "inbound", "quic") >= 1.0
    })
    .await;
    let both = format!("{}{}", old.issuer.bundle_pem, new.issuer.bundle_pem);
    let mut reloads = 1.0;
    let mut step = async |w: remora_certs::ca::Leaf,
                          c: remora_certs::ca::Leaf,
                          bundle: &str,
                          web: &mut SecretDir,
                          cl: &mut SecretDir| {
        web.swap(&w, bundle);
        cl.swap(&c, bundle);
        reloads += 1.0;
        wait_counter(&server, "remora_identity_reloads_total", reloads).await;
        wait_counter(&client, "remora_identity_reloads_total", reloads).await;
    };
    // 1. New leaves, same CA; a fresh peer is served over QUIC at once.
    step(
        old.leaf("web"),
        old.leaf("client"),
        &old.issuer.bundle_pem,
        &mut web,
        &mut cl,
    )
    .await;
    let (code, head, m) = fresh_request(&old.identity_dir("probe"), &server, &web_id).await;
    assert_eq!(code, 200, "after a leaf rotation: {head}");
    assert_eq!(mesh_conns(&m, "outbound", "tcp"), 0.0, "{m}");
    assert!(mesh_conns(&m, "outbound", "quic") >= 1.0, "{m}");
    // 2. Trust both roots. 3. Leaves of the new CA. 4. The new root only.
    step(
        old.leaf("web"),
        old.leaf("client"),
        &both,
        &mut web,
        &mut cl,
    )
    .await;
    step(
        new.leaf("web"),
        new.leaf("client"),
        &both,
        &mut web,
        &mut cl,
    )
    .await;
    step(
        new.leaf("web"),
        new.leaf("client"),
        &new.issuer.bundle_pem,
        &mut web,
        &mut cl,
    )
    .await;
    // A peer that trusts only the new root gets through over QUIC: the server's QUIC listener
    // presents the new leaf and verifies clients against the new bundle, without a restart.
    let (code, head, m) = fresh_request(&new.identity_dir("probe"), &server, &web_id).await;
    assert_eq!(code, 200, "after the CA rotation: {head}");
    assert_eq!(
        mesh_conns(&m, "outbound", "tcp"),
        0.0,
        "new-CA peer fell back to TCP:\n{m}"
    );
    assert_eq!(fallbacks(&m), 0.0, "{m}");
    assert!(mesh_conns(&m, "outbound", "quic") >= 1.0, "{m}");
    // One that trusts only the old root is refused: the old leaf is no longer served.
    let (code, head, _) = fresh_request(&old.identity_dir("probe"), &server, &web_id).await;
    assert_eq!(code, 502, "an old-CA peer must be refused: {head}");
    assert!(
        !running.is_finished(),
        "the rotations ran while the load did"
    );
    let out = tokio::time::timeout(WAIT, running)
        .await
        .expect("load ends")
        .unwrap();
    assert_no_failures(&out);
    let s = server.metrics().await;
    assert_eq!(
        metric(&s, "remora_identity_reload_failures_total", &[]),
        0.0,
        "{s}"
    );
    assert_quic_only(&client.metrics().await, &s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_udp_falls_back_to_tcp_without_failures() {
    let pki = Pki::new("cluster.local");
    let backend = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let server = TestProxy::start(meshed(
        backend.addr,
        &pki.identity_dir("web"),
        MeshTransport::Quic,
    ))
    .await;
    // The advertised QUIC port is a socket that never answers: datagrams vanish into it, the
    // way they do behind a firewall that drops UDP.
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let hole = black_hole.local_addr().unwrap().port();
    let client = client_proxy(
        &pki.identity_dir("client"),
        MeshTransport::Auto,
        vec![destination(
            "web.test:80",
            vec![peer(server.inbound, &pki.id("web"), Some(hole))],
        )],
    )
    .await;
    let started = std::time::Instant::now();
    let r = grpc_client(
        client.outbound,
        Some("web.test:80"),
        &["concurrent", "400", "8"],
    )
    .await;
    eprintln!("fallback: {r} in {:?}", started.elapsed());
    assert_eq!(r["codes"]["OK"], 400, "every call succeeded: {r}");
    assert_eq!(r["backends"]["b1"], 400, "{r}");
    // QUIC was really tried: the black hole holds a QUIC Initial (long header, padded to at
    // least 1200 bytes).
    black_hole.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = black_hole
        .recv_from(&mut buf)
        .expect("a QUIC handshake was attempted on the advertised port");
    assert!(
        buf[0] & 0xc0 == 0xc0 && n >= 1200,
        "not a QUIC Initial: {n} bytes"
    );
    let (c, s) = (client.metrics().await, server.metrics().await);
    assert!(fallbacks(&c) >= 1.0, "{c}");
    // Concurrent requests share one attempt, and then the endpoint stays on TCP for a while:
    // not a half-second wait per request.
    assert!(fallbacks(&c) <= 8.0, "QUIC retried while backing off:\n{c}");
    assert_eq!(mesh_conns(&c, "outbound", "quic"), 0.0, "{c}");
    assert!(mesh_conns(&c, "outbound", "tcp") >= 1.0, "{c}");
    assert!(mesh_conns(&s, "inbound", "tcp") >= 1.0, "{s}");
    assert_eq!(mesh_conns(&s, "inbound", "quic"), 0.0, "{s}");
    let ok = [("direction", "inbound"), ("grpc_status", "0")];
    assert_eq!(metric(&s, "remora_requests_total", &ok), 400.0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_quic_only_where_advertised_and_tcp_mode_never() {
    let pki = Pki::new("cluster.local");
    let b1 = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let b2 = python_server("grpc_backend.py", &["--name", "b2"]).await;
    let web = pki.id("web");
    let s1 = TestProxy::start(meshed(
        b1.addr,
        &pki.identity_dir("web"),
        MeshTransport::Auto,
    ))
    .await;
    let s2 = TestProxy::start(meshed(
        b2.addr,
        &pki.identity_dir("web"),
        MeshTransport::Auto,
    ))
    .await;
    let dests = || {
        vec![
            destination(
                "advertised.test:80",
                vec![peer(s1.inbound, &web, Some(s1.inbound.port()))],
            ),
            destination("plain.test:80", vec![peer(s2.inbound, &web, None)]),
        ]
    };
    let auto = client_proxy(&pki.identity_dir("client"), MeshTransport::Auto, dests()).await;
    for name in ["advertised.test:80", "plain.test:80"] {
        let r = grpc_client(auto.outbound, Some(name), &["unary", "20"]).await;
        assert_eq!(r["codes"]["OK"], 20, "{name}: {r}");
    }
    let (m1, m2) = (s1.metrics().await, s2.metrics().await);
    assert!(mesh_conns(&m1, "inbound", "quic") >= 1.0, "{m1}");
    assert_eq!(mesh_conns(&m1, "inbound", "tcp"), 0.0, "{m1}");
    assert_eq!(mesh_conns(&m2, "inbound", "quic"), 0.0, "{m2}");
    assert!(mesh_conns(&m2, "inbound", "tcp") >= 1.0, "{m2}");
    let a = auto.metrics().await;
    assert!(mesh_conns(&a, "outbound", "quic") >= 1.0, "{a}");
    assert!(mesh_conns(&a, "outbound", "tcp") >= 1.0, "{a}");
    assert_eq!(fallbacks(&a), 0.0, "{a}");

    // Tcp: the advertisement is ignored.
    let tcp = client_proxy(&pki.identity_dir("client"), MeshTransport::Tcp, dests()).await;
    let r = grpc_client(tcp.outbound, Some("advertised.test:80"), &["unary", "20"]).await;
    assert_eq!(r["codes"]["OK"], 20, "{r}");
    let t = tcp.metrics().await;
    assert_eq!(mesh_conns(&t, "outbound", "quic"), 0.0, "{t}");
    assert!(mesh_conns(&t, "outbound", "tcp") >= 1.0, "{t}");
    let m1 = s1.metrics().await;
    assert!(mesh_conns(&m1, "inbound", "tcp") >= 1.0, "{m1}");
}

fn encode(r: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).expect("encodes");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_quic_peer_under_load_loses_nothing() {
    let pki = Pki::new("cluster.local");
    let b1 = python_server("grpc_backend.py", &["--name", "b1"]).await;
    let b2 = python_server("grpc_backend.py", &["--name", "b2"]).await;
    let web = pki.id("web");
    let mut cfg = meshed(b1.addr, &pki.identity_dir("web"), MeshTransport::Quic);
    cfg.drain_timeout = Duration::from_secs(25);
    let p1 = TestProxy::start(cfg).await;
    let p2 = TestProxy::start(meshed(
        b2.addr,
        &pki.identity_dir("web"),
        MeshTransport::Quic,
    ))
    .await;
    let client = client_proxy(
        &pki.identity_dir("client"),
        MeshTransport::Quic,
        vec![
            destination(
                "echo.test:80",
                vec![peer(p1.inbound, &web, None), peer(p2.inbound, &web, None)],
            ),
            destination("p1.test:80", vec![peer(p1.inbound, &web, None)]),
        ],
    )
    .await;
    let outbound = client.outbound;
    let (p1_admin, p1_registry) = (p1.admin, p1.registry.clone());

    // A long server stream on p1 (80 messages, 100 ms apart): in flight when the drain starts.
    let stream = tokio::spawn(async move {
        grpc_client(outbound, Some("p1.test:80"), &["stream", "80", "100"]).await
    });
    wait_until("the stream to be in flight on p1", async || {
        metric(
            &scrape(p1_admin).await,
            "remora_requests_in_flight",
            &[("direction", "inbound")],
        ) >= 1.0
    })
    .await;
    // Unary load over both peers.
    let calls = tokio::spawn(async move {
        grpc_client(outbound, Some("echo.test:80"), &["concurrent", "3000", "8"]).await
    });
    wait_until("calls to reach p1", async || {
        metric(
            &scrape(p1_admin).await,
            "remora_requests_total",
            &[("direction", "inbound")],
        ) >= 300.0
    })
    .await;
    assert!(
        !stream.is_finished(),
        "the stream outlasts the start of the drain"
    );
    let before = client.metrics().await;
    assert_quic_only(&before, &scrape(p1_admin).await);
    let report = p1.stop().await;
    assert_eq!(
        report.cut, 0,
        "nothing cut: the stream finished within the drain"
    );
    let s = tokio::time::timeout(WAIT, stream)
        .await
        .expect("stream ends")
        .unwrap();
    let got = strings(&s["messages"]);
    assert_eq!(got.len(), 80, "the in-flight stream finished whole: {s}");
    assert_eq!(got.last().map(String::as_str), Some("b1:79"), "{s}");
    let r = tokio::time::timeout(WAIT * 2, calls)
        .await
        .expect("client ends")
        .unwrap();
    eprintln!("drain over QUIC: {r}");
    assert_eq!(
        r["codes"]["OK"], 3000,
        "every call succeeded across the drain: {r}"
    );
    assert!(
        r["backends"]["b2"].as_u64().unwrap_or(0) > 1500,
        "p2 took over: {r}"
    );
    let m1 = encode(&p1_registry);
    assert!(mesh_conns(&m1, "inbound", "quic") >= 1.0, "{m1}");
    assert_eq!(mesh_conns(&m1, "inbound", "tcp"), 0.0, "{m1}");
    let c = client.metrics().await;
    assert!(
        mesh_conns(&c, "outbound", "quic") >= 2.0,
        "one per peer:\n{c}"
    );
    assert_eq!(mesh_conns(&c, "outbound", "tcp"), 0.0, "{c}");
    // Once p1 is gone the client may still try it (QUIC, which times out on a closed port,
    // then TCP, refused) until it is marked down: fallbacks are allowed from then on only.
    let p2m = p2.metrics().await;
    assert!(mesh_conns(&p2m, "inbound", "quic") >= 1.0, "{p2m}");
    assert_eq!(mesh_conns(&p2m, "inbound", "tcp"), 0.0, "{p2m}");
}

/// Inside namespaces made here: pod B's firewall drops UDP to the inbound port (QUIC cannot
/// get through, TCP can), and a client proxy in pod A that tries QUIC for every peer falls back
/// to TCP + mTLS without failing a call. The proxies are the `remora-proxy` binary, configured
/// by environment as in a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_dropping_udp_falls_back_to_tcp_in_namespaces() {
    use remora_tests::netns::{Lan, available, workspace_binary};
    if let Err(why) = available() {
        eprintln!("SKIPPED: network namespaces cannot be made here: {why}");
        return;
    }
    let proxy = workspace_binary("remora-proxy");
    let proxy = proxy.to_str().expect("utf-8 path").to_string();
    let mut lan = Lan::new();
    let a = lan.pod("qa", 2);
    let b = lan.pod("qb", 3);
    let b_ip = lan.ip(3);
    let pki = Pki::new("cluster.local");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    let mut children = Vec::new();
    let backend = py("grpc_backend.py");
    let mut c = lan.spawn(
        &b,
        None,
        &[],
        &[
            "python3",
            backend.to_str().expect("utf-8"),
            "--port",
            "50051",
            "--name",
            "b",
        ],
    );
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        c.stdout.take().expect("stdout"),
    ));
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("grpc backend start")
        .expect("read")
        .expect("PORT line");
    assert!(line.starts_with("PORT "), "{line}");
    children.push(c);
    let web_dir = pki.identity_dir("web");
    children.push(lan.spawn(
        &b,
        None,
        &[
            ("REMORA_IDENTITY_DIR", s(&web_dir)),
            ("REMORA_APP_ADDR", "127.0.0.1:50051".into()),
            ("REMORA_MESH_TRANSPORT", "quic".into()),
        ],
        &[&proxy],
    ));
    lan.wait_ready(&b, "http://127.0.0.1:4191/ready").await;
    // A client proxy in pod A on (outbound, admin) ports.
    let client_dir = pki.identity_dir("client");
    let destination = format!("web.test:80={b_ip}:4143#{}", pki.id("web"));
    let start_client = |outbound: u16, admin: u16| {
        lan.spawn(
            &a,
            None,
            &[
                ("REMORA_IDENTITY_DIR", s(&client_dir)),
                ("REMORA_DESTINATIONS", destination.clone()),
                ("REMORA_MESH_TRANSPORT", "quic".into()),
                ("REMORA_OUTBOUND_ADDR", format!("127.0.0.1:{outbound}")),
                ("REMORA_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
                ("REMORA_INBOUND_ADDR", format!("127.0.0.1:{}", outbound + 3)),
            ],
            &[&proxy],
        )
    };
    let client = py("grpc_client.py");
    let client = client.to_str().expect("utf-8").to_string();
    let calls = async |outbound: u16, n: &str| -> serde_json::Value {
        let target = format!("127.0.0.1:{outbound}");
        let out = lan
            .run(
                &a,
                &[
                    "python3",
                    &client,
                    &target,
                    "--authority",
                    "web.test:80",
                    "concurrent",
                    n,
                    "4",
                ],
            )
            .await;
        assert_eq!(out.status, 0, "grpc client: {}", out.stderr);
        serde_json::from_str(out.stdout.trim()).expect("json")
    };
    let metrics = async |ns: &str, admin: u16| -> String {
        let url = format!("http://127.0.0.1:{admin}/metrics");
        let out = lan
            .run(ns, &["curl", "-sS", "--max-time", "10", &url])
            .await;
        assert_eq!(out.status, 0, "metrics: {}", out.stderr);
        out.stdout
    };

    // UDP open: QUIC between the pods.
    children.push(start_client(4140, 4191));
    lan.wait_ready(&a, "http://127.0.0.1:4191/ready").await;
    let r = calls(4140, "50").await;
    assert_eq!(r["codes"]["OK"], 50, "{r}");
    let m = metrics(&a, 4191).await;
    assert!(mesh_conns(&m, "outbound", "quic") >= 1.0, "{m}");
    assert_eq!(mesh_conns(&m, "outbound", "tcp"), 0.0, "{m}");

    // B's firewall drops UDP to the inbound port; a new client proxy must fall back.
    let drop_rule = ["-p", "udp", "--dport", "4143", "-j", "DROP"];
    let mut add = vec!["iptables", "-A", "INPUT"];
    add.extend_from_slice(&drop_rule);
    let out = lan.run(&b, &add).await;
    assert_eq!(out.status, 0, "iptables: {}", out.stderr);
    children.push(start_client(4240, 4291));
    lan.wait_ready(&a, "http://127.0.0.1:4291/ready").await;
    let r = calls(4240, "300").await;
    eprintln!("through the firewall: {r}");
    assert_eq!(r["codes"]["OK"], 300, "every call succeeded: {r}");
    let m = metrics(&a, 4291).await;
    assert!(fallbacks(&m) >= 1.0, "{m}");
    assert_eq!(mesh_conns(&m, "outbound", "quic"), 0.0, "{m}");
    assert!(mesh_conns(&m, "outbound", "tcp") >= 1.0, "{m}");
    // The firewall really saw (and dropped) the QUIC attempt.
    let out = lan
        .run(&b, &["iptables", "-L", "INPUT", "-v", "-n", "-x"])
        .await;
    let dropped: u64 = out
        .stdout
        .lines()
        .find(|l| l.contains("DROP") && l.contains("udp"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        dropped >= 1,
        "no UDP packet reached the rule: {}",
        out.stdout
    );
    let m = metrics(&b, 4191).await;
    assert!(mesh_conns(&m, "inbound", "tcp") >= 1.0, "{m}");
    drop(children);
}

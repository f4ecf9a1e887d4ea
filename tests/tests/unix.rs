//! Unix domain sockets on the local hops (seed 004: "Domain sockets are cool!"): the app's
//! calls reach the outbound side on a socket path (`REMORA_OUTBOUND_ADDR=IP:PORT,unix:PATH`)
//! and the inbound side reaches the app on one (`REMORA_APP_ADDR=unix:PATH`), with mTLS and
//! the verified identity in between. Clients nobody here wrote: curl `--unix-socket` (HTTP/1.1
//! and HTTP/2) and Python grpcio with a `unix:` target; the apps are Python servers on sockets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use remora_tests::{Pki, TestProxy, config, python_server, refused_addr, run};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory with a short path (socket paths are limited to 107 bytes).
fn socket_dir() -> PathBuf {
    let dir = PathBuf::from(format!(
        "/tmp/remora-uds-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("socket dir");
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A server-side proxy with identity `sa` whose app is the Unix socket `app`.
async fn server(pki: &Pki, sa: &str, app: &Path) -> TestProxy {
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir(sa));
    cfg.app_unix = Some(app.to_path_buf());
    TestProxy::start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_grpcio_over_unix_sockets_on_both_local_hops() {
    let pki = Pki::new("cluster.local");
    let dir = socket_dir();
    let (app_sock, grpc_sock, out_sock) = (
        dir.join("app.sock"),
        dir.join("grpc.sock"),
        dir.join("out.sock"),
    );
    let _app = python_server("unix_app.py", &[s(&app_sock)]).await;
    let _grpc = python_server(
        "grpc_backend.py",
        &["--unix", s(&grpc_sock), "--name", "u1"],
    )
    .await;
    let web = server(&pki, "web", &app_sock).await;
    let grpc = server(&pki, "grpc", &grpc_sock).await;

    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir("client"));
    cfg.outbound_unix = Some(out_sock.clone());
    cfg.destinations = vec![
        format!(
            "web.test:80={}#spiffe://cluster.local/ns/default/sa/web",
            web.inbound
        )
        .parse()
        .expect("destination"),
        format!(
            "grpc.test:80={}#spiffe://cluster.local/ns/default/sa/grpc",
            grpc.inbound
        )
        .parse()
        .expect("destination"),
    ];
    let client = TestProxy::start(cfg).await;
    let client_id = "spiffe://cluster.local/ns/default/sa/client";

    // curl on the outbound socket, two requests on one keep-alive connection; the app on its
    // socket sees the client's verified identity (mTLS between the proxies). HTTP/2 over both
    // sockets is the gRPC call below (this app speaks HTTP/1.1 only).
    for proto in ["--http1.1"] {
        let out = run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                proto,
                "--unix-socket",
                s(&out_sock),
                "http://web.test/a",
                "http://web.test/b",
            ],
        )
        .await;
        assert_eq!(out.status, 0, "curl {proto}: {}", out.stderr);
        assert_eq!(
            out.stdout,
            format!("unix-app {client_id}\nunix-app {client_id}\n"),
            "curl {proto}"
        );
    }
    // A forged identity header from the app is replaced by the verified one.
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--unix-socket",
            s(&out_sock),
            "-H",
            "x-remora-client-id: spiffe://cluster.local/ns/default/sa/admin",
            "http://web.test/",
        ],
    )
    .await;
    assert_eq!(out.stdout.trim(), format!("unix-app {client_id}"));

    // grpcio on a `unix:` target (authority set, as an app names its service): unary with
    // headers and trailers, a server stream, a non-OK status with its trailing metadata.
    let script = remora_tests::py("grpc_client.py");
    let target = format!("unix:{}", s(&out_sock));
    let out = run(
        "python3",
        &[s(&script), &target, "--authority", "grpc.test:80", "check"],
    )
    .await;
    assert_eq!(out.status, 0, "grpc client: {}", out.stderr);
    let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("grpc client JSON");
    assert_eq!(r["unary_body"], "hello remora");
    assert_eq!(r["unary_backend"], "u1");
    assert_eq!(r["unary_trailer"], "u1");
    assert_eq!(r["stream"].as_array().map(Vec::len), Some(5));
    assert_eq!(r["fail_code"], "NOT_FOUND", "{r}");
    assert_eq!(r["fail_details"], "no such thing", "{r}");
    assert_eq!(r["fail_trailer"], "because-u1", "{r}");

    // Access is the socket file's: made private to its owner, another user cannot connect.
    if libc_geteuid() == 0 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&out_sock, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let out = run(
            "setpriv",
            &[
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--unix-socket",
                s(&out_sock),
                "http://web.test/",
            ],
        )
        .await;
        assert_ne!(out.status, 0, "another user connected: {}", out.stdout);
        assert!(
            out.stderr.contains("ermission denied") || out.stderr.contains("Couldn't connect"),
            "{}",
            out.stderr
        );
    }

    // The socket file goes with the proxy; a new proxy on the same path starts cleanly.
    client.stop().await;
    assert!(!out_sock.exists(), "the socket file outlived its proxy");
    let mut again = config(refused_addr().await);
    again.outbound_unix = Some(out_sock.clone());
    let again = TestProxy::start(again).await;
    assert!(out_sock.exists());
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_socket_paths_are_refused_by_name() {
    let dir = socket_dir();
    // A path that is a regular file is not replaced.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "data").expect("write");
    let mut cfg = config(refused_addr().await);
    cfg.outbound_unix = Some(file.clone());
    let err = remora_proxy::Proxy::bind(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "data");
    // A socket another proxy is serving is not taken over.
    let path = dir.join("busy.sock");
    let mut cfg = config(refused_addr().await);
    cfg.outbound_unix = Some(path.clone());
    let first = TestProxy::start(cfg.clone()).await;
    let err = remora_proxy::Proxy::bind(cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    drop(first);
    // The binary's knobs: relative paths, and a list without a TCP address.
    let proxy = remora_tests::netns::workspace_binary("remora-proxy");
    for (knob, value, want) in [
        ("REMORA_APP_ADDR", "unix:app.sock", "must be absolute"),
        ("REMORA_OUTBOUND_ADDR", "unix:/tmp/x.sock", "has no IP:PORT"),
        (
            "REMORA_OUTBOUND_ADDR",
            "127.0.0.1:0,unix:/tmp/a.sock,unix:/tmp/b.sock",
            "at most one unix:PATH",
        ),
    ] {
        let out = std::process::Command::new(&proxy)
            .env(knob, value)
            .output()
            .expect("remora-proxy");
        assert!(!out.status.success(), "{knob}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(knob) && err.contains(want),
            "{knob}={value}: {err}"
        );
    }
}

fn libc_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

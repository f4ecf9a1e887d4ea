//! Transparent interception end to end: "pods" are network namespaces made by the test, each
//! with a veth on one bridge, an unmodified app on loopback, a proxy running as UID 2102 and
//! the rules of `remora-proxy init`. Clients nobody here wrote (curl, h2load, grpcio) in pod A
//! reach the servers in pods B1/B2 by a Service ClusterIP the control plane knows, with no
//! proxy setting; the servers see A's identity (mTLS between the proxies).

use std::time::Duration;

use remora_tests::netns::{Lan, available, workspace_binary};
use remora_tests::{Pki, py};

const PROXY_UID: u32 = 2102;

struct Mesh {
    lan: Lan,
    a: String,
    b1: String,
    b1_ip: String,
    ext_ip: String,
    cluster_ip: String,
    _children: Vec<tokio::process::Child>,
    pki: Pki,
}

fn readable(path: &std::path::Path) {
    // The proxies run as UID 2102: their identity files and directories must be readable.
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(path)
        .status();
    let mut p = path.parent();
    while let Some(d) = p {
        let _ = std::process::Command::new("chmod")
            .arg("a+x")
            .arg(d)
            .status();
        p = d.parent();
    }
}

async fn mesh() -> Option<Mesh> {
    if let Err(why) = available() {
        eprintln!("SKIPPED: network namespaces cannot be made here: {why}");
        return None;
    }
    let proxy = workspace_binary("remora-proxy");
    let remora = workspace_binary("remora");
    let proxy = proxy.to_str().expect("utf-8 path").to_string();
    let mut lan = Lan::new();
    let a = lan.pod("a", 2);
    let b1 = lan.pod("b1", 3);
    let b2 = lan.pod("b2", 4);
    let ext = lan.pod("ext", 9);
    let (ctl_ip, b1_ip, b2_ip, ext_ip) = (lan.ip(1), lan.ip(3), lan.ip(4), lan.ip(9));
    // A virtual IP routed nowhere: only interception makes it reachable.
    let cluster_ip = format!("10.{}.100.10", lan.net);
    let pki = Pki::new("cluster.local");
    readable(&pki.dir);
    let server_id = pki.id("web");
    let eps = |port: u16| {
        format!(
            "endpoints = [{{ addr = \"{b1_ip}:{port}\", identity = \"{server_id}\" }}, {{ addr = \"{b2_ip}:{port}\", identity = \"{server_id}\" }}]\n"
        )
    };
    let toml = format!(
        "[[service]]\nname = \"{cluster_ip}:80\"\n{}\n[[service]]\nname = \"{cluster_ip}:9000\"\n{}\n[[service]]\nname = \"{cluster_ip}:3306\"\nopaque = true\n{}\n[[service]]\nname = \"{cluster_ip}:50051\"\n{}",
        eps(8080),
        eps(9000),
        eps(3306),
        eps(50051)
    );
    let dir = remora_tests::control::scratch("intercept");
    std::fs::create_dir_all(&dir).expect("scratch");
    let file = dir.join("endpoints.toml");
    std::fs::write(&file, toml).expect("endpoints");
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "unused-bootstrap-token-0123456789 spiffe://cluster.local/ns/default/sa/unused\n",
    )
    .expect("tokens");
    let mut children = Vec::new();
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    children.push(lan.spawn(
        &lan.hub,
        None,
        &[],
        &[
            remora.to_str().expect("utf-8"),
            "control",
            "--addr",
            &format!("{ctl_ip}:8086"),
            "--admin-addr",
            &format!("{ctl_ip}:9996"),
            "--issuer",
            &s(&pki.dir),
            "--endpoints-file",
            &s(&file),
            "--bootstrap-tokens",
            &s(&tokens),
        ],
    ));
    lan.wait_ready(&lan.hub, &format!("http://{ctl_ip}:9996/ready"))
        .await;
    // The apps: unmodified, on loopback; ext binds every address and has no proxy.
    let app = py("pod_app.py");
    let app = app.to_str().expect("utf-8");
    for (ns, name) in [(&b1, "b1"), (&b2, "b2")] {
        children.push(
            lan.spawn_until(ns, &[], &["python3", app, "--name", name], "READY")
                .await,
        );
        let backend = py("grpc_backend.py");
        let mut c = lan.spawn(
            ns,
            None,
            &[],
            &[
                "python3",
                backend.to_str().expect("utf-8"),
                "--port",
                "50051",
                "--name",
                name,
            ],
        );
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            c.stdout.take().expect("stdout"),
        ));
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("grpc backend start")
            .expect("read")
            .expect("PORT line");
        assert!(line.starts_with("PORT "), "{line}");
        children.push(c);
    }
    children.push(
        lan.spawn_until(
            &ext,
            &[],
            &["python3", app, "--name", "ext", "--any"],
            "READY",
        )
        .await,
    );
    // The proxies and their rules.
    for (ns, sa) in [(&a, "client"), (&b1, "web"), (&b2, "web")] {
        let out = lan.run(ns, &[&proxy, "init"]).await;
        assert_eq!(out.status, 0, "init in {ns}: {}", out.stderr);
        let id = pki.identity_dir(sa);
        readable(&id);
        let mut env = vec![
            ("REMORA_IDENTITY_DIR", s(&id)),
            ("REMORA_LOG", "info".to_string()),
        ];
        if ns == &a {
            env.push(("REMORA_CONTROL_ADDR", format!("{ctl_ip}:8086")));
        }
        children.push(lan.spawn(ns, Some(PROXY_UID), &env, &[&proxy]));
        lan.wait_ready(ns, "http://127.0.0.1:4191/ready").await;
    }
    Some(Mesh {
        lan,
        a,
        b1,
        b1_ip,
        ext_ip,
        cluster_ip,
        _children: children,
        pki,
    })
}

/// Counts lines starting with each backend name.
fn backends(body: &str) -> (usize, usize) {
    let n = |p: &str| body.lines().filter(|l| l.starts_with(p)).count();
    (n("b1 "), n("b2 "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_clients_reach_a_cluster_ip_through_interception() {
    let Some(m) = mesh().await else { return };
    let client_id = m.pki.id("client").to_string();
    let (lan, a, vip) = (&m.lan, &m.a, &m.cluster_ip);

    // HTTP/1.1, one keep-alive connection, 40 requests: balanced per request, over mTLS
    // (the apps see A's verified identity).
    let url = format!("http://{vip}/[1-40]");
    let out = lan.run(a, &["curl", "-sS", "--max-time", "20", &url]).await;
    assert_eq!(out.status, 0, "curl: {}", out.stderr);
    let (b1, b2) = backends(&out.stdout);
    assert_eq!(b1 + b2, 40, "{}", out.stdout);
    assert!(
        b1 > 0 && b2 > 0,
        "per-request balancing over one connection: {b1}/{b2}"
    );
    for line in out.stdout.lines() {
        assert!(line.ends_with(&format!(" {client_id}")), "identity: {line}");
    }

    // A forged identity header from the app is dropped: only the verified one arrives.
    let out = lan
        .run(
            a,
            &[
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-H",
                "x-remora-client-id: spiffe://cluster.local/ns/default/sa/admin",
                &format!("http://{vip}/"),
            ],
        )
        .await;
    assert!(out.stdout.trim().ends_with(&client_id), "{}", out.stdout);

    // h2load (HTTP/2 prior knowledge), two connections.
    let out = lan
        .run(
            a,
            &[
                "h2load",
                "-n",
                "200",
                "-c",
                "2",
                "-m",
                "4",
                &format!("http://{vip}/"),
            ],
        )
        .await;
    assert_eq!(out.status, 0, "h2load: {}", out.stderr);
    assert!(
        out.stdout.contains("200 succeeded, 0 failed"),
        "h2load: {}",
        out.stdout
    );

    // grpcio with a plain target: no proxy option, no authority override.
    let client = py("grpc_client.py");
    let target = format!("{vip}:50051");
    let out = lan
        .run(
            a,
            &["python3", client.to_str().unwrap(), &target, "unary", "40"],
        )
        .await;
    assert_eq!(out.status, 0, "grpc: {}", out.stderr);
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(report["codes"]["OK"], 40, "{report}");
    assert!(
        report["backends"]["b1"].as_u64().unwrap_or(0) > 0
            && report["backends"]["b2"].as_u64().unwrap_or(0) > 0,
        "gRPC balanced per call: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_server_first_and_passthrough() {
    let Some(m) = mesh().await else { return };
    let (lan, a, vip) = (&m.lan, &m.a, &m.cluster_ip);
    // Opaque TCP echo (the client speaks first, not HTTP), through the mesh.
    let script = "import socket,sys\n\
        s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10)\n\
        if sys.argv[3]=='banner':\n print(s.makefile().readline().strip())\n\
        s.sendall(b'\\x00\\x01opaque bytes\\n')\n\
        got=b''\n\
        while not got.endswith(b'\\n'):\n d=s.recv(100)\n if not d: break\n got+=d\n\
        print(got[2:].decode().strip())\n";
    let out = lan
        .run(a, &["python3", "-c", script, vip, "9000", "echo"])
        .await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "opaque bytes");
    // Server speaks first (an opaque port): the banner arrives without the client speaking.
    // Its by-address watch is new here: on a loaded machine the control plane's first answer
    // can miss the proxy's first-answer bound, and that connection is then passed through to
    // the ClusterIP (routed nowhere: closed at once). A late answer counts, so the next
    // connection goes to the Service; wait for that, bounded.
    let deadline = tokio::time::Instant::now() + remora_tests::WAIT;
    let out = loop {
        let out = lan
            .run(a, &["python3", "-c", script, vip, "3306", "banner"])
            .await;
        if !out.stdout.trim().is_empty() || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        matches!(lines.first(), Some(&("HELLO b1" | "HELLO b2"))),
        "{}",
        out.stdout
    );
    assert_eq!(lines.get(1), Some(&"opaque bytes"));
    // Outside the mesh: passed through untouched (no identity added, no proxy on the far end).
    let out = lan
        .run(
            a,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("http://{}:8080/", m.ext_ip),
            ],
        )
        .await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "ext -");
    let out = lan
        .run(a, &["python3", "-c", script, &m.ext_ip, "3306", "banner"])
        .await;
    assert_eq!(
        out.stdout.lines().next(),
        Some("HELLO ext"),
        "{}",
        out.stderr
    );
    // A connection redirected to one of the proxy's own ports is refused, not looped: B1's
    // inbound sees original port 4140 (its outbound listener).
    let out = lan
        .run(
            a,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}:4140/", m.b1_ip),
            ],
        )
        .await;
    assert_eq!(
        out.stdout, "502",
        "A's proxy answers for the closed connection: {}",
        out.stderr
    );
    let b1_metrics = lan
        .run(&m.b1, &["curl", "-sS", "http://127.0.0.1:4191/metrics"])
        .await
        .stdout;
    assert!(
        b1_metrics
            .lines()
            .any(|l| l.starts_with("remora_errors_total")
                && l.contains("kind=\"loop\"")
                && !l.ends_with(" 0")),
        "{b1_metrics}"
    );
    // Nothing else looped: the proxies' own connections skipped interception.
    let metrics = lan
        .run(a, &["curl", "-sS", "http://127.0.0.1:4191/metrics"])
        .await
        .stdout;
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("kind=\"loop\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_is_idempotent_and_removable() {
    if let Err(why) = available() {
        eprintln!("SKIPPED: network namespaces cannot be made here: {why}");
        return;
    }
    let proxy = workspace_binary("remora-proxy");
    let proxy = proxy.to_str().unwrap();
    let mut lan = Lan::new();
    let ns = lan.pod("i", 2);
    // iptables-save's `#` lines carry a timestamp.
    let save = async |lan: &Lan| {
        let out = lan.run(&ns, &["iptables-save", "-t", "nat"]).await.stdout;
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for _ in 0..2 {
        let out = lan
            .run(&ns, &[proxy, "init", "--skip-outbound-ports", "5432"])
            .await;
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
    let rules = save(&lan).await;
    assert_eq!(rules.matches("-j REMORA_INBOUND").count(), 1, "{rules}");
    assert_eq!(rules.matches("-j REMORA_OUTBOUND").count(), 1, "{rules}");
    assert_eq!(rules.matches("--to-ports 4140").count(), 1, "{rules}");
    assert!(rules.contains("--dport 5432 -j RETURN"), "{rules}");
    // --dry-run prints and changes nothing.
    let out = lan
        .run(&ns, &[proxy, "init", "--dry-run", "--proxy-uid", "7"])
        .await;
    assert!(out.stdout.contains("--uid-owner 7"), "{}", out.stdout);
    assert_eq!(save(&lan).await, rules);
    for _ in 0..2 {
        let out = lan.run(&ns, &[proxy, "init", "--remove"]).await;
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
    let after = save(&lan).await;
    assert!(!after.contains("REMORA"), "{after}");
}

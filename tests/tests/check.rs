//! `remora check` as a user runs it, each diagnosis triggered for real: identity directories
//! with expired, expiring, foreign and mismatched certificates; proxies ready and not;
//! control planes that accept the token, refuse it, are not there, or run on a skewed clock
//! (libfaketime); manifests with clashing ports, probes strict mTLS refuses and drains longer
//! than the grace period; a network namespace without rules, with stale rules, with a proxy
//! under the wrong uid, and apps on the wrong addresses; and a cluster on the real API server.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use remora_tests::control::{TestControl, proxy_config, scratch};
use remora_tests::kube::ApiServer;
use remora_tests::netns::{Lan, available, workspace_binary};
use remora_tests::{Pki, TestProxy, config, refused_addr};
use serde_json::json;

/// Runs `remora check ARGS`: (exit code, stdout).
fn check(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(workspace_binary("remora"))
        .arg("check")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("remora check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn assert_finding(out: &str, severity: &str, parts: &[&str]) {
    let found = out
        .lines()
        .any(|l| l.starts_with(&format!("{severity}: ")) && parts.iter().all(|p| l.contains(p)));
    assert!(found, "no `{severity}` line with {parts:?} in:\n{out}");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An identity directory with a leaf for `sa` valid from `from` to `to` (seconds from now),
/// signed by `signer`, with `bundle`'s ca.crt.
fn identity(name: &str, signer: &Pki, bundle: &Pki, from: i64, to: i64) -> std::path::PathBuf {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let now = time::OffsetDateTime::now_utc();
    let key = rcgen::KeyPair::generate().expect("key");
    let id = signer.id("web");
    let chain = signer
        .issuer
        .issue_window(
            Some(&id),
            &id.dns_name(),
            &key,
            now + time::Duration::seconds(from),
            now + time::Duration::seconds(to),
        )
        .expect("leaf");
    std::fs::write(dir.join("tls.crt"), chain).expect("write");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
    std::fs::copy(bundle.dir.join("ca.crt"), dir.join("ca.crt")).expect("copy");
    dir
}

#[test]
fn identity_directories() {
    let pki = Pki::new("cluster.local");
    let other = Pki::new("cluster.local");
    const DAY: i64 = 24 * 3600;

    let good = pki.identity_dir("web");
    let (code, out) = check(&["--identity-dir", s(&good)]);
    assert_eq!(code, 0, "{out}");
    assert_finding(
        &out,
        "ok",
        &["spiffe://cluster.local/ns/default/sa/web", "verifies"],
    );

    let expired = identity("expired", &pki, &pki, -2 * DAY, -DAY);
    let (code, out) = check(&["--identity-dir", s(&expired)]);
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["tls.crt", "expired"]);
    assert!(out.contains("fix: "), "{out}");

    // Ten days of life, two hours left: a warning, not (yet) an error.
    let expiring = identity("expiring", &pki, &pki, -10 * DAY, 2 * 3600);
    let (code, out) = check(&["--identity-dir", s(&expiring)]);
    assert_eq!(code, 0, "{out}");
    assert_finding(&out, "warning", &["expires soon"]);

    let foreign = identity("foreign", &other, &pki, -60, DAY);
    let (code, out) = check(&["--identity-dir", s(&foreign)]);
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["does not verify to ca.crt"]);

    let mismatched = identity("mismatched", &pki, &pki, -60, DAY);
    std::fs::copy(good.join("tls.key"), mismatched.join("tls.key")).expect("copy");
    let (code, out) = check(&["--identity-dir", s(&mismatched)]);
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["key does not match"]);

    let (code, out) = check(&["--identity-dir", "/nonexistent-remora"]);
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["not a complete identity directory"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_and_control_planes() {
    let pki = Pki::new("cluster.local");
    let token = "check-token-0123456789abcdef";
    let id = pki.id("web");
    let cp = TestControl::start(
        "127.0.0.1:0".parse().expect("addr"),
        &pki,
        "",
        &[(token, &id)],
        Duration::from_secs(3600),
    )
    .await;
    let dir = scratch("check-control");
    std::fs::create_dir_all(&dir).expect("dir");
    let (good, bad) = (dir.join("good"), dir.join("bad"));
    std::fs::write(&good, token).expect("token");
    std::fs::write(&bad, "not-the-token-0123456789").expect("token");
    let bundle = pki.dir.join("ca.crt");
    let addr = cp.addr.to_string();
    let ask = move |addr: String, tok: std::path::PathBuf| {
        check(&[
            "--control",
            &addr,
            "--identity",
            "spiffe://cluster.local/ns/default/sa/web",
            "--trust-bundle",
            s(&bundle),
            "--token",
            s(&tok),
        ])
    };
    let blocking = async |addr: String, tok: std::path::PathBuf| {
        let ask = ask.clone();
        tokio::task::spawn_blocking(move || ask(addr, tok))
            .await
            .expect("check")
    };
    let (code, out) = blocking(addr.clone(), good.clone()).await;
    assert_eq!(code, 0, "{out}");
    assert_finding(&out, "ok", &["accepts the token"]);
    let (code, out) = blocking(addr.clone(), bad.clone()).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["refuses the token"]);
    let nowhere = refused_addr().await.to_string();
    let (code, out) = blocking(nowhere, good).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["unreachable"]);

    // A ready proxy, and one that cannot get its certificate (wrong token): not ready, with
    // the proxy's own reason.
    let ready = TestProxy::start(config(refused_addr().await)).await;
    let admin = ready.admin.to_string();
    let (code, out) = tokio::task::spawn_blocking(move || check(&["--proxy", &admin]))
        .await
        .expect("check");
    assert_eq!(code, 0, "{out}");
    assert_finding(&out, "ok", &["ready"]);
    let unready = remora_tests::control::Unready::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "web",
        "not-the-token-0123456789",
    ))
    .await;
    unready.assert_not_ready("wrong token").await;
    let admin = unready.admin.to_string();
    let (code, out) = tokio::task::spawn_blocking(move || check(&["--proxy", &admin]))
        .await
        .expect("check");
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["not ready (HTTP 503)"]);
    unready.stop().await;
    let nowhere = refused_addr().await.to_string();
    let (code, out) = tokio::task::spawn_blocking(move || check(&["--proxy", &nowhere]))
        .await
        .expect("check");
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["unreachable"]);
}

const INJECTED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {remora.io/injected: "0.1.0"}
    spec:
      terminationGracePeriodSeconds: GRACE
      initContainers:
      - name: remora-init
        image: remora-proxy
        args: [init, --skip-inbound-ports, "4191,9090"]
      - name: remora-proxy
        image: remora-proxy
        restartPolicy: Always
        env:
        - {name: REMORA_MTLS, value: MODE}
        - {name: REMORA_DRAIN_TIMEOUT, value: 20s}
      containers:
      - name: web
        image: web
        ports: [{name: http, containerPort: PORT}, {name: metrics, containerPort: 9090}]
        readinessProbe: {httpGet: {path: /healthz, port: http}}
        livenessProbe: {httpGet: {path: PROBE, port: http}}
        startupProbe: {httpGet: {path: /status, port: metrics}}
"#;

fn manifest(name: &str, grace: &str, mode: &str, port: &str, probe: &str) -> String {
    let text = INJECTED
        .replace("GRACE", grace)
        .replace("MODE", mode)
        .replace("PORT", port)
        .replace("PROBE", probe);
    let path = scratch(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn manifests() {
    // (name, grace, mode, app port, liveness path) → exit code, severity, what the line says.
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        i32,
        &'a str,
        &'a [&'a str],
    );
    let cases: &[Case] = &[
        // Fits: probes on the allowed paths or a skipped port, drain under the grace period.
        (
            "m-ok",
            "30",
            "strict",
            "8080",
            "/livez",
            0,
            "ok",
            &["Deployment/web", "injected"],
        ),
        (
            "m-port",
            "30",
            "strict",
            "4143",
            "/livez",
            1,
            "error",
            &["container web", "port 4143 is the proxy's"],
        ),
        (
            "m-probe",
            "30",
            "strict",
            "8080",
            "/alive",
            1,
            "error",
            &["livenessProbe", "/alive", "REMORA_MTLS=strict refuses it"],
        ),
        // Permissive today: a warning about the day it turns strict.
        (
            "m-perm",
            "30",
            "permissive",
            "8080",
            "/alive",
            0,
            "warning",
            &["livenessProbe", "fails once REMORA_MTLS=strict"],
        ),
        (
            "m-drain",
            "10",
            "strict",
            "8080",
            "/livez",
            1,
            "error",
            &[
                "drains for up to 20s",
                "terminationGracePeriodSeconds is 10",
            ],
        ),
    ];
    for (name, grace, mode, port, probe, want_code, severity, parts) in cases {
        let (code, out) = check(&["--manifest", &manifest(name, grace, mode, port, probe)]);
        assert_eq!(code, *want_code, "{name}: {out}");
        assert_finding(&out, severity, parts);
    }

    let plain = scratch("m-plain");
    std::fs::write(
        &plain,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\nspec:\n  containers: [{name: a, image: a}]\n",
    )
    .expect("write");
    let (code, out) = check(&["--manifest", s(&plain)]);
    assert_eq!(code, 0, "{out}");
    assert_finding(&out, "warning", &["Pod/bare", "not injected"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_network_namespace_and_a_skewed_control_plane() {
    if let Err(why) = available() {
        eprintln!("SKIPPED: network namespaces cannot be made here: {why}");
        return;
    }
    let remora = workspace_binary("remora");
    let remora = s(&remora).to_string();
    let proxy = workspace_binary("remora-proxy");
    let proxy = s(&proxy).to_string();
    let mut lan = Lan::new();
    let pod = lan.pod("chk", 2);
    let pod_ip = lan.ip(2);
    let listen = |addr: &str, port: u16| {
        format!(
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{addr}',{port}))\ns.listen()\nprint('ready',flush=True)\ntime.sleep(600)\n"
        )
    };
    // 8080 only on the pod IP (the proxy cannot reach it), 8081 only on loopback.
    let _a = lan
        .spawn_until(
            &pod,
            &[],
            &["python3", "-c", &listen(&pod_ip, 8080)],
            "ready",
        )
        .await;
    let _b = lan
        .spawn_until(
            &pod,
            &[],
            &["python3", "-c", &listen("127.0.0.1", 8081)],
            "ready",
        )
        .await;
    let local = async |lan: &Lan| {
        let out = lan
            .run(
                &pod,
                &[&remora, "check", "--local", "--app-ports", "8080,8081,8082"],
            )
            .await;
        (out.status, out.stdout + &out.stderr)
    };
    let (code, out) = local(&lan).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["IPv4 interception rules", "missing"]);
    assert_finding(
        &out,
        "error",
        &["port 8080", &format!("listens only on {pod_ip}")],
    );
    assert_finding(&out, "warning", &["port 8081", "only on loopback"]);
    assert_finding(&out, "error", &["port 8082", "nothing listens"]);

    // Rules, but no proxy: stale (they send every connection to a closed port).
    let out = lan.run(&pod, &[&proxy, "init"]).await;
    assert_eq!(out.status, 0, "init: {}", out.stderr);
    let (code, out) = local(&lan).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "error",
        &[
            "IPv4 interception rules",
            "redirects to port 4143, where nothing listens",
        ],
    );

    // The proxy under another uid than the rules exempt: its own connections would loop.
    let mut p = lan.spawn(&pod, Some(1000), &[], &[&proxy]);
    lan.wait_ready(&pod, "http://127.0.0.1:4191/ready").await;
    let (code, out) = local(&lan).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(&out, "error", &["exempt uid 2102", "runs as uid 1000"]);
    let _ = p.kill().await;
    let _ = p.wait().await;
    // As the exempted uid: the rules are fine (the app findings remain).
    let _p = lan.spawn(&pod, Some(2102), &[], &[&proxy]);
    lan.wait_ready(&pod, "http://127.0.0.1:4191/ready").await;
    let (_, out) = local(&lan).await;
    assert_finding(
        &out,
        "ok",
        &["IPv4 interception rules", "sending to the running proxy"],
    );

    // Control planes whose clocks run 45 s and 5 min ahead of this one (libfaketime).
    let pki = Pki::new("cluster.local");
    readable(&pki.dir);
    let dir = scratch("check-skew");
    std::fs::create_dir_all(&dir).expect("dir");
    let (eps, tokens, tok) = (dir.join("eps.toml"), dir.join("tokens"), dir.join("token"));
    std::fs::write(&eps, "# no services\n").expect("write");
    let token = "skew-token-0123456789abcdef";
    std::fs::write(&tokens, format!("{token} {}\n", pki.id("web"))).expect("write");
    std::fs::write(&tok, token).expect("write");
    let hub_ip = lan.ip(1);
    let mut children = Vec::new();
    // libfaketime preloaded rather than the `faketime` wrapper: the wrapper forks, so killing
    // it on drop would orphan the control plane (still holding the test's stderr).
    let libfaketime = libfaketime();
    for (port, offset) in [(8086, "+45s"), (8087, "+300s")] {
        children.push(lan.spawn(
            &lan.hub,
            None,
            &[
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
                ("LD_PRELOAD", libfaketime.clone()),
                ("FAKETIME", offset.to_string()),
            ],
            &[
                &remora,
                "control",
                "--addr",
                &format!("{hub_ip}:{port}"),
                "--admin-addr",
                &format!("{hub_ip}:{}", port + 1000),
                "--issuer",
                s(&pki.dir),
                "--endpoints-file",
                s(&eps),
                "--bootstrap-tokens",
                s(&tokens),
            ],
        ));
        lan.wait_ready(&lan.hub, &format!("http://{hub_ip}:{}/ready", port + 1000))
            .await;
    }
    let ask = async |port: u16| {
        let out = lan
            .run(
                &lan.hub,
                &[
                    &remora,
                    "check",
                    "--control",
                    &format!("{hub_ip}:{port}"),
                    "--identity",
                    "spiffe://cluster.local/ns/default/sa/web",
                    "--trust-bundle",
                    s(&pki.dir.join("ca.crt")),
                    "--token",
                    s(&tok),
                ],
            )
            .await;
        (out.status, out.stdout + &out.stderr)
    };
    let (code, out) = ask(8086).await;
    assert_eq!(code, 0, "{out}");
    assert_finding(
        &out,
        "warning",
        &["behind the control plane's", "close to the 60 s"],
    );
    let (code, out) = ask(8087).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "error",
        &["not valid by this clock", "more than the 60 s"],
    );
}

/// libfaketime's library (Debian's `faketime` package puts it under the multiarch dir).
fn libfaketime() -> String {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.to_string_lossy().into_owned(),
        None => panic!("libfaketime.so.1 is not installed; run .ci/setup (package faketime)"),
    }
}

fn readable(path: &Path) {
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(path)
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster() {
    let server = ApiServer::start();
    let kc = server.kubeconfig.to_str().expect("utf-8").to_string();
    let run = {
        let kc = kc.clone();
        move || check(&["--cluster", "--kubeconfig", &kc])
    };
    let (code, out) = tokio::task::spawn_blocking(run.clone())
        .await
        .expect("check");
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "error",
        &["Deployment remora/remora-control", "not installed"],
    );
    assert_finding(
        &out,
        "error",
        &["MutatingWebhookConfiguration remora-inject", "missing"],
    );
    assert_finding(&out, "warning", &["namespaces", "none is labelled"]);

    // Installed (its account's kubeconfig is not needed here), a labelled namespace with a
    // pod the webhook never saw.
    let _ = server.installed_control_plane_kubeconfig();
    server.apply(
        "/api/v1/namespaces",
        "shop",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"remora.io/inject": "enabled"}}}),
    );
    server.apply(
        "/api/v1/namespaces/shop/pods",
        "old",
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "old", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "app"}]}}),
    );
    let (code, out) = tokio::task::spawn_blocking(run.clone())
        .await
        .expect("check");
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "ok",
        &["MutatingWebhookConfiguration remora-inject", "present"],
    );
    assert_finding(
        &out,
        "error",
        &["Deployment remora/remora-control", "no ready replica"],
    );
    assert_finding(
        &out,
        "error",
        &["Pod shop/old", "not injected although shop is labelled"],
    );

    // What the kubelet and the deployment controller would write once the replicas run.
    let (code, body) = server.request(
        "PATCH",
        "/apis/apps/v1/namespaces/remora/deployments/remora-control/status",
        Some("application/merge-patch+json"),
        Some(&json!({"status": {"replicas": 2, "readyReplicas": 2}}).to_string()),
    );
    assert_eq!(code, 200, "{body}");
    server.delete("/api/v1/namespaces/shop/pods/old");
    let (code, out) = tokio::task::spawn_blocking(run).await.expect("check");
    assert_eq!(code, 0, "{out}");
    assert_finding(
        &out,
        "ok",
        &["Deployment remora/remora-control", "2 ready replica(s)"],
    );
}

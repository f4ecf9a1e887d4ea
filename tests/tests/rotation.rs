//! Hot certificate reload: leaf rotation under load (Kubernetes `..data` symlink swaps and
//! in-place writes), every kind of bad certificate refused while the last good one serves, and
//! a full CA rotation — with zero failed requests and no restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use remora_tests::*;

/// A directory in the layout a Kubernetes Secret volume has: `..data` points at a versioned
/// directory, and `tls.crt`, `tls.key`, `ca.crt` are symlinks through `..data`.
struct SecretDir {
    dir: PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(files: (&str, &str, &str)) -> SecretDir {
        let (f, _) = random_file(1);
        let dir = f.with_file_name("secret");
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = SecretDir { dir, version: 0 };
        s.swap(files);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), s.dir.join(name)).unwrap();
        }
        s
    }

    /// What the kubelet does: write a new version, then atomically repoint `..data`.
    fn swap(&mut self, (crt, key, ca): (&str, &str, &str)) {
        self.version += 1;
        let v = format!("..2026_11_24_{:04}", self.version);
        let vdir = self.dir.join(&v);
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("tls.crt"), crt).unwrap();
        std::fs::write(vdir.join("tls.key"), key).unwrap();
        std::fs::write(vdir.join("ca.crt"), ca).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    /// What an editor or `cp` does: rewrite the files in place.
    fn write_in_place(&self, (crt, key, ca): (&str, &str, &str)) {
        std::fs::write(self.dir.join("tls.crt"), crt).unwrap();
        std::fs::write(self.dir.join("tls.key"), key).unwrap();
        std::fs::write(self.dir.join("ca.crt"), ca).unwrap();
    }
}

fn files(l: &remora_certs::ca::Leaf) -> (&str, &str, &str) {
    (&l.chain_pem, &l.key_pem, &l.bundle_pem)
}

async fn counter(p: &TestProxy, name: &str) -> f64 {
    metric(&p.metrics().await, name, &[])
}

/// Waits until `name` on `p` reaches `at_least`.
async fn wait_counter(p: &TestProxy, name: &str, at_least: f64) {
    let admin = p.admin;
    wait_until(name, async || {
        let m = http_get(admin, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        metric(&m, name, &[]) >= at_least
    })
    .await;
}

/// One fresh TLS handshake to `proxy` as a peer would; returns whether the served leaf is the
/// first certificate of `expect`.
async fn served_is(proxy: &TestProxy, client: &Path, expect: &Path) -> bool {
    let c = id_files(client);
    let out = run(
        "python3",
        &[
            py("tls_probe.py").to_str().unwrap(),
            "127.0.0.1",
            &proxy.inbound.port().to_string(),
            "web.default.sa.cluster.local",
            &c.ca,
            &c.crt,
            &c.key,
            expect.to_str().unwrap(),
        ],
    )
    .await;
    let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap_or_default();
    assert_eq!(
        r["ok"], true,
        "handshake failed: {} {}",
        out.stdout, out.stderr
    );
    r["match"] == true
}
async fn mesh(
    pki: &Pki,
    web: &SecretDir,
    client_dir: &SecretDir,
) -> (TestProxy, TestProxy, EchoApp) {
    let app = EchoApp::start().await;
    let mut cfg = config(app.addr);
    cfg.identity_dir = Some(web.dir.clone());
    let server = TestProxy::start(cfg).await;
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(client_dir.dir.clone());
    cfg.destinations = vec![
        format!("web.test:80={}#{}", server.inbound, pki.id("web"))
            .parse()
            .unwrap(),
    ];
    let client = TestProxy::start(cfg).await;
    (server, client, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_rotation_under_load() {
    let pki = Pki::new("cluster.local");
    let mut web = SecretDir::new(files(&pki.leaf("web")));
    let mut cl = SecretDir::new(files(&pki.leaf("client")));
    let (server, client, _app) = mesh(&pki, &web, &cl).await;
    let probe = pki.identity_dir("probe");
    let running = steady_h2load(client.outbound, "web.test:80", 20);
    let (mut s_reloads, mut c_reloads) = (1.0, 1.0);
    for i in 0..20 {
        let (w, c) = (pki.leaf("web"), pki.leaf("client"));
        if i % 2 == 0 {
            web.swap(files(&w));
            cl.swap(files(&c));
        } else {
            web.write_in_place(files(&w));
            cl.write_in_place(files(&c));
        }
        s_reloads += 1.0;
        c_reloads += 1.0;
        wait_counter(&server, "remora_identity_reloads_total", s_reloads).await;
        wait_counter(&client, "remora_identity_reloads_total", c_reloads).await;
        // New handshakes present the new certificate at once.
        assert!(
            served_is(&server, &probe, &web.dir.join("tls.crt")).await,
            "rotation {i}: old certificate served"
        );
    }
    assert_eq!(
        counter(&server, "remora_identity_reload_failures_total").await,
        0.0
    );
    assert_no_failures(
        &tokio::time::timeout(WAIT, running)
            .await
            .expect("load ends")
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_never_replace_a_good_one() {
    let pki = Pki::new("cluster.local");
    let other = Pki::new("cluster.local");
    let good = pki.leaf("web");
    let mut web = SecretDir::new(files(&good));
    let cl = SecretDir::new(files(&pki.leaf("client")));
    let (server, client, _app) = mesh(&pki, &web, &cl).await;
    let good_crt = pki.identity_dir("kept").join("good.crt");
    std::fs::write(&good_crt, &good.chain_pem).unwrap();
    let probe = pki.identity_dir("probe");
    let running = steady_h2load(client.outbound, "web.test:80", 12);

    let key = rcgen::KeyPair::generate().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let id = pki.id("web");
    let window = |from: time::Duration, to: time::Duration| {
        pki.issuer
            .issue_window(Some(&id), &id.dns_name(), &key, now + from, now + to)
            .unwrap()
    };
    let expired = window(time::Duration::hours(-3), time::Duration::hours(-1));
    let future = window(time::Duration::hours(1), time::Duration::hours(3));
    let anonymous = pki
        .issuer
        .issue_window(
            None,
            &id.dns_name(),
            &key,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let k = key.serialize_pem();
    let alien = other.leaf("web");
    let truncated = &good.chain_pem[..good.chain_pem.len() / 3];
    let cases: Vec<(&str, (&str, &str, &str))> = vec![
        (
            "garbage",
            ("this is not a certificate", &good.key_pem, &good.bundle_pem),
        ),
        ("empty", ("", "", "")),
        ("truncated", (truncated, &good.key_pem, &good.bundle_pem)),
        ("expired", (&expired, &k, &good.bundle_pem)),
        ("not yet valid", (&future, &k, &good.bundle_pem)),
        ("key mismatch", (&good.chain_pem, &k, &good.bundle_pem)),
        (
            "unknown root",
            (&alien.chain_pem, &alien.key_pem, &good.bundle_pem),
        ),
        ("no identity", (&anonymous, &k, &good.bundle_pem)),
    ];
    for (n, (name, set)) in cases.into_iter().enumerate() {
        web.swap(set);
        wait_counter(
            &server,
            "remora_identity_reload_failures_total",
            (n + 1) as f64,
        )
        .await;
        assert!(
            served_is(&server, &probe, &good_crt).await,
            "{name}: the good certificate must keep serving"
        );
        assert_eq!(
            http_get(server.admin, "/ready").await.unwrap().0,
            200,
            "{name}: still ready"
        );
    }
    assert_eq!(
        counter(&server, "remora_identity_reloads_total").await,
        1.0,
        "nothing bad was loaded"
    );
    assert_no_failures(
        &tokio::time::timeout(WAIT, running)
            .await
            .expect("load ends")
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_without_restart() {
    let old = Pki::new("cluster.local");
    let new = Pki::new("cluster.local");
    let (w, c) = (old.leaf("web"), old.leaf("client"));
    let mut web = SecretDir::new(files(&w));
    let mut cl = SecretDir::new(files(&c));
    let (server, client, _app) = mesh(&old, &web, &cl).await;
    let running = steady_h2load(client.outbound, "web.test:80", 10);
    let both = format!("{}{}", old.issuer.bundle_pem, new.issuer.bundle_pem);
    // 1. Trust both roots.
    web.swap((&w.chain_pem, &w.key_pem, &both));
    cl.swap((&c.chain_pem, &c.key_pem, &both));
    wait_counter(&server, "remora_identity_reloads_total", 2.0).await;
    wait_counter(&client, "remora_identity_reloads_total", 2.0).await;
    // 2. Leaves from the new CA, both roots still trusted.
    let (w2, c2) = (new.leaf("web"), new.leaf("client"));
    web.swap((&w2.chain_pem, &w2.key_pem, &both));
    cl.swap((&c2.chain_pem, &c2.key_pem, &both));
    wait_counter(&server, "remora_identity_reloads_total", 3.0).await;
    wait_counter(&client, "remora_identity_reloads_total", 3.0).await;
    // 3. The new root only.
    web.swap(files(&w2));
    cl.swap(files(&c2));
    wait_counter(&server, "remora_identity_reloads_total", 4.0).await;
    wait_counter(&client, "remora_identity_reloads_total", 4.0).await;
    // New handshakes: a client of the new CA is served the new leaf; one of the old CA is refused.
    assert!(
        served_is(
            &server,
            &new.identity_dir("probe"),
            &web.dir.join("tls.crt")
        )
        .await
    );
    let old_client = id_files(&old.identity_dir("probe"));
    let out = curl_mtls(
        server.inbound,
        "web.default.sa.cluster.local",
        "/",
        Some(&old_client),
        &old_client.ca,
        &[],
    )
    .await;
    assert_ne!(
        out.status, 0,
        "an old-CA client is no longer trusted: {}",
        out.stdout
    );
    assert_eq!(
        counter(&server, "remora_identity_reload_failures_total").await,
        0.0
    );
    assert_no_failures(
        &tokio::time::timeout(WAIT, running)
            .await
            .expect("load ends")
            .unwrap(),
    );
    let _ = Duration::ZERO;
}

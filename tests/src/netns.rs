//! Network namespaces for interception tests: "pods" on one bridge, each its own namespace
//! with a veth, made (and removed on drop) by the test. Every address lives on an interface
//! inside these namespaces, and no route leads outside them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Output, WAIT};

/// The `remora-proxy` / `remora` binary of this build profile, built first (other packages'
/// binaries are not built for this crate's tests; `CARGO_BIN_EXE_*` exists only inside their
/// package).
pub fn workspace_binary(bin: &str) -> PathBuf {
    // target/<profile>/deps/<test>-… → target/<profile>
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--bin", bin]).current_dir(root);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo build --bin");
    assert!(status.success(), "cargo build --bin {bin} failed");
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// Whether this machine lets the test make namespaces (root, `ip`, iptables). The caller
/// skips loudly when it cannot.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for bin in ["ip", "iptables", "setpriv"] {
        let ok = std::process::Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return Err(format!("{bin} not installed (run .ci/setup)"));
        }
    }
    Ok(())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A bridge in its own namespace (the "node") and pods attached to it on `10.<net>.0.0/24`.
pub struct Lan {
    pub hub: String,
    pub net: u8,
    pods: Vec<String>,
    tag: String,
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// A hub namespace with bridge address `10.<net>.0.1/24`.
    pub fn new() -> Lan {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id());
        // 10.200-249.0.0/24: one per test in this process; other processes get other tags.
        let net = 200 + (std::process::id().wrapping_add(n) % 50) as u8;
        let hub = format!("rmh{tag}");
        sh(&["ip", "netns", "add", &hub]);
        let lan = Lan {
            hub: hub.clone(),
            net,
            pods: Vec::new(),
            tag,
        };
        lan.exec_ok(&hub, &["ip", "link", "set", "lo", "up"]);
        lan.exec_ok(&hub, &["ip", "link", "add", "br0", "type", "bridge"]);
        lan.exec_ok(
            &hub,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.{net}.0.1/24"),
                "dev",
                "br0",
            ],
        );
        lan.exec_ok(&hub, &["ip", "link", "set", "br0", "up"]);
        lan
    }

    /// The address of host `i` on the LAN.
    pub fn ip(&self, i: u8) -> String {
        format!("10.{}.0.{i}", self.net)
    }

    /// A pod namespace with `10.<net>.0.<i>` on eth0 and a default route via the hub.
    pub fn pod(&mut self, name: &str, i: u8) -> String {
        let ns = format!("rm{name}{}", self.tag);
        sh(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        let host_if = format!("v{}{i}", &self.tag[..self.tag.len().min(10)]);
        sh(&[
            "ip", "-n", &self.hub, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        self.exec_ok(
            &self.hub,
            &["ip", "link", "set", &host_if, "master", "br0", "up"],
        );
        self.exec_ok(&ns, &["ip", "link", "set", "lo", "up"]);
        self.exec_ok(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", self.ip(i)),
                "dev",
                "eth0",
            ],
        );
        self.exec_ok(&ns, &["ip", "link", "set", "eth0", "up"]);
        self.exec_ok(&ns, &["ip", "route", "add", "default", "via", &self.ip(1)]);
        ns
    }

    fn exec_ok(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Runs a command to completion inside `ns`.
    pub async fn run(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        crate::run("ip", &all).await
    }

    /// Starts a long-running process inside `ns` (as `uid` when given), killed on drop.
    pub fn spawn(
        &self,
        ns: &str,
        uid: Option<u32>,
        env: &[(&str, String)],
        args: &[&str],
    ) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            let id = uid.to_string();
            cmd.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
        }
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?} in {ns}: {e}"))
    }

    /// [`Lan::spawn`], then waits for the line `ready` on its stdout.
    pub async fn spawn_until(
        &self,
        ns: &str,
        env: &[(&str, String)],
        args: &[&str],
        ready: &str,
    ) -> Child {
        let mut child = self.spawn(ns, None, env, args);
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(WAIT, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.trim() == ready {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "{args:?} in {ns} never printed {ready}"
        );
        child
    }

    /// Waits until `url` answers 200 from inside `ns` (a proxy's or control plane's /ready).
    pub async fn wait_ready(&self, ns: &str, url: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let out = self.run(ns, &["curl", "-sf", "--max-time", "2", url]).await;
            if out.status == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} in {ns} not ready: {}",
                out.stderr
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Default for Lan {
    fn default() -> Self {
        Lan::new()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and with it the peer.
        for ns in self.pods.iter().chain(std::iter::once(&self.hub)) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

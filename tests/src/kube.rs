//! A real Kubernetes API server for tests (`tests/kube/apiserver.sh`: etcd + the upstream
//! apiextensions-apiserver, serving `discovery.k8s.io/v1` EndpointSlices only), and helpers to
//! write EndpointSlices to it with curl and the admin client certificate.
//!
//! A missing script or a server that does not start is a panic, never a skipped test: a test
//! that passes without its API server proves nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

/// One etcd + API server on free loopback ports, in its own temporary directory; stopped and
/// removed on drop.
pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    script: PathBuf,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// `REMORA_APISERVER_SH`, else the copy in this repository (`tests/kube/apiserver.sh`).
fn script() -> PathBuf {
    if let Some(p) = std::env::var_os("REMORA_APISERVER_SH") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/apiserver.sh")
}

/// Three distinct free loopback ports (held together while picking so they differ).
fn free_ports() -> [u16; 3] {
    let l: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    let port = |i: usize| l[i].local_addr().expect("local addr").port();
    [port(0), port(1), port(2)]
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl ApiServer {
    /// Starts a fresh API server (building it first if needed, which takes minutes once per
    /// machine). Panics, naming the cause, if it cannot.
    pub fn start() -> ApiServer {
        let script = script();
        assert!(
            script.exists(),
            "the Kubernetes API server script is missing: {} does not exist. Set REMORA_APISERVER_SH \
             to tests/kube/apiserver.sh, and run `apiserver.sh build` once per machine",
            script.display()
        );
        let mut last_error = String::new();
        // A port picked here can be taken before the server binds it; a new set fixes that.
        for _ in 0..3 {
            let dir = std::env::temp_dir().join(format!(
                "remora-kube-{}-{}",
                std::process::id(),
                NEXT_DIR.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the API server's temp dir");
            let [kube, etcd, peer] = free_ports();
            let out = Command::new("bash")
                .arg(&script)
                .arg("start")
                .arg(&dir)
                .env("KUBE_PORT", kube.to_string())
                .env("ETCD_PORT", etcd.to_string())
                .env("ETCD_PEER_PORT", peer.to_string())
                .output()
                .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
            let server = ApiServer {
                kubeconfig: dir.join("kubeconfig"),
                url: format!("https://127.0.0.1:{kube}"),
                dir,
                script: script.clone(),
            };
            if out.status.success() && server.kubeconfig.exists() {
                return server;
            }
            last_error = format!(
                "{}\n{}\n--- apiserver.log ---\n{}\n--- etcd.log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&server.dir.join("apiserver.log")),
                tail(&server.dir.join("etcd.log")),
            );
            drop(server);
        }
        panic!(
            "the Kubernetes API server did not start ({} start DIR failed 3 times; if it was \
             never built, run `{} build`):\n{last_error}",
            script.display(),
            script.display()
        );
    }

    fn pki(&self, file: &str) -> String {
        self.dir.join("pki").join(file).display().to_string()
    }

    /// One request as the cluster admin: `(HTTP status, body)`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method])
            .args(["--cacert", &self.pki("ca.crt")])
            .args(["--cert", &self.pki("admin.crt")])
            .args(["--key", &self.pki("admin.key")])
            .args(["-w", "\n%{http_code}"]);
        if let Some(ct) = content_type {
            cmd.args(["-H", &format!("Content-Type: {ct}")]);
        }
        if let Some(body) = body {
            cmd.args(["--data-binary", body]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {path} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, body.to_string())
    }

    /// Creates or replaces (server-side apply) EndpointSlice `ns/name` for `service`: IPv4, one
    /// TCP port named `http`, and `(address, ready, terminating)` endpoints.
    pub fn apply_slice(
        &self,
        ns: &str,
        name: &str,
        service: &str,
        port: u16,
        endpoints: &[(&str, bool, bool)],
    ) {
        let body = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints.iter().map(|(addr, ready, terminating)| json!({
                "addresses": [addr],
                "conditions": {"ready": ready, "serving": *ready || *terminating, "terminating": terminating},
            })).collect::<Vec<_>>(),
        });
        // JSON is YAML, so the apply-patch content type takes it as is.
        let (code, text) = self.request(
            "PATCH",
            &format!(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}?fieldManager=remora-tests&force=true"
            ),
            Some("application/apply-patch+yaml"),
            Some(&body.to_string()),
        );
        assert!(
            code == 200 || code == 201,
            "applying EndpointSlice {ns}/{name} failed: HTTP {code}: {text}"
        );
    }

    /// Deletes EndpointSlice `ns/name` (which must exist).
    pub fn delete_slice(&self, ns: &str, name: &str) {
        let (code, text) = self.request(
            "DELETE",
            &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}"),
            None,
            None,
        );
        assert!(
            code == 200 || code == 202,
            "deleting EndpointSlice {ns}/{name} failed: HTTP {code}: {text}"
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let pids: Vec<u32> = ["apiserver.pid", "etcd.pid"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
        // `stop` only signals; wait for the processes to exit before removing their files.
        let running = |pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in pids.iter().filter(|p| running(p)) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

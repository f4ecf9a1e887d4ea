//! A real Kubernetes API server for tests (`tests/kube/cluster.sh`: etcd + upstream
//! kube-apiserver v1.20.2 with RBAC on, core kinds, TokenRequest/TokenReview, and
//! `discovery.k8s.io/v1` EndpointSlices as a CRD), and helpers to write objects to it with curl
//! and the admin client certificate (`system:masters`), or with a ServiceAccount token.
//!
//! No controllers run: a test writes what the endpointslice controller and the kubelet would
//! (slices, pod statuses), and creates the namespaces its objects live in (the helpers that
//! write namespaced objects do that for it).
//!
//! A missing script or a server that does not start is a panic, never a skipped test: a test
//! that passes without its API server proves nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One etcd + API server on free loopback ports, in its own temporary directory; stopped and
/// removed on drop.
pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    script: PathBuf,
    /// Namespaces known to exist (created here or found), so writes do not ask every time.
    namespaces: Mutex<std::collections::HashSet<String>>,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// `REMORA_CLUSTER_SH`, else the copy in this repository (`tests/kube/cluster.sh`).
fn script() -> PathBuf {
    if let Some(p) = std::env::var_os("REMORA_CLUSTER_SH") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/cluster.sh")
}

/// The repository root (for manifests under `deploy/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// `/api/v1` for core, `/apis/<group>/<version>` otherwise.
fn api_prefix(api_version: &str) -> String {
    if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    }
}

/// The plural resource name of `kind`, for the kinds tests write.
fn plural(kind: &str) -> String {
    match kind {
        "Endpoints" => "endpoints".into(),
        k => format!("{}s", k.to_ascii_lowercase()),
    }
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
            "the Kubernetes API server script is missing: {} does not exist. Set REMORA_CLUSTER_SH \
             to tests/kube/cluster.sh, and run `cluster.sh build` once per machine",
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
                namespaces: Mutex::default(),
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
        let auth = [
            "--cert".to_string(),
            self.pki("admin.crt"),
            "--key".to_string(),
            self.pki("admin.key"),
        ];
        self.curl(&auth, method, path, content_type, body)
    }

    /// One request with a bearer `token` (a ServiceAccount's): `(HTTP status, body)`. For
    /// checking what an account may do, as the API server's authorizer sees it.
    pub fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let auth = ["-H".to_string(), format!("Authorization: Bearer {token}")];
        self.curl(&auth, method, path, content_type, body)
    }

    fn curl(
        &self,
        auth: &[String],
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method])
            .args(["--cacert", &self.pki("ca.crt")])
            .args(auth)
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

    /// GETs `path` as the admin; panics naming it unless 200.
    pub fn get(&self, path: &str) -> Value {
        let (code, text) = self.request("GET", path, None, None);
        assert_eq!(code, 200, "GET {path} failed: HTTP {code}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"))
    }

    /// Creates namespace `ns` unless it exists (the API server refuses objects in a namespace
    /// that does not exist, and no controller makes one).
    pub fn create_namespace(&self, ns: &str) {
        if self
            .namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(ns)
        {
            return;
        }
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        let (code, text) = self.request(
            "POST",
            "/api/v1/namespaces",
            Some("application/json"),
            Some(&body.to_string()),
        );
        assert!(
            code == 201 || code == 409,
            "creating namespace {ns} failed: HTTP {code}: {text}"
        );
        self.namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ns.to_string());
    }

    /// Creates or replaces (server-side apply, forced) the object at `path`
    /// (`…/<kind plural>/<name>`). Fields this manager set before and left out now are removed
    /// (how an annotation goes).
    pub fn apply_path(&self, path: &str, body: &Value) {
        let (code, text) = self.request(
            "PATCH",
            &format!("{path}?fieldManager=remora-tests&force=true"),
            Some("application/apply-patch+yaml"),
            Some(&body.to_string()),
        );
        assert!(
            code == 200 || code == 201,
            "applying {path}: HTTP {code}: {text}"
        );
    }

    /// Creates or replaces object `name` in the collection at `path_collection` (e.g.
    /// `/api/v1/namespaces/shop/services`) by server-side apply, creating its namespace first.
    /// `json` is the whole object, with `apiVersion`, `kind` and `metadata.name`.
    pub fn apply(&self, path_collection: &str, name: &str, json: &Value) {
        let in_path = path_collection
            .split_once("/namespaces/")
            .and_then(|(_, rest)| rest.split('/').next());
        if let Some(ns) = in_path.or(json["metadata"]["namespace"].as_str()) {
            self.create_namespace(ns);
        }
        let kind = json["kind"].as_str().unwrap_or("object");
        // JSON is YAML, so the apply-patch content type takes it as is.
        let (code, text) = self.request(
            "PATCH",
            &format!("{path_collection}/{name}?fieldManager=remora-tests&force=true"),
            Some("application/apply-patch+yaml"),
            Some(&json.to_string()),
        );
        assert!(
            code == 200 || code == 201,
            "applying {kind} {name} at {path_collection} failed: HTTP {code}: {text}"
        );
    }

    /// [`ApiServer::apply`] with the collection path worked out from the object's
    /// `apiVersion`, `kind` and `metadata.namespace`.
    pub fn apply_object(&self, json: &Value) {
        let api_version = json["apiVersion"]
            .as_str()
            .unwrap_or_else(|| panic!("object without apiVersion: {json}"));
        let kind = json["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("object without kind: {json}"));
        let name = json["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} without metadata.name: {json}"));
        let ns = json["metadata"]["namespace"].as_str();
        self.apply(&collection(api_version, kind, ns), name, json);
    }

    /// Applies every document of the YAML manifest at `path` (relative to the repository root,
    /// e.g. `deploy/control-plane-rbac.yaml`), in order; returns them as JSON.
    pub fn apply_manifest(&self, path: &str) -> Vec<Value> {
        let docs = manifest(path);
        for doc in &docs {
            self.apply_object(doc);
        }
        docs
    }

    /// Deletes the object at `path` (e.g. `/api/v1/namespaces/shop/serviceaccounts/web`); panics
    /// naming it unless the API server accepted the deletion.
    pub fn delete(&self, path: &str) {
        let (code, text) = self.request("DELETE", path, None, None);
        assert!(
            code == 200 || code == 202,
            "deleting {path} failed: HTTP {code}: {text}"
        );
    }

    /// Sets Pod `ns/name`'s `status` (the `/status` subresource, which only the kubelet writes
    /// in a real cluster), e.g. `{"phase": "Running", "podIP": "10.0.0.7", "conditions": […]}`.
    pub fn set_pod_status(&self, ns: &str, name: &str, status: &Value) {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}/status");
        let (code, text) = self.request(
            "PATCH",
            &path,
            Some("application/merge-patch+json"),
            Some(&json!({ "status": status }).to_string()),
        );
        assert_eq!(
            code, 200,
            "setting the status of Pod {ns}/{name} failed: HTTP {code}: {text}"
        );
    }

    /// Creates ServiceAccount `ns/name` (and its namespace) unless it exists.
    pub fn create_service_account(&self, ns: &str, name: &str) {
        self.apply(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            name,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        );
    }

    /// A token for ServiceAccount `ns/sa` from the API server's TokenRequest (one hour,
    /// `audience`), as the kubelet would mount it. The account must exist.
    pub fn token(&self, ns: &str, sa: &str, audience: &str) -> String {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": 3600},
        });
        let (code, text) = self.request(
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
            Some("application/json"),
            Some(&body.to_string()),
        );
        assert_eq!(
            code, 201,
            "TokenRequest for ServiceAccount {ns}/{sa} failed: HTTP {code}: {text}"
        );
        let answer: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: not JSON ({e}): {text}"));
        answer["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("TokenRequest for {ns}/{sa} has no status.token: {text}"))
            .to_string()
    }

    /// Writes a kubeconfig that reaches this server with bearer `token` (the cluster's CA, no
    /// client certificate), as an in-cluster client would; returns its path.
    pub fn kubeconfig_for_token(&self, token: &str) -> PathBuf {
        let path = self.dir.join(format!(
            "kubeconfig-token-{}",
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: token\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: local\n  context: {{cluster: local, user: token}}\ncurrent-context: local\n",
            self.url,
            self.pki("ca.crt"),
        );
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Applies what `remora install` writes (the control plane's namespace, account, ClusterRole
    /// and the rest) and returns a kubeconfig carrying the control plane account's token, once
    /// its ClusterRole is in force: a control plane started with it has exactly the
    /// permissions an installed one has.
    pub fn installed_control_plane_kubeconfig(&self) -> PathBuf {
        use remora_control_plane::install;
        let ca = remora_certs::ca::new_ca("cluster.local").expect("a CA");
        let text = install::manifests(&install::Settings {
            ca: install::CaFiles {
                ca_crt: ca.root_crt,
                issuer_crt: ca.issuer_crt,
                issuer_key: ca.issuer_key,
            },
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            control_image: "remora:test".into(),
            proxy_image: "remora-proxy:test".into(),
            kube_minor: 20,
            webhook_url: None,
        });
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).expect("remora install writes YAML");
        for doc in docs.iter().filter(|d| !d.is_null()) {
            self.apply_object(doc);
        }
        // The API server accepts tokens for its own audience, as it does an in-cluster client's.
        let token = self.token(
            install::NAMESPACE,
            install::SERVICE,
            "https://kubernetes.default.svc.cluster.local",
        );
        // RBAC is read from an informer: wait until the binding is in force for this account.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .request_as(
                &token,
                "GET",
                "/apis/discovery.k8s.io/v1/endpointslices?limit=1",
                None,
                None,
            )
            .0
            != 200
        {
            assert!(
                Instant::now() < deadline,
                "the installed ClusterRole never came into force for the control plane's account"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kubeconfig_for_token(&token)
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
        self.apply_slice_json(ns, name, &body);
    }

    /// Creates or replaces (server-side apply) EndpointSlice `ns/name` from the whole object
    /// `json` (for fields `apply_slice` does not write: `targetRef`, `hostname`, several ports).
    pub fn apply_slice_json(&self, ns: &str, name: &str, json: &Value) {
        self.apply(
            &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
            name,
            json,
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

/// The collection path of `kind` in `api_version`, namespaced when `ns` is given.
pub fn collection(api_version: &str, kind: &str, ns: Option<&str>) -> String {
    let prefix = api_prefix(api_version);
    match ns {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{}", plural(kind)),
        None => format!("{prefix}/{}", plural(kind)),
    }
}

/// The documents of the YAML manifest at `path` (relative to the repository root), as JSON.
pub fn manifest(path: &str) -> Vec<Value> {
    let file = repo_root().join(path);
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read the manifest {}: {e}", file.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("the manifest {} is not YAML: {e}", file.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
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
        // `stop` waits for its own exit, but a pid file it could not read is not waited on:
        // make sure both processes are gone before removing their files.
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

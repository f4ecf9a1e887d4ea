//! Helpers for control-plane tests: a control plane running in the test's runtime (the same
//! library `remora control` runs), proxies configured against it, apps that say who they are,
//! and log capture.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_control_plane::server::{ControlPlane, Options, Source};
use remora_proxy::Config;
use remora_proxy::{ControlTarget, IdentityMode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Pki, config, http_get, loopback0, random_file};

pub struct TestControl {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub identity: remora_certs::SpiffeId,
    pub endpoints: PathBuf,
    pub registry: Arc<remora_control_plane::registry::Registry>,
    /// The injection webhook's address, when the options turned it on.
    pub webhook: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A scratch file path.
pub fn scratch(name: &str) -> PathBuf {
    let (file, _) = random_file(1);
    file.with_file_name(name)
}

/// Writes `text` to `path` atomically (write then rename), as a config tool would.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// One service for [`endpoints_toml`]: its name and (address, identity) pairs.
pub type ServiceSpec<'a> = (&'a str, Vec<(SocketAddr, Option<String>)>);

/// The file-source TOML for `services`.
pub fn endpoints_toml(services: &[ServiceSpec]) -> String {
    let mut out = String::new();
    for (name, eps) in services {
        out.push_str(&format!("[[service]]\nname = \"{name}\"\nendpoints = [\n"));
        for (addr, id) in eps {
            match id {
                Some(id) => out.push_str(&format!(
                    "  {{ addr = \"{addr}\", identity = \"{id}\" }},\n"
                )),
                None => out.push_str(&format!("  {{ addr = \"{addr}\" }},\n")),
            }
        }
        out.push_str("]\n");
    }
    out
}

impl TestControl {
    /// Starts a control plane on `addr` (port 0 for any) with the file source `endpoints`
    /// (TOML), issuer `pki`, the given bootstrap tokens and certificate lifetime.
    pub async fn start(
        addr: SocketAddr,
        pki: &Pki,
        endpoints: &str,
        tokens: &[(&str, &remora_certs::SpiffeId)],
        lifetime: Duration,
    ) -> TestControl {
        let eps = scratch("endpoints.toml");
        // An empty file is refused (it looks like a write in progress); say "none" on purpose.
        write_atomic(
            &eps,
            if endpoints.is_empty() {
                "# no services\n"
            } else {
                endpoints
            },
        );
        let tok = scratch("tokens");
        let lines: String = tokens.iter().map(|(t, id)| format!("{t} {id}\n")).collect();
        std::fs::write(&tok, lines).expect("tokens");
        Self::start_with(addr, pki, eps, Some(tok), lifetime).await
    }

    /// Starts with an existing endpoints file (a restart after [`TestControl::kill`]).
    pub async fn start_with(
        addr: SocketAddr,
        pki: &Pki,
        endpoints: PathBuf,
        tokens: Option<PathBuf>,
        lifetime: Duration,
    ) -> TestControl {
        Self::start_source(
            addr,
            pki,
            Source::File(endpoints.clone()),
            endpoints,
            tokens,
            lifetime,
        )
        .await
    }

    /// Starts on the file source with tokens checked by TokenReview through `kubeconfig`
    /// (audiences `audiences`) instead of bootstrap tokens.
    pub async fn start_token_review(
        pki: &Pki,
        kubeconfig: &Path,
        audiences: &[&str],
    ) -> TestControl {
        let eps = scratch("endpoints.toml");
        write_atomic(&eps, "# no services\n");
        let mut o = Options::new(pki.dir.clone(), Source::File(eps.clone()));
        o.addr = loopback0();
        o.admin_addr = loopback0();
        o.trust_domain = pki.trust_domain.clone();
        o.token_review = Some(Some(kubeconfig.to_path_buf()));
        o.token_audiences = audiences.iter().map(|a| a.to_string()).collect();
        Self::run(o, eps, true).await
    }

    /// Starts on the Kubernetes source (EndpointSlices from the API server in `kubeconfig`).
    pub async fn start_kube(
        pki: &Pki,
        kubeconfig: &Path,
        tokens: &[(&str, &remora_certs::SpiffeId)],
    ) -> TestControl {
        let tok = scratch("tokens");
        let lines: String = tokens.iter().map(|(t, id)| format!("{t} {id}\n")).collect();
        std::fs::write(&tok, lines).expect("tokens");
        let source = Source::Kubernetes {
            kubeconfig: Some(kubeconfig.to_path_buf()),
            cluster_domain: "cluster.local".into(),
        };
        Self::start_source(
            loopback0(),
            pki,
            source,
            PathBuf::new(),
            Some(tok),
            Duration::from_secs(3600),
        )
        .await
    }

    /// Options for a control plane on loopback with `pki` as its issuer and `source`; change
    /// them, then [`TestControl::start_options`].
    pub fn options(pki: &Pki, source: Source) -> Options {
        let mut o = Options::new(pki.dir.clone(), source);
        o.addr = loopback0();
        o.admin_addr = loopback0();
        o.trust_domain = pki.trust_domain.clone();
        o
    }

    /// Starts with any options (see [`TestControl::options`]); ready when it returns.
    pub async fn start_options(o: Options) -> TestControl {
        Self::run(o, PathBuf::new(), true).await
    }

    /// Starts with any options and returns without waiting for `/ready` (a source that cannot
    /// sync, e.g. forbidden by RBAC).
    pub async fn start_unready(o: Options) -> TestControl {
        Self::run(o, PathBuf::new(), false).await
    }

    async fn start_source(
        addr: SocketAddr,
        pki: &Pki,
        source: Source,
        endpoints: PathBuf,
        tokens: Option<PathBuf>,
        lifetime: Duration,
    ) -> TestControl {
        let mut o = Options::new(pki.dir.clone(), source);
        o.addr = addr;
        o.admin_addr = loopback0();
        o.trust_domain = pki.trust_domain.clone();
        o.bootstrap_tokens = tokens;
        o.cert_lifetime = lifetime;
        Self::run(o, endpoints, true).await
    }

    async fn run(o: Options, endpoints: PathBuf, ready: bool) -> TestControl {
        let cp = ControlPlane::bind(o).await.expect("control plane binds");
        let (addr, admin, identity, registry) =
            (cp.addr(), cp.admin_addr(), cp.identity(), cp.registry());
        let webhook = cp.webhook_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cp.run(async move {
            let _ = rx.await;
        }));
        if ready {
            crate::wait_ready(admin).await;
        }
        TestControl {
            addr,
            admin,
            identity,
            endpoints,
            registry,
            webhook,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn set_endpoints(&self, toml: &str) {
        write_atomic(&self.endpoints, toml);
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .expect("control metrics")
            .1
    }

    /// Stops it abruptly: every connection closes at once, like a killed process.
    pub async fn kill(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(crate::WAIT, t).await;
        }
    }

    pub fn target(&self) -> ControlTarget {
        ControlTarget {
            addr: self.addr.to_string(),
            identity: Some(self.identity.clone()),
        }
    }
}

impl Drop for TestControl {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A proxy config for identity `sa` that gets its certificate and its endpoints from the
/// control plane at `control`, proving itself with `token`.
pub fn proxy_config(
    app: SocketAddr,
    pki: &Pki,
    control: &ControlTarget,
    sa: &str,
    token: &str,
) -> Config {
    proxy_config_for(app, pki, control, &pki.id(sa), token)
}

/// [`proxy_config`] for any identity (another namespace than `default`).
pub fn proxy_config_for(
    app: SocketAddr,
    pki: &Pki,
    control: &ControlTarget,
    id: &remora_certs::SpiffeId,
    token: &str,
) -> Config {
    let (ns, sa) = id.namespace_and_account().unwrap_or(("", "id"));
    let dir = scratch(&format!("ca-only-{ns}-{sa}"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(pki.dir.join("ca.crt"), dir.join("ca.crt")).expect("copy ca.crt");
    let tok = dir.join("token");
    std::fs::write(&tok, token).expect("token");
    let mut cfg = config(app);
    cfg.identity_dir = Some(dir);
    cfg.control = Some(control.clone());
    cfg.identity_mode = IdentityMode::Control {
        id: id.clone(),
        token: tok,
    };
    cfg
}

/// A free port on every one of `ips` (pods of one slice share their port number).
pub fn port_on(ips: &[[u8; 4]]) -> u16 {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind(SocketAddr::from((ips[0], 0))).expect("bind");
        let port = first.local_addr().expect("addr").port();
        let rest: Vec<_> = ips[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind(SocketAddr::from((*ip, port))))
            .collect();
        if rest.iter().all(|r| r.is_ok()) {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A proxy whose identity (from the control plane, with `token`) is `ns/sa`.
pub fn meshed(
    pki: &Pki,
    cp: &TestControl,
    app: SocketAddr,
    ns: &str,
    sa: &str,
    token: &str,
) -> Config {
    let mut cfg = proxy_config(app, pki, &cp.target(), sa, token);
    if let IdentityMode::Control { token, .. } = cfg.identity_mode {
        cfg.identity_mode = IdentityMode::Control {
            id: remora_certs::SpiffeId::workload(&pki.trust_domain, ns, sa).expect("id"),
            token,
        };
    }
    cfg
}

/// The token [`kube_mesh`]'s client proxy proves `shop/client` with.
pub const KUBE_CLIENT_TOKEN: &str = "token-client-0123456789";

/// A control plane on the API server `server` (with the permissions `remora install` gives
/// it) and a proxy for `shop/client` fed by it; `pki` is the mesh's CA.
pub async fn kube_mesh(
    server: &crate::kube::ApiServer,
    pki: &Pki,
) -> (TestControl, crate::TestProxy) {
    let client_id =
        remora_certs::SpiffeId::workload(&pki.trust_domain, "shop", "client").expect("id");
    let cp = TestControl::start_kube(
        pki,
        &server.installed_control_plane_kubeconfig(),
        &[(KUBE_CLIENT_TOKEN, &client_id)],
    )
    .await;
    let proxy = crate::TestProxy::start(meshed(
        pki,
        &cp,
        crate::refused_addr().await,
        "shop",
        "client",
        KUBE_CLIENT_TOKEN,
    ))
    .await;
    (cp, proxy)
}

/// An HTTP/1.1 + HTTP/2 app that answers every request with its `name`.
pub struct NamedApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for NamedApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NamedApp {
    pub async fn start(name: &'static str) -> NamedApp {
        Self::start_on(name, loopback0()).await
    }

    /// On a given address (EndpointSlices give every endpoint the same port, so tests use
    /// 127.0.0.2, 127.0.0.3… with one port).
    pub async fn start_on(name: &'static str, addr: SocketAddr) -> NamedApp {
        let listener = TcpListener::bind(addr).await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            name.as_bytes(),
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        NamedApp { addr, task }
    }
}

/// GET `http://{authority}/` through an outbound proxy; returns (status, body).
pub async fn get_via(proxy: SocketAddr, authority: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(crate::WAIT, s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("response timed out"))??;
    Ok(crate::status_and_body(&buf))
}

/// Everything this test binary logs through `tracing`, for tests that check what a user reads.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap_or_else(|p| p.into_inner())).to_string()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    })
}

/// Installs the capturing logger (call at the start of a test).
pub fn capture_logs() {
    let _ = log_buffer();
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A FAKE Kubernetes API serving only `POST /apis/authentication.k8s.io/v1/tokenreviews`, for
/// answers a real API server cannot be made to give (a user that is no service account, in a
/// test that needs no cluster); the real TokenReview path is tested on kube-apiserver in
/// `tests/kube_identity.rs`. It answers like the real one: the token's user and audiences, or
/// `authenticated: false` with an error. Plain HTTP; [`FakeTokenReview::kubeconfig`] points a
/// kube client at it.
pub struct FakeTokenReview {
    pub kubeconfig: PathBuf,
    pub requests: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for FakeTokenReview {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeTokenReview {
    /// `users`: token → (username, audiences the token was issued for).
    pub async fn start(users: &[(&str, &str, &[&str])]) -> FakeTokenReview {
        use http_body_util::BodyExt;
        let users: Arc<std::collections::HashMap<String, (String, Vec<String>)>> = Arc::new(
            users
                .iter()
                .map(|(t, u, a)| {
                    (
                        t.to_string(),
                        (u.to_string(), a.iter().map(|s| s.to_string()).collect()),
                    )
                })
                .collect(),
        );
        let listener = TcpListener::bind(loopback0()).await.expect("bind fake API");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (users, count) = (users.clone(), count.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (users, count) = (users.clone(), count.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let review: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let (status, out) = if path
                                    != "/apis/authentication.k8s.io/v1/tokenreviews"
                                {
                                    (
                                        404,
                                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": format!("the fake serves only tokenreviews, not {path}")}),
                                    )
                                } else {
                                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    let token = review["spec"]["token"].as_str().unwrap_or("");
                                    let asked: Vec<String> = review["spec"]["audiences"]
                                        .as_array()
                                        .map(|a| {
                                            a.iter()
                                                .filter_map(|v| v.as_str().map(String::from))
                                                .collect()
                                        })
                                        .unwrap_or_default();
                                    let st = match users.get(token) {
                                        Some((user, auds))
                                            if asked.is_empty()
                                                || asked.iter().any(|a| auds.contains(a)) =>
                                        {
                                            serde_json::json!({
                                                "authenticated": true,
                                                "user": {"username": user, "groups": ["system:serviceaccounts"]},
                                                "audiences": if asked.is_empty() { auds.clone() } else { asked.iter().filter(|a| auds.contains(a)).cloned().collect() },
                                            })
                                        }
                                        Some(_) => {
                                            serde_json::json!({"authenticated": false, "error": "token audiences do not match"})
                                        }
                                        None => {
                                            serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
                                        }
                                    };
                                    (
                                        201,
                                        serde_json::json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": review["spec"], "status": st}),
                                    )
                                };
                                let mut rsp =
                                    hyper::Response::new(Full::new(Bytes::from(out.to_string())));
                                *rsp.status_mut() =
                                    hyper::StatusCode::from_u16(status).unwrap_or_default();
                                rsp.headers_mut().insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, Infallible>(rsp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        let kubeconfig = scratch("fake-kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: fake\n  user: {{token: control-plane-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n"
            ),
        )
        .expect("kubeconfig");
        FakeTokenReview {
            kubeconfig,
            requests,
            task,
        }
    }
}

/// A proxy a test expects never to become ready (a bad token, an impostor control plane):
/// started without waiting for `/ready`.
pub struct Unready {
    pub admin: SocketAddr,
    stop: remora_proxy::ShutdownHandle,
    task: JoinHandle<remora_proxy::RunReport>,
}

impl Unready {
    pub async fn start(cfg: Config) -> Unready {
        let proxy = remora_proxy::Proxy::bind(cfg).await.expect("proxy binds");
        Unready {
            admin: proxy.admin_addr().expect("admin listener"),
            stop: proxy.shutdown_handle(),
            task: tokio::spawn(proxy.run(std::future::pending())),
        }
    }

    /// Asserts `/ready` is 503 now.
    pub async fn assert_not_ready(&self, why: &str) {
        let (status, body) = http_get(self.admin, "/ready").await.expect("admin answers");
        assert_eq!(status, 503, "{why}: the proxy became ready: {body}");
    }

    pub async fn stop(self) {
        self.stop.shutdown();
        let _ = tokio::time::timeout(crate::WAIT, self.task).await;
    }
}

/// The answers (app names) of a request loop, with when each came.
pub type Answers = tokio::sync::mpsc::UnboundedReceiver<(std::time::Instant, String)>;

/// How long after `since` the first answer from `app` came.
pub async fn first_answer_from(
    answers: &mut Answers,
    since: std::time::Instant,
    app: &str,
) -> Duration {
    loop {
        let (at, b) = tokio::time::timeout(crate::WAIT, answers.recv())
            .await
            .expect("answers keep coming")
            .expect("load running");
        if b == app && at >= since {
            return at.duration_since(since);
        }
    }
}

/// Waits until `cond` holds for `streak` answers in a row after `since`; returns how long
/// after `since` that streak began.
pub async fn settle(
    answers: &mut Answers,
    since: std::time::Instant,
    streak: usize,
    cond: impl Fn(&str) -> bool,
) -> Duration {
    let mut began: Option<std::time::Instant> = None;
    let mut n = 0;
    loop {
        let (at, b) = tokio::time::timeout(crate::WAIT, answers.recv())
            .await
            .expect("answers keep coming")
            .expect("load running");
        if at < since {
            continue;
        }
        if cond(&b) {
            began.get_or_insert(at);
            n += 1;
            if n >= streak {
                return began.map(|s| s.duration_since(since)).unwrap_or_default();
            }
        } else {
            began = None;
            n = 0;
        }
    }
}

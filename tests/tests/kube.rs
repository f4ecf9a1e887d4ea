//! The Kubernetes source against a real API server (`tests/kube/cluster.sh`): EndpointSlice
//! changes reach the registry within 1 s, and a fresh watch lists the current state. These
//! tests give each Service a port equal to its target port, so the names are the same as the
//! slices' port numbers; Service-port mapping, short names and ClusterIPs are in services.rs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use remora_control_plane::kube;
use remora_control_plane::kube::config::{KubeConfigOptions, Kubeconfig};
use remora_control_plane::registry::Registry;
use remora_control_plane::source::kubernetes::KubeSource;
use remora_tests::kube::ApiServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WEB: &str = "web.shop.svc.cluster.local:8080";
/// What the issue asks of a change: visible to callers within a second.
const CHANGE: Duration = Duration::from_secs(1);
/// The first list after start (client setup, TLS, the list itself).
const INITIAL_SYNC: Duration = Duration::from_secs(30);

async fn client(server: &ApiServer) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(&server.kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig → client config");
    kube::Client::try_from(config).expect("client")
}

/// A running source writing into its own registry; aborted on drop.
struct Running {
    registry: Arc<Registry>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_source(server: &ApiServer) -> Running {
    let registry = Registry::new();
    let (tx, mut synced) = watch::channel(false);
    let source = KubeSource {
        client: client(server).await,
        cluster_domain: "cluster.local".into(),
        trust_domain: "cluster.local".into(),
    };
    let task = tokio::spawn(source.run(registry.clone(), Registry::new(), tx));
    tokio::time::timeout(INITIAL_SYNC, synced.wait_for(|s| *s))
        .await
        .expect("the source did not report its first list within 30 s")
        .expect("synced sender dropped");
    Running { registry, task }
}

fn addrs(r: &Registry, name: &str) -> Option<Vec<String>> {
    r.get(name)
        .map(|set| set.keys().map(|a| a.to_string()).collect())
}

/// Polls every 20 ms until `name` holds `want` (`None`: no such service), failing when `limit`
/// has passed since `since` (taken before the write, so the API round trip counts too).
async fn expect(
    r: &Registry,
    name: &str,
    want: Option<&[&str]>,
    since: Instant,
    limit: Duration,
    step: &str,
) {
    let want: Option<Vec<String>> = want.map(|w| w.iter().map(|a| a.to_string()).collect());
    loop {
        let got = addrs(r, name);
        if got == want {
            eprintln!(
                "{step}: {name} as expected {:?} after the write",
                since.elapsed()
            );
            return;
        }
        assert!(
            since.elapsed() < limit,
            "{step}: {name} is {got:?} {:?} after the write, want {want:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates or replaces Service `ns/name` with one TCP port named `http`, `port` → `port`.
pub fn apply_service(server: &ApiServer, ns: &str, name: &str, port: u16) {
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]},
    });
    let (code, text) = server.request(
        "PATCH",
        &format!("/api/v1/namespaces/{ns}/services/{name}?fieldManager=remora-tests&force=true"),
        Some("application/apply-patch+yaml"),
        Some(&body.to_string()),
    );
    assert!(
        code == 200 || code == 201,
        "applying Service {ns}/{name}: HTTP {code}: {text}"
    );
}

fn delete_service(server: &ApiServer, ns: &str, name: &str) {
    let (code, text) = server.request(
        "DELETE",
        &format!("/api/v1/namespaces/{ns}/services/{name}"),
        None,
        None,
    );
    assert!(
        code == 200 || code == 202,
        "deleting Service {ns}/{name}: HTTP {code}: {text}"
    );
}

/// Namespaces are real objects on this API server: Services need theirs.
fn namespace(server: &ApiServer, ns: &str) {
    let body =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
    let (code, text) = server.request(
        "PATCH",
        &format!("/api/v1/namespaces/{ns}?fieldManager=remora-tests&force=true"),
        Some("application/apply-patch+yaml"),
        Some(&body.to_string()),
    );
    assert!(
        code == 200 || code == 201,
        "applying Namespace {ns}: HTTP {code}: {text}"
    );
}

fn eps<'a>(addrs: &[&'a str]) -> Vec<(&'a str, bool, bool)> {
    addrs.iter().map(|a| (*a, true, false)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_changes_reach_the_registry_within_a_second() {
    let server = ApiServer::start();
    for ns in ["other", "shop"] {
        namespace(&server, ns);
    }
    apply_service(&server, "other", "api", 9000);
    apply_service(&server, "shop", "web", 8080);
    server.apply_slice("other", "api-abc", "api", 9000, &eps(&["10.1.0.1"]));
    const API: &str = "api.other.svc.cluster.local:9000";

    let src = start_source(&server).await;
    let r = &src.registry;
    expect(
        r,
        API,
        Some(&["10.1.0.1:9000"]),
        Instant::now(),
        CHANGE,
        "initial list",
    )
    .await;
    assert_eq!(
        addrs(r, WEB),
        Some(vec![]),
        "no slices for web yet: no endpoints"
    );

    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        8080,
        &eps(&["10.0.0.1", "10.0.0.2"]),
    );
    expect(
        r,
        WEB,
        Some(&["10.0.0.1:8080", "10.0.0.2:8080"]),
        t,
        CHANGE,
        "create",
    )
    .await;

    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        8080,
        &eps(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    );
    let three: &[&str] = &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];
    expect(r, WEB, Some(three), t, CHANGE, "scale to 3").await;

    let t = Instant::now();
    let not_ready = [
        ("10.0.0.1", true, false),
        ("10.0.0.2", false, false),
        ("10.0.0.3", true, false),
    ];
    server.apply_slice("shop", "web-1", "web", 8080, &not_ready);
    expect(
        r,
        WEB,
        Some(&["10.0.0.1:8080", "10.0.0.3:8080"]),
        t,
        CHANGE,
        "one not ready",
    )
    .await;

    // Ready but terminating (as with publishNotReadyAddresses): no new requests.
    let t = Instant::now();
    let terminating = [
        ("10.0.0.1", true, false),
        ("10.0.0.2", false, false),
        ("10.0.0.3", true, true),
    ];
    server.apply_slice("shop", "web-1", "web", 8080, &terminating);
    expect(
        r,
        WEB,
        Some(&["10.0.0.1:8080"]),
        t,
        CHANGE,
        "one terminating",
    )
    .await;

    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-2",
        "web",
        8080,
        &eps(&["10.0.0.4", "10.0.0.5"]),
    );
    let union: &[&str] = &["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.5:8080"];
    expect(r, WEB, Some(union), t, CHANGE, "second slice").await;

    // A watch started now (a restarted control plane) lists the current state.
    let fresh = start_source(&server).await;
    let t = Instant::now();
    expect(&fresh.registry, WEB, Some(union), t, CHANGE, "fresh watch").await;
    expect(
        &fresh.registry,
        API,
        Some(&["10.1.0.1:9000"]),
        t,
        CHANGE,
        "fresh watch",
    )
    .await;
    // Ours, and the API server's own `kubernetes` Service (default/kubernetes:443).
    assert_eq!(fresh.registry.services(), 3);
    assert_eq!(
        addrs(&fresh.registry, "kubernetes.default.svc.cluster.local:443"),
        Some(vec![])
    );

    // No usable endpoint: the service still exists, with nothing to reach.
    let t = Instant::now();
    server.delete_slice("shop", "web-2");
    server.apply_slice("shop", "web-1", "web", 8080, &[("10.0.0.1", false, false)]);
    for reg in [r, &fresh.registry] {
        expect(reg, WEB, Some(&[]), t, CHANGE, "no ready endpoint").await;
    }

    let t = Instant::now();
    server.delete_slice("shop", "web-1");
    server.delete_slice("other", "api-abc");
    for reg in [r, &fresh.registry] {
        expect(reg, WEB, Some(&[]), t, CHANGE, "all slices deleted").await;
        expect(reg, API, Some(&[]), t, CHANGE, "all slices deleted").await;
    }
    let t = Instant::now();
    delete_service(&server, "shop", "web");
    delete_service(&server, "other", "api");
    for reg in [r, &fresh.registry] {
        expect(reg, WEB, None, t, CHANGE, "Services deleted").await;
        expect(reg, API, None, t, CHANGE, "Services deleted").await;
        assert_eq!(reg.services(), 1, "only `kubernetes` is left");
    }
}

/// The whole path: EndpointSlices → `remora control` (Kubernetes source) → `Discovery.Watch`
/// → a proxy's outbound, with a request loop running through every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_changes_reach_a_proxy_with_zero_failed_requests() {
    use remora_tests::control::{
        NamedApp, TestControl, first_answer_from, get_via, proxy_config, settle,
    };
    use remora_tests::{Pki, TestProxy, refused_addr};

    let server = ApiServer::start();
    // One port on several loopback addresses, as a slice's endpoints share their port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut apps = Vec::new();
    for (i, name) in ["a2", "a3", "a4"].into_iter().enumerate() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 2 + i as u8], port));
        apps.push(NamedApp::start_on(name, addr).await);
    }
    let pki = Pki::new("cluster.local");
    let id = pki.id("client");
    let token = "kube-test-token-0123456789";
    let cp = TestControl::start_kube(&pki, &server.kubeconfig, &[(token, &id)]).await;
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        token,
    ))
    .await;
    let outbound = proxy.outbound;
    let web = format!("web.shop.svc.cluster.local:{port}");
    namespace(&server, "shop");
    apply_service(&server, "shop", "web", port);

    // Created: both ready endpoints answer within a second of the write.
    let start = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        port,
        &[("127.0.0.2", true, false), ("127.0.0.3", true, false)],
    );
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            start.elapsed() < CHANGE,
            "after {:?} the proxy reached only {seen:?}",
            start.elapsed()
        );
        if let Ok((200, b)) = get_via(outbound, &web).await {
            seen.insert(b);
        }
    }
    eprintln!(
        "created: both endpoints answered {:?} after the write",
        start.elapsed()
    );

    // From here a request loop runs through every change; requests go only to ready
    // endpoints, so none may fail.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (bodies_tx, mut bodies) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    let load = {
        let web = web.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let begin = Instant::now();
            while !*stop_rx.borrow() && begin.elapsed() < Duration::from_secs(120) && ok < 100_000 {
                match get_via(outbound, &web).await {
                    Ok((200, b)) => {
                        ok += 1;
                        let _ = bodies_tx.send((Instant::now(), b));
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let step = |what: &str, took: Duration| {
        eprintln!("{what}: reached the proxy {took:?} after the write");
        assert!(took < CHANGE, "{what} took {took:?} to reach the proxy");
    };

    // Scaled up: a4 joins.
    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        port,
        &[
            ("127.0.0.2", true, false),
            ("127.0.0.3", true, false),
            ("127.0.0.4", true, false),
        ],
    );
    step("scale to 3", first_answer_from(&mut bodies, t, "a4").await);
    // a2 marked not ready: no new request goes to it.
    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        port,
        &[
            ("127.0.0.2", false, false),
            ("127.0.0.3", true, false),
            ("127.0.0.4", true, false),
        ],
    );
    step(
        "a2 not ready",
        settle(&mut bodies, t, 20, |b| b != "a2").await,
    );
    // a3 terminating: no new request goes to it either.
    let t = Instant::now();
    server.apply_slice(
        "shop",
        "web-1",
        "web",
        port,
        &[
            ("127.0.0.2", false, false),
            ("127.0.0.3", false, true),
            ("127.0.0.4", true, false),
        ],
    );
    step(
        "a3 terminating",
        settle(&mut bodies, t, 20, |b| b == "a4").await,
    );
    // a2 ready again, in a second slice of the same service.
    let t = Instant::now();
    server.apply_slice("shop", "web-2", "web", port, &[("127.0.0.2", true, false)]);
    step(
        "a2 ready in a second slice",
        first_answer_from(&mut bodies, t, "a2").await,
    );

    let _ = stop_tx.send(true);
    let (ok, failed) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("{ok} requests through every change, none failed");

    // Deleted: the name is unknown again within a second (then DNS, which cannot resolve it).
    server.delete_slice("shop", "web-1");
    server.delete_slice("shop", "web-2");
    let t = Instant::now();
    delete_service(&server, "shop", "web");
    loop {
        assert!(
            t.elapsed() < CHANGE,
            "the deletion did not reach the proxy within {CHANGE:?}"
        );
        if let Ok((503, b)) = get_via(outbound, &web).await
            && b.contains("DNS lookup")
        {
            break;
        }
    }
    eprintln!(
        "deleted: the proxy forgot the service {:?} after the write",
        t.elapsed()
    );
    drop(cp);
}

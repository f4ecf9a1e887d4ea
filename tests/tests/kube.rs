//! The Kubernetes source against a real API server (`shared/kube/apiserver.sh`): EndpointSlice
//! changes reach the registry within 1 s, and a fresh watch lists the current state.

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
    let task = tokio::spawn(source.run(registry.clone(), tx));
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

fn eps<'a>(addrs: &[&'a str]) -> Vec<(&'a str, bool, bool)> {
    addrs.iter().map(|a| (*a, true, false)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_changes_reach_the_registry_within_a_second() {
    let server = ApiServer::start();
    // Any namespace name works: the API server has no Namespace objects to check against.
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
    assert_eq!(addrs(r, WEB), None, "no slices for web yet");

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
    assert_eq!(fresh.registry.services(), 2);

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
        expect(reg, WEB, None, t, CHANGE, "all slices deleted").await;
        expect(reg, API, None, t, CHANGE, "all slices deleted").await;
        assert_eq!(reg.services(), 0);
    }
}

//! Zone-aware routing, end to end: the control plane tells a proxy its zone (the zone of the
//! endpoints at the address the proxy connects from: 127.0.0.1 here), the proxy keeps
//! traffic in its zone while the local endpoints are healthy, spills over to the other zone
//! when they slow down, comes back when they recover, and follows a live edit of the zones,
//! all under h2load with no failed request. From the file source, and from EndpointSlices
//! (`zone`, `hints.forZones`) on a real kube-apiserver.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::*;
use remora_tests::kube::ApiServer;
use remora_tests::*;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const TOKEN: &str = "client-token-0123456789";

/// The two tests measure shares of traffic under load on a 2-core machine; run side by side,
/// each one's API server and h2load would be the other's scheduling noise.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const DAY: Duration = Duration::from_secs(24 * 3600);

/// An HTTP/1.1 + HTTP/2 app that answers after an adjustable delay and counts its requests.
struct ZoneApp {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ZoneApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ZoneApp {
    async fn start(ip: [u8; 4], delay_ms: u64) -> ZoneApp {
        Self::start_on(SocketAddr::from((ip, 0)), delay_ms).await
    }

    async fn start_on(addr: SocketAddr, delay_ms: u64) -> ZoneApp {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let delay = Arc::new(AtomicU64::new(delay_ms));
        let (h, d) = (hits.clone(), delay.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // Without it, Nagle's algorithm holds a small second write until the proxy's
                // delayed ACK (40 ms on Linux): an instant app would look slower than the far
                // zone, and the test would measure TCP, not the balancer.
                let _ = tcp.set_nodelay(true);
                let (h, d) = (h.clone(), d.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let ms = d.load(Ordering::Relaxed);
                        async move {
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        ZoneApp {
            addr,
            hits,
            delay_ms: delay,
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// The file-source TOML of `web.test:80` with each app in the zone given.
fn web(apps: &[(&ZoneApp, &str)]) -> String {
    let eps: Vec<String> = apps
        .iter()
        .map(|(a, z)| format!("  {{ addr = \"{}\", zone = \"{z}\" }},", a.addr))
        .collect();
    format!(
        "[[service]]\nname = \"web.test:80\"\nendpoints = [\n{}\n]\n",
        eps.join("\n")
    )
}

/// `h2load -n N` (2 connections, 1 stream each: a steady trickle, not a flood) through
/// `proxy` to `web.test:80`; returns how many answers were 2xx.
async fn h2load(proxy: SocketAddr, n: u32) -> u32 {
    h2load_to(proxy, "web.test:80", n).await
}

async fn h2load_to(proxy: SocketAddr, authority: &str, n: u32) -> u32 {
    let authority = format!(":authority: {authority}");
    let url = format!("http://{proxy}/");
    let n = n.to_string();
    let out = run(
        "h2load",
        &["-n", &n, "-c", "2", "-m", "1", "-H", &authority, &url],
    )
    .await;
    assert_eq!(out.status, 0, "h2load: {}", out.stderr);
    out.stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no status codes in: {}", out.stdout))
}

/// Requests the apps got since `before`.
fn since(apps: &[&ZoneApp], before: &[u64]) -> Vec<u64> {
    apps.iter().zip(before).map(|(a, b)| a.hits() - b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_stays_in_the_callers_zone_spills_when_it_slows_and_follows_live_edits() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new("cluster.local");
    // Zone a on 127.0.0.1 (where the client proxy connects from), zone b on 127.0.0.2 behind
    // a 10 ms "cross-zone hop" (far, so that scheduling hiccups on this busy machine do not read as zone a slowing down).
    let a1 = ZoneApp::start([127, 0, 0, 1], 0).await;
    let a2 = ZoneApp::start([127, 0, 0, 1], 0).await;
    let b1 = ZoneApp::start([127, 0, 0, 2], 10).await;
    let b2 = ZoneApp::start([127, 0, 0, 2], 10).await;
    let apps = [&a1, &a2, &b1, &b2];
    let zones = [(&a1, "a"), (&a2, "a"), (&b1, "b"), (&b2, "b")];
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), &pki, &web(&zones), &[(TOKEN, &client_id)], DAY).await;
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;

    // Healthy: the first answers teach the balancer the latencies, then zone a keeps ≥ 95 %.
    assert_eq!(h2load(proxy.outbound, 200).await, 200);
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 2_000).await, 2_000);
    let got = since(&apps, &before);
    let local = got[0] + got[1];
    assert!(
        local * 100 >= 95 * 2_000,
        "zone a got {local} of 2000 while healthy: {got:?}"
    );

    // Zone a slows to 100 ms: most traffic moves to zone b (zone a is still tried now and
    // then, to see whether it recovered).
    a1.delay_ms.store(100, Ordering::Relaxed);
    a2.delay_ms.store(100, Ordering::Relaxed);
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 1_000).await, 1_000);
    let got = since(&apps, &before);
    let remote = got[2] + got[3];
    eprintln!("zone a slow: {got:?}");
    assert!(
        remote * 100 >= 90 * 1_000,
        "zone b got only {remote} of 1000 while zone a was slow: {got:?}"
    );

    // Zone a recovers: traffic comes back once the balancer has tried it again.
    a1.delay_ms.store(0, Ordering::Relaxed);
    a2.delay_ms.store(0, Ordering::Relaxed);
    wait_until("traffic back in zone a", async || {
        let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
        assert_eq!(h2load(proxy.outbound, 500).await, 500);
        let got = since(&apps, &before);
        (got[0] + got[1]) * 100 >= 95 * 500
    })
    .await;

    // A live edit puts b1 in zone a (as fast as the others there): it joins the local set,
    // under load, with no failure.
    let load = {
        let outbound = proxy.outbound;
        tokio::spawn(async move { h2load(outbound, 10_000).await })
    };
    b1.delay_ms.store(0, Ordering::Relaxed);
    cp.set_endpoints(&web(&[(&a1, "a"), (&a2, "a"), (&b1, "a"), (&b2, "b")]));
    wait_until("b1 counted as zone a", async || {
        let before = b1.hits();
        tokio::time::sleep(Duration::from_millis(200)).await;
        b1.hits() - before > 20
    })
    .await;
    assert_eq!(load.await.expect("h2load"), 10_000, "no request failed");
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 2_000).await, 2_000);
    let got = since(&apps, &before);
    assert!(
        got[3] * 100 <= 5 * 2_000,
        "b2 (the only remote one now) got {}: {got:?}",
        got[3]
    );
    // (That b1 takes local traffic is what the wait above saw.)
    proxy.stop().await;
}

/// EndpointSlice `shop/name` of Service `svc` on `port`: ready endpoints `(ip, zone, hints)`.
fn slice(server: &ApiServer, name: &str, svc: &str, port: u16, eps: &[(&str, &str, &[&str])]) {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, zone, hints)| {
            let mut e = json!({"addresses": [ip], "zone": zone,
                "conditions": {"ready": true, "serving": true, "terminating": false}});
            if !hints.is_empty() {
                e["hints"] = json!({"forZones": hints.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()});
            }
            e
        })
        .collect();
    server.apply_path(
        &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}"),
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints,
        }),
    );
}

fn service(server: &ApiServer, name: &str, port: u16) {
    server.apply_path(
        &format!("/api/v1/namespaces/shop/services/{name}"),
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port,
                                    "protocol": "TCP"}]}}),
    );
}

/// From Kubernetes: the client proxy's Pod (127.0.0.1, selected by no Service) runs on a node
/// labelled zone a, so the control plane tells it "zone a"; `web`'s endpoints carry zones,
/// then topology hints that assign a zone-b endpoint to zone a, and the proxy follows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_zones_and_hints_steer_traffic_on_a_real_api_server() {
    let _one = ONE_AT_A_TIME.lock().await;
    capture_logs();
    let server = ApiServer::start();
    server.create_namespace("shop");
    let port = port_on(&[
        [127, 0, 0, 3],
        [127, 0, 0, 4],
        [127, 0, 0, 5],
        [127, 0, 0, 6],
    ]);
    let at = |last: u8| SocketAddr::from(([127, 0, 0, last], port));
    // Two endpoints in each zone (one alone would have no same-zone alternative during a
    // scheduling hiccup on this busy machine, and spill for it).
    let a3 = ZoneApp::start_on(at(3), 0).await;
    let a6 = ZoneApp::start_on(at(6), 0).await;
    // Zone b 10 ms away: a scheduling hiccup of a few milliseconds here (an API server and an
    // etcd share the two cores) must not look like zone a slowing down.
    let b4 = ZoneApp::start_on(at(4), 10).await;
    let b5 = ZoneApp::start_on(at(5), 10).await;
    let apps = [&a3, &a6, &b4, &b5];
    // The client is a Pod no Service selects, on a node in zone a: the control plane tells its
    // proxy "zone a" from the Pod's node (what the kubelet and the scheduler would write).
    server.apply_path(
        "/api/v1/nodes/node-a",
        &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "a"}}}),
    );
    server.create_service_account("shop", "client");
    server.apply(
        "/api/v1/namespaces/shop/pods",
        "client-0",
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "client-0", "namespace": "shop"},
            "spec": {"serviceAccountName": "client", "nodeName": "node-a",
                     "containers": [{"name": "app", "image": "app"}]},
        }),
    );
    server.set_pod_status(
        "shop",
        "client-0",
        &json!({"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}),
    );
    service(&server, "web", port);
    slice(
        &server,
        "web-1",
        "web",
        port,
        &[
            ("127.0.0.3", "a", &[]),
            ("127.0.0.6", "a", &[]),
            ("127.0.0.4", "b", &[]),
            ("127.0.0.5", "b", &[]),
        ],
    );
    let pki = Pki::new("cluster.local");
    let (_cp, proxy) = remora_tests::control::kube_mesh(&server, &pki).await;
    let web = "web.shop.svc.cluster.local:80";
    assert_eq!(h2load_to(proxy.outbound, web, 200).await, 200);
    assert!(
        captured_logs().contains("this proxy is in zone a"),
        "the proxy learned its zone from its Pod's node"
    );
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load_to(proxy.outbound, web, 2_000).await, 2_000);
    let got = since(&apps, &before);
    let local = got[0] + got[1];
    assert!(
        local * 100 >= 95 * 2_000,
        "the zone-a endpoints got {local} of 2000: {got:?}"
    );

    // Topology hints assign 127.0.0.4 (zone b) to zone a: it becomes local, 127.0.0.5 stays
    // remote. No request fails while the slice changes.
    b4.delay_ms.store(0, Ordering::Relaxed);
    let load = {
        let outbound = proxy.outbound;
        tokio::spawn(async move { h2load_to(outbound, web, 5_000).await })
    };
    slice(
        &server,
        "web-1",
        "web",
        port,
        &[
            ("127.0.0.3", "a", &["a"]),
            ("127.0.0.6", "a", &["a"]),
            ("127.0.0.4", "b", &["a"]),
            ("127.0.0.5", "b", &["b"]),
        ],
    );
    wait_until("127.0.0.4 serving zone a", async || {
        let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
        assert_eq!(h2load_to(proxy.outbound, web, 500).await, 500);
        let got = since(&apps, &before);
        got[2] > 0 && got[3] * 100 <= 5 * 500
    })
    .await;
    assert_eq!(load.await.expect("h2load"), 5_000, "no request failed");
    proxy.stop().await;
}

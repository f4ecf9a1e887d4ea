//! Kubernetes as users see it, on a real kube-apiserver (`tests/kube/cluster.sh`): Services with
//! named target ports, the short names a pod's search path expands, ClusterIP:port, headless
//! StatefulSet per-pod names over mTLS, ExternalName, and opaque `appProtocol` ports — each
//! reached through real proxies fed by `remora control` watching the API server with the
//! permissions `remora install` gives it (its ServiceAccount token, its ClusterRole).
//!
//! No controllers run on the test server, so the test writes what the endpointslice controller
//! and the kubelet would (EndpointSlices, Pods). "Pods" are processes on loopback addresses
//! 127.0.0.x, each address standing for one pod IP.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use remora_certs::SpiffeId;
use remora_proxy::MtlsMode;
use remora_tests::control::{
    Answers, NamedApp, TestControl, first_answer_from, get_via, meshed, port_on, settle,
};
use remora_tests::kube::ApiServer;
use remora_tests::{Pki, TestProxy, refused_addr, tcp_echo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A change must be visible to callers within this long after the API write.
const CHANGE: Duration = Duration::from_secs(2);

fn delete(server: &ApiServer, path: &str) {
    let (code, text) = server.request("DELETE", path, None, None);
    assert!(
        code == 200 || code == 202,
        "deleting {path}: HTTP {code}: {text}"
    );
}

fn namespace(server: &ApiServer, ns: &str) {
    server.apply_path(
        &format!("/api/v1/namespaces/{ns}"),
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    );
}

/// Service `shop/name` with `spec` (ports, type, clusterIP…); returns the stored object.
fn service(server: &ApiServer, name: &str, spec: Value) -> Value {
    let path = format!("/api/v1/namespaces/shop/services/{name}");
    server.apply_path(
        &path,
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
    );
    let (code, text) = server.request("GET", &path, None, None);
    assert_eq!(code, 200, "GET {path}: {text}");
    serde_json::from_str(&text).expect("Service JSON")
}

/// EndpointSlice `shop/name` of `svc`: `ports` are `(name, number)`, `endpoints` JSON objects.
fn slice(server: &ApiServer, name: &str, svc: &str, ports: &[(&str, u16)], endpoints: Vec<Value>) {
    server.apply_path(
        &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}"),
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
                .collect::<Vec<_>>(),
            "endpoints": endpoints,
        }),
    );
}

fn ep(ip: &str, ready: bool) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false}})
}

/// An endpoint that is Pod `pod` (for its identity) with DNS hostname `pod`.
fn pod_ep(ip: &str, pod: &str) -> Value {
    json!({"addresses": [ip], "hostname": pod, "conditions": {"ready": true},
           "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}})
}

/// Pod `shop/name` running as service account `sa` (what gives its endpoints an identity).
fn pod(server: &ApiServer, name: &str, sa: &str) {
    server.apply_path(
        &format!("/api/v1/namespaces/shop/pods/{name}"),
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
                "spec": {"serviceAccountName": sa,
                         "containers": [{"name": "app", "image": "example.org/app:1"}]}}),
    );
}

/// Requests `authority` through `proxy` until the answers (app names) cover `want`, within
/// `CHANGE` of `since`.
async fn reaches(proxy: SocketAddr, authority: &str, want: &[&str], since: Instant, what: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut seen = BTreeSet::new();
    let mut last = None;
    while !want.is_subset(&seen) {
        assert!(
            since.elapsed() < CHANGE,
            "{what}: after {:?} {authority} reached {seen:?} (last answer {last:?}), want {want:?}",
            since.elapsed()
        );
        match get_via(proxy, authority).await {
            Ok((200, b)) => {
                assert!(
                    want.contains(&b),
                    "{what}: {authority} answered from {b}, not one of {want:?}"
                );
                seen.insert(b);
            }
            other => last = Some(other),
        }
    }
    eprintln!(
        "{what}: {authority} reached {want:?} {:?} after the write",
        since.elapsed()
    );
}

/// Requests `authority` until the proxy says no discovery source knows it (it went to DNS,
/// which cannot resolve cluster names on this machine).
async fn goes_to_dns(proxy: SocketAddr, authority: &str, since: Instant, what: &str) {
    loop {
        let r = get_via(proxy, authority).await;
        if let Ok((503, b)) = &r
            && b.contains("DNS lookup")
        {
            eprintln!(
                "{what}: {authority} went to DNS {:?} after the write",
                since.elapsed()
            );
            return;
        }
        assert!(
            since.elapsed() < CHANGE,
            "{what}: {authority} still answers {r:?} {:?} after the write",
            since.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_reached_by_every_name_an_app_uses_with_zero_failed_requests() {
    let server = ApiServer::start();
    for ns in ["shop", "other"] {
        namespace(&server, ns);
    }
    // Named targetPort `http`: 8080-like p1 on the a-pods, p2 on the b-pods.
    let a_ips = [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 5]];
    let b_ips = [[127, 0, 0, 4], [127, 0, 0, 6]];
    let (p1, p2) = (port_on(&a_ips), port_on(&b_ips));
    let at = |ip: [u8; 4], p: u16| SocketAddr::from((ip, p));
    let a1 = NamedApp::start_on("a1", at(a_ips[0], p1)).await;
    let a2 = NamedApp::start_on("a2", at(a_ips[1], p1)).await;
    let _a5 = NamedApp::start_on("a5", at(a_ips[2], p1)).await;
    let _b3 = NamedApp::start_on("b3", at(b_ips[0], p2)).await;
    let _b4 = NamedApp::start_on("b4", at(b_ips[1], p2)).await;
    let direct = NamedApp::start_on("direct", "127.0.0.1:0".parse().expect("addr")).await;

    let pki = Pki::new("cluster.local");
    let (shop_id, other_id) = (
        SpiffeId::workload("cluster.local", "shop", "client").expect("id"),
        SpiffeId::workload("cluster.local", "other", "client").expect("id"),
    );
    let cp = TestControl::start_kube(
        &pki,
        // The permissions `remora install` gives the control plane, and no more.
        &server.installed_control_plane_kubeconfig(),
        &[
            ("token-shop-0123456789", &shop_id),
            ("token-other-0123456789", &other_id),
        ],
    )
    .await;
    let app = refused_addr().await;
    let shop = TestProxy::start(meshed(
        &pki,
        &cp,
        app,
        "shop",
        "client",
        "token-shop-0123456789",
    ))
    .await;
    let other = TestProxy::start(meshed(
        &pki,
        &cp,
        app,
        "other",
        "client",
        "token-other-0123456789",
    ))
    .await;
    let (shop, other) = (shop.outbound, other.outbound);

    let t = Instant::now();
    let svc = service(
        &server,
        "web",
        json!({"ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}),
    );
    slice(
        &server,
        "web-a",
        "web",
        &[("http", p1)],
        vec![ep("127.0.0.2", true), ep("127.0.0.3", true)],
    );
    slice(
        &server,
        "web-b",
        "web",
        &[("http", p2)],
        vec![ep("127.0.0.4", true)],
    );
    let all = ["a1", "a2", "b3"];
    reaches(shop, "web:80", &all, t, "short name, same namespace").await;
    let t = Instant::now();
    reaches(
        other,
        "web.shop:80",
        &all,
        t,
        "<svc>.<ns> from another namespace",
    )
    .await;
    reaches(other, "web.shop.svc:80", &all, t, "<svc>.<ns>.svc").await;
    reaches(other, "web.shop.svc.cluster.local:80", &all, t, "full name").await;
    // From another namespace the short name is not this Service (it goes to DNS).
    goes_to_dns(
        other,
        "web:80",
        Instant::now(),
        "short name, other namespace",
    )
    .await;
    // The ClusterIP: looked up by address (Discovery.WatchAddr), balanced like the name.
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .expect("the API server assigned a ClusterIP");
    assert!(cluster_ip.starts_with("198.18."), "{cluster_ip}");
    let by_ip = format!("{cluster_ip}:80");
    reaches(shop, &by_ip, &all, Instant::now(), "ClusterIP:80").await;
    // An ip:port that is no Service's passes through to that address.
    let direct_addr = direct.addr.to_string();
    assert_eq!(
        get_via(shop, &direct_addr).await.ok(),
        Some((200, "direct".into()))
    );

    // A request loop through every change below; requests go only to ready endpoints.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    let load = {
        let names = [
            (shop, "web:80".to_string()),
            (other, "web.shop:80".into()),
            (shop, by_ip.clone()),
        ];
        tokio::spawn(async move {
            let (mut ok, mut failed, mut i) = (0u32, Vec::new(), 0usize);
            let begin = Instant::now();
            while !*stop_rx.borrow() && begin.elapsed() < Duration::from_secs(120) && ok < 100_000 {
                let (proxy, name) = &names[i % names.len()];
                i += 1;
                match get_via(*proxy, name).await {
                    Ok((200, b)) => {
                        ok += 1;
                        let _ = seen_tx.send((Instant::now(), b));
                    }
                    other => failed.push(format!("{name}: {other:?}")),
                }
            }
            (ok, failed)
        })
    };
    // Both assert the change reached callers within CHANGE.
    async fn settled(seen: &mut Answers, since: Instant, what: &str, cond: impl Fn(&str) -> bool) {
        let took = settle(seen, since, 30, cond).await;
        eprintln!("{what}: settled {took:?} after the write");
        assert!(took < CHANGE, "{what} took {took:?}");
    }
    async fn first_from(seen: &mut Answers, since: Instant, app: &str) {
        let took = first_answer_from(seen, since, app).await;
        eprintln!("{app} answered {took:?} after the write");
        assert!(took < CHANGE, "{app} took {took:?} to answer");
    }
    // Scaled: b4 joins the b-pods.
    let t = Instant::now();
    slice(
        &server,
        "web-b",
        "web",
        &[("http", p2)],
        vec![ep("127.0.0.4", true), ep("127.0.0.6", true)],
    );
    first_from(&mut seen, t, "b4").await;
    // Readiness flip: a1 not ready (no new request), then ready again.
    let t = Instant::now();
    slice(
        &server,
        "web-a",
        "web",
        &[("http", p1)],
        vec![ep("127.0.0.2", false), ep("127.0.0.3", true)],
    );
    settled(&mut seen, t, "a1 not ready", |b| b != "a1").await;
    let t = Instant::now();
    slice(
        &server,
        "web-a",
        "web",
        &[("http", p1)],
        vec![ep("127.0.0.2", true), ep("127.0.0.3", true)],
    );
    first_from(&mut seen, t, "a1").await;
    // A pod replaced: a2 goes (not ready, then gone, then its process stops), a5 comes.
    let t = Instant::now();
    slice(
        &server,
        "web-a",
        "web",
        &[("http", p1)],
        vec![ep("127.0.0.2", true), ep("127.0.0.3", false)],
    );
    settled(&mut seen, t, "a2 terminating", |b| b != "a2").await;
    slice(
        &server,
        "web-a",
        "web",
        &[("http", p1)],
        vec![ep("127.0.0.2", true), ep("127.0.0.5", true)],
    );
    settled(&mut seen, t, "a2 replaced by a5", |b| b != "a2").await;
    first_from(&mut seen, t, "a5").await;
    drop(a2);
    let _ = stop_tx.send(true);
    let (ok, failed) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("{ok} requests through scaling, readiness flips and a pod replaced; none failed");
    drop(a1);

    // The Service port renumbered: the new port answers, the old one is no Service any more.
    let t = Instant::now();
    service(
        &server,
        "web",
        json!({"ports": [{"name": "http", "port": 81, "targetPort": "http", "protocol": "TCP"}]}),
    );
    reaches(shop, "web:81", &["a5", "b3", "b4"], t, "port renumbered").await;
    goes_to_dns(shop, "web:80", t, "old port").await;
    // Deleted: callers get the DNS path again.
    let t = Instant::now();
    delete(&server, "/api/v1/namespaces/shop/services/web");
    goes_to_dns(shop, "web:81", t, "Service deleted").await;
    goes_to_dns(other, "web.shop.svc.cluster.local:81", t, "Service deleted").await;
    drop(cp);
}

/// Seed 002's Cassandra peers: a headless Service's per-pod names reach exactly that pod, over
/// mTLS with the identity of that pod's service account (the pods' proxies refuse plaintext).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_pods_are_reached_one_by_one_over_mtls_and_headless_names_balance() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let pki = Pki::new("cluster.local");
    let client_id = SpiffeId::workload("cluster.local", "shop", "client").expect("id");
    let db_id = SpiffeId::workload("cluster.local", "shop", "db").expect("id");
    let cp = TestControl::start_kube(
        &pki,
        // The permissions `remora install` gives the control plane, and no more.
        &server.installed_control_plane_kubeconfig(),
        &[
            ("token-client-0123456789", &client_id),
            ("token-db-0123456789", &db_id),
        ],
    )
    .await;
    // Two "pods", each an app behind its own strict-mTLS proxy on its pod IP.
    let ips = [[127, 0, 0, 10], [127, 0, 0, 11]];
    let port = port_on(&ips);
    let mut pods = Vec::new();
    for (i, name) in ["db-0", "db-1"].into_iter().enumerate() {
        let app = NamedApp::start_on(name, "127.0.0.1:0".parse().expect("addr")).await;
        let mut cfg = meshed(&pki, &cp, app.addr, "shop", "db", "token-db-0123456789");
        cfg.inbound_addr = SocketAddr::from((ips[i], port));
        cfg.mtls = MtlsMode::Strict;
        pods.push((app, TestProxy::start(cfg).await));
        pod(&server, name, "db");
    }
    let client = TestProxy::start(meshed(
        &pki,
        &cp,
        refused_addr().await,
        "shop",
        "client",
        "token-client-0123456789",
    ))
    .await;
    let t = Instant::now();
    let svc = service(
        &server,
        "db",
        json!({"clusterIP": "None",
               "ports": [{"name": "cql", "port": 9042, "targetPort": port, "protocol": "TCP"}]}),
    );
    assert_eq!(svc["spec"]["clusterIP"], "None");
    slice(
        &server,
        "db-x",
        "db",
        &[("cql", port)],
        vec![pod_ep("127.0.0.10", "db-0"), pod_ep("127.0.0.11", "db-1")],
    );
    // The service name balances over both; each per-pod name reaches its pod only.
    reaches(
        client.outbound,
        "db:9042",
        &["db-0", "db-1"],
        t,
        "headless service name",
    )
    .await;
    for pod in ["db-0", "db-1"] {
        for name in [
            format!("{pod}.db:9042"),
            format!("{pod}.db.shop.svc.cluster.local:9042"),
        ] {
            for _ in 0..20 {
                assert_eq!(
                    get_via(client.outbound, &name).await.ok(),
                    Some((200, pod.to_string())),
                    "{name}"
                );
            }
        }
    }
    // The pods' proxies are strict: these answers came over mTLS, and the control plane gave
    // the endpoints the identity of the pods' account.
    let published = cp
        .registry
        .get("db-0.db.shop.svc.cluster.local:9042")
        .expect("per-pod name published");
    let only: Vec<_> = published.values().collect();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].identity.as_ref(), Some(&db_id));
    // A plaintext client is refused by the pod's proxy (strict): mTLS was not optional.
    let plain = get_via(pods[0].1.inbound, "db-0.db:9042").await;
    assert!(
        !matches!(plain, Ok((200, _))),
        "strict inbound answered plaintext: {plain:?}"
    );
    drop(cp);
}

/// Opens `CONNECT authority` through `proxy` and returns how long the server's first bytes
/// took once the tunnel was up.
async fn banner_after(proxy: SocketAddr, authority: &str) -> Duration {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect proxy");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b))
            .await
            .expect("CONNECT answered")
            .expect("read");
        assert!(n == 1, "proxy closed: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let t = Instant::now();
    let mut banner = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut banner))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(&banner, b"5.7.0-banner\n");
    t.elapsed()
}

/// An `appProtocol: mysql` port skips detection on the far side (the banner comes at once);
/// the same pod through a port without it waits for the detection timeout first. And an
/// ExternalName Service resolves to its external name through DNS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_app_protocols_skip_detection_and_external_names_resolve_through_dns() {
    let server = ApiServer::start();
    namespace(&server, "shop");
    let pki = Pki::new("cluster.local");
    let client_id = SpiffeId::workload("cluster.local", "shop", "client").expect("id");
    let db_id = SpiffeId::workload("cluster.local", "shop", "mysql").expect("id");
    let cp = TestControl::start_kube(
        &pki,
        // The permissions `remora install` gives the control plane, and no more.
        &server.installed_control_plane_kubeconfig(),
        &[
            ("token-client-0123456789", &client_id),
            ("token-db-0123456789", &db_id),
        ],
    )
    .await;
    // A server-speaks-first app (MySQL-like): the banner comes before any client byte.
    let (banner, _task) = tcp_echo(Some(b"5.7.0-banner\n")).await;
    let detect = Duration::from_secs(2);
    let mut cfg = meshed(&pki, &cp, banner, "shop", "mysql", "token-db-0123456789");
    cfg.inbound_addr = "127.0.0.20:0".parse().expect("addr");
    cfg.detect_timeout = detect;
    let db = TestProxy::start(cfg).await;
    pod(&server, "mysql-0", "mysql");
    let client = TestProxy::start(meshed(
        &pki,
        &cp,
        refused_addr().await,
        "shop",
        "client",
        "token-client-0123456789",
    ))
    .await;
    service(
        &server,
        "mysql",
        json!({"ports": [
            {"name": "sql", "port": 3306, "targetPort": "sql", "appProtocol": "mysql", "protocol": "TCP"},
            {"name": "sql-plain", "port": 3307, "targetPort": "sql", "protocol": "TCP"}]}),
    );
    let mut e = pod_ep("127.0.0.20", "mysql-0");
    e["hostname"] = Value::Null;
    slice(
        &server,
        "mysql-x",
        "mysql",
        &[("sql", db.inbound.port()), ("sql-plain", db.inbound.port())],
        vec![e],
    );
    // Wait for both names to be published with the pod's identity.
    let deadline = Instant::now() + CHANGE;
    for name in [
        "mysql.shop.svc.cluster.local:3306",
        "mysql.shop.svc.cluster.local:3307",
    ] {
        loop {
            let set = cp.registry.get(name);
            if set
                .as_ref()
                .is_some_and(|s| s.values().any(|e| e.identity.as_ref() == Some(&db_id)))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not published with its identity: {set:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let fast = banner_after(client.outbound, "mysql:3306").await;
    let slow = banner_after(client.outbound, "mysql:3307").await;
    eprintln!("banner after {fast:?} on the opaque port, {slow:?} on the detected one");
    assert!(
        fast < detect / 2,
        "the opaque port waited {fast:?} for detection"
    );
    assert!(
        slow >= detect - Duration::from_millis(100),
        "detection did not run on the plain port ({slow:?})"
    );

    // ExternalName → localhost, resolved through DNS (/etc/hosts) by the proxy.
    let ext4 = NamedApp::start_on("external", "127.0.0.1:0".parse().expect("addr")).await;
    // localhost may also resolve to ::1: serve there too when the machine has IPv6.
    let _ext6 = match std::net::TcpListener::bind(SocketAddr::from((
        [0u16, 0, 0, 0, 0, 0, 0, 1],
        ext4.addr.port(),
    ))) {
        Ok(l) => {
            drop(l);
            Some(
                NamedApp::start_on(
                    "external",
                    SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], ext4.addr.port())),
                )
                .await,
            )
        }
        Err(_) => None,
    };
    let t = Instant::now();
    service(
        &server,
        "ext",
        json!({"type": "ExternalName", "externalName": "localhost"}),
    );
    let name = format!("ext:{}", ext4.addr.port());
    reaches(client.outbound, &name, &["external"], t, "ExternalName").await;
    for _ in 0..20 {
        assert_eq!(
            get_via(client.outbound, &name).await.ok(),
            Some((200, "external".into()))
        );
    }
    drop(cp);
}

//! Policy from Gateway API routes attached to a Service (the GAMMA pattern), on a real
//! kube-apiserver (`tests/kube/cluster.sh`) with the standard `HTTPRoute` and `GRPCRoute`
//! CRDs installed by the test only (`tests/kube/gateway-api-crds.yaml`; remora installs
//! none): a header route and a weighted split written as an `HTTPRoute` reach the proxies
//! through `remora control`'s discovery stream and decide where curl's requests go; an edit of
//! the split under h2load load fails no request; an edit remora cannot express is refused
//! with one log line naming the route and the field while the route's last good rules keep
//! serving; a `GRPCRoute` method match sends a gRPC call to another Service; a bad route
//! added beside good ones is refused on its own, the good ones staying applied, and deleting
//! a good one or editing the Service's annotations takes effect while the bad one stays.
//!
//! As in `policy_kube.rs`, no controllers run: the test writes the EndpointSlices, and "pods"
//! are apps on loopback addresses 127.0.0.x sharing one port, reached in plaintext.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use remora_certs::{Match, Policy};
use remora_control_plane::registry::Published;
use remora_tests::control::{NamedApp, TestControl, capture_logs, captured_logs, port_on};
use remora_tests::kube::{ApiServer, manifest};
use remora_tests::{Pki, TestProxy, metric, run, wait_until};
use serde_json::{Value, json};

/// What the Service `web` is published as.
const WEB: &str = "web.shop.svc.cluster.local:80";

fn authority(svc: &str) -> String {
    format!("{svc}.shop.svc.cluster.local:80")
}

/// The test's CRDs, applied and served.
fn install_route_crds(server: &ApiServer) {
    // Created, not server-side applied: the test server (v1.20) predates CEL, and its apply
    // refuses the CRDs' `x-kubernetes-validations` fields that a create drops.
    for crd in manifest("tests/kube/gateway-api-crds.yaml") {
        let (code, text) = server.request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            Some("application/json"),
            Some(&crd.to_string()),
        );
        assert_eq!(code, 201, "creating {}: {text}", crd["metadata"]["name"]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for plural in ["httproutes", "grpcroutes"] {
        let path = format!("/apis/gateway.networking.k8s.io/v1/{plural}?limit=1");
        while server.request("GET", &path, None, None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the {plural} CRD is not served 30s after it was applied"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Service `shop/name`, one port 80 → `target`, and its slice with one ready endpoint at `ip`.
fn service(server: &ApiServer, name: &str, target: u16, ip: &str) {
    server.apply_path(
        &format!("/api/v1/namespaces/shop/services/{name}"),
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": target,
                                    "protocol": "TCP"}]}}),
    );
    server.apply_path(
        &format!("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/{name}-x"),
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-x"), "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": target, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }),
    );
}

/// Service `shop/web` as [`service`] writes it, with these annotations.
fn annotate_web(server: &ApiServer, target: u16, annotations: Value) {
    server.apply_path(
        "/api/v1/namespaces/shop/services/web",
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": target,
                                    "protocol": "TCP"}]}}),
    );
}

/// The log line containing `what`, once it is there.
async fn log_line(what: &str) -> String {
    wait_until(&format!("{what:?} in the log"), async || {
        captured_logs().contains(what)
    })
    .await;
    captured_logs()
        .lines()
        .find(|l| l.contains(what))
        .map(str::to_string)
        .unwrap_or_default()
}

/// Creates or replaces a route of namespace `shop`: created, else merge-patched whole (its
/// lists replaced). The test's v1.20 server refuses an empty string where the schema has a
/// pattern, so parentRefs name the core group `core` (as Linkerd's examples do) rather than
/// `""`, and backendRefs leave it out.
fn route(server: &ApiServer, plural: &str, route: &Value) {
    let collection = format!("/apis/gateway.networking.k8s.io/v1/namespaces/shop/{plural}");
    let body = route.to_string();
    let (code, text) = server.request("POST", &collection, Some("application/json"), Some(&body));
    if code == 409 {
        let name = route["metadata"]["name"].as_str().unwrap_or_default();
        let (code, text) = server.request(
            "PATCH",
            &format!("{collection}/{name}"),
            Some("application/merge-patch+json"),
            Some(&body),
        );
        assert_eq!(code, 200, "replacing {plural} {name}: {text}");
    } else {
        assert_eq!(code, 201, "creating {plural}: {body}: {text}");
    }
}

/// `HTTPRoute shop/web-routes` on Service `web` port 80 with these rules.
fn http_route(server: &ApiServer, rules: Value) {
    route(
        server,
        "httproutes",
        &json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web-routes", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "web", "port": 80}],
                     "rules": rules},
        }),
    );
}

/// The header rule (`x-canary: true` → web-canary) and the default rule's split, as weights.
fn rules(web: u32, v2: u32) -> Value {
    json!([
        {"matches": [{"headers": [{"type": "Exact", "name": "x-canary", "value": "true"}]}],
         "backendRefs": [{"name": "web-canary", "port": 80}]},
        {"backendRefs": [{"name": "web", "port": 80, "weight": web},
                         {"name": "web-v2", "port": 80, "weight": v2}]},
    ])
}

/// Waits until the control plane publishes `web` with `check` holding for its policy.
async fn published(cp: &TestControl, what: &str, check: impl Fn(&Policy) -> bool) {
    wait_until(what, async || {
        matches!(cp.registry.lookup(WEB), Some(p @ Published::Endpoints(..))
            if p.policy().is_some_and(&check))
    })
    .await;
}

fn canary_route(p: &Policy) -> bool {
    p.routes.len() == 1
        && p.routes[0].to == authority("web-canary")
        && matches!(&p.routes[0].when, Match::Header { name, value } if name == "x-canary" && value == "true")
}

fn split_to_v2(p: &Policy, percent: u32) -> bool {
    match percent {
        0 => p.split.is_empty(),
        n => p.split.len() == 1 && p.split[0].to == authority("web-v2") && p.split[0].percent == n,
    }
}

/// `GET path` of `web.shop:80` through the outbound proxy with curl and extra arguments; the
/// body (the name of the app that answered).
async fn curl(proxy: SocketAddr, extra: &[&str]) -> String {
    let url = format!("http://{proxy}/");
    let mut args = vec!["-sS", "--max-time", "10", "-H", "host: web.shop:80"];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = run("curl", &args).await;
    assert_eq!(out.status, 0, "curl {args:?}: {}", out.stderr);
    out.stdout
}

/// A gRPC-shaped call (HTTP/2 prior knowledge, POST, `content-type: application/grpc`) of
/// `/service/method` on `web.shop:80` through the proxy; the body (the app's name).
async fn grpc_call(proxy: SocketAddr, path: &str) -> String {
    let connect_to = format!("web.shop:80:{}:{}", proxy.ip(), proxy.port());
    let url = format!("http://web.shop{path}");
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--connect-to",
            &connect_to,
            &url,
        ],
    )
    .await;
    assert_eq!(out.status, 0, "curl {url}: {}", out.stderr);
    out.stdout
}

/// `h2load -n N` of GETs for `web.shop:80` through `proxy`; how many were answered 2xx.
async fn h2load(proxy: SocketAddr, n: u32) -> u32 {
    let url = format!("http://{proxy}/");
    let n = n.to_string();
    let out = run(
        "h2load",
        &[
            "-n",
            &n,
            "-c",
            "4",
            "-m",
            "8",
            "-H",
            ":authority: web.shop:80",
            &url,
        ],
    )
    .await;
    assert_eq!(out.status, 0, "h2load: {}", out.stderr);
    out.stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("no status codes in: {}", out.stdout))
}

/// Requests split to `web-v2` so far, as the proxy counts them.
async fn split_count(proxy: &TestProxy) -> f64 {
    metric(
        &proxy.metrics().await,
        "remora_policy_routed_total",
        &[
            ("destination", "web.shop:80"),
            ("to", &authority("web-v2")),
            ("by", "split"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_routes_splits_follows_live_edits_and_a_bad_one_keeps_the_last_good() {
    capture_logs();
    let server = ApiServer::start();
    install_route_crds(&server);
    server.create_namespace("shop");
    let ips = [[127, 0, 0, 80], [127, 0, 0, 81], [127, 0, 0, 82]];
    let port = port_on(&ips);
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let _stable = NamedApp::start_on("stable", at(ips[0])).await;
    let _canary = NamedApp::start_on("canary", at(ips[1])).await;
    let _v2 = NamedApp::start_on("v2", at(ips[2])).await;
    service(&server, "web", port, "127.0.0.80");
    service(&server, "web-canary", port, "127.0.0.81");
    service(&server, "web-v2", port, "127.0.0.82");

    let pki = Pki::new("cluster.local");
    let (cp, proxy) = remora_tests::control::kube_mesh(&server, &pki).await;
    let out = proxy.outbound;
    published(&cp, "web without a policy", Policy::is_default).await;
    assert_eq!(curl(out, &[]).await, "stable");

    // The route: a header match to the canary, and the default rule all on web (weight 0 for
    // v2: no split).
    http_route(&server, rules(100, 0));
    published(&cp, "the header route", |p| {
        canary_route(p) && split_to_v2(p, 0)
    })
    .await;
    let canary_hdr = ["-H", "x-canary: true"];
    for _ in 0..10 {
        assert_eq!(curl(out, &[]).await, "stable");
        assert_eq!(curl(out, &canary_hdr).await, "canary");
        assert_eq!(curl(out, &["-H", "x-canary: yes"]).await, "stable");
    }

    // A weighted split, 3:1: a quarter of 4,000 requests goes to v2 (binomial spread 0.7 points).
    http_route(&server, rules(75, 25));
    published(&cp, "the 25 % split", |p| {
        canary_route(p) && split_to_v2(p, 25)
    })
    .await;
    let before = split_count(&proxy).await;
    assert_eq!(h2load(out, 4_000).await, 4_000);
    let share = (split_count(&proxy).await - before) * 100.0 / 4_000.0;
    assert!((21.0..=29.0).contains(&share), "v2 got {share:.1} %");
    assert_eq!(curl(out, &canary_hdr).await, "canary");

    // All of it to v2, written while h2load is under way: no request fails.
    let during = tokio::spawn(h2load(out, 40_000));
    http_route(&server, rules(0, 100));
    published(&cp, "the 100 % split", |p| {
        canary_route(p) && split_to_v2(p, 100)
    })
    .await;
    assert!(
        !during.is_finished(),
        "the load ended before the edit was published: it proves nothing"
    );
    assert_eq!(
        during.await.expect("h2load"),
        40_000,
        "every request succeeded"
    );
    for _ in 0..10 {
        assert_eq!(curl(out, &[]).await, "v2");
        assert_eq!(curl(out, &canary_hdr).await, "canary");
    }

    // A filter: refused with the route and the field named; the 100 % split keeps serving.
    let mut bad = rules(0, 100);
    bad[0]["filters"] = json!([{"type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "x-from", "value": "route"}]}}]);
    bad[1]["backendRefs"] = json!([{"name": "web", "port": 80, "weight": 1}]);
    http_route(&server, bad);
    let refused =
        "HTTPRoute shop/web-routes: refused: spec.rules[0].filters: filters are not supported";
    let line = log_line(refused).await;
    assert!(
        line.contains("WARN")
            && line.contains("Service shop/web keeps the route's last good rules"),
        "{line}"
    );
    published(&cp, "the last good policy", |p| {
        canary_route(p) && split_to_v2(p, 100)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(curl(out, &[]).await, "v2");
        assert_eq!(curl(out, &canary_hdr).await, "canary");
    }

    // Fixed: the split back to web, and the refusal is not logged again.
    http_route(&server, rules(1, 0));
    published(&cp, "the fixed route", |p| {
        canary_route(p) && split_to_v2(p, 0)
    })
    .await;
    assert_eq!(curl(out, &[]).await, "stable");
    assert_eq!(captured_logs().matches(refused).count(), 1);

    // A GRPCRoute beside it: one method of one gRPC service goes to v2.
    route(
        &server,
        "grpcroutes",
        &json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "web-grpc", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "web", "port": 80}],
                     "rules": [{"matches": [{"method": {"service": "shop.Reports", "method": "Export"}}],
                                "backendRefs": [{"name": "web-v2", "port": 80}]}]},
        }),
    );
    published(&cp, "the GRPCRoute's method route", |p| {
        p.routes.iter().any(|r| {
            r.when == Match::PathPrefix("/shop.Reports/Export".into())
                && r.to == authority("web-v2")
        }) && p.routes.len() == 2
    })
    .await;
    for _ in 0..5 {
        assert_eq!(grpc_call(out, "/shop.Reports/Export").await, "v2");
        assert_eq!(grpc_call(out, "/shop.Reports/List").await, "stable");
        assert_eq!(curl(out, &canary_hdr).await, "canary");
    }

    // A bad route beside the good ones: refused on its own, the good ones stay applied.
    route(
        &server,
        "httproutes",
        &json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web-bad", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "web", "port": 80}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/bad"}}],
                                "filters": [{"type": "RequestHeaderModifier",
                                    "requestHeaderModifier": {"set": [{"name": "x-from", "value": "bad"}]}}],
                                "backendRefs": [{"name": "web-v2", "port": 80}]}]},
        }),
    );
    let line = log_line("HTTPRoute shop/web-bad: refused: spec.rules[0].filters").await;
    assert!(
        line.contains("WARN")
            && line.contains(
                "the route does not apply to Service shop/web (its other routes and its annotations do)"
            ),
        "{line}"
    );
    let grpc_only = |p: &Policy| {
        p.routes.len() == 1
            && p.routes[0].when == Match::PathPrefix("/shop.Reports/Export".into())
            && p.split.is_empty()
    };
    published(&cp, "both good routes, the bad one left out", |p| {
        p.routes.len() == 2 && p.routes.iter().any(|r| r.to == authority("web-canary"))
    })
    .await;
    assert_eq!(curl(out, &canary_hdr).await, "canary");
    assert_eq!(curl(out, &["-H", "x-from: none"]).await, "stable");

    // The good HTTPRoute deleted while the bad one stays: that takes effect.
    server.delete("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web-routes");
    published(&cp, "the GRPCRoute alone", grpc_only).await;
    for _ in 0..5 {
        assert_eq!(curl(out, &canary_hdr).await, "stable");
        assert_eq!(grpc_call(out, "/shop.Reports/Export").await, "v2");
    }

    // An annotation edit takes effect while the bad one stays, beside the GRPCRoute.
    annotate_web(&server, port, json!({"remora.io/timeout": "5s"}));
    published(&cp, "the annotation's timeout beside the GRPCRoute", |p| {
        grpc_only(p) && p.timeout == Some(Duration::from_secs(5))
    })
    .await;

    // The GRPCRoute deleted: the annotations alone, the bad route still there.
    server.delete("/apis/gateway.networking.k8s.io/v1/namespaces/shop/grpcroutes/web-grpc");
    published(&cp, "the annotations alone", |p| {
        p.routes.is_empty() && p.split.is_empty() && p.timeout == Some(Duration::from_secs(5))
    })
    .await;
    assert_eq!(grpc_call(out, "/shop.Reports/Export").await, "stable");

    // Everything removed: no policy left; the refusals were logged once each.
    server.delete("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web-bad");
    annotate_web(&server, port, json!({}));
    published(&cp, "no policy", Policy::is_default).await;
    assert_eq!(curl(out, &canary_hdr).await, "stable");
    let logs = captured_logs();
    assert_eq!(
        logs.matches("HTTPRoute shop/web-bad: refused").count(),
        1,
        "{logs}"
    );
    drop(cp);
}

/// Without the Gateway API CRDs (remora installs none) the route watches are harmless: the
/// Services are published as before, one info line says the kinds are not served, and
/// nothing warns or retries in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_crds_routes_are_looked_for_quietly_and_services_still_publish() {
    capture_logs();
    let server = ApiServer::start();
    server.create_namespace("shop");
    let ip = [127, 0, 0, 83];
    let port = port_on(&[ip]);
    let _app = NamedApp::start_on("stable", SocketAddr::from((ip, port))).await;
    service(&server, "web", port, "127.0.0.83");
    let pki = Pki::new("cluster.local");
    let cp = TestControl::start_kube(&pki, &server.installed_control_plane_kubeconfig(), &[]).await;
    published(&cp, "web without routes", Policy::is_default).await;
    let not_served = "HTTPRoutes are not served by the API server";
    wait_until("the note that HTTPRoutes are not served", async || {
        captured_logs().contains(not_served)
    })
    .await;
    // A watcher retrying the 404 with backoff would log again within seconds: an absence is
    // only seen by waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = captured_logs();
    assert_eq!(logs.matches(not_served).count(), 1, "{logs}");
    // (The logs are this binary's: the other test's route refusal may be among them.)
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("HTTPRoute watch") || l.contains("GRPCRoute watch")),
        "{logs}"
    );
    drop(cp);
}

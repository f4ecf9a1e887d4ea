//! Identities and least privilege on a real kube-apiserver (`tests/kube/cluster.sh`, RBAC on):
//! proxies prove themselves with ServiceAccount tokens from the API server's TokenRequest,
//! checked by TokenReview; the control plane runs under its own ServiceAccount with the
//! ClusterRole of `deploy/control-plane-rbac.yaml` and nothing more, and names the rule to add
//! when one is missing.
//!
//! The control plane and the proxies run in this test's process (the same libraries the
//! binaries run, as in `tests/control.rs`); the API server, etcd and every token are real.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use remora_control_plane::server::Source;
use remora_control_plane::source::permission::{self, CLUSTER_ROLE, MANIFEST, RULES};
use remora_proxy::{Config, IdentityMode};
use remora_tests::control::{
    NamedApp, TestControl, Unready, capture_logs, captured_logs, get_via, proxy_config_for,
    scratch, write_atomic,
};
use remora_tests::kube::{ApiServer, manifest, repo_root};
use remora_tests::{Pki, TestProxy, http_get, metric, refused_addr, wait_until};
use serde_json::{Value, json};

/// The audience proxies' tokens are requested for and the control plane requires.
const AUDIENCE: &str = "remora";
/// The API server's own audience: the control plane's token is a bearer token for the API.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> remora_certs::SpiffeId {
    remora_certs::SpiffeId::workload(TD, ns, sa).expect("workload id")
}

/// The token file a control-mode proxy reads before every Certify (the kubelet rewrites the
/// projected token the same way).
fn token_file(cfg: &Config) -> PathBuf {
    match &cfg.identity_mode {
        IdentityMode::Control { token, .. } => token.clone(),
        other => panic!("expected a control-mode proxy config, got {other:?}"),
    }
}

/// Log lines captured so far that contain every one of `parts`.
fn lines_with(parts: &[&str]) -> Vec<String> {
    captured_logs()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(String::from)
        .collect()
}

async fn wait_for_line(what: &str, parts: &[&str]) -> String {
    wait_until(what, async || !lines_with(parts).is_empty()).await;
    lines_with(parts).remove(0)
}

async fn proxy_metric(admin: SocketAddr, name: &str) -> f64 {
    let (status, body) = http_get(admin, "/metrics")
        .await
        .expect("proxy admin answers");
    assert_eq!(status, 200, "proxy /metrics: {body}");
    metric(&body, name, &[])
}

/// A control plane on the file source (no services) that checks tokens with TokenReview
/// through `kubeconfig`, issuing certificates of `lifetime`.
async fn token_review_control(pki: &Pki, kubeconfig: PathBuf, lifetime: Duration) -> TestControl {
    let eps = scratch("endpoints.toml");
    write_atomic(&eps, "# no services\n");
    let mut o = TestControl::options(pki, Source::File(eps));
    o.token_review = Some(Some(kubeconfig));
    o.token_audiences = vec![AUDIENCE.to_string()];
    o.cert_lifetime = lifetime;
    TestControl::start_options(o).await
}

/// A ServiceAccount token from TokenRequest gets exactly its own identity; another account's
/// token is refused with the reason; a deleted ServiceAccount's token stops working at the next
/// renewal (TokenReview checks a bound token against the ServiceAccount object), and so does
/// it after an account of the same name is created again (another UID).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_prove_their_own_identity_until_the_account_is_deleted() {
    capture_logs();
    let server = ApiServer::start();
    server.create_service_account("shop", "web");
    server.create_service_account("shop", "other");
    let web_token = server.token("shop", "web", AUDIENCE);
    let other_token = server.token("shop", "other", AUDIENCE);
    let pki = Pki::new(TD);
    // A short lifetime so renewals (at 70 %) come every ~4 s.
    let cp = token_review_control(&pki, server.kubeconfig.clone(), Duration::from_secs(6)).await;
    let web = id("shop", "web");

    // The right token: certified, and the proxy is ready with that identity.
    let cfg = proxy_config_for(refused_addr().await, &pki, &cp.target(), &web, &web_token);
    let web_token_file = token_file(&cfg);
    let proxy = TestProxy::start(cfg).await;
    let loaded = wait_for_line(
        "the web proxy's certificate",
        &[
            "identity loaded from the control plane",
            "identity=spiffe://cluster.local/ns/shop/sa/web",
        ],
    )
    .await;
    eprintln!("certified: {loaded}");

    // Another account's token asking for shop/web: refused, with the reason.
    let impostor = Unready::start(proxy_config_for(
        refused_addr().await,
        &pki,
        &cp.target(),
        &web,
        &other_token,
    ))
    .await;
    let reason = "cannot certify spiffe://cluster.local/ns/shop/sa/web: the token belongs to \
                  system:serviceaccount:shop:other (spiffe://cluster.local/ns/shop/sa/other), \
                  not spiffe://cluster.local/ns/shop/sa/web";
    let refused = wait_for_line("the impostor's refusal in its log", &[reason]).await;
    eprintln!("another account's token: {refused}");
    impostor.assert_not_ready("a token for shop/other").await;
    impostor.stop().await;

    // A token for another audience: the real API server refuses it in the review.
    let vault_token = server.token("shop", "web", "vault");
    let wrong_audience = Unready::start(proxy_config_for(
        refused_addr().await,
        &pki,
        &cp.target(),
        &id("shop", "web"),
        &vault_token,
    ))
    .await;
    let line = wait_for_line(
        "the wrong-audience refusal",
        &[
            "sa/web: cannot get a certificate",
            "TokenReview: the token is not authenticated",
        ],
    )
    .await;
    eprintln!("token for audience \"vault\": {line}");
    wrong_audience
        .assert_not_ready("a token for another audience")
        .await;
    wrong_audience.stop().await;

    // Renewal works while the account exists.
    wait_until("a renewal", async || {
        proxy_metric(proxy.admin, "remora_identity_reloads_total").await >= 2.0
    })
    .await;

    // The account is deleted: the next renewal is refused by TokenReview.
    let refusals = || {
        lines_with(&[
            "certify refused",
            "identity=spiffe://cluster.local/ns/shop/sa/web",
            "TokenReview: the token is not authenticated",
        ])
    };
    let refused_before = refusals().len();
    let failures_before = proxy_metric(proxy.admin, "remora_identity_reload_failures_total").await;
    let reloads_before = proxy_metric(proxy.admin, "remora_identity_reloads_total").await;
    server.delete("/api/v1/namespaces/shop/serviceaccounts/web");
    wait_until("a refused renewal after the deletion", async || {
        proxy_metric(proxy.admin, "remora_identity_reload_failures_total").await > failures_before
            && refusals().len() > refused_before
    })
    .await;
    let line = refusals().pop().unwrap_or_default();
    assert!(
        !line.contains("audiences"),
        "the refusal after the deletion is about the account, not the audience: {line}"
    );
    eprintln!("deleted account: {line}");
    // At most one renewal raced the deletion (in flight when it happened).
    let reloads_after = proxy_metric(proxy.admin, "remora_identity_reloads_total").await;
    assert!(
        reloads_after <= reloads_before + 1.0,
        "the proxy kept renewing after its account was deleted ({reloads_before} → {reloads_after})"
    );

    // An account of the same name again (a new UID): the old token still proves nothing.
    server.create_service_account("shop", "web");
    let failures = proxy_metric(proxy.admin, "remora_identity_reload_failures_total").await;
    let reloads = proxy_metric(proxy.admin, "remora_identity_reloads_total").await;
    let refused = refusals().len();
    // Two more refusals: at least one attempt began after the account was back.
    wait_until("refusals after the account was re-created", async || {
        proxy_metric(proxy.admin, "remora_identity_reload_failures_total").await >= failures + 2.0
            && refusals().len() >= refused + 2
    })
    .await;
    assert_eq!(
        proxy_metric(proxy.admin, "remora_identity_reloads_total").await,
        reloads,
        "a token of the deleted account was accepted for its namesake"
    );
    eprintln!(
        "re-created account, old token: {}",
        refusals().pop().unwrap_or_default()
    );

    // A fresh token for the new account (what the kubelet would mount) works at the next try.
    write_atomic(&web_token_file, &server.token("shop", "web", AUDIENCE));
    wait_until("a certificate for the new account's token", async || {
        proxy_metric(proxy.admin, "remora_identity_reloads_total").await > reloads
    })
    .await;
    let m = cp.metrics().await;
    assert!(metric(&m, "remora_control_certify_total", &[("result", "denied")]) >= 4.0);
    drop(proxy);
}

/// The three lists of permissions are one: the control plane's (`permission::RULES`), the
/// ClusterRole in `deploy/control-plane-rbac.yaml`, and the README's "Permissions" section.
#[test]
fn the_manifest_the_readme_and_the_control_plane_list_the_same_rules() {
    let want: Vec<Value> = RULES
        .iter()
        .map(|r| json!({"apiGroups": [r.group], "resources": [r.resource], "verbs": r.verbs}))
        .collect();
    let docs = manifest(MANIFEST);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap_or_else(|| panic!("{MANIFEST} has no ClusterRole"));
    assert_eq!(role["metadata"]["name"], CLUSTER_ROLE);
    assert_eq!(
        role["rules"],
        Value::Array(want),
        "{MANIFEST}'s ClusterRole is not permission::RULES"
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap_or_else(|| panic!("{MANIFEST} has no ClusterRoleBinding"));
    assert_eq!(binding["roleRef"]["name"], CLUSTER_ROLE);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "remora-control", "namespace": "remora"}])
    );
    assert!(
        docs.iter().any(|d| d["kind"] == "ServiceAccount"
            && d["metadata"]["name"] == "remora-control"
            && d["metadata"]["namespace"] == "remora"),
        "{MANIFEST} has no ServiceAccount remora/remora-control"
    );

    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split_once("### Permissions\n")
        .map(|(_, s)| s)
        .expect("README.md has a \"### Permissions\" section");
    let block = section
        .split_once("```yaml\n")
        .and_then(|(_, s)| s.split_once("```"))
        .map(|(b, _)| b)
        .expect("the Permissions section lists the rules in a ```yaml block");
    let listed: Vec<&str> = block
        .lines()
        .map(|l| l.trim().trim_start_matches("- "))
        .filter(|l| !l.is_empty())
        .collect();
    let rules: Vec<String> = RULES.iter().map(|r| r.yaml()).collect();
    assert_eq!(
        listed, rules,
        "README's Permissions list is not permission::RULES"
    );
}

/// The control plane under its own ServiceAccount token, with the manifest's ClusterRole and
/// nothing else: it lists and watches EndpointSlices and Pods (an endpoint gets its Pod's
/// identity, and a proxy reaches it over mTLS) and issues certificates through TokenReview.
/// With the TokenReview rule removed it logs the hint naming the rule, once; with it back,
/// the waiting proxy gets its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_runs_with_exactly_the_manifests_permissions() {
    capture_logs();
    let server = ApiServer::start();
    let docs = server.apply_manifest(MANIFEST);
    // The server's reading of the manifest's ClusterRole is the control plane's list.
    let role = server.get(&format!(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/{CLUSTER_ROLE}"
    ));
    let served: Vec<(String, String, Vec<String>)> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k][0].as_str().unwrap_or("?").to_string();
            let verbs = r["verbs"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (s("apiGroups"), s("resources"), verbs)
        })
        .collect();
    let want: Vec<(String, String, Vec<String>)> = RULES
        .iter()
        .map(|r| {
            (
                r.group.to_string(),
                r.resource.to_string(),
                r.verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(served, want, "the API server's ClusterRole {CLUSTER_ROLE}");

    let cp_token = server.token("remora", "remora-control", API_AUDIENCE);
    // RBAC is read from an informer: wait until the binding is in force for this account.
    wait_until("the control plane's ClusterRole in force", async || {
        server
            .request_as(&cp_token, "GET", "/api/v1/pods?limit=1", None, None)
            .0
            == 200
    })
    .await;
    // And nothing beyond it: no Secrets, no writes to what it watches.
    for (method, path) in [
        ("GET", "/api/v1/secrets"),
        ("GET", "/api/v1/configmaps"),
        ("DELETE", "/api/v1/namespaces/shop/pods/web-0"),
    ] {
        let (code, body) = server.request_as(&cp_token, method, path, None, None);
        assert_eq!(code, 403, "{method} {path} as the control plane: {body}");
    }
    let kubeconfig = server.kubeconfig_for_token(&cp_token);

    for sa in ["web", "client", "late"] {
        server.create_service_account("shop", sa);
    }
    let pki = Pki::new(TD);
    let mut o = TestControl::options(
        &pki,
        Source::Kubernetes {
            kubeconfig: Some(kubeconfig.clone()),
            cluster_domain: "cluster.local".into(),
        },
    );
    o.token_review = Some(Some(kubeconfig));
    o.token_audiences = vec![AUDIENCE.to_string()];
    // Ready once the source has listed EndpointSlices and Pods with the account's token.
    let cp = TestControl::start_options(o).await;

    // The web pod's sidecar: certified through TokenReview, inbound on 127.0.0.2.
    let app = NamedApp::start("web").await;
    let mut cfg = proxy_config_for(
        app.addr,
        &pki,
        &cp.target(),
        &id("shop", "web"),
        &server.token("shop", "web", AUDIENCE),
    );
    cfg.inbound_addr = SocketAddr::from(([127, 0, 0, 2], 0));
    let web_proxy = TestProxy::start(cfg).await;
    let port = web_proxy.inbound.port();

    // What the kubelet and the endpointslice controller would write for pod web-0.
    server.apply(
        "/api/v1/namespaces/shop/pods",
        "web-0",
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "web"}]},
        }),
    );
    server.set_pod_status(
        "shop",
        "web-0",
        &json!({
            "phase": "Running", "podIP": "127.0.0.2", "podIPs": [{"ip": "127.0.0.2"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }),
    );
    server.apply_slice_json(
        "shop",
        "web-abc",
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["127.0.0.2"],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0"},
            }],
        }),
    );
    // Its Service: port 80 → targetPort `http`; callers use the Service port.
    server.apply(
        "/api/v1/namespaces/shop/services",
        "web",
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}),
    );
    let name = "web.shop.svc.cluster.local:80".to_string();
    let endpoint = SocketAddr::from(([127, 0, 0, 2], port));
    wait_until(
        "the slice and its Pod's identity in the registry",
        async || {
            cp.registry.get(&name).is_some_and(|set| {
                set.get(&endpoint)
                    .is_some_and(|e| e.identity == Some(id("shop", "web")))
            })
        },
    )
    .await;

    // A client in the mesh reaches it over mTLS, the identity checked against the Pod's.
    let client = TestProxy::start(proxy_config_for(
        refused_addr().await,
        &pki,
        &cp.target(),
        &id("shop", "client"),
        &server.token("shop", "client", AUDIENCE),
    ))
    .await;
    let mut last = None;
    wait_until("a request through both proxies", async || {
        let r = get_via(client.outbound, &name).await;
        let ok = matches!(&r, Ok((200, b)) if b == "web");
        last = Some(r);
        ok
    })
    .await;
    eprintln!("discovery and mTLS under the manifest's ClusterRole: {last:?}");

    // The TokenReview rule removed: the next Certify is refused with the rule to add, logged once.
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("the manifest's ClusterRole");
    let mut without = role.clone();
    without["rules"] = Value::Array(
        role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| r["resources"][0] != "tokenreviews")
            .cloned()
            .collect(),
    );
    server.apply_object(&without);
    let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "spec": {"token": "x"}})
    .to_string();
    wait_until("the rule's removal in force", async || {
        server
            .request_as(
                &cp_token,
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some("application/json"),
                Some(&review),
            )
            .0
            == 403
    })
    .await;
    let late = Unready::start(proxy_config_for(
        refused_addr().await,
        &pki,
        &cp.target(),
        &id("shop", "late"),
        &server.token("shop", "late", AUDIENCE),
    ))
    .await;
    let rule = permission::rule_for("authentication.k8s.io", "tokenreviews")
        .expect("tokenreviews is one of the rules");
    let hint = format!(
        "forbidden: the control plane's account (system:serviceaccount:remora:remora-control) \
         cannot create tokenreviews ({}); add to ClusterRole remora-control: {} ({MANIFEST})",
        rule.needed_for,
        rule.yaml()
    );
    let line = wait_for_line("the permission hint", &[&hint]).await;
    eprintln!("hint: {line}");
    // The proxy retries (0.5 s, 1 s, …); the hint stays one line however often it is refused.
    wait_until("the late proxy refused twice", async || {
        lines_with(&[
            "sa/late: cannot get a certificate",
            "may not create TokenReviews",
        ])
        .len()
            >= 2
    })
    .await;
    assert_eq!(
        lines_with(&[&hint]).len(),
        1,
        "the hint is logged once per outage"
    );
    late.assert_not_ready("TokenReview is forbidden").await;

    // The rule back (the manifest applied again): the waiting proxy gets its certificate.
    server.apply_manifest(MANIFEST);
    wait_until(
        "the late proxy certified once the rule is back",
        async || {
            http_get(late.admin, "/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
        },
    )
    .await;
    late.stop().await;

    // The services rule removed: a control plane started now cannot list Services, says which
    // rule to add (once), and serves nothing until the rule is back.
    let mut no_services = role.clone();
    no_services["rules"] = Value::Array(
        role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| r["resources"][0] != "services")
            .cloned()
            .collect(),
    );
    server.apply_object(&no_services);
    wait_until("the services rule's removal in force", async || {
        server
            .request_as(&cp_token, "GET", "/api/v1/services?limit=1", None, None)
            .0
            == 403
    })
    .await;
    let rule = permission::rule_for("", "services").expect("services is one of the rules");
    let hint = format!(
        "forbidden: the control plane's account (system:serviceaccount:remora:remora-control) \
         cannot list services ({}); add to ClusterRole remora-control: {} ({MANIFEST})",
        rule.needed_for,
        rule.yaml()
    );
    let blind = TestControl::start_unready({
        let mut o = TestControl::options(
            &pki,
            Source::Kubernetes {
                kubeconfig: Some(server.kubeconfig_for_token(&cp_token)),
                cluster_domain: "cluster.local".into(),
            },
        );
        o.bootstrap_tokens = None;
        o
    })
    .await;
    let line = wait_for_line("the services hint", &[&hint]).await;
    eprintln!("hint: {line}");
    assert!(
        blind.registry.get(&name).is_none(),
        "published without Services"
    );
    server.apply_manifest(MANIFEST);
    wait_until("Services listed once the rule is back", async || {
        blind.registry.get(&name).is_some()
    })
    .await;
    assert_eq!(
        lines_with(&[&hint]).len(),
        1,
        "the hint is logged once per outage"
    );
    drop(blind);
    drop((client, web_proxy, app, cp));
}

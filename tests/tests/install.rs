//! `remora install` as a user runs it, on the real test API server: every object it prints is
//! created without error, the control plane runs on the account and ClusterRole it made, and
//! the injection webhook it configures injects pods created in a labelled namespace and leaves
//! every other pod alone.

use std::process::Command;
use std::time::Duration;

use remora_control_plane::server::{Source, WebhookOptions};
use remora_tests::control::TestControl;
use remora_tests::kube::ApiServer;
use remora_tests::netns::workspace_binary;
use remora_tests::{Pki, WAIT, loopback0};
use serde_json::{Value, json};

fn install(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary("remora"))
        .arg("install")
        .args(args)
        .output()
        .expect("remora install");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    let d: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("install prints YAML");
    d.into_iter().filter(|v| !v.is_null()).collect()
}

fn labelled_namespace(server: &ApiServer, ns: &str, inject: Option<&str>) {
    let labels = match inject {
        Some(v) => json!({"remora.io/inject": v}),
        None => json!({}),
    };
    server.apply(
        "/api/v1/namespaces",
        ns,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}),
    );
}

/// Creates a pod; returns the API server's status code and the stored object (or the error).
fn create_pod(server: &ApiServer, ns: &str, name: &str, annotations: Value) -> (u16, Value) {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}]}]},
    });
    let (code, body) = server.request(
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods"),
        Some("application/json"),
        Some(&pod.to_string()),
    );
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn container_names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_applies_runs_the_control_plane_and_its_webhook_injects_labelled_namespaces() {
    let server = ApiServer::start();
    let pki = Pki::new("cluster.local");
    let ca = pki.dir.to_str().expect("utf-8 path");

    // Without --ca: a CA on the spot, and a warning saying what that costs.
    let (code, out, err) = install(&["--kube-version", "1.20"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning") && err.contains("remora ca init"),
        "{err}"
    );
    assert_eq!(docs(&out).len(), 9);
    // A CA directory that is not one is an error naming it.
    let (code, _, err) = install(&["--ca", "/nonexistent"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent"), "{err}");

    // The webhook is called by URL here: nothing routes the API server to a Service.
    let placeholder = "https://127.0.0.1:1/inject";
    let (code, out, err) = install(&[
        "--ca",
        ca,
        "--kube-version",
        "1.20",
        "--webhook-url",
        placeholder,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no warning with --ca: {err}");
    let objects = docs(&out);
    assert!(
        objects
            .iter()
            .all(|d| d["kind"] != "CustomResourceDefinition"),
        "remora installs no CRD"
    );
    for doc in &objects {
        server.apply_object(doc);
    }
    let secret = server.get("/api/v1/namespaces/remora/secrets/remora-ca");
    let keys: Vec<&String> = secret["data"].as_object().expect("data").keys().collect();
    assert_eq!(
        keys,
        ["ca.crt", "issuer.crt", "issuer.key"],
        "never root.key"
    );
    let deploy = server.get("/apis/apps/v1/namespaces/remora/deployments/remora-control");
    assert_eq!(deploy["spec"]["replicas"], 2);
    server.get("/apis/policy/v1beta1/namespaces/remora/poddisruptionbudgets/remora-control");
    let svc = server.get("/api/v1/namespaces/remora/services/remora-control");
    let ports: Vec<(i64, i64)> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap_or(0),
                p["targetPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ports, [(8086, 8086), (443, 8443), (9996, 9996)]);

    // The control plane on the installed account's token: Kubernetes discovery and
    // TokenReview with the ClusterRole install wrote, and the webhook on.
    let kubeconfig = server.installed_control_plane_kubeconfig();
    let mut o = TestControl::options(
        &pki,
        Source::Kubernetes {
            kubeconfig: Some(kubeconfig.clone()),
            cluster_domain: "cluster.local".into(),
        },
    );
    o.token_review = Some(Some(kubeconfig));
    o.token_audiences = vec!["remora".into()];
    o.webhook = Some(WebhookOptions {
        addr: loopback0(),
        extra_names: vec!["127.0.0.1".into()],
        proxy_image: "remora-proxy:test".into(),
        classic: true,
    });
    // Ready only once the source has listed Services, EndpointSlices and Pods as that account.
    let cp = TestControl::start_options(o).await;
    let hook = cp.webhook.expect("the webhook listens");

    // Point the installed webhook configuration at it (what --webhook-url does at install).
    let url = format!("https://127.0.0.1:{}/inject", hook.port());
    let (code, out, err) = install(&["--ca", ca, "--kube-version", "1.20", "--webhook-url", &url]);
    assert_eq!(code, 0, "{err}");
    let hook_config = docs(&out)
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("a webhook configuration");
    server.apply_object(&hook_config);

    labelled_namespace(&server, "shop", Some("enabled"));
    labelled_namespace(&server, "plain", None);
    // The API server reads webhook configurations from an informer, and the policy is
    // Ignore: pods created before it is in force are admitted unchanged. Wait for the first
    // injected one.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    let injected = loop {
        n += 1;
        let (code, pod) = create_pod(&server, "shop", &format!("warmup-{n}"), json!({}));
        assert_eq!(code, 201, "{pod}");
        if pod["metadata"]["annotations"]["remora.io/injected"].is_string() {
            break pod;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pod in the labelled namespace was injected within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        container_names(&injected, "initContainers"),
        ["remora-init"]
    );
    // --inject-classic (the 1.20 test server has no native sidecars): the proxy first.
    assert_eq!(
        container_names(&injected, "containers"),
        ["remora-proxy", "app"]
    );
    let env = &injected["spec"]["containers"][0]["env"];
    let control_addr = env
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "REMORA_CONTROL_ADDR"))
        .map(|v| v["value"].clone());
    assert_eq!(
        control_addr,
        Some("remora-control.remora.svc.cluster.local:8086".into())
    );
    let init_env = &injected["spec"]["initContainers"][0]["env"][0];
    assert_eq!(init_env["name"], "REMORA_TRUST_BUNDLE");
    assert_eq!(
        init_env["value"].as_str(),
        Some(pki.issuer.bundle_pem.as_str()),
        "the proxies trust the installed CA"
    );

    // Left alone: another namespace, an opted-out pod.
    let (code, pod) = create_pod(&server, "plain", "other", json!({}));
    assert_eq!(code, 201, "{pod}");
    assert_eq!(container_names(&pod, "containers"), ["app"]);
    assert!(pod["spec"]["initContainers"].is_null());
    let (code, pod) = create_pod(
        &server,
        "shop",
        "opted-out",
        json!({"remora.io/inject": "disabled"}),
    );
    assert_eq!(code, 201, "{pod}");
    assert_eq!(container_names(&pod, "containers"), ["app"]);
    // A wrong annotation is refused with a message naming it, not injected wrongly.
    let (code, answer) = create_pod(
        &server,
        "shop",
        "bad",
        json!({"remora.io/opaque-ports": "mysql"}),
    );
    assert_eq!(code, 400, "{answer}");
    let msg = answer["message"].as_str().unwrap_or("");
    assert!(msg.contains("remora.io/opaque-ports"), "{msg}");
}

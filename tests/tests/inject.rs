//! `remora inject` as a user runs it: the binary on a manifest with every kind it handles,
//! its output parsed as the Kubernetes types and applied to the real test API server.

use std::process::Stdio;

use remora_tests::kube::{ApiServer, repo_root};
use remora_tests::netns::workspace_binary;
use serde_json::Value;

fn inject(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(workspace_binary("remora"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("remora inject");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    let d: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("output is YAML");
    d.into_iter().filter(|v| !v.is_null()).collect()
}

fn pod_spec(doc: &Value) -> &Value {
    match doc["kind"].as_str() {
        Some("Pod") => &doc["spec"],
        Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &doc["spec"]["template"]["spec"],
    }
}

#[test]
fn inject_every_kind_and_apply_to_a_real_api_server() {
    let dir = remora_tests::control::scratch("inject");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca");
    remora_certs::ca::init_dir(&ca, "cluster.local").unwrap();
    let bundle = ca.join("ca.crt");
    let bundle = bundle.to_str().unwrap();
    let input = repo_root().join("tests/manifests/inject-input.yaml");
    let (code, out, err) = inject(&["--trust-bundle", bundle, input.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    for note in [
        "Deployment/web injected",
        "StatefulSet/db injected",
        "Job/migrate injected",
        "CronJob/report injected",
        "Pod/legacy has remora.io/inject: disabled",
        "ConfigMap/settings: kind ConfigMap has no pods",
        "Pod/listed injected",
    ] {
        assert!(err.contains(note), "{note} missing from:\n{err}");
    }
    let out_docs = docs(&out);
    assert_eq!(out_docs.len(), 10);
    // Typed: the injected workloads are valid Kubernetes objects.
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core};
    let typed = |d: &Value| -> Result<(), String> {
        let r = match d["kind"].as_str() {
            Some("Deployment") => serde_json::from_value::<apps::Deployment>(d.clone()).map(drop),
            Some("StatefulSet") => serde_json::from_value::<apps::StatefulSet>(d.clone()).map(drop),
            Some("DaemonSet") => serde_json::from_value::<apps::DaemonSet>(d.clone()).map(drop),
            Some("ReplicaSet") => serde_json::from_value::<apps::ReplicaSet>(d.clone()).map(drop),
            Some("Pod") => serde_json::from_value::<core::Pod>(d.clone()).map(drop),
            Some("ConfigMap") => serde_json::from_value::<core::ConfigMap>(d.clone()).map(drop),
            Some("Job") => {
                serde_json::from_value::<k8s_openapi::api::batch::v1::Job>(d.clone()).map(drop)
            }
            // batch/v1beta1 here (the test API server is v1.20); its pod spec is checked.
            _ => serde_json::from_value::<core::PodSpec>(pod_spec(d).clone()).map(drop),
        };
        r.map_err(|e| format!("{}: {e}", d["kind"]))
    };
    for d in out_docs.iter().filter(|d| d["kind"] != "List") {
        typed(d).unwrap();
    }
    let web = &out_docs[0];
    let spec = pod_spec(web);
    assert_eq!(spec["initContainers"][0]["name"], "remora-init");
    assert_eq!(spec["initContainers"][1]["name"], "remora-proxy");
    assert_eq!(spec["containers"][0]["name"], "web", "the app stays first");
    let init_args: Vec<&str> = spec["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        init_args
            .windows(2)
            .any(|w| w == ["--skip-outbound-cidrs", "169.254.169.254/32"]),
        "{init_args:?}"
    );
    let env = spec["initContainers"][1]["env"].as_array().unwrap();
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(var("REMORA_OPAQUE_PORTS"), Some("6379".into()));
    assert_eq!(var("REMORA_IDENTITY_MODE"), Some("control".into()));
    assert_eq!(
        var("REMORA_DRAIN_TIMEOUT"),
        None,
        "30s default fits a 60 s grace period"
    );
    // Untouched fields are where they were.
    let keys: Vec<&String> = web["spec"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "replicas",
            "revisionHistoryLimit",
            "selector",
            "strategy",
            "template"
        ]
    );
    assert_eq!(
        web["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    // Opted out and unknown kinds pass through unchanged.
    assert!(pod_spec(&out_docs[7]).get("initContainers").is_none());
    assert_eq!(out_docs[8]["data"]["color"], "blue");
    // Idempotent: injecting the output again changes nothing (stdin this time).
    let (code, again, err) = inject(&["--trust-bundle", bundle, "-"], Some(&out));
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);
    assert!(err.contains("already injected"), "{err}");

    // The real API server stores every object. It is v1.20, older than native sidecars
    // (1.29: server-side apply refuses an init container's restartPolicy there), which is
    // what --classic is for: that output goes to it.
    let (code, classic, err) = inject(
        &[
            "--classic",
            "--trust-bundle",
            bundle,
            input.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("remora-proxy await"),
        "Job guidance in classic mode: {err}"
    );
    let classic_docs = docs(&classic);
    assert_eq!(
        pod_spec(&classic_docs[0])["containers"][0]["name"],
        "remora-proxy"
    );
    let api = ApiServer::start();
    api.create_namespace("shop");
    for d in &classic_docs {
        match d["kind"].as_str() {
            Some("List") => {
                for item in d["items"].as_array().unwrap() {
                    api.apply_object(item);
                }
            }
            _ => api.apply_object(d),
        }
    }
    let stored = api.get("/apis/apps/v1/namespaces/shop/deployments/web");
    assert_eq!(
        stored["spec"]["template"]["spec"]["containers"][0]["name"],
        "remora-proxy"
    );
    assert_eq!(
        stored["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "remora-init"
    );
    let stored = api.get("/api/v1/namespaces/shop/pods/listed");
    assert_eq!(stored["spec"]["initContainers"][0]["name"], "remora-init");
}

#[test]
fn inject_refuses_bad_input_and_writes_nothing() {
    let dir = remora_tests::control::scratch("inject-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let (code, out, err) = inject(&["-"], Some("kind: Pod\n"));
    assert_eq!(code, 2);
    assert!(err.contains("--trust-bundle is required"), "{err}");
    assert!(out.is_empty());
    let ca = dir.join("ca");
    remora_certs::ca::init_dir(&ca, "cluster.local").unwrap();
    let bundle = ca.join("ca.crt");
    let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: a, image: x}]}\n";
    let (code, out, err) = inject(
        &["--trust-bundle", bundle.to_str().unwrap(), "-"],
        Some(&format!("{good}---\nkind: [\n")),
    );
    assert_eq!(code, 1);
    assert!(err.contains("document 2: not valid YAML"), "{err}");
    assert!(out.is_empty(), "nothing half-written: {out}");
}

/// The golden files: each manifest under `tests/manifests/inject/` injected with a fixed trust
/// bundle (`ca.crt` there, a certificate only) is byte for byte its `.golden` file. A change
/// to what inject writes shows here as a diff to review; `REMORA_UPDATE_GOLDEN=1` rewrites
/// them. Every output is also parsed as the Kubernetes types, and the `--classic` output of
/// every input (the test API server predates native sidecars) is applied to the real server.
#[test]
fn golden_manifests_parse_as_kubernetes_types_and_apply() {
    let dir = repo_root().join("tests/manifests/inject");
    let bundle = dir.join("ca.crt");
    let bundle = bundle.to_str().unwrap();
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 5,
        "the golden inputs are missing: {inputs:?}"
    );
    let update = std::env::var_os("REMORA_UPDATE_GOLDEN").is_some();
    let api = ApiServer::start();
    api.create_namespace("shop");
    for input in &inputs {
        let path = input.to_str().unwrap();
        let args = [
            "--trust-bundle",
            bundle,
            "--proxy-image",
            "remora-proxy:golden",
            path,
        ];
        let (code, out, err) = inject(&args, None);
        assert_eq!(code, 0, "{path}: {err}");
        let golden = input.with_extension("golden");
        if update {
            std::fs::write(&golden, &out).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (REMORA_UPDATE_GOLDEN=1 writes it)",
                golden.display()
            )
        });
        assert!(
            out == want,
            "{path}: the output differs from {}; review the diff, then REMORA_UPDATE_GOLDEN=1\n--- got ---\n{out}",
            golden.display()
        );
        for d in docs(&out) {
            typed_any(&d);
        }
        let mut classic = vec!["--classic"];
        classic.extend_from_slice(&args);
        let (code, out, err) = inject(&classic, None);
        assert_eq!(code, 0, "{path} --classic: {err}");
        for d in docs(&out) {
            match d["items"].as_array() {
                Some(items) => items.iter().for_each(|i| api.apply_object(i)),
                None => api.apply_object(&d),
            }
        }
    }
    // What the server stored is injected where it should be and untouched elsewhere.
    let stored = api.get("/apis/apps/v1/namespaces/shop/deployments/checkout");
    let spec = &stored["spec"]["template"]["spec"];
    let names = |f: &str| -> Vec<String> {
        spec[f]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("initContainers"), ["remora-init", "migrate"]);
    assert_eq!(names("containers"), ["remora-proxy", "checkout", "logs"]);
    let legacy = api.get("/apis/apps/v1/namespaces/shop/deployments/legacy");
    assert!(legacy["spec"]["template"]["spec"]["initContainers"].is_null());
    api.get("/apis/batch/v1beta1/namespaces/shop/cronjobs/nightly");
    api.get("/apis/apps/v1/namespaces/shop/daemonsets/node-agent");
}

/// Parses a document as its Kubernetes type (k8s-openapi), each `List` item included.
fn typed_any(d: &Value) {
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    let r = match d["kind"].as_str() {
        Some("List") => {
            d["items"].as_array().unwrap().iter().for_each(typed_any);
            Ok(())
        }
        Some("Deployment") => serde_json::from_value::<apps::Deployment>(d.clone()).map(drop),
        Some("StatefulSet") => serde_json::from_value::<apps::StatefulSet>(d.clone()).map(drop),
        Some("DaemonSet") => serde_json::from_value::<apps::DaemonSet>(d.clone()).map(drop),
        Some("Pod") => serde_json::from_value::<core::Pod>(d.clone()).map(drop),
        Some("Service") => serde_json::from_value::<core::Service>(d.clone()).map(drop),
        Some("ConfigMap") => serde_json::from_value::<core::ConfigMap>(d.clone()).map(drop),
        Some("Job") => serde_json::from_value::<batch::Job>(d.clone()).map(drop),
        // batch/v1beta1 (the test server is v1.20) has batch/v1's shape.
        Some("CronJob") => {
            let mut v1 = d.clone();
            v1["apiVersion"] = "batch/v1".into();
            serde_json::from_value::<batch::CronJob>(v1).map(drop)
        }
        other => panic!("no type for {other:?}"),
    };
    r.unwrap_or_else(|e| {
        panic!(
            "{} is not a valid {}: {e}",
            d["metadata"]["name"], d["kind"]
        )
    });
}

//! `remora inject`: Kubernetes YAML in, the same YAML with the remora sidecar out (like
//! `linkerd inject`). Pure functions over an order-preserving YAML value: every field it does
//! not touch keeps its place; comments do not survive (the YAML model has none).
//!
//! The injected pod (names are a contract with `remora-proxy init`, the proxy's knobs and the
//! README): an init container `remora-init` (NET_ADMIN) that installs the interception rules
//! and writes the trust bundle into the identity volume, then the proxy `remora-proxy` — a
//! native sidecar (an init container with `restartPolicy: Always` and a startup probe on
//! `/ready`, so the app starts once the proxy is ready and Jobs complete) or, with `--classic`,
//! the first regular container — getting its certificate from the control plane with a
//! projected ServiceAccount token (audience `remora`).

use serde_yaml::{Mapping, Value};

/// The annotation that marks an injected pod template (idempotency).
pub const INJECTED: &str = "remora.io/injected";
/// `disabled` opts a workload (or its pod template) out.
pub const INJECT: &str = "remora.io/inject";
pub const TOKEN_AUDIENCE: &str = "remora";
pub const PROXY_UID: i64 = 2102;
pub const DEFAULT_CONTROL_ADDR: &str = "remora-control.remora.svc.cluster.local:8086";

/// The annotations read, each a comma list: ports (or ranges `a-b`), or CIDRs.
const OPAQUE_PORTS: &str = "remora.io/opaque-ports";
const SKIP_INBOUND: &str = "remora.io/skip-inbound-ports";
const SKIP_OUTBOUND: &str = "remora.io/skip-outbound-ports";
const SKIP_CIDRS: &str = "remora.io/skip-outbound-cidrs";

#[derive(Clone, Debug)]
pub struct Settings {
    /// PEM roots the proxies verify the control plane and peers with.
    pub trust_bundle: String,
    pub trust_domain: String,
    pub control_addr: String,
    pub proxy_image: String,
    /// A regular container instead of a native sidecar (clusters before 1.29).
    pub classic: bool,
}

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    OptedOut,
    /// Not a kind with pods (ConfigMap, Service…): passed through.
    Skipped(String),
}

/// Injects every document of `input`; returns the output and one note per object for stderr.
pub fn inject_yaml(input: &str, s: &Settings) -> Result<(String, Vec<String>), String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let v: Value = serde::Deserialize::deserialize(de)
            .map_err(|e| format!("document {}: not valid YAML: {e}", i + 1))?;
        docs.push(v);
    }
    let mut out = String::new();
    let mut notes = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let n = i + 1;
        for (what, outcome) in
            inject_object(&mut doc, s).map_err(|e| format!("document {n}: {e}"))?
        {
            notes.push(match outcome {
                Outcome::Injected => format!("document {n}: {what} injected"),
                Outcome::AlreadyInjected => {
                    format!("document {n}: {what} already injected; left as it is")
                }
                Outcome::OptedOut => {
                    format!("document {n}: {what} has {INJECT}: disabled; left as it is")
                }
                Outcome::Skipped(kind) => {
                    format!("document {n}: {what}: kind {kind} has no pods; left as it is")
                }
            });
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(&doc).map_err(|e| format!("document {n}: {e}"))?);
    }
    Ok((out, notes))
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

fn get<'a>(m: &'a Mapping, k: &str) -> Option<&'a Value> {
    m.get(key(k))
}

/// The mapping at `k`, created (at the end) when missing.
fn entry<'a>(m: &'a mut Mapping, k: &str) -> Result<&'a mut Mapping, String> {
    if !m.contains_key(key(k)) {
        m.insert(key(k), Value::Mapping(Mapping::new()));
    }
    match m.get_mut(key(k)) {
        Some(Value::Mapping(inner)) => Ok(inner),
        _ => Err(format!("`{k}` is not a mapping")),
    }
}

fn name_of(m: &Mapping) -> String {
    let kind = get(m, "kind").and_then(Value::as_str).unwrap_or("object");
    let name = get(m, "metadata")
        .and_then(Value::as_mapping)
        .and_then(|md| get(md, "name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{kind}/{name}")
}

fn annotation<'a>(md: Option<&'a Value>, k: &str) -> Option<&'a str> {
    md?.as_mapping()
        .and_then(|m| get(m, "annotations"))
        .and_then(Value::as_mapping)
        .and_then(|a| get(a, k))
        .and_then(Value::as_str)
}

/// Injects one object (or each item of a `List`).
pub fn inject_object(doc: &mut Value, s: &Settings) -> Result<Vec<(String, Outcome)>, String> {
    let Some(m) = doc.as_mapping_mut() else {
        return Err("not a Kubernetes object (a mapping with apiVersion and kind)".into());
    };
    let what = name_of(m);
    let kind = get(m, "kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" || kind.ends_with("List") && get(m, "items").is_some() {
        let mut all = Vec::new();
        if let Some(Value::Sequence(items)) = m.get_mut(key("items")) {
            for item in items {
                all.extend(inject_object(item, s)?);
            }
        }
        return Ok(all);
    }
    let workload_opt_out = annotation(get(m, "metadata"), INJECT) == Some("disabled");
    let path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(vec![(what, Outcome::Skipped(kind))]),
    };
    if workload_opt_out {
        return Ok(vec![(what, Outcome::OptedOut)]);
    }
    let mut pod: &mut Mapping = m;
    for p in path {
        pod = entry(pod, p).map_err(|e| format!("{what}: {e}"))?;
    }
    let job = matches!(kind.as_str(), "Job" | "CronJob")
        || get(pod, "spec")
            .and_then(Value::as_mapping)
            .and_then(|sp| get(sp, "restartPolicy"))
            .and_then(Value::as_str)
            .is_some_and(|r| r != "Always");
    let outcome = inject_pod(pod, s).map_err(|e| format!("{what}: {e}"))?;
    if outcome == Outcome::Injected && job && s.classic {
        return Ok(vec![(
            format!(
                "{what} (a Job in --classic mode: wrap its command as `remora-proxy await -- CMD` so the proxy stops when it ends)"
            ),
            outcome,
        )]);
    }
    Ok(vec![(what, outcome)])
}

fn ports_annotation(md: Option<&Value>, k: &str) -> Result<Option<String>, String> {
    let Some(v) = annotation(md, k) else {
        return Ok(None);
    };
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ok = match part.split_once('-') {
            Some((a, b)) => {
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a > 0 && a <= b)
            }
            None => part.parse::<u16>().is_ok_and(|p| p > 0),
        };
        if !ok {
            return Err(format!(
                "annotation {k}: `{part}` is not a port (1-65535) or a range a-b"
            ));
        }
    }
    Ok(Some(
        v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(","),
    ))
}

fn cidrs_annotation(md: Option<&Value>) -> Result<Option<String>, String> {
    let Some(v) = annotation(md, SKIP_CIDRS) else {
        return Ok(None);
    };
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (ip, len) = match part.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (part, None),
        };
        let ok = match ip.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                len.is_none_or(|l| l.parse::<u8>().is_ok_and(|l| l <= max))
            }
            Err(_) => false,
        };
        if !ok {
            return Err(format!(
                "annotation {SKIP_CIDRS}: `{part}` is not a CIDR (e.g. 10.0.0.0/8)"
            ));
        }
    }
    Ok(Some(
        v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(","),
    ))
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or(Value::Null)
}

fn env(name: &str, value: &str) -> Value {
    let mut m = Mapping::new();
    m.insert(key("name"), key(name));
    m.insert(key("value"), key(value));
    Value::Mapping(m)
}

/// The list at `k`, edited where it is (a missing one is added at the end).
fn list<'a>(m: &'a mut Mapping, k: &str) -> Result<&'a mut Vec<Value>, String> {
    if matches!(get(m, k), None | Some(Value::Null)) {
        m.insert(key(k), Value::Sequence(Vec::new()));
    }
    match m.get_mut(key(k)) {
        Some(Value::Sequence(v)) => Ok(v),
        _ => Err(format!("spec.{k} is not a list")),
    }
}

/// Injects a pod template (`metadata` + `spec`) in place.
pub fn inject_pod(pod: &mut Mapping, s: &Settings) -> Result<Outcome, String> {
    let md = get(pod, "metadata");
    if annotation(md, INJECTED).is_some() {
        return Ok(Outcome::AlreadyInjected);
    }
    if annotation(md, INJECT) == Some("disabled") {
        return Ok(Outcome::OptedOut);
    }
    let opaque = ports_annotation(md, OPAQUE_PORTS)?;
    let mut skip_in = String::from("4191");
    if let Some(p) = ports_annotation(md, SKIP_INBOUND)? {
        skip_in.push(',');
        skip_in.push_str(&p);
    }
    let skip_out = ports_annotation(md, SKIP_OUTBOUND)?;
    let skip_cidrs = cidrs_annotation(md)?;
    let grace = get(pod, "spec")
        .and_then(Value::as_mapping)
        .and_then(|sp| get(sp, "terminationGracePeriodSeconds"))
        .and_then(Value::as_i64);

    // The init container: rules, then the trust bundle into the identity volume.
    let mut args: Vec<Value> = [
        "init",
        "--inbound-port",
        "4143",
        "--outbound-port",
        "4140",
        "--proxy-uid",
    ]
    .iter()
    .map(|a| key(a))
    .collect();
    args.push(key(&PROXY_UID.to_string()));
    args.push(key("--skip-inbound-ports"));
    args.push(key(&skip_in));
    if let Some(p) = &skip_out {
        args.extend([key("--skip-outbound-ports"), key(p)]);
    }
    if let Some(c) = &skip_cidrs {
        args.extend([key("--skip-outbound-cidrs"), key(c)]);
    }
    args.extend([
        key("--trust-bundle-out"),
        key("/var/run/remora/identity/ca.crt"),
    ]);
    let mut init = match yaml(
        "name: remora-init\n\
         securityContext:\n  runAsUser: 0\n  runAsNonRoot: false\n  capabilities:\n    add: [NET_ADMIN, NET_RAW]\n    drop: [ALL]\n\
         volumeMounts:\n- name: remora-identity\n  mountPath: /var/run/remora/identity\n\
         resources:\n  requests: {cpu: 10m, memory: 10Mi}\n  limits: {memory: 50Mi}\n",
    ) {
        Value::Mapping(m) => m,
        _ => return Err("internal: init container template".into()),
    };
    let mut head = Mapping::new();
    head.insert(key("name"), key("remora-init"));
    head.insert(key("image"), key(&s.proxy_image));
    head.insert(key("args"), Value::Sequence(args));
    head.insert(
        key("env"),
        Value::Sequence(vec![env("REMORA_TRUST_BUNDLE", &s.trust_bundle)]),
    );
    init.remove(key("name"));
    head.extend(init);

    // The proxy.
    let mut penv = vec![
        yaml("name: _REMORA_NS\nvalueFrom: {fieldRef: {fieldPath: metadata.namespace}}"),
        yaml("name: _REMORA_SA\nvalueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}"),
        env("REMORA_IDENTITY_MODE", "control"),
        env(
            "REMORA_IDENTITY",
            &format!(
                "spiffe://{}/ns/$(_REMORA_NS)/sa/$(_REMORA_SA)",
                s.trust_domain
            ),
        ),
        env("REMORA_IDENTITY_TOKEN", "/var/run/remora/token/token"),
        env("REMORA_IDENTITY_DIR", "/var/run/remora/identity"),
        env("REMORA_CONTROL_ADDR", &s.control_addr),
    ];
    if let Some(p) = &opaque {
        penv.push(env("REMORA_OPAQUE_PORTS", p));
    }
    // The drain must end before the kubelet's SIGKILL: 5 s of margin under the grace period.
    if let Some(g) = grace.filter(|g| *g < 35) {
        penv.push(env("REMORA_DRAIN_TIMEOUT", &format!("{}s", (g - 5).max(1))));
    }
    let mut proxy = Mapping::new();
    proxy.insert(key("name"), key("remora-proxy"));
    proxy.insert(key("image"), key(&s.proxy_image));
    proxy.insert(key("env"), Value::Sequence(penv));
    let rest = yaml(&format!(
        "ports:\n- {{name: remora-inbound, containerPort: 4143, protocol: TCP}}\n- {{name: remora-admin, containerPort: 4191, protocol: TCP}}\n\
         readinessProbe: {{httpGet: {{path: /ready, port: 4191}}, periodSeconds: 5}}\n\
         livenessProbe: {{httpGet: {{path: /live, port: 4191}}, periodSeconds: 10}}\n\
         resources:\n  requests: {{cpu: 10m, memory: 20Mi}}\n  limits: {{memory: 128Mi}}\n\
         securityContext:\n  runAsUser: {PROXY_UID}\n  runAsGroup: {PROXY_UID}\n  runAsNonRoot: true\n  allowPrivilegeEscalation: false\n  readOnlyRootFilesystem: true\n  capabilities: {{drop: [ALL]}}\n\
         volumeMounts:\n- {{name: remora-identity, mountPath: /var/run/remora/identity}}\n- {{name: remora-token, mountPath: /var/run/remora/token, readOnly: true}}\n"
    ));
    if let Value::Mapping(r) = rest {
        proxy.extend(r);
    }
    if !s.classic {
        proxy.insert(key("restartPolicy"), key("Always"));
        proxy.insert(
            key("startupProbe"),
            yaml("httpGet: {path: /ready, port: 4191}\nperiodSeconds: 1\nfailureThreshold: 120"),
        );
    }

    let md = entry(pod, "metadata")?;
    entry(md, "annotations")?.insert(key(INJECTED), key(env!("CARGO_PKG_VERSION")));
    let spec = entry(pod, "spec")?;
    // The projected token needs a named account (the API server refuses it otherwise, where
    // the ServiceAccount admission plugin has not filled in `default`); the identity is
    // derived from it too.
    if matches!(get(spec, "serviceAccountName"), None | Some(Value::Null)) {
        spec.insert(key("serviceAccountName"), key("default"));
    }
    let mut front = vec![Value::Mapping(head)];
    if s.classic {
        list(spec, "containers")?.insert(0, Value::Mapping(proxy));
    } else {
        front.push(Value::Mapping(proxy));
    }
    list(spec, "initContainers")?.splice(0..0, front);
    let volumes = list(spec, "volumes")?;
    volumes.push(yaml("name: remora-identity\nemptyDir: {medium: Memory}"));
    volumes.push(yaml(&format!(
        "name: remora-token\nprojected:\n  sources:\n  - serviceAccountToken: {{audience: {TOKEN_AUDIENCE}, expirationSeconds: 3600, path: token}}"
    )));
    Ok(Outcome::Injected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(classic: bool) -> Settings {
        Settings {
            trust_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            trust_domain: "cluster.local".into(),
            control_addr: DEFAULT_CONTROL_ADDR.into(),
            proxy_image: "remora-proxy:test".into(),
            classic,
        }
    }

    const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      terminationGracePeriodSeconds: 20\n      containers:\n      - name: web\n        image: nginx\n        ports: [{containerPort: 8080}]\n      dnsPolicy: ClusterFirst\n";

    #[test]
    fn injects_a_deployment_and_is_idempotent() {
        let (out, notes) = inject_yaml(DEPLOY, &settings(false)).unwrap();
        assert_eq!(notes, ["document 1: Deployment/web injected"]);
        let v: Value = serde_yaml::from_str(&out).unwrap();
        let spec = &v["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], "remora-init");
        assert_eq!(spec["initContainers"][1]["name"], "remora-proxy");
        assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(spec["containers"][0]["name"], "web");
        assert_eq!(
            spec["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "remora"
        );
        // Drain 5 s under the grace period.
        let env = spec["initContainers"][1]["env"].as_sequence().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "REMORA_DRAIN_TIMEOUT" && e["value"] == "15s")
        );
        // Untouched fields keep their order.
        let keys: Vec<&str> = v["spec"]
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(keys, ["replicas", "selector", "template"]);
        let pod_keys: Vec<&str> = spec
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            pod_keys,
            [
                "terminationGracePeriodSeconds",
                "containers",
                "dnsPolicy",
                "serviceAccountName",
                "initContainers",
                "volumes"
            ]
        );
        // Again: the same output, and a note saying so.
        let (again, notes) = inject_yaml(&out, &settings(false)).unwrap();
        assert_eq!(again, out);
        assert!(notes[0].contains("already injected"), "{notes:?}");
    }

    #[test]
    fn kinds_lists_opt_out_and_classic() {
        let input = format!(
            "{DEPLOY}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{a: b}}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: batch/v1\n  kind: Job\n  metadata: {{name: j}}\n  spec:\n    template:\n      spec:\n        restartPolicy: Never\n        containers: [{{name: j, image: busybox}}]\n- apiVersion: batch/v1\n  kind: CronJob\n  metadata: {{name: cj, annotations: {{remora.io/inject: disabled}}}}\n  spec: {{schedule: '* * * * *', jobTemplate: {{spec: {{template: {{spec: {{containers: []}}}}}}}}}}\n"
        );
        let (out, notes) = inject_yaml(&input, &settings(true)).unwrap();
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(
            notes[1].contains("ConfigMap/c: kind ConfigMap has no pods"),
            "{notes:?}"
        );
        assert!(
            notes[2].contains("Job/j") && notes[2].contains("remora-proxy await"),
            "{notes:?}"
        );
        assert!(
            notes[3].contains("CronJob/cj has remora.io/inject: disabled"),
            "{notes:?}"
        );
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3);
        // Classic: the proxy is the first container, no restartPolicy on it.
        let job = &docs[2]["items"][0]["spec"]["template"]["spec"];
        assert_eq!(job["containers"][0]["name"], "remora-proxy");
        assert!(job["containers"][0].get("restartPolicy").is_none());
        assert_eq!(docs[1]["data"]["a"], "b");
    }

    #[test]
    fn bad_input_names_the_document_and_annotation() {
        let err = inject_yaml("a: [\n", &settings(false)).unwrap_err();
        assert!(err.starts_with("document 1: not valid YAML"), "{err}");
        let bad = DEPLOY.replace("      labels: {app: web}\n    spec:", "      labels: {app: web}\n      annotations: {remora.io/skip-outbound-ports: '80,x'}\n    spec:");
        let err = inject_yaml(&bad, &settings(false)).unwrap_err();
        assert!(
            err.contains("Deployment/web: annotation remora.io/skip-outbound-ports: `x`"),
            "{err}"
        );
        let err = inject_yaml("- 1\n- 2\n", &settings(false)).unwrap_err();
        assert!(err.contains("not a Kubernetes object"), "{err}");
    }
}

//! A manifest's pods as the proxy will see them: injected or not, ports that clash with the
//! proxy's, probes that strict mTLS would refuse, and a drain longer than the grace period.

use std::time::Duration;

use serde_json::Value;

use super::Finding;

/// The proxy's own ports in an injected pod (inbound, outbound, admin).
const PROXY_PORTS: [i64; 3] = [4143, 4140, 4191];
/// `remora-proxy`'s defaults (`REMORA_PROBE_PATHS`, `REMORA_DRAIN_TIMEOUT`).
const DEFAULT_PROBE_PATHS: &[&str] = &[
    "/healthz", "/readyz", "/livez", "/health", "/ready", "/live",
];
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
const DEFAULT_GRACE: i64 = 30;

/// Checks every document of a YAML manifest.
pub fn manifest(text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match <Value as serde::Deserialize>::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(doc) => out.extend(object(&doc)),
            Err(e) => out.push(Finding::error(
                format!("document {}", i + 1),
                format!("not valid YAML: {e}"),
                "fix the YAML (kubectl would refuse it too)",
            )),
        }
    }
    out
}

/// Checks one object (or each item of a `List`).
pub fn object(doc: &Value) -> Vec<Finding> {
    let kind = doc["kind"].as_str().unwrap_or("");
    if let Some(items) = doc["items"].as_array() {
        return items.iter().flat_map(object).collect();
    }
    let pod = match kind {
        "Pod" => doc,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &doc["spec"]["template"]
        }
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => return Vec::new(),
    };
    let what = format!(
        "{kind}/{}",
        doc["metadata"]["name"]
            .as_str()
            .or(doc["metadata"]["generateName"].as_str())
            .unwrap_or("?")
    );
    pod_template(&what, pod)
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|c| c["name"] == name)
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    named(&container["env"], name)?["value"].as_str()
}

fn ports_in(list: &str) -> Vec<(u16, u16)> {
    list.split(',')
        .filter_map(|p| {
            let p = p.trim();
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Checks a pod template (`metadata` + `spec`) named `what`.
pub fn pod_template(what: &str, pod: &Value) -> Vec<Finding> {
    let spec = &pod["spec"];
    let proxy = named(&spec["initContainers"], "remora-proxy")
        .or_else(|| named(&spec["containers"], "remora-proxy"));
    let Some(proxy) = proxy else {
        if pod["metadata"]["annotations"]["remora.io/inject"] == "disabled" {
            return vec![Finding::ok(
                what,
                "opted out of the mesh (remora.io/inject: disabled)",
            )];
        }
        return vec![Finding::warning(
            what,
            "not injected: its traffic is outside the mesh (no mTLS, no identity)",
            "inject it with `remora inject FILE | kubectl apply -f -`, or label its namespace remora.io/inject=enabled and recreate the pod",
        )];
    };
    let mut out = Vec::new();
    let skip_in: Vec<(u16, u16)> = named(&spec["initContainers"], "remora-init")
        .and_then(|c| c["args"].as_array())
        .and_then(|a| {
            a.windows(2)
                .find(|w| w[0] == "--skip-inbound-ports")
                .and_then(|w| w[1].as_str())
        })
        .map(ports_in)
        .unwrap_or_default();
    let strict = env(proxy, "REMORA_MTLS") == Some("strict");
    let probe_paths: Vec<String> = match env(proxy, "REMORA_PROBE_PATHS") {
        Some(p) => p.split(',').map(|s| s.trim().to_string()).collect(),
        None => DEFAULT_PROBE_PATHS.iter().map(|s| s.to_string()).collect(),
    };
    let apps = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] != "remora-proxy");
    for c in apps {
        let cname = c["name"].as_str().unwrap_or("?");
        for p in c["ports"].as_array().into_iter().flatten() {
            let port = p["containerPort"].as_i64().unwrap_or(0);
            if PROXY_PORTS.contains(&port) {
                out.push(Finding::error(
                    format!("{what} container {cname}"),
                    format!("port {port} is the proxy's (inbound 4143, outbound 4140, admin 4191): one of them cannot listen"),
                    "move the application off ports 4140, 4143 and 4191",
                ));
            }
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if let Some(f) = probe_finding(what, cname, probe, c, &skip_in, strict, &probe_paths) {
                out.push(f);
            }
        }
    }
    if spec["hostNetwork"] == true {
        out.push(Finding::error(
            what,
            "hostNetwork: true with the sidecar: its interception rules would apply to the node's network namespace",
            "set remora.io/inject: disabled on host-network pods",
        ));
    }
    let grace = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(DEFAULT_GRACE);
    let drain = match env(proxy, "REMORA_DRAIN_TIMEOUT").map(humantime::parse_duration) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            out.push(Finding::error(
                what,
                format!("REMORA_DRAIN_TIMEOUT is not a duration: {e}"),
                "write it like 25s",
            ));
            DEFAULT_DRAIN
        }
        None => DEFAULT_DRAIN,
    };
    if drain > Duration::from_secs(grace.max(0) as u64) {
        out.push(Finding::error(
            what,
            format!(
                "the proxy drains for up to {} but terminationGracePeriodSeconds is {grace}: the kubelet kills it mid-drain and cuts the connections it was finishing",
                humantime::format_duration(drain)
            ),
            format!("set REMORA_DRAIN_TIMEOUT below {grace}s, or raise terminationGracePeriodSeconds"),
        ));
    }
    if out.is_empty() {
        out.push(Finding::ok(
            what,
            "injected; ports, probes and drain fit the proxy",
        ));
    }
    out
}

fn probe_finding(
    what: &str,
    container: &str,
    probe: &str,
    c: &Value,
    skip_in: &[(u16, u16)],
    strict: bool,
    probe_paths: &[String],
) -> Option<Finding> {
    let p = &c[probe];
    let (port, problem) = if let Some(get) = p.get("httpGet") {
        let port = &get["port"];
        let path = get["path"].as_str().unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        if get["scheme"] == "HTTPS" {
            (
                port,
                "an HTTPS probe: the kubelet's TLS is not the mesh's mTLS".to_string(),
            )
        } else if !probe_paths.iter().any(|pp| pp == path) {
            (
                port,
                format!(
                    "an HTTP probe of {path}, which is not in REMORA_PROBE_PATHS ({})",
                    probe_paths.join(", ")
                ),
            )
        } else {
            return None;
        }
    } else if let Some(g) = p.get("grpc") {
        (
            &g["port"],
            "a gRPC probe: plaintext HTTP/2 is not a probe request".to_string(),
        )
    } else {
        // exec and tcpSocket probes do not depend on what the proxy lets through.
        return None;
    };
    // A named port resolves through the container's ports.
    let number = port.as_i64().or_else(|| {
        let name = port.as_str()?;
        named(&c["ports"], name)?["containerPort"].as_i64()
    })?;
    let skipped = skip_in
        .iter()
        .any(|(a, b)| (i64::from(*a)..=i64::from(*b)).contains(&number));
    if skipped {
        return None;
    }
    let subject = format!("{what} container {container} {probe}");
    let fix = format!(
        "add the path to REMORA_PROBE_PATHS, probe another port listed in remora.io/skip-inbound-ports, or use an exec probe (port {number})"
    );
    Some(if strict {
        Finding::error(
            subject,
            format!("{problem}: REMORA_MTLS=strict refuses it, so the probe fails"),
            fix,
        )
    } else {
        Finding::warning(
            subject,
            format!("{problem}: it works now, and fails once REMORA_MTLS=strict"),
            fix,
        )
    })
}

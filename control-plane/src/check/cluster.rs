//! A cluster, through a kubeconfig: the control plane installed and ready, the injection
//! webhook configured, and every pod of a namespace labelled `remora.io/inject=enabled`
//! injected and fit for its proxy ([`super::manifest::pod_template`]).

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams};

use super::Finding;
use crate::install::{NAMESPACE, SERVICE, WEBHOOK};

/// Pods looked at per namespace: enough to find a pattern, bounded for big clusters.
const PODS_PER_NAMESPACE: u32 = 500;

pub async fn cluster(client: kube::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    let fix_install = "install it: `remora install --ca DIR | kubectl apply -f -`";
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    match deployments.get_opt(SERVICE).await {
        Ok(Some(d)) => {
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            if ready == 0 {
                out.push(Finding::error(
                    format!("Deployment {NAMESPACE}/{SERVICE}"),
                    "the control plane has no ready replica: proxies get no certificates and no endpoints",
                    format!("look at `kubectl -n {NAMESPACE} describe pods -l app.kubernetes.io/name={SERVICE}` and its logs"),
                ));
            } else {
                out.push(Finding::ok(
                    format!("Deployment {NAMESPACE}/{SERVICE}"),
                    format!("{ready} ready replica(s)"),
                ));
            }
        }
        Ok(None) => out.push(Finding::error(
            format!("Deployment {NAMESPACE}/{SERVICE}"),
            "the control plane is not installed",
            fix_install,
        )),
        Err(e) => out.push(api_error(&format!("Deployment {NAMESPACE}/{SERVICE}"), e)),
    }
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    match hooks.get_opt(WEBHOOK).await {
        Ok(Some(_)) => out.push(Finding::ok(
            format!("MutatingWebhookConfiguration {WEBHOOK}"),
            "present",
        )),
        Ok(None) => out.push(Finding::error(
            format!("MutatingWebhookConfiguration {WEBHOOK}"),
            "missing: pods in labelled namespaces are created without the sidecar",
            fix_install,
        )),
        Err(e) => out.push(api_error(
            &format!("MutatingWebhookConfiguration {WEBHOOK}"),
            e,
        )),
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labelled = match namespaces
        .list(&ListParams::default().labels("remora.io/inject=enabled"))
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            out.push(api_error("namespaces", e));
            return out;
        }
    };
    if labelled.is_empty() {
        out.push(Finding::warning(
            "namespaces",
            "none is labelled remora.io/inject=enabled, so the webhook injects nothing",
            "label the namespaces to mesh: `kubectl label namespace NS remora.io/inject=enabled`",
        ));
    }
    for ns in labelled {
        let Some(name) = ns.metadata.name else {
            continue;
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
        let list = match pods
            .list(&ListParams::default().limit(PODS_PER_NAMESPACE))
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                out.push(api_error(&format!("pods in {name}"), e));
                continue;
            }
        };
        for pod in list {
            let pname = pod.metadata.name.clone().unwrap_or_default();
            let what = format!("Pod {name}/{pname}");
            let Ok(value) = serde_json::to_value(&pod) else {
                continue;
            };
            for mut f in super::manifest::pod_template(&what, &value) {
                if f.problem.starts_with("not injected") {
                    // In a labelled namespace the webhook should have: the pod predates it, or
                    // the control plane was down (failurePolicy Ignore).
                    f = Finding::error(
                        f.subject,
                        format!(
                            "not injected although {name} is labelled remora.io/inject=enabled: it was created before the webhook was in force, or while the control plane was down"
                        ),
                        "delete the pod so its controller recreates it with the sidecar (`kubectl rollout restart` for a Deployment)",
                    );
                }
                out.push(f);
            }
        }
    }
    out
}

fn api_error(subject: &str, e: kube::Error) -> Finding {
    let fix = match &e {
        kube::Error::Api(s) if s.code == 403 => {
            "give the kubeconfig's user read access to it (remora check only reads)"
        }
        _ => "check the kubeconfig (--kubeconfig) and that the API server is reachable",
    };
    Finding::error(subject, format!("cannot read it: {e}"), fix)
}

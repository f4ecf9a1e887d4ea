//! What the control plane may do in Kubernetes, and what to tell the operator when it may not.
//!
//! [`RULES`] is the one list of permissions the control plane needs. The ClusterRole in
//! `deploy/control-plane-rbac.yaml` and the README's "Permissions" section are the same list
//! (a test in `tests/tests/kube_identity.rs` compares all three and applies the manifest to a
//! real API server). When the API server answers 403, [`hint`] turns the error into one log line
//! naming the verb, the resource and the rule to add, so a missing permission is fixed from the
//! log alone instead of from a generic "forbidden".

use std::sync::atomic::{AtomicBool, Ordering};

use kube::runtime::watcher;

/// The ClusterRole the manifest installs and the hints name.
pub const CLUSTER_ROLE: &str = "remora-control";
/// Where the ClusterRole is, relative to the repository root.
pub const MANIFEST: &str = "deploy/control-plane-rbac.yaml";

/// One rule of the control plane's ClusterRole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The API group (`""` for core).
    pub group: &'static str,
    /// The plural resource name.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// What breaks without it, for the operator reading the hint.
    pub needed_for: &'static str,
}

/// Every permission the control plane uses, in the order the manifest lists them.
pub const RULES: &[Rule] = &[
    Rule {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
        needed_for: "discovery needs it",
    },
    Rule {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
        needed_for: "endpoint identities need it",
    },
    Rule {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
        needed_for: "telling each proxy its zone (zone-aware routing) needs it",
    },
    Rule {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
        needed_for: "discovery needs it",
    },
    Rule {
        group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: &["list", "watch"],
        needed_for: "policy from Gateway API HTTPRoutes needs it, where the CRDs are installed",
    },
    Rule {
        group: "gateway.networking.k8s.io",
        resource: "grpcroutes",
        verbs: &["list", "watch"],
        needed_for: "policy from Gateway API GRPCRoutes needs it, where the CRDs are installed",
    },
    Rule {
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        needed_for: "issuing certificates to ServiceAccount tokens needs it",
    },
];

impl Rule {
    /// The rule as one YAML flow mapping, the form the manifest and the README use:
    /// `{apiGroups: [""], resources: ["services"], verbs: ["list", "watch"]}`.
    pub fn yaml(&self) -> String {
        yaml_rule(self.group, self.resource, self.verbs)
    }
}

fn yaml_rule(group: &str, resource: &str, verbs: &[&str]) -> String {
    let verbs: Vec<String> = verbs.iter().map(|v| format!("\"{v}\"")).collect();
    format!(
        "{{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [{}]}}",
        verbs.join(", ")
    )
}

/// The rule that grants `resource` in `group`, if the control plane uses it.
pub fn rule_for(group: &str, resource: &str) -> Option<&'static Rule> {
    RULES
        .iter()
        .find(|r| r.group == group && r.resource == resource)
}

/// `Some(one log line)` when `err` is the API server's 403 for `verb` on `resource` in `group`
/// (`""` for core); `None` for any other error. The line names the account the API server
/// saw (from its message, when it says), the verb and resource, why the control plane needs it,
/// and the ClusterRole rule to add — the manifest's rule when the resource is one of [`RULES`].
pub fn hint(err: &kube::Error, verb: &str, group: &str, resource: &str) -> Option<String> {
    let kube::Error::Api(status) = err else {
        return None;
    };
    forbidden(status, verb, group, resource)
}

/// [`hint`] for a watcher's error: the verb is `list` for the initial list and `watch` for the
/// watch itself.
pub fn hint_for_watch(err: &watcher::Error, group: &str, resource: &str) -> Option<String> {
    match err {
        watcher::Error::InitialListFailed(e) => hint(e, "list", group, resource),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            hint(e, "watch", group, resource)
        }
        watcher::Error::WatchError(status) => forbidden(status, "watch", group, resource),
        watcher::Error::NoResourceVersion => None,
    }
}

fn forbidden(
    status: &kube::core::Status,
    verb: &str,
    group: &str,
    resource: &str,
) -> Option<String> {
    if status.code != 403 {
        return None;
    }
    // The API server's message is `… is forbidden: User "system:serviceaccount:ns:sa" cannot …`:
    // naming the account tells the operator which binding to check.
    let account = status
        .message
        .split_once("User \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(user, _)| format!(" ({user})"))
        .unwrap_or_default();
    let (rule, why) = match rule_for(group, resource) {
        Some(r) => (r.yaml(), r.needed_for),
        None => (
            yaml_rule(group, resource, &[verb]),
            "the control plane uses it",
        ),
    };
    Some(format!(
        "forbidden: the control plane's account{account} cannot {verb} {resource} ({why}); \
         add to ClusterRole {CLUSTER_ROLE}: {rule} ({MANIFEST})"
    ))
}

/// Remembers that a hint was logged, so a call retried every second logs it once per outage:
/// again only after the permission worked in between.
#[derive(Debug, Default)]
pub struct Reported(AtomicBool);

impl Reported {
    /// True the first time since the last [`Reported::cleared`] (or ever): log the hint now.
    pub fn first(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }

    /// The call succeeded: a later 403 is news again.
    pub fn cleared(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, reason)
                .with_code(code)
                .boxed(),
        )
    }

    const SA: &str = "system:serviceaccount:remora:remora-control";

    #[test]
    fn a_403_names_the_verb_the_resource_and_the_rule_to_add() {
        let e = api(
            403,
            "Forbidden",
            &format!(
                "services is forbidden: User \"{SA}\" cannot list resource \"services\" in API group \"\" at the cluster scope"
            ),
        );
        assert_eq!(
            hint(&e, "list", "", "services").unwrap(),
            format!(
                "forbidden: the control plane's account ({SA}) cannot list services (discovery needs it); \
                 add to ClusterRole remora-control: {{apiGroups: [\"\"], resources: [\"services\"], verbs: [\"list\", \"watch\"]}} \
                 (deploy/control-plane-rbac.yaml)"
            )
        );
        let e = api(403, "Forbidden", "no user in this message");
        let h = hint(&e, "create", "authentication.k8s.io", "tokenreviews").unwrap();
        assert!(
            h.starts_with(
                "forbidden: the control plane's account cannot create tokenreviews (issuing"
            ),
            "{h}"
        );
        assert!(
            h.contains("{apiGroups: [\"authentication.k8s.io\"], resources: [\"tokenreviews\"], verbs: [\"create\"]}"),
            "{h}"
        );
        assert!(!h.contains('\n'), "one line: {h}");
    }

    #[test]
    fn a_resource_outside_the_rules_gets_a_rule_for_the_verb_alone() {
        let e = api(403, "Forbidden", "");
        let h = hint(&e, "get", "apps", "deployments").unwrap();
        assert!(
            h.contains("{apiGroups: [\"apps\"], resources: [\"deployments\"], verbs: [\"get\"]}"),
            "{h}"
        );
    }

    #[test]
    fn only_a_403_is_a_permission_problem() {
        for code in [401, 404, 410, 500] {
            assert_eq!(
                hint(&api(code, "X", "m"), "list", "", "pods"),
                None,
                "{code}"
            );
        }
        let transport = kube::Error::Service("connection refused".into());
        assert_eq!(hint(&transport, "list", "", "pods"), None);
    }

    #[test]
    fn a_watcher_error_carries_its_verb() {
        let list = watcher::Error::InitialListFailed(api(403, "Forbidden", ""));
        assert!(
            hint_for_watch(&list, "discovery.k8s.io", "endpointslices")
                .unwrap()
                .contains("cannot list endpointslices (discovery needs it)")
        );
        let watch = watcher::Error::WatchError(
            kube::core::Status::failure("", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        assert!(
            hint_for_watch(&watch, "", "pods")
                .unwrap()
                .contains("cannot watch pods (endpoint identities need it)")
        );
        assert_eq!(
            hint_for_watch(&watcher::Error::NoResourceVersion, "", "pods"),
            None
        );
    }

    #[test]
    fn reported_once_per_outage() {
        let r = Reported::default();
        assert!(r.first());
        assert!(!r.first());
        r.cleared();
        assert!(r.first());
    }
}

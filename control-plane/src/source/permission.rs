//! What to grant when the API server refuses the control plane (placeholder until the RBAC
//! work lands; replaced by the full module).

/// The one log line for a 403 on `verb` `group/resource`; `None` for any other error.
pub fn hint(err: &kube::Error, verb: &str, group: &str, resource: &str) -> Option<String> {
    match err {
        kube::Error::Api(s) if s.code == 403 => Some(format!(
            "forbidden: the control plane's account cannot {verb} {resource}; add to ClusterRole remora-control: {{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [\"{verb}\"]}} (deploy/control-plane-rbac.yaml)"
        )),
        _ => None,
    }
}

//! Proves who a caller is with the Kubernetes TokenReview API: the caller sends its service
//! account token, the API server says whose it is, and the username maps to the SPIFFE
//! identity the caller may be issued.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use remora_certs::SpiffeId;

use crate::source::kubernetes::describe;

/// Asks the API server whose `token` is. `audiences`, when not empty, must include one the
/// token was issued for. Returns the username (`system:serviceaccount:<ns>:<sa>`), or why not.
pub async fn review(
    client: &kube::Client,
    token: &str,
    audiences: &[String],
) -> Result<String, String> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| {
            let hint = match &e {
                kube::Error::Api(s) if s.code == 403 => {
                    " (grant the control plane `create` on tokenreviews.authentication.k8s.io)"
                }
                _ => "",
            };
            format!("the TokenReview request failed: {}{hint}", describe(&e))
        })?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(match status.error.filter(|e| !e.is_empty()) {
            Some(why) => format!("the token is not authenticated: {why}"),
            None => "the token is not authenticated".to_string(),
        });
    }
    // The API says a client that asks for audiences must check that one came back: an
    // authenticator that ignores audiences would otherwise accept a token meant for another
    // service.
    if !audiences.is_empty() {
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| audiences.contains(a)) {
            return Err(format!(
                "the token is not for this audience: asked for {audiences:?}, the API server granted {granted:?}"
            ));
        }
    }
    status
        .user
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| "the token is authenticated but the review names no user".to_string())
}

/// `system:serviceaccount:<ns>:<sa>` → `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; `None` for any
/// other user (a person, a node) or a name that does not make a workload identity.
pub fn service_account_identity(username: &str, trust_domain: &str) -> Option<SpiffeId> {
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")?
        .split_once(':')?;
    let id = SpiffeId::workload(trust_domain, ns, sa).ok()?;
    // Kubernetes names hold no `/`, but a name that did would add path segments; refuse any
    // identity that does not read back as exactly this namespace and account.
    (id.namespace_and_account() == Some((ns, sa))).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_map_to_workload_identities() {
        let id = service_account_identity("system:serviceaccount:shop:web", "cluster.local");
        assert_eq!(
            id.unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }

    #[test]
    fn other_users_and_odd_names_have_none() {
        for user in [
            "admin",
            "system:node:worker-1",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:shop:",
            "system:serviceaccount:shop:web:extra",
            "system:serviceaccount:shop:web/ns/kube-system/sa/admin",
            "system:serviceaccounts:shop:web",
        ] {
            assert_eq!(
                service_account_identity(user, "cluster.local"),
                None,
                "{user}"
            );
        }
        assert_eq!(
            service_account_identity("system:serviceaccount:shop:web", "Bad Domain"),
            None
        );
    }
}

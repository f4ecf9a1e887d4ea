//! Proves who a caller is with the Kubernetes TokenReview API: the caller sends its service
//! account token, the API server says whose it is, and the username maps to the SPIFFE
//! identity the caller may be issued.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use remora_certs::SpiffeId;

use crate::source::kubernetes::describe;
use crate::source::permission::{self, Reported};

/// TokenReviews through one client, for the audiences tokens must be for (empty: the API
/// server's default).
pub struct Reviewer {
    pub client: kube::Client,
    pub audiences: Vec<String>,
    /// A 403 is logged with its fix once, not on every Certify a proxy retries.
    forbidden: Reported,
}

impl Reviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Reviewer {
        Reviewer {
            client,
            audiences,
            forbidden: Reported::default(),
        }
    }

    /// Whose `token` is: the username (`system:serviceaccount:<ns>:<sa>`), or why not. When the
    /// control plane's account may not create TokenReviews, the rule to add is logged (once per
    /// outage) and the caller is told the control plane lacks a permission.
    pub async fn review(&self, token: &str) -> Result<String, String> {
        match review(&self.client, token, &self.audiences).await {
            Ok(user) => {
                self.forbidden.cleared();
                Ok(user)
            }
            // The API server answered the review: the permission is there.
            Err(Failed::Refused(why)) => {
                self.forbidden.cleared();
                Err(why)
            }
            Err(Failed::Request(e)) => {
                let why = format!("the TokenReview request failed: {}", describe(&e));
                match permission::hint(&e, "create", "authentication.k8s.io", "tokenreviews") {
                    Some(hint) => {
                        if self.forbidden.first() {
                            tracing::error!("{hint}");
                        }
                        Err(format!(
                            "{why} (the control plane's account may not create TokenReviews; its log names the ClusterRole rule to add)"
                        ))
                    }
                    None => Err(why),
                }
            }
        }
    }
}

/// Why a review did not prove a user.
enum Failed {
    /// The request itself failed (transport, or an API error such as 403).
    Request(kube::Error),
    /// The API server answered: the token proves nothing usable, for this reason.
    Refused(String),
}

/// Asks the API server whose `token` is. `audiences`, when not empty, must include one the
/// token was issued for. Returns the username (`system:serviceaccount:<ns>:<sa>`), or why not.
async fn review(
    client: &kube::Client,
    token: &str,
    audiences: &[String],
) -> Result<String, Failed> {
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
        .map_err(Failed::Request)?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Failed::Refused(
            match status.error.filter(|e| !e.is_empty()) {
                Some(why) => format!("the token is not authenticated: {why}"),
                None => "the token is not authenticated".to_string(),
            },
        ));
    }
    // The API says a client that asks for audiences must check that one came back: an
    // authenticator that ignores audiences would otherwise accept a token meant for another
    // service.
    if !audiences.is_empty() {
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| audiences.contains(a)) {
            return Err(Failed::Refused(format!(
                "the token is not for this audience: asked for {audiences:?}, the API server granted {granted:?}"
            )));
        }
    }
    status
        .user
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Failed::Refused("the token is authenticated but the review names no user".to_string())
        })
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

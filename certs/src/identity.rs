//! SPIFFE identities (contract): `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl SpiffeId {
    /// The identity of a Kubernetes service account.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A DNS name for this identity, used as the TLS server name (SNI) between proxies and as
    /// a DNS SAN so that hostname-checking clients (grpcio, curl) can verify a proxy too:
    /// `<sa>.<ns>.sa.<trust-domain>` for workloads, the path's segments reversed otherwise.
    pub fn dns_name(&self) -> String {
        let clean = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        };
        let labels: Vec<String> = match self.namespace_and_account() {
            Some((ns, sa)) => vec![clean(sa), clean(ns), "sa".into()],
            None => self.path[1..].split('/').rev().map(clean).collect(),
        };
        format!("{}.{}", labels.join("."), self.trust_domain)
    }

    /// `(namespace, service account)` when the path has the workload shape.
    pub fn namespace_and_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

/// The control plane's identity in `trust_domain` when none is configured:
/// `spiffe://<trust-domain>/ns/remora/sa/control`. The control plane serves with it by default
/// and proxies expect it by default, so both take it from here.
pub fn default_control_identity(trust_domain: &str) -> Result<SpiffeId, String> {
    SpiffeId::workload(trust_domain, "remora", "control")
        .map_err(|e| format!("trust domain {trust_domain:?}: {e}"))
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = |why: &str| {
            ParseError(format!(
                "`{s}` is not a SPIFFE ID: {why} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
            ))
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !valid_label(td) {
            return Err(err(
                "the trust domain must be lower-case letters, digits, '-', '.', '_'",
            ));
        }
        if path.is_empty() || path == "/" {
            return Err(err("the path is empty"));
        }
        for seg in path[1..].split('/') {
            let chars_ok = seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if seg.is_empty() || seg == "." || seg == ".." || !chars_ok {
                return Err(err(&format!(
                    "path segment `{seg}` is empty or holds characters SPIFFE forbids"
                )));
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_compares() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_account(), Some(("default", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            id,
            SpiffeId::workload("cluster.local", "default", "web").unwrap()
        );
        assert_ne!(
            id,
            SpiffeId::workload("cluster.local", "default", "api").unwrap()
        );
    }

    #[test]
    fn default_control_identity_is_remora_control() {
        assert_eq!(
            default_control_identity("cluster.local").map(|id| id.to_string()),
            Ok("spiffe://cluster.local/ns/remora/sa/control".to_string())
        );
        assert!(default_control_identity("Not A Domain").is_err());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a b/sa/b",
        ] {
            let e = bad.parse::<SpiffeId>().unwrap_err();
            assert!(e.to_string().contains("not a SPIFFE ID"), "{bad}: {e}");
        }
    }
}

//! The proxy's connection to the control plane (`REMORA_CONTROL_ADDR`): one lazily connected
//! gRPC channel over TLS, shared by discovery ([`crate::discover`]) and certificate requests
//! ([`crate::identity`]).
//!
//! The channel itself is `remora_api::client` (TLS to the control plane's SPIFFE ID, by
//! default `spiffe://<trust-domain>/ns/remora/sa/control`, replicas one at a time, the trust
//! bundle re-read at every connect): the benches and tests that stand in for proxies use the
//! same one without depending on the proxy. This module maps the proxy's configuration onto it
//! and holds the backoff its callers retry with.

use std::path::PathBuf;

pub(crate) use remora_api::client::ControlClient;
use remora_api::client::TrustDomain;

use crate::config::ControlTarget;

/// Builds the channel to `target`; nothing connects until the first call. `trust_domain`
/// gives the default control-plane identity (see [`TrustDomain`]).
pub(crate) fn connect(
    target: &ControlTarget,
    ca: PathBuf,
    trust_domain: TrustDomain,
) -> Result<ControlClient, String> {
    ControlClient::new(target.addrs(), target.identity.clone(), ca, trust_domain)
        .map_err(|e| format!("REMORA_CONTROL_ADDR: {e}"))
}

/// Backoff lives in [`crate::backoff`]; callers that retry the control plane name it here.
pub(crate) use crate::backoff::Backoff;

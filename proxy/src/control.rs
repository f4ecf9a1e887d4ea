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
use std::time::Duration;

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

/// Exponential backoff with jitter, for reconnecting watches and retrying Certify.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay: doubling up to `max`, with ±25 % jitter so proxies that lost the
    /// control plane together do not come back together.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos())
            .unwrap_or(0);
        let jitter = 0.75 + (nanos % 1000) as f64 / 2000.0;
        d.mul_f64(jitter)
    }
}

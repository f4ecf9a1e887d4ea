//! The control plane (`REMORA_CONTROL_ADDR`) as a discovery source: one `Discovery.Watch`
//! per name, reconnected with backoff when it breaks. While it is broken nothing is sent, so
//! the proxy keeps the last endpoints it knew.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::source::{Discover, Target, Update, UpdateSender, Updates};
use crate::config::EndpointSpec;
use crate::control::ControlClient;
use crate::metrics::Metrics;

/// Endpoints from remora's control plane.
pub(crate) struct ControlPlane {
    client: ControlClient,
    metrics: Arc<Metrics>,
}

impl ControlPlane {
    pub(crate) fn new(client: ControlClient, metrics: Arc<Metrics>) -> Self {
        ControlPlane { client, metrics }
    }
}

impl Discover for ControlPlane {
    fn resolve(&self, target: Target<'_>) -> Option<Updates> {
        // Discovery by address is the Kubernetes service-model work; names only for now.
        let Target::Name(name) = target else {
            return None;
        };
        let (tx, updates) = Updates::channel(16);
        let (client, metrics, name) = (self.client.clone(), self.metrics.clone(), name.to_string());
        tokio::spawn(async move {
            tokio::select! {
                _ = follow(&client, &metrics, &name, &tx) => {}
                _ = tx.closed() => {}
            }
        });
        Some(updates)
    }
}

fn spec(e: &remora_api::Endpoint) -> Option<EndpointSpec> {
    let addr = match e.addr.parse() {
        Ok(a) => a,
        Err(_) => {
            tracing::warn!(addr = %e.addr, "control plane sent an endpoint that is not ip:port; ignoring it");
            return None;
        }
    };
    let identity = if e.identity.is_empty() {
        None
    } else {
        match e.identity.parse() {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::warn!(%addr, identity = %e.identity, "control plane sent a bad identity ({err}); ignoring the endpoint");
                return None;
            }
        }
    };
    Some(EndpointSpec {
        addr,
        weight: e.weight.clamp(1, crate::config::MAX_WEIGHT),
        identity,
    })
}

/// Translates one control-plane message. An entry that cannot be used is sent as a removal,
/// so its old version does not linger.
fn translate(update: remora_api::Update) -> Vec<Update> {
    use remora_api::update::Kind;
    match update.kind {
        Some(Kind::Snapshot(snap)) => {
            vec![Update::Reset(
                snap.endpoints.iter().filter_map(spec).collect(),
            )]
        }
        Some(Kind::Delta(d)) => {
            let mut remove: Vec<SocketAddr> =
                d.remove.iter().filter_map(|r| r.parse().ok()).collect();
            let mut add = Vec::with_capacity(d.add.len());
            for e in &d.add {
                match spec(e) {
                    Some(s) => add.push(s),
                    None => remove.extend(e.addr.parse::<SocketAddr>().ok()),
                }
            }
            let mut out = Vec::new();
            if !remove.is_empty() {
                out.push(Update::Remove(remove));
            }
            if !add.is_empty() {
                out.push(Update::Add(add));
            }
            out
        }
        Some(Kind::NoSuchService(_)) => vec![Update::DoesNotExist],
        None => Vec::new(),
    }
}

/// Follows `name` until the proxy drops the stream.
async fn follow(client: &ControlClient, metrics: &Metrics, name: &str, tx: &UpdateSender) {
    metrics.discovery_watches.inc();
    struct Dec<'a>(&'a Metrics);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.discovery_watches.dec();
        }
    }
    let _dec = Dec(metrics);
    let mut backoff =
        crate::control::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // What was sent, only to say in logs how many endpoints keep serving while it is away.
    let mut known = std::collections::BTreeSet::new();
    loop {
        let request = remora_api::WatchRequest {
            service: name.to_string(),
            client: String::new(),
        };
        match client.discovery().watch(request).await {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(update)) => {
                            backoff.reset();
                            metrics.discovery_updates.inc();
                            for u in translate(update) {
                                match &u {
                                    Update::Reset(l) => {
                                        known = l.iter().map(|e| e.addr).collect();
                                    }
                                    Update::Add(l) => known.extend(l.iter().map(|e| e.addr)),
                                    Update::Remove(l) => l.iter().for_each(|a| {
                                        known.remove(a);
                                    }),
                                    Update::DoesNotExist => known.clear(),
                                }
                                if tx.send(u).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            metrics.discovery_stream_errors.inc();
                            tracing::warn!(service = %name, "control plane {} ended the watch; keeping {} known endpoints and reconnecting", client.addr, known.len());
                            break;
                        }
                        Err(status) => {
                            metrics.discovery_stream_errors.inc();
                            tracing::warn!(service = %name, "control plane {}: watch broke: {}: {}; keeping {} known endpoints and reconnecting", client.addr, status.code(), status.message(), known.len());
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                metrics.discovery_stream_errors.inc();
                tracing::warn!(service = %name, "control plane {}: watch failed: {}: {}; keeping {} known endpoints", client.addr, status.code(), status.message(), known.len());
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_api::update::Kind;

    fn ep(addr: &str) -> remora_api::Endpoint {
        remora_api::Endpoint {
            addr: addr.into(),
            weight: 1,
            identity: String::new(),
        }
    }

    #[test]
    fn a_bad_entry_in_a_delta_removes_its_old_version() {
        let u = remora_api::Update {
            kind: Some(Kind::Delta(remora_api::Delta {
                add: vec![ep("10.0.0.1:80"), ep("not-an-address")],
                remove: vec!["10.0.0.2:80".into()],
            })),
        };
        let out = translate(u);
        assert_eq!(
            out,
            vec![
                Update::Remove(vec!["10.0.0.2:80".parse().unwrap()]),
                Update::Add(vec![EndpointSpec::new("10.0.0.1:80".parse().unwrap())]),
            ]
        );
        let mut bad_id = ep("10.0.0.3:80");
        bad_id.identity = "not a spiffe id".into();
        let u = remora_api::Update {
            kind: Some(Kind::Delta(remora_api::Delta {
                add: vec![bad_id],
                remove: vec![],
            })),
        };
        assert_eq!(
            translate(u),
            vec![Update::Remove(vec!["10.0.0.3:80".parse().unwrap()])]
        );
    }
}

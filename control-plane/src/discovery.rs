//! `Discovery.Watch`: a proxy names a service and gets its full endpoint set, then deltas.
//!
//! Each watch follows the service's registry channel. The first message is a snapshot (or
//! "no such service"); after that the watch compares the set it last sent with the current
//! one and sends only what changed. Because the channel holds only the latest set, a proxy
//! that reads slowly gets fewer, larger deltas, never an unbounded queue.

use std::pin::Pin;
use std::sync::Arc;

use remora_api::{Delta, Endpoint, NoSuchService, Snapshot, Update, WatchRequest, update};
use remora_proxy::EndpointSpec;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::registry::{EndpointSet, Registry};

pub struct DiscoveryService {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

fn endpoint(e: &EndpointSpec) -> Endpoint {
    Endpoint {
        addr: e.addr.to_string(),
        identity: e
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        weight: e.weight,
    }
}

/// The message that takes a subscriber from `sent` to `now`; `None` when nothing changed.
pub fn diff(sent: Option<&Option<EndpointSet>>, now: &Option<EndpointSet>) -> Option<Update> {
    let kind = match (sent, now) {
        (Some(Some(old)), Some(new)) => {
            let add: Vec<Endpoint> = new
                .values()
                .filter(|e| old.get(&e.addr) != Some(e))
                .map(endpoint)
                .collect();
            let remove: Vec<String> = old
                .keys()
                .filter(|a| !new.contains_key(a))
                .map(|a| a.to_string())
                .collect();
            if add.is_empty() && remove.is_empty() {
                return None;
            }
            update::Kind::Delta(Delta { add, remove })
        }
        (Some(None), None) => return None,
        (_, Some(new)) => update::Kind::Snapshot(Snapshot {
            endpoints: new.values().map(endpoint).collect(),
        }),
        (_, None) => update::Kind::NoSuchService(NoSuchService {}),
    };
    Some(Update { kind: Some(kind) })
}

/// Closes the gauge when a watch ends, however it ends.
struct WatchGuard(Arc<Metrics>, Arc<Registry>, String);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watches.dec();
        self.1.release(&self.2);
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

#[tonic::async_trait]
impl remora_api::discovery_server::Discovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = request.into_inner();
        let name = remora_proxy::config::normalize_authority(&req.service).ok_or_else(|| {
            Status::invalid_argument(format!("service {:?} is not host:port", req.service))
        })?;
        tracing::debug!(service = %name, client = %req.client, "watch");
        let mut rx = self.registry.subscribe(&name);
        let (tx, out) = mpsc::channel::<Result<Update, Status>>(1);
        let metrics = self.metrics.clone();
        metrics.watches.inc();
        let guard = WatchGuard(metrics.clone(), self.registry.clone(), name);
        tokio::spawn(async move {
            let _guard = guard;
            let mut sent: Option<Option<EndpointSet>> = None;
            loop {
                let now = rx.borrow_and_update().clone();
                if let Some(msg) = diff(sent.as_ref(), &now) {
                    // Waits while the proxy is slow; meanwhile changes collapse in `rx`.
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    metrics.updates_sent.inc();
                }
                sent = Some(now);
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn set(addrs: &[(&str, u32)]) -> Option<EndpointSet> {
        Some(Arc::new(
            addrs
                .iter()
                .map(|(a, w)| {
                    let addr = a.parse().unwrap();
                    (
                        addr,
                        EndpointSpec {
                            addr,
                            weight: *w,
                            identity: None,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        ))
    }

    fn kind(u: Option<Update>) -> Option<update::Kind> {
        u.and_then(|u| u.kind)
    }

    #[test]
    fn first_message_is_a_snapshot_or_no_such_service() {
        assert!(matches!(
            kind(diff(None, &None)),
            Some(update::Kind::NoSuchService(_))
        ));
        assert!(matches!(
            kind(diff(None, &set(&[]))),
            Some(update::Kind::Snapshot(s)) if s.endpoints.is_empty()
        ));
    }

    #[test]
    fn later_changes_are_deltas() {
        let a = set(&[("10.0.0.1:80", 1), ("10.0.0.2:80", 1)]);
        let b = set(&[("10.0.0.2:80", 3), ("10.0.0.3:80", 1)]);
        let Some(update::Kind::Delta(d)) = kind(diff(Some(&a), &b)) else {
            panic!("expected a delta")
        };
        let added: Vec<_> = d.add.iter().map(|e| (e.addr.as_str(), e.weight)).collect();
        assert_eq!(added, [("10.0.0.2:80", 3), ("10.0.0.3:80", 1)]);
        assert_eq!(d.remove, ["10.0.0.1:80"]);
        assert!(diff(Some(&b), &b).is_none());
        assert!(matches!(
            kind(diff(Some(&b), &None)),
            Some(update::Kind::NoSuchService(_))
        ));
        assert!(matches!(
            kind(diff(Some(&None), &b)),
            Some(update::Kind::Snapshot(_))
        ));
    }
}

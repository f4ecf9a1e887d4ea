//! `Discovery.Watch`: a proxy names a service and gets its full endpoint set, then deltas.
//!
//! Each watch follows the service's registry channel. The first message is a snapshot (or
//! "no such service"); after that the watch compares the set it last sent with the current
//! one and sends only what changed. Because the channel holds only the latest set, a proxy
//! that reads slowly gets fewer, larger deltas, never an unbounded queue.

use std::pin::Pin;
use std::sync::Arc;

use remora_api::{Delta, Endpoint, NoSuchService, Snapshot, Update, WatchRequest, update};
use remora_certs::EndpointSpec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::registry::{EndpointSet, Registry};

pub struct DiscoveryService {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// True once the source has published its first full table. Until then a watch sends
    /// nothing: "no such service" from a control plane that has not listed anything yet would
    /// make every reconnecting proxy drop its endpoints.
    pub synced: tokio::sync::watch::Receiver<bool>,
    /// One permit per open watch, across every connection: the per-connection stream limit
    /// alone would let many connections hold millions of watches (about 12 KB each).
    watch_permits: Arc<Semaphore>,
    max_watches: usize,
}

impl DiscoveryService {
    /// `max_watches` bounds the watches open at once over all connections; beyond it `Watch`
    /// answers RESOURCE_EXHAUSTED and the proxy retries with backoff.
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        synced: tokio::sync::watch::Receiver<bool>,
        max_watches: usize,
    ) -> Self {
        DiscoveryService {
            registry,
            metrics,
            synced,
            watch_permits: Arc::new(Semaphore::new(max_watches.min(Semaphore::MAX_PERMITS))),
            max_watches,
        }
    }
}

/// Longest service name accepted (a DNS name and a port).
const MAX_NAME: usize = 260;

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

/// Owns a watch's registry subscription; when the watch ends, however it ends, it drops the
/// subscription *first*, then lets the registry forget an unknown name nobody follows.
struct WatchGuard {
    rx: Option<tokio::sync::watch::Receiver<Option<EndpointSet>>>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    name: String,
    _permit: OwnedSemaphorePermit,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.rx = None;
        self.metrics.watches.dec();
        self.registry.release(&self.name);
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<Update, Status>> + Send>>;

#[tonic::async_trait]
impl remora_api::discovery_server::Discovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = request.into_inner();
        let name = remora_certs::normalize_authority(&req.service)
            .filter(|n| n.len() <= MAX_NAME)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "service {:?} is not host:port",
                    req.service.chars().take(MAX_NAME).collect::<String>()
                ))
            })?;
        let Ok(permit) = self.watch_permits.clone().try_acquire_owned() else {
            self.metrics.watches_refused.inc();
            return Err(Status::resource_exhausted(format!(
                "{} discovery watches are open on this control plane (its limit, --max-watches); retry later or on another replica",
                self.max_watches
            )));
        };
        tracing::debug!(service = %name, client = %req.client, "watch");
        let (tx, out) = mpsc::channel::<Result<Update, Status>>(1);
        let metrics = self.metrics.clone();
        metrics.watches.inc();
        let mut guard = WatchGuard {
            rx: Some(self.registry.subscribe(&name)),
            metrics: metrics.clone(),
            registry: self.registry.clone(),
            name,
            _permit: permit,
        };
        let mut synced = self.synced.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = synced.wait_for(|s| *s) => if r.is_err() { return },
                _ = tx.closed() => return,
            }
            let Some(rx) = guard.rx.as_mut() else { return };
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

    #[tokio::test]
    async fn nothing_is_said_before_the_source_has_synced() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let svc = DiscoveryService::new(registry.clone(), Arc::new(Metrics::new()), synced, 100);
        let req = Request::new(WatchRequest {
            service: "web.shop.svc.cluster.local:8080".into(),
            client: String::new(),
        });
        let mut stream = svc.watch(req).await.unwrap().into_inner();
        // Still listing: a "no such service" now would make proxies drop good endpoints.
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio_stream::StreamExt::next(&mut stream),
        )
        .await;
        assert!(early.is_err(), "sent {early:?} before the first sync");
        registry.set(
            "web.shop.svc.cluster.local:8080",
            Some(vec![EndpointSpec {
                addr: "10.0.0.1:8080".parse().unwrap(),
                weight: 1,
                identity: None,
            }]),
        );
        synced_tx.send(true).unwrap();
        let first = tokio_stream::StreamExt::next(&mut stream).await;
        assert!(matches!(
            first.and_then(|r| r.ok()).and_then(|u| u.kind),
            Some(update::Kind::Snapshot(s)) if s.endpoints.len() == 1
        ));
    }

    #[tokio::test]
    async fn watches_of_unknown_names_leave_nothing_behind() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let (_synced_tx, synced) = tokio::sync::watch::channel(true);
        let svc = DiscoveryService::new(registry.clone(), Arc::new(Metrics::new()), synced, 100);
        for i in 0..50 {
            let req = Request::new(WatchRequest {
                service: format!("junk-{i}.example:80"),
                client: String::new(),
            });
            let mut stream = svc.watch(req).await.unwrap().into_inner();
            let first = tokio_stream::StreamExt::next(&mut stream).await;
            assert!(matches!(
                first.and_then(|r| r.ok()).and_then(|u| u.kind),
                Some(update::Kind::NoSuchService(_))
            ));
        }
        // The streams are dropped; each watch task notices and releases its name.
        for _ in 0..200 {
            if registry.names() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(registry.names(), 0);
        let long = Request::new(WatchRequest {
            service: format!("{}:80", "a".repeat(300)),
            client: String::new(),
        });
        assert_eq!(
            svc.watch(long).await.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn watches_beyond_the_process_limit_are_refused_until_one_ends() {
        use remora_api::discovery_server::Discovery;
        let registry = Registry::new();
        let metrics = Arc::new(Metrics::new());
        let (_synced_tx, synced) = tokio::sync::watch::channel(true);
        let svc = DiscoveryService::new(registry.clone(), metrics.clone(), synced, 3);
        let watch = |i: usize| {
            Request::new(WatchRequest {
                service: format!("web-{i}.shop:80"),
                client: String::new(),
            })
        };
        let mut open = Vec::new();
        for i in 0..3 {
            open.push(svc.watch(watch(i)).await.unwrap().into_inner());
        }
        let refused = svc.watch(watch(3)).await.err();
        assert_eq!(
            refused.as_ref().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted),
            "{refused:?}"
        );
        assert!(
            refused.is_some_and(|s| s.message().contains("3 discovery watches")),
            "the refusal names the limit"
        );
        assert_eq!(metrics.watches_refused.get(), 1);
        // Ending one watch (the proxy's stream goes away) frees its permit.
        drop(open.pop());
        let mut again = None;
        for _ in 0..200 {
            match svc.watch(watch(4)).await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert!(again.is_some(), "a watch slot was not freed");
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

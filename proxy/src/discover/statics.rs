//! Static destinations (`REMORA_DESTINATIONS`, or the embedding application's own calls to
//! [`Static::set`]), as a discovery source like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::source::{Discover, Policy, Target, Update, Updates};
use crate::config::EndpointSpec;

/// Destinations whose endpoints the configuration (or the program) sets directly.
///
/// ```
/// use remora_proxy::discover::Static;
/// use remora_proxy::EndpointSpec;
///
/// let s = Static::default();
/// s.set("billing.internal:80", vec![EndpointSpec::new("127.0.0.1:9000".parse().unwrap())]);
/// let policy = remora_proxy::discover::Policy::new(Some(std::time::Duration::from_secs(2)), 1)
///     .expect("a valid policy");
/// assert!(s.set_policy("billing.internal:80", policy));
/// ```
pub struct Static {
    names: Arc<Names>,
    /// Bumped when a name is added, so names followed before they existed here find it.
    added: watch::Sender<u64>,
}

impl Default for Static {
    fn default() -> Self {
        Static {
            names: Default::default(),
            added: watch::channel(0).0,
        }
    }
}

impl Static {
    /// Creates `name` (`host:port`, any case) or replaces its endpoints (keeping its policy);
    /// streams following it get a `Reset`. Endpoints that stay keep their connections and
    /// metrics.
    pub fn set(&self, name: &str, endpoints: Vec<EndpointSpec>) {
        let name = name.to_ascii_lowercase();
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let endpoints = Arc::new(endpoints);
        match names.get(&name) {
            Some(tx) => {
                tx.send_modify(|e| e.0 = endpoints);
            }
            None => {
                names.insert(name, watch::channel((endpoints, Arc::default())).0);
                drop(names);
                self.added.send_modify(|n| *n += 1);
            }
        }
    }

    /// Sets the traffic policy of `name` (timeout, retries, failure accrual), applied from the
    /// next request on; false when `name` was never [`Static::set`].
    pub fn set_policy(&self, name: &str, policy: Policy) -> bool {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        match names.get(&name.to_ascii_lowercase()) {
            Some(tx) => {
                tx.send_modify(|e| e.1 = Arc::new(policy));
                true
            }
            None => false,
        }
    }

    fn names_handle(&self) -> std::sync::Weak<Names> {
        Arc::downgrade(&self.names)
    }

    /// Whether `name` is one of this source's names.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name.to_ascii_lowercase())
    }
}

/// A name's endpoints and policy.
type Entry = (Arc<Vec<EndpointSpec>>, Arc<Policy>);
type Names = Mutex<HashMap<String, watch::Sender<Entry>>>;

enum State {
    /// Known; `true` until the current set was sent.
    Known(watch::Receiver<Entry>, bool),
    /// Not a static name; `true` until `DoesNotExist` was sent.
    Unknown(watch::Receiver<u64>, bool),
}

impl Discover for Static {
    fn resolve(&self, target: Target<'_>) -> Option<Updates> {
        // A static destination may be named by an address (`10.0.0.1:80`): answer it either way.
        let name = match target {
            Target::Name(n) => n.to_string(),
            Target::Addr(a) => a.to_string(),
        };
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let state = match names.get(&name) {
            Some(tx) => State::Known(tx.subscribe(), true),
            // Not (yet) a static name: say so, then wait for it to be added. One receiver per
            // followed name, and followed names are bounded.
            None => State::Unknown(self.added.subscribe(), true),
        };
        drop(names);
        let table = self.names_handle();
        // The current set first, then every change; a dropped `Static` ends the stream and
        // the last set keeps serving.
        let stream = futures_util::stream::unfold(state, move |mut state| {
            let (name, table) = (name.clone(), table.clone());
            async move {
                loop {
                    match state {
                        State::Unknown(rx, true) => {
                            return Some((vec![Update::DoesNotExist], State::Unknown(rx, false)));
                        }
                        State::Unknown(mut rx, false) => {
                            rx.changed().await.ok()?;
                            let names = table.upgrade()?;
                            let found = names
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(&name)
                                .map(|tx| tx.subscribe());
                            state = match found {
                                Some(k) => State::Known(k, true),
                                None => State::Unknown(rx, false),
                            };
                        }
                        State::Known(mut rx, first) => {
                            if !first {
                                rx.changed().await.ok()?;
                            }
                            let (set, policy) = rx.borrow_and_update().clone();
                            // The policy before the endpoints it goes with.
                            let updates = vec![
                                Update::Policy(Box::new(policy.as_ref().clone())),
                                Update::Reset(set.as_ref().clone()),
                            ];
                            return Some((updates, State::Known(rx, false)));
                        }
                    }
                }
            }
        });
        Some(Updates::new(stream.flat_map(futures_util::stream::iter)))
    }
}

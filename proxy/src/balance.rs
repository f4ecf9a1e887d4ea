//! Picks an endpoint of a destination for each request.
//!
//! Round robin for now; the load-balancing issue replaces it with P2C + PeakEWMA.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::endpoint::Endpoint;

pub struct Destination {
    pub name: String,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl Destination {
    pub fn new(name: String, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Destination {
            name,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The next endpoint in turn, or `None` when the destination has none.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// The endpoint after `skip` in turn (a second choice after a connect failure).
    pub fn other_than(&self, skip: &Endpoint) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        (0..n).find_map(|_| self.pick().filter(|e| e.addr != skip.addr))
    }
}

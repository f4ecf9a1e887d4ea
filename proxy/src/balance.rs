//! Per-request endpoint choice: power of two choices over the ready endpoints, scored by a
//! peak-sensitive EWMA of latency times the requests in flight (linkerd2-proxy's and tower's
//! algorithm: default RTT 30 ms), divided by the endpoint's weight. The decay is 1 s, not
//! linkerd's 10 s: measured with `cargo run -p benches --release -- balance` on three equal
//! grpcio backends at 1k rps on one connection, 10 s let one scheduling hiccup mark a backend
//! slow for seconds (shares 28–38 %), 1 s kept every share within 3 % of even while a +50 ms
//! backend still got 0.1 % of calls.
//!
//! Why not `tower::balance::p2c::Balance` itself: it is a `&mut self` service fed by a
//! `Discover` stream, so sharing one destination across every connection of a listener would
//! need a `Buffer` in front (a task and a channel hop per request). Here endpoints are shared
//! `Arc`s whose load is a few atomics, so choosing costs two random numbers and two loads, and
//! an endpoint set is swapped whole (`ArcSwap`) without disturbing requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

// tokio's clock, not std's: every time here feeds a decision (decay, readiness, refill), and
// tests pause and advance it (`#[tokio::test(start_paused = true)]`). Outside a runtime it
// reads the system's monotonic clock, as `std::time::Instant` does.
use tokio::time::Instant;

use arc_swap::ArcSwap;

use crate::endpoint::Endpoint;
use crate::endpoint::load::DEFAULT_RTT;
use crate::retry::RetryBudget;
use remora_certs::Policy;

/// How long a request may wait for an endpoint to come back before the proxy answers 503.
pub const FAILFAST: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PickError {
    #[error("{dst} has no endpoints")]
    Empty { dst: String },
    #[error(
        "all {n} endpoints of {dst} are failing (next retry in {retry_in:?}); the last error: {last}"
    )]
    Unavailable {
        dst: String,
        n: usize,
        retry_in: Duration,
        last: String,
    },
}

/// A destination's endpoints and how each request picks one.
pub struct Destination {
    pub name: String,
    pub budget: RetryBudget,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// The traffic policy its source sent (timeout, retries); the default until one does.
    policy: ArcSwap<Policy>,
    /// Serialises failure-accrual ejections.
    ejecting: std::sync::Mutex<()>,
    saw_h2: AtomicBool,
}

impl Destination {
    pub fn new(name: String, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Destination {
            name,
            budget: RetryBudget::default(),
            endpoints: ArcSwap::from_pointee(endpoints),
            policy: ArcSwap::default(),
            ejecting: std::sync::Mutex::new(()),
            saw_h2: AtomicBool::new(false),
        }
    }

    /// The policy, for a look on the request path (no reference count taken).
    pub fn policy_now(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Replaces the policy; requests already under way keep the one they started with.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        if **self.policy.load() != *policy {
            self.policy.store(policy);
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Replaces the endpoint set. The caller passes the current `Arc`s for endpoints that stay,
    /// so they keep their connections and load; removed ones finish the requests they hold
    /// (those keep their `Arc`) and then close. New ones get an HTTP/2 connection at once when
    /// the destination speaks HTTP/2, so their first requests do not pay for the handshake.
    pub fn update(&self, next: Vec<Arc<Endpoint>>) {
        let current = self.endpoints.load();
        if self.saw_h2.load(Ordering::Relaxed) {
            for e in next
                .iter()
                .filter(|e| !current.iter().any(|c| Arc::ptr_eq(c, e)))
            {
                e.clone().prewarm_h2();
            }
        }
        self.endpoints.store(Arc::new(next));
    }

    /// Notes that the destination carries HTTP/2, warming a connection to every endpoint the
    /// first time.
    pub fn saw_h2(&self) {
        if !self.saw_h2.swap(true, Ordering::Relaxed) {
            for e in self.endpoints.load().iter() {
                e.clone().prewarm_h2();
            }
        }
    }

    /// Failure accrual: counts `ep`'s answer (failed: 502, 503, 504 or gRPC `UNAVAILABLE` in
    /// the head — the answers of an endpoint that cannot serve; a 500 or 501 is the app's
    /// answer to one request, which callers could provoke to eject endpoints at will) and
    /// ejects the endpoint once the policy's number of answers in a row failed, as long as at
    /// most half of the endpoints are ejected, and never the last ready one. Returns true when
    /// it ejected.
    pub fn accrue(
        &self,
        ep: &Endpoint,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> bool {
        let failed = matches!(status.as_u16(), 502..=504)
            || headers
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"14");
        let in_a_row = ep.answered(failed);
        if !failed {
            return false;
        }
        let threshold = self.policy.load().accrual();
        if threshold == 0 || in_a_row < threshold {
            return false;
        }
        // One decision at a time: concurrent failures of every endpoint (a shared database
        // down) must not each see "others are ready" and eject them all. Taken only when a
        // threshold is crossed, never on the common path.
        let _one = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let eps = self.endpoints.load();
        let ready = eps.iter().filter(|e| e.is_ready(now)).count();
        let others = eps.iter().any(|e| e.addr != ep.addr && e.is_ready(now));
        // At most half ejected (Envoy's max ejection percent): ready after this one ≥ half.
        let allowed = others && (ready.saturating_sub(1)) * 2 >= eps.len();
        if allowed {
            ep.eject(in_a_row, threshold, status);
        }
        allowed
    }

    /// Picks an endpoint for one request, skipping `exclude` (an endpoint that just failed).
    /// When every endpoint is backing off, waits for the first to be retried if that is within
    /// [`FAILFAST`], and fails at once otherwise.
    pub async fn pick(&self, exclude: Option<&Endpoint>) -> Result<Arc<Endpoint>, PickError> {
        let eps = self.endpoints.load_full();
        let candidates = || {
            eps.iter()
                .filter(move |e| exclude.is_none_or(|x| x.addr != e.addr))
        };
        let now = Instant::now();
        // One scan: readiness can change under us (another thread marks an endpoint down), so
        // the count and the choice must come from the same snapshot.
        let ready: Vec<&Arc<Endpoint>> = candidates().filter(|e| e.is_ready(now)).collect();
        match ready.len() {
            1 => return Ok(ready[0].clone()),
            n if n >= 2 => {
                // Two distinct candidates, uniformly: j is drawn from the n - 1 others.
                let n = n as u64;
                let i = crate::random::below(n) as usize;
                let mut j = crate::random::below(n - 1) as usize;
                if j >= i {
                    j += 1;
                }
                let (x, y) = (ready[i], ready[j]);
                // An endpoint that has not answered yet is scored with the mean of those that
                // have: a newcomer competes evenly instead of being shunned for the default
                // latency (or flooded for having none).
                let seed = || {
                    let seen: Vec<f64> = eps
                        .iter()
                        .filter(|e| e.load.observed())
                        .map(|e| e.load.rtt().as_nanos() as f64)
                        .collect();
                    if seen.is_empty() {
                        DEFAULT_RTT.as_nanos() as f64
                    } else {
                        seen.iter().sum::<f64>() / seen.len() as f64
                    }
                };
                let cost = |e: &Endpoint| {
                    let c = if e.load.observed() {
                        e.load.cost()
                    } else {
                        e.load.cost_with(seed())
                    };
                    c / e.weight as f64
                };
                return Ok(if cost(x) <= cost(y) {
                    x.clone()
                } else {
                    y.clone()
                });
            }
            _ => {}
        }
        // Nothing ready: everyone is backing off after failures.
        let Some(soonest) = candidates().min_by_key(|e| e.retry_at()) else {
            return Err(PickError::Empty {
                dst: self.name.clone(),
            });
        };
        let retry_in = soonest.retry_at().saturating_duration_since(now);
        if retry_in > FAILFAST {
            return Err(PickError::Unavailable {
                dst: self.name.clone(),
                n: eps.len(),
                retry_in,
                last: soonest.last_error(),
            });
        }
        tokio::time::sleep(retry_in).await;
        Ok(soonest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::load::{DECAY, PeakEwma};
    use crate::retry::RETRY_MAX_TOKENS;

    #[test]
    fn peak_ewma_takes_peaks_and_decays() {
        let l = PeakEwma::default();
        l.start();
        l.finish(Duration::from_millis(100));
        // Reads decay toward zero with idle time, so allow for the microseconds since.
        assert!(
            l.rtt() > Duration::from_millis(99),
            "a peak replaces the average"
        );
        assert!(l.observed());
        assert_eq!(l.pending(), 0);
        l.start();
        l.start();
        assert!(
            l.cost() > 99e6 * 3.0 && l.cost() <= 100e6 * 3.0,
            "{}",
            l.cost()
        );
        l.finish(Duration::from_millis(1));
        // Right after the peak, a fast sample barely moves the average.
        assert!(l.rtt() > Duration::from_millis(90), "{:?}", l.rtt());
        l.abandon();
        assert_eq!(l.pending(), 0);
    }

    use std::net::SocketAddr;

    /// Readiness changing while `pick` runs (another worker thread marking endpoints down)
    /// once made its second scan find fewer endpoints than the first, and divide by zero.
    #[test]
    fn pick_survives_readiness_flapping_under_it() {
        let eps: Vec<Arc<Endpoint>> = (0..3)
            .map(|i| {
                Arc::new(Endpoint::new(
                    SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                    1,
                    Duration::from_secs(1),
                    None,
                ))
            })
            .collect();
        eps[0].set_ready_for_test(true);
        let dest = Arc::new(Destination::new("flap.test:80".into(), eps.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let flapper = {
            let (eps, stop) = (eps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut up = false;
                while !stop.load(Ordering::Relaxed) {
                    up = !up;
                    eps[1].set_ready_for_test(up);
                    eps[2].set_ready_for_test(!up);
                }
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for _ in 0..200_000 {
                // eps[0] is always ready, so a pick never has to wait.
                assert!(dest.pick(None).await.is_ok());
            }
        });
        stop.store(true, Ordering::Relaxed);
        let _ = flapper.join();
    }

    fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Endpoint::new(
                    SocketAddr::from(([127, 0, 0, 1], 2000 + i as u16)),
                    *w,
                    Duration::from_secs(1),
                    None,
                ))
            })
            .collect()
    }

    /// How often each endpoint is picked in `n` picks.
    async fn shares(dest: &Destination, eps: &[Arc<Endpoint>], n: usize) -> Vec<usize> {
        let mut counts = vec![0; eps.len()];
        for _ in 0..n {
            let e = dest.pick(None).await.unwrap();
            let i = eps.iter().position(|x| Arc::ptr_eq(x, &e)).unwrap();
            counts[i] += 1;
        }
        counts
    }

    /// The decay is on tokio's clock: one DECAY of idleness takes a sample to exactly 1/e.
    #[tokio::test(start_paused = true)]
    async fn peak_ewma_decays_on_the_paused_clock() {
        let l = PeakEwma::default();
        l.start();
        l.finish(Duration::from_millis(100));
        assert_eq!(l.rtt(), Duration::from_millis(100));
        tokio::time::advance(DECAY).await;
        let want = 100e6 * (-1f64).exp();
        assert!(
            (l.rtt().as_nanos() as f64 - want).abs() < 2.0,
            "{:?}",
            l.rtt()
        );
        // After a long quiet spell the old peak has decayed below a new, faster sample, which
        // then replaces it outright.
        tokio::time::advance(DECAY * 10).await;
        l.start();
        l.finish(Duration::from_millis(10));
        assert_eq!(l.rtt(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn pick_never_chooses_a_backed_off_endpoint_while_one_is_ready() {
        let eps = endpoints(&[1, 1, 1, 1, 1]);
        for e in &eps[..3] {
            e.set_ready_for_test(false);
        }
        let dest = Destination::new("ready.test:80".into(), eps.clone());
        let counts = shares(&dest, &eps, 10_000).await;
        assert_eq!(&counts[..3], &[0, 0, 0], "{counts:?}");
        // The two ready ones share the traffic (both unobserved: equal cost, ties go to the
        // first drawn, which is uniform).
        assert!(counts[3] > 4_000 && counts[4] > 4_000, "{counts:?}");
        // Excluding the one that just failed leaves the other, even when it is the only one.
        for _ in 0..100 {
            let e = dest.pick(Some(&eps[3])).await.unwrap();
            assert!(Arc::ptr_eq(&e, &eps[4]));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_shift_the_share_toward_the_heavier() {
        let even = endpoints(&[1, 1, 1]);
        let dest = Destination::new("even.test:80".into(), even.clone());
        let counts = shares(&dest, &even, 30_000).await;
        for c in &counts {
            // Each is 1/3 (10,000; sd ≈ 82).
            assert!((9_000..11_000).contains(c), "{counts:?}");
        }
        // Weight 4 at equal load: cheaper in every pair it is part of, i.e. 2/3 of picks.
        let skewed = endpoints(&[1, 1, 4]);
        let dest = Destination::new("skewed.test:80".into(), skewed.clone());
        let counts = shares(&dest, &skewed, 30_000).await;
        assert!((19_000..21_000).contains(&counts[2]), "{counts:?}");
        assert!(counts[0] > 4_000 && counts[1] > 4_000, "{counts:?}");
    }

    /// Every endpoint backing off: `pick` waits for the soonest when it is within FAILFAST
    /// (exactly that long, on the paused clock), and fails at once when it is not.
    #[tokio::test(start_paused = true)]
    async fn pick_waits_for_the_soonest_retry_or_fails_fast() {
        let eps = endpoints(&[1, 1]);
        let dest = Destination::new("down.test:80".into(), eps.clone());
        eps[0].set_retry_in_for_test(Duration::from_secs(2));
        eps[1].set_retry_in_for_test(Duration::from_millis(1500));
        let started = Instant::now();
        let e = dest.pick(None).await.unwrap();
        assert!(Arc::ptr_eq(&e, &eps[1]));
        assert_eq!(started.elapsed(), Duration::from_millis(1500));

        eps[0].set_retry_in_for_test(FAILFAST + Duration::from_secs(1));
        eps[1].set_retry_in_for_test(FAILFAST * 2);
        let started = Instant::now();
        match dest.pick(None).await {
            Err(PickError::Unavailable { n, retry_in, .. }) => {
                assert_eq!(n, 2);
                assert_eq!(retry_in, FAILFAST + Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        let empty = Destination::new("none.test:80".into(), Vec::new());
        assert!(matches!(
            empty.pick(None).await,
            Err(PickError::Empty { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_a_share_and_refills_over_time() {
        let b = RetryBudget::default();
        // The per-second allowance is there from the start: 10 retries, then none.
        for i in 0..10 {
            assert!(b.withdraw(), "retry {i}");
        }
        assert!(!b.withdraw());
        // Each request deposits a fifth of a retry: 5 requests buy one.
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
        // Refill: 10 a second, so half a second is worth 5.
        tokio::time::advance(Duration::from_millis(500)).await;
        for i in 0..5 {
            assert!(b.withdraw(), "refilled retry {i}");
        }
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_is_bounded() {
        let b = RetryBudget::default();
        // However much traffic or idle time went by, at most RETRY_MAX_TOKENS retries burst.
        for _ in 0..10_000 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(3600)).await;
        let granted = (0..1_000).take_while(|_| b.withdraw()).count();
        assert_eq!(granted, RETRY_MAX_TOKENS as usize);
    }
}

//! Per-request endpoint choice: power of two choices over the ready endpoints, scored by a
//! peak-sensitive EWMA of latency times the requests in flight (linkerd2-proxy's and tower's
//! algorithm: default RTT 30 ms), divided by the endpoint's weight. The decay is 1 s, not
//! linkerd's 10 s: measured with `cargo run -p benches --release -- balance` on three equal
//! grpcio backends at 1k rps on one connection, 10 s let one scheduling hiccup mark a backend
//! slow for seconds (shares 28–38 %), 1 s kept every share within 3 % of even while a +50 ms
//! backend still got 0.1 % of calls.
//!
//! Zones: once the control plane has told the proxy its zone, P2C runs within the endpoints
//! local to it (their zone, or the EndpointSlice hints that assign them to it) and within the
//! others, and the local pick wins unless it costs more than [`ZONE_SPILL_FACTOR`] times the
//! other zone's — slowed down, queued up, or failing (not ready) — so traffic stays in the zone
//! while it is healthy and spills over per request, without a threshold to tune per service.
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

/// How much costlier than the best endpoint of another zone the best of the caller's own
/// zone may be before a request spills over. Latency is what the cost is made of, so a
/// cross-zone hop's extra milliseconds are part of the other zone's cost already; 2× keeps
/// same-zone traffic local through the ordinary jitter of a healthy zone and moves it when the
/// local endpoints are slowed (a slow answer is a peak, taken at once) or queue up (requests
/// in flight multiply the cost).
pub const ZONE_SPILL_FACTOR: f64 = 2.0;
/// How slowly another zone's last measured cost fades while it gets no traffic. The usual
/// [`DECAY`](crate::endpoint::load::DECAY) of 1 s would make an idle remote endpoint look
/// free within seconds and draw a probe request every second; 10 s probes it rarely, and a
/// remote endpoint is still measured afresh whenever traffic does spill over.
pub const ZONE_MEMORY: Duration = Duration::from_secs(10);

/// The proxy's own zone, shared by every destination: learned from the control plane (which
/// knows the zone of the endpoint at the proxy's address), never configured. Until it is
/// known, endpoints are balanced without regard to zones.
#[derive(Clone, Default)]
pub struct Zone(Arc<arc_swap::ArcSwapOption<String>>);

impl Zone {
    /// Takes `zone` as the proxy's zone (the latest word wins: a pod does not change zones,
    /// but a control plane that could not tell at first may later).
    pub fn learn(&self, zone: &str) {
        if self.0.load().as_deref().map(String::as_str) != Some(zone) {
            tracing::info!(
                zone,
                "this proxy is in zone {zone}; same-zone endpoints are preferred"
            );
            self.0.store(Some(Arc::new(zone.to_string())));
        }
    }

    /// The zone, for a look on the request path (no reference count taken).
    pub fn get(&self) -> arc_swap::Guard<Option<Arc<String>>> {
        self.0.load()
    }
}

/// A destination's endpoints and how each request picks one.
pub struct Destination {
    pub name: String,
    pub budget: RetryBudget,
    /// The proxy's zone, for preferring same-zone endpoints.
    zone: Zone,
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
            zone: Zone::default(),
            endpoints: ArcSwap::from_pointee(endpoints),
            policy: ArcSwap::default(),
            ejecting: std::sync::Mutex::new(()),
            saw_h2: AtomicBool::new(false),
        }
    }

    /// Prefers the endpoints of `zone` (the proxy's, once known).
    pub fn with_zone(mut self, zone: Zone) -> Self {
        self.zone = zone;
        self
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
            0 => {}
            1 => return Ok(ready[0].clone()),
            _ => {
                let zone = self.zone.get();
                if let Some(zone) = zone.as_deref() {
                    let (local, remote): (Vec<&Arc<Endpoint>>, Vec<&Arc<Endpoint>>) = ready
                        .iter()
                        .partition(|e| e.locality.is_local_to(zone.as_str()));
                    let (lc, rc) = (Costs::new(&local), Costs::new(&remote));
                    if let (Some(l), Some(r)) =
                        (p2c(&local, |e| lc.cost(e)), p2c(&remote, |e| rc.cost(e)))
                    {
                        // Another zone's endpoint never measured counts as free while it has
                        // nothing in flight, so that it gets one request and is measured:
                        // lending it the mean of the others (the local ones) would hide a
                        // slow local zone behind its own latency, and the other zone would
                        // never be tried. One probe at a time: a burst must not all go to a
                        // newcomer there (a pod starting slowly would draw the whole zone).
                        let remembered = |e: &Endpoint| {
                            if e.load.observed() {
                                e.load.cost_remembered(ZONE_MEMORY) / e.weight as f64
                            } else if e.load.pending() == 0 {
                                0.0
                            } else {
                                rc.cost(e)
                            }
                        };
                        // The same for a same-zone endpoint not measured yet: at start the
                        // other zone may answer first, and a local newcomer scored with the
                        // default latency would then never be tried, and the zone never used.
                        let local = |e: &Endpoint| match e.load.observed() || e.load.pending() > 0 {
                            true => lc.cost(e),
                            false => 0.0,
                        };
                        return Ok(if local(l) <= ZONE_SPILL_FACTOR * remembered(r) {
                            l.clone()
                        } else {
                            r.clone()
                        });
                    }
                }
                let costs = Costs::new(&ready);
                if let Some(e) = p2c(&ready, |e| costs.cost(e)) {
                    return Ok(e.clone());
                }
            }
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

/// What P2C compares within one set of candidates: `PeakEWMA latency × (in flight + 1) /
/// weight`. An endpoint that has not answered yet is scored with the mean latency of those in
/// the set that have: a newcomer competes evenly instead of being shunned for the default
/// latency (or flooded for having none). The set's, not the destination's: another zone's
/// latency says nothing about a newcomer in this one.
struct Costs<'a> {
    set: &'a [&'a Arc<Endpoint>],
    /// Computed once per pick, and only when a newcomer is compared.
    seed: std::cell::OnceCell<f64>,
}

impl<'a> Costs<'a> {
    fn new(set: &'a [&'a Arc<Endpoint>]) -> Self {
        Costs {
            set,
            seed: std::cell::OnceCell::new(),
        }
    }

    fn seed(&self) -> f64 {
        *self.seed.get_or_init(|| {
            let (mut sum, mut n) = (0.0, 0u32);
            for e in self.set.iter().filter(|e| e.load.observed()) {
                sum += e.load.rtt().as_nanos() as f64;
                n += 1;
            }
            match n {
                0 => DEFAULT_RTT.as_nanos() as f64,
                n => sum / f64::from(n),
            }
        })
    }

    fn cost(&self, e: &Endpoint) -> f64 {
        let c = if e.load.observed() {
            e.load.cost()
        } else {
            e.load.cost_with(self.seed())
        };
        c / e.weight as f64
    }
}

/// Power of two choices: two distinct candidates drawn uniformly, the cheaper wins; `None`
/// only for an empty set (callers pass non-empty ones, and say what to do otherwise rather
/// than index on the request path).
fn p2c<'a>(
    ready: &[&'a Arc<Endpoint>],
    cost: impl Fn(&Endpoint) -> f64,
) -> Option<&'a Arc<Endpoint>> {
    let n = ready.len() as u64;
    if n < 2 {
        return ready.first().copied();
    }
    let i = crate::random::below(n) as usize;
    // j is drawn from the n - 1 others.
    let mut j = crate::random::below(n - 1) as usize;
    if j >= i {
        j += 1;
    }
    let (x, y) = (ready.get(i)?, ready.get(j)?);
    Some(if cost(x) <= cost(y) { x } else { y })
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

    /// Endpoints in the given zones (`""`: unknown), each having answered once in `rtt_ms`.
    fn zoned(zones: &[(&str, u64)]) -> Vec<Arc<Endpoint>> {
        zones
            .iter()
            .enumerate()
            .map(|(i, (z, rtt_ms))| {
                let mut e = Endpoint::new(
                    SocketAddr::from(([127, 0, 0, 1], 3000 + i as u16)),
                    1,
                    Duration::from_secs(1),
                    None,
                );
                if !z.is_empty() {
                    e = e.with_locality(remora_certs::Locality::zone(z));
                }
                e.load.start();
                e.load.finish(Duration::from_millis(*rtt_ms));
                Arc::new(e)
            })
            .collect()
    }

    fn in_zone(eps: &[Arc<Endpoint>], zone: &str) -> Destination {
        let z = Zone::default();
        z.learn(zone);
        Destination::new("zoned.test:80".into(), eps.to_vec()).with_zone(z)
    }

    /// The choice between zones, as a table: the caller is in zone a; each row gives the
    /// endpoints (zone, measured latency), how many requests are in flight on each, and which
    /// endpoints may be picked.
    #[tokio::test(start_paused = true)]
    async fn same_zone_is_preferred_while_it_is_healthy_and_not_overloaded() {
        #[allow(clippy::type_complexity)]
        let rows: &[(&str, &[(&str, u64)], &[u64], &[usize])] = &[
            (
                "healthy local zone, remote behind a cross-zone hop",
                &[("a", 1), ("a", 1), ("b", 3), ("b", 3)],
                &[0, 0, 0, 0],
                &[0, 1],
            ),
            (
                "equally fast zones: local still wins",
                &[("a", 2), ("b", 2), ("b", 2)],
                &[0, 0, 0],
                &[0],
            ),
            (
                "local slowed past twice the remote: spill",
                &[("a", 10), ("a", 12), ("b", 3), ("b", 3)],
                &[0, 0, 0, 0],
                &[2, 3],
            ),
            (
                "local queueing (3 in flight each): spill",
                &[("a", 1), ("a", 1), ("b", 1)],
                &[3, 3, 0],
                &[2],
            ),
            (
                "local busy but within the factor: stay",
                &[("a", 1), ("b", 1)],
                &[1, 0],
                &[0],
            ),
            (
                "no local endpoint: ordinary P2C over the others",
                &[("b", 1), ("c", 1)],
                &[0, 0],
                &[0, 1],
            ),
            (
                "zones unknown: ordinary P2C over all",
                &[("", 1), ("", 1)],
                &[0, 0],
                &[0, 1],
            ),
        ];
        for (what, zones, pending, allowed) in rows {
            let eps = zoned(zones);
            for (e, p) in eps.iter().zip(pending.iter()) {
                for _ in 0..*p {
                    e.load.start();
                }
            }
            let dest = in_zone(&eps, "a");
            let counts = shares(&dest, &eps, 2_000).await;
            for (i, c) in counts.iter().enumerate() {
                assert_eq!(
                    *c > 0,
                    allowed.contains(&i),
                    "{what}: picks {counts:?}, expected only {allowed:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn zones_are_ignored_until_known_and_unready_local_endpoints_spill() {
        let eps = zoned(&[("a", 1), ("b", 1)]);
        // Not told its zone: even.
        let dest = Destination::new("zoned.test:80".into(), eps.clone());
        let counts = shares(&dest, &eps, 2_000).await;
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        // Told later (the control plane's first snapshot): from then on, local.
        let z = Zone::default();
        let dest = Destination::new("zoned.test:80".into(), eps.clone()).with_zone(z.clone());
        z.learn("a");
        assert_eq!(shares(&dest, &eps, 1_000).await, vec![1_000, 0]);
        // The local endpoint backing off after a failure: the other zone takes everything.
        eps[0].set_ready_for_test(false);
        assert_eq!(shares(&dest, &eps, 1_000).await, vec![0, 1_000]);
    }

    /// Another zone's endpoints that never answered are tried once each, then measured:
    /// local traffic resumes, and a slowed local zone has a real figure to spill against.
    #[tokio::test(start_paused = true)]
    async fn an_unmeasured_remote_endpoint_is_tried_once_then_local_resumes() {
        let mut eps = zoned(&[("a", 1)]);
        eps.push(Arc::new(
            Endpoint::new(
                SocketAddr::from(([127, 0, 0, 2], 3000)),
                1,
                Duration::from_secs(1),
                None,
            )
            .with_locality(remora_certs::Locality::zone("b")),
        ));
        let dest = in_zone(&eps, "a");
        let first = dest.pick(None).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &eps[1]),
            "the unmeasured remote is tried"
        );
        // While that probe is in flight, the next requests stay local.
        first.load.start();
        let second = dest.pick(None).await.unwrap();
        assert!(Arc::ptr_eq(&second, &eps[0]), "one probe at a time");
        first.load.finish(Duration::from_millis(3));
        assert_eq!(shares(&dest, &eps, 1_000).await, vec![1_000, 0]);
    }

    /// The other zone measured first (it answered the very first request), the caller's own
    /// not yet: its endpoints are tried, not starved by the default latency, and then keep
    /// the traffic.
    #[tokio::test(start_paused = true)]
    async fn a_zone_not_measured_yet_is_tried_even_after_the_other_answered() {
        let mut eps: Vec<Arc<Endpoint>> = (0..2)
            .map(|i| {
                Arc::new(
                    Endpoint::new(
                        SocketAddr::from(([127, 0, 0, 1], 4000 + i)),
                        1,
                        Duration::from_secs(1),
                        None,
                    )
                    .with_locality(remora_certs::Locality::zone("a")),
                )
            })
            .collect();
        eps.extend(zoned(&[("b", 12), ("b", 12)]));
        let dest = in_zone(&eps, "a");
        let first = dest.pick(None).await.unwrap();
        assert!(first.locality.is_local_to("a"), "tried: {first:?}");
        for e in &eps[..2] {
            e.load.start();
            e.load.finish(Duration::from_millis(1));
        }
        let counts = shares(&dest, &eps, 2_000).await;
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    }

    /// A newcomer in the caller's zone is scored with that zone's latency, not the mean over
    /// a far zone too (which made it look slow and never tried, as after a live zone change).
    #[tokio::test(start_paused = true)]
    async fn a_local_newcomer_competes_with_its_own_zone() {
        let mut eps = zoned(&[("a", 1), ("b", 20)]);
        eps.push(Arc::new(
            Endpoint::new(
                SocketAddr::from(([127, 0, 0, 3], 3000)),
                1,
                Duration::from_secs(1),
                None,
            )
            .with_locality(remora_certs::Locality::zone("a")),
        ));
        let counts = shares(&in_zone(&eps, "a"), &eps, 2_000).await;
        assert!(counts[0] > 500 && counts[2] > 500, "{counts:?}");
        assert_eq!(counts[1], 0, "{counts:?}");
    }

    /// Topology hints (`forZones`) decide over the endpoint's own zone: Kubernetes assigned
    /// the zone-b endpoint to zone a's callers.
    #[tokio::test(start_paused = true)]
    async fn topology_hints_decide_which_endpoints_are_local() {
        let eps = zoned(&[("a", 1), ("b", 1), ("b", 1)]);
        let hinted = Endpoint::new(eps[1].addr, 1, Duration::from_secs(1), None).with_locality(
            remora_certs::Locality {
                zone: Some("b".into()),
                for_zones: vec!["a".into()],
            },
        );
        hinted.load.start();
        hinted.load.finish(Duration::from_millis(1));
        let eps = vec![eps[0].clone(), Arc::new(hinted), eps[2].clone()];
        let counts = shares(&in_zone(&eps, "a"), &eps, 4_000).await;
        assert!(counts[0] > 1_000 && counts[1] > 1_000, "{counts:?}");
        assert_eq!(counts[2], 0, "{counts:?}");
    }

    /// Another zone's cost is remembered over ZONE_MEMORY, not the 1 s decay: after a few
    /// quiet seconds a cross-zone endpoint still does not look cheaper than a local one that
    /// answered just now.
    #[tokio::test(start_paused = true)]
    async fn an_idle_remote_zone_does_not_look_free_after_a_quiet_spell() {
        let eps = zoned(&[("a", 1), ("b", 5)]);
        let dest = in_zone(&eps, "a");
        tokio::time::advance(Duration::from_secs(3)).await;
        eps[0].load.start();
        eps[0].load.finish(Duration::from_millis(3));
        // 1 s decay would put the remote at 5·e^-3 ≈ 0.25 ms against 3 ms: a spill.
        assert_eq!(shares(&dest, &eps, 1_000).await, vec![1_000, 0]);
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

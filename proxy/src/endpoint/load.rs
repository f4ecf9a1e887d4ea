//! One endpoint's load as the balancer sees it: a peak-sensitive EWMA of latency and the
//! requests in flight (see `balance` for how P2C compares them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Latency assumed for an endpoint before it has answered anything.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old latency observations fade (see the module header for why 1 s).
pub const DECAY: Duration = Duration::from_secs(1);
/// Peak-EWMA load of one endpoint.
pub struct PeakEwma {
    /// Nanoseconds; f64 bits in an atomic so readers never lock.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, as nanoseconds since `epoch`.
    stamp: AtomicU64,
    epoch: Instant,
    pending: AtomicU64,
    /// Has answered at least once; until then the destination lends it an estimate.
    observed: AtomicBool,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(0),
            epoch: Instant::now(),
            pending: AtomicU64::new(0),
            observed: AtomicBool::new(false),
        }
    }
}

impl PeakEwma {
    /// The EWMA latency, decayed toward zero for the time since the last answer (as tower's
    /// PeakEwma does), so an endpoint avoided for being slow is tried again after a while.
    pub fn rtt(&self) -> Duration {
        Duration::from_nanos(self.rtt_ns_now() as u64)
    }

    fn rtt_ns_now(&self) -> f64 {
        let stored = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let now = self.epoch.elapsed().as_nanos() as u64;
        let idle = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        stored * (-idle / DECAY.as_nanos() as f64).exp()
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn observed(&self) -> bool {
        self.observed.load(Ordering::Relaxed)
    }

    /// `rtt × (pending + 1)`: what P2C compares.
    pub fn cost(&self) -> f64 {
        self.cost_with(self.rtt_ns_now())
    }

    /// The cost with the latency estimate fading over `memory` instead of [`DECAY`]: what an
    /// endpoint that gets no traffic (another zone's) was last seen to cost, forgotten slowly
    /// enough that a quiet spell does not make it look free.
    pub fn cost_remembered(&self, memory: Duration) -> f64 {
        let stored = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let now = self.epoch.elapsed().as_nanos() as u64;
        let idle = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        self.cost_with(stored * (-idle / memory.as_nanos() as f64).exp())
    }

    /// The cost with a given latency estimate (for endpoints not yet observed).
    pub fn cost_with(&self, rtt_ns: f64) -> f64 {
        rtt_ns * (self.pending() + 1) as f64
    }

    pub fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// [`finish_at`](Self::finish_at) now.
    #[cfg(test)]
    pub fn finish(&self, rtt: Duration) -> Duration {
        self.finish_at(rtt, Instant::now())
    }

    /// Ends a request that took `rtt`, the clock read at `now` (the caller read it to time
    /// `rtt`). A slower-than-average sample replaces the average at once (the peak); faster ones
    /// pull it down with weight decaying over [`DECAY`]. Returns the new estimate.
    pub fn finish_at(&self, rtt: Duration, now: Instant) -> Duration {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let then = self.stamp.swap(now, Ordering::Relaxed);
        let sample = rtt.as_nanos() as f64;
        let old = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let w = (-(now.saturating_sub(then) as f64) / DECAY.as_nanos() as f64).exp();
        let next = if !self.observed.swap(true, Ordering::Relaxed) || sample > old * w {
            sample
        } else {
            old * w + sample * (1.0 - w)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        Duration::from_nanos(next as u64)
    }

    /// Ends a request that produced no latency sample (it failed before a response).
    pub fn abandon(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

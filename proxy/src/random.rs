//! The proxy's one source of randomness, for choices that must differ between proxies and
//! between calls but need not be secret: P2C's two candidates ([`crate::balance`]) and backoff
//! jitter ([`crate::backoff`]). Never for keys or tokens (rustls and rcgen bring their own).
//!
//! A wyrand generator per thread: a counter stepped by an odd constant and mixed by one
//! 128-bit multiply, so every state (zero included) is valid and a draw is a few instructions
//! with no lock or atomic. Each thread seeds once from `RandomState` (the standard library's
//! OS-random hash keys) hashed with the thread's id: two proxies, or two threads of one proxy,
//! never start from the same state. Timing was used before and made poor seeds: the elapsed
//! time of a just-taken `Instant` is a few nanoseconds, nearly the same every time.
//!
//! No crate for this: `fastrand` would do the same, but these forty lines are the whole need.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

const WY_ADD: u64 = 0xa076_1d64_78bd_642f;
const WY_XOR: u64 = 0xe703_7ed1_a0b4_28db;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// A fresh seed: OS-random keys (a new `RandomState` differs from the last even on one
/// thread) over the thread's id.
fn seed() -> u64 {
    RandomState::new().hash_one(std::thread::current().id())
}

fn mix(state: u64) -> u64 {
    let m = u128::from(state) * u128::from(state ^ WY_XOR);
    ((m >> 64) as u64) ^ (m as u64)
}

/// A uniformly random `u64`.
pub(crate) fn u64() -> u64 {
    STATE.with(|s| {
        let next = s.get().wrapping_add(WY_ADD);
        s.set(next);
        mix(next)
    })
}

/// A uniformly random number in `0..n`; 0 when `n` is 0 (no range to draw from; callers
/// check emptiness themselves, and a panic here would take a request down with it).
pub(crate) fn below(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    // Lemire's multiply-shift, rejecting the few low products that would bias small values.
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// A uniformly random `f64` in `[0, 1)`: the top 53 bits, so every value is exact.
pub(crate) fn unit_f64() -> f64 {
    (u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn values_differ_across_calls() {
        let draws: HashSet<u64> = (0..1000).map(|_| u64()).collect();
        // 1000 draws of 64 bits colliding at all has odds of about 3e-14.
        assert_eq!(draws.len(), 1000);
    }

    #[test]
    fn threads_start_from_different_states() {
        let firsts: HashSet<u64> = (0..16)
            .map(|_| std::thread::spawn(u64))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(firsts.len(), 16, "{firsts:?}");
    }

    #[test]
    fn fresh_seeds_differ() {
        let seeds: HashSet<u64> = (0..100).map(|_| seed()).collect();
        assert_eq!(seeds.len(), 100);
    }

    #[test]
    fn below_is_uniform_and_in_range() {
        const BINS: u64 = 10;
        const DRAWS: u64 = 100_000;
        let mut counts = [0u64; BINS as usize];
        for _ in 0..DRAWS {
            let v = below(BINS);
            assert!(v < BINS);
            counts[v as usize] += 1;
        }
        let expected = (DRAWS / BINS) as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // Nine degrees of freedom: the mean is 9 and a uniform source exceeds 50 with odds
        // below 1e-7, while a biased one (say 10 % extra on one bin: chi² ≈ 100) fails.
        assert!(chi2 < 50.0, "chi² {chi2:.1} over {counts:?}");
        assert_eq!(below(0), 0);
        assert_eq!(below(1), 0);
    }

    #[test]
    fn unit_f64_is_in_range_and_spread() {
        let draws: Vec<f64> = (0..10_000).map(|_| unit_f64()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        // The standard error of the mean is 0.0029; 0.05 off is 17 of them.
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }
}

//! Exponential backoff with jitter, for everything that retries: control-plane watches
//! ([`crate::discover`]), Certify ([`crate::identity`]) and endpoint reconnects
//! ([`crate::endpoint`]).
//!
//! The ceiling doubles from `min` per failure up to `max`. The delay is drawn below it:
//! - [`Backoff::new`]: AWS's "full jitter", uniform in `[0, ceiling]`. Every proxy that lost
//!   the control plane together spreads its reconnects over the whole window, which keeps
//!   the load on a control plane coming back lowest; a short delay costs one more attempt.
//! - [`Backoff::with_floor`]: "equal jitter", uniform in `[ceiling / 2, ceiling]`. For endpoint
//!   reconnects, where the delay is also a health signal: requests fail fast while every
//!   endpoint's next retry is beyond the failfast window ([`crate::balance::FAILFAST`]), so a
//!   long-dead endpoint must keep a long delay, and halving the spread still de-synchronises
//!   proxies whose endpoint failed for all of them at once.
//!
//! Jitter comes from [`crate::random`]: seeded per thread from OS randomness, so proxies that
//! failed in the same instant still draw different delays (the clock's nanoseconds, used
//! before, are nearly the same for all of them).

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    /// Failures since the last reset: the ceiling is `min × 2^attempt`.
    attempt: u32,
    /// The share of the ceiling that is always waited: 0 (full jitter) or ½ (equal jitter).
    floor: f64,
}

impl Backoff {
    /// Full jitter between zero and a ceiling that doubles from `min` to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            floor: 0.0,
        }
    }

    /// Equal jitter: at least half the ceiling (see the module header for who needs that).
    pub(crate) fn with_floor(min: Duration, max: Duration) -> Self {
        Backoff {
            floor: 0.5,
            ..Backoff::new(min, max)
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures counted since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        // 2^31 × any useful `min` is beyond every `max`; the cap keeps the shift defined.
        self.min
            .checked_mul(1u32 << self.attempt.min(31))
            .map_or(self.max, |c| c.min(self.max))
    }

    /// The next delay, counting one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let share = self.floor + (1.0 - self.floor) * crate::random::unit_f64();
        // Through f64 seconds, which cannot overflow the way `Duration::mul_f64` can near
        // `Duration::MAX`; rounding up past the ceiling is clamped.
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * share)
            .map_or(ceiling, |d| d.min(ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn delays_stay_within_zero_and_the_ceiling() {
        for mut b in [Backoff::new(MIN, MAX), Backoff::with_floor(MIN, MAX)] {
            for attempt in 0..100u32 {
                let ceiling = b.ceiling();
                assert_eq!(
                    ceiling,
                    (MIN * 2u32.saturating_pow(attempt.min(20))).min(MAX)
                );
                let d = b.next_delay();
                assert!(d <= ceiling && d <= MAX, "{d:?} over {ceiling:?}");
                assert!(d >= ceiling.mul_f64(b.floor), "{d:?} under the floor");
            }
            assert_eq!(b.attempts(), 100);
        }
    }

    #[test]
    fn delays_grow_with_attempts_on_average() {
        // Mean of 200 runs per attempt: full jitter's mean is half the ceiling.
        let mean_at = |attempt: u32| {
            let total: Duration = (0..200)
                .map(|_| {
                    let mut b = Backoff::new(MIN, MAX);
                    for _ in 0..attempt {
                        b.next_delay();
                    }
                    b.next_delay()
                })
                .sum();
            total / 200
        };
        let means: Vec<Duration> = (0..8).map(mean_at).collect();
        for w in means.windows(2) {
            assert!(w[1] > w[0], "{means:?}");
        }
        // At the cap the mean is about MAX / 2 (uniform, sd of the mean ≈ 0.2 s).
        let capped = mean_at(30);
        assert!(
            capped > Duration::from_secs(4) && capped < Duration::from_secs(6),
            "{capped:?}"
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::with_floor(MIN, MAX);
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), MAX);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), MIN);
        let d = b.next_delay();
        assert!(d >= MIN / 2 && d <= MIN, "{d:?}");
    }

    #[test]
    fn jitter_varies() {
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            b.next_delay();
        }
        // At the cap: 100 draws from [0, 10 s] at nanosecond resolution.
        let draws: std::collections::HashSet<Duration> =
            (0..100).map(|_| b.clone().next_delay()).collect();
        assert!(draws.len() > 90, "{} distinct of 100", draws.len());
        let f = Backoff::with_floor(MIN, MAX);
        let firsts: std::collections::HashSet<Duration> =
            (0..100).map(|_| f.clone().next_delay()).collect();
        assert!(firsts.len() > 90, "{} distinct of 100", firsts.len());
    }

    #[test]
    fn degenerate_bounds_do_not_panic() {
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.next_delay(), Duration::ZERO);
        // max below min: min wins, rather than a ceiling below the start.
        let mut inverted = Backoff::with_floor(Duration::from_secs(2), Duration::from_secs(1));
        for _ in 0..40 {
            assert!(inverted.next_delay() <= Duration::from_secs(2));
        }
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            assert!(huge.next_delay() <= Duration::MAX);
        }
    }
}

//! Exponential backoff, written once: every retry schedule in the workspace is a [`RetryPolicy`].
//!
//! Attempts are counted from 1, the first try included, as job records and queue tickets count
//! them: after attempt `n` failed, the next try waits [`RetryPolicy::delay`]`(n)`, and there is
//! one while [`RetryPolicy::has_attempts_left`]`(n)`.

use std::time::Duration;

/// A retry schedule: `first_delay`, doubling with each failed attempt up to `max_delay`, each
/// delay scaled by a random factor within ±`jitter`, for at most `max_attempts` attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The wait after the first failed attempt.
    pub first_delay: Duration,
    /// The doubling stops here (before jitter).
    pub max_delay: Duration,
    /// Fraction each delay is randomly scaled by, up or down (0.25: ±25 %), so that what failed
    /// together does not retry together. 0: the delays are exact.
    pub jitter: f64,
    /// Attempts in all, the first included; `i32::MAX` where something else ends the retries.
    pub max_attempts: i32,
}

impl RetryPolicy {
    /// A job whose check failed with a transient code, or that hit a database error: 2 s
    /// doubling to 5 min, ±25 % jitter, 5 attempts; never sooner than the exchange's
    /// `Retry-After` ([`RetryPolicy::delay_honouring`]). The job is rescheduled, since apalis's
    /// SQL backends retry immediately.
    pub const JOB: Self = Self {
        first_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(300),
        jitter: 0.25,
        max_attempts: 5,
    };

    /// A queue ticket handed back because its handler could not reach the database
    /// (`Store::retry_ticket`): 2 s doubling to 30 s, 25 attempts, after which it stays failed
    /// for an operator to see.
    pub const TICKET: Self =
        Self { first_delay: Duration::from_secs(2), max_delay: Duration::from_secs(30), jitter: 0.0, max_attempts: 25 };

    /// The wait after attempt `attempt` failed (attempts below 1 count as the first).
    pub fn delay(&self, attempt: i32) -> Duration {
        let doublings = u32::try_from(attempt.max(1) - 1).unwrap_or(0);
        let delay = self.first_delay.saturating_mul(2u32.saturating_pow(doublings)).min(self.max_delay);
        if self.jitter > 0.0 {
            use rand::Rng;
            delay.mul_f64(rand::thread_rng().gen_range(1.0 - self.jitter..=1.0 + self.jitter))
        } else {
            delay
        }
    }

    /// [`RetryPolicy::delay`], or the exchange's `Retry-After` when that is longer: retrying
    /// sooner would only be refused again (or get us banned).
    pub fn delay_honouring(&self, attempt: i32, retry_after: Option<Duration>) -> Duration {
        let delay = self.delay(attempt);
        retry_after.map_or(delay, |wait| delay.max(wait))
    }

    /// Whether another attempt may follow `attempts` failed ones.
    pub fn has_attempts_left(&self, attempts: i32) -> bool {
        attempts < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(delays: impl IntoIterator<Item = Duration>) -> Vec<f64> {
        delays.into_iter().map(|d| d.as_secs_f64()).collect()
    }

    #[test]
    fn retry_delays_grow_with_jitter_and_respect_retry_after() {
        for attempt in 1..=10 {
            let d = RetryPolicy::JOB.delay(attempt);
            let base = (2.0 * 2f64.powi(attempt - 1)).min(300.0);
            assert!(d.as_secs_f64() >= base * 0.75 - 1e-9 && d.as_secs_f64() <= base * 1.25 + 1e-9, "{attempt}: {d:?}");
        }
        assert!(RetryPolicy::JOB.delay_honouring(1, Some(Duration::from_secs(60))) >= Duration::from_secs(60));
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| RetryPolicy::JOB.delay(3)).collect();
        assert!(distinct.len() > 1, "jitter varies the delay");
    }

    #[test]
    fn exact_delays_double_from_the_first_to_the_cap() {
        assert_eq!(secs((1..=7).map(|a| RetryPolicy::TICKET.delay(a))), [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        let halves = RetryPolicy { first_delay: Duration::from_millis(500), ..RetryPolicy::TICKET };
        assert_eq!(secs((1..=4).map(|a| halves.delay(a))), [0.5, 1.0, 2.0, 4.0]);
        assert_eq!(RetryPolicy::TICKET.delay(0), Duration::from_secs(2), "attempt 0 counts as the first");
        assert_eq!(RetryPolicy::TICKET.delay(-3), Duration::from_secs(2));
    }

    #[test]
    fn delays_stay_at_the_cap_however_many_attempts() {
        for attempt in [9, 10, 31, 32, 33, 64, 1_000, i32::MAX] {
            assert_eq!(RetryPolicy::TICKET.delay(attempt), Duration::from_secs(30), "{attempt}");
            let d = RetryPolicy::JOB.delay(attempt);
            assert!(d >= Duration::from_secs(225) && d <= Duration::from_secs(375), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn jitter_stays_within_its_bounds_on_both_sides() {
        let samples: Vec<Duration> = (0..2_000).map(|_| RetryPolicy::JOB.delay(2)).collect();
        let (low, high) = (Duration::from_secs(3), Duration::from_secs(5));
        assert!(samples.iter().all(|d| (low..=high).contains(d)), "4 s ± 25 %");
        // Uniform over [3 s, 5 s]: 2,000 draws with none in an outer tenth has odds of 0.9^2000.
        assert!(samples.iter().any(|d| *d < Duration::from_millis(3_200)), "reaches down to -25 %");
        assert!(samples.iter().any(|d| *d > Duration::from_millis(4_800)), "reaches up to +25 %");
    }

    #[test]
    fn retry_after_is_a_floor_not_a_replacement() {
        let long = Duration::from_secs(600);
        assert_eq!(RetryPolicy::JOB.delay_honouring(1, Some(long)), long, "longer than any backoff: it wins");
        assert_eq!(RetryPolicy::TICKET.delay_honouring(3, Some(Duration::from_secs(9))), Duration::from_secs(9));
        // Shorter than the backoff: the backoff stands.
        assert_eq!(RetryPolicy::TICKET.delay_honouring(3, Some(Duration::from_secs(1))), Duration::from_secs(8));
        assert_eq!(RetryPolicy::TICKET.delay_honouring(3, None), Duration::from_secs(8));
        for _ in 0..100 {
            let d = RetryPolicy::JOB.delay_honouring(1, Some(Duration::from_millis(10)));
            assert!(d >= Duration::from_millis(1_500) && d <= Duration::from_millis(2_500), "{d:?}");
        }
    }

    #[test]
    fn attempts_run_out_at_the_limit() {
        assert!((0..5).all(|a| RetryPolicy::JOB.has_attempts_left(a)));
        assert!(!RetryPolicy::JOB.has_attempts_left(5));
        assert!(!RetryPolicy::JOB.has_attempts_left(6));
        assert!(RetryPolicy::TICKET.has_attempts_left(24));
        assert!(!RetryPolicy::TICKET.has_attempts_left(25));
    }
}

//! The per-user budget for write requests (`API_USER_RATE_LIMIT_PER_MINUTE`).
//!
//! One GCRA bucket per user id (governor): a user may burst up to the per-minute figure, then
//! refills evenly. The budget is per API process; behind the ALB with N processes a user gets
//! at most N times the figure, which still bounds what one account can push into the queue.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tradeeon_shared::domain::UserId;

use crate::ApiError;

pub struct UserRateLimiter {
    limiter: DefaultKeyedRateLimiter<UserId>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl UserRateLimiter {
    /// Forget buckets that have refilled every this many checks, so idle users cost no memory.
    const SWEEP_EVERY: u64 = 4096;

    pub fn new(per_minute: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Charges one write to `user`; [`ApiError::RateLimited`] with the wait if the budget is spent.
    pub fn check(&self, user: UserId) -> Result<(), ApiError> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % Self::SWEEP_EVERY == Self::SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&user).map_err(|not_until| ApiError::RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_their_own_budget() {
        let limiter = UserRateLimiter::new(3);
        let (a, b) = (UserId::new_random(), UserId::new_random());
        for _ in 0..3 {
            limiter.check(a).unwrap();
        }
        match limiter.check(a) {
            Err(ApiError::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(20), "{retry_after:?}")
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        limiter.check(b).unwrap();
    }
}

//! Local rate limiting per route: a token bucket per key (the client's
//! address, or a header's value), kept by `governor`, the well-kept GCRA
//! implementation. A request over the limit gets 429 with `Retry-After`
//! and is counted (`edge_rate_limited_total{route}`).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::route_limits::{RateKey, RateLimit};

/// Keys idle long enough to be full again are dropped this often (checks).
const PRUNE_EVERY: u64 = 8192;

/// One route's buckets.
pub struct RouteRateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    /// What keys a bucket.
    pub by: RateKey,
    checks: AtomicU64,
}

impl RouteRateLimiter {
    /// Buckets for `limit`.
    pub fn new(limit: &RateLimit) -> Option<RouteRateLimiter> {
        let burst = NonZeroU32::new(limit.burst)?;
        let quota = Quota::with_period(limit.period)?.allow_burst(burst);
        Some(RouteRateLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            by: limit.by.clone(),
            checks: AtomicU64::new(0),
        })
    }

    /// Take a token for `key`; when there is none, how long until one.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            // Bounded memory: keys whose bucket is full again carry no state.
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

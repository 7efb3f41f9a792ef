//! Which failed attempts may be retried, and Envoy's retry budget that keeps
//! retries from multiplying load during an outage. The rules:
//!
//! - safe methods (GET, HEAD, OPTIONS, TRACE) are retried after a connect
//!   failure or a reset before any response byte, on another backend and
//!   then another region; never after a timeout (the backend may still be
//!   working on it) and never once a response has started;
//! - a request with `Idempotency-Key` only when the connection failed
//!   before the request was sent, and only within the region (the key is
//!   the application's, and another region's replica may not know it yet);
//! - every other request is never retried;
//! - retries in flight per upstream stay within `budget_percent` of
//!   requests in flight, with `min_retry_concurrency` always allowed.

use std::sync::atomic::{AtomicU32, Ordering};

use http::Method;

use crate::config::RetryBudgetConfig;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made: nothing was sent.
    Connect,
    /// Reset or closed before any response byte; the request may have been received.
    Reset,
    /// No answer in time; the backend may still be processing it.
    Timeout,
}

impl Failure {
    /// The same failure as `decide` records it in the attempt history.
    pub fn attempt(self) -> edge_policies::AttemptFailure {
        match self {
            Failure::Connect => edge_policies::AttemptFailure::Connect,
            Failure::Reset => edge_policies::AttemptFailure::Reset,
            Failure::Timeout => edge_policies::AttemptFailure::Timeout,
        }
    }
}

/// What a request allows, from its method and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retryable {
    /// Safe method: connect failures and resets, any region.
    Safe,
    /// `Idempotency-Key` on an unsafe method: connect failures, same region only.
    KeyedSameRegion,
    /// Never.
    Never,
}

/// An unsafe method (RFC 9110 9.2.1): anything but GET, HEAD, OPTIONS and TRACE.
/// Policies route these as writes.
pub fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

impl Retryable {
    /// Classify a request.
    pub fn of(method: &Method, has_idempotency_key: bool) -> Retryable {
        match *method {
            _ if !is_unsafe(method) => Retryable::Safe,
            _ if has_idempotency_key => Retryable::KeyedSameRegion,
            _ => Retryable::Never,
        }
    }

    /// May an attempt that failed this way be retried?
    pub fn allows(self, failure: Failure) -> bool {
        matches!(
            (self, failure),
            (Retryable::Safe, Failure::Connect | Failure::Reset)
                | (Retryable::KeyedSameRegion, Failure::Connect)
        )
    }

    /// May the retry go to another region?
    pub fn may_leave_region(self) -> bool {
        self == Retryable::Safe
    }
}

/// Requests and retries in flight for one upstream.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// A request starts.
    pub fn start_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ends, with `retries` retries it held.
    pub fn end_request(&self, retries: u32) {
        self.requests.fetch_sub(1, Ordering::Relaxed);
        if retries > 0 {
            self.retries.fetch_sub(retries, Ordering::Relaxed);
        }
    }

    /// Take one retry from the budget; false when the budget is spent.
    pub fn try_retry(&self, cfg: &RetryBudgetConfig) -> bool {
        let requests = self.requests.load(Ordering::Relaxed);
        let allowed = allowed_retries(requests, cfg);
        self.retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < allowed).then_some(r + 1)
            })
            .is_ok()
    }
}

/// Retries allowed in flight with `requests` requests in flight.
pub fn allowed_retries(requests: u32, cfg: &RetryBudgetConfig) -> u32 {
    let share = (u64::from(requests) * u64::from(cfg.budget_percent) / 100) as u32;
    share.max(cfg.min_retry_concurrency)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: RetryBudgetConfig = RetryBudgetConfig {
        budget_percent: 20,
        min_retry_concurrency: 3,
    };

    #[test]
    fn rules_by_method_and_failure() {
        let get = Retryable::of(&Method::GET, false);
        assert!(get.allows(Failure::Connect) && get.allows(Failure::Reset));
        assert!(!get.allows(Failure::Timeout));
        let keyed = Retryable::of(&Method::POST, true);
        assert!(keyed.allows(Failure::Connect));
        assert!(!keyed.allows(Failure::Reset) && !keyed.allows(Failure::Timeout));
        assert!(!keyed.may_leave_region());
        let post = Retryable::of(&Method::POST, false);
        assert!(!post.allows(Failure::Connect));
    }

    #[test]
    fn budget_is_a_share_of_requests_with_a_floor() {
        assert_eq!(allowed_retries(0, &CFG), 3);
        assert_eq!(allowed_retries(10, &CFG), 3);
        assert_eq!(allowed_retries(100, &CFG), 20);
        let b = RetryBudget::default();
        for _ in 0..10 {
            b.start_request();
        }
        assert!(b.try_retry(&CFG) && b.try_retry(&CFG) && b.try_retry(&CFG));
        assert!(!b.try_retry(&CFG), "the fourth concurrent retry is refused");
        b.end_request(1);
        assert!(b.try_retry(&CFG), "a finished retry frees budget");
    }
}

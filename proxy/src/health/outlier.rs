//! Passive outlier ejection with Envoy's two consecutive detectors: gateway
//! failures (connect error, reset, timeout, 502/503/504; on by default) and
//! any 5xx (off by default, because a client can make an application answer
//! 500 at will). A backend that reaches either count is ejected for
//! `base_ejection × times ejected`, capped at `max_ejection`; the multiplier
//! resets after a clean stretch of `max_ejection`. Pure: time is an argument.

use std::time::{Duration, Instant};

use crate::config::OutlierConfig;

/// How one attempt at a backend ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// Connect error, reset, timeout, or 502/503/504.
    GatewayFailure,
    /// Any other 5xx (500, 501, 505, …): the application answered.
    Other5xx,
}

impl Outcome {
    /// Classify a response status.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            502..=504 => Outcome::GatewayFailure,
            500..=599 => Outcome::Other5xx,
            _ => Outcome::Success,
        }
    }
}

/// Outlier state of one backend.
#[derive(Debug, Clone, Default)]
pub struct OutlierState {
    consecutive: u32,
    consecutive_5xx: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
    last_readmitted: Option<Instant>,
}

impl OutlierState {
    /// Is it ejected at `now`?
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// When the current ejection ends.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// How many times it has been ejected (the multiplier).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected
    }

    /// Gateway failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Would one more failure of this kind eject the backend (if the cap allows)?
    pub fn would_eject(&self, outcome: Outcome, now: Instant, cfg: &OutlierConfig) -> bool {
        if outcome == Outcome::Success || self.is_ejected(now) {
            return false;
        }
        let gateway = outcome == Outcome::GatewayFailure
            && self.consecutive + 1 >= cfg.consecutive_gateway_failures;
        let any_5xx = cfg.consecutive_5xx > 0 && self.consecutive_5xx + 1 >= cfg.consecutive_5xx;
        gateway || any_5xx
    }

    /// Record an outcome. `may_eject` is false when the region already has
    /// `max_ejection_percent` of its backends out. Returns the ejection time
    /// when this outcome ejects the backend.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now: Instant,
        cfg: &OutlierConfig,
        may_eject: bool,
    ) -> Option<Duration> {
        if outcome == Outcome::Success {
            self.consecutive = 0;
            self.consecutive_5xx = 0;
            return None;
        }
        if self.is_ejected(now) {
            return None;
        }
        let ejects = self.would_eject(outcome, now, cfg);
        // An application 5xx breaks a run of gateway failures (as in Envoy).
        self.consecutive = match outcome {
            Outcome::GatewayFailure => self.consecutive.saturating_add(1),
            _ => 0,
        };
        self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
        if !ejects || !may_eject {
            return None;
        }
        if self
            .last_readmitted
            .is_some_and(|t| now.saturating_duration_since(t) > cfg.max_ejection)
        {
            self.times_ejected = 0;
        }
        self.times_ejected = self.times_ejected.saturating_add(1);
        let time = cfg
            .base_ejection
            .saturating_mul(self.times_ejected)
            .min(cfg.max_ejection);
        // An absurd configured time must not panic on the request path.
        self.ejected_until = now
            .checked_add(time)
            .or_else(|| now.checked_add(Duration::from_secs(3600)));
        self.consecutive = 0;
        self.consecutive_5xx = 0;
        Some(time)
    }

    /// Re-admit when the ejection time is over; true when this call re-admitted it.
    pub fn readmit_if_due(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(t) if now >= t => {
                self.ejected_until = None;
                self.last_readmitted = Some(now);
                true
            }
            _ => false,
        }
    }
}

/// Whether one more backend of a region may be ejected. Like Envoy, at least
/// one may always be ejected unless the percentage is 0 (ejection disabled).
pub fn may_eject(already_ejected: usize, total: usize, max_percent: u8) -> bool {
    if max_percent == 0 {
        return false;
    }
    already_ejected == 0 || (already_ejected + 1) * 100 <= usize::from(max_percent) * total
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Outcome = Outcome::GatewayFailure;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_gateway_failures: 3,
            consecutive_5xx: 0,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_for_base_times_count_capped() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        assert_eq!(s.record(G, t0, &cfg(), true), None);
        assert_eq!(s.record(G, t0, &cfg(), true), None);
        assert_eq!(s.record(G, t0, &cfg(), true), Some(Duration::from_secs(10)));
        assert!(s.is_ejected(t0 + Duration::from_secs(9)));
        assert!(s.readmit_if_due(t0 + Duration::from_secs(10)));
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..2 {
            s.record(G, t1, &cfg(), true);
        }
        assert_eq!(s.record(G, t1, &cfg(), true), Some(Duration::from_secs(20)));
        s.readmit_if_due(t1 + Duration::from_secs(20));
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..2 {
            s.record(G, t2, &cfg(), true);
        }
        assert_eq!(
            s.record(G, t2, &cfg(), true),
            Some(Duration::from_secs(25)),
            "capped"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        s.record(G, t0, &cfg(), true);
        s.record(G, t0, &cfg(), true);
        s.record(Outcome::Success, t0, &cfg(), true);
        assert_eq!(s.record(G, t0, &cfg(), true), None);
        assert_eq!(s.consecutive_failures(), 1);
    }

    #[test]
    fn max_ejection_percent_holds_back_ejection() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..5 {
            assert_eq!(s.record(G, t0, &cfg(), false), None);
        }
        assert!(!s.is_ejected(t0));
        assert!(may_eject(0, 1, 50), "one may always go");
        assert!(!may_eject(1, 2, 50));
        assert!(may_eject(1, 4, 50));
        assert!(!may_eject(0, 4, 0), "0% disables ejection");
    }

    #[test]
    fn application_5xx_do_not_eject_unless_configured() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..10 {
            assert_eq!(s.record(Outcome::from_status(500), t0, &cfg(), true), None);
        }
        let mut with_5xx = cfg();
        with_5xx.consecutive_5xx = 4;
        let mut s = OutlierState::default();
        for _ in 0..3 {
            assert_eq!(s.record(Outcome::Other5xx, t0, &with_5xx, true), None);
        }
        assert!(s.record(Outcome::Other5xx, t0, &with_5xx, true).is_some());
    }

    #[test]
    fn a_500_breaks_a_run_of_gateway_failures() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        s.record(G, t0, &cfg(), true);
        s.record(Outcome::from_status(503), t0, &cfg(), true);
        s.record(Outcome::Other5xx, t0, &cfg(), true);
        assert_eq!(s.record(G, t0, &cfg(), true), None);
        assert_eq!(s.record(G, t0, &cfg(), true), None);
        assert!(s.record(G, t0, &cfg(), true).is_some());
    }

    #[test]
    fn multiplier_resets_after_a_clean_stretch() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..3 {
            s.record(G, t0, &cfg(), true);
        }
        s.readmit_if_due(t0 + Duration::from_secs(10));
        let later = t0 + Duration::from_secs(100);
        for _ in 0..2 {
            s.record(G, later, &cfg(), true);
        }
        assert_eq!(
            s.record(G, later, &cfg(), true),
            Some(Duration::from_secs(10))
        );
    }
}

//! Passive outlier ejection (Envoy's consecutive-5xx detector): a backend that
//! fails `consecutive_failures` responses in a row is ejected for
//! `base_ejection × times ejected`, capped at `max_ejection`; the multiplier
//! resets after a clean stretch of `max_ejection`. Pure: time is an argument.

use std::time::{Duration, Instant};

use crate::config::OutlierConfig;

/// Outlier state of one backend.
#[derive(Debug, Clone, Default)]
pub struct OutlierState {
    consecutive: u32,
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

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Record a response (or connection) outcome. `may_eject` is false when the
    /// region already has `max_ejection_percent` of its backends out. Returns
    /// the ejection time when this outcome ejects the backend.
    pub fn record(
        &mut self,
        success: bool,
        now: Instant,
        cfg: &OutlierConfig,
        may_eject: bool,
    ) -> Option<Duration> {
        if success {
            self.consecutive = 0;
            return None;
        }
        if self.is_ejected(now) {
            return None;
        }
        self.consecutive += 1;
        if self.consecutive < cfg.consecutive_failures || !may_eject {
            return None;
        }
        if self
            .last_readmitted
            .is_some_and(|t| now.saturating_duration_since(t) > cfg.max_ejection)
        {
            self.times_ejected = 0;
        }
        self.times_ejected += 1;
        let time = cfg
            .base_ejection
            .saturating_mul(self.times_ejected)
            .min(cfg.max_ejection);
        self.ejected_until = Some(now + time);
        self.consecutive = 0;
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

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_for_base_times_count_capped() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        assert_eq!(s.record(false, t0, &cfg(), true), None);
        assert_eq!(s.record(false, t0, &cfg(), true), None);
        assert_eq!(
            s.record(false, t0, &cfg(), true),
            Some(Duration::from_secs(10))
        );
        assert!(s.is_ejected(t0 + Duration::from_secs(9)));
        assert!(s.readmit_if_due(t0 + Duration::from_secs(10)));
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..2 {
            s.record(false, t1, &cfg(), true);
        }
        assert_eq!(
            s.record(false, t1, &cfg(), true),
            Some(Duration::from_secs(20))
        );
        s.readmit_if_due(t1 + Duration::from_secs(20));
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..2 {
            s.record(false, t2, &cfg(), true);
        }
        assert_eq!(
            s.record(false, t2, &cfg(), true),
            Some(Duration::from_secs(25)),
            "capped"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        s.record(false, t0, &cfg(), true);
        s.record(false, t0, &cfg(), true);
        s.record(true, t0, &cfg(), true);
        assert_eq!(s.record(false, t0, &cfg(), true), None);
        assert_eq!(s.consecutive_failures(), 1);
    }

    #[test]
    fn max_ejection_percent_holds_back_ejection() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..5 {
            assert_eq!(s.record(false, t0, &cfg(), false), None);
        }
        assert!(!s.is_ejected(t0));
        assert!(may_eject(0, 1, 50), "one may always go");
        assert!(!may_eject(1, 2, 50));
        assert!(may_eject(1, 4, 50));
        assert!(!may_eject(0, 4, 0), "0% disables ejection");
    }

    #[test]
    fn multiplier_resets_after_a_clean_stretch() {
        let t0 = Instant::now();
        let mut s = OutlierState::default();
        for _ in 0..3 {
            s.record(false, t0, &cfg(), true);
        }
        s.readmit_if_due(t0 + Duration::from_secs(10));
        let later = t0 + Duration::from_secs(100);
        for _ in 0..2 {
            s.record(false, later, &cfg(), true);
        }
        assert_eq!(
            s.record(false, later, &cfg(), true),
            Some(Duration::from_secs(10))
        );
    }
}

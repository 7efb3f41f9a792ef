//! Active-check hysteresis: a backend flips only after N consecutive results
//! that disagree with its state (Envoy's healthy/unhealthy thresholds).

/// Health state of one probed target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    healthy: bool,
    streak: u32,
}

impl Hysteresis {
    /// Targets start healthy so a restart does not black-hole traffic while
    /// the first probes run; retries and passive ejection cover a dead one.
    pub fn new_healthy() -> Self {
        Hysteresis {
            healthy: true,
            streak: 0,
        }
    }

    /// Current state.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Record a probe result; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool, healthy_after: u32, unhealthy_after: u32) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { healthy_after } else { unhealthy_after };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_unhealthy_after_threshold_failures_only() {
        let mut h = Hysteresis::new_healthy();
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert!(!h.is_healthy());
    }

    #[test]
    fn a_pass_in_between_resets_the_streak() {
        let mut h = Hysteresis::new_healthy();
        h.observe(false, 2, 2);
        h.observe(true, 2, 2);
        assert_eq!(h.observe(false, 2, 2), None);
        assert_eq!(h.observe(false, 2, 2), Some(false));
    }

    #[test]
    fn recovers_after_threshold_passes() {
        let mut h = Hysteresis::new_healthy();
        h.observe(false, 2, 1);
        assert_eq!(h.observe(true, 2, 1), None);
        assert_eq!(h.observe(true, 2, 1), Some(true));
    }
}

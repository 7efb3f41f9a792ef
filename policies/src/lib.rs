//! Pure routing decisions for edge-router.
//!
//! This crate owns one question: *which region's backends serve this request?*
//! It answers from a snapshot of health that the proxy builds in the background
//! ([`UpstreamView`]) and from facts about the request ([`RequestFacts`]). It
//! must not do I/O, read clocks or touch sockets: every rule here is a row in a
//! table test, and the invariants in DESIGN.md are property tests. The proxy
//! feeds it snapshots and acts on its [`Decision`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// A route's consistency policy: where its reads and writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Local backends only; none healthy means 503.
    Local,
    /// Local backends while any is healthy, else the nearest healthy region.
    LocalFirst,
}

/// A policy name that this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A policy DESIGN.md names that a later release implements.
    #[error("policy `{0}` is not available in this release (available: local, local-first)")]
    NotYetAvailable(String),
    /// A name that is no policy at all.
    #[error("unknown policy `{0}` (expected one of: local, local-first)")]
    Unknown(String),
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Policy::Local),
            "local-first" => Ok(Policy::LocalFirst),
            "primary" | "read-your-writes" | "bounded-staleness" => {
                Err(PolicyError::NotYetAvailable(s.to_string()))
            }
            other => Err(PolicyError::Unknown(other.to_string())),
        }
    }
}

impl Policy {
    /// The name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Local => "local",
            Policy::LocalFirst => "local-first",
        }
    }
}

/// What one region looks like to this proxy, for one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    /// Region name, e.g. `eu-west-1`.
    pub name: String,
    /// True for the region this proxy runs in.
    pub local: bool,
    /// Backends that may take traffic now (active checks pass, not ejected).
    /// For a peer region: what its edge-router last reported for its own backends.
    pub healthy: u32,
    /// All backends the region has for this upstream.
    pub total: u32,
    /// For a peer region: its edge-router answers its health path. Always true locally.
    pub reachable: bool,
    /// Smoothed round-trip time to the peer, once measured.
    pub rtt: Option<Duration>,
    /// Configured preference: lower is nearer. Breaks RTT ties and stands in before any RTT exists.
    pub order: u32,
}

/// Everything `decide` needs about an upstream, built in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamView {
    /// Every region that has this upstream or a peer; exactly one is `local`.
    pub regions: Vec<RegionView>,
    /// Below this share of healthy backends (percent), health is ignored (Envoy's panic threshold). 0 disables.
    pub panic_threshold_percent: u8,
    /// RTT differences smaller than this are ties, so loopback or jitter does not flap the choice.
    pub rtt_tolerance: Duration,
}

/// Facts about the request that matter for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// The route's policy.
    pub policy: Policy,
    /// The request came from a peer edge-router with a valid signed hop: serve it here or nowhere.
    pub valid_hop: bool,
    /// Region indexes (into `UpstreamView::regions`) already tried for this request and failed.
    pub exclude: &'a [usize],
}

/// Where the request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Region `index` in the view. `panic` means: ignore backend health there.
    Region {
        /// Index into `UpstreamView::regions`.
        index: usize,
        /// Health is ignored (panic threshold reached): any backend may be used.
        panic: bool,
    },
    /// No region may serve it: answer 503 with the reason.
    Unavailable,
}

/// Why the decision was made; a short, bounded label for logs, metrics and `x-edge-decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Local backends are healthy.
    Local,
    /// A valid hop from a peer: served locally, never forwarded again.
    Hop,
    /// No region serves normally and this one has too few healthy backends: health ignored there.
    Panic,
    /// No healthy local backend: the nearest healthy region serves.
    FailoverNoHealthyLocal,
    /// An earlier attempt in another region failed before a response: the next region serves.
    FailoverRetry,
    /// `local` policy (or a hop) and no healthy local backend.
    UnavailableNoHealthyLocal,
    /// No region has a healthy backend.
    UnavailableNoHealthyRegion,
}

impl Reason {
    /// The label as it appears in logs, metrics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Local => "local",
            Reason::Hop => "hop:local",
            Reason::Panic => "panic",
            Reason::FailoverNoHealthyLocal => "failover:no-healthy-local",
            Reason::FailoverRetry => "failover:retry",
            Reason::UnavailableNoHealthyLocal => "unavailable:no-healthy-local",
            Reason::UnavailableNoHealthyRegion => "unavailable:no-healthy-region",
        }
    }

    /// True when the request left the local region because of health.
    pub fn is_failover(self) -> bool {
        matches!(self, Reason::FailoverNoHealthyLocal | Reason::FailoverRetry)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer: a target and the reason for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub target: Target,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    fn region(index: usize, reason: Reason) -> Self {
        Decision {
            target: Target::Region {
                index,
                panic: false,
            },
            reason,
        }
    }

    fn panic(index: usize) -> Self {
        Decision {
            target: Target::Region { index, panic: true },
            reason: Reason::Panic,
        }
    }

    fn unavailable(reason: Reason) -> Self {
        Decision {
            target: Target::Unavailable,
            reason,
        }
    }
}

/// The front door: decide which region serves a request.
pub fn decide(view: &UpstreamView, req: &RequestFacts<'_>) -> Decision {
    let Some(local) = view.regions.iter().position(|r| r.local) else {
        return Decision::unavailable(Reason::UnavailableNoHealthyRegion);
    };
    let local_only = req.valid_hop || req.policy == Policy::Local;
    if local_only {
        return decide_local_only(view, local, req.valid_hop);
    }
    decide_local_first(view, local, req.exclude)
}

fn decide_local_only(view: &UpstreamView, local: usize, hop: bool) -> Decision {
    let region = &view.regions[local];
    let ok_reason = if hop { Reason::Hop } else { Reason::Local };
    if serves(view, region) {
        return Decision::region(local, ok_reason);
    }
    if region.total > 0 && in_panic(view, region) {
        return Decision::panic(local);
    }
    Decision::unavailable(Reason::UnavailableNoHealthyLocal)
}

/// Panic is judged per region (Envoy judges it per priority level): a
/// region whose healthy share is under the threshold is passed over while
/// another region serves normally, and only when none does is health
/// ignored, locally first.
fn decide_local_first(view: &UpstreamView, local: usize, exclude: &[usize]) -> Decision {
    let usable = |i: usize, r: &RegionView| !exclude.contains(&i) && (r.local || r.reachable);
    if !exclude.contains(&local) && serves(view, &view.regions[local]) {
        return Decision::region(local, Reason::Local);
    }
    let reason = if exclude.is_empty() {
        Reason::FailoverNoHealthyLocal
    } else {
        Reason::FailoverRetry
    };
    if let Some(index) = nearest(view, |i, r| usable(i, r) && !r.local && serves(view, r)) {
        return Decision::region(index, reason);
    }
    // No region serves normally. If too few backends are healthy, health
    // checks are probably wrong: spread load over everything rather than
    // overload the few that pass (Envoy's panic mode).
    let local_r = &view.regions[local];
    if !exclude.contains(&local) && local_r.total > 0 && in_panic(view, local_r) {
        return Decision::panic(local);
    }
    match nearest(view, |i, r| {
        usable(i, r) && !r.local && r.total > 0 && in_panic(view, r)
    }) {
        Some(index) => Decision::panic(index),
        None => Decision::unavailable(Reason::UnavailableNoHealthyRegion),
    }
}

/// A region serves normally: some backend is healthy and it is not in panic.
fn serves(view: &UpstreamView, r: &RegionView) -> bool {
    r.healthy > 0 && !in_panic(view, r)
}

/// True when the region's healthy share is below the panic threshold.
fn in_panic(view: &UpstreamView, r: &RegionView) -> bool {
    view.panic_threshold_percent > 0
        && r.total > 0
        && u64::from(r.healthy) * 100 < u64::from(view.panic_threshold_percent) * u64::from(r.total)
}

/// The nearest region among those `eligible` accepts: lowest RTT, where RTTs
/// closer than the tolerance tie and the configured order decides.
pub fn nearest(
    view: &UpstreamView,
    eligible: impl Fn(usize, &RegionView) -> bool,
) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..view.regions.len())
        .filter(|&i| eligible(i, &view.regions[i]))
        .collect();
    candidates.sort_by(|&a, &b| {
        let (ra, rb) = (&view.regions[a], &view.regions[b]);
        (ra.order, &ra.name).cmp(&(rb.order, &rb.name))
    });
    let mut best = *candidates.first()?;
    for &c in &candidates[1..] {
        if let (Some(c_rtt), Some(b_rtt)) = (view.regions[c].rtt, view.regions[best].rtt) {
            if c_rtt + view.rtt_tolerance < b_rtt {
                best = c;
            }
        }
    }
    Some(best)
}

//! The snapshots `decide` reads: health per region and replication as the
//! local replica sees it. The proxy builds them in the background; nothing
//! here changes while a decision is made.

use std::time::Duration;

/// A set of region indexes (bit i = region i of the UpstreamView); at most 64 regions.
///
/// Indexes 64 and above can never be members: [`RegionSet::contains`] is
/// false for them (even for [`RegionSet::ALL`]) and [`RegionSet::with`]
/// ignores them, so `decide` never routes to a region past index 63. Config
/// must reject upstreams with more regions than that.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegionSet(pub u64);

impl RegionSet {
    /// Every region: an unrestricted route.
    pub const ALL: RegionSet = RegionSet(u64::MAX);

    /// No region at all.
    pub const fn empty() -> RegionSet {
        RegionSet(0)
    }

    /// True when region `i` is in the set.
    pub const fn contains(self, i: usize) -> bool {
        i < 64 && self.0 & (1u64 << i) != 0
    }

    /// The set plus region `i` (unchanged when `i` is 64 or more).
    pub const fn with(self, i: usize) -> RegionSet {
        if i < 64 {
            RegionSet(self.0 | (1u64 << i))
        } else {
            self
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
    /// For a peer region: its edge-router answers its health path. Always true locally
    /// (and ignored there: the local region is never "unreachable").
    pub reachable: bool,
    /// Smoothed round-trip time to the peer, once measured.
    pub rtt: Option<Duration>,
    /// Configured preference: lower is nearer. Breaks RTT ties and stands in before any RTT exists.
    pub order: u32,
}

/// Everything `decide` needs about an upstream's health, built in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamView {
    /// Every region that has this upstream or a peer; exactly one is `local`.
    pub regions: Vec<RegionView>,
    /// Below this share of healthy backends (percent), health is ignored (Envoy's panic threshold). 0 disables.
    pub panic_threshold_percent: u8,
    /// RTT differences smaller than this are ties, so loopback or jitter does not flap the choice.
    pub rtt_tolerance: Duration,
    /// Index of the upstream's primary region, if it has one (needed by primary,
    /// bounded-staleness and writes = primary; config guarantees it for those routes).
    /// `None` or an index outside `regions` is treated as a primary that cannot serve.
    pub primary: Option<usize>,
}

/// Replication as this proxy's local replica sees it, indexed like `UpstreamView::regions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagView<'a> {
    /// Newest time (Unix ms) up to which region i's writes are visible in the local replica
    /// (the oldest of its heartbeat shards); None = unknown (no heartbeat yet, or the table is
    /// unreachable). Unknown is treated as the worst case: infinitely behind. A region past
    /// the end of the slice is unknown too.
    pub watermarks_ms: &'a [Option<u64>],
    /// The proxy's clock when the request arrived (Unix ms). decide never reads a clock.
    pub now_ms: u64,
    /// Clock-skew margin: a token (W, t) is satisfied locally iff watermark(W) >= t + margin.
    pub margin_ms: u64,
}

impl LagView<'_> {
    /// Region `i`'s watermark, or `None` when unknown (including past the slice's end).
    pub(crate) fn watermark(&self, i: usize) -> Option<u64> {
        self.watermarks_ms.get(i).copied().flatten()
    }
}

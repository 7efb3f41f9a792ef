//! The one snapshot `edge_policies::decide` reads: backend health, the
//! replication lag into the local replica and the clock, taken together at
//! the start of a decision. Each part is published by its own background
//! task (health probes, heartbeats); loading both is two atomic loads.

use std::sync::Arc;

use arc_swap::Guard;
use edge_policies::{LagView, UpstreamView};

use crate::clock::unix_ms;
use crate::health::{HealthState, Snapshot};
use crate::tables::heartbeat::{LagSnapshot, LagState};

/// Where the parts of the composed snapshot come from.
pub struct Snapshots {
    /// Health and topology.
    pub health: Arc<HealthState>,
    /// Replication lag.
    pub lag: Arc<LagState>,
    /// Clock-skew margin for consistency tokens (ms).
    pub margin_ms: u64,
}

impl Snapshots {
    /// Health, lag and the time, now.
    pub fn load(&self) -> RoutingSnapshot {
        RoutingSnapshot {
            health: self.health.snapshot(),
            lag: self.lag.snapshot(),
            now_ms: unix_ms(),
            margin_ms: self.margin_ms,
        }
    }
}

/// A composed snapshot; held for one decision.
pub struct RoutingSnapshot {
    /// Health views per upstream.
    pub health: Guard<Arc<Snapshot>>,
    /// Watermarks per region.
    pub lag: Guard<Arc<LagSnapshot>>,
    /// Unix ms when it was taken.
    pub now_ms: u64,
    margin_ms: u64,
}

impl RoutingSnapshot {
    /// The view of one upstream.
    pub fn view(&self, upstream: usize) -> &UpstreamView {
        &self.health.views[upstream]
    }

    /// Replication as `decide` takes it.
    pub fn lag_view(&self) -> LagView<'_> {
        LagView {
            watermarks_ms: &self.lag.watermarks_ms,
            now_ms: self.now_ms,
            margin_ms: self.margin_ms,
        }
    }
}

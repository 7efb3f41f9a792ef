//! The peer wire format: the JSON a proxy serves on its health path about its
//! own backends, and reads from every peer region's health path.
//!
//! Building the local report is a pure function of the topology and a
//! `Snapshot`; serving it and fetching peers' reports happen elsewhere
//! (`service`, `prober`). No locks, no I/O here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::snapshot::Snapshot;
use super::topology::Topology;

/// What a proxy reports about its own backends on its health path; peers read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionReport {
    /// The reporting region.
    pub region: String,
    /// `ok`, `draining` or `unavailable`.
    pub status: String,
    /// Per upstream: local backends healthy / total.
    pub upstreams: HashMap<String, UpstreamCount>,
    /// The reporting region's [`Topology::routes_hash`](super::Topology) (empty from older releases).
    #[serde(default)]
    pub routes_hash: String,
}

/// Healthy and total local backends of one upstream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamCount {
    /// Eligible now.
    pub healthy: u32,
    /// Configured.
    pub total: u32,
}

impl RegionReport {
    /// The report this proxy serves on its health path, from the static
    /// topology and the current snapshot (`HealthState::report` calls it).
    pub fn local(topo: &Topology, snap: &Snapshot, status: &str) -> RegionReport {
        RegionReport {
            region: topo.local_name().to_string(),
            status: status.to_string(),
            upstreams: topo
                .upstreams
                .iter()
                .enumerate()
                .map(|(ui, u)| {
                    (
                        u.config.name.clone(),
                        UpstreamCount {
                            healthy: snap.eligible_local[ui].len() as u32,
                            total: u.by_region[topo.local].len() as u32,
                        },
                    )
                })
                .collect(),
            routes_hash: topo.routes_hash.clone(),
        }
    }
}

//! What the request path reads: an immutable [`Snapshot`] of health, and the
//! pure function that builds it.
//!
//! `HealthState` (in `state.rs`) takes its locks, copies out what it observed
//! and hands plain values to `Snapshot::build`; the build itself takes no
//! locks, reads no clock and touches no metrics, so it can be tested on its own.

use std::collections::HashMap;
use std::time::Duration;

use edge_policies::{decide, LagView, RegionView, RequestFacts, RetryScope, Target, UpstreamView};

use super::report::UpstreamCount;
use super::topology::{Topology, UpstreamTopology};

/// What the request path reads: per-upstream views for `decide` and which
/// local backends may take traffic.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Per upstream, the view `decide` takes.
    pub views: Vec<UpstreamView>,
    /// Per upstream, the local backends that pass checks and are not ejected.
    pub eligible_local: Vec<Vec<usize>>,
    /// Some route can be served from here (else the health path answers 503).
    pub serviceable: bool,
}

/// What this proxy last observed about one peer region, copied out of its lock.
#[derive(Debug, Clone, Default)]
pub(super) struct PeerObservation {
    /// Its health path passes active checks (hysteresis says up).
    pub(super) up: bool,
    /// Smoothed round-trip time, once measured.
    pub(super) rtt: Option<Duration>,
    /// Its last report: per upstream name, its local backends healthy / total.
    pub(super) reported: HashMap<String, UpstreamCount>,
}

impl Snapshot {
    /// Build from plain inputs.
    ///
    /// `eligible_local[u]`: upstream `u`'s local backends that pass active
    /// checks and are not ejected. `peers[r]`: what region `r`'s edge-router
    /// last told us (indexed like `topo.regions`; the local region's entry is
    /// ignored).
    pub(super) fn build(
        topo: &Topology,
        eligible_local: Vec<Vec<usize>>,
        peers: &[PeerObservation],
    ) -> Snapshot {
        let views: Vec<UpstreamView> = topo
            .upstreams
            .iter()
            .zip(&eligible_local)
            .map(|(u, eligible)| upstream_view(topo, u, eligible.len() as u32, peers))
            .collect();
        let serviceable = serviceable(topo, &views);
        Snapshot {
            views,
            eligible_local,
            serviceable,
        }
    }
}

/// `decide`'s view of upstream `u`: the local region from `healthy_local`
/// (its eligible local backends), each peer region from what it reported.
fn upstream_view(
    topo: &Topology,
    u: &UpstreamTopology,
    healthy_local: u32,
    peers: &[PeerObservation],
) -> UpstreamView {
    let regions = topo
        .regions
        .iter()
        .enumerate()
        .map(|(ri, r)| {
            if ri == topo.local {
                return RegionView {
                    name: r.name.clone(),
                    local: true,
                    healthy: healthy_local,
                    total: u.by_region[ri].len() as u32,
                    reachable: true,
                    rtt: None,
                    order: r.order,
                };
            }
            let p = &peers[ri];
            let count = p
                .reported
                .get(&u.config.name)
                .copied()
                .unwrap_or(UpstreamCount {
                    healthy: 0,
                    total: 0,
                });
            let reachable = r.peer.is_some() && p.up;
            RegionView {
                name: r.name.clone(),
                local: false,
                healthy: if reachable { count.healthy } else { 0 },
                total: count.total,
                reachable,
                rtt: p.rtt.or(r.rtt_hint),
                order: r.order,
            }
        })
        .collect();
    let primary = u
        .config
        .primary_region
        .as_deref()
        .and_then(|name| topo.regions.iter().position(|r| r.name == name));
    UpstreamView {
        regions,
        panic_threshold_percent: u.config.panic_threshold,
        rtt_tolerance: topo.rtt_tolerance,
        primary,
    }
}

/// Some route can be served from here: for a plain first read (no hop, no
/// token, no attempts yet, replication lag unknown), its policy's decision
/// over `views` targets a region that is not in panic.
fn serviceable(topo: &Topology, views: &[UpstreamView]) -> bool {
    // No lag is known here: every watermark is unknown (worst case). An empty
    // slice is not used for that on purpose; one entry per region.
    let watermarks_ms: Vec<Option<u64>> = vec![None; topo.regions.len()];
    let lag = LagView {
        watermarks_ms: &watermarks_ms,
        now_ms: 0,
        margin_ms: 0,
    };
    // Routes that answer themselves (`return`) need no backend: a file of
    // only those is always served; otherwise they do not hide that every
    // proxied route is down, so the accelerator still moves clients away.
    if topo.route_policies.is_empty() {
        return true;
    }
    topo.route_policies.iter().any(|route| {
        let facts = RequestFacts {
            policy: route.policy,
            write: false,
            valid_hop: false,
            token: None,
            allowed: route.allowed,
            attempts: &[],
            retry_scope: RetryScope::Anywhere,
            peers_check_tokens: true,
        };
        // A region in panic is serving on health it does not trust:
        // report it as unable, so the accelerator moves clients away.
        let d = decide(&views[route.upstream], &lag, &facts);
        !matches!(
            d.target,
            Target::Unavailable | Target::Region { panic: true, .. }
        )
    })
}

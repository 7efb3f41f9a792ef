//! The health part of the admin `/status` document.
//!
//! Read-only: it locks each backend and peer briefly to copy what it shows
//! and never rebuilds the snapshot or touches metrics.

use std::time::Instant;

use super::state::HealthState;

impl HealthState {
    /// The admin `/status` document.
    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let snap = self.snapshot();
        let topo = &self.topo;
        let upstreams: Vec<serde_json::Value> = topo
            .upstreams
            .iter()
            .enumerate()
            .map(|(ui, u)| {
                let backends: Vec<serde_json::Value> = u.by_region[topo.local]
                    .iter()
                    .map(|&bi| {
                        let h = self.backends[ui][bi].lock();
                        serde_json::json!({
                            "address": u.backends[bi].label,
                            "active_healthy": h.active.is_healthy(),
                            "ejected": h.outlier.is_ejected(now),
                            "ejected_for_ms": h.outlier.ejected_until()
                                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                            "times_ejected": h.outlier.times_ejected(),
                            "consecutive_failures": h.outlier.consecutive_failures(),
                            "eligible": snap.eligible_local[ui].contains(&bi),
                            "disabled": h.disabled,
                        })
                    })
                    .collect();
                let regions: Vec<serde_json::Value> = snap.views[ui]
                    .regions
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "region": r.name, "local": r.local, "healthy": r.healthy,
                            "total": r.total, "reachable": r.reachable,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": u.config.name, "primary_region": u.config.primary_region,
                    "backends": backends, "regions": regions,
                })
            })
            .collect();
        let peers: Vec<serde_json::Value> = topo
            .regions
            .iter()
            .enumerate()
            .filter(|(ri, _)| *ri != topo.local)
            .map(|(ri, r)| {
                let p = self.peers[ri].lock();
                serde_json::json!({
                    "region": r.name,
                    "peer": r.peer.as_ref().map(|p| p.authority.clone()),
                    "healthy": p.active.is_healthy() && r.peer.is_some(),
                    "rtt_ms": p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    "order": r.order,
                    "routes_hash": p.routes_hash,
                    "routes_match": p.routes_hash.as_ref().map(|h| *h == topo.routes_hash),
                })
            })
            .collect();
        serde_json::json!({
            "region": topo.local_name(),
            "routes_hash": topo.routes_hash,
            "serviceable": snap.serviceable,
            "upstreams": upstreams,
            "peers": peers,
        })
    }
}

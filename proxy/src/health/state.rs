//! The mutable health of one proxy: observations in, snapshots out.
//!
//! Probes, passive outcomes and the re-admission timer write here under
//! small per-backend and per-peer locks; each change that matters rebuilds
//! the [`Snapshot`] (built by the pure `Snapshot::build`) and swaps it in.
//! The request path only loads the snapshot and picks a local backend.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::hysteresis::Hysteresis;
use super::outlier::{self, Outcome, OutlierState};
use super::report::{RegionReport, UpstreamCount};
use super::snapshot::{PeerObservation, Snapshot};
use super::topology::Topology;
use crate::metrics::Metrics;

#[derive(Debug)]
pub(super) struct BackendHealth {
    pub(super) active: Hysteresis,
    pub(super) outlier: OutlierState,
    /// Taken out of rotation through the admin API (nginx's `down`).
    pub(super) disabled: bool,
}

#[derive(Debug)]
pub(super) struct PeerHealth {
    pub(super) active: Hysteresis,
    pub(super) rtt: Option<Duration>,
    pub(super) reported: HashMap<String, UpstreamCount>,
    /// The peer's routes digest, when it reports one.
    pub(super) routes_hash: Option<String>,
}

/// Shared, mutable health of one proxy.
pub struct HealthState {
    /// Static topology.
    pub topo: Arc<Topology>,
    /// Shared with the state a reload replaces, for backends both know.
    pub(super) backends: Vec<Vec<Arc<Mutex<BackendHealth>>>>,
    pub(super) peers: Vec<Arc<Mutex<PeerHealth>>>,
    /// This state publishes the health gauges (the serving one does; one
    /// being built by a reload, or replaced, does not).
    publishing: std::sync::atomic::AtomicBool,
    snapshot: ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    rebuild: Mutex<()>,
    /// Per upstream: held while counting ejected backends and ejecting one,
    /// so concurrent failures cannot together exceed `max_ejection_percent`.
    ejecting: Vec<Mutex<()>>,
}

impl HealthState {
    /// Everything starts healthy; see `Hysteresis::new_healthy`.
    pub fn new(topo: Arc<Topology>, metrics: Arc<Metrics>) -> HealthState {
        HealthState::build(topo, metrics, None)
    }

    /// The state for a reloaded config: the backends (same upstream name,
    /// address and region) and peers it shares with `old` share their
    /// health with it, so nothing either learns is lost (a backend found
    /// down stays down, an ejection runs its course, outcomes of requests
    /// still running on `old` count); new ones start healthy. It publishes
    /// no metrics until [`HealthState::go_live`].
    pub fn succeed(topo: Arc<Topology>, metrics: Arc<Metrics>, old: &HealthState) -> HealthState {
        HealthState::build(topo, metrics, Some(old))
    }

    /// This state now serves and publishes the health gauges; `old` stops,
    /// and the gauges of backends it had and this one does not are removed.
    pub fn go_live(&self, old: &HealthState) {
        use std::sync::atomic::Ordering;
        old.publishing.store(false, Ordering::SeqCst);
        self.publishing.store(true, Ordering::SeqCst);
        for ou in &old.topo.upstreams {
            for ob in &ou.backends {
                let kept = self.topo.upstreams.iter().any(|u| {
                    u.config.name == ou.config.name
                        && u.backends.iter().any(|b| b.label == ob.label)
                });
                if !kept && ob.region == old.topo.local {
                    let labels = [
                        ou.config.name.as_str(),
                        old.topo.local_name(),
                        ob.label.as_str(),
                    ];
                    let _ = self.metrics.backend_healthy.remove_label_values(&labels);
                    let _ = self.metrics.backend_ejected.remove_label_values(&labels);
                }
            }
        }
        self.rebuild(Instant::now());
    }

    fn build(topo: Arc<Topology>, metrics: Arc<Metrics>, old: Option<&HealthState>) -> HealthState {
        let shared = |u: &super::topology::UpstreamTopology, b: &super::topology::Backend| {
            let old = old?;
            let oi = old
                .topo
                .upstreams
                .iter()
                .position(|o| o.config.name == u.config.name)?;
            let obi = old.topo.upstreams[oi].backends.iter().position(|o| {
                o.addr == b.addr && old.topo.regions[o.region].name == topo.regions[b.region].name
            })?;
            Some(old.backends[oi][obi].clone())
        };
        let backends = topo
            .upstreams
            .iter()
            .map(|u| {
                u.backends
                    .iter()
                    .map(|b| {
                        shared(u, b).unwrap_or_else(|| {
                            Arc::new(Mutex::new(BackendHealth {
                                active: Hysteresis::new_healthy(),
                                outlier: OutlierState::default(),
                                disabled: false,
                            }))
                        })
                    })
                    .collect()
            })
            .collect();
        let peers = topo
            .regions
            .iter()
            .map(|r| {
                let was = old.and_then(|old| {
                    let i = old.topo.regions.iter().position(|o| o.name == r.name)?;
                    old.peers.get(i).cloned()
                });
                if let Some(cell) = was {
                    return cell;
                }
                Arc::new(Mutex::new(PeerHealth {
                    active: Hysteresis::new_healthy(),
                    rtt: None,
                    routes_hash: None,
                    // Until a peer reports, assume the configured backends are there.
                    reported: topo
                        .upstreams
                        .iter()
                        .map(|u| {
                            let total = u
                                .backends
                                .iter()
                                .filter(|b| topo.regions[b.region].name == r.name)
                                .count() as u32;
                            (
                                u.config.name.clone(),
                                UpstreamCount {
                                    healthy: total,
                                    total,
                                },
                            )
                        })
                        .collect(),
                }))
            })
            .collect();
        let empty = Snapshot {
            views: Vec::new(),
            eligible_local: Vec::new(),
            serviceable: false,
        };
        let ejecting = topo.upstreams.iter().map(|_| Mutex::new(())).collect();
        let state = HealthState {
            ejecting,
            topo,
            backends,
            peers,
            snapshot: ArcSwap::from_pointee(empty),
            metrics,
            rebuild: Mutex::new(()),
            publishing: std::sync::atomic::AtomicBool::new(old.is_none()),
        };
        state.rebuild(Instant::now());
        state
    }

    /// Take the local backend `address` (`ip:port`) of `upstream` out of
    /// rotation, or put it back; an error says which name is unknown.
    pub fn set_disabled(
        &self,
        upstream: &str,
        address: &str,
        disabled: bool,
    ) -> Result<(), String> {
        let ui = self
            .topo
            .upstreams
            .iter()
            .position(|u| u.config.name == upstream)
            .ok_or_else(|| format!("no upstream `{upstream}`"))?;
        let u = &self.topo.upstreams[ui];
        let bi = u.by_region[self.topo.local]
            .iter()
            .copied()
            .find(|&bi| u.backends[bi].label == address)
            .ok_or_else(|| format!("upstream `{upstream}` has no local backend `{address}`"))?;
        self.backends[ui][bi].lock().disabled = disabled;
        self.rebuild(Instant::now());
        Ok(())
    }

    /// The current snapshot (cheap: an atomic load).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Pick a local backend of `upstream` round-robin, skipping `tried`;
    /// `any_health` (panic mode) ignores health.
    pub fn pick_local(
        &self,
        snap: &Snapshot,
        upstream: usize,
        tried: &[usize],
        any_health: bool,
    ) -> Option<usize> {
        let u = &self.topo.upstreams[upstream];
        let enabled: Vec<usize>;
        let pool: &[usize] = if any_health {
            // Panic mode ignores health, not an operator taking a backend out.
            enabled = u.by_region[self.topo.local]
                .iter()
                .copied()
                .filter(|&bi| !self.backends[upstream][bi].lock().disabled)
                .collect();
            &enabled
        } else {
            &snap.eligible_local[upstream]
        };
        if pool.is_empty() {
            return None;
        }
        let start = u.rr.fetch_add(1, Ordering::Relaxed);
        (0..pool.len())
            .map(|i| pool[(start + i) % pool.len()])
            .find(|b| !tried.contains(b))
    }

    /// An active probe result for a local backend.
    pub fn observe_probe(&self, upstream: usize, backend: usize, ok: bool) {
        let u = &self.topo.upstreams[upstream];
        let flipped = self.backends[upstream][backend].lock().active.observe(
            ok,
            u.config.health.healthy,
            u.config.health.unhealthy,
        );
        if let Some(healthy) = flipped {
            let b = &u.backends[backend];
            if healthy {
                tracing::info!(upstream = %u.config.name, backend = %b.label, "backend passes active checks again");
            } else {
                tracing::warn!(upstream = %u.config.name, backend = %b.label, "backend failed active checks: marked unhealthy");
            }
            self.rebuild(Instant::now());
        }
    }

    /// An outcome of real traffic to a local backend (passive outlier detection).
    pub fn observe_outcome(&self, upstream: usize, backend: usize, outcome: Outcome) {
        let now = Instant::now();
        let u = &self.topo.upstreams[upstream];
        let cfg = &u.config.outlier;
        {
            // Hot path: one uncontended lock, no scan of the region. Only an
            // outcome that would eject takes the per-upstream cap lock, so
            // client-chosen 500s do not serialise an upstream's requests.
            let mut h = self.backends[upstream][backend].lock();
            if !h.outlier.would_eject(outcome, now, cfg) {
                h.outlier.record(outcome, now, cfg, false);
                return;
            }
        }
        let region = u.backends[backend].region;
        let ejected = {
            // Failures are rare; the cap is checked and applied under one lock.
            let _cap = self.ejecting[upstream].lock();
            let may = self.backends[upstream][backend]
                .lock()
                .outlier
                .would_eject(outcome, now, cfg)
                && {
                    let ejected = u.by_region[region]
                        .iter()
                        .filter(|&&b| {
                            b != backend
                                && self.backends[upstream][b].lock().outlier.is_ejected(now)
                        })
                        .count();
                    outlier::may_eject(ejected, u.by_region[region].len(), cfg.max_ejection_percent)
                };
            self.backends[upstream][backend]
                .lock()
                .outlier
                .record(outcome, now, cfg, may)
        };
        if let Some(time) = ejected {
            let b = &u.backends[backend];
            let region_name = &self.topo.regions[region].name;
            tracing::warn!(upstream = %u.config.name, backend = %b.label, ejection = ?time, ?outcome, "backend ejected after consecutive failures");
            self.metrics
                .ejections
                .with_label_values(&[
                    u.config.name.as_str(),
                    region_name.as_str(),
                    b.label.as_str(),
                ])
                .inc();
            self.rebuild(now);
        }
    }

    /// A peer probe: `Some((rtt, report))` when its health path answered 200.
    pub fn observe_peer(
        &self,
        region: usize,
        result: Option<(Duration, RegionReport)>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) {
        let name = &self.topo.regions[region].name;
        let flipped = {
            let mut p = self.peers[region].lock();
            let flipped = p
                .active
                .observe(result.is_some(), healthy_after, unhealthy_after);
            if let Some((rtt, report)) = result {
                // EWMA keeps one slow probe from moving traffic.
                p.rtt = Some(match p.rtt {
                    Some(prev) => prev.mul_f64(0.7) + rtt.mul_f64(0.3),
                    None => rtt,
                });
                self.metrics
                    .peer_rtt
                    .with_label_values(&[name.as_str()])
                    .set(p.rtt.unwrap_or_default().as_secs_f64());
                // Compared on every report: our own routes change with a
                // reload too.
                let theirs = Some(report.routes_hash).filter(|h| !h.is_empty());
                let differs = theirs.as_ref().is_some_and(|h| *h != self.topo.routes_hash);
                let was = p
                    .routes_hash
                    .as_ref()
                    .is_some_and(|h| *h != self.topo.routes_hash);
                if differs && (!was || theirs != p.routes_hash) {
                    tracing::warn!(peer = %name, ours = %self.topo.routes_hash, theirs = ?theirs, "a peer region's routes differ from ours: requests failed over to it may be routed differently (edge_peer_routes_differ)");
                }
                if self.publishing.load(std::sync::atomic::Ordering::SeqCst) {
                    self.metrics
                        .peer_routes_differ
                        .with_label_values(&[name.as_str()])
                        .set(i64::from(differs));
                }
                p.routes_hash = theirs;
                let changed = p.reported != report.upstreams;
                p.reported = report.upstreams;
                flipped.or(changed.then_some(true))
            } else {
                flipped
            }
        };
        if let Some(up) = flipped {
            if up {
                tracing::debug!(peer = %name, "peer region report changed");
            } else {
                tracing::warn!(peer = %name, "peer region unreachable or unhealthy");
            }
            self.rebuild(Instant::now());
        }
    }

    /// Re-admit backends whose ejection ended; called on a short timer.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut any = false;
        for (ui, u) in self.topo.upstreams.iter().enumerate() {
            for (bi, b) in u.backends.iter().enumerate() {
                if self.backends[ui][bi].lock().outlier.readmit_if_due(now) {
                    tracing::info!(upstream = %u.config.name, backend = %b.label, "ejection over: backend re-admitted");
                    any = true;
                }
            }
        }
        if any {
            self.rebuild(now);
        }
    }

    /// Read every observation under its lock, publish the health metrics,
    /// then build and swap in a new snapshot (one rebuild at a time).
    fn rebuild(&self, now: Instant) {
        let _one_at_a_time = self.rebuild.lock();
        let publishing = self.publishing.load(std::sync::atomic::Ordering::SeqCst);
        let topo = &self.topo;
        let mut eligible_local = Vec::with_capacity(topo.upstreams.len());
        for (ui, u) in topo.upstreams.iter().enumerate() {
            let mut eligible = Vec::new();
            for &bi in &u.by_region[topo.local] {
                let h = self.backends[ui][bi].lock();
                let ejected = h.outlier.is_ejected(now);
                let ok = h.active.is_healthy() && !ejected && !h.disabled;
                if publishing {
                    let labels = [
                        u.config.name.as_str(),
                        topo.local_name(),
                        u.backends[bi].label.as_str(),
                    ];
                    self.metrics
                        .backend_healthy
                        .with_label_values(&labels)
                        .set(i64::from(ok));
                    self.metrics
                        .backend_ejected
                        .with_label_values(&labels)
                        .set(i64::from(ejected));
                }
                if ok {
                    eligible.push(bi);
                }
            }
            eligible_local.push(eligible);
        }
        let peers: Vec<PeerObservation> = topo
            .regions
            .iter()
            .enumerate()
            .map(|(ri, r)| {
                if ri == topo.local {
                    return PeerObservation::default();
                }
                let p = self.peers[ri].lock();
                let up = p.active.is_healthy();
                if publishing {
                    self.metrics
                        .peer_healthy
                        .with_label_values(&[r.name.as_str()])
                        .set(i64::from(up && r.peer.is_some()));
                }
                PeerObservation {
                    up,
                    rtt: p.rtt,
                    reported: p.reported.clone(),
                }
            })
            .collect();
        let snapshot = Snapshot::build(topo, eligible_local, &peers);
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The report this proxy serves on its health path.
    pub fn report(&self, status: &str) -> RegionReport {
        RegionReport::local(&self.topo, &self.snapshot(), status)
    }
}

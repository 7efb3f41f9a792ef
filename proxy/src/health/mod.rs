//! Backend and peer-region health for one proxy.
//!
//! Background tasks ([`prober`]) and the request path (passive outcomes)
//! write observations here; each change that matters rebuilds an immutable
//! [`Snapshot`] published through `ArcSwap`, which the hot path only reads and
//! hands to `edge_policies::decide`. The maths (hysteresis, ejection) are pure
//! functions in their own modules.

pub mod hysteresis;
pub mod outlier;
pub mod prober;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use edge_policies::{decide, Policy, RegionView, RequestFacts, Target, UpstreamView};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::{Config, RegionConfig, UpstreamConfig};
use crate::metrics::Metrics;
use hysteresis::Hysteresis;
use outlier::{Outcome, OutlierState};

/// One backend of an upstream.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// Index of its region in `Topology::regions`.
    pub region: usize,
    /// `ip:port`, for labels.
    pub label: String,
}

/// One upstream, as the proxy uses it: its validated config plus the
/// backends laid out by region.
#[derive(Debug)]
pub struct UpstreamTopology {
    /// The validated `[upstreams.NAME]` (name, health, outlier, timeouts, …).
    pub config: UpstreamConfig,
    /// Every backend, all regions.
    pub backends: Vec<Backend>,
    /// Backend indexes per region index.
    pub by_region: Vec<Vec<usize>>,
    rr: AtomicUsize,
}

/// The static shape of the deployment, from config.
#[derive(Debug)]
pub struct Topology {
    /// Index of the local region.
    pub local: usize,
    /// Every region, in preference order.
    pub regions: Vec<RegionConfig>,
    /// Every upstream.
    pub upstreams: Vec<UpstreamTopology>,
    /// Each route's upstream and policy, to judge whether the region can serve.
    pub route_policies: Vec<(usize, Policy)>,
    /// RTTs closer than this are ties, so jitter does not flap the choice.
    pub rtt_tolerance: Duration,
}

impl Topology {
    /// Build from a validated config.
    pub fn from_config(config: &Config) -> Topology {
        let regions = config.regions.clone();
        let local = regions
            .iter()
            .position(|r| r.name == config.server.region)
            .unwrap_or(0);
        let upstreams = config
            .upstreams
            .iter()
            .map(|cfg| {
                let mut backends = Vec::new();
                let mut by_region = vec![Vec::new(); regions.len()];
                for (ri, region) in regions.iter().enumerate() {
                    for addr in cfg.backends.get(&region.name).into_iter().flatten() {
                        by_region[ri].push(backends.len());
                        backends.push(Backend {
                            addr: *addr,
                            region: ri,
                            label: addr.to_string(),
                        });
                    }
                }
                UpstreamTopology {
                    config: cfg.clone(),
                    backends,
                    by_region,
                    rr: AtomicUsize::new(0),
                }
            })
            .collect();
        let route_policies = config
            .routes
            .iter()
            .map(|r| (r.upstream, r.policy))
            .collect();
        Topology {
            local,
            regions,
            upstreams,
            route_policies,
            rtt_tolerance: config.server.rtt_tolerance,
        }
    }

    /// The local region's name.
    pub fn local_name(&self) -> &str {
        &self.regions[self.local].name
    }
}

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

/// What a proxy reports about its own backends on its health path; peers read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionReport {
    /// The reporting region.
    pub region: String,
    /// `ok`, `draining` or `unavailable`.
    pub status: String,
    /// Per upstream: local backends healthy / total.
    pub upstreams: HashMap<String, UpstreamCount>,
}

/// Healthy and total local backends of one upstream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamCount {
    /// Eligible now.
    pub healthy: u32,
    /// Configured.
    pub total: u32,
}

#[derive(Debug)]
struct BackendHealth {
    active: Hysteresis,
    outlier: OutlierState,
}

#[derive(Debug)]
struct PeerHealth {
    active: Hysteresis,
    rtt: Option<Duration>,
    reported: HashMap<String, UpstreamCount>,
}

/// Shared, mutable health of one proxy.
pub struct HealthState {
    /// Static topology.
    pub topo: Arc<Topology>,
    backends: Vec<Vec<Mutex<BackendHealth>>>,
    peers: Vec<Mutex<PeerHealth>>,
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
        let backends = topo
            .upstreams
            .iter()
            .map(|u| {
                u.backends
                    .iter()
                    .map(|_| {
                        Mutex::new(BackendHealth {
                            active: Hysteresis::new_healthy(),
                            outlier: OutlierState::default(),
                        })
                    })
                    .collect()
            })
            .collect();
        let peers = topo
            .regions
            .iter()
            .map(|r| {
                Mutex::new(PeerHealth {
                    active: Hysteresis::new_healthy(),
                    rtt: None,
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
                })
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
        };
        state.rebuild(Instant::now());
        state
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
        let pool: &[usize] = if any_health {
            &u.by_region[self.topo.local]
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

    fn rebuild(&self, now: Instant) {
        let _one_at_a_time = self.rebuild.lock();
        let topo = &self.topo;
        let mut views = Vec::with_capacity(topo.upstreams.len());
        let mut eligible_local = Vec::with_capacity(topo.upstreams.len());
        for (ui, u) in topo.upstreams.iter().enumerate() {
            let mut eligible = Vec::new();
            for &bi in &u.by_region[topo.local] {
                let h = self.backends[ui][bi].lock();
                let ejected = h.outlier.is_ejected(now);
                let ok = h.active.is_healthy() && !ejected;
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
                if ok {
                    eligible.push(bi);
                }
            }
            let regions = topo
                .regions
                .iter()
                .enumerate()
                .map(|(ri, r)| {
                    if ri == topo.local {
                        RegionView {
                            name: r.name.clone(),
                            local: true,
                            healthy: eligible.len() as u32,
                            total: u.by_region[ri].len() as u32,
                            reachable: true,
                            rtt: None,
                            order: r.order,
                        }
                    } else {
                        let p = self.peers[ri].lock();
                        let count =
                            p.reported
                                .get(&u.config.name)
                                .copied()
                                .unwrap_or(UpstreamCount {
                                    healthy: 0,
                                    total: 0,
                                });
                        let reachable = r.peer.is_some() && p.active.is_healthy();
                        RegionView {
                            name: r.name.clone(),
                            local: false,
                            healthy: if reachable { count.healthy } else { 0 },
                            total: count.total,
                            reachable,
                            rtt: p.rtt.or(r.rtt_hint),
                            order: r.order,
                        }
                    }
                })
                .collect();
            views.push(UpstreamView {
                regions,
                panic_threshold_percent: u.config.panic_threshold,
                rtt_tolerance: topo.rtt_tolerance,
            });
            eligible_local.push(eligible);
        }
        for (ri, r) in topo.regions.iter().enumerate() {
            if ri != topo.local {
                let up = self.peers[ri].lock().active.is_healthy() && r.peer.is_some();
                self.metrics
                    .peer_healthy
                    .with_label_values(&[r.name.as_str()])
                    .set(i64::from(up));
            }
        }
        let serviceable = topo.route_policies.iter().any(|&(ui, policy)| {
            let facts = RequestFacts {
                policy,
                valid_hop: false,
                exclude: &[],
            };
            // A region in panic is serving on health it does not trust:
            // report it as unable, so the accelerator moves clients away.
            let d = decide(&views[ui], &facts);
            !matches!(
                d.target,
                Target::Unavailable | Target::Region { panic: true, .. }
            )
        });
        self.snapshot.store(Arc::new(Snapshot {
            views,
            eligible_local,
            serviceable,
        }));
    }

    /// The report this proxy serves on its health path.
    pub fn report(&self, status: &str) -> RegionReport {
        let snap = self.snapshot();
        RegionReport {
            region: self.topo.local_name().to_string(),
            status: status.to_string(),
            upstreams: self
                .topo
                .upstreams
                .iter()
                .enumerate()
                .map(|(ui, u)| {
                    (
                        u.config.name.clone(),
                        UpstreamCount {
                            healthy: snap.eligible_local[ui].len() as u32,
                            total: u.by_region[self.topo.local].len() as u32,
                        },
                    )
                })
                .collect(),
        }
    }

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
                })
            })
            .collect();
        serde_json::json!({
            "region": topo.local_name(),
            "serviceable": snap.serviceable,
            "upstreams": upstreams,
            "peers": peers,
        })
    }
}

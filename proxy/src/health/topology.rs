//! The static shape of the deployment: regions, upstreams and their backends
//! laid out by region, and each route's policy.
//!
//! Built once from a validated config and never changed afterwards; the only
//! mutable thing here is the round-robin cursor `HealthState::pick_local`
//! advances. No health, no locks, no I/O.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use edge_policies::{Policy, RegionSet};

use crate::config::{Config, RegionConfig, UpstreamConfig};

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
    /// Round-robin cursor over the local backends (`HealthState::pick_local`).
    pub(super) rr: AtomicUsize,
}

/// One proxied route's upstream, policy and residency, to judge whether the
/// region can serve (a route that answers itself always can).
#[derive(Debug, Clone, Copy)]
pub struct RoutePolicy {
    /// Index into `Topology::upstreams`.
    pub upstream: usize,
    /// The route's consistency policy.
    pub policy: Policy,
    /// Data residency: regions (indexes into `Topology::regions`) this route
    /// may be served from; `RegionSet::ALL` when unrestricted.
    pub allowed: RegionSet,
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
    /// Each proxied route's upstream, policy and residency, to judge
    /// whether the region can serve (routes with `return` are not here).
    pub route_policies: Vec<RoutePolicy>,
    /// RTTs closer than this are ties, so jitter does not flap the choice.
    pub rtt_tolerance: Duration,
    /// A digest of the routes (and the upstreams' names they use): every
    /// region should have the same, so peers compare theirs.
    pub routes_hash: String,
}

/// SHA-256 of the routes, first 16 hex digits: what decides where a
/// request goes, written with names (not positions, which differ between
/// regions' files) and without header values (the hash is public on the
/// health path, and a value may be a credential). A setting newer than
/// the format is written only when set, so a file without it hashes as it
/// did (peers on the previous release agree during an upgrade).
pub fn routes_hash(config: &Config) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"routes-v1\n");
    for r in &config.routes {
        let (upstream, primary) = match r.upstream.map(|u| &config.upstreams[u]) {
            Some(u) => (u.name.as_str(), u.primary_region.as_deref()),
            None => ("", None),
        };
        let mut allowed: Vec<&str> = config
            .regions
            .iter()
            .enumerate()
            .filter(|(i, _)| r.allowed.contains(*i))
            .map(|(_, reg)| reg.name.as_str())
            .collect();
        allowed.sort_unstable();
        let names = |rules: &crate::config::route_limits::HeaderRules| {
            let mut v: Vec<String> = rules
                .remove
                .iter()
                .map(|n| format!("-{n}"))
                .chain(rules.set.iter().map(|(n, _)| format!("+{n}")))
                .collect();
            v.sort();
            v.join(",")
        };
        let mut line = format!(
            "{}|{:?}|{}|{}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{}|{}",
            r.name,
            r.host,
            r.path_prefix,
            upstream,
            primary,
            r.policy,
            allowed.join(","),
            r.cache,
            r.limits.max_body,
            r.limits.connect_timeout,
            r.limits.read_timeout,
            names(&r.limits.request_headers),
            names(&r.limits.response_headers),
        );
        if let Some(s) = &r.static_response {
            // The answer itself, body included: it is what clients get.
            line.push_str(&format!(
                "|return {} {:?} {:?} {:?}",
                s.status,
                s.location.as_ref().map(|l| l.template.as_str()),
                s.content_type,
                s.body
            ));
        }
        if let Some(c) = &r.compress {
            line.push_str(&format!(
                "|compress {} {} {:?}",
                c.gzip_level, c.brotli_level, c.types
            ));
        }
        line.push('\n');
        h.update(line.as_bytes());
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
            .filter_map(|r| {
                Some(RoutePolicy {
                    upstream: r.upstream?,
                    policy: r.policy,
                    allowed: r.allowed,
                })
            })
            .collect();
        Topology {
            local,
            regions,
            upstreams,
            route_policies,
            rtt_tolerance: config.server.rtt_tolerance,
            routes_hash: routes_hash(config),
        }
    }

    /// The local region's name.
    pub fn local_name(&self) -> &str {
        &self.regions[self.local].name
    }
}

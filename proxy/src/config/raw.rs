//! The file as written: serde types that mirror the TOML and only reject
//! unknown keys and wrong types. Meaning is checked in `validate`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// This proxy's region; `EDGE_REGION` overrides it.
    pub region: String,
    /// Traffic listeners, `ip:port`.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Worker threads for the traffic listener.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The region's health path on the traffic listener (for Global Accelerator).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// How long traffic is still served after SIGTERM.
    #[serde(default = "default_drain_period", with = "humantime_serde")]
    pub drain_period: Duration,
    /// Add `x-edge-decision` to responses.
    #[serde(default)]
    pub debug_headers: bool,
    /// Environment variable holding the HMAC key for `x-edge-hop`.
    #[serde(default = "default_hop_secret_env")]
    pub hop_secret_env: String,
    /// Networks whose `x-forwarded-*` headers are kept (CIDR or address).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Peer RTTs closer than this are ties, decided by `order`.
    #[serde(default = "default_rtt_tolerance", with = "humantime_serde")]
    pub rtt_tolerance: Duration,
}

fn default_rtt_tolerance() -> Duration {
    Duration::from_millis(5)
}

fn default_listen() -> Vec<String> {
    vec!["0.0.0.0:8080".to_string()]
}
fn default_threads() -> usize {
    2
}
fn default_health_path() -> String {
    "/.edge/health".to_string()
}
fn default_drain_period() -> Duration {
    Duration::from_secs(10)
}
fn default_hop_secret_env() -> String {
    "EDGE_HOP_SECRET".to_string()
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Admin listener address; loopback by default.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Environment variable holding the bearer token for mutations.
    #[serde(default = "default_token_env")]
    pub token_env: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token_env: default_token_env(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9901".to_string()
}
fn default_token_env() -> String {
    "EDGE_ADMIN_TOKEN".to_string()
}

/// `[regions.NAME]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    /// That region's edge-router, `http://host:port`.
    pub peer: Option<String>,
    /// Preference before RTT is measured, and tie-break after (lower is nearer).
    pub order: Option<u32>,
    /// Expected RTT, used until a measurement exists.
    #[serde(default, with = "humantime_serde")]
    pub rtt: Option<Duration>,
}

/// `[upstreams.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// The region that owns writes (used by later policies; checked now).
    pub primary_region: Option<String>,
    /// Active health checks.
    #[serde(default)]
    pub health: RawHealth,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: RawOutlier,
    /// Percent of healthy backends below which health is ignored; 0 disables.
    #[serde(default)]
    pub panic_threshold: u8,
    /// TCP connect timeout to a backend.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout for each read from a backend.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Backends per region, `host:port`.
    #[serde(default)]
    pub backends: BTreeMap<String, Vec<String>>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `health = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Path probed on each backend.
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// Time between probes.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Spread added to each interval, so probes of many proxies do not align.
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    /// A probe slower than this fails.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    #[serde(default = "default_healthy")]
    pub healthy: u32,
    /// Consecutive failures to become unhealthy.
    #[serde(default = "default_unhealthy")]
    pub unhealthy: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: default_probe_path(),
            interval: default_interval(),
            jitter: None,
            timeout: default_probe_timeout(),
            healthy: default_healthy(),
            unhealthy: default_unhealthy(),
        }
    }
}

fn default_probe_path() -> String {
    "/health".to_string()
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

/// `outlier = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    /// Consecutive failed responses (5xx or connection errors) that eject a backend.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// Ejection time is this × the number of times the backend was ejected.
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Cap on one ejection.
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    /// At most this percent of a region's backends are ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u8,
}

impl Default for RawOutlier {
    fn default() -> Self {
        RawOutlier {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u8 {
    50
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Label in metrics and logs; defaults to host + path prefix.
    pub name: Option<String>,
    /// `api.example.com`, `*.example.com` or `*`.
    pub host: String,
    /// Longest matching prefix wins.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Name of an `[upstreams.NAME]`.
    pub upstream: String,
    /// `local` or `local-first` in this release.
    #[serde(default = "default_policy")]
    pub policy: String,
}

fn default_path_prefix() -> String {
    "/".to_string()
}
fn default_policy() -> String {
    "local-first".to_string()
}

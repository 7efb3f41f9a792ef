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
    /// Format of the hops this proxy signs: `v2` (per-purpose key, default)
    /// or `v1` while peers still run the release before it (rolling upgrade).
    #[serde(default = "default_hop_format")]
    pub hop_format: String,
    /// Networks whose `x-forwarded-*` headers are kept (CIDR or address).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Peer RTTs closer than this are ties, decided by `order`.
    #[serde(default = "default_rtt_tolerance", with = "humantime_serde")]
    pub rtt_tolerance: Duration,
    /// Merge runs of `/` in request paths before matching (Envoy `merge_slashes`).
    #[serde(default = "default_true")]
    pub merge_slashes: bool,
    /// `%2F` and `%5C` in paths: `keep`, `reject` or `unescape`.
    #[serde(default = "default_escaped_slashes")]
    pub escaped_slashes: String,
    /// After `drain_period`, how long in-flight requests may still run.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long an idle client keep-alive connection is kept open.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A request head must arrive within this (else 408).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A write to a client that makes no progress for this long ends the response.
    #[serde(default = "default_send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Open client connections at most; beyond it new ones are closed. 0: no limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `[[server.tls]]`: TLS listeners.
    #[serde(default)]
    pub tls: Vec<RawTls>,
    /// Answer plain-HTTP requests with a redirect to the first TLS listener.
    #[serde(default)]
    pub redirect_https: bool,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners.
    #[serde(default)]
    pub h2c: bool,
    /// CA bundle of the regions' certificates (mutual TLS between regions).
    pub peer_ca: Option<String>,
    /// This region's certificate for peers.
    pub peer_cert: Option<String>,
    /// Its key.
    pub peer_key: Option<String>,
    /// Unix socket through which a new process (`run --upgrade`, SIGUSR2)
    /// takes the listening sockets from this one (graceful upgrade).
    pub upgrade_sock: Option<String>,
    /// How often names in backends and peers are resolved again (0s: never).
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub dns_refresh: Duration,
}

/// `[[server.tls]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `ip:port`.
    pub listen: String,
    /// Directory of `NAME.crt` + `NAME.key` pairs; chosen by SNI.
    pub certs: String,
    /// Offer HTTP/2 by ALPN.
    #[serde(default = "default_true")]
    pub h2: bool,
}

fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    10_000
}

fn default_true() -> bool {
    true
}
fn default_escaped_slashes() -> String {
    "keep".to_string()
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// When the log queue is full: `drop` (count and warn) or `block` the request.
    #[serde(default = "default_on_full")]
    pub on_full: String,
    /// Lines queued for the writer thread before `on_full` applies.
    #[serde(default = "default_queue_lines")]
    pub queue_lines: usize,
    /// Log request query strings too (off: they may carry tokens or personal data).
    #[serde(default)]
    pub access_query: bool,
    /// Write the access log to this file (reopened on SIGUSR1) instead of stderr.
    pub access_path: Option<String>,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            on_full: default_on_full(),
            queue_lines: default_queue_lines(),
            access_query: false,
            access_path: None,
        }
    }
}

fn default_queue_lines() -> usize {
    16 * 1024
}

fn default_on_full() -> String {
    "drop".to_string()
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
fn default_hop_format() -> String {
    "v2".to_string()
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
    /// Envoy's retry budget: retries in flight stay within a share of requests in flight.
    #[serde(default)]
    pub retry_budget: RawRetryBudget,
    /// Backends per region, `host:port`.
    #[serde(default)]
    pub backends: BTreeMap<String, Vec<String>>,
    /// Reach the backends over TLS.
    #[serde(default)]
    pub tls: bool,
    /// Server name sent and verified (default: the backend's address).
    pub sni: Option<String>,
    /// PEM bundle of the CAs the backends' certificates are checked against (default: the system's).
    pub ca: Option<String>,
    /// `http1`, `h2` (over TLS, by ALPN) or `h2c` (HTTP/2 in cleartext, prior knowledge).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Client certificate presented to the backends (mutual TLS).
    pub client_cert: Option<String>,
    /// Its key.
    pub client_key: Option<String>,
}

fn default_protocol() -> String {
    "http1".to_string()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `retry_budget = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    /// Retries in flight may be at most this percent of requests in flight.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u8,
    /// Retries always allowed in flight, whatever the percentage says.
    #[serde(default = "default_min_retry_concurrency")]
    pub min_retry_concurrency: u32,
}

impl Default for RawRetryBudget {
    fn default() -> Self {
        RawRetryBudget {
            budget_percent: default_budget_percent(),
            min_retry_concurrency: default_min_retry_concurrency(),
        }
    }
}

fn default_budget_percent() -> u8 {
    20
}
fn default_min_retry_concurrency() -> u32 {
    3
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
    /// Consecutive gateway failures (connect error, reset, timeout, 502/503/504)
    /// that eject a backend (Envoy `consecutive_gateway_failure`).
    /// `consecutive_failures` is the name earlier releases used.
    #[serde(
        default = "default_consecutive_failures",
        alias = "consecutive_failures"
    )]
    pub consecutive_gateway_failures: u32,
    /// Consecutive responses with any 5xx that eject a backend (Envoy
    /// `consecutive_5xx`); 0, the default, turns this detector off, since a
    /// client can make an application answer 500 at will.
    #[serde(default)]
    pub consecutive_5xx: u32,
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
            consecutive_gateway_failures: default_consecutive_failures(),
            consecutive_5xx: 0,
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
    /// Name of an `[upstreams.NAME]` (required, unless the route has `return`).
    pub upstream: Option<String>,
    /// `local`, `local-first` (the default), `primary`, `read-your-writes` or `bounded-staleness`.
    pub policy: Option<String>,
    /// Answer every request itself instead of an upstream (nginx's `return`).
    #[serde(rename = "return")]
    pub respond: Option<RawReturn>,
    /// Compress responses for clients that accept it (nginx's `gzip`).
    pub compress: Option<RawCompress>,
    /// `primary` (and writes to the primary): `fail` or `nearest` when the primary cannot serve.
    pub on_primary_down: Option<String>,
    /// `read-your-writes`: where writes go, `local` or `primary`.
    pub writes: Option<String>,
    /// `bounded-staleness`: the most lag from the primary a local read may have.
    #[serde(default, with = "humantime_serde")]
    pub max_staleness: Option<Duration>,
    /// Data residency: the only regions that may serve this route (default: all).
    pub allowed_regions: Option<Vec<String>>,
    /// Keep responses in this region's HTTP cache (docs/cache.md).
    #[serde(default)]
    pub cache: bool,
    /// Heuristic freshness for responses without explicit freshness (RFC 9111 4.2.2).
    #[serde(default)]
    pub cache_heuristic: bool,
    /// Store responses that set cookies (the stored copy drops `Set-Cookie`).
    #[serde(default)]
    pub cache_set_cookie: bool,
    /// Largest request body (`"10MiB"`): larger ones get 413.
    pub max_body: Option<RawSize>,
    /// Overrides the upstream's connect timeout for this route.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Overrides the upstream's read timeout for this route.
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// Headers removed from, then set on, the request to the upstream.
    #[serde(default)]
    pub request_headers: RawHeaderRules,
    /// Headers removed from, then set on, the response to the client.
    #[serde(default)]
    pub response_headers: RawHeaderRules,
    /// Local rate limiting (429 with `Retry-After`).
    pub rate_limit: Option<RawRateLimit>,
}

/// `routes[].return`: a fixed answer (nginx's `return`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReturn {
    /// The status, 200 to 599 (read wide so that a bad one gets our message).
    pub status: i64,
    /// Where a redirect (301, 302, 303, 307, 308) sends the client; may hold
    /// `$request_uri` and `$host`.
    pub location: Option<String>,
    /// The body of a non-redirect answer.
    pub body: Option<String>,
    /// Its `Content-Type` (default `text/plain; charset=utf-8`).
    pub content_type: Option<String>,
}

/// `routes[].compress`: `true` / `false`, or a table of settings.
#[derive(Debug)]
pub enum RawCompress {
    /// `compress = true` (defaults) or `false` (off).
    Switch(bool),
    /// `compress = { level = 6, types = [...] }`.
    Settings(RawCompressSettings),
}

/// The table form of `routes[].compress` (nginx's `gzip_comp_level`, `gzip_types`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompressSettings {
    /// gzip level, 1 to 9 (read wide so that a bad one gets our message).
    pub level: Option<i64>,
    /// brotli quality, 1 to 11.
    pub brotli_level: Option<i64>,
    /// Media types compressed: `type/subtype` or `type/*`.
    pub types: Option<Vec<String>>,
    /// Also compress responses marked private (Set-Cookie, `Cache-Control:
    /// private` or `no-store`), accepting the BREACH risk.
    #[serde(default)]
    pub private: bool,
}

impl<'de> Deserialize<'de> for RawCompress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A boolean or a table: written out (not `untagged`) so that a
        // mistake inside the table keeps serde's own message (an unknown
        // key, a wrong type) instead of "did not match any variant".
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawCompress;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`true`, `false` or a table like { level = 6, types = [\"text/*\"] }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawCompress, E> {
                Ok(RawCompress::Switch(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawCompress, A::Error> {
                RawCompressSettings::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawCompress::Settings)
            }
        }
        d.deserialize_any(Either)
    }
}

/// `routes[].rate_limit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// `"10/s"`, `"600/m"`, `"1000/h"`.
    pub rate: String,
    /// Requests at once (default: the rate's count).
    pub burst: Option<u32>,
    /// `client` (default) or `header:NAME`.
    #[serde(default = "default_rate_by")]
    pub by: String,
}

fn default_rate_by() -> String {
    "client".to_string()
}

/// `request_headers` / `response_headers` of a route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRules {
    /// Names to remove.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Name = value to set (replacing).
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
}

/// `[tables]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTables {
    /// `embedded` or `dynamodb`.
    #[serde(default = "default_tables_backend")]
    pub backend: String,
    /// DynamoDB table name.
    #[serde(default = "default_table_name")]
    pub table: String,
    /// DynamoDB endpoint URL (a local DynamoDB-compatible server); default: AWS.
    pub endpoint: Option<String>,
    /// AWS region of the replica this proxy uses; default: `server.region`.
    pub aws_region: Option<String>,
    /// Create the table when missing (development only).
    #[serde(default)]
    pub create_if_missing: bool,
    /// How often each region writes (and reads) heartbeats.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Partitions each region writes its heartbeat into.
    #[serde(default = "default_heartbeat_shards")]
    pub heartbeat_shards: u32,
    /// How often each region reads new invalidation rows from its replica.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Partitions invalidation rows are spread over.
    #[serde(default = "default_heartbeat_shards")]
    pub invalidation_shards: u32,
}

impl Default for RawTables {
    fn default() -> Self {
        RawTables {
            backend: default_tables_backend(),
            table: default_table_name(),
            endpoint: None,
            aws_region: None,
            create_if_missing: false,
            heartbeat_interval: default_heartbeat_interval(),
            heartbeat_shards: default_heartbeat_shards(),
            poll_interval: default_poll_interval(),
            invalidation_shards: default_heartbeat_shards(),
        }
    }
}

fn default_tables_backend() -> String {
    "embedded".to_string()
}
fn default_table_name() -> String {
    "edge-router".to_string()
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_heartbeat_shards() -> u32 {
    4
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}

/// `[cache]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Bytes the store may hold (`"256MiB"`, or a number of bytes).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: RawSize,
    /// Larger responses stream through uncached.
    #[serde(default = "default_max_object_size")]
    pub max_object_size: RawSize,
    /// Without a successful read of the invalidation rows for this long, hits stop.
    #[serde(default = "default_max_unsynced", with = "humantime_serde")]
    pub max_unsynced: Duration,
    /// How long invalidation rows live (their TTL).
    #[serde(default = "default_purge_retention", with = "humantime_serde")]
    pub purge_retention: Duration,
    /// How long concurrent misses for one key wait for the one fetching it.
    #[serde(default = "default_lock_timeout", with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// The direct purge to each peer gives up after this long (the table still carries it).
    #[serde(default = "default_fanout_timeout", with = "humantime_serde")]
    pub fanout_timeout: Duration,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            max_bytes: default_max_bytes(),
            max_object_size: default_max_object_size(),
            max_unsynced: default_max_unsynced(),
            purge_retention: default_purge_retention(),
            lock_timeout: default_lock_timeout(),
            fanout_timeout: default_fanout_timeout(),
        }
    }
}

/// A size: a number of bytes, or a string with a unit (`"8MiB"`, `"512KB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    /// Bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}

fn default_max_bytes() -> RawSize {
    RawSize::Text("256MiB".to_string())
}
fn default_max_object_size() -> RawSize {
    RawSize::Text("8MiB".to_string())
}
fn default_max_unsynced() -> Duration {
    Duration::from_secs(5)
}
fn default_purge_retention() -> Duration {
    Duration::from_secs(3600)
}
fn default_lock_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_fanout_timeout() -> Duration {
    Duration::from_millis(500)
}

/// `[consistency]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsistency {
    /// How long a consistency token is honoured.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Clock-skew margin between regions: a token (W, t) is satisfied when watermark(W) >= t + margin.
    #[serde(default = "default_clock_margin", with = "humantime_serde")]
    pub clock_margin: Duration,
}

impl Default for RawConsistency {
    fn default() -> Self {
        RawConsistency {
            token_ttl: default_token_ttl(),
            clock_margin: default_clock_margin(),
        }
    }
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_clock_margin() -> Duration {
    Duration::from_millis(100)
}

fn default_path_prefix() -> String {
    "/".to_string()
}

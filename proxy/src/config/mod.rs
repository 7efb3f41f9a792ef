//! Configuration in two stages: [`raw`] mirrors the TOML file (serde, unknown
//! keys denied), [`load`] validates it into [`Config`], whose values are ready
//! to use (addresses parsed and resolved, routes pointing at upstreams by
//! index). Nothing here binds a socket, so `edge-router check` can run it alone.

mod cache;
pub mod diag;
pub mod dns;
pub mod raw;
pub mod route_compress;
pub mod route_limits;
pub mod route_return;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use edge_policies::{OnPrimaryDown, Policy, PolicyName, RegionSet, Writes};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::path::{normalize_path, EscapedSlashes, PathRules};
pub use cache::{parse_size, CacheConfig, RouteCache};
pub use diag::{ConfigError, ConfigErrors};
use diag::{Locator, Seg};
use raw::{
    RawAdmin, RawCache, RawConsistency, RawLog, RawRegion, RawRoute, RawServer, RawTables,
    RawUpstream,
};

/// A validated configuration for one proxy.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// Every region, the local one included, in configured order.
    pub regions: Vec<RegionConfig>,
    /// `[upstreams.*]`, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteConfig>,
    /// `[log]`
    pub log: LogConfig,
    /// `[tables]`
    pub tables: TablesConfig,
    /// `[consistency]`
    pub consistency: ConsistencyConfig,
    /// `[cache]`
    pub cache: CacheConfig,
    /// Valid settings that probably do not do what was meant (printed by `check`, logged by `run`).
    pub warnings: Vec<String>,
    /// Every name in backends and peers, with the addresses it resolved to.
    pub names: dns::Answers,
}

/// Which replicated table backs this proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableBackend {
    /// In-process (one region, or the demo's simulated global table).
    Embedded,
    /// This region's replica of a DynamoDB global table.
    DynamoDb {
        /// Table name.
        table: String,
        /// Endpoint URL override (a local DynamoDB-compatible server).
        endpoint: Option<String>,
        /// AWS region of the replica (defaults to `server.region`).
        aws_region: String,
        /// Create the table when missing (development only).
        create_if_missing: bool,
    },
}

/// `[tables]`, validated.
#[derive(Debug, Clone)]
pub struct TablesConfig {
    /// The backend.
    pub backend: TableBackend,
    /// Heartbeat write/read interval.
    pub heartbeat_interval: Duration,
    /// Heartbeat partitions per region.
    pub heartbeat_shards: u32,
    /// Invalidation rows are read this often.
    pub poll_interval: Duration,
    /// Invalidation partitions.
    pub invalidation_shards: u32,
}

/// `[consistency]`, validated.
#[derive(Debug, Clone, Copy)]
pub struct ConsistencyConfig {
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Clock-skew margin.
    pub clock_margin: Duration,
}

/// `[log]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Block requests when the log queue is full, instead of dropping lines.
    pub block_when_full: bool,
    /// Lines queued for the writer thread.
    pub queue_lines: usize,
    /// The access log shows query strings.
    pub access_query: bool,
    /// The access log's own file (else stderr, with the rest).
    pub access_path: Option<std::path::PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            block_when_full: false,
            queue_lines: 16 * 1024,
            access_query: false,
            access_path: None,
        }
    }
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The region this proxy serves.
    pub region: String,
    /// Traffic listeners.
    pub listen: Vec<SocketAddr>,
    /// Worker threads.
    pub threads: usize,
    /// Health path on the traffic listener.
    pub health_path: String,
    /// Serving time after SIGTERM.
    pub drain_period: Duration,
    /// Add `x-edge-decision` to responses.
    pub debug_headers: bool,
    /// Env var with the hop HMAC key.
    pub hop_secret_env: String,
    /// Sign hops in the `v1` format (a rolling upgrade from the release before per-purpose keys).
    pub hop_format_v1: bool,
    /// Networks whose forwarding headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// Peer RTTs closer than this are ties.
    pub rtt_tolerance: Duration,
    /// How request paths are normalised before matching.
    pub path_rules: PathRules,
    /// After `drain_period`, the longest in-flight requests may still run.
    pub shutdown_timeout: Duration,
    /// Idle client keep-alive connections are closed after this.
    pub keepalive_timeout: Duration,
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A stalled write to a client ends the response after this.
    pub send_timeout: Duration,
    /// Open client connections at most (0: no limit).
    pub max_connections: usize,
    /// TLS listeners.
    pub tls: Vec<TlsListener>,
    /// Mutual TLS between regions (`server.peer_ca`, `peer_cert`, `peer_key`).
    pub peer_tls: Option<PeerTls>,
    /// Plain-HTTP requests are redirected to the first TLS listener.
    pub redirect_https: bool,
    /// HTTP/2 with prior knowledge (h2c) is accepted on the plain listeners.
    pub h2c: bool,
    /// Where a successor takes the listening sockets (None: no graceful upgrade).
    pub upgrade_sock: Option<std::path::PathBuf>,
    /// Names in backends and peers are resolved again this often (zero: never).
    pub dns_refresh: Duration,
}

/// The material for mutual TLS between regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// CA bundle every region's certificate chains to.
    pub ca: std::path::PathBuf,
    /// This region's certificate (presented to peers, as client and server).
    pub cert: std::path::PathBuf,
    /// Its key.
    pub key: std::path::PathBuf,
}

/// One `[[server.tls]]` listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Directory of certificate pairs (SNI).
    pub certs: std::path::PathBuf,
    /// ALPN offers `h2`.
    pub h2: bool,
}

/// `[admin]`, validated.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Admin listener.
    pub listen: SocketAddr,
    /// Env var with the bearer token for mutations.
    pub token_env: String,
}

/// A peer edge-router's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// Resolved socket address.
    pub addr: SocketAddr,
    /// `host:port` as written, for logs.
    pub authority: String,
    /// `https://`: reached over TLS, with this region's client certificate.
    pub tls: bool,
    /// The host as written (the TLS server name).
    pub host: String,
}

/// One region.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Region name.
    pub name: String,
    /// Its edge-router (None only for the local region).
    pub peer: Option<PeerAddr>,
    /// Tie-break and pre-measurement preference.
    pub order: u32,
    /// RTT assumed until measured.
    pub rtt_hint: Option<Duration>,
}

/// Active health check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Probe path.
    pub path: String,
    /// Probe interval.
    pub interval: Duration,
    /// Random spread added to each interval.
    pub jitter: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Passes to become healthy.
    pub healthy: u32,
    /// Failures to become unhealthy.
    pub unhealthy: u32,
}

/// Passive outlier ejection settings.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// Consecutive gateway failures (connect, reset, timeout, 502/503/504) that eject.
    pub consecutive_gateway_failures: u32,
    /// Consecutive 5xx of any kind that eject; 0 is off.
    pub consecutive_5xx: u32,
    /// Base ejection time.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most of a region's backends ejected at once, percent.
    pub max_ejection_percent: u8,
}

/// Envoy's retry budget for one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudgetConfig {
    /// Retries in flight ≤ this percent of requests in flight.
    pub budget_percent: u8,
    /// ... but this many are always allowed.
    pub min_retry_concurrency: u32,
}

/// One upstream service.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name.
    pub name: String,
    /// Region owning writes (checked; used by later policies).
    pub primary_region: Option<String>,
    /// Active checks.
    pub health: HealthConfig,
    /// Passive ejection.
    pub outlier: OutlierConfig,
    /// Panic threshold in percent.
    pub panic_threshold: u8,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Retry budget.
    pub retry_budget: RetryBudgetConfig,
    /// Backends per region name.
    pub backends: BTreeMap<String, Vec<SocketAddr>>,
    /// How backends are spoken to.
    pub transport: UpstreamTransport,
}

/// The protocol to an upstream's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (over TLS when `tls`).
    Http1,
    /// HTTP/2 over TLS, negotiated by ALPN.
    H2,
    /// HTTP/2 in cleartext, prior knowledge (gRPC servers without TLS).
    H2c,
}

/// TLS and protocol towards an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTransport {
    /// TLS to the backends.
    pub tls: bool,
    /// Server name sent and verified; `None`: the backend's address.
    pub sni: Option<String>,
    /// CA bundle to verify against; `None`: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// The protocol.
    pub protocol: UpstreamProtocol,
    /// Client certificate and key presented to the backends.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// How a route matches the Host header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
    /// `*`
    Any,
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Label for metrics and logs.
    pub name: String,
    /// Host match.
    pub host: HostMatch,
    /// Path prefix.
    pub path_prefix: String,
    /// Index into `Config::upstreams`; `None` for a route that answers
    /// itself (`static_response`).
    pub upstream: Option<usize>,
    /// Consistency policy with its parameters (inert, `local-first`, on a
    /// route that answers itself: nothing is decided for it).
    pub policy: Policy,
    /// Data residency: regions (indexes into `Config::regions`) that may serve the route.
    pub allowed: RegionSet,
    /// The HTTP cache for this route (`None`: not cached).
    pub cache: Option<RouteCache>,
    /// Body limit, timeouts and header rules.
    pub limits: route_limits::RouteLimits,
    /// `return`: the route's fixed answer, instead of an upstream.
    pub static_response: Option<route_return::StaticResponse>,
    /// `compress`: gzip and brotli for clients that accept them (`None`: off).
    pub compress: Option<route_compress::Compression>,
}

/// Read and validate a config file. `region_override` is `EDGE_REGION`.
pub fn load(path: &Path, region_override: Option<&str>) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            key_path: "(file)".to_string(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&file, &text, region_override)
}

/// Validate config text; `file` names it in errors.
pub fn parse(
    file: &str,
    text: &str,
    region_override: Option<&str>,
) -> Result<Config, ConfigErrors> {
    parse_with(file, text, region_override, &dns::SystemDns)
}

/// [`parse`], looking names up with `resolver`.
pub fn parse_with(
    file: &str,
    text: &str,
    region_override: Option<&str>,
    resolver: &dyn dns::Resolve,
) -> Result<Config, ConfigErrors> {
    let dns = dns::Recorder::new(resolver);
    let loc = Locator::new(file, text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => return Err(ConfigErrors(vec![loc.from_toml(&[], &e)])),
    };
    let mut errors = Vec::new();
    let sections = read_sections(&loc, root, &mut errors);
    let config = validate(&loc, sections, region_override, &dns, &mut errors);
    match config {
        Some(mut c) if errors.is_empty() => {
            c.names = dns.answers();
            Ok(c)
        }
        _ => {
            errors.sort_by_key(|e| (e.line, e.column));
            errors.dedup();
            Err(ConfigErrors(errors))
        }
    }
}

/// Just the region of a `[server]` table that failed to read as a whole.
#[derive(serde::Deserialize)]
struct ServerRegion {
    region: String,
}

#[derive(Default)]
struct Sections {
    server: Option<RawServer>,
    server_region: Option<String>,
    admin: RawAdmin,
    regions: Vec<(String, RawRegion)>,
    upstreams: Vec<(String, RawUpstream)>,
    /// Every `[upstreams.NAME]`, including those that did not deserialize
    /// (so routes naming one do not also report it unknown).
    upstream_names: Vec<String>,
    routes: Vec<Option<RawRoute>>,
    log: RawLog,
    tables: RawTables,
    consistency: RawConsistency,
    cache: RawCache,
}

const SECTIONS: &str = "server, admin, log, tables, consistency, cache, regions, upstreams, routes";

/// Deserialize each section (and each region, upstream and route) on its own,
/// so that one mistake does not hide the next.
fn read_sections(
    loc: &Locator<'_>,
    root: Spanned<DeTable<'_>>,
    errors: &mut Vec<ConfigError>,
) -> Sections {
    let mut s = Sections::default();
    let mut saw_server = false;
    for (key, value) in root.into_inner() {
        let name = key.get_ref().to_string();
        let path = [Seg::Key(name.clone())];
        match name.as_str() {
            "server" => {
                saw_server = true;
                // If [server] has a mistake, its region alone still lets the
                // other sections be checked, so one run reports everything.
                s.server_region = typed::<ServerRegion>(loc, &path, value.clone(), &mut Vec::new())
                    .map(|r| r.region);
                s.server = typed(loc, &path, value, errors);
            }
            "admin" => {
                if let Some(a) = typed(loc, &path, value, errors) {
                    s.admin = a;
                }
            }
            "log" => {
                if let Some(l) = typed(loc, &path, value, errors) {
                    s.log = l;
                }
            }
            "tables" => {
                if let Some(t) = typed(loc, &path, value, errors) {
                    s.tables = t;
                }
            }
            "consistency" => {
                if let Some(c) = typed(loc, &path, value, errors) {
                    s.consistency = c;
                }
            }
            "cache" => {
                if let Some(c) = typed(loc, &path, value, errors) {
                    s.cache = c;
                }
            }
            "regions" => s.regions = typed_entries(loc, &path, value, errors),
            "upstreams" => {
                if let DeValue::Table(t) = value.get_ref() {
                    s.upstream_names = t.iter().map(|(k, _)| k.get_ref().to_string()).collect();
                }
                s.upstreams = typed_entries(loc, &path, value, errors);
            }
            "routes" => match value.into_inner() {
                DeValue::Array(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let p = [Seg::Key(name.clone()), Seg::Index(i)];
                        s.routes.push(typed(loc, &p, item, errors));
                    }
                }
                _ => errors.push(loc.at_path(&path, "expected an array of tables ([[routes]])")),
            },
            _ => errors.push(loc.at_offset(
                key.span().start,
                &path,
                format!("unknown section `{name}`, expected one of: {SECTIONS}"),
            )),
        }
    }
    if !saw_server {
        errors.push(loc.at_offset(
            0,
            &[Seg::from("server")],
            "missing [server] section (it needs at least `region`)",
        ));
    }
    s
}

fn typed<T: DeserializeOwned>(
    loc: &Locator<'_>,
    path: &[Seg],
    value: Spanned<DeValue<'_>>,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(loc.from_toml(path, &e));
            None
        }
    }
}

fn typed_entries<T: DeserializeOwned>(
    loc: &Locator<'_>,
    path: &[Seg],
    value: Spanned<DeValue<'_>>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, T)> {
    let DeValue::Table(table) = value.into_inner() else {
        errors.push(loc.at_path(path, "expected a table"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in table {
        let name = key.get_ref().to_string();
        let mut p = path.to_vec();
        p.push(Seg::Key(name.clone()));
        if let Some(v) = typed(loc, &p, value, errors) {
            out.push((name, v));
        }
    }
    out
}

fn validate(
    loc: &Locator<'_>,
    s: Sections,
    region_override: Option<&str>,
    dns: &dns::Recorder<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Config> {
    let raw_server = match s.server {
        Some(raw) => raw,
        None => {
            // Errors were already recorded; keep checking with defaults and the region.
            let region = s.server_region?;
            let placeholder = format!("region = {region:?}");
            RawServer::deserialize(ValueDeserializer::parse(&format!("{{ {placeholder} }}")).ok()?)
                .ok()?
        }
    };
    let server = validate_server(loc, raw_server, region_override, errors);
    let admin = validate_admin(loc, &s.admin, errors);
    let traffic = server
        .listen
        .iter()
        .chain(server.tls.iter().map(|t| &t.listen));
    if let Some(l) = traffic
        .clone()
        .find(|l| listeners_overlap(l, &admin.listen))
    {
        errors.push(loc.at_path(
            &["admin".into(), "listen".into()],
            format!(
                "`{}` is also a traffic listener ({l}): the two would split its connections",
                admin.listen
            ),
        ));
    }
    dns.set_own(own_listeners(&server, &admin));
    let regions = validate_regions(loc, &server.region, s.regions, dns, errors);
    if regions.len() > 64 {
        errors.push(loc.at_offset(
            0,
            &[Seg::from("regions")],
            "at most 64 regions are supported",
        ));
    }
    if server.peer_tls.is_some() {
        // With mutual TLS, hops, purges and the health detail are for
        // connections with a peer certificate: a peer on plain HTTP, or a
        // region without a TLS listener, could never be one.
        if server.tls.is_empty() {
            errors.push(loc.at_path(
                &[Seg::from("server"), Seg::from("peer_ca")],
                "mutual TLS between regions needs a [[server.tls]] listener for peers to reach",
            ));
        }
        if let Some(r) = regions
            .iter()
            .find(|r| r.name != server.region && r.peer.as_ref().is_some_and(|p| !p.tls))
        {
            errors.push(loc.at_path(
                &[
                    Seg::from("regions"),
                    Seg::Key(r.name.clone()),
                    Seg::from("peer"),
                ],
                "with server.peer_ca set, every peer is reached over https:// (mutual TLS)",
            ));
        }
    }
    if server.peer_tls.is_none() {
        if let Some(r) = regions
            .iter()
            .find(|r| r.peer.as_ref().is_some_and(|p| p.tls))
        {
            errors.push(loc.at_path(
                &[Seg::from("regions"), Seg::Key(r.name.clone()), Seg::from("peer")],
                "an https:// peer needs [server] peer_ca, peer_cert and peer_key (mutual TLS between regions)",
            ));
        }
    }
    let region_names: HashSet<&str> = regions.iter().map(|r| r.name.as_str()).collect();
    let upstreams: Vec<UpstreamConfig> = s
        .upstreams
        .into_iter()
        .filter_map(|(name, u)| validate_upstream(loc, &region_names, name, u, dns, errors))
        .collect();
    let mut routes = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in s.routes.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        if let Some(r) = validate_route(
            loc,
            i,
            raw,
            Upstreams {
                valid: &upstreams,
                names: &s.upstream_names,
            },
            &regions,
            &server.region,
            errors,
        ) {
            if !seen.insert((r.host.clone(), r.path_prefix.clone())) {
                errors.push(loc.at_path(
                    &["routes".into(), i.into()],
                    "duplicate route: an earlier route has the same host and path_prefix",
                ));
            }
            routes.push(r);
        }
    }
    if routes.is_empty() && errors.is_empty() {
        errors.push(loc.at_offset(
            0,
            &[Seg::from("routes")],
            "no [[routes]]: the proxy would answer 404 to everything",
        ));
    }
    let block_when_full = match s.log.on_full.as_str() {
        "drop" => false,
        "block" => true,
        other => {
            errors.push(loc.at_path(
                &["log".into(), "on_full".into()],
                format!("`{other}` is not `drop` or `block`"),
            ));
            false
        }
    };
    if let Some(p) = &s.log.access_path {
        let path = std::path::Path::new(p);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if p.is_empty() || path.is_dir() || dir.is_some_and(|d| !d.is_dir()) {
            errors.push(loc.at_path(
                &["log".into(), "access_path".into()],
                format!("`{p}` must be a file in a directory that exists"),
            ));
        }
    }
    if s.log.queue_lines == 0 {
        errors.push(loc.at_path(&["log".into(), "queue_lines".into()], "must be at least 1"));
    }
    let tables = validate_tables(loc, s.tables, &server.region, errors);
    let consistency = validate_consistency(loc, s.consistency, errors);
    let cache = cache::validate_cache(loc, s.cache, &tables, errors);
    let mut warnings = consistency_warnings(&regions, &routes, &tables);
    if let Some(dir) = server
        .upgrade_sock
        .as_deref()
        .and_then(std::path::Path::parent)
        .filter(|d| !d.exists())
    {
        warnings.push(format!(
            "server.upgrade_sock: directory {} does not exist (yet): graceful upgrades fail until it does",
            dir.display()
        ));
    }
    if !admin.listen.ip().is_loopback() {
        warnings.push(format!(
            "admin.listen {} is not a loopback address: /metrics, /status and (with the token) mutations are reachable from the network; put it on 127.0.0.1 or firewall it",
            admin.listen
        ));
    }
    if let Some(net) = server.trusted_proxies.iter().find(|n| n.prefix_len() == 0) {
        warnings.push(format!(
            "server.trusted_proxies has `{net}`, which trusts every address: any client can set X-Forwarded-For and X-Forwarded-Proto; list only the proxies in front"
        ));
    }
    Some(Config {
        server,
        admin,
        regions,
        upstreams,
        routes,
        log: LogConfig {
            block_when_full,
            queue_lines: s.log.queue_lines.max(1),
            access_query: s.log.access_query,
            access_path: s.log.access_path.as_ref().map(std::path::PathBuf::from),
        },
        tables,
        consistency,
        cache,
        warnings,
        names: dns::Answers::new(),
    })
}

/// Every address this proxy listens on (no name may resolve to one).
pub fn own_listeners(server: &ServerConfig, admin: &AdminConfig) -> Vec<SocketAddr> {
    server
        .listen
        .iter()
        .copied()
        .chain(server.tls.iter().map(|t| t.listen))
        .chain(std::iter::once(admin.listen))
        .collect()
}

/// The longest any duration setting may be: time arithmetic on the request
/// path (an ejection's end, a deadline) must never overflow.
const MAX_SETTING: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// Check duration settings at `base`: at most [`MAX_SETTING`], and above
/// zero unless `zero_ok`.
fn check_durations(
    loc: &Locator<'_>,
    base: &[Seg],
    items: &[(&str, std::time::Duration, bool)],
    errors: &mut Vec<ConfigError>,
) {
    for (key, d, zero_ok) in items {
        let mut at = base.to_vec();
        at.extend(key.split('.').map(Seg::from));
        if d.is_zero() && !zero_ok {
            errors.push(loc.at_path(&at, "must be more than 0s"));
        } else if *d > MAX_SETTING {
            errors.push(loc.at_path(&at, "must be at most 365d"));
        }
    }
}

/// Region names go into metric labels, table keys and headers: lower-case
/// letters, digits and `-`, as AWS names its regions.
fn region_name_error(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    (!ok).then(|| {
        format!("region name `{name}`: use lower-case letters, digits and `-` (like `us-east-1`)")
    })
}

/// Whether two listening addresses would take the same connections (one
/// port on the same address, or on an unspecified one).
pub fn listeners_overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Settings that are valid but probably not what the operator wants.
fn consistency_warnings(
    regions: &[RegionConfig],
    routes: &[RouteConfig],
    tables: &TablesConfig,
) -> Vec<String> {
    let mut out = Vec::new();
    let uses_lag = |r: &&RouteConfig| {
        matches!(
            r.policy,
            Policy::ReadYourWrites { .. } | Policy::BoundedStaleness { .. }
        )
    };
    if regions.len() > 1 && tables.backend == TableBackend::Embedded {
        if let Some(r) = routes.iter().find(uses_lag) {
            out.push(format!(
                "route `{}` uses `{}` with [tables] backend = \"embedded\": each region's table is its own, so peers' replication lag stays unknown and {} (use backend = \"dynamodb\" across regions)",
                r.name,
                r.policy.as_str(),
                match r.policy {
                    Policy::BoundedStaleness { .. } => "every read goes to the primary",
                    _ => "every read with a token from another region goes to that region",
                }
            ));
        }
    }
    for r in routes {
        if let Policy::BoundedStaleness { max_staleness, .. } = r.policy {
            // Lag as measured is at least the replication delay plus up to two heartbeat rounds.
            if max_staleness < tables.heartbeat_interval * 2 {
                out.push(format!(
                    "route `{}`: max_staleness {:?} is under two heartbeat intervals ({:?}): reads will almost always go to the primary",
                    r.name, max_staleness, tables.heartbeat_interval
                ));
            }
        }
    }
    out
}

fn validate_tables(
    loc: &Locator<'_>,
    raw: RawTables,
    region: &str,
    errors: &mut Vec<ConfigError>,
) -> TablesConfig {
    let at = |k: &str| vec![Seg::from("tables"), Seg::from(k)];
    let dynamo_only = [
        ("endpoint", raw.endpoint.is_some()),
        ("aws_region", raw.aws_region.is_some()),
        ("create_if_missing", raw.create_if_missing),
    ];
    let backend = match raw.backend.as_str() {
        "embedded" => {
            for (key, set) in dynamo_only {
                if set {
                    errors.push(loc.at_path(
                        &at(key),
                        format!("`{key}` applies to backend = \"dynamodb\" only"),
                    ));
                }
            }
            TableBackend::Embedded
        }
        "dynamodb" => {
            if raw.table.is_empty() {
                errors.push(loc.at_path(&at("table"), "table name must not be empty"));
            }
            if let Some(e) = &raw.endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    errors.push(loc.at_path(
                        &at("endpoint"),
                        format!("`{e}` is not an http:// or https:// URL"),
                    ));
                }
            }
            if !cfg!(feature = "dynamodb") {
                errors.push(loc.at_path(
                    &at("backend"),
                    "this build has no DynamoDB support: build with `--features dynamodb` (the Docker image has it)",
                ));
            }
            TableBackend::DynamoDb {
                table: raw.table,
                endpoint: raw.endpoint,
                aws_region: raw.aws_region.unwrap_or_else(|| region.to_string()),
                create_if_missing: raw.create_if_missing,
            }
        }
        other => {
            errors.push(loc.at_path(
                &at("backend"),
                format!("unknown backend `{other}` (expected `embedded` or `dynamodb`)"),
            ));
            TableBackend::Embedded
        }
    };
    check_durations(
        loc,
        &[Seg::from("tables")],
        &[("heartbeat_interval", raw.heartbeat_interval, false)],
        errors,
    );
    if raw.heartbeat_interval < Duration::from_millis(10) {
        errors.push(loc.at_path(
            &at("heartbeat_interval"),
            "heartbeat_interval must be at least 10ms",
        ));
    }
    if !(1..=64).contains(&raw.heartbeat_shards) {
        errors.push(loc.at_path(&at("heartbeat_shards"), "heartbeat_shards must be 1 to 64"));
    }
    if raw.poll_interval < Duration::from_millis(10) || raw.poll_interval > Duration::from_secs(60)
    {
        errors.push(loc.at_path(&at("poll_interval"), "poll_interval must be 10ms to 60s"));
    }
    if !(1..=64).contains(&raw.invalidation_shards) {
        errors.push(loc.at_path(
            &at("invalidation_shards"),
            "invalidation_shards must be 1 to 64",
        ));
    }
    TablesConfig {
        backend,
        heartbeat_interval: raw.heartbeat_interval.max(Duration::from_millis(10)),
        heartbeat_shards: raw.heartbeat_shards.clamp(1, 64),
        poll_interval: raw
            .poll_interval
            .clamp(Duration::from_millis(10), Duration::from_secs(60)),
        invalidation_shards: raw.invalidation_shards.clamp(1, 64),
    }
}

fn validate_consistency(
    loc: &Locator<'_>,
    raw: RawConsistency,
    errors: &mut Vec<ConfigError>,
) -> ConsistencyConfig {
    check_durations(
        loc,
        &[Seg::from("consistency")],
        &[("token_ttl", raw.token_ttl, false)],
        errors,
    );
    if raw.token_ttl < Duration::from_secs(1) {
        errors.push(loc.at_path(
            &[Seg::from("consistency"), Seg::from("token_ttl")],
            "token_ttl must be at least 1s",
        ));
    }
    if raw.clock_margin >= raw.token_ttl {
        errors.push(loc.at_path(
            &[Seg::from("consistency"), Seg::from("clock_margin")],
            "clock_margin must be shorter than token_ttl, or no token is ever satisfied before it expires",
        ));
    }
    if raw.clock_margin > Duration::from_secs(60) {
        errors.push(loc.at_path(
            &[Seg::from("consistency"), Seg::from("clock_margin")],
            "clock_margin above 60s: clocks that far apart need fixing, not a margin",
        ));
    }
    ConsistencyConfig {
        token_ttl: raw.token_ttl,
        clock_margin: raw.clock_margin,
    }
}

fn validate_server(
    loc: &Locator<'_>,
    raw: RawServer,
    region_override: Option<&str>,
    errors: &mut Vec<ConfigError>,
) -> ServerConfig {
    let p = |k: &str| vec![Seg::from("server"), Seg::from(k)];
    let mut listen = Vec::new();
    for (i, l) in raw.listen.iter().enumerate() {
        match parse_listen(l) {
            Ok(a) if listen.iter().any(|o| listeners_overlap(o, &a)) => errors.push(loc.at_path(
                &[Seg::from("server"), Seg::from("listen"), Seg::from(i)],
                format!("`{l}` is also an earlier listener"),
            )),
            Ok(a) => listen.push(a),
            Err(msg) => errors.push(loc.at_path(
                &[Seg::from("server"), Seg::from("listen"), Seg::from(i)],
                msg,
            )),
        }
    }
    if raw.listen.is_empty() && raw.tls.is_empty() {
        errors.push(loc.at_path(
            &p("listen"),
            "at least one listen address (or a [[server.tls]] listener) is needed",
        ));
    }
    if raw.redirect_https && raw.tls.is_empty() {
        errors.push(loc.at_path(
            &p("redirect_https"),
            "redirect_https needs a [[server.tls]] listener to redirect to",
        ));
    }
    let peer_tls = match (&raw.peer_ca, &raw.peer_cert, &raw.peer_key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => {
            for (k, v) in [("peer_ca", ca), ("peer_cert", cert), ("peer_key", key)] {
                if !std::path::Path::new(v).is_file() {
                    errors.push(loc.at_path(&p(k), format!("`{v}` is not a file")));
                }
            }
            Some(PeerTls {
                ca: ca.into(),
                cert: cert.into(),
                key: key.into(),
            })
        }
        _ => {
            errors.push(loc.at_path(
                &p("peer_ca"),
                "mutual TLS between regions needs all three of peer_ca, peer_cert and peer_key",
            ));
            None
        }
    };
    let mut tls = Vec::new();
    for (i, t) in raw.tls.iter().enumerate() {
        let at = |k: &str| {
            vec![
                Seg::from("server"),
                Seg::from("tls"),
                Seg::from(i),
                Seg::from(k),
            ]
        };
        let addr = parse_listen(&t.listen);
        if let Err(msg) = &addr {
            errors.push(loc.at_path(&at("listen"), msg.clone()));
        }
        if addr
            .as_ref()
            .is_ok_and(|a| listen.iter().any(|l| listeners_overlap(l, a)))
        {
            errors.push(loc.at_path(
                &at("listen"),
                "also a plain listener: one port cannot be both",
            ));
        }
        let certs = std::path::PathBuf::from(&t.certs);
        if !certs.is_dir() {
            errors.push(loc.at_path(
                &at("certs"),
                format!(
                    "`{}` is not a directory (of NAME.crt + NAME.key pairs)",
                    t.certs
                ),
            ));
        }
        if let Ok(listen) = addr {
            tls.push(TlsListener {
                listen,
                certs,
                h2: t.h2,
            });
        }
    }
    if raw.threads == 0 {
        errors.push(loc.at_path(&p("threads"), "threads must be at least 1"));
    }
    if !raw.health_path.starts_with('/') {
        errors.push(loc.at_path(&p("health_path"), "health_path must start with `/`"));
    }
    let mut trusted = Vec::new();
    for (i, t) in raw.trusted_proxies.iter().enumerate() {
        let parsed = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            // Clients are compared as plain IPv4 (`::ffff:a.b.c.d` is
            // `a.b.c.d`), so a mapped network is written as IPv4 too.
            Ok(n) => trusted.push(unmap_v4(n)),
            Err(_) => errors.push(loc.at_path(
                &[
                    Seg::from("server"),
                    Seg::from("trusted_proxies"),
                    Seg::from(i),
                ],
                format!("`{t}` is not a CIDR network or IP address"),
            )),
        }
    }
    let escaped_slashes = match raw.escaped_slashes.as_str() {
        "keep" => EscapedSlashes::Keep,
        "reject" => EscapedSlashes::Reject,
        "unescape" => EscapedSlashes::Unescape,
        other => {
            errors.push(loc.at_path(
                &p("escaped_slashes"),
                format!("`{other}` is not `keep`, `reject` or `unescape`"),
            ));
            EscapedSlashes::Keep
        }
    };
    check_durations(
        loc,
        &[Seg::from("server")],
        &[
            ("shutdown_timeout", raw.shutdown_timeout, false),
            ("keepalive_timeout", raw.keepalive_timeout, false),
            ("header_read_timeout", raw.header_read_timeout, false),
            ("send_timeout", raw.send_timeout, false),
            ("drain_period", raw.drain_period, true),
            ("rtt_tolerance", raw.rtt_tolerance, true),
            ("dns_refresh", raw.dns_refresh, true),
        ],
        errors,
    );
    if !raw.dns_refresh.is_zero() && raw.dns_refresh < Duration::from_secs(1) {
        errors.push(loc.at_path(
            &p("dns_refresh"),
            "at least 1s (or 0s: never): every refresh looks every name up",
        ));
    }
    let upgrade_sock = raw.upgrade_sock.map(std::path::PathBuf::from);
    // A missing directory is only a warning here (`check` runs where
    // systemd has not created it yet); an upgrade checks again.
    if let Some(msg) = upgrade_sock
        .as_deref()
        .and_then(|p| upgrade_sock_path_error(p).or_else(|| upgrade_sock_dir_error(p)))
    {
        errors.push(loc.at_path(&p("upgrade_sock"), msg));
    }
    let region = region_override
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .unwrap_or(raw.region);
    if let Some(msg) = region_name_error(&region) {
        errors.push(loc.at_path(&p("region"), msg));
    }
    ServerConfig {
        region,
        listen,
        threads: raw.threads.max(1),
        health_path: raw.health_path,
        drain_period: raw.drain_period,
        debug_headers: raw.debug_headers,
        hop_secret_env: raw.hop_secret_env,
        hop_format_v1: match raw.hop_format.as_str() {
            "v2" => false,
            "v1" => true,
            other => {
                errors.push(loc.at_path(
                    &p("hop_format"),
                    format!("`{other}` is not `v2` or `v1` (v1 only while peers still run the previous release)"),
                ));
                false
            }
        },
        trusted_proxies: trusted,
        rtt_tolerance: raw.rtt_tolerance,
        path_rules: PathRules {
            merge_slashes: raw.merge_slashes,
            escaped_slashes,
        },
        shutdown_timeout: raw.shutdown_timeout,
        keepalive_timeout: raw.keepalive_timeout,
        header_read_timeout: raw.header_read_timeout,
        send_timeout: raw.send_timeout,
        max_connections: raw.max_connections,
        redirect_https: raw.redirect_https,
        h2c: raw.h2c,
        tls,
        peer_tls,
        upgrade_sock,
        dns_refresh: raw.dns_refresh,
    }
}

/// What makes `path` unfit for the upgrade socket, its directory missing
/// included (checked again before each upgrade). Pingora creates the socket
/// readable and writable by everyone, so only its directory can keep other
/// users out: whoever connects first hands the new process its listening
/// sockets, and whoever can create a socket there is handed ours.
pub fn upgrade_sock_error(p: &std::path::Path) -> Option<String> {
    upgrade_sock_path_error(p).or_else(|| match std::fs::metadata(p.parent()?) {
        Err(e) => Some(format!(
            "directory {} of the upgrade socket: {e} (systemd: RuntimeDirectory=)",
            p.parent()?.display()
        )),
        Ok(_) => upgrade_sock_dir_error(p),
    })
}

fn upgrade_sock_path_error(p: &std::path::Path) -> Option<String> {
    let path = p.display();
    if !p.is_absolute() {
        return Some(format!("`{path}` must be an absolute path"));
    }
    // sun_path holds 108 bytes, the terminating NUL included.
    let len = p.as_os_str().len();
    if len > 107 {
        return Some(format!(
            "`{path}` is {len} bytes; a Unix socket path holds at most 107"
        ));
    }
    None
}

/// The directory, when it exists, must be ours and closed to everyone else.
fn upgrade_sock_dir_error(p: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = p.parent()?;
    let m = std::fs::metadata(dir).ok()?;
    let mode = m.permissions().mode() & 0o7777;
    if !m.is_dir() {
        return Some(format!("{} is not a directory", dir.display()));
    }
    if mode & 0o077 != 0 {
        return Some(format!(
            "directory {} is open to other users (mode {mode:o}): they could hand the new process sockets of their own; use mode 0700 (systemd: RuntimeDirectoryMode=0700)",
            dir.display()
        ));
    }
    match effective_uid() {
        Some(me) if m.uid() != me => Some(format!(
            "directory {} belongs to uid {}, not to this process's user ({me}): its owner could hand the new process sockets of their own",
            dir.display(),
            m.uid()
        )),
        Some(_) => None,
        None => Some("cannot read this process's user id (/proc/self/status) to check the upgrade socket's directory".into()),
    }
}

/// The effective user id, from `/proc/self/status` (readable by the process
/// itself even when it is not dumpable; no unsafe libc call).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, filesystem.
    line.split_whitespace().nth(2)?.parse().ok()
}

fn validate_admin(loc: &Locator<'_>, raw: &RawAdmin, errors: &mut Vec<ConfigError>) -> AdminConfig {
    let listen = parse_listen(&raw.listen).unwrap_or_else(|msg| {
        errors.push(loc.at_path(&["admin".into(), "listen".into()], msg));
        SocketAddr::from(([127, 0, 0, 1], 9901))
    });
    AdminConfig {
        listen,
        token_env: raw.token_env.clone(),
    }
}

fn validate_regions(
    loc: &Locator<'_>,
    local: &str,
    raw: Vec<(String, RawRegion)>,
    dns: &dns::Recorder<'_>,
    errors: &mut Vec<ConfigError>,
) -> Vec<RegionConfig> {
    if raw.is_empty() {
        // A single-region proxy needs no [regions] table.
        return vec![RegionConfig {
            name: local.to_string(),
            peer: None,
            order: 0,
            rtt_hint: None,
        }];
    }
    if !raw.iter().any(|(n, _)| n == local) {
        let known: Vec<&str> = raw.iter().map(|(n, _)| n.as_str()).collect();
        errors.push(loc.at_path(
            &["server".into(), "region".into()],
            format!(
                "region `{local}` is not among [regions] ({}); set server.region or EDGE_REGION to one of them",
                known.join(", ")
            ),
        ));
    }
    let mut regions = Vec::new();
    for (i, (name, r)) in raw.into_iter().enumerate() {
        let path = [Seg::from("regions"), Seg::Key(name.clone())];
        if let Some(msg) = region_name_error(&name) {
            errors.push(loc.at_path(&path, msg));
        }
        if let Some(rtt) = r.rtt {
            check_durations(loc, &path, &[("rtt", rtt, true)], errors);
        }
        let peer = match &r.peer {
            Some(url) => match parse_peer(url, dns) {
                Ok(p) => Some(p),
                Err(msg) => {
                    let mut pp = path.to_vec();
                    pp.push(Seg::from("peer"));
                    errors.push(loc.at_path(&pp, msg));
                    None
                }
            },
            None if name != local => {
                errors.push(loc.at_path(
                    &path,
                    format!("region `{name}` has no peer address (add `peer = \"http://host:port\"`, its edge-router)"),
                ));
                None
            }
            None => None,
        };
        regions.push(RegionConfig {
            name,
            peer,
            order: r.order.unwrap_or(i as u32),
            rtt_hint: r.rtt,
        });
    }
    regions.sort_by(|a, b| (a.order, &a.name).cmp(&(b.order, &b.name)));
    regions
}

/// A peer's URL; a name that resolves to several addresses is reached at
/// the first (the accelerator's or load balancer's static addresses are
/// equivalent).
fn parse_peer(url: &str, dns: &dns::Recorder<'_>) -> Result<PeerAddr, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, true)
    } else {
        return Err(format!(
            "`{url}` is not a URL of the form http://host:port or https://host:port"
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("`{url}` must be http://host:port with no path"));
    }
    let addr = dns.resolve(authority)?[0];
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => authority,
    };
    Ok(PeerAddr {
        addr,
        authority: authority.to_string(),
        tls,
        host: host.to_string(),
    })
}

/// What is wrong with the port of `host:port`, if anything.
fn port_error(authority: &str) -> Result<(), String> {
    let port = match authority.rsplit_once(':') {
        // `[::1]` alone: the last colon is inside the brackets.
        Some((_, p)) if !p.ends_with(']') => p,
        _ => return Err(format!("`{authority}` needs a port (host:port)")),
    };
    match port.parse::<u32>() {
        Ok(0) => Err(format!(
            "`{authority}`: port 0 is not a port to connect or listen to"
        )),
        Ok(n) if n > 65_535 => Err(format!("`{authority}`: port {n} is out of range (1-65535)")),
        Ok(_) => Ok(()),
        Err(_) if port.is_empty() => Err(format!("`{authority}` needs a port (host:port)")),
        Err(_) => Err(format!("`{authority}`: port `{port}` is not a number")),
    }
}

/// A listening address `ip:port`, with the reason when it is not one.
fn parse_listen(l: &str) -> Result<SocketAddr, String> {
    port_error(l)?;
    l.parse::<SocketAddr>()
        .map_err(|_| format!("`{l}` is not an ip:port address (listeners take an IP, not a name)"))
}

fn validate_upstream(
    loc: &Locator<'_>,
    regions: &HashSet<&str>,
    name: String,
    raw: RawUpstream,
    dns: &dns::Recorder<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<UpstreamConfig> {
    let base = [Seg::from("upstreams"), Seg::Key(name.clone())];
    let at = |keys: &[Seg]| {
        let mut p = base.to_vec();
        p.extend_from_slice(keys);
        p
    };
    let before = errors.len();
    let known = || {
        let mut v: Vec<&str> = regions.iter().copied().collect();
        v.sort_unstable();
        v.join(", ")
    };
    if let Some(primary) = &raw.primary_region {
        if !regions.contains(primary.as_str()) {
            errors.push(loc.at_path(
                &at(&["primary_region".into()]),
                format!("unknown region `{primary}` (known: {})", known()),
            ));
        }
    }
    let mut backends = BTreeMap::new();
    for (region, addrs) in &raw.backends {
        let rp = at(&["backends".into(), Seg::Key(region.clone())]);
        if !regions.contains(region.as_str()) {
            errors.push(loc.at_path(
                &rp,
                format!("unknown region `{region}` (known: {})", known()),
            ));
            continue;
        }
        let mut resolved = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            // Every address of a name is a backend (Envoy's STRICT_DNS).
            match dns.resolve_backend(a) {
                Ok(sa) => resolved.extend(sa),
                Err(msg) => {
                    let mut p = rp.clone();
                    p.push(Seg::Index(i));
                    errors.push(loc.at_path(&p, msg));
                }
            }
        }
        dns::dedup_keeping_order(&mut resolved);
        backends.insert(region.clone(), resolved);
    }
    if raw.backends.values().all(|v| v.is_empty()) {
        errors.push(loc.at_path(
            &base,
            "upstream has no backends (add `backends.REGION = [\"host:port\"]`)",
        ));
    }
    let h = &raw.health;
    check_durations(
        loc,
        &base,
        &[
            ("connect_timeout", raw.connect_timeout, false),
            ("read_timeout", raw.read_timeout, false),
            ("health.interval", h.interval, false),
            ("health.timeout", h.timeout, false),
            ("health.jitter", h.jitter.unwrap_or_default(), true),
            ("outlier.base_ejection", raw.outlier.base_ejection, false),
            ("outlier.max_ejection", raw.outlier.max_ejection, false),
        ],
        errors,
    );
    // The probe's request line carries it as written.
    let probe_path_ok = h.path.starts_with('/')
        && h.path.parse::<http::uri::PathAndQuery>().is_ok()
        && h.path.bytes().all(|b| b.is_ascii_graphic());
    for (key, ok, msg) in [
        ("healthy", h.healthy >= 1, "must be at least 1"),
        ("unhealthy", h.unhealthy >= 1, "must be at least 1"),
        (
            "path",
            probe_path_ok,
            "must be a path starting with `/`, without spaces or control characters",
        ),
    ] {
        if !ok {
            errors.push(loc.at_path(&at(&["health".into(), key.into()]), msg));
        }
    }
    let o = &raw.outlier;
    if o.max_ejection_percent > 100 {
        errors.push(loc.at_path(
            &at(&["outlier".into(), "max_ejection_percent".into()]),
            "must be 0..=100",
        ));
    }
    if o.consecutive_gateway_failures == 0 {
        errors.push(loc.at_path(
            &at(&["outlier".into(), "consecutive_gateway_failures".into()]),
            "must be at least 1",
        ));
    }
    if raw.retry_budget.budget_percent > 100 {
        errors.push(loc.at_path(
            &at(&["retry_budget".into(), "budget_percent".into()]),
            "must be 0..=100 (percent)",
        ));
    }
    if raw.panic_threshold > 100 {
        errors.push(loc.at_path(
            &at(&["panic_threshold".into()]),
            "must be 0..=100 (percent)",
        ));
    }
    // An upstream with mistakes is still returned so routes naming it do not
    // report a second, misleading "unknown upstream".
    let _ = before;
    let protocol = match raw.protocol.as_str() {
        "http1" => UpstreamProtocol::Http1,
        "h2" => UpstreamProtocol::H2,
        "h2c" => UpstreamProtocol::H2c,
        other => {
            errors.push(loc.at_path(
                &at(&[Seg::from("protocol")]),
                format!("`{other}` is not `http1`, `h2` or `h2c`"),
            ));
            UpstreamProtocol::Http1
        }
    };
    match (protocol, raw.tls) {
        (UpstreamProtocol::H2, false) => errors.push(loc.at_path(
            &at(&[Seg::from("protocol")]),
            "`h2` is negotiated over TLS: set `tls = true`, or use `h2c` for cleartext HTTP/2",
        )),
        (UpstreamProtocol::H2c, true) => errors.push(loc.at_path(
            &at(&[Seg::from("protocol")]),
            "`h2c` is cleartext: with `tls = true` use `h2`",
        )),
        _ => {}
    }
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (Some(c), Some(k)) => {
            for (key, v) in [("client_cert", c), ("client_key", k)] {
                if !std::path::Path::new(v).is_file() {
                    errors
                        .push(loc.at_path(&at(&[Seg::from(key)]), format!("`{v}` is not a file")));
                }
            }
            Some((c.into(), k.into()))
        }
        (None, None) => None,
        _ => {
            errors.push(loc.at_path(
                &at(&[Seg::from("client_cert")]),
                "client_cert and client_key go together",
            ));
            None
        }
    };
    if raw.sni.as_deref() == Some("") {
        // An empty name would leave the certificate's name unchecked.
        errors.push(loc.at_path(&at(&[Seg::from("sni")]), "sni must not be empty"));
    }
    for (key, set) in [
        ("sni", raw.sni.is_some()),
        ("ca", raw.ca.is_some()),
        ("client_cert", raw.client_cert.is_some()),
    ] {
        if set && !raw.tls {
            errors.push(loc.at_path(
                &at(&[Seg::from(key)]),
                format!("`{key}` applies with `tls = true` only"),
            ));
        }
    }
    if let Some(ca) = &raw.ca {
        if !std::path::Path::new(ca).is_file() {
            errors.push(loc.at_path(&at(&[Seg::from("ca")]), format!("`{ca}` is not a file")));
        }
    }
    Some(UpstreamConfig {
        name,
        primary_region: raw.primary_region,
        health: HealthConfig {
            path: h.path.clone(),
            interval: h.interval,
            jitter: h.jitter.unwrap_or(h.interval / 10),
            timeout: h.timeout,
            healthy: h.healthy,
            unhealthy: h.unhealthy,
        },
        outlier: OutlierConfig {
            consecutive_gateway_failures: o.consecutive_gateway_failures,
            consecutive_5xx: o.consecutive_5xx,
            base_ejection: o.base_ejection,
            max_ejection: o.max_ejection.max(o.base_ejection),
            max_ejection_percent: o.max_ejection_percent,
        },
        panic_threshold: raw.panic_threshold,
        connect_timeout: raw.connect_timeout,
        read_timeout: raw.read_timeout,
        retry_budget: RetryBudgetConfig {
            budget_percent: raw.retry_budget.budget_percent,
            min_retry_concurrency: raw.retry_budget.min_retry_concurrency,
        },
        backends,
        transport: UpstreamTransport {
            tls: raw.tls,
            sni: raw.sni,
            ca: raw.ca.map(std::path::PathBuf::from),
            protocol,
            client_cert,
        },
    })
}

/// The upstreams routes may name: those that validated, and every name
/// defined (some with mistakes of their own).
struct Upstreams<'a> {
    valid: &'a [UpstreamConfig],
    names: &'a [String],
}

fn validate_route(
    loc: &Locator<'_>,
    i: usize,
    raw: RawRoute,
    known: Upstreams<'_>,
    regions: &[RegionConfig],
    local_region: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<RouteConfig> {
    let (upstreams, upstream_names) = (known.valid, known.names);
    let at = |k: &str| vec![Seg::from("routes"), Seg::from(i), Seg::from(k)];
    let before = errors.len();
    let host = match parse_host(&raw.host) {
        Ok(h) => Some(h),
        Err(msg) => {
            errors.push(loc.at_path(&at("host"), msg));
            None
        }
    };
    // Requests are matched on normalised paths, so a prefix that is not
    // normal could never match; a trailing `/` is the same segment prefix.
    let path_prefix = match normalize_path(&raw.path_prefix, PathRules::default()) {
        Ok(p) if p == raw.path_prefix.as_str() => {
            let trimmed = raw.path_prefix.trim_end_matches('/');
            Some(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
        }
        Ok(p) => {
            errors.push(loc.at_path(
                &at("path_prefix"),
                format!("path_prefix must be a normalised path (requests are matched after normalisation): write `{p}`"),
            ));
            None
        }
        Err(e) => {
            errors.push(loc.at_path(&at("path_prefix"), format!("path_prefix: {e}")));
            None
        }
    };
    let name = |raw: &RawRoute| {
        raw.name
            .clone()
            .unwrap_or_else(|| format!("{}{}", raw.host, raw.path_prefix))
    };
    if let Some(ret) = &raw.respond {
        // No upstream: only the keys about the answer itself apply.
        let static_response = route_return::route_return(loc, i, &raw, ret, errors);
        let limits = route_limits::route_limits(loc, i, &raw, errors);
        if errors.len() > before {
            return None;
        }
        return Some(RouteConfig {
            name: name(&raw),
            host: host?,
            path_prefix: path_prefix?,
            upstream: None,
            policy: Policy::LocalFirst,
            allowed: RegionSet::ALL,
            cache: None,
            limits,
            static_response,
            compress: None,
        });
    }
    let Some(upstream_name) = raw.upstream.as_deref() else {
        errors.push(loc.at_path(
            &[Seg::from("routes"), Seg::from(i)],
            "a route needs `upstream` (or `return`, to answer every request itself)",
        ));
        return None;
    };
    let upstream = upstreams.iter().position(|u| u.name == upstream_name);
    // An upstream that is defined but has a mistake of its own was reported
    // there; the route is only checked no further.
    let defined_but_broken =
        upstream.is_none() && upstream_names.iter().any(|n| n == upstream_name);
    if upstream.is_none() && !defined_but_broken {
        let mut names: Vec<&str> = upstream_names.iter().map(String::as_str).collect();
        names.sort_unstable();
        errors.push(loc.at_path(
            &at("upstream"),
            format!(
                "unknown upstream `{upstream_name}` (defined: {})",
                names.join(", ")
            ),
        ));
    }
    let primary = upstream.and_then(|u| upstreams[u].primary_region.as_deref());
    let policy = route_policy(loc, i, &raw, primary, errors);
    let allowed = allowed_regions(loc, i, &raw, regions, errors);
    let needs_primary = matches!(
        policy,
        Some(
            Policy::Primary { .. }
                | Policy::BoundedStaleness { .. }
                | Policy::ReadYourWrites {
                    writes: Writes::Primary,
                    ..
                }
        )
    );
    let fails_without_primary = matches!(
        policy,
        Some(
            Policy::Primary {
                on_primary_down: OnPrimaryDown::Fail
            } | Policy::BoundedStaleness {
                on_primary_down: OnPrimaryDown::Fail,
                ..
            } | Policy::ReadYourWrites {
                writes: Writes::Primary,
                on_primary_down: OnPrimaryDown::Fail
            }
        )
    );
    if let (true, Some(p), Some(u)) = (needs_primary, primary, upstream) {
        let index = regions.iter().position(|r| r.name == p);
        if fails_without_primary && index.is_some_and(|x| !allowed.contains(x)) {
            errors.push(loc.at_path(
                &at("allowed_regions"),
                format!("the primary region `{p}` is not in allowed_regions and on_primary_down = \"fail\": every request that needs the primary would be refused"),
            ));
        }
        // A peer region's backends come from its own edge-router's report,
        // so only the local region's can be judged from this file.
        if p == local_region && upstreams[u].backends.get(p).is_none_or(|b| b.is_empty()) {
            errors.push(loc.at_path(
                &at("policy"),
                format!("policy `{}` sends requests to the primary region `{p}` (this region), which has no backends for upstream `{}`", raw.policy.as_deref().unwrap_or(DEFAULT_POLICY), upstreams[u].name),
            ));
        }
    }
    if errors.len() > before || defined_but_broken {
        return None;
    }
    let cache = cache::route_cache(loc, i, &raw, errors);
    let limits = route_limits::route_limits(loc, i, &raw, errors);
    let compress = route_compress::route_compress(loc, i, &raw, errors);
    Some(RouteConfig {
        name: name(&raw),
        host: host?,
        path_prefix: path_prefix?,
        upstream: Some(upstream?),
        policy: policy?,
        allowed,
        cache,
        limits,
        static_response: None,
        compress,
    })
}

/// The policy of a route that names none.
const DEFAULT_POLICY: &str = "local-first";

/// The route's policy with its keys; a key that its policy does not read
/// is an error, so a config cannot look stricter than it is.
fn route_policy(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    primary: Option<&str>,
    errors: &mut Vec<ConfigError>,
) -> Option<Policy> {
    let at = |k: &str| vec![Seg::from("routes"), Seg::from(i), Seg::from(k)];
    let name = match raw
        .policy
        .as_deref()
        .unwrap_or(DEFAULT_POLICY)
        .parse::<PolicyName>()
    {
        Ok(p) => p,
        Err(e) => {
            errors.push(loc.at_path(&at("policy"), e.to_string()));
            return None;
        }
    };
    let before = errors.len();
    let writes = match raw.writes.as_deref().map(str::parse::<Writes>) {
        None => Writes::default(),
        Some(Ok(w)) => w,
        Some(Err(e)) => {
            errors.push(loc.at_path(&at("writes"), e.to_string()));
            Writes::default()
        }
    };
    let primary_down_applies = match name {
        PolicyName::Local | PolicyName::LocalFirst => false,
        PolicyName::Primary | PolicyName::BoundedStaleness => true,
        PolicyName::ReadYourWrites => writes == Writes::Primary,
    };
    let needs_primary = primary_down_applies;
    for (key, set) in [
        (
            "on_primary_down",
            raw.on_primary_down.is_some() && !primary_down_applies,
        ),
        (
            "writes",
            raw.writes.is_some() && name != PolicyName::ReadYourWrites,
        ),
        (
            "max_staleness",
            raw.max_staleness.is_some() && name != PolicyName::BoundedStaleness,
        ),
    ] {
        if set {
            errors.push(loc.at_path(
                &at(key),
                format!(
                    "`{key}` does not apply to policy `{}`{}",
                    name.as_str(),
                    if key == "on_primary_down" && name == PolicyName::ReadYourWrites {
                        " with writes = \"local\""
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    let on_primary_down = match raw
        .on_primary_down
        .as_deref()
        .map(str::parse::<OnPrimaryDown>)
    {
        None => OnPrimaryDown::default(),
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            errors.push(loc.at_path(&at("on_primary_down"), e.to_string()));
            OnPrimaryDown::default()
        }
    };
    if needs_primary && primary.is_none() {
        errors.push(loc.at_path(
            &at("policy"),
            format!(
                "policy `{}`{} needs `primary_region` on upstream `{}`",
                name.as_str(),
                if name == PolicyName::ReadYourWrites {
                    " with writes = \"primary\""
                } else {
                    ""
                },
                raw.upstream.as_deref().unwrap_or_default()
            ),
        ));
    }
    let policy = match name {
        PolicyName::Local => Policy::Local,
        PolicyName::LocalFirst => Policy::LocalFirst,
        PolicyName::Primary => Policy::Primary { on_primary_down },
        PolicyName::ReadYourWrites => Policy::ReadYourWrites {
            writes,
            on_primary_down,
        },
        PolicyName::BoundedStaleness => match raw.max_staleness {
            Some(d) if d > MAX_SETTING => {
                errors.push(loc.at_path(&at("max_staleness"), "must be at most 365d"));
                return None;
            }
            Some(max_staleness) if !max_staleness.is_zero() => Policy::BoundedStaleness {
                max_staleness,
                on_primary_down,
            },
            Some(_) => {
                errors.push(loc.at_path(&at("max_staleness"), "max_staleness must be above 0"));
                return None;
            }
            None => {
                errors.push(loc.at_path(
                    &at("max_staleness"),
                    "policy `bounded-staleness` needs `max_staleness` (e.g. \"2s\")",
                ));
                return None;
            }
        },
    };
    (errors.len() == before).then_some(policy)
}

/// `allowed_regions` as a set of region indexes; default: every region.
fn allowed_regions(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    regions: &[RegionConfig],
    errors: &mut Vec<ConfigError>,
) -> RegionSet {
    let Some(names) = &raw.allowed_regions else {
        return RegionSet::ALL;
    };
    let at = |j: usize| {
        vec![
            Seg::from("routes"),
            Seg::from(i),
            Seg::from("allowed_regions"),
            Seg::from(j),
        ]
    };
    if names.is_empty() {
        errors.push(loc.at_path(
            &[
                Seg::from("routes"),
                Seg::from(i),
                Seg::from("allowed_regions"),
            ],
            "allowed_regions is empty: no region could serve the route",
        ));
    }
    let mut set = RegionSet::empty();
    for (j, name) in names.iter().enumerate() {
        match regions.iter().position(|r| &r.name == name) {
            Some(index) if index < 64 => set = set.with(index),
            Some(_) => errors.push(loc.at_path(&at(j), "at most 64 regions are supported")),
            None => {
                let known: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
                errors.push(loc.at_path(
                    &at(j),
                    format!("unknown region `{name}` (defined: {})", known.join(", ")),
                ));
            }
        }
    }
    set
}

/// `::ffff:a.b.c.d/n` (n ≥ 96) as `a.b.c.d/(n − 96)`; other networks unchanged.
fn unmap_v4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

fn parse_host(h: &str) -> Result<HostMatch, String> {
    let h = h.to_ascii_lowercase();
    if h == "*" {
        return Ok(HostMatch::Any);
    }
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if let Some(suffix) = h.strip_prefix("*.") {
        if valid(suffix) {
            return Ok(HostMatch::Suffix(format!(".{suffix}")));
        }
    } else if valid(&h) {
        return Ok(HostMatch::Exact(h));
    }
    Err(format!(
        "`{h}` is not a host name, `*.suffix` or `*` (ports are not part of a route's host)"
    ))
}

#[cfg(test)]
mod tests;

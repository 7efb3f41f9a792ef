//! Assembles one region's proxy from a validated config: the traffic
//! service, the admin service and the health prober, added to a Pingora
//! server. `run` uses it once; `demo` once per simulated region.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edge_certs::resolver::DirResolver;
use edge_policies::ReasonKind;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::backend_transport::BackendTransport;
use crate::cache::consumer::Consumer;
use crate::cache::invalidation::{Invalidation, InvalidationSettings, Publisher};
use crate::cache::signing::PurgeSigner;
use crate::cache::store::MemoryStore;
use crate::cache::EdgeCache;
use crate::config::Config;
use crate::downstream::{ClientLimits, EdgeApp};
use crate::health::{HealthState, Topology};
use crate::hop::HopSigner;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::retry::RetryBudget;
use crate::routing::RouteTable;
use crate::service::{EdgeProxy, Region};
use crate::snapshot::Snapshots;
use crate::tables::heartbeat::{HeartbeatSettings, Heartbeats, LagState};
use crate::tables::SharedTable;
use crate::telemetry::WarnLimiter;
use crate::tls::CertWatch;
use crate::token::TokenSigner;

/// Read buffer of each client connection's socket (Pingora's default: 64 KiB).
const CLIENT_READ_BUFFER: usize = 0;

/// At most one warning per this interval for each client-triggerable event.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How far a hop's timestamp may be from our clock (NTP-bounded skew plus transit).
const HOP_WINDOW: Duration = Duration::from_secs(60);

/// Secrets that come from the environment, not the file.
#[derive(Clone)]
pub struct Secrets {
    /// Secret shared by every region's proxy; the hop and token keys are derived from it.
    pub hop_key: Vec<u8>,
    /// The secret being rotated out (`EDGE_HOP_SECRET_PREVIOUS`), still accepted.
    pub previous_hop_key: Option<Vec<u8>>,
    /// Bearer token for admin mutations; None disables them.
    pub admin_token: Option<String>,
}

/// The Pingora server settings we rely on. After our own drain, Pingora
/// closes the listeners and waits its grace period for requests in flight:
/// that is `shutdown_timeout` (the lifecycle's watcher exits earlier once
/// none is left).
/// `upgrade_sock` is where a successor takes the listening sockets; without
/// one Pingora's default (a fixed name in /tmp, open to every user) is
/// never used: nothing is sent or received.
pub fn server_conf(shutdown_timeout: Duration, upgrade_sock: Option<&Path>) -> ServerConf {
    ServerConf {
        grace_period_seconds: Some(shutdown_timeout.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: upgrade_sock
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        ..ServerConf::default()
    }
}

/// A Pingora server with our settings. `upgrade`: take the listening
/// sockets from the process serving on `upgrade_sock` instead of binding
/// them. Call [`Server::bootstrap`] once every service is added: with
/// `upgrade` it is where the sockets are taken, so anything that can still
/// fail must have been done by then.
pub fn new_server(
    shutdown_timeout: Duration,
    upgrade_sock: Option<&Path>,
    upgrade: bool,
) -> anyhow::Result<Server> {
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    Ok(Server::new_with_opt_and_conf(
        Some(opt),
        server_conf(shutdown_timeout, upgrade_sock),
    ))
}

/// Create the label sets we know of at start with value 0, so dashboards
/// and alerts see `edge_failovers_total` and friends before the first event.
fn prime_metrics(metrics: &Metrics, config: &Config, topo: &Topology) {
    let local = topo.local_name();
    // A route with `return` is never retried nor failed over.
    for route in config.routes.iter().filter(|r| r.upstream.is_some()) {
        for kind in ["backend", "region"] {
            metrics
                .retries
                .with_label_values(&[route.name.as_str(), kind]);
        }
        metrics
            .retries_refused
            .with_label_values(&[route.name.as_str(), "budget"]);
        for region in topo.regions.iter().filter(|r| r.name != local) {
            for kind in [
                ReasonKind::FailoverNoHealthyLocal,
                ReasonKind::FailoverRetry,
                ReasonKind::PrimaryDown,
            ] {
                metrics.failovers.with_label_values(&[
                    route.name.as_str(),
                    region.name.as_str(),
                    kind.as_str(),
                ]);
            }
        }
    }
    for u in &topo.upstreams {
        for &b in &u.by_region[topo.local] {
            metrics.ejections.with_label_values(&[
                u.config.name.as_str(),
                local,
                u.backends[b].label.as_str(),
            ]);
        }
    }
    for kind in ["max_connections", "header_timeout", "header_too_large"] {
        metrics.client_refusals.with_label_values(&[kind]);
    }
    for result in ["ok", "error"] {
        metrics.config_reloads.with_label_values(&[result]);
    }
    for result in [
        "issued",
        "valid",
        "forged",
        "expired",
        "malformed",
        "unknown_region",
    ] {
        metrics.consistency_tokens.with_label_values(&[result]);
    }
    for op in [
        "heartbeat_write",
        "heartbeat_read",
        "ensure",
        "invalidation_read",
        "invalidation_row",
    ] {
        metrics.table_errors.with_label_values(&[op]);
    }
    if config.routes.iter().any(|r| r.cache.is_some()) {
        for path in ["local", "direct", "table"] {
            metrics.purges_applied.with_label_values(&[path]);
            metrics.purges_repeated.with_label_values(&[path]);
        }
        for cause in ["size", "purge", "expired"] {
            metrics.cache_evictions.with_label_values(&[cause]);
        }
        for result in ["ok", "error"] {
            metrics.purge_fanout.with_label_values(&[result]);
        }
    }
}

/// What a region keeps across reloads (built once, at start).
#[derive(Clone)]
pub struct Fixed {
    /// From the environment.
    pub secrets: Secrets,
    /// The region's registry.
    pub metrics: Arc<Metrics>,
    /// Drain state.
    pub lifecycle: Arc<Lifecycle>,
    /// Replication lag from the heartbeats.
    pub lag: Arc<LagState>,
    /// The HTTP cache, when a route had `cache = true` at start.
    pub cache: Option<Arc<EdgeCache>>,
    /// Pingora's compression module is in the chain: a route had `compress` at start.
    pub compression: bool,
    /// Verifies purges from peers.
    pub purge_signer: Arc<PurgeSigner>,
    /// How peer regions are reached.
    pub peer_transport: BackendTransport,
    /// Each upstream's retry budget by name: retries in flight are counted
    /// across reloads, so a reload during an outage does not reset it.
    pub retry_budgets: Arc<parking_lot::Mutex<std::collections::HashMap<String, Arc<RetryBudget>>>>,
}

impl Fixed {
    /// The retry budget of the upstream called `name`.
    pub fn retry_budget(&self, name: &str) -> Arc<RetryBudget> {
        self.retry_budgets
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Publish what a setup that now serves has in the metrics (label sets
    /// primed at zero), keeping the drain state as it is.
    pub fn prime(&self, config: &Config, region: &Region) {
        prime_metrics(&self.metrics, config, &region.health.topo);
        self.metrics
            .draining
            .set(i64::from(self.lifecycle.is_draining()));
    }
}

/// Where a region's config came from, for reloads.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file (`run -c`); None for the demo's generated configs.
    pub path: Option<std::path::PathBuf>,
    /// `EDGE_REGION`, which overrides the file's `server.region`.
    pub region_override: Option<String>,
    /// The text it was parsed from (hashed for `/status` and metrics).
    pub text: String,
}

/// The part of a region a reload replaces, built from `config`: its
/// health state (all healthy at start; after a reload, sharing what
/// `previous` knows, see [`HealthState::succeed`]), its upstreams'
/// transports, and the proxy's setup. Nothing is published to the metrics
/// here: a reload that fails must leave them as they were.
pub fn build_region(
    config: &Config,
    fixed: &Fixed,
    previous: Option<&HealthState>,
) -> anyhow::Result<Region> {
    let metrics = fixed.metrics.clone();
    let backend_transports = config
        .upstreams
        .iter()
        .map(|u| {
            BackendTransport::load(&u.transport, config.server.peer_tls.is_some())
                .map_err(|e| anyhow::anyhow!("upstream `{}`: {e}", u.name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let topo = Arc::new(Topology::from_config(config));
    let health = Arc::new(match previous {
        None => HealthState::new(topo, metrics.clone()),
        Some(old) => HealthState::succeed(topo, metrics.clone(), old),
    });
    let secrets = &fixed.secrets;
    let region = &config.server.region;
    Ok(Region {
        health: health.clone(),
        routes: RouteTable::new(config.routes.clone()),
        hop: HopSigner::new(
            &secrets.hop_key,
            secrets.previous_hop_key.as_deref(),
            HOP_WINDOW,
        )
        .signing_legacy(config.server.hop_format_v1),
        metrics,
        lifecycle: fixed.lifecycle.clone(),
        health_path: config.server.health_path.clone(),
        debug_headers: config.server.debug_headers,
        trusted_proxies: config.server.trusted_proxies.clone(),
        path_rules: config.server.path_rules,
        retry_budgets: config
            .upstreams
            .iter()
            .map(|u| fixed.retry_budget(&u.name))
            .collect(),
        via_name: crate::forwarding::via_pseudonym(region),
        hop_warnings: WarnLimiter::new(WARN_INTERVAL),
        loop_warnings: WarnLimiter::new(WARN_INTERVAL),
        error_warnings: WarnLimiter::new(WARN_INTERVAL),
        send_timeout: config.server.send_timeout,
        snapshots: Snapshots {
            health,
            lag: fixed.lag.clone(),
            margin_ms: config.consistency.clock_margin.as_millis() as u64,
        },
        tokens: TokenSigner::new(
            &secrets.hop_key,
            secrets.previous_hop_key.as_deref(),
            config.consistency.token_ttl,
            // Only a region of ours can sign one, and its time is compared
            // with that region's own heartbeats: a clock ahead of ours
            // delays the token's region catching up, it does not forge.
            config.consistency.token_ttl,
        ),
        peers_check_tokens: !config.server.hop_format_v1,
        cache: fixed.cache.clone(),
        purge_signer: fixed.purge_signer.clone(),
        backend_transports,
        peer_transport: fixed.peer_transport.clone(),
        peers_need_certificates: config.server.peer_tls.is_some(),
        redirect_https: config
            .server
            .redirect_https
            .then(|| config.server.tls.first().map(|t| t.listen.port()))
            .flatten(),
        log_query: config.log.access_query,
        rate_limiters: config
            .routes
            .iter()
            .map(|r| {
                r.limits
                    .rate_limit
                    .as_ref()
                    .and_then(crate::rate_limit::RouteRateLimiter::new)
                    .map(Arc::new)
            })
            .collect(),
    })
}

/// Add one region's services to `server`; returns its drain state.
/// `table` replaces the configured replicated table (the demo's simulated
/// global table); `None` opens the one `[tables]` names.
pub fn add_region(
    server: &mut Server,
    config: &Config,
    secrets: Secrets,
    table: Option<SharedTable>,
    source: ConfigSource,
) -> anyhow::Result<(Arc<Lifecycle>, Arc<Metrics>)> {
    let region = config.server.region.clone();
    let metrics = Arc::new(Metrics::new(&region).context("registering metrics")?);
    let lifecycle = Arc::new(Lifecycle::new(metrics.clone()));
    let table = match table {
        Some(t) => t,
        None => {
            crate::tables::open(&config.tables, &region).context("opening the replicated table")?
        }
    };
    let lag = Arc::new(LagState::new(
        config.regions.iter().map(|r| r.name.clone()).collect(),
    ));
    let peer_transport = match &config.server.peer_tls {
        Some(p) => BackendTransport::for_peers(p)
            .map_err(|e| anyhow::anyhow!("mutual TLS between regions: {e}"))?,
        None => BackendTransport::plain(),
    };
    let purge_signer = Arc::new(PurgeSigner::new(
        &secrets.hop_key,
        secrets.previous_hop_key.as_deref(),
    ));
    let cache = config.routes.iter().any(|r| r.cache.is_some()).then(|| {
        let store: &'static MemoryStore = Box::leak(Box::new(MemoryStore::new(
            config.cache.max_bytes,
            config.cache.max_object_size,
            metrics.clone(),
        )));
        let peers = config
            .regions
            .iter()
            .filter(|r| r.name != region)
            .filter_map(|r| Some((r.name.clone(), r.peer.clone()?)))
            .collect();
        let settings = InvalidationSettings {
            region: region.clone(),
            shards: config.tables.invalidation_shards,
            poll_interval: config.tables.poll_interval,
            retention: config.cache.purge_retention,
            max_unsynced: config.cache.max_unsynced,
            fanout_timeout: config.cache.fanout_timeout,
            peers,
            signer: purge_signer.clone(),
            settle_margin: config.consistency.clock_margin,
            peer_transport: peer_transport.clone(),
        };
        let invalidation = Arc::new(Invalidation::new(
            store,
            table.clone(),
            lag.clone(),
            settings,
            metrics.clone(),
        ));
        server.add_service(background_service(
            &format!("cache invalidations {region}"),
            Consumer::new(invalidation.clone()),
        ));
        server.add_service(background_service(
            &format!("cache purge rows {region}"),
            Publisher(invalidation.clone()),
        ));
        Arc::new(EdgeCache::new(
            store,
            invalidation,
            config.cache.clone(),
            config.server.path_rules,
        ))
    });

    let fixed = Fixed {
        secrets: secrets.clone(),
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
        lag: lag.clone(),
        cache: cache.clone(),
        compression: config.routes.iter().any(|r| r.compress.is_some()),
        purge_signer,
        peer_transport: peer_transport.clone(),
        retry_budgets: Default::default(),
    };
    let first = build_region(config, &fixed, None)?;
    fixed.prime(config, &first);
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(first));
    let conf = server.configuration.clone();
    let mut http = match &config.server.peer_tls {
        None => {
            let mut http = pingora::proxy::HttpProxy::new(
                EdgeProxy::new(current.clone(), fixed.compression),
                conf,
            );
            http.handle_init_modules();
            http
        }
        Some(p) => {
            // Pingora 0.9 takes connector options only through its service
            // builder, which hands back a Service: take the proxy out of it
            // (leaving a plain one in its place, dropped with the Service).
            let options = BackendTransport::connector_options(
                p,
                pingora::connectors::ConnectorOptions::from_server_conf(&conf),
            )
            .map_err(|e| anyhow::anyhow!("mutual TLS between regions: {e}"))?;
            let mut built = pingora::proxy::ProxyServiceBuilder::new(
                &conf,
                EdgeProxy::new(current.clone(), fixed.compression),
            )
            .client_options(options)
            .build();
            let mut http = pingora::proxy::HttpProxy::new(
                EdgeProxy::new(current.clone(), fixed.compression),
                conf,
            );
            std::mem::swap(
                built
                    .app_logic_mut()
                    .ok_or_else(|| anyhow::anyhow!("Pingora's service builder kept no proxy"))?,
                &mut http,
            );
            http
        }
    };
    let mut server_options = pingora::apps::HttpServerOptions::default();
    // Our `EdgeApp` hands over only connections that opened with the
    // preface; Pingora then skips HTTP/1 and reads it again.
    server_options.h2c = config.server.h2c;
    server_options.h2_idle_timeout = Some(config.server.keepalive_timeout);
    http.server_options = Some(server_options);
    let limits = ClientLimits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout,
        keepalive_timeout: config.server.keepalive_timeout,
        h2c: config.server.h2c,
    };
    let mut tls_resolvers = Vec::new();
    let mut traffic = Service::new(
        format!("edge-router {region}"),
        EdgeApp::new(http, limits, metrics.clone(), lifecycle.clone()),
    );
    for t in &config.server.tls {
        // With mutual TLS between regions, peers are shown this region's
        // peer certificate for its names, whatever the directory holds.
        let extra = config
            .server
            .peer_tls
            .as_ref()
            .map(|p| (p.cert.clone(), p.key.clone()));
        let resolver = Arc::new(
            DirResolver::load_with(&t.certs, extra, edge_certs::tls::provider())
                .with_context(|| format!("TLS listener {}", t.listen))?,
        );
        crate::tls::log_loaded(&resolver, "TLS certificate loaded");
        // The resolver answers by SNI; the files named here are never read.
        let mut settings = TlsSettings::intermediate("", "")?;
        settings.set_cert_resolver(resolver.clone());
        if let Some(ca) = peer_transport.ca.as_ref().filter(|_| peer_transport.tls) {
            // Peers present a certificate from the regions' CA; other
            // clients present none. One that presents a bad one is refused.
            let mut roots = rustls::RootCertStore::empty();
            for c in ca {
                roots.add(c.clone())?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                edge_certs::tls::provider(),
            )
            .allow_unauthenticated()
            .build()?;
            settings.set_client_cert_verifier(verifier);
        }
        if t.h2 {
            settings.enable_h2();
        }
        traffic.add_listener(
            ListenerConfig::tcp(t.listen.to_string())
                .tls(settings)
                .l4_buffer(L4BufferSettings::default().read(CLIENT_READ_BUFFER)),
        );
        tls_resolvers.push(resolver);
    }
    for addr in &config.server.listen {
        // Pingora gives every accepted connection a 64 KiB read buffer for
        // its whole life; idle keep-alive clients then cost ~64 KiB each.
        // Its HTTP/1 parser reads into buffers of its own, so ours can be
        // small (figures in docs/benchmarks.md).
        traffic.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .l4_buffer(L4BufferSettings::default().read(CLIENT_READ_BUFFER)),
        );
    }
    traffic.threads = Some(config.server.threads);
    server.add_service(traffic);

    let reloader = Reloader::new(source, config.clone(), current.clone(), fixed);
    let admin_app = AdminApp::new(
        current.clone(),
        lifecycle.clone(),
        metrics.clone(),
        lag.clone(),
        table.describe(),
        secrets.admin_token,
    )
    .with_cache(cache)
    .with_tls(tls_resolvers.clone())
    .with_reload(reloader.handle(), reloader.info());
    let mut admin = Service::new(format!("admin {region}"), admin_app);
    admin.add_tcp(&config.admin.listen.to_string());
    admin.threads = Some(1);
    server.add_service(admin);

    // Always: it also answers SIGHUP, whose default action would end the process.
    server.add_service(background_service(
        &format!("tls certificates {region}"),
        CertWatch::new(tls_resolvers, metrics.clone()),
    ));
    // The health prober of the current setup, and reloads of it.
    server.add_service(background_service(
        &format!("health and reload {region}"),
        reloader,
    ));
    let heartbeats = Heartbeats::new(
        table,
        region.clone(),
        HeartbeatSettings {
            interval: config.tables.heartbeat_interval,
            shards: config.tables.heartbeat_shards,
        },
        lag,
        metrics.clone(),
    );
    server.add_service(background_service(
        &format!("heartbeats {region}"),
        heartbeats,
    ));
    Ok((lifecycle, metrics))
}

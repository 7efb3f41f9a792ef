//! Prometheus metrics of one region's proxy, in its own registry (the demo
//! runs several regions in one process). Names are prefixed `edge_`.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, region, upstream region, decision and status class.
    pub requests: IntCounterVec,
    /// Whole-request latency at the edge.
    pub request_duration: HistogramVec,
    /// Time from sending upstream to the response header.
    pub upstream_duration: HistogramVec,
    /// 1 when a backend passes active checks and is not ejected.
    pub backend_healthy: IntGaugeVec,
    /// 1 while a backend is ejected by outlier detection.
    pub backend_ejected: IntGaugeVec,
    /// Outlier ejections.
    pub ejections: IntCounterVec,
    /// Requests served outside the local region because of health.
    pub failovers: IntCounterVec,
    /// Retries after a connection failure, by kind (backend | region).
    pub retries: IntCounterVec,
    /// Failed upstream attempts by kind (connect | reset | timeout | status_5xx).
    pub upstream_errors: IntCounterVec,
    /// 1 while a peer region's edge-router answers its health path.
    pub peer_healthy: IntGaugeVec,
    /// Smoothed RTT to a peer region.
    pub peer_rtt: GaugeVec,
    /// 1 while draining.
    pub draining: IntGauge,
    /// Responses cut off because the upstream failed after the response started.
    pub upstream_aborted: IntCounterVec,
    /// Retries the retry budget refused.
    pub retries_refused: IntCounterVec,
    /// `x-edge-hop` headers that failed verification.
    pub hop_invalid: IntCounter,
    /// Requests refused because `Via` shows they already passed this region.
    pub loops: IntCounter,
    /// Access-log lines dropped because the log queue was full (process-wide).
    pub log_dropped: IntCounter,
    /// Requests in flight on the traffic listener.
    pub in_flight: IntGauge,
    /// Client connections or heads refused before the proxy: max_connections, header_timeout, header_too_large.
    pub client_refusals: IntCounterVec,
    /// Open client connections on the traffic listener.
    pub client_connections: IntGauge,
    /// Replication lag from each source region into the local replica (absent while unknown).
    pub replication_lag: GaugeVec,
    /// Failed table operations by op (heartbeat_write, heartbeat_read, ensure).
    pub table_errors: IntCounterVec,
    /// 1 while the local replica answers.
    pub table_reachable: IntGauge,
    /// Consistency tokens by result (issued, valid, forged, expired, malformed, unknown_region).
    pub consistency_tokens: IntCounterVec,
    /// Cache lookups on cache routes by route and result (hit, miss, stale, revalidated, bypass).
    pub cache_lookups: IntCounterVec,
    /// Bytes and objects in the cache store.
    pub cache_size_bytes: IntGauge,
    /// Objects in the cache store.
    pub cache_objects: IntGauge,
    /// Objects removed from the store by cause (size, purge, expired).
    pub cache_evictions: IntCounterVec,
    /// Purges applied here, by the path that brought them (local, direct, table).
    pub purges_applied: IntCounterVec,
    /// Purges that arrived again by another path (or a replay) and were skipped, by path.
    pub purges_repeated: IntCounterVec,
    /// Time from a purge's acceptance to its application here, by path.
    pub purge_propagation: HistogramVec,
    /// Seconds since the invalidation consumer last read every partition.
    pub cache_consumer_lag: prometheus::Gauge,
    /// 1 while the cache may serve hits (invalidations read within max_unsynced).
    pub cache_synced: IntGauge,
    /// Whole-cache clears after an outage longer than the purge rows' retention.
    pub cache_cleared: IntCounter,
    /// Purge rows that could not be written (each is retried until it is).
    pub purge_publish_errors: IntCounter,
    /// Direct purges sent to peers, by result (ok, error).
    pub purge_fanout: IntCounterVec,
    /// Seconds until each TLS certificate expires (negative once expired).
    pub tls_cert_expiry: IntGaugeVec,
    /// Reloads of TLS certificate directories, by result (ok, error).
    pub tls_reloads: IntCounterVec,
    /// Requests refused by a route's rate limit.
    pub rate_limited: IntCounterVec,
    /// 1 while a peer region reports routes that differ from ours.
    pub peer_routes_differ: IntGaugeVec,
    /// Request body bytes read from clients, by route.
    pub request_bytes: IntCounterVec,
    /// Response body bytes sent to clients, by route.
    pub response_bytes: IntCounterVec,
    /// Config reloads by result (ok; error: the previous config keeps serving).
    pub config_reloads: IntCounterVec,
    /// 1 for the config serving, labelled with its hash and load time.
    pub config_info: IntGaugeVec,
    /// Graceful upgrades this process tried, by result.
    pub upgrades: IntCounterVec,
    /// Lookups of backend and peer names every `dns_refresh`, by name and result.
    pub dns_refreshes: IntCounterVec,
}

impl Metrics {
    /// Register every metric, labelled with this proxy's region.
    pub fn new(region: &str) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(None, None)?;
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let counter = |name: &str,
                       help: &str,
                       labels: &[&str]|
         -> Result<IntCounterVec, prometheus::Error> {
            let c =
                IntCounterVec::new(Opts::new(name, help).const_label("region", region), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let plain = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(Opts::new(name, help).const_label("region", region))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g =
                    IntGaugeVec::new(Opts::new(name, help).const_label("region", region), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help)
                    .const_label("region", region)
                    .buckets(buckets.clone()),
                &["route", "upstream_region"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let peer_rtt = GaugeVec::new(
            Opts::new(
                "edge_peer_rtt_seconds",
                "Smoothed RTT to the peer region's edge-router.",
            )
            .const_label("region", region),
            &["peer_region"],
        )?;
        registry.register(Box::new(peer_rtt.clone()))?;
        let draining = IntGauge::with_opts(
            Opts::new(
                "edge_draining",
                "1 while the proxy drains (health path answers 503).",
            )
            .const_label("region", region),
        )?;
        registry.register(Box::new(draining.clone()))?;
        let replication_lag = GaugeVec::new(
            Opts::new(
                "edge_replication_lag_seconds",
                "Replication lag from a source region into this region's replica of the table (heartbeat age; absent while unknown).",
            )
            .const_label("region", region),
            &["from"],
        )?;
        registry.register(Box::new(replication_lag.clone()))?;
        let table_reachable = IntGauge::with_opts(
            Opts::new(
                "edge_table_reachable",
                "1 while this region's replica of the replicated table answers.",
            )
            .const_label("region", region),
        )?;
        registry.register(Box::new(table_reachable.clone()))?;
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(Opts::new(name, help).const_label("region", region))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let purge_propagation = HistogramVec::new(
            HistogramOpts::new(
                "edge_purge_propagation_seconds",
                "Time from a purge's acceptance (its row time) to its application in this region, by path.",
            )
            .const_label("region", region)
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["path"],
        )?;
        registry.register(Box::new(purge_propagation.clone()))?;
        let cache_consumer_lag = prometheus::Gauge::with_opts(
            Opts::new(
                "edge_cache_consumer_lag_seconds",
                "Seconds since the invalidation consumer last read every partition of the table.",
            )
            .const_label("region", region),
        )?;
        registry.register(Box::new(cache_consumer_lag.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes,
        // process_open_fds, process_start_time_seconds, … (Linux).
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build = gauge(
            "edge_build_info",
            "1, labelled with the version of edge-router running.",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(Metrics {
            cache_lookups: counter(
                "edge_cache_lookups_total",
                "Requests on cache routes by route and cache result (hit, miss, stale, revalidated, bypass).",
                &["route", "result"],
            )?,
            cache_size_bytes: int_gauge(
                "edge_cache_size_bytes",
                "Bytes in the cache store (bodies, headers, keys, per-object overhead).",
            )?,
            cache_objects: int_gauge("edge_cache_objects", "Objects in the cache store.")?,
            cache_evictions: counter(
                "edge_cache_evictions_total",
                "Objects removed from the cache store by cause (size, purge, expired).",
                &["cause"],
            )?,
            purges_applied: counter(
                "edge_cache_purges_applied_total",
                "Purges applied in this region, by the path that brought each first (local, direct, table).",
                &["path"],
            )?,
            purges_repeated: counter(
                "edge_cache_purges_repeated_total",
                "Purges already applied that arrived again (the second path, a replay) and were skipped, by path.",
                &["path"],
            )?,
            purge_propagation,
            cache_consumer_lag,
            cache_synced: int_gauge(
                "edge_cache_synced",
                "1 while the cache may serve hits: the invalidation rows were read within cache.max_unsynced.",
            )?,
            cache_cleared: plain(
                "edge_cache_cleared_total",
                "Whole-cache clears after the table was unreadable for longer than cache.purge_retention.",
            )?,
            purge_publish_errors: plain(
                "edge_purge_publish_errors_total",
                "Failed writes of purge rows to the table (each is retried until written).",
            )?,
            tls_cert_expiry: gauge(
                "edge_tls_cert_expiry_seconds",
                "Seconds until a TLS listener's certificate expires (negative once expired), by directory and pair name (`peer`: the region's certificate towards its peers).",
                &["dir", "name"],
            )?,
            tls_reloads: counter(
                "edge_tls_reloads_total",
                "Reloads of TLS certificate directories after their files changed, by result (ok, error: the old certificates keep serving).",
                &["result"],
            )?,
            rate_limited: counter(
                "edge_rate_limited_total",
                "Requests answered 429 by a route's rate limit, by route.",
                &["route"],
            )?,
            peer_routes_differ: gauge(
                "edge_peer_routes_differ",
                "1 while a peer region's routes (its reported routes hash) differ from this region's: a request failed over there may be routed differently.",
                &["peer"],
            )?,
            request_bytes: counter(
                "edge_request_body_bytes_total",
                "Request body bytes read from clients, by route.",
                &["route"],
            )?,
            response_bytes: counter(
                "edge_response_body_bytes_total",
                "Response body bytes sent to clients, by route.",
                &["route"],
            )?,
            config_reloads: counter(
                "edge_config_reloads_total",
                "Config reloads (SIGHUP, POST /reload) by result: ok, or error (the previous config keeps serving; the log says why).",
                &["result"],
            )?,
            dns_refreshes: counter(
                "edge_dns_refreshes_total",
                "Lookups of backend and peer names every server.dns_refresh, by name and result: unchanged, changed (the backends follow the new addresses), error (the last addresses are kept).",
                &["name", "result"],
            )?,
            upgrades: counter(
                "edge_upgrades_total",
                "Graceful upgrades (SIGUSR2) this process started, by result: ok (a new process took the listening sockets), or error (this one keeps serving; the log says why).",
                &["result"],
            )?,
            config_info: gauge(
                "edge_config_info",
                "1 for the config serving: its hash (SHA-256 of the file, 16 hex digits) and when it was loaded (Unix ms).",
                &["hash", "loaded_at"],
            )?,
            purge_fanout: counter(
                "edge_purge_fanout_total",
                "Purges sent directly to peer regions, by result (ok, error).",
                &["result"],
            )?,
            table_errors: counter(
                "edge_table_errors_total",
                "Failed operations on the replicated table, by op.",
                &["op"],
            )?,
            consistency_tokens: counter(
                "edge_consistency_tokens_total",
                "Consistency tokens issued, and presented tokens by check result.",
                &["result"],
            )?,
            replication_lag,
            table_reachable,
            requests: counter(
                "edge_requests_total",
                "Requests by route, upstream region, decision and status class.",
                &["route", "upstream_region", "decision", "status_class"],
            )?,
            request_duration: histogram(
                "edge_request_duration_seconds",
                "Request latency at the edge.",
            )?,
            upstream_duration: histogram(
                "edge_upstream_duration_seconds",
                "Time from sending upstream to the response header.",
            )?,
            backend_healthy: gauge(
                "edge_backend_healthy",
                "1 when a backend passes active checks and is not ejected.",
                &["upstream", "backend_region", "backend"],
            )?,
            backend_ejected: gauge(
                "edge_backend_ejected",
                "1 while a backend is ejected by outlier detection.",
                &["upstream", "backend_region", "backend"],
            )?,
            ejections: counter(
                "edge_backend_ejections_total",
                "Outlier ejections.",
                &["upstream", "backend_region", "backend"],
            )?,
            failovers: counter(
                "edge_failovers_total",
                "Requests served by another region because of health.",
                &["route", "to_region", "decision"],
            )?,
            retries: counter(
                "edge_retries_total",
                "Retries after a failed upstream attempt, by kind (backend, region).",
                &["route", "kind"],
            )?,
            upstream_errors: counter(
                "edge_upstream_errors_total",
                "Failed upstream attempts by kind.",
                &["upstream", "upstream_region", "kind"],
            )?,
            peer_healthy: gauge(
                "edge_peer_healthy",
                "1 while the peer region's edge-router answers its health path.",
                &["peer_region"],
            )?,
            upstream_aborted: counter(
                "edge_upstream_aborted_total",
                "Responses aborted downstream because the upstream failed after the response started.",
                &["route", "upstream_region"],
            )?,
            retries_refused: counter(
                "edge_retries_refused_total",
                "Retries not made, by reason (budget).",
                &["route", "reason"],
            )?,
            hop_invalid: plain(
                "edge_hop_invalid_total",
                "x-edge-hop headers that failed verification (wrong key, expired, altered).",
            )?,
            loops: plain(
                "edge_loops_total",
                "Requests refused with 508 because Via shows they already passed this region.",
            )?,
            log_dropped: plain(
                "edge_log_dropped_total",
                "Log lines dropped because the log queue was full (log.on_full = \"drop\").",
            )?,
            in_flight: {
                let g = IntGauge::with_opts(
                    Opts::new("edge_requests_in_flight", "Requests being served now.")
                        .const_label("region", region),
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            client_refusals: counter(
                "edge_client_refusals_total",
                "Client connections closed before a request: max_connections, header_timeout (408), header_too_large (431).",
                &["kind"],
            )?,
            client_connections: {
                let g = IntGauge::with_opts(
                    Opts::new(
                        "edge_client_connections",
                        "Open client connections on the traffic listeners (nginx's active connections).",
                    )
                    .const_label("region", region),
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            peer_rtt,
            draining,
            registry,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        // The log writer keeps the count; catch the counter up with it.
        let dropped = crate::telemetry::dropped_lines();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// `2xx`, `4xx`, … for a status code (0 when no response was written).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

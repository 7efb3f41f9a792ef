//! Purges between regions: applied here, written to the replicated table
//! (the durable path) and sent straight to every peer (the fast path),
//! with one id so that each region applies a purge once, whichever path
//! brings it first.
//!
//! The consumer polls this region's replica every `tables.poll_interval`.
//! Replication keeps no order across items, so each poll re-reads from the
//! oldest point a late row could still arrive at: the lowest heartbeat
//! watermark of any region (its rows up to there are visible here, as far
//! as partitions replicate alike), less an overlap for clock skew and
//! partition-to-partition differences. Ids already applied are skipped.
//!
//! A purge from another region can arrive (by the fan-out in one RTT)
//! before the data its write changed has replicated here: a fill in the
//! meantime would read the old data and store it again. Until this
//! region's replica has caught up with the purge's region past the purge's
//! time (its heartbeat watermark), responses the purge covers are served
//! but not stored.
//!
//! While the rows cannot be read for `cache.max_unsynced`, the cache serves
//! no hits (a purge may be waiting unseen); after an outage longer than the
//! rows' retention, rows may have expired unseen, so the cache is cleared.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::purge::{sort_key, Purge, PurgeSpec};
use super::signing::PurgeSigner;
use super::store::MemoryStore;
use crate::clock::unix_ms;
use crate::config::PeerAddr;
use crate::metrics::Metrics;
use crate::tables::heartbeat::LagState;
use crate::tables::{SharedTable, TableError, QUERY_PAGE};
use crate::telemetry::WarnLimiter;

/// Re-read this far behind the watermark: clock skew between regions and
/// partitions replicating at different speeds.
const OVERLAP_MS: u64 = 2_000;

/// Path on the traffic listener where peers deliver purges.
pub const PURGE_PATH: &str = "/.edge/purge";

/// Header carrying the purge signature.
pub const PURGE_SIGNATURE: &str = "x-edge-purge";

/// A purge stops holding back fills after this long even if its region's
/// watermark never catches up (that region down, or partitioned from the table).
const SETTLE_LIMIT_MS: u64 = 60_000;

/// Purges remembered while they settle; the oldest are forgotten beyond this.
const MAX_SETTLING: usize = 4096;

/// Rows waiting to be written beyond this are folded into one `all` purge:
/// nothing acknowledged is dropped, at the price of a cold cache.
const MAX_PENDING: usize = 10_000;

/// How a purge reached this region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgePath {
    /// Accepted here (admin API or a write through this region).
    Local,
    /// Sent by the accepting region's fan-out.
    Direct,
    /// Read from the replicated table.
    Table,
}

impl PurgePath {
    fn label(self) -> &'static str {
        match self {
            PurgePath::Local => "local",
            PurgePath::Direct => "direct",
            PurgePath::Table => "table",
        }
    }
}

/// Whether the cache may serve hits, as the request path reads it.
#[derive(Debug)]
pub struct SyncState {
    /// Unix ms when the last poll that read every partition started (0: never).
    last_ok_ms: AtomicU64,
    max_unsynced_ms: u64,
    bypassing: AtomicBool,
    error: Mutex<Option<String>>,
}

impl SyncState {
    fn new(max_unsynced: Duration) -> SyncState {
        SyncState {
            last_ok_ms: AtomicU64::new(0),
            max_unsynced_ms: max_unsynced.as_millis() as u64,
            bypassing: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    /// True when the invalidations were read recently enough to serve hits.
    pub fn synced(&self, now_ms: u64) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        last != 0 && now_ms.saturating_sub(last) <= self.max_unsynced_ms
    }

    /// Unix ms of the last complete poll (`None`: never).
    pub fn last_ok_ms(&self) -> Option<u64> {
        Some(self.last_ok_ms.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }
}

/// Ids applied here, with their row time; forgotten once older than any
/// row a poll can still return.
#[derive(Default)]
struct Applied {
    ids: HashMap<String, u64>,
    total: u64,
}

/// A purge from another region whose data may not have replicated here yet.
struct Settling {
    spec: Arc<PurgeSpec>,
    /// Index of its region in the lag snapshot.
    region: usize,
    /// Settled once that region's watermark reaches this (purge time + margin).
    until_ms: u64,
    /// Settled at this time regardless.
    limit_ms: u64,
}

/// The purge hub of one region.
pub struct Invalidation {
    store: &'static MemoryStore,
    sync: SyncState,
    table: SharedTable,
    lag: Arc<LagState>,
    region: String,
    shards: u32,
    poll_interval: Duration,
    retention: Duration,
    metrics: Arc<Metrics>,
    applied: Mutex<Applied>,
    pending: Mutex<VecDeque<Purge>>,
    fanout: Fanout,
    started_ms: u64,
    warnings: WarnLimiter,
    settling: Mutex<VecDeque<Settling>>,
    settle_margin_ms: u64,
}

/// Settings of the hub.
pub struct InvalidationSettings {
    /// This region.
    pub region: String,
    /// `tables.invalidation_shards`.
    pub shards: u32,
    /// `tables.poll_interval`.
    pub poll_interval: Duration,
    /// `cache.purge_retention`.
    pub retention: Duration,
    /// `cache.max_unsynced`.
    pub max_unsynced: Duration,
    /// `cache.fanout_timeout`.
    pub fanout_timeout: Duration,
    /// Peer regions' edge-routers.
    pub peers: Vec<(String, PeerAddr)>,
    /// Signs direct purges.
    pub signer: Arc<PurgeSigner>,
    /// `consistency.clock_margin`: how far past a purge's time its region's
    /// watermark must be before fills it covers are stored again.
    pub settle_margin: Duration,
}

impl Invalidation {
    /// The hub for `store`, reading and writing `table`.
    pub fn new(
        store: &'static MemoryStore,
        table: SharedTable,
        lag: Arc<LagState>,
        settings: InvalidationSettings,
        metrics: Arc<Metrics>,
    ) -> Invalidation {
        Invalidation {
            store,
            sync: SyncState::new(settings.max_unsynced),
            table,
            lag,
            region: settings.region,
            shards: settings.shards,
            poll_interval: settings.poll_interval,
            retention: settings.retention,
            metrics,
            applied: Mutex::default(),
            pending: Mutex::default(),
            fanout: Fanout::new(settings.peers, settings.signer, settings.fanout_timeout),
            started_ms: unix_ms(),
            warnings: WarnLimiter::new(Duration::from_secs(30)),
            settling: Mutex::default(),
            settle_margin_ms: settings.settle_margin.as_millis() as u64,
        }
    }

    /// Whether hits may be served.
    pub fn sync(&self) -> &SyncState {
        &self.sync
    }

    /// Apply a purge unless its id was applied already; the objects it
    /// removed, or `None` for a repeat.
    pub fn apply(&self, purge: &Purge, path: PurgePath) -> Option<u64> {
        {
            let mut applied = self.applied.lock();
            if applied.ids.contains_key(&purge.id) {
                return None;
            }
            applied.ids.insert(purge.id.clone(), purge.time_ms);
            applied.total += 1;
        }
        self.hold_fills(purge);
        let result = self.store.apply(&purge.spec);
        self.metrics
            .purges_applied
            .with_label_values(&[path.label()])
            .inc();
        if path != PurgePath::Local {
            let delay = unix_ms().saturating_sub(purge.time_ms) as f64 / 1000.0;
            self.metrics
                .purge_propagation
                .with_label_values(&[path.label()])
                .observe(delay);
        }
        tracing::info!(id = %purge.id, from = %purge.region, path = path.label(), objects = result.objects, soft = purge.spec.soft, "purge applied");
        Some(result.objects)
    }

    /// Remember a purge from another region until this replica has its data.
    fn hold_fills(&self, purge: &Purge) {
        if purge.region == self.region {
            return;
        }
        let Some(region) = self.lag.regions().iter().position(|r| *r == purge.region) else {
            return;
        };
        let mut settling = self.settling.lock();
        if settling.len() == MAX_SETTLING {
            settling.pop_front();
        }
        settling.push_back(Settling {
            spec: Arc::new(purge.spec.clone()),
            region,
            until_ms: purge.time_ms.saturating_add(self.settle_margin_ms),
            limit_ms: purge.time_ms.saturating_add(SETTLE_LIMIT_MS),
        });
    }

    /// Does a purge whose data has not replicated here yet cover a response
    /// for `url` with `tags`? Such a response is served but not stored.
    pub fn settling(&self, url: &str, tags: &[Box<str>], now_ms: u64) -> bool {
        let mut settling = self.settling.lock();
        if settling.is_empty() {
            return false;
        }
        let lag = self.lag.snapshot();
        settling.retain(|s| {
            let caught_up = lag
                .watermarks_ms
                .get(s.region)
                .copied()
                .flatten()
                .is_some_and(|w| w >= s.until_ms);
            !caught_up && now_ms < s.limit_ms
        });
        settling.iter().any(|s| s.spec.matches(url, tags))
    }

    /// An admin purge: written to the table first (the answer promises
    /// durability), then applied here and sent to the peers.
    pub async fn publish_durable(&self, spec: PurgeSpec) -> Result<(Purge, u64), TableError> {
        let purge = Purge::new(&self.region, unix_ms(), spec);
        let row = purge.to_row(self.shards, self.retention.as_secs());
        let mut last = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            match self.table.put(row.clone()).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    self.metrics.purge_publish_errors.inc();
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            tracing::warn!(error = %e, "purge not accepted: the table did not take its row");
            return Err(e);
        }
        let objects = self.apply(&purge, PurgePath::Local).unwrap_or(0);
        self.fanout.send(&purge, &self.metrics);
        Ok((purge, objects))
    }

    /// A purge caused by a write through this region: applied here at once,
    /// sent to the peers, and written to the table by the consumer (retried
    /// until written).
    pub fn publish_async(&self, spec: PurgeSpec) {
        let purge = Purge::new(&self.region, unix_ms(), spec);
        self.apply(&purge, PurgePath::Local);
        self.fanout.send(&purge, &self.metrics);
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_PENDING {
            // The table has been down a long time: one purge of everything
            // stands for every purge waiting, so none is lost.
            tracing::error!(
                waiting = pending.len(),
                "purge rows cannot be written; replacing the queue with one purge of everything"
            );
            pending.clear();
            pending.push_back(Purge::new(
                &self.region,
                unix_ms(),
                PurgeSpec {
                    all: true,
                    ..PurgeSpec::default()
                },
            ));
        }
        pending.push_back(purge);
    }

    /// Rows waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.lock().len()
    }

    /// Purges applied since start.
    pub fn applied_total(&self) -> u64 {
        self.applied.lock().total
    }

    /// The `/status` section.
    pub fn status_json(&self, max_bytes: u64) -> serde_json::Value {
        let now = unix_ms();
        let last = self.sync.last_ok_ms();
        let synced = self.sync.synced(now);
        let state = match (last, synced) {
            (None, _) => "never-synced",
            (Some(_), true) => "synced",
            (Some(_), false) => "unsynced",
        };
        serde_json::json!({
            "enabled": true,
            "objects": self.store.objects(),
            "bytes": self.store.bytes(),
            "max_bytes": max_bytes,
            "synced": synced,
            "state": state,
            "last_sync_ms": last,
            "unsynced_for_ms": last.filter(|_| !synced).map(|l| now.saturating_sub(l)),
            "error": self.sync.error.lock().clone(),
            "applied_purges": self.applied_total(),
            "pending_publish": self.pending(),
        })
    }

    /// Write waiting rows, oldest first; stop at the first failure.
    async fn flush_pending(&self) {
        loop {
            let Some(next) = self.pending.lock().front().cloned() else {
                return;
            };
            let row = next.to_row(self.shards, self.retention.as_secs());
            match self.table.put(row).await {
                Ok(()) => {
                    let mut pending = self.pending.lock();
                    if pending.front().is_some_and(|p| p.id == next.id) {
                        pending.pop_front();
                    }
                }
                Err(e) => {
                    self.metrics.purge_publish_errors.inc();
                    if self.warnings.allow() {
                        tracing::warn!(error = %e, waiting = self.pending(), "purge rows not written yet; retrying every poll");
                    }
                    return;
                }
            }
        }
    }

    /// The oldest row time a poll must still read.
    fn lower_bound(&self, now: u64) -> u64 {
        let lag = self.lag.snapshot();
        let local = self.lag.regions().iter().position(|r| *r == self.region);
        let oldest_watermark = lag
            .watermarks_ms
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != local)
            // A region whose watermark is unknown: everything we keep.
            .map(|(_, w)| w.unwrap_or(0))
            .min()
            .unwrap_or(now);
        let floor = now.saturating_sub(self.retention.as_millis() as u64);
        oldest_watermark
            .min(now)
            .saturating_sub(OVERLAP_MS)
            .max(floor)
            // Rows from before this process started cover nothing it stored.
            .max(self.started_ms.saturating_sub(OVERLAP_MS))
    }

    /// Read every partition from the lower bound and apply what is new.
    async fn poll(&self) -> Result<(), TableError> {
        let started = unix_ms();
        let from = self.lower_bound(started);
        let after = sort_key(from, "", "");
        let mut rows = Vec::new();
        for shard in 0..self.shards {
            let pk = format!("inv#{shard}");
            let mut cursor = after.clone();
            loop {
                let page = self.table.query(&pk, Some(&cursor), QUERY_PAGE).await?;
                let full = page.len() == QUERY_PAGE;
                if let Some(last) = page.last() {
                    cursor = last.sk.clone();
                }
                rows.extend(page);
                if !full {
                    break;
                }
            }
        }
        let mut purges: Vec<Purge> = rows.iter().filter_map(Purge::from_row).collect();
        purges.sort_by(|a, b| a.time_ms.cmp(&b.time_ms).then_with(|| a.id.cmp(&b.id)));
        for p in &purges {
            self.apply(p, PurgePath::Table);
        }
        self.applied.lock().ids.retain(|_, t| *t >= from);
        let previous = self.sync.last_ok_ms.swap(started, Ordering::Relaxed);
        if previous != 0 && started.saturating_sub(previous) > self.retention.as_millis() as u64 {
            // Rows written during the outage may have expired unseen.
            self.store.clear();
            self.metrics.cache_cleared.inc();
            tracing::warn!(
                unsynced_s = (started - previous) / 1000,
                "invalidations unread for longer than cache.purge_retention: the cache was cleared"
            );
        }
        Ok(())
    }

    fn publish_gauges(&self, now: u64) {
        self.store.settle();
        self.metrics
            .cache_size_bytes
            .set(i64::try_from(self.store.bytes()).unwrap_or(i64::MAX));
        self.metrics
            .cache_objects
            .set(i64::try_from(self.store.objects()).unwrap_or(i64::MAX));
        let synced = self.sync.synced(now);
        self.metrics.cache_synced.set(i64::from(synced));
        let lag = match self.sync.last_ok_ms() {
            Some(t) => now.saturating_sub(t) as f64 / 1000.0,
            None => now.saturating_sub(self.started_ms) as f64 / 1000.0,
        };
        self.metrics.cache_consumer_lag.set(lag);
        let was_bypassing = self.sync.bypassing.swap(!synced, Ordering::Relaxed);
        match (was_bypassing, synced) {
            (false, false) if self.sync.last_ok_ms().is_some() => tracing::warn!(
                error = self.sync.error.lock().as_deref().unwrap_or("-"),
                "cache bypassed: invalidations unread for longer than cache.max_unsynced"
            ),
            (true, true) => tracing::info!("cache serving hits again: invalidations caught up"),
            _ => {}
        }
    }

    async fn round(&self) {
        self.flush_pending().await;
        let result =
            tokio::time::timeout(self.poll_interval.max(Duration::from_secs(5)), self.poll())
                .await
                .unwrap_or_else(|_| Err(TableError::Unreachable("poll timed out".to_string())));
        match result {
            Ok(()) => *self.sync.error.lock() = None,
            Err(e) => {
                self.metrics
                    .table_errors
                    .with_label_values(&["invalidation_read"])
                    .inc();
                if self.warnings.allow() {
                    tracing::warn!(error = %e, "cannot read invalidations from the table");
                }
                *self.sync.error.lock() = Some(e.to_string());
            }
        }
        self.publish_gauges(unix_ms());
    }
}

/// The consumer: a background service polling the table.
pub struct Consumer(pub Arc<Invalidation>);

#[async_trait]
impl BackgroundService for Consumer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.0.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    // Rows for writes already answered: one last try.
                    self.0.flush_pending().await;
                    return;
                }
                _ = tick.tick() => self.0.round().await,
            }
        }
    }
}

/// Best-effort delivery of a purge to every peer, in the background.
struct Fanout {
    peers: Vec<(String, PeerAddr)>,
    signer: Arc<PurgeSigner>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Fanout {
    fn new(peers: Vec<(String, PeerAddr)>, signer: Arc<PurgeSigner>, timeout: Duration) -> Fanout {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Fanout {
            peers,
            signer,
            timeout,
            client,
        }
    }

    fn send(&self, purge: &Purge, metrics: &Arc<Metrics>) {
        if self.peers.is_empty() {
            return;
        }
        let Ok(body) = serde_json::to_vec(purge) else {
            return;
        };
        let body = Bytes::from(body);
        let signature = self.signer.sign(&body);
        for (name, peer) in &self.peers {
            let req = http::Request::post(format!("http://{}{PURGE_PATH}", peer.addr))
                .header(http::header::HOST, peer.authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(PURGE_SIGNATURE, signature.as_str())
                .body(Full::new(body.clone()));
            let Ok(req) = req else { continue };
            let (client, metrics, timeout, name, id) = (
                self.client.clone(),
                metrics.clone(),
                self.timeout,
                name.clone(),
                purge.id.clone(),
            );
            tokio::spawn(async move {
                let ok = match tokio::time::timeout(timeout, client.request(req)).await {
                    Ok(Ok(resp)) => resp.status().is_success(),
                    _ => false,
                };
                let result = if ok { "ok" } else { "error" };
                metrics.purge_fanout.with_label_values(&[result]).inc();
                if !ok {
                    tracing::debug!(peer = %name, id = %id, "direct purge not delivered; the table carries it");
                }
            });
        }
    }
}

//! Purges between regions: applied here, sent straight to every peer (the
//! fast path, [`super::fanout`]) and written to the replicated table (the
//! durable path, read back by [`super::consumer`]), with one id so that each
//! region applies a purge once, whichever path brings it first.
//!
//! A purge from another region can arrive (by the fan-out in one RTT)
//! before the data its write changed has replicated here: a fill in the
//! meantime would read the old data and store it again. Until this
//! region's replica has caught up with the purge's region past the purge's
//! time (its heartbeat watermark), responses the purge covers are served
//! but not stored.
//!
//! A row that cannot be written waits in a queue that [`Publisher`] retries
//! (in batches, concurrently, never in the way of reading); its sort key
//! is stamped when it is written, so that peers reading behind the
//! writer's heartbeats find it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::task::JoinSet;

use super::fanout::Fanout;
use super::purge::{Purge, PurgeSpec, MAX_TARGETS};
use super::signing::PurgeSigner;
use super::store::MemoryStore;
use crate::clock::unix_ms;
use crate::config::PeerAddr;
use crate::metrics::Metrics;
use crate::tables::heartbeat::LagState;
use crate::tables::{SharedTable, TableError};
use crate::telemetry::WarnLimiter;

/// Path on the traffic listener where peers deliver purges.
pub const PURGE_PATH: &str = "/.edge/purge";

/// Header carrying the purge signature.
pub const PURGE_SIGNATURE: &str = "x-edge-purge";

/// A purge stops holding back fills after this long even if its region's
/// watermark never catches up (that region down, or partitioned from the table).
const SETTLE_LIMIT_MS: u64 = 60_000;

/// Purges remembered while they settle; the oldest are forgotten beyond this.
const MAX_SETTLING: usize = 1024;

/// Purges waiting to be written beyond this are folded into one `all`
/// purge: nothing acknowledged is dropped, at the price of a cold cache.
const MAX_PENDING: usize = 100_000;

/// A write's purge row gets this long before the response goes on without
/// it (the row is then queued and retried).
const WRITE_PUT_TIMEOUT: Duration = Duration::from_secs(1);

/// Queued purges written per publisher round, and rows written at once.
const FLUSH_BATCH: usize = 4096;
const FLUSH_CONCURRENCY: usize = 8;

/// Folded rows stay well under DynamoDB's 400 KB item limit.
const MAX_FOLDED_BYTES: usize = 64 * 1024;

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
    /// A warning that hits stopped was logged (and recovery is worth a line).
    warned: AtomicBool,
    pub(super) error: Mutex<Option<String>>,
}

impl SyncState {
    fn new(max_unsynced: Duration) -> SyncState {
        SyncState {
            last_ok_ms: AtomicU64::new(0),
            max_unsynced_ms: max_unsynced.as_millis() as u64,
            warned: AtomicBool::new(false),
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

    /// Record a complete poll that started at `started`; the previous one.
    pub(super) fn polled(&self, started: u64) -> Option<u64> {
        Some(self.last_ok_ms.swap(started, Ordering::Relaxed)).filter(|t| *t != 0)
    }

    /// Log the transitions an operator needs: hits stopped, hits back.
    pub(super) fn log_transition(&self, now: u64, started_ms: u64) {
        let synced = self.synced(now);
        let since = self.last_ok_ms().unwrap_or(started_ms);
        if !synced && now.saturating_sub(since) > self.max_unsynced_ms {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = self.error.lock().as_deref().unwrap_or("-"),
                    never_synced = self.last_ok_ms().is_none(),
                    "cache bypassed: invalidations unread for longer than cache.max_unsynced"
                );
            }
        } else if synced && self.warned.swap(false, Ordering::Relaxed) {
            tracing::info!("cache serving hits again: invalidations caught up");
        }
    }
}

/// Ids applied here, with their row time; forgotten once no poll or
/// replay can bring them again.
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
    pub(super) store: &'static MemoryStore,
    pub(super) sync: SyncState,
    pub(super) table: SharedTable,
    pub(super) lag: Arc<LagState>,
    pub(super) region: String,
    pub(super) shards: u32,
    pub(super) poll_interval: Duration,
    pub(super) retention: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) started_ms: u64,
    pub(super) warnings: WarnLimiter,
    applied: Mutex<Applied>,
    pending: Mutex<VecDeque<Purge>>,
    fanout: Fanout,
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
    /// How `https://` peers are reached (mutual TLS).
    pub peer_transport: crate::backend_transport::BackendTransport,
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
            started_ms: unix_ms(),
            warnings: WarnLimiter::new(Duration::from_secs(30)),
            applied: Mutex::default(),
            pending: Mutex::default(),
            fanout: Fanout::new(
                settings.peers,
                settings.signer,
                settings.fanout_timeout,
                settings.peer_transport,
            ),
            settling: Mutex::default(),
            settle_margin_ms: settings.settle_margin.as_millis() as u64,
        }
    }

    /// Whether hits may be served.
    pub fn sync(&self) -> &SyncState {
        &self.sync
    }

    /// Apply a purge unless it (and every purge folded into it) was applied
    /// already; the objects it removed, or `None` for a repeat.
    pub fn apply(&self, purge: &Purge, path: PurgePath) -> Option<u64> {
        {
            let mut applied = self.applied.lock();
            let ids = std::iter::once(&purge.id).chain(&purge.also);
            if ids.clone().all(|id| applied.ids.contains_key(id)) {
                self.metrics
                    .purges_repeated
                    .with_label_values(&[path.label()])
                    .inc();
                return None;
            }
            // Remembered by when they were applied here: a row written
            // late (queued) carries a later time than its purge.
            let now = unix_ms();
            for id in ids {
                applied.ids.insert(id.clone(), now);
            }
            applied.total += 1;
        }
        self.hold_fills(purge);
        let result = self.store.apply(&purge.spec);
        self.metrics
            .purges_applied
            .with_label_values(&[path.label()])
            .inc();
        // Rows from before this process started are caught up on, not propagated.
        if path != PurgePath::Local && purge.time_ms >= self.started_ms {
            let delay = unix_ms().saturating_sub(purge.time_ms) as f64 / 1000.0;
            self.metrics
                .purge_propagation
                .with_label_values(&[path.label()])
                .observe(delay);
        }
        tracing::info!(id = %purge.id, from = %purge.region, path = path.label(), objects = result.objects, soft = purge.spec.soft, "purge applied");
        Some(result.objects)
    }

    /// Forget ids applied before `horizon` (no poll reads rows that old,
    /// and a direct purge that old is refused as a replay).
    pub(super) fn forget_before(&self, horizon: u64) {
        self.applied.lock().ids.retain(|_, t| *t >= horizon);
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

    /// Write one purge's row, its sort key stamped now.
    async fn put(&self, purge: &Purge) -> Result<(), TableError> {
        let mut row = purge.clone();
        row.time_ms = unix_ms();
        let result = self
            .table
            .put(row.to_row(self.shards, self.retention.as_secs()))
            .await;
        if result.is_err() {
            self.metrics.purge_publish_errors.inc();
        }
        result
    }

    /// An admin purge: applied here, sent to the peers, and written to the
    /// table; `Err` (answered 503) when the table did not take the row, so
    /// the caller knows other regions may not get it.
    pub async fn publish_durable(&self, spec: PurgeSpec) -> Result<(Purge, u64), TableError> {
        let purge = Purge::new(&self.region, unix_ms(), spec);
        let objects = self.apply(&purge, PurgePath::Local).unwrap_or(0);
        self.fanout.send(&purge, &self.metrics);
        let mut last = Err(TableError::Unreachable("not tried".to_string()));
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            last = self.put(&purge).await;
            if last.is_ok() {
                break;
            }
        }
        match last {
            Ok(()) => Ok((purge, objects)),
            Err(e) => {
                tracing::warn!(id = %purge.id, error = %e, "purge not accepted: the table did not take its row");
                Err(e)
            }
        }
    }

    /// A purge caused by a write through this region: applied here, sent
    /// to the peers, and its row written before the write's response goes
    /// on (so a consistency token issued after it covers the row); a row
    /// the table does not take in time is queued and retried.
    pub async fn publish_write(&self, spec: PurgeSpec) {
        let purge = Purge::new(&self.region, unix_ms(), spec);
        self.apply(&purge, PurgePath::Local);
        self.fanout.send(&purge, &self.metrics);
        let written = tokio::time::timeout(WRITE_PUT_TIMEOUT, self.put(&purge)).await;
        if !matches!(written, Ok(Ok(()))) {
            if self.warnings.allow() {
                tracing::warn!(id = %purge.id, "a write's purge row was not written in time; queued and retried (peers the fan-out missed get it later)");
            }
            self.enqueue(vec![purge]);
        }
    }

    fn enqueue(&self, purges: Vec<Purge>) {
        let mut pending = self.pending.lock();
        for p in purges {
            pending.push_back(p);
        }
        if pending.len() > MAX_PENDING {
            // The table has been refusing rows for a long time: one purge
            // of everything stands for every purge waiting, so none is lost.
            tracing::error!(
                waiting = pending.len(),
                "purge rows cannot be written; replacing the queue with one purge of everything"
            );
            let all = Purge::new(
                &self.region,
                unix_ms(),
                PurgeSpec {
                    all: true,
                    ..PurgeSpec::default()
                },
            );
            // Without `also` (the ids would not fit in a row): every region,
            // this one included, applies it.
            pending.clear();
            pending.push_back(all);
        }
    }

    /// Rows waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.lock().len()
    }

    /// Purges applied since start.
    pub fn applied_total(&self) -> u64 {
        self.applied.lock().total
    }

    /// Write a batch of queued purges: URL-only ones folded into rows of
    /// up to `MAX_TARGETS` keys, the rest one row each, several at once.
    /// What fails goes back to the front of the queue.
    pub(super) async fn flush_pending(self: &Arc<Self>) {
        let batch: Vec<Purge> = {
            let mut pending = self.pending.lock();
            let n = pending.len().min(FLUSH_BATCH);
            pending.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        let rows = fold(batch, &self.region);
        let mut failed = Vec::new();
        let mut tasks = JoinSet::new();
        let mut rows = rows.into_iter();
        loop {
            while tasks.len() < FLUSH_CONCURRENCY {
                let Some(row) = rows.next() else { break };
                let hub = self.clone();
                tasks.spawn(async move {
                    let ok = hub.put(&row).await.is_ok();
                    (row, ok)
                });
            }
            match tasks.join_next().await {
                Some(Ok((_, true))) => {}
                Some(Ok((row, false))) => failed.push(row),
                Some(Err(_)) => {}
                None => break,
            }
        }
        if !failed.is_empty() {
            if self.warnings.allow() {
                tracing::warn!(
                    rows = failed.len(),
                    "purge rows not written yet; retrying every poll interval"
                );
            }
            let mut pending = self.pending.lock();
            for row in failed.into_iter().rev() {
                pending.push_front(row);
            }
        }
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
}

/// Fold URL-only purges into rows of up to `MAX_TARGETS` keys (the first
/// purge's id, the others in `also`); other purges stay as they are.
fn fold(batch: Vec<Purge>, region: &str) -> Vec<Purge> {
    let mut out: Vec<Purge> = Vec::new();
    let mut urls: Option<Purge> = None;
    for p in batch {
        let url_only =
            !p.spec.all && !p.spec.soft && p.spec.prefixes.is_empty() && p.spec.tags.is_empty();
        if !url_only {
            out.push(p);
            continue;
        }
        let bytes = |keys: &[String]| keys.iter().map(|k| k.len() + 3).sum::<usize>();
        let fits = urls.as_ref().is_some_and(|u| {
            u.spec.keys.len() + p.spec.keys.len() <= MAX_TARGETS
                && bytes(&u.spec.keys) + bytes(&p.spec.keys) <= MAX_FOLDED_BYTES
        });
        if !fits {
            out.extend(urls.take());
            let mut first = Purge::new(region, p.time_ms, PurgeSpec::default());
            first.id = p.id.clone();
            first.also = p.also.clone();
            urls = Some(first);
        } else if let Some(u) = urls.as_mut() {
            u.also.push(p.id.clone());
            u.also.extend(p.also.iter().cloned());
        }
        if let Some(u) = urls.as_mut() {
            for k in p.spec.keys {
                if !u.spec.keys.contains(&k) {
                    u.spec.keys.push(k);
                }
            }
        }
    }
    out.extend(urls);
    out
}

/// Writes queued purge rows, apart from the consumer so that neither waits
/// for the other.
pub struct Publisher(pub Arc<Invalidation>);

#[async_trait]
impl BackgroundService for Publisher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let hub = &self.0;
        let mut tick = tokio::time::interval(hub.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => hub.flush_pending().await,
            }
        }
        // Rows for writes already answered: keep trying while the process
        // drains, then say what could not be written.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.pending() > 0 && tokio::time::Instant::now() < deadline {
            hub.flush_pending().await;
            tokio::time::sleep(hub.poll_interval).await;
        }
        if hub.pending() > 0 {
            tracing::error!(
                rows = hub.pending(),
                "shutting down with purge rows unwritten: regions the fan-out missed keep those objects until they expire"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_purges_fold_into_rows_that_name_every_id() {
        let url = |id: &str, k: &str| {
            let mut p = Purge::new("r", 1, PurgeSpec::urls(vec![k.to_string()]));
            p.id = id.to_string();
            p
        };
        let tag = {
            let mut p = Purge::new(
                "r",
                2,
                PurgeSpec {
                    tags: vec!["t".into()],
                    ..PurgeSpec::default()
                },
            );
            p.id = "tag".into();
            p
        };
        let rows = fold(
            vec![
                url("a", "http://h/1"),
                tag,
                url("b", "http://h/2"),
                url("c", "http://h/1"),
            ],
            "r",
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "tag");
        assert_eq!(rows[1].id, "a");
        assert_eq!(rows[1].also, ["b", "c"]);
        assert_eq!(rows[1].spec.keys, ["http://h/1", "http://h/2"]);
    }
}

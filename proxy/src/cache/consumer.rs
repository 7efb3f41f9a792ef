//! The invalidation consumer: every `tables.poll_interval` it reads new
//! purge rows from this region's replica and applies those not applied yet.
//!
//! Replication keeps no order across items, so a poll reads from the
//! oldest point a late row could still arrive at: the lowest heartbeat
//! watermark of the regions (their rows up to there are visible here, as
//! far as partitions replicate alike), less an overlap for clock skew and
//! partition-to-partition differences. That point moves only after a poll
//! has succeeded, and only to what the watermarks read before that poll
//! guarantee: a failed poll or an unknown watermark never moves it.
//!
//! A region whose watermark is stuck (down, or cut off from the table)
//! would hold that point back and make every poll re-read everything since;
//! frequent polls leave such regions out and a deep poll every few seconds
//! reads back for them, at most `DEEP_MAX` (or the retention). A region
//! stuck longer than that may have rows behind the window when it comes
//! back: the cache is then cleared, as after this region's own outage.
//!
//! While the rows cannot be read for `cache.max_unsynced`, the cache serves
//! no hits (a purge may be waiting unseen); after an outage longer than the
//! rows' retention, rows may have expired unseen, so the cache is cleared.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::invalidation::{Invalidation, PurgePath};
use super::purge::{sort_key, Purge};
use crate::clock::unix_ms;
use crate::tables::{TableError, QUERY_PAGE};

/// Re-read this far behind the watermark: clock skew between regions and
/// partitions replicating at different speeds.
const OVERLAP_MS: u64 = 2_000;

/// A region whose watermark is older than this is left to the deep poll.
const STUCK_MS: u64 = 30_000;

/// How often a poll also reads back to stuck regions' watermarks.
const DEEP_EVERY_MS: u64 = 5_000;

/// The deep poll reads back at most this far (or the rows' retention).
const DEEP_MAX_MS: u64 = 15 * 60 * 1000;

/// Applied ids are remembered at least this long: a direct purge older than
/// 60 s is refused (signing.rs), and a row written up to this late (queued
/// while the table refused writes) is still recognised.
const ID_MEMORY_MS: u64 = 10 * 60 * 1000;

/// How far back a deep poll reads: `DEEP_MAX_MS`, or the rows' retention.
fn window(hub: &Invalidation) -> u64 {
    DEEP_MAX_MS.min(hub.retention.as_millis() as u64)
}

/// Where polls read from. Both points only move forward, after a success.
#[derive(Debug, Default, Clone)]
struct Cursor {
    /// Rows before this were read, counting every region.
    deep_from: u64,
    /// Rows before this were read, counting the regions whose heartbeats are live.
    shallow_from: u64,
    last_deep_ms: u64,
    /// Per region (lag-snapshot order): since when its watermark has not been live.
    stuck_since: Vec<Option<u64>>,
}

/// What the watermarks read before a poll allow the cursor to move to.
struct Advance {
    shallow: Option<u64>,
    deep: Option<u64>,
    /// A region stuck longer than the deep window is live again.
    clear: bool,
}

/// The consumer: a background service polling the table.
pub struct Consumer {
    hub: Arc<Invalidation>,
    cursor: Mutex<Cursor>,
}

impl Consumer {
    /// A consumer applying through `hub`.
    pub fn new(hub: Arc<Invalidation>) -> Consumer {
        let regions = hub.lag.regions().len();
        let window = window(&hub);
        // Rows written shortly before this process started can still be
        // arriving: read back as far as a deep poll would.
        let start = hub.started_ms.saturating_sub(window);
        Consumer {
            cursor: Mutex::new(Cursor {
                deep_from: start,
                shallow_from: start,
                last_deep_ms: 0,
                stuck_since: vec![Some(hub.started_ms); regions],
            }),
            hub,
        }
    }

    /// Classify regions by the watermarks read now; what a successful poll
    /// started now lets the cursor advance to.
    fn observe(&self, now: u64) -> Advance {
        let hub = &self.hub;
        let lag = hub.lag.snapshot();
        let local = hub.lag.regions().iter().position(|r| *r == hub.region);
        let window = window(hub);
        let mut c = self.cursor.lock();
        let mut shallow = Some(now);
        let mut deep = Some(now);
        let mut clear = false;
        for (i, w) in lag.watermarks_ms.iter().enumerate() {
            if Some(i) == local {
                continue;
            }
            let live = w.is_some_and(|w| now.saturating_sub(w) <= STUCK_MS);
            let stuck_since = c.stuck_since.get_mut(i);
            let Some(stuck_since) = stuck_since else {
                continue;
            };
            if live {
                if stuck_since.is_some_and(|t| now.saturating_sub(t) > window) {
                    clear = true;
                }
                *stuck_since = None;
            } else {
                let since = *stuck_since.get_or_insert(now);
                // Briefly unknown (a failed heartbeat read): move nothing.
                if now.saturating_sub(since) <= STUCK_MS {
                    shallow = None;
                }
            }
            let w = w.map(|w| w.min(now));
            shallow = match (shallow, live) {
                (Some(s), true) => w.map(|w| s.min(w)),
                (s, _) => s,
            };
            deep = match (deep, w) {
                (Some(d), Some(w)) => Some(d.min(w)),
                _ => None,
            };
        }
        Advance {
            shallow: shallow.map(|s| s.saturating_sub(OVERLAP_MS)),
            deep: deep.map(|d| d.saturating_sub(OVERLAP_MS)),
            clear,
        }
    }

    /// Where this poll reads from, and whether it is a deep one.
    fn from(&self, now: u64) -> (u64, bool) {
        let c = self.cursor.lock();
        let deep =
            c.deep_from < c.shallow_from && now.saturating_sub(c.last_deep_ms) >= DEEP_EVERY_MS;
        (if deep { c.deep_from } else { c.shallow_from }, deep)
    }

    /// After a successful poll started at `started`.
    fn advance(&self, started: u64, deep: bool, a: &Advance) {
        let window = window(&self.hub);
        let mut c = self.cursor.lock();
        if let Some(s) = a.shallow {
            c.shallow_from = c.shallow_from.max(s);
        }
        // A deep poll read everything from deep_from, so it may move; so
        // may a shallow one when no region is stuck (the two points agree).
        if let Some(d) = a.deep.filter(|d| deep || a.shallow == Some(*d)) {
            c.deep_from = c.deep_from.max(d);
        }
        if deep {
            c.last_deep_ms = started;
        }
        c.deep_from = c
            .deep_from
            .max(started.saturating_sub(window))
            .min(c.shallow_from);
    }

    /// Read every partition from the read point and apply what is new,
    /// page by page.
    async fn poll(&self) -> Result<(), TableError> {
        let hub = &self.hub;
        let started = unix_ms();
        let advance = self.observe(started);
        let (from, deep) = self.from(started);
        let after = sort_key(from, "", "");
        for shard in 0..hub.shards {
            let pk = format!("inv#{shard}");
            let mut cursor = after.clone();
            loop {
                let page = hub.table.query(&pk, Some(&cursor), QUERY_PAGE).await?;
                let full = page.len() == QUERY_PAGE;
                for row in &page {
                    match Purge::from_row(row) {
                        Some(p) => {
                            hub.apply(&p, PurgePath::Table);
                        }
                        None => {
                            hub.metrics
                                .table_errors
                                .with_label_values(&["invalidation_row"])
                                .inc();
                            if hub.warnings.allow() {
                                tracing::warn!(pk = %row.pk, sk = %row.sk, "an invalidation row this version cannot read was skipped (a newer release during an upgrade?)");
                            }
                        }
                    }
                }
                match page.last() {
                    Some(last) if full => cursor = last.sk.clone(),
                    _ => break,
                }
            }
        }
        self.advance(started, deep, &advance);
        if advance.clear {
            hub.store.clear();
            hub.metrics.cache_cleared.inc();
            tracing::warn!("a region cut off from the table for longer than the deep poll reaches is back: its purges may be older than the read window, so the cache was cleared");
        }
        let horizon = self
            .cursor
            .lock()
            .deep_from
            .min(started.saturating_sub(ID_MEMORY_MS));
        hub.forget_before(horizon);
        let previous = hub.sync.polled(started);
        if let Some(previous) = previous {
            if started.saturating_sub(previous) > hub.retention.as_millis() as u64 {
                // Rows written during the outage may have expired unseen.
                hub.store.clear();
                hub.metrics.cache_cleared.inc();
                tracing::warn!(
                    unsynced_s = (started - previous) / 1000,
                    "invalidations unread for longer than cache.purge_retention: the cache was cleared"
                );
            }
        }
        Ok(())
    }

    fn publish_gauges(&self, now: u64) {
        let hub = &self.hub;
        hub.store.settle();
        let m = &hub.metrics;
        m.cache_size_bytes
            .set(i64::try_from(hub.store.bytes()).unwrap_or(i64::MAX));
        m.cache_objects
            .set(i64::try_from(hub.store.objects()).unwrap_or(i64::MAX));
        m.cache_synced.set(i64::from(hub.sync.synced(now)));
        let since = hub.sync.last_ok_ms().unwrap_or(hub.started_ms);
        m.cache_consumer_lag
            .set(now.saturating_sub(since) as f64 / 1000.0);
        hub.sync.log_transition(now, hub.started_ms);
    }

    async fn round(&self) {
        let hub = &self.hub;
        let limit = hub.poll_interval.max(Duration::from_secs(5));
        let result = tokio::time::timeout(limit, self.poll())
            .await
            .unwrap_or_else(|_| Err(TableError::Unreachable("poll timed out".to_string())));
        match result {
            Ok(()) => *hub.sync.error.lock() = None,
            Err(e) => {
                hub.metrics
                    .table_errors
                    .with_label_values(&["invalidation_read"])
                    .inc();
                if hub.warnings.allow() {
                    tracing::warn!(error = %e, "cannot read invalidations from the table");
                }
                *hub.sync.error.lock() = Some(e.to_string());
            }
        }
        self.publish_gauges(unix_ms());
    }
}

#[async_trait]
impl BackgroundService for Consumer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.hub.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.round().await,
            }
        }
    }
}

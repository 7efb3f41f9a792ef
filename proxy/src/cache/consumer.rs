//! The invalidation consumer: every `tables.poll_interval` it reads new
//! purge rows from this region's replica and applies those not applied yet.
//!
//! Replication keeps no order across items, so a poll re-reads from the
//! oldest point a late row could still arrive at: the lowest heartbeat
//! watermark of the regions (their rows up to there are visible here, as
//! far as partitions replicate alike), less an overlap for clock skew and
//! partition-to-partition differences. A region whose watermark is stuck
//! (down, or partitioned from the table) would hold that point back and
//! make every poll re-read everything since; such regions are left to a
//! deep poll every few seconds instead. Both points only move forward, so
//! a row once behind them is never read (and applied) again.
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

/// A direct purge older than this is refused (signing.rs), so applied ids
/// are kept at least this long.
const REPLAY_WINDOW_MS: u64 = 60_000;

/// Where polls read from; both only move forward.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    shallow_from: u64,
    deep_from: u64,
    last_deep_ms: u64,
}

/// The consumer: a background service polling the table.
pub struct Consumer {
    hub: Arc<Invalidation>,
    cursor: Mutex<Cursor>,
}

impl Consumer {
    /// A consumer applying through `hub`.
    pub fn new(hub: Arc<Invalidation>) -> Consumer {
        Consumer {
            hub,
            cursor: Mutex::default(),
        }
    }

    /// The points this poll reads from: (from, deep).
    fn bounds(&self, now: u64) -> (u64, bool) {
        let hub = &self.hub;
        let lag = hub.lag.snapshot();
        let local = hub.lag.regions().iter().position(|r| *r == hub.region);
        let others = || {
            lag.watermarks_ms
                .iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != local)
                .map(|(_, w)| *w)
        };
        // Rows older than this cover nothing this process stored, or have expired.
        let floor = now
            .saturating_sub(hub.retention.as_millis() as u64)
            .max(hub.started_ms.saturating_sub(OVERLAP_MS));
        let live = others()
            .filter_map(|w| w.filter(|w| now.saturating_sub(*w) <= STUCK_MS))
            .min()
            .unwrap_or(now)
            .min(now);
        // Unknown counts as the oldest we keep.
        let all = others()
            .map(|w| w.unwrap_or(0))
            .min()
            .unwrap_or(now)
            .min(now);
        let mut c = self.cursor.lock();
        c.shallow_from = c
            .shallow_from
            .max(live.saturating_sub(OVERLAP_MS).max(floor));
        c.deep_from = c
            .deep_from
            .max(all.saturating_sub(OVERLAP_MS).max(floor))
            .min(c.shallow_from);
        let deep =
            c.deep_from < c.shallow_from && now.saturating_sub(c.last_deep_ms) >= DEEP_EVERY_MS;
        if deep {
            c.last_deep_ms = now;
        }
        (if deep { c.deep_from } else { c.shallow_from }, deep)
    }

    /// Read every partition from the lower bound and apply what is new,
    /// page by page.
    async fn poll(&self) -> Result<(), TableError> {
        let hub = &self.hub;
        let started = unix_ms();
        let (from, _deep) = self.bounds(started);
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
        let horizon = self
            .cursor
            .lock()
            .deep_from
            .min(started.saturating_sub(REPLAY_WINDOW_MS));
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

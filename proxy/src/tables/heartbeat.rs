//! Replication lag, measured pt-heartbeat style. Every region writes its
//! heartbeat (`pk = "hb#<shard>"`, `sk = <region>`, `t = now`) into each of
//! `heartbeat_shards` partitions every `heartbeat_interval`, and reads every
//! region's rows back from its own replica. DynamoDB replicates partitions
//! independently, so a region's watermark is the *oldest* of its shards:
//! every write that region made before the watermark is visible here (as far
//! as its data replicates like these rows).
//!
//! While the table cannot be read, every watermark is unknown: policies
//! treat that as the worst case (docs/policies.md), and plain traffic
//! is not affected.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::task::JoinSet;

use super::{Attr, Item, SharedTable, TableError, EXPIRES_AT, QUERY_PAGE};
use crate::clock::unix_ms;
use crate::metrics::Metrics;
use crate::telemetry::WarnLimiter;

/// Heartbeat rows outlive a stopped region by this much, then expire.
const HEARTBEAT_TTL_S: i64 = 3600;

/// Shortest bound on one heartbeat round (writes and reads together).
const ROUND_LIMIT: Duration = Duration::from_secs(5);

/// What the request path knows about replication into the local replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagSnapshot {
    /// Per region (topology order): newest Unix ms up to which its writes
    /// are visible here; `None` while unknown.
    pub watermarks_ms: Vec<Option<u64>>,
    /// The last heartbeat round could read and write the table.
    pub reachable: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// Unix ms of the last round that succeeded.
    pub last_ok_ms: Option<u64>,
}

/// The published lag snapshot, read on every request.
#[derive(Debug)]
pub struct LagState {
    regions: Vec<String>,
    snap: ArcSwap<LagSnapshot>,
}

impl LagState {
    /// Nothing known yet for `regions` (topology order).
    pub fn new(regions: Vec<String>) -> LagState {
        let snap = LagSnapshot {
            watermarks_ms: vec![None; regions.len()],
            reachable: false,
            error: Some("no heartbeat round yet".to_string()),
            last_ok_ms: None,
        };
        LagState {
            regions,
            snap: ArcSwap::from_pointee(snap),
        }
    }

    /// The current snapshot (an atomic load).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<LagSnapshot>> {
        self.snap.load()
    }

    /// The region names, in the order of `watermarks_ms`.
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// The `/status` section.
    pub fn status_json(&self, table: &str) -> serde_json::Value {
        let snap = self.snapshot();
        let now = unix_ms();
        let lag: serde_json::Map<String, serde_json::Value> = self
            .regions
            .iter()
            .zip(&snap.watermarks_ms)
            .map(|(r, w)| {
                let v = match w {
                    Some(w) => serde_json::json!({
                        "watermark_ms": w,
                        "lag_seconds": now.saturating_sub(*w) as f64 / 1000.0,
                    }),
                    None => serde_json::json!({ "watermark_ms": null, "lag_seconds": null, "unknown": true }),
                };
                (r.clone(), v)
            })
            .collect();
        serde_json::json!({
            "backend": table,
            "reachable": snap.reachable,
            "error": snap.error,
            "last_ok_ms_ago": snap.last_ok_ms.map(|t| now.saturating_sub(t)),
            "lag": lag,
        })
    }
}

/// Settings of the heartbeat loop.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatSettings {
    /// How often to write and read.
    pub interval: Duration,
    /// Partitions each region writes.
    pub shards: u32,
}

/// The background service that writes this region's heartbeats and reads everyone's.
pub struct Heartbeats {
    table: SharedTable,
    local: String,
    settings: HeartbeatSettings,
    lag: Arc<LagState>,
    metrics: Arc<Metrics>,
    warnings: WarnLimiter,
    recoveries: WarnLimiter,
}

impl Heartbeats {
    /// A loop for region `local` over `table`, publishing into `lag`.
    pub fn new(
        table: SharedTable,
        local: String,
        settings: HeartbeatSettings,
        lag: Arc<LagState>,
        metrics: Arc<Metrics>,
    ) -> Heartbeats {
        Heartbeats {
            table,
            local,
            settings,
            lag,
            metrics,
            warnings: WarnLimiter::new(Duration::from_secs(30)),
            recoveries: WarnLimiter::new(Duration::from_secs(30)),
        }
    }

    async fn write(&self, now: u64) -> Result<(), TableError> {
        let mut writes = JoinSet::new();
        for shard in 0..self.settings.shards {
            let item = Item::new(format!("hb#{shard}"), self.local.clone())
                .with("t", Attr::N(now as i64))
                .with(EXPIRES_AT, Attr::N((now / 1000) as i64 + HEARTBEAT_TTL_S));
            let table = self.table.clone();
            writes.spawn(async move { table.put(item).await });
        }
        let mut result = Ok(());
        while let Some(done) = writes.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(TableError::Unreachable(format!("heartbeat task: {e}"))),
            }
        }
        result
    }

    /// Every region's watermark: the oldest of its shards, unknown if a shard lacks it.
    async fn read(&self) -> Result<Vec<Option<u64>>, TableError> {
        let mut reads = JoinSet::new();
        for shard in 0..self.settings.shards {
            let table = self.table.clone();
            reads.spawn(async move { table.query(&format!("hb#{shard}"), None, QUERY_PAGE).await });
        }
        let regions = self.lag.regions();
        let mut oldest: Vec<Option<u64>> = vec![None; regions.len()];
        let mut seen = vec![0u32; regions.len()];
        while let Some(done) = reads.join_next().await {
            let rows = match done {
                Ok(rows) => rows?,
                Err(e) => return Err(TableError::Unreachable(format!("heartbeat task: {e}"))),
            };
            for row in rows {
                let (Some(i), Some(t)) = (
                    regions.iter().position(|r| *r == row.sk),
                    row.n("t").and_then(|t| u64::try_from(t).ok()),
                ) else {
                    continue;
                };
                seen[i] += 1;
                oldest[i] = Some(oldest[i].map_or(t, |o| o.min(t)));
            }
        }
        Ok(oldest
            .into_iter()
            .zip(seen)
            .map(|(t, n)| t.filter(|_| n == self.settings.shards))
            .collect())
    }

    /// One round: write ours, read everyone's. Only a failed read makes the
    /// lag unknown (what this replica shows is still true when our own
    /// writes fail); either failure marks the table unreachable in `/status`.
    async fn round(&self) {
        let now = unix_ms();
        // A table that hangs must not hold the loop past the SDK's own timeouts.
        let limit = (self.settings.interval * 4).max(ROUND_LIMIT);
        // Reads and writes together: a slow write must not delay what the
        // request path learns about the other regions.
        let (written, read) =
            match tokio::time::timeout(limit, async { tokio::join!(self.write(now), self.read()) })
                .await
            {
                Ok(both) => both,
                Err(_) => {
                    let e = TableError::Unreachable(format!("heartbeat round took over {limit:?}"));
                    (Err(e.clone()), Err(e))
                }
            };
        let prev = self.lag.snapshot();
        let mut failure: Option<(&'static str, TableError)> = None;
        if let Err(e) = written {
            self.metrics
                .table_errors
                .with_label_values(&["heartbeat_write"])
                .inc();
            failure = Some(("heartbeat_write", e));
        }
        let watermarks_ms = match read {
            Ok(w) => w,
            Err(e) => {
                self.metrics
                    .table_errors
                    .with_label_values(&["heartbeat_read"])
                    .inc();
                failure = Some(("heartbeat_read", e));
                vec![None; self.lag.regions().len()]
            }
        };
        for (r, w) in self.lag.regions().iter().zip(&watermarks_ms) {
            match w {
                Some(w) => self
                    .metrics
                    .replication_lag
                    .with_label_values(&[r.as_str()])
                    .set(unix_ms().saturating_sub(*w) as f64 / 1000.0),
                // Unknown is absent, not a number a dashboard would average.
                None => {
                    let _ = self
                        .metrics
                        .replication_lag
                        .remove_label_values(&[r.as_str()]);
                }
            }
        }
        let next = match failure {
            None => {
                if !prev.reachable && prev.last_ok_ms.is_some() && self.recoveries.allow() {
                    tracing::info!(table = %self.table.describe(), "replicated table answers again: replication lag known");
                }
                LagSnapshot {
                    watermarks_ms,
                    reachable: true,
                    error: None,
                    last_ok_ms: Some(now),
                }
            }
            Some((op, e)) => {
                if self.warnings.allow() {
                    tracing::warn!(table = %self.table.describe(), op, error = %e, "replicated table failing (warned at most every 30 s; edge_table_errors_total counts each): while reads fail, replication lag is unknown and read-your-writes token reads go to the writer's region, bounded-staleness reads to the primary");
                }
                if matches!(e, TableError::NotFound(_)) {
                    if let Err(e) = self.table.ensure().await {
                        self.metrics
                            .table_errors
                            .with_label_values(&["ensure"])
                            .inc();
                        tracing::debug!(error = %e, "table still missing");
                    }
                }
                let read_ok = op == "heartbeat_write";
                LagSnapshot {
                    watermarks_ms,
                    reachable: false,
                    error: Some(format!("{op}: {e}")),
                    last_ok_ms: if read_ok { Some(now) } else { prev.last_ok_ms },
                }
            }
        };
        self.metrics.table_reachable.set(i64::from(next.reachable));
        self.lag.snap.store(Arc::new(next));
    }
}

#[async_trait]
impl BackgroundService for Heartbeats {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if let Err(e) = self.table.ensure().await {
            self.metrics
                .table_errors
                .with_label_values(&["ensure"])
                .inc();
            tracing::warn!(table = %self.table.describe(), error = %e, "replicated table not ready at start; retrying every heartbeat");
        }
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.round().await,
            }
        }
    }
}

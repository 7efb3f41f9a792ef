//! The embedded table. One region on its own is a plain in-process store;
//! several regions of one process (`edge-router demo`, tests) share a
//! [`SimulatedGlobal`]: one replica per region, a write visible in its own
//! replica at once and in each other replica after that link's replication
//! delay, conflicts settled last-writer-wins on (timestamp, region) as
//! DynamoDB global tables do.
//!
//! Replication is lazy: a write waits in each other replica's pending list
//! and is applied when that replica is next read after `written + delay`.
//! The delay is read at that moment, so changing it at run time affects
//! writes already in flight too (lowering it releases them at once), and no
//! background task or runtime is needed.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{Item, Table, TableError};
use crate::clock::unix_ms;

/// Which write wins: the later timestamp, then the greater region name,
/// then (two writes of one region in the same millisecond) the later write.
type Version = (u64, String, u64);

#[derive(Debug)]
struct Stored {
    item: Item,
    version: Version,
}

#[derive(Debug)]
struct Pending {
    item: Item,
    version: Version,
    from: usize,
    written: Instant,
}

#[derive(Debug, Default)]
struct Replica {
    /// pk -> sk -> row.
    rows: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Writes from other regions not yet visible here.
    pending: Vec<Pending>,
    /// Set by tests and the demo to make this region's table fail.
    unreachable: bool,
}

impl Replica {
    fn apply(&mut self, item: Item, version: Version) {
        let part = self.rows.entry(item.pk.clone()).or_default();
        match part.get(&item.sk) {
            Some(old) if old.version >= version => {}
            _ => {
                part.insert(item.sk.clone(), Stored { item, version });
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    regions: Vec<String>,
    replicas: Vec<Replica>,
    default_delay: Duration,
    /// (from, to) -> delay, overriding the default.
    links: HashMap<(usize, usize), Duration>,
    /// Orders writes within one millisecond.
    writes: u64,
}

impl Inner {
    fn delay(&self, from: usize, to: usize) -> Duration {
        self.links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.default_delay)
    }

    /// Apply every pending write that replica `r` should see by `now`.
    fn catch_up(&mut self, r: usize, now: Instant) {
        if self.replicas[r].pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.replicas[r].pending);
        let mut keep = Vec::with_capacity(pending.len());
        for p in pending {
            if p.written + self.delay(p.from, r) <= now {
                self.replicas[r].apply(p.item, p.version);
            } else {
                keep.push(p);
            }
        }
        self.replicas[r].pending = keep;
    }
}

/// The replicas of every region in this process, and their replication delays.
#[derive(Debug)]
pub struct SimulatedGlobal {
    inner: Mutex<Inner>,
}

/// A region name the simulated table does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the embedded table has no replica for region `{0}`")]
pub struct UnknownRegion(pub String);

impl SimulatedGlobal {
    /// One replica per region, every link delayed by `delay`.
    pub fn new(regions: &[&str], delay: Duration) -> Arc<SimulatedGlobal> {
        Arc::new(SimulatedGlobal {
            inner: Mutex::new(Inner {
                regions: regions.iter().map(|r| r.to_string()).collect(),
                replicas: regions.iter().map(|_| Replica::default()).collect(),
                default_delay: delay,
                links: HashMap::new(),
                writes: 0,
            }),
        })
    }

    /// The table as region `region` sees it.
    pub fn replica(self: &Arc<Self>, region: &str) -> Result<EmbeddedTable, UnknownRegion> {
        let index = self
            .inner
            .lock()
            .regions
            .iter()
            .position(|r| r == region)
            .ok_or_else(|| UnknownRegion(region.to_string()))?;
        Ok(EmbeddedTable {
            global: self.clone(),
            index,
            region: region.to_string(),
        })
    }

    /// Set every link's delay (and forget per-link overrides).
    pub fn set_delay(&self, delay: Duration) {
        let mut inner = self.inner.lock();
        inner.default_delay = delay;
        inner.links.clear();
    }

    /// Set one link's delay, from `from`'s replica to `to`'s.
    pub fn set_link_delay(
        &self,
        from: &str,
        to: &str,
        delay: Duration,
    ) -> Result<(), UnknownRegion> {
        let mut inner = self.inner.lock();
        let find = |name: &str| {
            inner
                .regions
                .iter()
                .position(|r| r == name)
                .ok_or_else(|| UnknownRegion(name.to_string()))
        };
        let (f, t) = (find(from)?, find(to)?);
        inner.links.insert((f, t), delay);
        Ok(())
    }

    /// The delay every link has unless overridden.
    pub fn delay(&self) -> Duration {
        self.inner.lock().default_delay
    }

    /// Make one region's table fail every operation (or work again), as a
    /// partitioned or deleted replica would.
    pub fn set_unreachable(&self, region: &str, unreachable: bool) -> Result<(), UnknownRegion> {
        let mut inner = self.inner.lock();
        let i = inner
            .regions
            .iter()
            .position(|r| r == region)
            .ok_or_else(|| UnknownRegion(region.to_string()))?;
        inner.replicas[i].unreachable = unreachable;
        Ok(())
    }
}

/// One region's replica of the embedded table.
#[derive(Debug, Clone)]
pub struct EmbeddedTable {
    global: Arc<SimulatedGlobal>,
    index: usize,
    region: String,
}

impl EmbeddedTable {
    /// A table of its own for a single region (`[tables] backend = "embedded"` under `run`).
    pub fn single(region: &str) -> EmbeddedTable {
        let global = SimulatedGlobal::new(&[region], Duration::ZERO);
        EmbeddedTable {
            global,
            index: 0,
            region: region.to_string(),
        }
    }

    fn with_replica<T>(&self, f: impl FnOnce(&mut Replica) -> T) -> Result<T, TableError> {
        let mut inner = self.global.inner.lock();
        if inner.replicas[self.index].unreachable {
            return Err(TableError::Unreachable(format!(
                "embedded replica {} is switched off",
                self.region
            )));
        }
        inner.catch_up(self.index, Instant::now());
        Ok(f(&mut inner.replicas[self.index]))
    }
}

fn now_s() -> i64 {
    (unix_ms() / 1000) as i64
}

#[async_trait]
impl Table for EmbeddedTable {
    fn describe(&self) -> String {
        format!("embedded ({})", self.region)
    }

    async fn put(&self, item: Item) -> Result<(), TableError> {
        let mut inner = self.global.inner.lock();
        inner.writes += 1;
        let version = (unix_ms(), self.region.clone(), inner.writes);
        if inner.replicas[self.index].unreachable {
            return Err(TableError::Unreachable(format!(
                "embedded replica {} is switched off",
                self.region
            )));
        }
        let written = Instant::now();
        for r in 0..inner.replicas.len() {
            if r != self.index {
                inner.replicas[r].pending.push(Pending {
                    item: item.clone(),
                    version: version.clone(),
                    from: self.index,
                    written,
                });
            }
        }
        inner.replicas[self.index].apply(item, version);
        Ok(())
    }

    async fn query(
        &self,
        pk: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, TableError> {
        let now = now_s();
        self.with_replica(|rep| {
            let Some(part) = rep.rows.get(pk) else {
                return Vec::new();
            };
            let lower = match after {
                Some(a) => Bound::Excluded(a.to_string()),
                None => Bound::Unbounded,
            };
            part.range((lower, Bound::Unbounded))
                .map(|(_, s)| &s.item)
                .filter(|i| !i.expired(now))
                .take(limit)
                .cloned()
                .collect()
        })
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, TableError> {
        let now = now_s();
        self.with_replica(|rep| {
            rep.rows
                .get(pk)
                .and_then(|p| p.get(sk))
                .map(|s| s.item.clone())
                .filter(|i| !i.expired(now))
        })
    }

    async fn ensure(&self) -> Result<(), TableError> {
        self.with_replica(|_| ())
    }
}

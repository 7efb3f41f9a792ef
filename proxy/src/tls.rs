//! TLS listeners' certificates at run time: reloaded when the files in a
//! listener's directory change (a new certificate serves the next
//! handshake; open connections keep theirs; a directory that does not
//! load keeps the old certificates and says why), and their expiry as a
//! metric.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use edge_certs::resolver::DirResolver;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::metrics::Metrics;

/// How often the directories are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A directory's files and their modification times and sizes.
type Snapshot = BTreeMap<PathBuf, (Option<SystemTime>, u64)>;

/// Watches every TLS listener's certificate directory.
pub struct CertWatch {
    resolvers: Vec<Arc<DirResolver>>,
    seen: Mutex<Vec<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl CertWatch {
    /// Watch `resolvers`' directories.
    pub fn new(resolvers: Vec<Arc<DirResolver>>, metrics: Arc<Metrics>) -> CertWatch {
        let seen = resolvers.iter().map(|r| snapshot(r)).collect();
        let watch = CertWatch {
            resolvers,
            seen: Mutex::new(seen),
            metrics,
        };
        watch.publish_expiry();
        watch
    }

    /// Reload the directories whose files changed since the last look.
    pub fn check(&self) {
        for (i, r) in self.resolvers.iter().enumerate() {
            let now = snapshot(r);
            let changed = self.seen.lock().get(i).is_some_and(|s| *s != now);
            if !changed {
                continue;
            }
            match r.reload() {
                Ok(()) => {
                    self.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                    let names: Vec<String> = r.certs().into_iter().map(|c| c.name).collect();
                    tracing::info!(dir = %r.dir().display(), certs = ?names, "TLS certificates reloaded");
                }
                Err(e) => {
                    self.metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::warn!(dir = %r.dir().display(), error = %e, "TLS certificates not reloaded: the previous ones keep serving");
                }
            }
            // Either way, wait for the next change before trying again.
            if let Some(s) = self.seen.lock().get_mut(i) {
                *s = now;
            }
        }
        self.publish_expiry();
    }

    fn publish_expiry(&self) {
        let now = SystemTime::now();
        for r in &self.resolvers {
            for c in r.certs() {
                self.metrics
                    .tls_cert_expiry
                    .with_label_values(&[c.name.as_str()])
                    .set(c.expires_in(now));
            }
        }
    }
}

fn snapshot(r: &DirResolver) -> Snapshot {
    let mut out = Snapshot::new();
    if let Ok(entries) = std::fs::read_dir(r.dir()) {
        for e in entries.flatten() {
            if let Ok(meta) = e.metadata() {
                out.insert(e.path(), (meta.modified().ok(), meta.len()));
            }
        }
    }
    out
}

#[async_trait]
impl BackgroundService for CertWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.check(),
            }
        }
    }
}

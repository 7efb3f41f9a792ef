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

/// Certificates closer than this to their end are warned about when loaded.
const EXPIRY_WARNING: i64 = 14 * 86_400;

/// Log what `resolver` now serves: a line per pair, a warning for a pair
/// that has expired or soon will (clients refuse it; the gauge shows it too).
pub fn log_loaded(resolver: &DirResolver, what: &str) {
    let now = SystemTime::now();
    for o in resolver.overlaps() {
        let dir = resolver.dir().display();
        match &o.served_by {
            Some(pair) => {
                tracing::warn!(dir = %dir, name = %o.name, served_by = %pair, unused = %o.unused, "TLS: a name claimed by two pairs is answered by the one valid longest")
            }
            None => {
                tracing::warn!(dir = %dir, name = %o.name, unused = %o.unused, "TLS: an expired certificate's name is answered by a valid wildcard instead")
            }
        }
    }
    for c in resolver.certs() {
        let left = c.expires_in(now);
        let dir = resolver.dir().display();
        if left <= 0 {
            tracing::warn!(dir = %dir, cert = %c.name, names = ?c.dns_names, expired_seconds_ago = -left, "{what}: this TLS certificate has expired; clients will refuse it");
        } else if left < EXPIRY_WARNING {
            tracing::warn!(dir = %dir, cert = %c.name, names = ?c.dns_names, days_left = left / 86_400, "{what}: this TLS certificate expires soon");
        } else {
            tracing::info!(dir = %dir, cert = %c.name, names = ?c.dns_names, days_left = left / 86_400, "{what}");
        }
    }
}

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
                    log_loaded(r, "TLS certificate reloaded");
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
        // Rebuilt each time: a pair removed from a directory leaves no series behind.
        self.metrics.tls_cert_expiry.reset();
        for r in &self.resolvers {
            let dir = r.dir().display().to_string();
            for c in r.certs() {
                self.metrics
                    .tls_cert_expiry
                    .with_label_values(&[dir.as_str(), c.name.as_str()])
                    .set(c.expires_in(now));
            }
        }
    }
}

fn snapshot(r: &DirResolver) -> Snapshot {
    let mut out = Snapshot::new();
    let mut paths: Vec<PathBuf> = r.extra_files();
    if let Ok(entries) = std::fs::read_dir(r.dir()) {
        paths.extend(entries.flatten().map(|e| e.path()));
    }
    for path in paths {
        // Followed through symlinks: a renewed target (certbot's
        // live/ links) is a change.
        if let Ok(meta) = std::fs::metadata(&path) {
            out.insert(path, (meta.modified().ok(), meta.len()));
        }
    }
    out
}

impl CertWatch {
    /// Reload every directory now (SIGHUP), whether or not files changed.
    fn reload_all(&self) {
        for r in &self.resolvers {
            match r.reload() {
                Ok(()) => {
                    self.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                    log_loaded(r, "SIGHUP: TLS certificate reloaded");
                }
                Err(e) => {
                    self.metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::warn!(dir = %r.dir().display(), error = %e, "SIGHUP: TLS certificates not reloaded; the previous ones keep serving");
                }
            }
        }
        if self.resolvers.is_empty() {
            tracing::info!(
                "SIGHUP: no TLS listener to reload (the config file is read at start only)"
            );
        }
        self.publish_expiry();
    }
}

#[async_trait]
impl BackgroundService for CertWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut signals = crate::signals::subscribe();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.check(),
                s = signals.recv() => match s {
                    Ok(crate::signals::Request::Reload) => self.reload_all(),
                    Ok(_) => {}
                    // Missed some: reload once for all of them.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.reload_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

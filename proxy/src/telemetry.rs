//! Logging: `tracing` with an env filter (`EDGE_LOG`, else `RUST_LOG`, else
//! `info`), as text or JSON lines. Access-log events use target
//! `edge_router::access`: on stderr with the rest, or in a file of their
//! own (`log.access_path`, reopened on SIGUSR1).

use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::ErrorCounter;
use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Lines the writer dropped because its queue was full.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// How often a full queue is reported (once per interval, Envoy-style).
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Lets through at most one warning per interval for one kind of event, so
/// an event a client can cause at will cannot flood the log.
#[derive(Debug)]
pub struct WarnLimiter {
    interval_ms: u64,
    last_ms: std::sync::atomic::AtomicU64,
}

impl WarnLimiter {
    /// A limiter letting one warning through per `interval`.
    pub fn new(interval: Duration) -> WarnLimiter {
        WarnLimiter {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// True for the first call in each interval.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::clock::unix_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= self.interval_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Log lines dropped so far: a queue was full, or the access-log file
/// could not be written (a full disk).
pub fn dropped_lines() -> u64 {
    let queue = |c: &OnceLock<ErrorCounter>| c.get().map(|c| c.dropped_lines() as u64).unwrap_or(0);
    queue(&DROPPED)
        + queue(&ACCESS_DROPPED)
        + WRITE_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The access-log file's queue drops.
static ACCESS_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Writes to the access-log file that failed (the writer thread drops them).
static WRITE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// The writer thread's guard, so that an early exit can flush it.
static WORKER: parking_lot::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    parking_lot::Mutex::new(None);

/// Keeps the log writer thread alive; dropping it flushes what is queued.
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Write out what is queued and stop the writer (before `process::exit`).
pub fn flush() {
    drop(ACCESS_WORKER.lock().take());
    drop(WORKER.lock().take());
}

/// Install the global subscriber; keep the guard until the process ends.
///
/// Lines are formatted on the proxy's threads and written by a writer
/// thread through a `BufWriter`, flushed whenever its queue drains: one
/// `write` per batch instead of one per request (measured: the access log
/// cost 7 µs of 40 µs per request with a `write` per line). When the queue
/// is full (a slow or stopped reader of stderr) lines are dropped and
/// counted unless `block_when_full`: a log consumer must never be able to
/// stall the proxy, its health path included.
///
/// With `log.access_path`, access-log events go to that file (reopened on
/// SIGUSR1, for logrotate) and everything else to stderr; an error says why
/// the file cannot be opened.
pub fn init(format: LogFormat, log: LogConfig) -> Result<LogGuard, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let block_when_full = log.block_when_full;
    let directives = std::env::var("EDGE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|f| !f.trim().is_empty() && EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "info".to_string());
    // With a file of its own, the access log leaves stderr to operations.
    let filter = match &log.access_path {
        Some(_) => EnvFilter::new(format!("{directives},{ACCESS_TARGET}=off")),
        None => EnvFilter::new(&directives),
    };
    // Colour only on a terminal: escape codes in a log file cost ~3 % CPU per request and help no one.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(!block_when_full)
        .buffered_lines_limit(log.queue_lines)
        .thread_name("edge-log-writer")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    if DROPPED.set(writer.error_counter()).is_ok() && !block_when_full {
        spawn_drop_reporter();
    }
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let layer = |writer: tracing_appender::non_blocking::NonBlocking, ansi: bool| -> Boxed {
        let l = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer);
        match format {
            LogFormat::Text => Box::new(l),
            LogFormat::Json => Box::new(l.json().flatten_event(true)),
        }
    };
    let mut layers: Vec<Boxed> = vec![Box::new(layer(writer, ansi).with_filter(filter))];
    let mut access_guard = None;
    if let Some(path) = &log.access_path {
        let file = ReopeningFile::open(path.clone())?;
        let (access, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(!block_when_full)
            .buffered_lines_limit(log.queue_lines)
            .thread_name("edge-access-log-writer")
            .finish(std::io::BufWriter::with_capacity(64 * 1024, file));
        let _ = ACCESS_DROPPED.set(access.error_counter());
        let only_access = tracing_subscriber::filter::Targets::new()
            .with_target(ACCESS_TARGET, tracing::Level::INFO);
        layers.push(Box::new(layer(access, false).with_filter(only_access)));
        access_guard = Some(guard);
    }
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
    {
        *WORKER.lock() = Some(guard);
        *ACCESS_WORKER.lock() = access_guard;
    }
    Ok(LogGuard(()))
}

/// The access log's target.
const ACCESS_TARGET: &str = "edge_router::access";

/// The access-log file's writer thread guard.
static ACCESS_WORKER: parking_lot::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    parking_lot::Mutex::new(None);

/// Set by SIGUSR1: the access-log file is reopened before its next write.
static REOPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reopen the access-log file (logrotate moved it away): SIGUSR1.
pub fn request_reopen() {
    REOPEN.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// An append-mode file that reopens its path when asked, as nginx does on
/// `USR1`: logrotate renames the file, then signals, and new lines go to a
/// new file under the old name.
struct ReopeningFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl ReopeningFile {
    fn open(path: std::path::PathBuf) -> Result<ReopeningFile, String> {
        let file = Self::open_file(&path)
            .map_err(|e| format!("log.access_path {}: {e}", path.display()))?;
        Ok(ReopeningFile { path, file })
    }

    fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        // Client addresses, paths and user agents: not for every local
        // user. Never through a symlink: whoever can write in the log
        // directory must not make this process append to another file.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    }
}

impl std::io::Write for ReopeningFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if REOPEN.swap(false, std::sync::atomic::Ordering::SeqCst) {
            match Self::open_file(&self.path) {
                Ok(f) => self.file = f,
                // Keep writing where we were; the next SIGUSR1 tries again.
                Err(e) => eprintln!(
                    "edge-router: cannot reopen the access log {}: {e}",
                    self.path.display()
                ),
            }
        }
        self.file.write(buf).inspect_err(|_| {
            WRITE_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// One warning per interval while lines are being dropped; the warning
/// itself goes through the same queue, so it appears once the queue drains.
fn spawn_drop_reporter() {
    let spawned = std::thread::Builder::new()
        .name("edge-log-drops".to_string())
        .spawn(|| {
            let mut reported = 0;
            loop {
                std::thread::sleep(DROP_WARN_INTERVAL);
                let now = dropped_lines();
                if now > reported {
                    tracing::warn!(
                        dropped = now - reported,
                        total = now,
                        "log queue full: lines dropped (edge_log_dropped_total); is stderr being read?"
                    );
                    reported = now;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the log-drop reporter");
    }
}

#[cfg(test)]
mod tests {
    use super::WarnLimiter;
    use std::time::Duration;

    #[test]
    fn one_warning_per_interval() {
        let w = WarnLimiter::new(Duration::from_secs(3600));
        assert!(w.allow());
        assert!(!w.allow());
        let every_time = WarnLimiter::new(Duration::ZERO);
        assert!(every_time.allow() && every_time.allow());
    }

    #[test]
    fn the_access_log_is_never_opened_through_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").expect("write");
        let link = dir.path().join("access.log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(super::ReopeningFile::open(link).is_err());
        let plain = dir.path().join("plain.log");
        assert!(super::ReopeningFile::open(plain).is_ok());
    }
}

//! Graceful upgrade, as nginx's SIGUSR2: the running process starts its
//! successor (the binary now at its own path, with its own arguments and
//! `--upgrade`), waits until the successor is listening on
//! `server.upgrade_sock`, and then lets Pingora hand it the listening
//! sockets. No connection is refused meanwhile: the sockets never close,
//! both processes accept for a few seconds, then the old one stops
//! accepting, finishes what is in flight and exits. A successor that fails
//! (a config it refuses, a port it cannot bind, a crash) exits before
//! taking anything, and this process keeps serving.
//!
//! The successor reads the config file again, so a graceful upgrade also
//! applies what a reload cannot: listeners, the region, the tables. It
//! inherits this process's environment, secrets included.
//!
//! What can still go wrong once the sockets are offered (the successor
//! dying before it takes them) cannot be undone: Pingora stops accepting
//! five seconds later either way. [`Upgrade::handed_over`] tells, and the
//! old process then exits with status 1 so a supervisor starts a new one.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tells a successor which listening addresses it will inherit, so that it
/// can check, before taking anything, that it can bind the others.
const INHERITS_ENV: &str = "EDGE_UPGRADE_INHERITS";

/// How long a successor may take to load its config, its certificates and
/// its tables before it waits for the sockets.
const START_LIMIT: Duration = Duration::from_secs(60);

/// Why a graceful upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The binary or the socket's path could not be prepared.
    #[error("{0}")]
    Prepare(String),
    /// The successor did not start.
    #[error("cannot start {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: String,
        /// Why.
        source: std::io::Error,
    },
    /// The successor ended before taking the sockets (its log says why).
    #[error("the new process exited ({0}) before taking the listening sockets; its log says why")]
    Exited(ExitStatus),
    /// The successor never got as far as waiting for the sockets.
    #[error("the new process did not wait for the listening sockets within {0:?}; it was stopped")]
    TimedOut(Duration),
}

/// Starts successors that take over through `sock`.
#[derive(Debug, Clone)]
pub struct Upgrade {
    sock: PathBuf,
    listeners: Vec<SocketAddr>,
}

/// A successor that waits for the sockets.
#[derive(Debug, Clone)]
pub struct Successor {
    /// Its process id.
    pub pid: u32,
    exited: Arc<AtomicBool>,
}

impl Successor {
    /// It has not exited.
    pub fn alive(&self) -> bool {
        !self.exited.load(Ordering::SeqCst)
    }
}

/// Kills the successor unless it got as far as waiting for the sockets (a
/// SIGTERM while it starts, a timeout).
struct Starting(Option<Child>, PathBuf);

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
            // It may have made the socket: nobody waits on it now.
            let _ = std::fs::remove_file(&self.1);
        }
    }
}

impl Upgrade {
    /// Upgrades through the Unix socket at `sock` (`server.upgrade_sock`);
    /// `listeners` are the addresses this process listens on.
    pub fn new(sock: PathBuf, listeners: Vec<SocketAddr>) -> Upgrade {
        Upgrade { sock, listeners }
    }

    /// The socket's path.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// True when a process waits on the socket for the listening sockets.
    pub fn someone_waits(&self) -> bool {
        is_socket(&self.sock)
    }

    /// Start the successor; it is returned once it waits for the sockets.
    pub async fn start_successor(&self) -> Result<Successor, UpgradeError> {
        // The directory may have changed since the config was checked.
        if let Some(why) = crate::config::upgrade_sock_error(&self.sock) {
            return Err(UpgradeError::Prepare(why));
        }
        // A socket left from an earlier upgrade would look like a waiting successor.
        match std::fs::remove_file(&self.sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(UpgradeError::Prepare(format!(
                    "cannot remove the old {}: {e}",
                    self.sock.display()
                )))
            }
        }
        let exe = own_binary().map_err(UpgradeError::Prepare)?;
        let inherits: Vec<String> = self.listeners.iter().map(|a| a.to_string()).collect();
        let child = Command::new(&exe)
            .args(successor_args(std::env::args_os().skip(1)))
            .env(INHERITS_ENV, inherits.join(","))
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                exe: exe.display().to_string(),
                source,
            })?;
        let pid = child.id();
        let mut starting = Starting(Some(child), self.sock.clone());
        tracing::info!(pid, exe = %exe.display(), "graceful upgrade: new process started; waiting until it asks for the listening sockets");
        let started = Instant::now();
        loop {
            let Some(child) = starting.0.as_mut() else {
                return Err(UpgradeError::Prepare("lost the new process".into()));
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    starting.0 = None;
                    return Err(UpgradeError::Exited(status));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(UpgradeError::Prepare(format!(
                        "cannot watch the new process: {e}"
                    )))
                }
            }
            if is_socket(&self.sock) {
                let exited = Arc::new(AtomicBool::new(false));
                if let Some(child) = starting.0.take() {
                    reap(child, exited.clone());
                }
                return Ok(Successor { pid, exited });
            }
            if started.elapsed() >= START_LIMIT {
                return Err(UpgradeError::TimedOut(START_LIMIT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the sockets reached the successor: it removes the socket
    /// once it has them (Pingora's `get_fds_from`), and it is still alive.
    /// Waits up to `limit` for that.
    pub async fn handed_over(
        &self,
        successor: Option<&Successor>,
        limit: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if successor.is_some_and(|s| !s.alive()) {
                return Err("the new process exited before it took the listening sockets".into());
            }
            if !is_socket(&self.sock) {
                return match successor {
                    Some(s) if !s.alive() => Err("the new process exited".into()),
                    _ => Ok(()),
                };
            }
            if start.elapsed() >= limit {
                return Err(format!(
                    "nothing took the listening sockets from {} within {limit:?}",
                    self.sock.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// In a successor (`run --upgrade`): every listener it will not inherit
/// must be free, or it must not take any socket (the old process would
/// stop accepting for a successor that cannot serve). Without word from
/// the old process (`--upgrade` by hand), nothing is checked.
pub fn check_new_listeners(listeners: &[SocketAddr]) -> Result<(), String> {
    let Ok(inherits) = std::env::var(INHERITS_ENV) else {
        return Ok(());
    };
    let inherited: Vec<&str> = inherits.split(',').collect();
    for l in listeners {
        if inherited.contains(&l.to_string().as_str()) {
            continue;
        }
        std::net::TcpListener::bind(l)
            .map_err(|e| format!("listener {l} (not the running process's): cannot bind: {e}"))?;
    }
    Ok(())
}

/// Our arguments with `--upgrade` (the `run` subcommand's flag) added once.
fn successor_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.collect();
    if !args.iter().any(|a| a == "--upgrade") {
        args.push("--upgrade".into());
    }
    args
}

/// The binary at this process's path: after a package upgrade replaced the
/// file, Linux names the running one `PATH (deleted)`, and the new one is
/// at PATH.
fn own_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Wait for the successor on a thread of its own, so that it does not stay
/// a zombie should it exit while this process still runs, and note when it
/// exits.
fn reap(mut child: Child, exited: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name("edge-successor".into())
        .spawn(move || {
            let _ = child.wait();
            exited.store(true, Ordering::SeqCst);
        });
}

#[cfg(test)]
mod tests {
    use super::successor_args;
    use std::ffi::OsString;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_successor_runs_with_our_arguments_and_upgrade_once() {
        assert_eq!(
            successor_args(args(&["--log-format", "json", "run", "-c", "/etc/e.toml"]).into_iter()),
            args(&[
                "--log-format",
                "json",
                "run",
                "-c",
                "/etc/e.toml",
                "--upgrade"
            ])
        );
        // A process that was itself a successor passes its arguments on as they are.
        assert_eq!(
            successor_args(args(&["run", "-c", "e.toml", "--upgrade"]).into_iter()),
            args(&["run", "-c", "e.toml", "--upgrade"])
        );
    }
}

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
//! applies what a reload cannot: listeners, the region, the tables.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

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
}

impl Upgrade {
    /// Upgrades through the Unix socket at `sock` (`server.upgrade_sock`).
    pub fn new(sock: PathBuf) -> Upgrade {
        Upgrade { sock }
    }

    /// The socket's path.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// Start the successor and return its pid once it waits for the sockets.
    pub async fn start_successor(&self) -> Result<u32, UpgradeError> {
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
        let mut child = Command::new(&exe)
            .args(successor_args(std::env::args_os().skip(1)))
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                exe: exe.display().to_string(),
                source,
            })?;
        let pid = child.id();
        tracing::info!(pid, exe = %exe.display(), "graceful upgrade: new process started; waiting until it asks for the listening sockets");
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(UpgradeError::Exited(status)),
                Ok(None) => {}
                Err(e) => {
                    return Err(UpgradeError::Prepare(format!(
                        "cannot watch the new process: {e}"
                    )))
                }
            }
            if is_socket(&self.sock) {
                reap(child);
                return Ok(pid);
            }
            if started.elapsed() >= START_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpgradeError::TimedOut(START_LIMIT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
/// a zombie should it exit while this process still runs.
fn reap(mut child: Child) {
    let _ = std::thread::Builder::new()
        .name("edge-successor".into())
        .spawn(move || child.wait());
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

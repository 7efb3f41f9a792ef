//! Signals that must not stop the process. Only SIGTERM, SIGINT and SIGQUIT
//! end edge-router (see `lifecycle`); the default action of SIGHUP, SIGUSR1,
//! SIGUSR2 and SIGALRM is to terminate, so logrotate's SIGUSR1 or
//! `systemctl reload`'s SIGHUP would take a region down. They are handled
//! from the start of `run` and `demo`, before any listener exists:
//!
//! - SIGHUP: reload the config file and the TLS certificates,
//! - SIGUSR1: reopen log files (logrotate),
//! - SIGUSR2: graceful upgrade, as nginx's: start a new process of the
//!   binary now at this one's path, hand it the listening sockets and
//!   finish what is in flight (see `upgrade`); without
//!   `server.upgrade_sock` it is logged and ignored,
//! - SIGALRM: logged and ignored.

use std::sync::OnceLock;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// What a handled signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP.
    Reload,
    /// SIGUSR1.
    ReopenLogs,
    /// SIGUSR2.
    Upgrade,
}

fn channel() -> &'static broadcast::Sender<Request> {
    static CHANNEL: OnceLock<broadcast::Sender<Request>> = OnceLock::new();
    CHANNEL.get_or_init(|| broadcast::channel(16).0)
}

/// Signals from now on (a receiver that never fires if `install` was not called).
pub fn subscribe() -> broadcast::Receiver<Request> {
    channel().subscribe()
}

/// Handle SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM on a thread of their own;
/// returns once the handlers are installed.
pub fn install() -> std::io::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("edge-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let streams = (|| {
                    Ok::<_, std::io::Error>((
                        signal(SignalKind::hangup())?,
                        signal(SignalKind::user_defined1())?,
                        signal(SignalKind::user_defined2())?,
                        signal(SignalKind::alarm())?,
                    ))
                })();
                let (mut hup, mut usr1, mut usr2, mut alrm) = match streams {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    let request = tokio::select! {
                        Some(()) = hup.recv() => Request::Reload,
                        Some(()) = usr1.recv() => {
                            crate::telemetry::request_reopen();
                            Request::ReopenLogs
                        }
                        Some(()) = usr2.recv() => Request::Upgrade,
                        Some(()) = alrm.recv() => {
                            tracing::info!("SIGALRM ignored");
                            continue;
                        }
                        else => return,
                    };
                    tracing::info!(?request, "signal received");
                    // No subscriber yet (still starting) is fine: nothing to do.
                    let _ = channel().send(request);
                }
            });
        })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the signal thread ended")))
}

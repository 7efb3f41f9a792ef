//! Draining and shutdown. SIGTERM turns the health path to 503 at once (so
//! Global Accelerator moves new flows away) and answers with `Connection:
//! close`, so clients reconnect elsewhere; it keeps serving for
//! `drain_period`, then stops accepting and gives requests still in flight
//! up to `shutdown_timeout` to finish, exiting as soon as none is left. A
//! second SIGTERM or a SIGINT stops at once. `POST /drain` on the admin
//! listener drains without exiting (take a region out of rotation); `DELETE
//! /drain` undoes that, but never a drain that SIGTERM started.
//!
//! With `server.upgrade_sock`, SIGUSR2 starts a successor (see `upgrade`)
//! and SIGQUIT hands the listening sockets to one already waiting
//! (Pingora's `--upgrade`); this process then answers with `Connection:
//! close`, keeps its health path at 200 (the sockets serve on), stops
//! accepting after Pingora's five seconds and exits once nothing is in
//! flight. Without it, SIGQUIT stops as SIGTERM does.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::metrics::Metrics;
use crate::upgrade::{Successor, Upgrade, UpgradeError};

/// Whether one proxy is draining, and how many requests it is serving.
pub struct Lifecycle {
    draining: AtomicBool,
    terminating: AtomicBool,
    /// A successor has the listening sockets: responses close their connections.
    handing_over: AtomicBool,
    in_flight: AtomicUsize,
    /// Requests received but not yet (or no longer) in Pingora's hands.
    pending: AtomicUsize,
    /// Serialises drain state changes, so the gauge always matches the flag.
    transitions: parking_lot::Mutex<()>,
    metrics: Arc<Metrics>,
}

/// Counts one received request for the shutdown watcher until dropped.
pub struct Pending(Arc<Lifecycle>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Counts one request in flight until dropped (with the request's context,
/// whichever way the request ends).
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
        self.0.metrics.in_flight.dec();
    }
}

impl Lifecycle {
    /// Not draining.
    pub fn new(metrics: Arc<Metrics>) -> Lifecycle {
        Lifecycle {
            draining: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            transitions: parking_lot::Mutex::new(()),
            metrics,
        }
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// True when responses should close their connections: draining, or
    /// handing over to a successor (whose health path is what the
    /// accelerator should see, so ours stays 200 then).
    pub fn closes_connections(&self) -> bool {
        self.is_draining() || self.handing_over.load(Ordering::Relaxed)
    }

    fn hand_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
    }

    /// Start draining (the admin API's `POST /drain`).
    pub fn start_drain(&self) {
        let _one = self.transitions.lock();
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
    }

    /// Stop an admin drain; false (and nothing changes) once SIGTERM has
    /// started the drain that ends the process.
    pub fn cancel_drain(&self) -> bool {
        let _one = self.transitions.lock();
        if self.terminating.load(Ordering::SeqCst) {
            return false;
        }
        self.draining.store(false, Ordering::SeqCst);
        self.metrics.draining.set(0);
        true
    }

    fn terminate(&self) {
        let _one = self.transitions.lock();
        self.terminating.store(true, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
    }

    /// Count a received request until its guard drops (it may not have a
    /// Pingora context yet; see [`Lifecycle::enter`]).
    pub fn enter_pending(self: &Arc<Self>) -> Pending {
        self.pending.fetch_add(1, Ordering::Acquire);
        Pending(self.clone())
    }

    /// Count a request in flight for as long as the guard lives.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Acquire);
        self.metrics.in_flight.inc();
        InFlight(self.clone())
    }

    /// Requests in flight now (with a Pingora context, or received and about to get one).
    pub fn in_flight(&self) -> usize {
        self.in_flight
            .load(Ordering::Acquire)
            .max(self.pending.load(Ordering::Acquire))
    }
}

/// Our replacement for Pingora's signal watcher: drain first, then stop.
pub struct DrainThenStop {
    lifecycles: Vec<Arc<Lifecycle>>,
    drain_period: Duration,
    shutdown_timeout: Duration,
    upgrade: Option<(Upgrade, Arc<Metrics>)>,
}

impl DrainThenStop {
    /// Drains every proxy of this process for `drain_period` on SIGTERM, then
    /// waits up to `shutdown_timeout` for requests in flight.
    pub fn new(
        lifecycles: Vec<Arc<Lifecycle>>,
        drain_period: Duration,
        shutdown_timeout: Duration,
    ) -> Self {
        DrainThenStop {
            lifecycles,
            drain_period,
            shutdown_timeout,
            upgrade: None,
        }
    }

    /// SIGUSR2 starts a successor and SIGQUIT hands over to one, through `upgrade`.
    pub fn with_upgrade(mut self, upgrade: Upgrade, metrics: Arc<Metrics>) -> Self {
        // At zero from the start, so that a first failure is an increase.
        for result in ["ok", "error"] {
            metrics.upgrades.with_label_values(&[result]);
        }
        self.upgrade = Some((upgrade, metrics));
        self
    }

    /// Responses close their connections; once the successor has the
    /// sockets and Pingora has stopped accepting, the process exits when
    /// nothing is in flight: with status 0, or 1 if the sockets never
    /// reached the successor (so that a supervisor starts a new process:
    /// Pingora stops accepting either way).
    fn hand_over(&self, successor: Option<Successor>) -> ShutdownSignal {
        for l in &self.lifecycles {
            l.hand_over();
        }
        let Some((upgrade, metrics)) = self.upgrade.clone() else {
            return ShutdownSignal::GracefulTerminate;
        };
        let before = async move {
            // Pingora's sender retries for 5 s, and a successor waits about as long.
            let code = match upgrade
                .handed_over(successor.as_ref(), HAND_OVER_LIMIT)
                .await
            {
                Ok(()) => {
                    metrics.upgrades.with_label_values(&["ok"]).inc();
                    tracing::info!("graceful upgrade: the new process has the listening sockets; this one stops accepting in 5 s and exits once idle");
                    0
                }
                Err(why) => {
                    metrics.upgrades.with_label_values(&["error"]).inc();
                    tracing::error!(error = %why, "graceful upgrade failed after the listening sockets were offered: this process stops accepting in 5 s (Pingora's hand-over cannot be undone) and exits with status 1 for its supervisor to restart it");
                    1
                }
            };
            // Pingora keeps accepting for its CLOSE_TIMEOUT after sending the
            // sockets; only then can "nothing in flight" mean done.
            tokio::time::sleep(PINGORA_CLOSE_TIMEOUT + Duration::from_millis(200)).await;
            // A successor that took the sockets and then died leaves nobody.
            let code = match successor {
                Some(s) if code == 0 && !s.alive() => {
                    metrics.upgrades.with_label_values(&["error"]).inc();
                    tracing::error!(pid = s.pid, "graceful upgrade failed: the new process exited after taking the listening sockets; exiting with status 1 for the supervisor to restart edge-router");
                    1
                }
                _ => code,
            };
            EXIT_CODE.store(code, Ordering::SeqCst);
            code
        };
        spawn_exit_when_idle(
            self.lifecycles.clone(),
            before,
            HAND_OVER_LIMIT + PINGORA_CLOSE_TIMEOUT + self.shutdown_timeout,
            // systemd's stop signals every process of the unit: this one
            // finishes what it has (SIGINT stops it at once).
            false,
        );
        ShutdownSignal::GracefulUpgrade
    }
}

/// How long the sockets may take to reach the successor: Pingora's sender
/// gives up after 5 attempts a second apart, a successor after about as long.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(10);

/// The status the process ends with when Pingora's `run` returns before our
/// shutdown watcher exits (1: a hand-over failed).
static EXIT_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The exit status decided during shutdown (0 unless something failed).
pub fn exit_code() -> u8 {
    u8::try_from(EXIT_CODE.load(Ordering::SeqCst)).unwrap_or(1)
}

/// Pingora's wait between sending the listening sockets and closing its own
/// (`CLOSE_TIMEOUT` in pingora-core's `server`, not configurable).
const PINGORA_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[async_trait]
impl ShutdownSignalWatch for DrainThenStop {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers; the process will not stop on SIGTERM");
                return std::future::pending().await;
            }
        };
        let mut quit = match signal(SignalKind::quit()) {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGQUIT; it will end the process at once");
                None
            }
        };
        let mut requests = crate::signals::subscribe();
        // A successor being started: signals are still heard meanwhile (a
        // SIGTERM drops it, which kills the new process).
        let mut starting: Option<
            std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Successor, UpgradeError>> + Send + '_>,
            >,
        > = None;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    // Dropping it kills a successor still starting.
                    drop(starting.take());
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    return ShutdownSignal::FastShutdown;
                }
                Some(()) = async { quit.as_mut()?.recv().await } => match &self.upgrade {
                    Some((u, _)) if starting.is_none() && u.someone_waits() => {
                        tracing::info!(sock = %u.sock().display(), "SIGQUIT: handing the listening sockets to the process waiting for them, then finishing requests in flight");
                        return self.hand_over(None);
                    }
                    _ if starting.is_some() => {
                        tracing::warn!("SIGQUIT ignored: a graceful upgrade is starting (SIGTERM stops it and drains)");
                    }
                    _ => {
                        tracing::info!("SIGQUIT and no new process waits for the listening sockets: stopping as on SIGTERM");
                        break;
                    }
                },
                r = requests.recv() => {
                    if !matches!(r, Ok(crate::signals::Request::Upgrade)) {
                        continue;
                    }
                    let Some((u, _)) = &self.upgrade else {
                        tracing::warn!("SIGUSR2 ignored: a graceful upgrade needs server.upgrade_sock");
                        continue;
                    };
                    if starting.is_some() {
                        tracing::warn!("SIGUSR2 ignored: a graceful upgrade is already starting");
                        continue;
                    }
                    starting = Some(Box::pin(u.start_successor()));
                }
                done = async { Some(starting.as_mut()?.await) }, if starting.is_some() => {
                    starting = None;
                    let Some((_, metrics)) = &self.upgrade else { continue };
                    match done {
                        Some(Ok(successor)) => {
                            tracing::info!(pid = successor.pid, "graceful upgrade: handing the listening sockets to the new process, then finishing requests in flight");
                            return self.hand_over(Some(successor));
                        }
                        Some(Err(e)) => {
                            metrics.upgrades.with_label_values(&["error"]).inc();
                            tracing::error!(error = %e, "graceful upgrade failed: this process keeps serving");
                        }
                        None => {}
                    }
                }
            }
        }
        for l in &self.lifecycles {
            l.terminate();
        }
        tracing::info!(drain_period = ?self.drain_period, "SIGTERM: health path now answers 503 and responses carry Connection: close; serving until the drain period ends (send SIGTERM or SIGINT again to stop now)");
        tokio::select! {
            _ = tokio::time::sleep(self.drain_period) => {}
            _ = term.recv() => {
                tracing::info!("second SIGTERM: stopping now");
                return ShutdownSignal::FastShutdown;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT while draining: stopping now");
                return ShutdownSignal::FastShutdown;
            }
        }
        let in_flight: usize = self.lifecycles.iter().map(|l| l.in_flight()).sum();
        tracing::info!(
            in_flight,
            shutdown_timeout = ?self.shutdown_timeout,
            "drain period over: listeners close; waiting for requests in flight"
        );
        // Let Pingora close the listeners and wake idle keep-alive connections first.
        spawn_exit_when_idle(
            self.lifecycles.clone(),
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                0
            },
            self.shutdown_timeout,
            true,
        );
        ShutdownSignal::GracefulTerminate
    }
}

/// Pingora waits its whole grace period (set to `shutdown_timeout`) after a
/// graceful stop; this thread ends the process as soon as no request is in
/// flight, or at once on another SIGTERM or SIGINT, since Pingora no longer
/// listens for signals then.
/// `term_exits`: a SIGTERM ends it at once (else only SIGINT does).
fn spawn_exit_when_idle<F>(
    lifecycles: Vec<Arc<Lifecycle>>,
    before: F,
    limit: Duration,
    term_exits: bool,
) where
    F: std::future::Future<Output = i32> + Send + 'static,
{
    let spawned = std::thread::Builder::new()
        .name("edge-shutdown".to_string())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "no runtime for the shutdown watcher; Pingora's grace period applies");
                    return;
                }
            };
            let code = rt.block_on(async move {
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return None;
                };
                let start = Instant::now();
                tokio::pin!(before);
                let code = loop {
                    tokio::select! {
                        code = &mut before => break code,
                        _ = term.recv() => {
                            if term_exits {
                                tracing::info!("signal during shutdown: exiting now");
                                return Some(1);
                            }
                            tracing::info!("SIGTERM while handing over: finishing requests in flight (SIGINT stops now)");
                        }
                        _ = int.recv() => { tracing::info!("signal during shutdown: exiting now"); return Some(1); }
                    }
                };
                loop {
                    let left: usize = lifecycles.iter().map(|l| l.in_flight()).sum();
                    if left == 0 {
                        tracing::info!(waited = ?start.elapsed(), "no request in flight: exiting");
                        return Some(code);
                    }
                    if start.elapsed() >= limit {
                        tracing::warn!(in_flight = left, "shutdown_timeout reached: exiting with requests in flight");
                        return Some(code);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = term.recv(), if term_exits => { tracing::info!("signal during shutdown: exiting now"); return Some(1); }
                        _ = int.recv() => { tracing::info!("signal during shutdown: exiting now"); return Some(1); }
                    }
                }
            });
            if let Some(code) = code {
                crate::telemetry::flush();
                std::process::exit(code);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the shutdown watcher; Pingora's grace period applies");
    }
}

//! Draining and shutdown. SIGTERM turns the health path to 503 at once (so
//! Global Accelerator moves new flows away), keeps serving for
//! `drain_period`, then asks Pingora for a graceful stop; a second SIGTERM or
//! a SIGINT stops at once. `POST /drain` on the admin listener drains without
//! exiting (take a region out of rotation), `DELETE /drain` undoes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::metrics::Metrics;

/// Whether one proxy is draining.
pub struct Lifecycle {
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Lifecycle {
    /// Not draining.
    pub fn new(metrics: Arc<Metrics>) -> Lifecycle {
        Lifecycle {
            draining: AtomicBool::new(false),
            metrics,
        }
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Start (true) or stop (false) draining.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
        self.metrics.draining.set(i64::from(draining));
    }
}

/// Our replacement for Pingora's signal watcher: drain first, then stop.
pub struct DrainThenStop {
    lifecycles: Vec<Arc<Lifecycle>>,
    drain_period: Duration,
}

impl DrainThenStop {
    /// Drains every proxy of this process for `drain_period` on SIGTERM.
    pub fn new(lifecycles: Vec<Arc<Lifecycle>>, drain_period: Duration) -> Self {
        DrainThenStop {
            lifecycles,
            drain_period,
        }
    }
}

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
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                return ShutdownSignal::FastShutdown;
            }
        }
        for l in &self.lifecycles {
            l.set_draining(true);
        }
        tracing::info!(drain_period = ?self.drain_period, "SIGTERM: health path now answers 503; serving until the drain period ends (send SIGTERM or SIGINT again to stop now)");
        tokio::select! {
            _ = tokio::time::sleep(self.drain_period) => {
                tracing::info!("drain period over: stopping gracefully");
                ShutdownSignal::GracefulTerminate
            }
            _ = term.recv() => {
                tracing::info!("second SIGTERM: stopping now");
                ShutdownSignal::FastShutdown
            }
            _ = int.recv() => {
                tracing::info!("SIGINT while draining: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

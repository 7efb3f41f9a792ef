//! The load engine: workers over their own connections, either open-loop at
//! a constant rate or closed-loop as fast as responses come back.
//!
//! Open loop corrects for coordinated omission as wrk2 does: request *i* is
//! due at `start + i / rate`, whichever worker takes it, and its latency is
//! measured from that intended time. A server that stalls therefore shows the
//! queueing it caused, instead of the generator politely waiting for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use tokio::time::Instant;

use crate::client::{connect, Conn, ConnectOptions, ErrorKind};
use crate::target::Target;

/// Load shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Constant rate, requests per second, latency from the intended send time.
    Open {
        /// Requests per second.
        rate: f64,
    },
    /// Each connection sends its next request when the last one completes.
    Closed,
}

/// What to run.
#[derive(Clone)]
pub struct LoadSpec {
    /// URLs, used round-robin.
    pub targets: Vec<Target>,
    /// Method.
    pub method: Method,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body.
    pub body: Bytes,
    /// Open or closed loop.
    pub mode: Mode,
    /// Concurrent connections (HTTP/1.1) or streams (HTTP/2).
    pub connections: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How connections are made.
    pub connect: ConnectOptions,
}

/// Latency histogram bounds: 1 µs to 1 h, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// What a run (or a worker) saw.
#[derive(Clone)]
pub struct Stats {
    /// Latency of every measured response, in µs.
    pub latency: Histogram<u64>,
    /// Responses by status code.
    pub status: BTreeMap<u16, u64>,
    /// Failed requests by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Response body bytes.
    pub bytes: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: new_histogram(),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            bytes: 0,
        }
    }
}

impl Stats {
    /// Add another's counts.
    pub fn merge(&mut self, other: &Stats) {
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(*k).or_default() += v;
        }
        self.bytes += other.bytes;
    }

    /// Responses received.
    pub fn responses(&self) -> u64 {
        self.status.values().sum()
    }

    /// Requests that failed without a response.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A finished run.
pub struct RunResult {
    /// Everything measured.
    pub stats: Stats,
    /// The measured window.
    pub window: Duration,
    /// Open loop: requests due in the window that were never sent because every connection was busy.
    pub unsent: u64,
}

struct Shared {
    next_slot: AtomicU64,
    next_target: AtomicUsize,
    completed: AtomicU64,
}

/// Progress callback: completed requests so far (warm-up included).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Run `spec` on the current tokio runtime.
pub async fn run(spec: Arc<LoadSpec>, progress: Option<Progress>) -> RunResult {
    let shared = Arc::new(Shared {
        next_slot: AtomicU64::new(0),
        next_target: AtomicUsize::new(0),
        completed: AtomicU64::new(0),
    });
    let start = Instant::now();
    let ticker = progress.map(|report| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                report(shared.completed.load(Ordering::Relaxed));
            }
        })
    });
    let workers: Vec<_> = (0..spec.connections.max(1))
        .map(|_| tokio::spawn(worker(spec.clone(), shared.clone(), start)))
        .collect();
    let mut stats = Stats::default();
    for w in workers {
        if let Ok(s) = w.await {
            stats.merge(&s);
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let unsent = match spec.mode {
        Mode::Open { rate } => {
            let due = (spec.duration.as_secs_f64() * rate).floor() as u64;
            due.saturating_sub(stats.responses() + stats.failed())
        }
        Mode::Closed => 0,
    };
    RunResult {
        stats,
        window: spec.duration,
        unsent,
    }
}

/// Sleep until `t` precisely: tokio timers have millisecond resolution, so
/// the last stretch yields instead (it would otherwise add up to 1 ms of
/// generator error to every latency).
async fn wait_until(t: Instant) {
    let now = Instant::now();
    if t > now + Duration::from_micros(1500) {
        tokio::time::sleep_until(t - Duration::from_millis(1)).await;
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

async fn worker(spec: Arc<LoadSpec>, shared: Arc<Shared>, start: Instant) -> Stats {
    let mut stats = Stats::default();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut conns: Vec<Option<Conn>> = spec.targets.iter().map(|_| None).collect();
    let interval = match spec.mode {
        Mode::Open { rate } => Some(Duration::from_secs_f64(1.0 / rate.max(1e-9))),
        Mode::Closed => None,
    };
    loop {
        let intended = match interval {
            Some(iv) => {
                let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed);
                let due = start + iv.mul_f64(slot as f64);
                if due >= end {
                    break;
                }
                wait_until(due).await;
                // Behind schedule past the end (a stalled server): stop, and
                // let `unsent` count what was due but never sent.
                if Instant::now() >= end {
                    break;
                }
                due
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        let measured = intended >= measure_from;
        let ti = shared.next_target.fetch_add(1, Ordering::Relaxed) % spec.targets.len();
        let target = &spec.targets[ti];
        let outcome = send_one(&spec, target, &mut conns[ti]).await;
        shared.completed.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok((status, bytes)) => {
                if measured {
                    let us = intended.elapsed().as_micros().max(1) as u64;
                    stats.latency.saturating_record(us);
                    *stats.status.entry(status).or_default() += 1;
                    stats.bytes += bytes;
                }
            }
            Err(kind) => {
                if measured {
                    *stats.errors.entry(kind).or_default() += 1;
                }
                if kind == ErrorKind::Connect && interval.is_none() {
                    // Closed loop against a dead server must not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    stats
}

async fn send_one(
    spec: &LoadSpec,
    target: &Target,
    conn: &mut Option<Conn>,
) -> Result<(u16, u64), ErrorKind> {
    let fut = async {
        let reusable = match conn.as_mut() {
            Some(c) => c.ready().await,
            None => false,
        };
        if !reusable {
            *conn = Some(connect(target, &spec.connect).await?);
        }
        let c = conn.as_mut().ok_or(ErrorKind::Connect)?;
        // HTTP/2 takes the authority from the URI; HTTP/1.1 from the Host header.
        let uri = if spec.connect.http2 {
            target.url.clone()
        } else {
            target.path_and_query.clone()
        };
        let mut builder = Request::builder().method(spec.method.clone()).uri(uri);
        if !spec.connect.http2 {
            builder = builder.header(http::header::HOST, target.authority.as_str());
        }
        for (k, v) in &spec.headers {
            builder = builder.header(k, v);
        }
        let req = builder
            .body(Full::new(spec.body.clone()))
            .map_err(|_| ErrorKind::Other)?;
        c.send(req).await
    };
    let result = match tokio::time::timeout(spec.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ErrorKind::Timeout),
    };
    if result.is_err() {
        // A failed connection is not reused; the next request reconnects.
        *conn = None;
    }
    result
}

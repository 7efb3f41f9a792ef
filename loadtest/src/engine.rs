//! The load engine: workers over their own connections, either open-loop at
//! a constant rate or closed-loop as fast as responses come back.
//!
//! Open loop corrects for coordinated omission as wrk2 does: request *i* is
//! due at `start + i / rate`, whichever worker takes it. When it comes due
//! while every connection is still busy with earlier requests, its latency is
//! measured from that intended time: a server that stalls therefore shows the
//! queueing it caused, instead of the generator politely waiting for it.
//! When a worker was idle and merely woke late, the lateness is the
//! generator's, not the server's, and latency is measured from the actual
//! send. Without that distinction a 0.06 ms service showed a 0.7 ms p50 at
//! 200 req/s.
//!
//! Pacing: tokio timers have 1 ms resolution, so workers sleeping on them
//! wake in bursts (at 4,000 req/s, four requests at once each millisecond),
//! and the burst queues at the server: a generator artefact that raised p50
//! by a third against oha. A pacer thread on the OS's high-resolution sleep
//! releases one permit per due request instead; workers wait on the permits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use tokio::sync::Semaphore;
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
    /// A connection is replaced after this many requests (None: kept).
    pub requests_per_connection: Option<u64>,
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
    /// Open loop: one permit per request that has come due.
    due: Semaphore,
}

/// Release one permit per slot as it comes due, until `end`; then close, so
/// idle workers stop. Runs on its own OS thread: `std::thread::sleep` has
/// ~0.1 ms precision where tokio's timer has 1 ms.
fn pace(
    shared: Arc<Shared>,
    start: std::time::Instant,
    end: std::time::Instant,
    interval: Duration,
    stop: Arc<AtomicBool>,
) {
    let mut released = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = std::time::Instant::now();
        if now >= end {
            break;
        }
        // Every slot due by now (more than one if this thread was late).
        let due_by_now =
            (now.duration_since(start).as_secs_f64() / interval.as_secs_f64()).floor() as u64 + 1;
        if due_by_now > released {
            shared.due.add_permits((due_by_now - released) as usize);
            released = due_by_now;
        }
        let next = start + interval.mul_f64(released as f64);
        if next > now {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
        }
    }
    shared.due.close();
}

/// Progress callback: completed requests so far (warm-up included).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Run `spec` on the current tokio runtime.
pub async fn run(spec: Arc<LoadSpec>, progress: Option<Progress>) -> RunResult {
    let shared = Arc::new(Shared {
        next_slot: AtomicU64::new(0),
        next_target: AtomicUsize::new(0),
        completed: AtomicU64::new(0),
        due: Semaphore::new(0),
    });
    let start = Instant::now();
    let stop_pacer = Arc::new(AtomicBool::new(false));
    let pacer = match spec.mode {
        Mode::Open { rate } => {
            let (shared, stop) = (shared.clone(), stop_pacer.clone());
            let (s, e) = (
                start.into_std(),
                (start + spec.warmup + spec.duration).into_std(),
            );
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
            Some(std::thread::spawn(move || {
                pace(shared, s, e, interval, stop)
            }))
        }
        Mode::Closed => None,
    };
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
    stop_pacer.store(true, Ordering::Relaxed);
    if let Some(p) = pacer {
        let _ = p.join();
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

async fn worker(spec: Arc<LoadSpec>, shared: Arc<Shared>, start: Instant) -> Stats {
    let mut stats = Stats::default();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let mut conns: Vec<Option<Conn>> = spec.targets.iter().map(|_| None).collect();
    let mut uses: Vec<u64> = vec![0; spec.targets.len()];
    let interval = match spec.mode {
        Mode::Open { rate } => Some(Duration::from_secs_f64(1.0 / rate.max(1e-9))),
        Mode::Closed => None,
    };
    loop {
        // `Some(due)` when the request was already overdue (server-caused
        // delay, measured from the intended time); None: from the send.
        let overdue_since = match interval {
            Some(iv) => {
                let free_at = Instant::now();
                match shared.due.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break, // the pacer closed: the run is over
                }
                let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed);
                let due = start + iv.mul_f64(slot as f64);
                // Behind schedule past the end (a stalled server): stop, and
                // let `unsent` count what was due but never sent.
                if due >= end || Instant::now() >= end {
                    break;
                }
                // Already overdue when this worker became free: every
                // connection was busy, so the server caused the delay.
                (free_at > due).then_some(due)
            }
            None => {
                if Instant::now() >= end {
                    break;
                }
                None
            }
        };
        let ti = shared.next_target.fetch_add(1, Ordering::Relaxed) % spec.targets.len();
        let target = &spec.targets[ti];
        let outcome = send_one(&spec, target, &mut conns[ti]).await;
        shared.completed.fetch_add(1, Ordering::Relaxed);
        if let Some(limit) = spec.requests_per_connection {
            // A fresh connection (and handshake) every `limit` requests, as
            // clients that come and go make.
            uses[ti] = if conns[ti].is_some() { uses[ti] + 1 } else { 0 };
            if uses[ti] >= limit {
                conns[ti] = None;
                uses[ti] = 0;
            }
        }
        match outcome {
            Ok(done) => {
                let began = overdue_since.unwrap_or(done.sent_at);
                if began >= measure_from {
                    let us = done
                        .finished_at
                        .saturating_duration_since(began)
                        .as_micros()
                        .max(1) as u64;
                    stats.latency.saturating_record(us);
                    *stats.status.entry(done.status).or_default() += 1;
                    stats.bytes += done.bytes;
                }
            }
            Err(kind) => {
                if overdue_since.unwrap_or_else(Instant::now) >= measure_from {
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

/// One completed exchange.
struct Exchange {
    status: u16,
    bytes: u64,
    /// Just before waiting for the connection and sending.
    sent_at: Instant,
    /// When the whole response had arrived.
    finished_at: Instant,
}

async fn send_one(
    spec: &LoadSpec,
    target: &Target,
    conn: &mut Option<Conn>,
) -> Result<Exchange, ErrorKind> {
    // HTTP/2 takes the authority from the URI; HTTP/1.1 from the Host header.
    let mut builder = Request::builder().method(spec.method.clone());
    if spec.connect.http2 {
        builder = builder.uri(target.absolute_form.clone());
    } else {
        builder = builder
            .uri(target.origin_form.clone())
            .header(http::header::HOST, target.authority.as_str());
    }
    for (k, v) in &spec.headers {
        builder = builder.header(k, v);
    }
    let req = builder
        .body(Full::new(spec.body.clone()))
        .map_err(|_| ErrorKind::Other)?;
    // The clock starts before waiting for the connection to be ready (or
    // reconnecting after the server closed it): the client pays for both,
    // and oha measures the same span.
    let sent_at = Instant::now();
    let fut = async {
        let reusable = match conn.as_mut() {
            Some(c) => c.ready().await,
            None => false,
        };
        if !reusable {
            *conn = Some(connect(target, &spec.connect).await?);
        }
        let c = conn.as_mut().ok_or(ErrorKind::Connect)?;
        let (status, bytes) = c.send(req).await?;
        Ok(Exchange {
            status,
            bytes,
            sent_at,
            finished_at: Instant::now(),
        })
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

//! Turning a run into numbers people read: a text summary, a JSON document
//! with every field, and the HdrHistogram percentile distribution (`.hgrm`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::ErrorKind;
use crate::engine::{Mode, RunResult};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p99_9: f64,
    /// 99.99th.
    pub p99_99: f64,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                p99_99: 0.0,
                max: 0.0,
                min: 0.0,
                mean: 0.0,
            };
        }
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            p99_99: ms(h.value_at_quantile(0.9999)),
            max: ms(h.max()),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
        }
    }

    /// (label, value) pairs in report order.
    pub fn rows(&self) -> [(&'static str, f64); 6] {
        [
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p99.9", self.p99_9),
            ("p99.99", self.p99_99),
            ("max", self.max),
        ]
    }
}

/// Failed requests by kind; every kind present, zero or not.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Errors {
    /// Could not connect.
    pub connect: u64,
    /// Timed out.
    pub timeout: u64,
    /// Closed or reset mid-request.
    pub reset: u64,
    /// Anything else.
    pub other: u64,
}

impl Errors {
    fn from_map(m: &BTreeMap<ErrorKind, u64>) -> Errors {
        let get = |k| m.get(&k).copied().unwrap_or(0);
        Errors {
            connect: get(ErrorKind::Connect),
            timeout: get(ErrorKind::Timeout),
            reset: get(ErrorKind::Reset),
            other: get(ErrorKind::Other),
        }
    }

    fn total(&self) -> u64 {
        self.connect + self.timeout + self.reset + self.other
    }
}

/// Everything one run measured, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// URLs loaded (round-robin).
    pub urls: Vec<String>,
    /// `open-loop` or `closed-loop`.
    pub mode: &'static str,
    /// Target rate (open loop).
    pub rate: Option<f64>,
    /// Connections (or HTTP/2 streams).
    pub connections: usize,
    /// HTTP/2?
    pub http2: bool,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warm-up seconds (not measured).
    pub warmup_s: f64,
    /// Requests in the measured window: responses + errors.
    pub requests: u64,
    /// Responses received.
    pub responses: u64,
    /// Responses per second over the window.
    pub achieved_rps: f64,
    /// Open loop: requests due in the window but never sent (all connections busy).
    pub unsent: u64,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// Failures by kind.
    pub errors: Errors,
    /// Latency of responses, ms (open loop: from the intended send time).
    pub latency_ms: Percentiles,
    /// Response body bytes received.
    pub bytes_received: u64,
}

/// Build the report of a run.
pub fn report(
    result: &RunResult,
    urls: Vec<String>,
    mode: Mode,
    connections: usize,
    http2: bool,
    warmup_s: f64,
) -> Report {
    let s = &result.stats;
    let errors = Errors::from_map(&s.errors);
    let responses = s.responses();
    let window = result.window.as_secs_f64();
    Report {
        urls,
        mode: match mode {
            Mode::Open { .. } => "open-loop",
            Mode::Closed => "closed-loop",
        },
        rate: match mode {
            Mode::Open { rate } => Some(rate),
            Mode::Closed => None,
        },
        connections,
        http2,
        duration_s: window,
        warmup_s,
        requests: responses + errors.total(),
        responses,
        achieved_rps: if window > 0.0 {
            responses as f64 / window
        } else {
            0.0
        },
        unsent: result.unsent,
        status: s.status.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        errors,
        latency_ms: Percentiles::of(&s.latency),
        bytes_received: s.bytes,
    }
}

/// The human summary.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let mode = match r.rate {
        Some(rate) => format!("open-loop at {rate} req/s (latency from intended send time)"),
        None => "closed-loop (max throughput)".to_string(),
    };
    let _ = writeln!(out, "target      {}", r.urls.join(", "));
    let _ = writeln!(
        out,
        "mode        {mode}, {} connections{}, {}s measured after {}s warm-up",
        r.connections,
        if r.http2 { " (HTTP/2)" } else { "" },
        r.duration_s,
        r.warmup_s
    );
    let _ = writeln!(
        out,
        "requests    {} ({:.1} responses/s)",
        r.requests, r.achieved_rps
    );
    let status: Vec<String> = r.status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let _ = writeln!(
        out,
        "status      {}",
        if status.is_empty() {
            "none".into()
        } else {
            status.join(", ")
        }
    );
    let e = &r.errors;
    let _ = writeln!(
        out,
        "errors      connect {}, timeout {}, reset {}, other {}",
        e.connect, e.timeout, e.reset, e.other
    );
    if r.unsent > 0 {
        let _ = writeln!(
            out,
            "unsent      {} (due but every connection was busy: add --connections)",
            r.unsent
        );
    }
    let _ = write!(out, "latency ms ");
    for (label, v) in r.latency_ms.rows() {
        let _ = write!(out, " {label} {v:.3} ");
    }
    let _ = writeln!(out);
    out
}

/// The percentile distribution in HdrHistogram's `.hgrm` text format (values in ms).
pub fn render_hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            "inf".into()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {:>14}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
            inv
        );
    }
    let p = Percentiles::of(h);
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]",
        p.mean,
        h.stdev() / 1000.0,
        p.max,
        h.len()
    );
    out
}

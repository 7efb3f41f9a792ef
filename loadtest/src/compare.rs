//! A/B comparison in alternating rounds (A B A B …) at the same load, so
//! that a noisy machine disturbs both sides alike; ratios B/A per round and
//! overall (over the merged histograms).

use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::{run, LoadSpec, RunResult, Stats};
use crate::report::Percentiles;

/// Both sides of one round.
pub struct Round {
    /// A's run.
    pub a: RunResult,
    /// B's run.
    pub b: RunResult,
}

/// All rounds and the merged totals.
pub struct Comparison {
    /// In order.
    pub rounds: Vec<Round>,
    /// A over all rounds.
    pub a: Stats,
    /// B over all rounds.
    pub b: Stats,
}

/// Run `rounds` rounds of A then B; `on_round` sees each finished round.
pub async fn compare(
    a: Arc<LoadSpec>,
    b: Arc<LoadSpec>,
    rounds: usize,
    mut on_round: impl FnMut(usize, &Round),
) -> Comparison {
    let mut out = Comparison {
        rounds: Vec::new(),
        a: Stats::default(),
        b: Stats::default(),
    };
    for i in 0..rounds.max(1) {
        let ra = run(a.clone(), None).await;
        let rb = run(b.clone(), None).await;
        out.a.merge(&ra.stats);
        out.b.merge(&rb.stats);
        let round = Round { a: ra, b: rb };
        on_round(i + 1, &round);
        out.rounds.push(round);
    }
    out
}

/// B/A for every percentile (NaN-free: 0 when A is 0).
pub fn ratio(a: &Percentiles, b: &Percentiles) -> Percentiles {
    let r = |x: f64, y: f64| if x > 0.0 { y / x } else { 0.0 };
    Percentiles {
        p50: r(a.p50, b.p50),
        p90: r(a.p90, b.p90),
        p99: r(a.p99, b.p99),
        p99_9: r(a.p99_9, b.p99_9),
        p99_99: r(a.p99_99, b.p99_99),
        max: r(a.max, b.max),
        min: r(a.min, b.min),
        mean: r(a.mean, b.mean),
    }
}

fn rps(r: &RunResult) -> f64 {
    r.stats.responses() as f64 / r.window.as_secs_f64().max(1e-9)
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<6} {:<5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "round",
        "side",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "p99.99",
        "max ms",
        "rps",
        "errors"
    )
}

fn row(
    round: &str,
    side: &str,
    p: &Percentiles,
    rps: Option<f64>,
    errors: Option<u64>,
    ratio: bool,
) -> String {
    let mut s = format!("{round:<6} {side:<5}");
    for (_, v) in p.rows() {
        if ratio {
            let _ = write!(s, " {:>8.2}x", v);
        } else {
            let _ = write!(s, " {:>9.3}", v);
        }
    }
    let _ = write!(
        s,
        " {:>10} {:>7}",
        rps.map(|r| format!("{r:.0}")).unwrap_or_default(),
        errors.map(|e| e.to_string()).unwrap_or_default()
    );
    s
}

/// The three lines of one round: A, B and B/A.
pub fn render_round(i: usize, round: &Round) -> String {
    let (pa, pb) = (
        Percentiles::of(&round.a.stats.latency),
        Percentiles::of(&round.b.stats.latency),
    );
    let n = i.to_string();
    [
        row(
            &n,
            "A",
            &pa,
            Some(rps(&round.a)),
            Some(round.a.stats.failed()),
            false,
        ),
        row(
            &n,
            "B",
            &pb,
            Some(rps(&round.b)),
            Some(round.b.stats.failed()),
            false,
        ),
        row(&n, "B/A", &ratio(&pa, &pb), None, None, true),
    ]
    .join("\n")
}

/// The overall lines.
pub fn render_overall(c: &Comparison) -> String {
    let (pa, pb) = (Percentiles::of(&c.a.latency), Percentiles::of(&c.b.latency));
    [
        row("all", "A", &pa, None, Some(c.a.failed()), false),
        row("all", "B", &pb, None, Some(c.b.failed()), false),
        row("all", "B/A", &ratio(&pa, &pb), None, None, true),
    ]
    .join("\n")
}

/// `--json` of a comparison.
#[derive(Serialize)]
pub struct ComparisonJson {
    /// A's URLs.
    pub a: Vec<String>,
    /// B's URLs.
    pub b: Vec<String>,
    /// Rate of every run.
    pub rate: f64,
    /// Per round: A, B, B/A.
    pub rounds: Vec<[Percentiles; 3]>,
    /// Over all rounds: A, B, B/A.
    pub overall: [Percentiles; 3],
}

impl ComparisonJson {
    /// Build from a finished comparison.
    pub fn new(c: &Comparison, a: Vec<String>, b: Vec<String>, rate: f64) -> Self {
        let triple = |x: &Stats, y: &Stats| {
            let (pa, pb) = (Percentiles::of(&x.latency), Percentiles::of(&y.latency));
            [pa, pb, ratio(&pa, &pb)]
        };
        ComparisonJson {
            a,
            b,
            rate,
            rounds: c
                .rounds
                .iter()
                .map(|r| triple(&r.a.stats, &r.b.stats))
                .collect(),
            overall: triple(&c.a, &c.b),
        }
    }
}

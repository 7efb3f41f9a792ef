//! The `edge-loadtest` command line: `run`, `compare`, `origin`.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use edge_loadtest::client::{tls_config, ConnectOptions};
use edge_loadtest::compare::{compare, header, render_overall, render_round, ComparisonJson};
use edge_loadtest::engine::{run, LoadSpec, Mode, Progress};
use edge_loadtest::origin::{Origin, OriginIdentity};
use edge_loadtest::plot::{latency_by_percentile, Curve};
use edge_loadtest::report::{render_hgrm, render_text, report};
use edge_loadtest::target::Target;
use http::{HeaderName, HeaderValue, Method};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "edge-loadtest",
    version,
    about = "Latency benchmarking for edge-router (and anything HTTP)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load one or more URLs (round-robin). With --rate: open loop, latency
    /// corrected for coordinated omission; without: closed loop, max throughput.
    Run {
        /// URLs to load.
        #[arg(required = true)]
        urls: Vec<String>,
        #[command(flatten)]
        load: LoadArgs,
        /// Requests per second (open loop). Omit for closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Write the full report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the percentile distribution (HdrHistogram .hgrm format).
        #[arg(long)]
        hgrm: Option<PathBuf>,
    },
    /// Compare two targets in alternating rounds (A B A B …) at the same rate.
    Compare {
        /// Baseline URL.
        #[arg(long)]
        a: String,
        /// Candidate URL.
        #[arg(long)]
        b: String,
        #[command(flatten)]
        load: LoadArgs,
        /// Requests per second for every run.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Rounds (each runs A, then B).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Draw latency-by-percentile curves of every run (SVG).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Write the comparison as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run the test origin: responses shaped by query parameters
    /// (size, delay, status, cache-control, region, etag, echo).
    Origin {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Name reported in x-origin-name.
        #[arg(long, default_value = "origin")]
        name: String,
        /// Region reported in x-origin-region.
        #[arg(long, default_value = "local")]
        region: String,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Concurrent connections, one request in flight on each (HTTP/2 too).
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// Measured time.
    #[arg(short, long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Method.
    #[arg(short, long, default_value = "GET")]
    method: String,
    /// Extra header, `Name: value` (repeatable). A `Host` replaces the
    /// URL's (and HTTP/2's `:authority`); the connection still follows the URL.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// `HOST:PORT:ADDR`: connect to ADDR for the URL's HOST:PORT instead of
    /// resolving it (curl's `--resolve`; SNI and Host keep HOST). Repeatable.
    #[arg(long)]
    resolve: Vec<String>,
    /// Request body; `@FILE` reads a file.
    #[arg(long)]
    body: Option<String>,
    /// Speak HTTP/2 (h2c on http://, ALPN on https://).
    #[arg(long)]
    http2: bool,
    /// Accept any TLS certificate (dev certificates).
    #[arg(long)]
    insecure: bool,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Close each connection after this many requests and open a new one
    /// (1: a new connection, and TLS handshake, per request). Default: keep-alive.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    conn_requests: Option<u64>,
    /// Never resume a TLS session: every new connection is a full handshake.
    #[arg(long)]
    no_tls_resume: bool,
}

impl LoadArgs {
    fn spec(&self, urls: &[String], mode: Mode) -> anyhow::Result<LoadSpec> {
        let resolve = self
            .resolve
            .iter()
            .map(|r| r.parse::<edge_loadtest::target::Resolve>())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut targets = urls
            .iter()
            .map(|u| Target::parse_with(u, &resolve))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let method: Method = self
            .method
            .parse()
            .with_context(|| format!("bad method `{}`", self.method))?;
        let mut headers = Vec::new();
        for h in &self.headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("header `{h}` is not `Name: value`"))?;
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .with_context(|| format!("bad header name in `{h}`"))?;
            if name == http::header::HOST {
                // One Host, the one asked for (a second makes servers answer 400).
                for t in &mut targets {
                    t.set_host(v.trim())?;
                }
                continue;
            }
            headers.push((
                name,
                HeaderValue::from_str(v.trim())
                    .with_context(|| format!("bad header value in `{h}`"))?,
            ));
        }
        let body = match &self.body {
            Some(b) if b.starts_with('@') => {
                Bytes::from(std::fs::read(&b[1..]).with_context(|| format!("reading {}", &b[1..]))?)
            }
            Some(b) => Bytes::from(b.clone()),
            None => Bytes::new(),
        };
        if let Mode::Open { rate } = mode {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number");
            }
        }
        if self.duration.is_zero() {
            bail!("--duration must be more than 0s");
        }
        Ok(LoadSpec {
            targets,
            method,
            headers,
            body,
            mode,
            connections: self.connections.max(1),
            duration: self.duration,
            warmup: self.warmup,
            timeout: self.timeout,
            requests_per_connection: self.conn_requests,
            connect: ConnectOptions {
                http2: self.http2,
                tls: tls_config(self.insecure, self.http2, !self.no_tls_resume)?,
            },
        })
    }

    fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        let rt = if self.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.threads)
                .enable_all()
                .build()
        };
        rt.context("starting the tokio runtime")
    }
}

/// A progress bar on a terminal, nothing when piped.
fn progress(total: Duration) -> (Option<ProgressBar>, Option<Progress>) {
    if !std::io::stderr().is_terminal() {
        return (None, None);
    }
    let bar = ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (b, start) = (bar.clone(), Instant::now());
    let cb: Progress = Arc::new(move |done| {
        b.set_position(start.elapsed().as_millis() as u64);
        b.set_message(format!("{done} requests"));
    });
    (Some(bar), Some(cb))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            urls,
            load,
            rate,
            json,
            hgrm,
        } => {
            let mode = rate.map(|rate| Mode::Open { rate }).unwrap_or(Mode::Closed);
            let spec = Arc::new(load.spec(&urls, mode)?);
            let (bar, cb) = progress(load.warmup + load.duration);
            let result = load.runtime()?.block_on(run(spec.clone(), cb));
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let r = report(
                &result,
                urls,
                mode,
                spec.connections,
                load.http2,
                load.warmup.as_secs_f64(),
            );
            print!("{}", render_text(&r));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(path) = hgrm {
                std::fs::write(&path, render_hgrm(&result.stats.latency))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Compare {
            a,
            b,
            load,
            rate,
            rounds,
            plot,
            json,
        } => {
            let mode = Mode::Open { rate };
            let spec_a = Arc::new(load.spec(std::slice::from_ref(&a), mode)?);
            let spec_b = Arc::new(load.spec(std::slice::from_ref(&b), mode)?);
            println!("A = {a}\nB = {b}\n{rounds} rounds of {:?} each at {rate} req/s (after {:?} warm-up)\n", load.duration, load.warmup);
            println!("{}", header());
            let c = load
                .runtime()?
                .block_on(compare(spec_a, spec_b, rounds, |i, round| {
                    println!("{}", render_round(i, round));
                }));
            println!("{}", render_overall(&c));
            if let Some(path) = plot {
                let mut curves = Vec::new();
                for (i, r) in c.rounds.iter().enumerate() {
                    for (series, side, h) in
                        [(0, "A", &r.a.stats.latency), (1, "B", &r.b.stats.latency)]
                    {
                        curves.push(Curve {
                            label: format!("{side} round {}", i + 1),
                            series,
                            histogram: h,
                            bold: false,
                        });
                    }
                }
                curves.push(Curve {
                    label: format!("A: {a}"),
                    series: 0,
                    histogram: &c.a.latency,
                    bold: true,
                });
                curves.push(Curve {
                    label: format!("B: {b}"),
                    series: 1,
                    histogram: &c.b.latency,
                    bold: true,
                });
                latency_by_percentile(
                    &path,
                    &format!("latency by percentile at {rate} req/s"),
                    &curves,
                )?;
                println!("plot written to {}", path.display());
            }
            if let Some(path) = json {
                let doc = ComparisonJson::new(&c, vec![a], vec![b], rate);
                std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Origin {
            listen,
            name,
            region,
            threads,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(async {
                let origin = Origin::start(listen, OriginIdentity { name, region })
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                println!("origin listening on http://{}", origin.addr());
                origin.wait().await;
                Ok(())
            })
        }
    }
}

//! `edge-router demo`: several regions on loopback in one process, each an
//! edge-router with two demo origins of its own, so routing, failover,
//! failback and the consistency policies can be watched with curl. Each
//! region's config is generated as TOML and goes through the same validation
//! as a real file.
//!
//! The regions share one [`SimulatedGlobal`] table: each proxy gets its
//! region's replica (heartbeats, hence replication lag), and the origins keep
//! a small key-value store in the same replicas, so a read can visibly be
//! behind a write made in another region. A control listener changes the
//! replication delay at run time. Origins and the control listener are
//! demo-only code on a runtime of their own; the shipped binary does not link
//! the load tester.

mod control;
mod origin;
mod relay;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora::server::RunArgs;

use crate::app::{self, Secrets};
use crate::config;
use crate::lifecycle::DrainThenStop;
use crate::tables::embedded::SimulatedGlobal;
use crate::tables::SharedTable;

const REGION_NAMES: [&str; 6] = [
    "us-east-1",
    "eu-west-1",
    "ap-southeast-1",
    "us-west-2",
    "eu-central-1",
    "ap-northeast-1",
];

/// Offset of the control listener from `--base-port`: below the origins
/// (BASE+100 and up) and above any region's traffic port (BASE+0..=5).
const CONTROL_OFFSET: usize = 99;

/// The bounded-staleness route's bound, also quoted by the walkthrough.
const MAX_STALENESS: Duration = Duration::from_secs(3);

/// Shown by `edge-router demo --help`.
pub const LONG_ABOUT: &str = "\
Starts N regions (default 3: us-east-1, eu-west-1, ap-southeast-1) on 127.0.0.1, in one process.
Each region is a full edge-router (traffic listener, admin listener, health checks) with two demo
origins of its own that answer with their region and name. Debug headers are on, so every response
says which region served it (x-edge-upstream-region) and why (x-edge-decision).

The regions share a simulated global table: one replica per region, a write visible in its own
region at once and in the others after --replication-delay (default 1s), which the proxies measure
with heartbeats. The origins keep a key-value store in it: PUT /kv/KEY stores the body in the
origin's region, GET /kv/KEY reads that region's replica.

Routes:
  /kv/       read-your-writes: a write returns a consistency token (x-edge-consistency header,
             edge_ct cookie); a read that carries it is sent to the writer's region until the
             local replica has caught up with the write, so you always read what you wrote.
  /bounded/  bounded-staleness: reads stay local while the local replica is at most 3s behind
             the primary (the first region), else go to the primary; writes go to the primary.
  /          local-first: a region serves from its own origins while one is healthy, else
             forwards to the nearest healthy region (one signed hop).

Make a region's origins fail with `curl -X POST http://ORIGIN/.demo/fail` (and bring them back
with /.demo/recover) to watch failover and failback live. Read the replication delay with
GET http://127.0.0.1:BASE+99/replication-delay and change it while the demo runs with a PUT there
(body: a duration such as 5s; header `Authorization: Bearer TOKEN`, the admin token the demo
prints). The printed table has every URL and a walkthrough.

Ports: region i listens on BASE+i, its admin on ADMIN_BASE+i, its origins on BASE+100+2i and
BASE+101+2i; the control listener on BASE+99.";

/// Options of `edge-router demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of regions (1 to 6).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=6))]
    regions: u8,
    /// First traffic port; region i listens on BASE+i, the control listener on BASE+99.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// First admin port; region i's admin listens on ADMIN_BASE+i.
    #[arg(long, default_value_t = 9901)]
    admin_base_port: u16,
    /// Replication delay between any two regions' replicas (e.g. 500ms, 2s; at most 1h).
    #[arg(long, default_value = "1s", value_parser = control::parse_delay)]
    replication_delay: Duration,
    /// Also a TLS listener per region (BASE+10+i) with the development
    /// certificates (certs/dev, created if missing), and peers reached over
    /// mutual TLS.
    #[arg(long)]
    tls: bool,
}

struct DemoRegion {
    name: &'static str,
    proxy: u16,
    admin: u16,
    origins: [u16; 2],
    /// The TLS listener (`--tls`).
    tls: Option<u16>,
}

/// Where `--tls` keeps the development certificates.
const DEV_CERTS: &str = "certs/dev";

/// TLS listeners are at BASE+10+i.
const TLS_OFFSET: usize = 10;

/// Every port the demo will bind.
struct Plan {
    regions: Vec<DemoRegion>,
    control: u16,
}

fn plan(args: &DemoArgs) -> anyhow::Result<Plan> {
    let n = usize::from(args.regions);
    let port = |base: u16, off: usize| -> anyhow::Result<u16> {
        u16::try_from(usize::from(base) + off)
            .context("port out of range: pick a lower --base-port")
    };
    let regions = (0..n)
        .map(|i| {
            Ok(DemoRegion {
                name: REGION_NAMES[i],
                proxy: port(args.base_port, i)?,
                admin: port(args.admin_base_port, i)?,
                origins: [
                    port(args.base_port, 100 + 2 * i)?,
                    port(args.base_port, 101 + 2 * i)?,
                ],
                tls: if args.tls {
                    Some(port(args.base_port, TLS_OFFSET + i)?)
                } else {
                    None
                },
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Plan {
        regions,
        control: port(args.base_port, CONTROL_OFFSET)?,
    })
}

/// The config a region would have if it were deployed by hand; `peer_port`
/// says where region `me` reaches region `j` (through the demo's relay);
/// `certs` (with `--tls`) is the development certificates' directory.
fn region_config(
    regions: &[DemoRegion],
    me: usize,
    peer_port: &dyn Fn(usize) -> u16,
    certs: Option<&std::path::Path>,
) -> String {
    let r = &regions[me];
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[server]\nregion = \"{}\"\nlisten = [\"127.0.0.1:{}\"]\nthreads = 1\ndebug_headers = true\nrtt_tolerance = \"50ms\"\ndrain_period = \"1s\"",
        r.name, r.proxy
    );
    if let (Some(dir), Some(port)) = (certs, r.tls) {
        // The development leaf serves clients and is each region's
        // certificate towards its peers (mutual TLS between regions).
        let d = dir.display();
        let _ = writeln!(
            t,
            "peer_ca = \"{d}/ca/ca.crt\"\npeer_cert = \"{d}/default.crt\"\npeer_key = \"{d}/default.key\"\n[[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncerts = \"{d}\""
        );
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "[admin]\nlisten = \"127.0.0.1:{}\"\n", r.admin);
    // The table itself is handed over by `run` (one simulated global table
    // for every region); the section still says what a real deployment
    // would configure. Heartbeats well below the 3s staleness bound, so the
    // measured lag tracks the replication delay closely.
    let _ = writeln!(
        t,
        "[tables]\nbackend = \"embedded\"\nheartbeat_interval = \"250ms\"\npoll_interval = \"100ms\"\n"
    );
    for (j, other) in regions.iter().enumerate() {
        // Each region's nearest neighbour is the next one round the ring.
        let order = (j + regions.len() - me) % regions.len();
        let port = if j == me { other.proxy } else { peer_port(j) };
        let url = match (certs, j == me) {
            (Some(_), false) => format!("https://localhost:{port}"),
            _ => format!("http://127.0.0.1:{port}"),
        };
        let _ = writeln!(
            t,
            "[regions.{}]\npeer = \"{url}\"\norder = {order}\n",
            other.name
        );
    }
    let _ = writeln!(
        t,
        "[upstreams.demo]\nprimary_region = \"{}\"\nhealth = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\", healthy = 2, unhealthy = 2 }}\noutlier = {{ consecutive_gateway_failures = 3, base_ejection = \"5s\" }}",
        regions[0].name
    );
    for other in regions {
        let _ = writeln!(
            t,
            "backends.{} = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            other.name, other.origins[0], other.origins[1]
        );
    }
    // The longest matching prefix wins (routing.rs), so the catch-all may
    // come first or last; it is last here to read top-down.
    let _ = writeln!(
        t,
        "\n[[routes]]\nname = \"kv\"\nhost = \"*\"\npath_prefix = \"/kv/\"\nupstream = \"demo\"\npolicy = \"read-your-writes\""
    );
    let _ = writeln!(
        t,
        "\n[[routes]]\nname = \"bounded\"\nhost = \"*\"\npath_prefix = \"/bounded/\"\nupstream = \"demo\"\npolicy = \"bounded-staleness\"\nmax_staleness = \"{}\"\non_primary_down = \"nearest\"",
        humantime::format_duration(MAX_STALENESS)
    );
    // Cached in every region; a purge or a write through any region
    // reaches all of them (docs/cache.md).
    let _ = writeln!(
        t,
        "\n[[routes]]\nname = \"static\"\nhost = \"*\"\npath_prefix = \"/static/\"\nupstream = \"demo\"\npolicy = \"local-first\"\ncache = true"
    );
    let _ = writeln!(
        t,
        "\n[[routes]]\nname = \"cached\"\nhost = \"*\"\npath_prefix = \"/cached/\"\nupstream = \"demo\"\npolicy = \"read-your-writes\"\ncache = true"
    );
    let _ = writeln!(
        t,
        "\n[[routes]]\nname = \"demo\"\nhost = \"*\"\nupstream = \"demo\"\npolicy = \"local-first\""
    );
    t
}

impl Plan {
    fn ports(&self) -> Vec<u16> {
        self.regions
            .iter()
            .flat_map(|r| [r.proxy, r.admin, r.origins[0], r.origins[1]])
            .chain(self.regions.iter().filter_map(|r| r.tls))
            .chain([self.control])
            .collect()
    }
}

fn ensure_free(plan: &Plan) -> anyhow::Result<()> {
    let mut ports = plan.ports();
    ports.sort_unstable();
    if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "port {} is planned twice: --base-port and --admin-base-port ranges overlap",
            w[0]
        );
    }
    let busy: Vec<u16> = ports
        .into_iter()
        .filter(|p| StdTcpListener::bind(("127.0.0.1", *p)).is_err())
        .collect();
    if !busy.is_empty() {
        bail!("ports already in use: {busy:?}; pick others with --base-port / --admin-base-port");
    }
    Ok(())
}

/// Origins and the control listener run on their own runtime thread,
/// outside Pingora's; returns once every port is bound.
fn start_background(
    plan: &Plan,
    global: &Arc<SimulatedGlobal>,
    admin_token: &str,
    links: Vec<relay::Link>,
) -> anyhow::Result<()> {
    let mut origins = Vec::new();
    for r in &plan.regions {
        let table = global.replica(r.name)?;
        for (port, suffix) in r.origins.iter().zip(["a", "b"]) {
            origins.push(origin::OriginSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], *port)),
                name: format!("{}-{suffix}", r.name),
                region: r.name.to_string(),
                table: table.clone(),
            });
        }
    }
    let control_addr = SocketAddr::from(([127, 0, 0, 1], plan.control));
    let global = global.clone();
    let admin_token = admin_token.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo-origins".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("demo runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let started = async {
                    for spec in origins {
                        let addr = spec.addr;
                        origin::start(spec)
                            .await
                            .with_context(|| format!("demo origin on {addr}"))?;
                    }
                    let links = relay::Links::start(links).context("demo link relays")?;
                    control::start(control_addr, global, links, admin_token)
                        .await
                        .with_context(|| format!("demo control listener on {control_addr}"))?;
                    anyhow::Ok(())
                }
                .await;
                let ok = started.is_ok();
                let _ = tx.send(started);
                // The servers are tasks of this runtime: keep it alive for
                // the life of the process.
                if ok {
                    std::future::pending::<()>().await;
                }
            });
        })
        .context("spawning the demo origin thread")?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("demo origins did not start")?
}

/// Answers of the demo's own servers.
type Body = Full<Bytes>;

/// Serve HTTP/1 on `listener`, one task per connection, for as long as the
/// runtime lives. `handler` never fails: every outcome is an HTTP answer.
fn spawn_server<H, F>(listener: tokio::net::TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically out of file descriptors: retrying at once would spin.
                    tracing::warn!(error = %e, "demo listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let conn = {
                    let mut builder = http1::Builder::new();
                    // A client that opens a connection and sends nothing
                    // should not hold a task forever.
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10));
                    builder.serve_connection(TokioIo::new(stream), service)
                };
                let _ = conn.await;
            });
        }
    });
}

/// Why a request body could not be read.
enum BodyError {
    /// Longer than the limit.
    TooLarge,
    /// The client went away or sent a malformed body.
    Read(String),
}

/// The whole request body, if it is at most `limit` bytes.
async fn read_body(
    parts: &http::request::Parts,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, BodyError> {
    // A declared length over the limit is refused before reading anything.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut text = value.to_string();
    text.push('\n');
    with_type(status, text, "application/json")
}

fn text_response(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    with_type(status, text.into(), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here (allowed: {allow})\n"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// One walkthrough line: the command, then why, in a column when it fits.
fn step(out: &mut String, cmd: &str, why: &str) {
    const COLUMN: usize = 47;
    if cmd.chars().count() < COLUMN {
        let _ = writeln!(out, "  {cmd:<w$}# {why}", w = COLUMN);
    } else {
        let _ = writeln!(out, "  {cmd}\n  {:<w$}# {why}", "", w = COLUMN);
    }
}

fn print_table(plan: &Plan, admin_token: &str, delay: Duration) {
    let regions = &plan.regions;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nedge-router demo: {} regions on 127.0.0.1 (Ctrl-C to stop)\n",
        regions.len()
    );
    let _ = writeln!(
        out,
        "{:<16} {:<24} {:<24} ORIGINS",
        "REGION", "PROXY", "ADMIN"
    );
    for r in regions {
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:<24} http://127.0.0.1:{} ({}-a), http://127.0.0.1:{} ({}-b)",
            r.name,
            format!("http://127.0.0.1:{}", r.proxy),
            format!("http://127.0.0.1:{}", r.admin),
            r.origins[0],
            r.name,
            r.origins[1],
            r.name
        );
    }
    let control = format!("http://127.0.0.1:{}/replication-delay", plan.control);
    let _ = writeln!(
        out,
        "\nCONTROL  {control}  (replication delay {}; PUT needs the admin token)",
        humantime::format_duration(delay)
    );
    let _ = writeln!(out, "ADMIN TOKEN  {admin_token}");

    let a = &regions[0];
    let auth = format!("-H 'Authorization: Bearer {admin_token}'");
    let _ = writeln!(out, "\nFailover and failback (route /, local-first):");
    step(
        &mut out,
        &format!("curl -i http://127.0.0.1:{}/hello", a.proxy),
        &format!("served by a {} origin", a.name),
    );
    step(
        &mut out,
        &format!(
            "curl -X POST http://127.0.0.1:{}/.demo/fail; curl -X POST http://127.0.0.1:{}/.demo/fail",
            a.origins[0], a.origins[1]
        ),
        &format!("fail both {} origins", a.name),
    );
    if let Some(b) = regions.get(1) {
        step(
            &mut out,
            &format!("curl -i http://127.0.0.1:{}/hello", a.proxy),
            &format!(
                "after ~2 s: served by {} (x-edge-decision: failover:no-healthy-local)",
                b.name
            ),
        );
    }
    step(
        &mut out,
        &format!(
            "curl -X POST http://127.0.0.1:{}/.demo/recover; curl -X POST http://127.0.0.1:{}/.demo/recover",
            a.origins[0], a.origins[1]
        ),
        &format!("traffic fails back to {} within ~2 s", a.name),
    );
    step(
        &mut out,
        &format!("curl http://127.0.0.1:{}/status", a.admin),
        "health, ejections, peer RTT, replication lag",
    );
    step(
        &mut out,
        &format!("curl http://127.0.0.1:{}/metrics", a.admin),
        "Prometheus metrics",
    );

    match regions.get(1) {
        Some(b) => walkthrough_consistency(&mut out, a, b, &control, &auth, delay),
        None => {
            let _ = writeln!(
                out,
                "\nKey-value store (start with --regions 2 or more to watch replication):"
            );
            step(
                &mut out,
                &format!(
                    "curl -si -X PUT --data 'v1' http://127.0.0.1:{}/kv/greeting",
                    a.proxy
                ),
                "stored in the table; note x-edge-consistency",
            );
            step(
                &mut out,
                &format!("curl -s http://127.0.0.1:{}/kv/greeting", a.proxy),
                "read it back",
            );
        }
    }

    walkthrough_cache(&mut out, regions, &auth);

    // Last, because a drained region stays drained for the rest of the demo.
    let _ = writeln!(out, "\nDrain:");
    step(
        &mut out,
        &format!("curl -X POST {auth} http://127.0.0.1:{}/drain", a.admin),
        &format!("drain {}: its health path turns 503", a.name),
    );
    println!("{out}");
}

/// With `--tls`: the TLS listeners and how to trust them.
fn print_tls(plan: &Plan, dir: &std::path::Path) {
    let mut out =
        String::from("\nTLS (development CA; peers talk to each other over mutual TLS):\n");
    for r in &plan.regions {
        if let Some(port) = r.tls {
            let _ = writeln!(out, "  {:<16} https://localhost:{port}", r.name);
        }
    }
    if let Some(first) = plan.regions.first().and_then(|r| r.tls) {
        step(
            &mut out,
            &format!(
                "curl -si --cacert {}/ca/ca.crt https://localhost:{first}/hello",
                dir.display()
            ),
            "HTTP/2 over TLS, x-forwarded-proto: https to the origin",
        );
    }
    println!("{out}");
}

/// The cache: `/static/` cached in every region, one purge clears them all.
fn walkthrough_cache(out: &mut String, regions: &[DemoRegion], auth: &str) {
    let _ = writeln!(out, "\nCache (route /static/, purged in every region):");
    let each: Vec<String> = regions
        .iter()
        .map(|r| format!("http://127.0.0.1:{}/static/logo", r.proxy))
        .collect();
    let curl_each = |what: &str| {
        format!(
            "for u in {}; do curl -s -o /dev/null -D - $u | grep -i '^x-cache'; done  # {what}",
            each.join(" ")
        )
    };
    step(out, &curl_each("first"), "MISS in each region, then:");
    step(out, &curl_each("again"), "HIT in each region");
    let a = &regions[0];
    step(
        out,
        &format!(
            "curl -s -X POST {auth} -d '{{\"tags\":[\"static\"]}}' http://127.0.0.1:{}/purge",
            a.admin
        ),
        &format!(
            "purge the tag through {}: 202 with an id (Surrogate-Key: static logo)",
            a.name
        ),
    );
    step(
        out,
        &curl_each("after the purge"),
        "MISS in every region (direct fan-out; the table brings it to a region the fan-out missed)",
    );
}

/// Read-your-writes and bounded staleness, written through region `a` (the
/// primary) and read through region `b`.
fn walkthrough_consistency(
    out: &mut String,
    a: &DemoRegion,
    b: &DemoRegion,
    control: &str,
    auth: &str,
    delay: Duration,
) {
    // Long enough for the delay, a heartbeat round or two and the token's margin.
    let settle = delay.as_secs() + 2;
    let shown = humantime::format_duration(delay);
    let b_kv = format!("http://127.0.0.1:{}/kv/greeting", b.proxy);
    let with_token = format!("curl -si -H \"x-edge-consistency: $TOKEN\" {b_kv}");

    let _ = writeln!(
        out,
        "\nRead your writes (route /kv/, replication delay {shown}):"
    );
    step(
        out,
        &format!(
            "curl -si -X PUT --data 'v1' http://127.0.0.1:{}/kv/greeting",
            a.proxy
        ),
        &format!(
            "write through {}: note the x-edge-consistency header and the edge_ct cookie",
            a.name
        ),
    );
    step(
        out,
        &format!(
            "TOKEN=$(curl -si -X PUT --data 'v2' http://127.0.0.1:{}/kv/greeting | tee /dev/stderr | tr -d '\\r' | awk 'tolower($1) == \"x-edge-consistency:\" {{print $2}}')",
            a.proxy
        ),
        "the same write (v2), shown and its token kept in $TOKEN",
    );
    step(
        out,
        &format!("curl -s {b_kv}"),
        &format!(
            "at once, no token: {}'s replica answers, 404 or an older value (stale reads are allowed)",
            b.name
        ),
    );
    step(
        out,
        &with_token,
        &format!(
            "with the token: served by {a} (x-edge-decision: ryw:lagging:{a})",
            a = a.name
        ),
    );
    step(
        out,
        &format!("sleep {settle}; {with_token}"),
        &format!(
            "after the replication delay: {} has caught up and serves it (ryw:caught-up:{})",
            b.name, a.name
        ),
    );

    let bound = humantime::format_duration(MAX_STALENESS);
    let b_bounded = format!("curl -si http://127.0.0.1:{}/bounded/kv/greeting", b.proxy);
    let _ = writeln!(
        out,
        "\nBounded staleness (route /bounded/: reads stay local while the primary {} is at most {bound} ahead):",
        a.name
    );
    let (slow, fast) = if delay < MAX_STALENESS {
        (Duration::from_secs(5), delay)
    } else {
        (delay, Duration::from_secs(1))
    };
    let slow_shown = humantime::format_duration(slow);
    let fast_shown = humantime::format_duration(fast);
    step(
        out,
        &format!("curl {control}"),
        "the replication delay now (control listener; a PUT changes it at once)",
    );
    if delay >= MAX_STALENESS {
        step(
            out,
            &format!("curl -X PUT {auth} --data '{fast_shown}' {control}"),
            &format!("the start delay is over {bound}: lower it first"),
        );
        step(out, "sleep 2", "let the heartbeats catch up");
    }
    step(
        out,
        &b_bounded,
        &format!(
            "lag about {fast_shown}: {} serves (x-edge-decision: staleness:ok:lag=…)",
            b.name
        ),
    );
    step(
        out,
        &format!("curl -X PUT {auth} --data '{slow_shown}' {control}"),
        &format!("replication slower than the {bound} bound"),
    );
    step(
        out,
        &format!("sleep {}; {b_bounded}", MAX_STALENESS.as_secs()),
        &format!(
            "lag over {bound}: sent to the primary {} (x-edge-decision: staleness:lag=…)",
            a.name
        ),
    );
    step(
        out,
        &format!("curl -X PUT {auth} --data '{shown}' {control}"),
        "back to the start value",
    );
}

/// Run the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let plan = plan(&args)?;
    ensure_free(&plan)?;
    let names: Vec<&str> = plan.regions.iter().map(|r| r.name).collect();
    let global = SimulatedGlobal::new(&names, args.replication_delay);
    let hop_key = rand::random::<[u8; 32]>().to_vec();
    // EDGE_ADMIN_TOKEN fixes the token (scripts and tests); otherwise a fresh one per run.
    let admin_token = std::env::var("EDGE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(crate::forwarding::new_request_id);
    let certs = if args.tls {
        let dir = std::path::PathBuf::from(DEV_CERTS);
        if !dir.join("default.crt").exists() || !dir.join("ca/ca.crt").exists() {
            edge_certs::dev::write_dev(&dir).context("creating development certificates")?;
        }
        Some(dir.canonicalize().unwrap_or(dir))
    } else {
        None
    };
    // One relay per ordered pair of regions, so that a link can be cut.
    let mut links = Vec::new();
    let mut link_ports = std::collections::HashMap::new();
    for (i, from) in plan.regions.iter().enumerate() {
        for (j, to) in plan.regions.iter().enumerate().filter(|(j, _)| *j != i) {
            // With --tls, peers talk to each other's TLS listener.
            let target = SocketAddr::from(([127, 0, 0, 1], to.tls.unwrap_or(to.proxy)));
            let link = relay::Link::bind(from.name, to.name, target)
                .context("binding a demo link relay")?;
            link_ports.insert((i, j), link.port()?);
            links.push(link);
        }
    }
    start_background(&plan, &global, &admin_token, links)?;
    let mut server = app::new_server(Duration::from_secs(5), None, false)?;
    let mut lifecycles = Vec::new();
    for (i, r) in plan.regions.iter().enumerate() {
        let port_to = |j: usize| link_ports.get(&(i, j)).copied().unwrap_or(0);
        let text = region_config(&plan.regions, i, &port_to, certs.as_deref());
        let cfg = config::parse(&format!("demo:{}", r.name), &text, None)
            .map_err(|e| anyhow::anyhow!("generated demo config is invalid:\n{e}"))?;
        let secrets = Secrets {
            hop_key: hop_key.clone(),
            previous_hop_key: None,
            admin_token: Some(admin_token.clone()),
        };
        let table: SharedTable = Arc::new(global.replica(r.name)?);
        let source = app::ConfigSource {
            path: None,
            region_override: None,
            text,
        };
        let (lifecycle, _) = app::add_region(&mut server, &cfg, secrets, Some(table), source)?;
        lifecycles.push(lifecycle);
    }
    server.bootstrap();
    print_table(&plan, &admin_token, args.replication_delay);
    if let Some(dir) = &certs {
        print_tls(&plan, dir);
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainThenStop::new(
            lifecycles,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(regions: u8) -> DemoArgs {
        DemoArgs {
            regions,
            base_port: 18080,
            admin_base_port: 19901,
            replication_delay: Duration::from_secs(1),
            tls: false,
        }
    }

    #[test]
    fn generated_configs_validate_for_every_region_count() {
        for n in 1..=6u8 {
            let plan = plan(&args(n)).unwrap();
            let regions = &plan.regions;
            for i in 0..regions.len() {
                let direct = |j: usize| regions[j].proxy;
                let cfg = config::parse("demo", &region_config(regions, i, &direct, None), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(cfg.server.region, regions[i].name);
                // The next region round the ring is the nearest.
                if n > 1 {
                    assert_eq!(cfg.regions[1].name, regions[(i + 1) % regions.len()].name);
                }
            }
        }
    }

    #[test]
    fn demo_paths_reach_their_policies_whatever_the_route_order() {
        use edge_policies::{OnPrimaryDown, Policy};
        let plan = plan(&args(3)).unwrap();
        let cfg = config::parse(
            "demo",
            &region_config(&plan.regions, 1, &|j| plan.regions[j].proxy, None),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.upstreams[0].primary_region.as_deref(),
            Some("us-east-1")
        );
        let table = crate::routing::RouteTable::new(cfg.routes.clone());
        let route = |path: &str| -> (String, Policy) {
            let i = table.find("127.0.0.1", path).unwrap();
            (cfg.routes[i].name.clone(), cfg.routes[i].policy)
        };

        let (name, policy) = route("/kv/greeting");
        assert_eq!(name, "kv");
        assert!(
            matches!(policy, Policy::ReadYourWrites { .. }),
            "{policy:?}"
        );

        let (name, policy) = route("/bounded/kv/greeting");
        assert_eq!(name, "bounded");
        let expected = Policy::BoundedStaleness {
            max_staleness: MAX_STALENESS,
            on_primary_down: OnPrimaryDown::Nearest,
        };
        assert_eq!(policy, expected);

        let (name, policy) = route("/hello");
        assert_eq!(name, "demo");
        assert_eq!(policy, Policy::LocalFirst);
    }

    #[test]
    fn control_port_is_base_plus_99_and_collides_with_nothing() {
        let plan = plan(&args(6)).unwrap();
        assert_eq!(plan.control, 18080 + 99);
        let mut ports = plan.ports();
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n);
    }

    #[test]
    fn ports_past_65535_are_an_error_not_a_wrap() {
        let mut a = args(3);
        a.base_port = 65500;
        assert!(plan(&a).is_err());
    }
}

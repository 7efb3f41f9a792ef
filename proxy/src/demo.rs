//! `edge-router demo`: several regions on loopback in one process, each an
//! edge-router with two demo origins of its own, so routing, failover and
//! failback can be watched with curl. Each region's config is generated as
//! TOML and goes through the same validation as a real file.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{bail, Context};
use edge_loadtest::origin::{Origin, OriginIdentity};
use pingora::server::RunArgs;

use crate::app::{self, Secrets};
use crate::config;
use crate::lifecycle::DrainThenStop;

const REGION_NAMES: [&str; 6] = [
    "us-east-1",
    "eu-west-1",
    "ap-southeast-1",
    "us-west-2",
    "eu-central-1",
    "ap-northeast-1",
];

/// Shown by `edge-router demo --help`.
pub const LONG_ABOUT: &str = "\
Starts N regions (default 3: us-east-1, eu-west-1, ap-southeast-1) on 127.0.0.1, in one process.
Each region is a full edge-router (traffic listener, admin listener, health checks) with two demo
origins of its own that answer with their region and name. Routes use the local-first policy:
a region serves from its own origins while one is healthy, else forwards to the nearest healthy
region (one signed hop). Debug headers are on, so every response says which region served it
(x-edge-upstream-region) and why (x-edge-decision).

Make a region's origins fail with `curl -X POST http://ORIGIN/.demo/fail` (and bring them back
with /.demo/recover) to watch failover and failback live; the printed table has every URL.

Ports: region i listens on BASE+i, its admin on ADMIN_BASE+i, its origins on BASE+100+2i and
BASE+101+2i.";

/// Options of `edge-router demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of regions (1 to 6).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=6))]
    regions: u8,
    /// First traffic port; region i listens on BASE+i.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// First admin port; region i's admin listens on ADMIN_BASE+i.
    #[arg(long, default_value_t = 9901)]
    admin_base_port: u16,
}

struct DemoRegion {
    name: &'static str,
    proxy: u16,
    admin: u16,
    origins: [u16; 2],
}

fn plan(args: &DemoArgs) -> anyhow::Result<Vec<DemoRegion>> {
    let n = usize::from(args.regions);
    let port = |base: u16, off: usize| -> anyhow::Result<u16> {
        u16::try_from(usize::from(base) + off)
            .context("port out of range: pick a lower --base-port")
    };
    (0..n)
        .map(|i| {
            Ok(DemoRegion {
                name: REGION_NAMES[i],
                proxy: port(args.base_port, i)?,
                admin: port(args.admin_base_port, i)?,
                origins: [
                    port(args.base_port, 100 + 2 * i)?,
                    port(args.base_port, 101 + 2 * i)?,
                ],
            })
        })
        .collect()
}

/// The config a region would have if it were deployed by hand.
fn region_config(regions: &[DemoRegion], me: usize) -> String {
    let r = &regions[me];
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[server]\nregion = \"{}\"\nlisten = [\"127.0.0.1:{}\"]\nthreads = 1\ndebug_headers = true\nrtt_tolerance = \"50ms\"\ndrain_period = \"1s\"\n",
        r.name, r.proxy
    );
    let _ = writeln!(t, "[admin]\nlisten = \"127.0.0.1:{}\"\n", r.admin);
    for (j, other) in regions.iter().enumerate() {
        // Each region's nearest neighbour is the next one round the ring.
        let order = (j + regions.len() - me) % regions.len();
        let _ = writeln!(
            t,
            "[regions.{}]\npeer = \"http://127.0.0.1:{}\"\norder = {order}\n",
            other.name, other.proxy
        );
    }
    let _ = writeln!(
        t,
        "[upstreams.demo]\nhealth = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\", healthy = 2, unhealthy = 2 }}\noutlier = {{ consecutive_gateway_failures = 3, base_ejection = \"5s\" }}"
    );
    for other in regions {
        let _ = writeln!(
            t,
            "backends.{} = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            other.name, other.origins[0], other.origins[1]
        );
    }
    let _ = writeln!(t, "\n[[routes]]\nname = \"demo\"\nhost = \"*\"\nupstream = \"demo\"\npolicy = \"local-first\"");
    t
}

fn ensure_free(regions: &[DemoRegion]) -> anyhow::Result<()> {
    let busy: Vec<u16> = regions
        .iter()
        .flat_map(|r| [r.proxy, r.admin, r.origins[0], r.origins[1]])
        .filter(|p| TcpListener::bind(("127.0.0.1", *p)).is_err())
        .collect();
    if !busy.is_empty() {
        bail!("ports already in use: {busy:?}; pick others with --base-port / --admin-base-port");
    }
    Ok(())
}

/// Origins run on their own runtime thread, outside Pingora's.
fn start_origins(regions: &[DemoRegion]) -> anyhow::Result<()> {
    let specs: Vec<(SocketAddr, OriginIdentity)> = regions
        .iter()
        .flat_map(|r| {
            r.origins.iter().zip(["a", "b"]).map(|(p, suffix)| {
                (
                    SocketAddr::from(([127, 0, 0, 1], *p)),
                    OriginIdentity {
                        name: format!("{}-{suffix}", r.name),
                        region: r.name.to_string(),
                    },
                )
            })
        })
        .collect();
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
                    let _ = tx.send(Err(anyhow::anyhow!("origin runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let mut running = Vec::new();
                for (addr, id) in specs {
                    match Origin::start(addr, id).await {
                        Ok(o) => running.push(o),
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::anyhow!("origin on {addr}: {e}")));
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(()));
                std::future::pending::<()>().await;
                drop(running);
            });
        })
        .context("spawning the origin thread")?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("origins did not start")?
}

fn print_table(regions: &[DemoRegion], token: &str) {
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
    let a = &regions[0];
    let _ = writeln!(out, "\nTry:");
    let _ = writeln!(
        out,
        "  curl -i http://127.0.0.1:{}/hello            # served by a {} origin",
        a.proxy, a.name
    );
    let _ = writeln!(
        out,
        "  curl -X POST http://127.0.0.1:{}/.demo/fail; curl -X POST http://127.0.0.1:{}/.demo/fail",
        a.origins[0], a.origins[1]
    );
    let _ = writeln!(
        out,
        "                                                 # fail both {} origins",
        a.name
    );
    if let Some(b) = regions.get(1) {
        let _ = writeln!(
            out,
            "  curl -i http://127.0.0.1:{}/hello            # after ~2 s: served by {} (x-edge-decision: failover:no-healthy-local)",
            a.proxy, b.name
        );
    }
    let _ = writeln!(
        out,
        "  curl -X POST http://127.0.0.1:{}/.demo/recover; curl -X POST http://127.0.0.1:{}/.demo/recover",
        a.origins[0], a.origins[1]
    );
    let _ = writeln!(
        out,
        "                                                 # traffic fails back to {} within ~2 s",
        a.name
    );
    let _ = writeln!(
        out,
        "  curl http://127.0.0.1:{}/status               # health, ejections, peer RTT",
        a.admin
    );
    let _ = writeln!(out, "  curl http://127.0.0.1:{}/metrics", a.admin);
    let _ = writeln!(
        out,
        "  curl -X POST -H 'Authorization: Bearer {token}' http://127.0.0.1:{}/drain",
        a.admin
    );
    println!("{out}");
}

/// Run the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let regions = plan(&args)?;
    ensure_free(&regions)?;
    start_origins(&regions)?;
    let hop_key = rand::random::<[u8; 32]>().to_vec();
    let token = crate::forwarding::new_request_id();
    let mut server = app::new_server(Duration::from_secs(5))?;
    let mut lifecycles = Vec::new();
    for i in 0..regions.len() {
        let text = region_config(&regions, i);
        let cfg = config::parse(&format!("demo:{}", regions[i].name), &text, None)
            .map_err(|e| anyhow::anyhow!("generated demo config is invalid:\n{e}"))?;
        let secrets = Secrets {
            hop_key: hop_key.clone(),
            admin_token: Some(token.clone()),
        };
        lifecycles.push(app::add_region(&mut server, &cfg, secrets)?);
    }
    print_table(&regions, &token);
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

    #[test]
    fn generated_configs_validate_for_every_region_count() {
        for n in 1..=6u8 {
            let args = DemoArgs {
                regions: n,
                base_port: 18080,
                admin_base_port: 19901,
            };
            let regions = plan(&args).unwrap();
            for i in 0..regions.len() {
                let cfg = config::parse("demo", &region_config(&regions, i), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(cfg.server.region, regions[i].name);
                // The next region round the ring is the nearest.
                if n > 1 {
                    assert_eq!(cfg.regions[1].name, regions[(i + 1) % regions.len()].name);
                }
            }
        }
    }
}

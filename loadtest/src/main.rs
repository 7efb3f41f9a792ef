//! The `edge-loadtest` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_loadtest::origin::{Origin, OriginIdentity};

#[derive(Parser)]
#[command(
    name = "edge-loadtest",
    version,
    about = "Latency benchmarking tools for edge-router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command {
        Command::Origin {
            listen,
            name,
            region,
        } => runtime.block_on(async {
            let origin = Origin::start(listen, OriginIdentity { name, region })
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!("origin listening on http://{}", origin.addr());
            origin.wait().await;
            Ok(())
        }),
    }
}

//! The `edge-router` binary: `run`, `check` and `demo`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pingora::server::RunArgs;

use edge_router::lifecycle::DrainThenStop;
use edge_router::telemetry::LogFormat;
use edge_router::{app, config, demo, telemetry};

// mimalloc: measured −14 % proxy CPU per request against the system allocator (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

/// Shortest shared secret accepted (bytes).
const MIN_SECRET_BYTES: usize = 32;

#[derive(Parser)]
#[command(
    name = "edge-router",
    version,
    about = "Multi-region active-active reverse proxy on Pingora"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "EDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Take the listening sockets from the edge-router serving on
        /// `server.upgrade_sock` (graceful upgrade; send it SIGQUIT once
        /// this one has started). SIGUSR2 to the running one does both.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file: prints `ok`, or every error as file:line:col: key.path: message (exit 2).
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run several regions on loopback, each with two demo origins, to watch routing and failover live.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
    /// TLS certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a development CA and a certificate for localhost into DIR (default certs/dev).
    Dev {
        /// Where to write `default.crt`/`default.key` (a listener's `certs`) and `ca/ca.crt`.
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
    },
}

fn region_override() -> Option<String> {
    std::env::var("EDGE_REGION").ok().filter(|r| !r.is_empty())
}

fn load_or_report(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    load_text_or_report(path).map(|(c, _)| c)
}

/// The config and the text it was parsed from (one read: the hash `/status`
/// shows is of what was loaded).
fn load_text_or_report(path: &std::path::Path) -> Result<(config::Config, String), ExitCode> {
    let report = |errors: config::ConfigErrors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("{}: cannot read: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })?;
    let config = config::parse(
        &path.display().to_string(),
        &text,
        region_override().as_deref(),
    )
    .map_err(report)?;
    Ok((config, text))
}

fn main() -> ExitCode {
    // Two crypto providers are compiled in (ring through Pingora, aws-lc-rs
    // through the AWS SDK): name the one every TLS object of the process uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Cert {
            command: CertCommand::Dev { dir },
        } => match edge_certs::dev::write_dev(&dir) {
            Ok(files) => {
                println!(
                    "wrote {} and {} (a listener's `certs = \"{}\"`), and the CA {} (key {}, 0600)",
                    files.leaf_cert.display(),
                    files.leaf_key.display(),
                    dir.display(),
                    files.ca_cert.display(),
                    files.ca_key.display()
                );
                println!(
                    "trust the CA: curl --cacert {ca} https://localhost:8443/ ; system-wide on Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/edge-router-dev.crt && sudo update-ca-certificates",
                    ca = files.ca_cert.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edge-router cert dev: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => match load_or_report(&config) {
            Ok(c) => {
                // As `nginx -t` does: the certificates and keys must load too.
                let mut bad = false;
                let mut fail = |what: String| {
                    eprintln!("{}: {what}", config.display());
                    bad = true;
                };
                let extra = c
                    .server
                    .peer_tls
                    .as_ref()
                    .map(|p| (p.cert.clone(), p.key.clone()));
                for (i, t) in c.server.tls.iter().enumerate() {
                    let loaded = edge_certs::resolver::DirResolver::load_with(
                        &t.certs,
                        extra.clone(),
                        edge_certs::tls::provider(),
                    );
                    match loaded {
                        Err(e) => fail(format!("server.tls[{i}].certs: {e}")),
                        Ok(r) => {
                            let now = std::time::SystemTime::now();
                            for cert in r.certs().iter().filter(|c| c.expires_in(now) <= 0) {
                                eprintln!(
                                    "warning: server.tls[{i}].certs: {} ({}) has expired; clients will refuse it",
                                    cert.name,
                                    cert.path.display()
                                );
                            }
                        }
                    }
                }
                if let Some(p) = &c.server.peer_tls {
                    let connector = edge_router::backend_transport::BackendTransport::for_peers(p)
                        .and_then(|_| {
                            edge_router::backend_transport::BackendTransport::connector_options(
                                p,
                                pingora::connectors::ConnectorOptions::new(0),
                            )
                        });
                    if let Err(e) = connector {
                        fail(format!("server.peer_ca / peer_cert / peer_key: {e}"));
                    }
                }
                for u in &c.upstreams {
                    if let Err(e) = edge_router::backend_transport::BackendTransport::load(
                        &u.transport,
                        c.server.peer_tls.is_some(),
                    ) {
                        fail(format!("upstreams.{}: {e}", u.name));
                    }
                }
                // `run` would refuse to start without them.
                if let Err(e) = load_secrets(&c) {
                    fail(e);
                }
                if bad {
                    return ExitCode::from(EXIT_CONFIG);
                }
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, upgrade } => {
            install_signals();
            let config_path = config;
            let (config, text) = match load_text_or_report(&config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _log = match telemetry::init(cli.log_format, config.log.clone()) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("edge-router: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            for w in &config.warnings {
                tracing::warn!("config: {w}");
            }
            let source = app::ConfigSource {
                text,
                path: Some(config_path),
                region_override: region_override(),
            };
            match run(config, source, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-router: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Demo(args) => {
            install_signals();
            let _log = telemetry::init(cli.log_format, config::LogConfig::default());
            let _log = match _log {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("edge-router demo: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match demo::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-router demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM from here on never end the process.
fn install_signals() {
    if let Err(e) = edge_router::signals::install() {
        eprintln!(
            "edge-router: cannot handle SIGHUP/SIGUSR1/SIGUSR2 ({e}); they will end the process"
        );
    }
}

/// The secrets `config` names, read from the environment as `run` needs
/// them (`check` reads them too): an error says which variable is wrong.
fn load_secrets(config: &config::Config) -> Result<app::Secrets, String> {
    let hop_key = match std::env::var(&config.server.hop_secret_env) {
        // Clients see values signed with keys derived from it (consistency
        // tokens), so it must resist an offline guess.
        // During a rolling upgrade (hop_format = "v1") the previous
        // release's secret must keep working until every region is upgraded.
        Ok(s) if !s.is_empty() && s.len() < MIN_SECRET_BYTES && !config.server.hop_format_v1 => {
            return Err(format!(
                "{} is {} bytes: use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 32`)",
                config.server.hop_secret_env,
                s.len()
            ))
        }
        Ok(s) if !s.is_empty() => s.into_bytes(),
        _ if config.regions.len() > 1 => {
            return Err(format!(
                "{} is not set: every region's edge-router needs the same secret to sign x-edge-hop",
                config.server.hop_secret_env
            ))
        }
        // One region never forwards, so a throwaway key is enough.
        _ => rand::random::<[u8; 32]>().to_vec(),
    };
    // During a rotation every region also accepts values signed with the old secret.
    let previous_env = format!("{}_PREVIOUS", config.server.hop_secret_env);
    let previous_hop_key = std::env::var(&previous_env)
        .ok()
        .filter(|s| !s.is_empty())
        .map(String::into_bytes);
    if previous_hop_key
        .as_ref()
        .is_some_and(|k| k.len() < MIN_SECRET_BYTES)
        && !config.server.hop_format_v1
    {
        return Err(format!(
            "{previous_env} is shorter than {MIN_SECRET_BYTES} bytes"
        ));
    }
    let admin_token = std::env::var(&config.admin.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(t) = admin_token.as_ref().filter(|t| t.len() < MIN_SECRET_BYTES) {
        return Err(format!(
            "{} is {} bytes: an admin token must be at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 32`)",
            config.admin.token_env,
            t.len()
        ));
    }
    Ok(app::Secrets {
        hop_key,
        previous_hop_key,
        admin_token,
    })
}

fn run(config: config::Config, source: app::ConfigSource, upgrade: bool) -> anyhow::Result<()> {
    let upgrade_sock = config.server.upgrade_sock.clone();
    if upgrade && upgrade_sock.is_none() {
        anyhow::bail!("--upgrade needs server.upgrade_sock: the path where the running edge-router hands over its listening sockets");
    }
    let listeners = config::own_listeners(&config.server, &config.admin);
    if upgrade {
        // Before taking any socket: the running process would stop accepting
        // for a successor that then cannot bind its new listeners.
        edge_router::upgrade::check_new_listeners(&listeners)
            .map_err(|e| anyhow::anyhow!("graceful upgrade refused: {e}"))?;
    }
    let secrets = load_secrets(&config).map_err(|e| anyhow::anyhow!(e))?;
    if secrets.hop_key.len() < MIN_SECRET_BYTES {
        tracing::warn!(env = %config.server.hop_secret_env, "the secret is shorter than {MIN_SECRET_BYTES} bytes: accepted only while hop_format = \"v1\" (a rolling upgrade); rotate to a longer one next");
    }
    if secrets.previous_hop_key.is_some() {
        tracing::info!(env = %format!("{}_PREVIOUS", config.server.hop_secret_env), "secret rotation: hops and consistency tokens signed with the previous secret are accepted");
    }
    if secrets.admin_token.is_none() {
        tracing::warn!(env = %config.admin.token_env, "no admin token set: admin mutations (POST /drain) are refused");
    }
    let mut server = app::new_server(
        config.server.shutdown_timeout,
        upgrade_sock.as_deref(),
        upgrade,
    )?;
    let (lifecycle, metrics) = app::add_region(&mut server, &config, secrets, None, source)?;
    if let Some(sock) = upgrade_sock.as_ref().filter(|_| upgrade) {
        tracing::info!(sock = %sock.display(), "graceful upgrade: waiting for the running edge-router's listening sockets");
    }
    // With --upgrade, this takes the sockets: everything that can fail is done.
    server.bootstrap();
    tracing::info!(
        region = %config.server.region,
        listen = ?config.server.listen,
        admin = %config.admin.listen,
        pid = std::process::id(),
        "edge-router starting"
    );
    let mut stop = DrainThenStop::new(
        vec![lifecycle],
        config.server.drain_period,
        config.server.shutdown_timeout,
    );
    if let Some(sock) = upgrade_sock {
        stop = stop.with_upgrade(edge_router::upgrade::Upgrade::new(sock, listeners), metrics);
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(stop),
    });
    // Pingora's run can return before our shutdown watcher exits.
    let code = edge_router::lifecycle::exit_code();
    if code != 0 {
        edge_router::telemetry::flush();
        std::process::exit(i32::from(code));
    }
    Ok(())
}

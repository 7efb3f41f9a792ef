//! Reloading a region's config without dropping a connection, as nginx's
//! `nginx -s reload` and Envoy's dynamic configuration do: SIGHUP or
//! `POST /reload` on the admin listener re-reads the file, validates it as
//! `check` does, builds the routes, upstreams, policies and health settings
//! from it, and swaps them in one step. A request keeps the setup it
//! started with, so requests in flight finish on the old one. Backends and
//! peers the new file keeps keep their health (a backend found down stays
//! down, an ejection runs its course). A file that does not load, or that
//! changes what only a restart can (listeners, the region, the table, the
//! cache), keeps the old config serving and says why: the log, the metric
//! `edge_config_reloads_total{result}` and the admin answer. It also runs
//! the current setup's health prober, replaced with each reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::app::{build_region, ConfigSource, Fixed};
use crate::config::dns::{KeepLastGood, SystemDns};
use crate::config::{self, Config};
use crate::health::prober::Prober;
use crate::service::Region;

/// Which config is serving: its hash and when it was loaded.
#[derive(Debug, Clone)]
pub struct ConfigInfo {
    /// SHA-256 of the file's text (and `EDGE_REGION`), first 16 hex digits.
    pub hash: String,
    /// Unix milliseconds of the load.
    pub loaded_at_ms: u64,
    /// The file, when there is one.
    pub path: Option<std::path::PathBuf>,
    /// Reloads that applied since start.
    pub reloads: u64,
    /// What `check` would warn about in it.
    pub warnings: Vec<String>,
}

impl ConfigInfo {
    fn of(source: &ConfigSource, reloads: u64, warnings: Vec<String>) -> ConfigInfo {
        let mut h = Sha256::new();
        h.update(source.text.as_bytes());
        h.update([0]);
        h.update(source.region_override.as_deref().unwrap_or("").as_bytes());
        let digest = h.finalize();
        ConfigInfo {
            hash: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
            loaded_at_ms: crate::clock::unix_ms(),
            path: source.path.clone(),
            reloads,
            warnings,
        }
    }

    /// For `/status` and the admin answer.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "hash": self.hash,
            "loaded_at_ms": self.loaded_at_ms,
            "path": self.path.as_ref().map(|p| p.display().to_string()),
            "reloads": self.reloads,
            "warnings": self.warnings,
        })
    }
}

type Reply = oneshot::Sender<Result<ConfigInfo, String>>;

/// Asks the reloader to reload (the admin listener's `POST /reload`), and
/// shows the text serving (`GET /config`).
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<Reply>, Arc<ArcSwap<String>>);

impl ReloadHandle {
    /// The config text serving now.
    pub fn text(&self) -> String {
        self.1.load().as_ref().clone()
    }

    /// Reload now; the new config's info, or why the old one stays.
    pub async fn reload(&self) -> Result<ConfigInfo, String> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(tx)
            .await
            .map_err(|_| "the reloader is not running".to_string())?;
        rx.await
            .map_err(|_| "the reloader stopped before answering".to_string())?
    }
}

/// A running health prober and the switch that stops it.
struct RunningProber(watch::Sender<bool>);

impl RunningProber {
    fn start(region: &Region) -> RunningProber {
        let (stop, stopped) = watch::channel(false);
        let prober = Prober::new(
            region.health.clone(),
            region.health_path.clone(),
            region.backend_transports.clone(),
            region.peer_transport.clone(),
        );
        tokio::spawn(async move { prober.start(stopped).await });
        RunningProber(stop)
    }
}

impl Drop for RunningProber {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// The longest one round of name lookups may hold the reloader.
const DNS_ROUND_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The background service that runs the current setup's prober and reloads.
pub struct Reloader {
    source: Mutex<ConfigSource>,
    config: Mutex<Config>,
    current: Arc<ArcSwap<Region>>,
    fixed: Fixed,
    requests: Mutex<Option<mpsc::Receiver<Reply>>>,
    handle: ReloadHandle,
    text: Arc<ArcSwap<String>>,
    info: Arc<ArcSwap<ConfigInfo>>,
    /// A round of name lookups is still running (one that outlived its
    /// limit): the next refresh waits for it rather than start another.
    looking_up: Arc<std::sync::atomic::AtomicBool>,
}

impl Reloader {
    /// Reloads of `config` (read from `source`) into `current`.
    pub fn new(
        source: ConfigSource,
        config: Config,
        current: Arc<ArcSwap<Region>>,
        fixed: Fixed,
    ) -> Reloader {
        let (tx, rx) = mpsc::channel(4);
        let info = ConfigInfo::of(&source, 0, config.warnings.clone());
        publish_info(&fixed, None, &info);
        prime_dns(&fixed, &config);
        let text = Arc::new(ArcSwap::from_pointee(source.text.clone()));
        Reloader {
            source: Mutex::new(source),
            config: Mutex::new(config),
            current,
            fixed,
            requests: Mutex::new(Some(rx)),
            handle: ReloadHandle(tx, text.clone()),
            text,
            info: Arc::new(ArcSwap::from_pointee(info)),
            looking_up: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Until the next lookup of the names (`server.dns_refresh`; zero: a year, i.e. never).
    fn dns_refresh(&self) -> std::time::Duration {
        let every = self.config.lock().server.dns_refresh;
        if every.is_zero() {
            std::time::Duration::from_secs(365 * 86_400)
        } else {
            every
        }
    }

    /// For the admin listener.
    pub fn handle(&self) -> ReloadHandle {
        self.handle.clone()
    }

    /// Which config is serving.
    pub fn info(&self) -> Arc<ArcSwap<ConfigInfo>> {
        self.info.clone()
    }

    /// Read, validate and swap in the file; the prober is replaced with it.
    /// `asked`: through the admin API (a signal to a process without a file
    /// is not an error to count).
    async fn reload(&self, prober: &mut RunningProber, asked: bool) -> Result<ConfigInfo, String> {
        if self.source.lock().path.is_none() {
            if !asked {
                tracing::debug!("SIGHUP: no config file to reload (demo)");
            }
            return Err("this process was not started from a config file".to_string());
        }
        let result = self.try_reload(prober).await;
        let metrics = &self.fixed.metrics;
        match &result {
            Ok(info) => {
                metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(hash = %info.hash, "config reloaded: new requests use it; requests in flight finish on the old one");
                for w in &info.warnings {
                    tracing::warn!("config: {w}");
                }
            }
            Err(why) => {
                metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::warn!(error = %why, "config not reloaded: the previous one keeps serving");
            }
        }
        result
    }

    async fn try_reload(&self, prober: &mut RunningProber) -> Result<ConfigInfo, String> {
        let source = self.source.lock().clone();
        let old = self.config.lock().clone();
        let previous = self.current.load_full();
        let fixed = self.fixed.clone();
        // Reading, DNS and certificates block: off the runtime the probers share.
        let task = tokio::task::spawn_blocking(move || prepare(source, &old, &fixed, &previous));
        let (new, region, source) = tokio::time::timeout(DNS_ROUND_LIMIT, task)
            .await
            .map_err(|_| {
                format!("reading and building the config took over {DNS_ROUND_LIMIT:?} (a resolver that does not answer?)")
            })?
            .map_err(|e| format!("the reload task failed: {e}"))??;
        let info = ConfigInfo::of(&source, self.info.load().reloads + 1, new.warnings.clone());
        self.install(new, region, prober);
        self.text.store(Arc::new(source.text.clone()));
        *self.source.lock() = source;
        let old_info = self.info.swap(Arc::new(info.clone()));
        publish_info(&self.fixed, Some(&old_info), &info);
        Ok(info)
    }
}

impl Reloader {
    /// Serve `region` (built from `config`) from now on, with its prober.
    fn install(&self, config: Config, region: Region, prober: &mut RunningProber) {
        let previous = self.current.load_full();
        // The new prober starts before the swap, the old one stops after.
        let next = RunningProber::start(&region);
        let region = Arc::new(region);
        self.current.store(region.clone());
        region.health.go_live(&previous.health);
        self.fixed.prime(&config, &region);
        prime_dns(&self.fixed, &config);
        *prober = next;
        *self.config.lock() = config;
    }

    /// Look the names in backends and peers up again; when an answer
    /// changed, serve the same config with the new addresses. A failed
    /// lookup keeps the name's last addresses.
    async fn refresh_dns(&self, prober: &mut RunningProber) {
        let (names, own) = {
            let c = self.config.lock();
            (c.names.clone(), config::own_listeners(&c.server, &c.admin))
        };
        if names.is_empty() {
            return;
        }
        let source = self.source.lock().clone();
        let fixed = self.fixed.clone();
        let previous = self.current.load_full();
        let last = names.clone();
        use std::sync::atomic::Ordering;
        if self.looking_up.swap(true, Ordering::SeqCst) {
            tracing::warn!("DNS refresh skipped: the previous round of lookups has not finished");
            return;
        }
        let looking_up = self.looking_up.clone();
        let lookups = tokio::task::spawn_blocking(move || {
            /// Clears the flag however the round ends.
            struct Done(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(looking_up);
            let dns = KeepLastGood::new(&SystemDns, &last, &own);
            let file = source
                .path
                .as_ref()
                .map_or_else(|| "config".to_string(), |p| p.display().to_string());
            let parsed =
                config::parse_with(&file, &source.text, source.region_override.as_deref(), &dns);
            let failures = dns.failures();
            let new = parsed.map_err(|e| e.to_string())?;
            if config::dns::same(&new.names, &last) {
                return Ok((None, failures));
            }
            let region =
                build_region(&new, &fixed, Some(&previous.health)).map_err(|e| format!("{e:#}"))?;
            Ok::<_, String>((Some((new, region)), failures))
        });
        // getaddrinfo cannot be cancelled; a resolver that hangs must not
        // hold reloads (the thread finishes on its own).
        let outcome = match tokio::time::timeout(DNS_ROUND_LIMIT, lookups).await {
            Err(_) => Err(format!(
                "the lookups took over {DNS_ROUND_LIMIT:?}; trying again at the next refresh"
            )),
            Ok(joined) => joined
                .map_err(|e| format!("the lookup task failed: {e}"))
                .and_then(|r| r),
        };
        let metrics = &self.fixed.metrics;
        let (changed, failures) = match outcome {
            Ok(o) => o,
            Err(why) => {
                tracing::warn!(error = %why, "DNS refresh: the backends and peers stay as they are");
                return;
            }
        };
        let failed: std::collections::HashSet<&str> =
            failures.iter().map(|(n, _)| n.as_str()).collect();
        for (name, why) in &failures {
            tracing::warn!(name = %name, error = %why, "DNS lookup failed: keeping the addresses it had");
        }
        let after = changed.as_ref().map(|(c, _)| &c.names);
        for (name, before) in &names {
            let now = after.and_then(|a| a.get(name));
            let moved = now.is_some_and(|n| !config::dns::same_addresses(n, before));
            let result = if failed.contains(name.as_str()) {
                "error"
            } else if moved {
                tracing::info!(name = %name, before = ?before, after = ?now, "DNS answer changed: the backends follow it");
                "changed"
            } else {
                "unchanged"
            };
            metrics
                .dns_refreshes
                .with_label_values(&[name.as_str(), result])
                .inc();
        }
        if let Some((new, region)) = changed {
            self.install(new, region, prober);
        }
    }
}

/// Read and validate the file, and build the setup it describes (nothing
/// serves it yet, and nothing is published).
fn prepare(
    source: ConfigSource,
    old: &Config,
    fixed: &Fixed,
    previous: &Region,
) -> Result<(Config, Region, ConfigSource), String> {
    let Some(path) = source.path.clone() else {
        return Err("this process was not started from a config file".to_string());
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    // A name that does not resolve now keeps its last answer: a DNS outage
    // must not block a change to the routes.
    let own = config::own_listeners(&old.server, &old.admin);
    let dns = KeepLastGood::new(&SystemDns, &old.names, &own);
    let new = config::parse_with(
        &path.display().to_string(),
        &text,
        source.region_override.as_deref(),
        &dns,
    )
    .map_err(|e| e.to_string())?;
    for (name, why) in dns.failures() {
        tracing::warn!(name = %name, error = %why, "reload: DNS lookup failed: keeping the addresses it had");
    }
    let restart = needs_restart(old, &new);
    if !restart.is_empty() {
        return Err(format!(
            "{} changed: these take a restart or a graceful upgrade (SIGUSR2), nothing was applied",
            restart.join(", ")
        ));
    }
    if fixed.cache.is_none() && new.routes.iter().any(|r| r.cache.is_some()) {
        return Err(
            "a route turns `cache` on, and this process started without a cache: restart to enable it"
                .to_string(),
        );
    }
    if !fixed.compression && new.routes.iter().any(|r| r.compress.is_some()) {
        // Pingora fixes its module chain when the service starts, and the
        // module is left out without a compressing route (it costs every
        // request): only a restart can add it.
        return Err(
            "a route turns `compress` on, and this process started without the compression module (no route compressed then): restart to enable it"
                .to_string(),
        );
    }
    let region = build_region(&new, fixed, Some(&previous.health)).map_err(|e| format!("{e:#}"))?;
    Ok((
        new,
        region,
        ConfigSource {
            path: Some(path),
            region_override: source.region_override,
            text,
        },
    ))
}

/// `edge_dns_refreshes_total` at zero for every name, so that a first
/// failure is an increase an alert sees.
fn prime_dns(fixed: &Fixed, config: &Config) {
    for name in config.names.keys() {
        for result in ["unchanged", "changed", "error"] {
            fixed
                .metrics
                .dns_refreshes
                .with_label_values(&[name.as_str(), result]);
        }
    }
}

/// `edge_config_info{hash,loaded_at}` for the config serving, and not the previous one.
fn publish_info(fixed: &Fixed, previous: Option<&ConfigInfo>, now: &ConfigInfo) {
    let gauge = &fixed.metrics.config_info;
    if let Some(p) = previous {
        let _ = gauge.remove_label_values(&[p.hash.as_str(), &p.loaded_at_ms.to_string()]);
    }
    gauge
        .with_label_values(&[now.hash.as_str(), &now.loaded_at_ms.to_string()])
        .set(1);
}

/// The sections of `old` and `new` that differ where a reload cannot apply
/// the difference: everything but the routes, the upstreams and
/// `server.trusted_proxies` / `debug_headers` / `dns_refresh`.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let server = |c: &Config| {
        let mut s = c.server.clone();
        s.trusted_proxies.clear();
        s.debug_headers = false;
        s.dns_refresh = std::time::Duration::ZERO;
        format!("{s:?}")
    };
    // A peer's address as written, not as DNS answered it today.
    let regions = |c: &Config| {
        c.regions
            .iter()
            .map(|r| {
                let peer = r.peer.as_ref().map(|p| (&p.authority, p.tls, &p.host));
                format!("{} {peer:?} {} {:?}", r.name, r.order, r.rtt_hint)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut changed = Vec::new();
    if server(old) != server(new) {
        changed.push("[server] (beyond trusted_proxies and debug_headers)");
    }
    for (name, a, b) in [
        (
            "[admin]",
            format!("{:?}", old.admin),
            format!("{:?}", new.admin),
        ),
        ("[regions]", regions(old), regions(new)),
        (
            "[tables]",
            format!("{:?}", old.tables),
            format!("{:?}", new.tables),
        ),
        (
            "[consistency]",
            format!("{:?}", old.consistency),
            format!("{:?}", new.consistency),
        ),
        (
            "[cache]",
            format!("{:?}", old.cache),
            format!("{:?}", new.cache),
        ),
        ("[log]", format!("{:?}", old.log), format!("{:?}", new.log)),
    ] {
        if a != b {
            changed.push(name);
        }
    }
    changed
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut prober = RunningProber::start(&self.current.load());
        // Background services start with the listeners: serving from here on.
        crate::sd_notify::ready();
        let mut signals = crate::signals::subscribe();
        let mut requests = self.requests.lock().take();
        let mut next_lookup = tokio::time::Instant::now() + self.dns_refresh();
        loop {
            let request = async {
                match requests.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(next_lookup) => {
                    self.refresh_dns(&mut prober).await;
                    // Read each time: a reload may change it.
                    next_lookup = tokio::time::Instant::now() + self.dns_refresh();
                }
                s = signals.recv() => match s {
                    Ok(crate::signals::Request::Reload)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = self.reload(&mut prober, false).await;
                        next_lookup = tokio::time::Instant::now() + self.dns_refresh();
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                },
                Some(reply) = request => {
                    let _ = reply.send(self.reload(&mut prober, true).await);
                    next_lookup = tokio::time::Instant::now() + self.dns_refresh();
                }
            }
        }
    }
}

//! Test harness: real `edge-router` processes and real origins on 127.0.0.1.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_loadtest::origin::{Origin, OriginIdentity};

pub const HOP_SECRET: &str = "e2e-hop-secret";
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// A port that was free a moment ago (Pingora binds by itself, so we cannot hand it a socket).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

pub async fn origin(region: &str, name: &str) -> Origin {
    origin_at(SocketAddr::from(([127, 0, 0, 1], 0)), region, name).await
}

pub async fn origin_at(addr: SocketAddr, region: &str, name: &str) -> Origin {
    Origin::start(
        addr,
        OriginIdentity {
            name: name.to_string(),
            region: region.to_string(),
        },
    )
    .await
    .expect("origin binds")
}

/// One region of a test deployment.
pub struct RegionSpec {
    pub name: &'static str,
    pub port: u16,
    pub admin: u16,
    pub backends: Vec<SocketAddr>,
}

impl RegionSpec {
    pub fn new(name: &'static str, backends: Vec<SocketAddr>) -> Self {
        RegionSpec {
            name,
            port: free_port(),
            admin: free_port(),
            backends,
        }
    }
}

/// Knobs of the generated config.
pub struct Tweaks {
    pub host: &'static str,
    pub health: &'static str,
    pub outlier: &'static str,
    pub drain: &'static str,
}

impl Default for Tweaks {
    fn default() -> Self {
        Tweaks {
            host: "*",
            health: r#"{ path = "/health", interval = "200ms", jitter = "0ms", timeout = "200ms", healthy = 2, unhealthy = 2 }"#,
            outlier: r#"{ consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 50 }"#,
            drain: "2s",
        }
    }
}

/// The config file of region `me` (regions are in preference order).
pub fn config_for(regions: &[RegionSpec], me: usize, t: &Tweaks) -> String {
    let r = &regions[me];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[server]\nregion = \"{}\"\nlisten = [\"127.0.0.1:{}\"]\nthreads = 1\ndebug_headers = true\n# Loopback RTTs are noise: let `order` decide the nearest region.\nrtt_tolerance = \"1s\"\ndrain_period = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        r.name, r.port, t.drain, r.admin
    );
    if regions.len() > 1 {
        for (j, other) in regions.iter().enumerate() {
            let _ = writeln!(
                s,
                "[regions.{}]\npeer = \"http://127.0.0.1:{}\"\norder = {j}\n",
                other.name, other.port
            );
        }
    }
    let _ = writeln!(
        s,
        "[upstreams.api]\nhealth = {}\noutlier = {}",
        t.health, t.outlier
    );
    for other in regions {
        let list: Vec<String> = other.backends.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(s, "backends.{} = [{}]", other.name, list.join(", "));
    }
    let _ = writeln!(
        s,
        "\n[[routes]]\nname = \"api\"\nhost = \"{}\"\nupstream = \"api\"\npolicy = \"local-first\"",
        t.host
    );
    s
}

/// A running `edge-router run` process; killed on drop.
pub struct Edge {
    pub child: Child,
    pub port: u16,
    pub admin: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn edge_binary() -> &'static str {
    env!("CARGO_BIN_EXE_edge-router")
}

impl Edge {
    /// Start the real binary and wait until its health path answers.
    pub async fn start(config: &str, port: u16, admin: u16) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.path().join("edge.log");
        let child = Command::new(edge_binary())
            .args(["run", "-c"])
            .arg(&path)
            .env("EDGE_HOP_SECRET", HOP_SECRET)
            .env("EDGE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("EDGE_LOG", "info")
            .env_remove("EDGE_REGION")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("edge-router starts");
        let edge = Edge {
            child,
            port,
            admin,
            log,
            _dir: dir,
        };
        edge.wait_ready().await;
        edge
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = client();
        while Instant::now() < deadline {
            if c.get(self.url("/.edge/health")).send().await.is_ok()
                && c.get(self.admin_url("/status")).send().await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("edge-router did not start; log:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit, up to `limit`; returns how long it took.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start region `me` of `regions` with its generated config.
pub async fn start_region(regions: &[RegionSpec], me: usize, t: &Tweaks) -> Edge {
    let r = &regions[me];
    Edge::start(&config_for(regions, me, t), r.port, r.admin).await
}

/// Start every region, in order.
pub async fn start_all(regions: &[RegionSpec], t: &Tweaks) -> Vec<Edge> {
    let mut edges = Vec::new();
    for i in 0..regions.len() {
        edges.push(start_region(regions, i, t).await);
    }
    edges
}

/// The admin listener's Prometheus text.
pub async fn metrics(http: &reqwest::Client, edge: &Edge) -> String {
    let resp = http
        .get(edge.admin_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    resp.text().await.expect("metrics body")
}

/// The admin listener's `/status` document (must be valid JSON).
pub async fn status_json(http: &reqwest::Client, edge: &Edge) -> serde_json::Value {
    let resp = http
        .get(edge.admin_url("/status"))
        .send()
        .await
        .expect("GET /status");
    resp.json().await.expect("/status is valid JSON")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Status and the headers tests look at.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: u16,
    pub upstream_region: String,
    pub decision: String,
    pub origin: String,
    pub body: String,
}

pub async fn get(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Seen {
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (upstream_region, decision, origin) = (
        h("x-edge-upstream-region"),
        h("x-edge-decision"),
        h("x-origin-name"),
    );
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    Seen {
        status,
        upstream_region,
        decision,
        origin,
        body,
    }
}

/// Poll `check` every 20 ms until it holds or `limit` passes; returns the time it took.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

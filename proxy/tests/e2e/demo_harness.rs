//! `edge-router demo` as a test fixture (three regions, their origins, the
//! simulated global table and its control listener), and the readers tests
//! apply to responses and metrics.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// Generous bound that only catches a demo that never starts.
const HANG: Duration = Duration::from_secs(20);

const DEMO_TOKEN: &str = "demo-e2e-token";

/// The demo's regions, by index: region `i` listens on BASE+i.
pub const REGION_NAMES: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-1"];

/// The name of the demo's region `region`.
fn name(region: u16) -> &'static str {
    REGION_NAMES[usize::from(region)]
}

/// A response's header, or "".
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The sum of the samples of `metric` whose labels contain `label`.
pub fn sample(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `edge-router demo` on a free block of ports, killed on drop.
pub struct Demo {
    child: Child,
    pub base: u16,
    admin_base: u16,
}

impl Demo {
    /// Three regions with `delay` (e.g. `300ms`) between any two replicas;
    /// returns once every region's health path answers.
    pub async fn start(delay: &str) -> Demo {
        Demo::start_with(delay, None).await
    }

    /// [`Demo::start`]; with `tls_in`, `demo --tls` run from that directory
    /// (its development certificates land in `certs/dev` there).
    pub async fn start_with(delay: &str, tls_in: Option<&std::path::Path>) -> Demo {
        let (base, admin_base) = free_demo_ports();
        let mut cmd = Command::new(edge_binary());
        cmd.args([
            "demo",
            "--regions",
            "3",
            "--base-port",
            &base.to_string(),
            "--admin-base-port",
            &admin_base.to_string(),
            "--replication-delay",
            delay,
        ]);
        if let Some(dir) = tls_in {
            cmd.arg("--tls").current_dir(dir);
        }
        let child = cmd
            .env("EDGE_ADMIN_TOKEN", DEMO_TOKEN)
            .env("EDGE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("demo starts");
        let demo = Demo {
            child,
            base,
            admin_base,
        };
        let c = client();
        let ready = eventually(HANG, || async {
            let mut ok = true;
            for i in 0..3 {
                ok &= c
                    .get(demo.url(i, "/.edge/health"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
            }
            ok
        })
        .await;
        assert!(ready.is_some(), "demo did not start");
        demo
    }

    /// Region `region`'s traffic listener.
    pub fn url(&self, region: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + region)
    }

    /// Region `region`'s admin listener.
    pub fn admin(&self, region: u16, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_base + region)
    }

    /// The control listener (BASE+99).
    fn control(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.base + 99)
    }

    /// PUT `body` to the control listener's `path` (with its query); must succeed.
    async fn put_control(&self, path: &str, body: &str) {
        let resp = client()
            .put(self.control(path))
            .bearer_auth(DEMO_TOKEN)
            .body(body.to_string())
            .send()
            .await
            .expect("control listener");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "PUT {path} {body}: {status} {text}");
    }

    pub async fn set_delay(&self, delay: &str) {
        self.set_delay_at("", delay).await;
    }

    /// `query` is empty (every link) or `?from=A&to=B`.
    pub async fn set_delay_at(&self, query: &str, delay: &str) {
        let path = format!("/replication-delay{query}");
        self.put_control(&path, delay).await;
    }

    /// Region `region`'s replica of the simulated table: `down` (every read
    /// and write fails) or `up`.
    pub async fn set_table(&self, region: u16, state: &str) {
        let path = format!("/table?region={}", name(region));
        self.put_control(&path, state).await;
    }

    /// Traffic from region `from`'s proxy to region `to`'s proxy (forwards,
    /// probes, purge fan-out): `blocked` or `open`. Replication is not affected.
    pub async fn set_link(&self, from: u16, to: u16, state: &str) {
        let path = format!("/link?from={}&to={}", name(from), name(to));
        self.put_control(&path, state).await;
    }

    /// `POST /purge` on region `region`'s admin listener: the status and the
    /// body (JSON, or the text as a JSON string when it is not JSON).
    pub async fn purge(&self, region: u16, spec: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = client()
            .post(self.admin(region, "/purge"))
            .bearer_auth(DEMO_TOKEN)
            .json(&spec)
            .send()
            .await
            .expect("POST /purge");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = match serde_json::from_str(&text) {
            Ok(doc) => doc,
            Err(_) => serde_json::Value::String(text),
        };
        (status, body)
    }

    /// Region `region`'s `/status` document.
    pub async fn status(&self, region: u16) -> serde_json::Value {
        client()
            .get(self.admin(region, "/status"))
            .send()
            .await
            .expect("GET /status")
            .json()
            .await
            .expect("/status is valid JSON")
    }

    /// Region `region`'s Prometheus text.
    pub async fn metrics(&self, region: u16) -> String {
        client()
            .get(self.admin(region, "/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Wait until region `region` knows every region's replication lag.
    pub async fn wait_lag_known(&self, region: u16) {
        let c = client();
        let known = eventually(HANG, || async {
            let Ok(resp) = c.get(self.admin(region, "/status")).send().await else {
                return false;
            };
            let doc: serde_json::Value = resp.json().await.unwrap_or_default();
            doc["tables"]["lag"]
                .as_object()
                .is_some_and(|m| m.values().all(|v| v["watermark_ms"].is_u64()))
        })
        .await;
        assert!(known.is_some(), "lag never became known in region {region}");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A traffic base with BASE..BASE+105 free, and an admin base (BASE+200)
/// with 3 free. Each call starts at another candidate, so demos started at
/// the same time by this process's tests do not pick the same block.
fn free_demo_ports() -> (u16, u16) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for _ in 0..200 {
        let attempt = NEXT.fetch_add(1, Ordering::Relaxed);
        let offset = (std::process::id() * 131 + attempt * 211) % 8_000;
        let base = 20_000 + u16::try_from(offset).expect("below 8000");
        let admin = base + 200;
        if (0..106).all(|i| free(base + i)) && (0..3).all(|i| free(admin + i)) {
            return (base, admin);
        }
    }
    panic!("no free block of ports for the demo");
}

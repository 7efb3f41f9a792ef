//! Test harness: real `edge-router` processes and real origins on 127.0.0.1.

use std::fmt::Write as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_loadtest::origin::{Origin, OriginIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const HOP_SECRET: &str = "e2e-hop-secret-of-at-least-32-bytes";
pub const ADMIN_TOKEN: &str = "e2e-admin-token-of-at-least-32-bytes";

/// A port for the binary to bind (Pingora binds by itself, so we cannot
/// hand it a socket). Binding port 0 and releasing it races: another test
/// may be handed the same port, or an outgoing connection may take it as
/// its source port before the binary binds. So ports come from a counter
/// private to this test process, below the kernel's ephemeral range, and
/// are checked free before they are handed out.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        // Start at a per-process offset so concurrent test binaries differ too.
        let span = low - 11_000;
        let base = 10_000 + (std::process::id() * 97) % span;
        let _ = NEXT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
        for _ in 0..span {
            let p = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = 10_000 + (p - 10_000) % span;
            if let Ok(p) = u16::try_from(p) {
                if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                    return p;
                }
            }
        }
    }
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
    /// Raw TOML lines added to `[upstreams.api]`, e.g. `read_timeout = "500ms"`.
    pub upstream_extra: &'static str,
    /// Raw TOML appended at the end (e.g. a `[log]` section).
    pub tail: &'static str,
    /// Raw TOML lines added to `[server]`.
    pub server_extra: &'static str,
    /// The route's policy.
    pub policy: &'static str,
    /// Raw TOML lines added to the route (e.g. `allowed_regions = [...]`).
    pub route_extra: &'static str,
}

impl Default for Tweaks {
    fn default() -> Self {
        Tweaks {
            host: "*",
            health: r#"{ path = "/health", interval = "200ms", jitter = "0ms", timeout = "200ms", healthy = 2, unhealthy = 2 }"#,
            outlier: r#"{ consecutive_failures = 5, base_ejection = "30s", max_ejection_percent = 50 }"#,
            drain: "2s",
            upstream_extra: "",
            tail: "",
            server_extra: "",
            policy: "local-first",
            route_extra: "",
        }
    }
}

/// The config file of region `me` (regions are in preference order).
pub fn config_for(regions: &[RegionSpec], me: usize, t: &Tweaks) -> String {
    let r = &regions[me];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[server]\nregion = \"{}\"\nlisten = [\"127.0.0.1:{}\"]\nthreads = 1\ndebug_headers = true\n# Loopback RTTs are noise: let `order` decide the nearest region.\nrtt_tolerance = \"1s\"\ndrain_period = \"{}\"\n{}\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        r.name, r.port, t.drain, t.server_extra, r.admin
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
    if !t.upstream_extra.is_empty() {
        let _ = writeln!(s, "{}", t.upstream_extra);
    }
    for other in regions {
        let list: Vec<String> = other.backends.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(s, "backends.{} = [{}]", other.name, list.join(", "));
    }
    let _ = writeln!(
        s,
        "\n[[routes]]\nname = \"api\"\nhost = \"{}\"\nupstream = \"api\"\npolicy = \"{}\"\n{}",
        t.host, t.policy, t.route_extra
    );
    s.push_str(t.tail);
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
        Edge::start_with_env(config, port, admin, &[]).await
    }

    /// [`Edge::start`] with extra environment variables, which override the
    /// harness's (e.g. another `EDGE_HOP_SECRET` than [`HOP_SECRET`]).
    pub async fn start_with_env(config: &str, port: u16, admin: u16, env: &[(&str, &str)]) -> Edge {
        Edge::start_wrapped(&[], config, port, admin, env).await
    }

    /// [`Edge::start_with_env`], with the binary run by `wrapper` (a
    /// command that execs its last arguments, e.g. `unshare … sh -c …`).
    pub async fn start_wrapped(
        wrapper: &[&str],
        config: &str,
        port: u16,
        admin: u16,
        env: &[(&str, &str)],
    ) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, config).expect("write config");
        let log = dir.path().join("edge.log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(edge_binary());
                c
            }
            None => Command::new(edge_binary()),
        };
        command
            .args(["run", "-c"])
            .arg(&path)
            .env("EDGE_HOP_SECRET", HOP_SECRET)
            .env("EDGE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("EDGE_LOG", "info")
            .env_remove("EDGE_REGION");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
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

    /// The config file it was started with (rewrite it, then reload).
    pub fn config_path(&self) -> PathBuf {
        self.log.with_file_name("edge.toml")
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

/// `POST /reload` with the admin token: the status and the JSON answer.
pub async fn post_reload(edge: &Edge) -> (u16, serde_json::Value) {
    let resp = client()
        .post(edge.admin_url("/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("POST /reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Start region `me` of `regions` with its generated config.
pub async fn start_region(regions: &[RegionSpec], me: usize, t: &Tweaks) -> Edge {
    let r = &regions[me];
    Edge::start(&config_for(regions, me, t), r.port, r.admin).await
}

/// One region, "solo", with one origin "o1", started with `t`.
pub async fn solo_edge(t: &Tweaks) -> (Origin, Edge) {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let edge = start_region(&regions, 0, t).await;
    (o, edge)
}

/// Connect to the edge on 127.0.0.1:`port` and send `request` exactly as written.
async fn send_raw(port: u16, request: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the edge");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    stream
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

/// Poll the admin `/metrics` until a line starting with `prefix` (a metric
/// name, optionally with labels) ends with ` value`; true when one did.
pub async fn wait_for_metric(
    http: &reqwest::Client,
    edge: &Edge,
    prefix: &str,
    value: &str,
    limit: Duration,
) -> bool {
    let suffix = format!(" {value}");
    eventually(limit, || async {
        metrics(http, edge)
            .await
            .lines()
            .any(|l| l.starts_with(prefix) && l.ends_with(&suffix))
    })
    .await
    .is_some()
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

/// A GET whose transport error is recorded as status 0 (with the error as
/// body) instead of a panic, for load loops that report every failure.
pub async fn try_get(c: &reqwest::Client, url: &str) -> Seen {
    match c.get(url).send().await {
        Ok(resp) => seen(resp).await,
        Err(e) => Seen {
            status: 0,
            upstream_region: String::new(),
            decision: String::new(),
            origin: String::new(),
            body: e.to_string(),
        },
    }
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
    seen(resp).await
}

async fn seen(resp: reqwest::Response) -> Seen {
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

/// The sum of every sample of metric `name` in Prometheus text (0 when absent).
pub fn metric_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Raw exchanges wait this long only to catch a hang.
const RAW_HANG: Duration = Duration::from_secs(10);

/// Where the head of an HTTP/1 message ends: just past its blank line.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// A request head (up to the blank line) read off a socket; None if the peer
/// closes first. Test requests have no body.
async fn read_request_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while head_end(&buf).is_none() {
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

/// A hand-written HTTP/1.1 origin for tests of misbehaving backends. It
/// answers the proxy's health probes (`GET /health`, the [`Tweaks`] default)
/// itself, with `connection: close` so no probe reuses a connection, and
/// hands every other request's socket and head to `misbehave`. It serves
/// until the test's runtime shuts down.
pub async fn raw_origin<F, Fut>(misbehave: F) -> SocketAddr
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("raw origin binds");
    let addr = listener.local_addr().expect("raw origin address");
    let misbehave = Arc::new(misbehave);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let misbehave = misbehave.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut stream).await else {
                    return;
                };
                if head.split_ascii_whitespace().nth(1) == Some("/health") {
                    let _ = stream.write_all(HEALTH_OK).await;
                    let _ = stream.shutdown().await;
                } else {
                    (*misbehave)(stream, head).await;
                }
            });
        }
    });
    addr
}

/// Send `request` exactly as written to the edge on 127.0.0.1:`port` and
/// read until the edge closes the connection (a reset counts as closed).
/// Panics if it is still open after 10 s: that is a hang.
pub async fn raw_until_eof(port: u16, request: &str) -> Vec<u8> {
    let mut stream = send_raw(port, request).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(RAW_HANG, stream.read_to_end(&mut out)).await;
    assert!(
        closed.is_ok(),
        "the edge did not close the connection within {RAW_HANG:?}; received so far:\n{}",
        String::from_utf8_lossy(&out)
    );
    out
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (the stock origin's answer).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}\n{}", self.text()))
    }
}

/// Send `request` exactly as written (reqwest would normalise the path or
/// refuse the Host) to the edge on 127.0.0.1:`port` and read one response:
/// its head, then a Content-Length body, a chunked body, or all up to EOF.
pub async fn raw_request(port: u16, request: &str) -> RawResponse {
    let mut stream = send_raw(port, request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(RAW_HANG, async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(r) = parse_response(&buf, false) {
                return Some(r);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_response(&buf, true),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(Some(resp)) => resp,
        Ok(None) => panic!(
            "the edge closed the connection without a response head; received:\n{}",
            String::from_utf8_lossy(&buf)
        ),
        Err(_) => panic!(
            "no complete response within {RAW_HANG:?}; received so far:\n{}",
            String::from_utf8_lossy(&buf)
        ),
    }
}

/// A complete response in `buf`, or None while more bytes are needed
/// (`eof`: no more will come, so whatever arrived is the body).
fn parse_response(buf: &[u8], eof: bool) -> Option<RawResponse> {
    let end = head_end(buf)?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse::<u16>()
        .ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let chunked =
        find("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = find("content-length").and_then(|l| l.parse::<usize>().ok());
    let rest = &buf[end..];
    let body = if matches!(status, 100..=199 | 204 | 304) {
        Some(Vec::new())
    } else if chunked {
        decode_chunked(rest)
    } else if let Some(len) = length {
        (rest.len() >= len).then(|| rest[..len].to_vec())
    } else {
        None
    };
    let body = match (body, eof) {
        (Some(b), _) => b,
        (None, true) => rest.to_vec(),
        (None, false) => return None,
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// A complete chunked body, decoded; None while it is incomplete.
fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // The last chunk, then trailers up to a blank line.
            let done = data.starts_with(b"\r\n") || head_end(data).is_some();
            return done.then_some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// `[server]` lines for a TLS listener on 127.0.0.1:`port` with the pairs
/// in `certs` (for `Tweaks::server_extra`, which wants a static string).
pub fn tls_listener_toml(port: u16, certs: &std::path::Path) -> &'static str {
    Box::leak(
        format!(
            "\n[[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncerts = \"{}\"\n",
            certs.display()
        )
        .into_boxed_str(),
    )
}

/// The certificate chain and key of a PEM pair `NAME.crt` / `NAME.key` in `dir`.
pub fn pem_pair(
    dir: &std::path::Path,
    name: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key")))
        .expect("key");
    (chain, key)
}

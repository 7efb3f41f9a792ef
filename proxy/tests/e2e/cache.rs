//! The HTTP cache (RFC 9111 / 5861 as a shared cache): what is stored, how
//! long it is served, how it is revalidated and invalidated, and that the
//! store stays within its bytes. Each test scripts a small hyper origin
//! (responses per path, requests counted per path) behind one edge region
//! whose route has `cache = true`, and reads `x-cache` off real responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::support::*;

/// The Host every request carries unless a test says otherwise (route host is `*`).
const HOST: &str = "cache.test";

/// Route TOML: the cache on.
const CACHED: &str = "cache = true";

/// Sleeping this long makes a `max-age=1` object stale: the age is the behaviour under test.
const PAST_MAX_AGE_1: Duration = Duration::from_millis(1500);

/// Only catches a hang.
const HANG: Duration = Duration::from_secs(15);

const ETAG: &str = "\"v1\"";

// ---------------------------------------------------------------------------
// The scripted origin.

/// What the origin saw of one request, for a script to answer.
struct Asked {
    method: Method,
    headers: HeaderMap,
    /// 1 for the first request to this path, 2 for the second, ...
    n: usize,
}

impl Asked {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One scripted answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    delay: Duration,
}

impl Reply {
    fn new(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::new(200, body)
    }

    /// 200 with `Cache-Control: max-age=60`.
    fn fresh(body: impl Into<Bytes>) -> Reply {
        Reply::ok(body).cc("max-age=60")
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// `Cache-Control: value`.
    fn cc(self, value: &str) -> Reply {
        self.header("cache-control", value)
    }

    /// Answer only after `delay`.
    fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Script = Arc<dyn Fn(&Asked) -> Reply + Send + Sync>;

#[derive(Default)]
struct OriginState {
    /// Path (or a prefix ending in `/`) => how to answer.
    scripts: Mutex<HashMap<String, Script>>,
    /// Path => requests received (counted on arrival, before any delay).
    counts: Mutex<HashMap<String, usize>>,
    /// Path => the headers of the last request.
    last: Mutex<HashMap<String, HeaderMap>>,
}

impl OriginState {
    /// The script for `path`: its own, else the longest prefix ending in `/`.
    fn script_for(&self, path: &str) -> Option<Script> {
        let scripts = self.scripts.lock().unwrap();
        if let Some(s) = scripts.get(path) {
            return Some(s.clone());
        }
        scripts
            .iter()
            .filter(|(k, _)| k.ends_with('/') && path.starts_with(k.as_str()))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, s)| s.clone())
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/health" {
            return Response::new(Full::new(Bytes::from_static(b"ok")));
        }
        let n = {
            let mut counts = self.counts.lock().unwrap();
            let n = counts.entry(path.clone()).or_default();
            *n += 1;
            *n
        };
        self.last
            .lock()
            .unwrap()
            .insert(path.clone(), req.headers().clone());
        let asked = Asked {
            method: req.method().clone(),
            headers: req.headers().clone(),
            n,
        };
        let reply = match self.script_for(&path) {
            Some(script) => (*script)(&asked),
            None => Reply::new(404, "no script for this path"),
        };
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let mut resp = Response::new(Full::new(reply.body));
        *resp.status_mut() = StatusCode::from_u16(reply.status).expect("a valid status");
        let headers = resp.headers_mut();
        for (name, value) in reply.headers {
            let value = HeaderValue::from_str(&value).expect("a header value");
            headers.append(HeaderName::from_static(name), value);
        }
        resp
    }
}

/// An HTTP/1.1 origin on 127.0.0.1 answering each path as scripted (404
/// when unscripted; `/health` always 200 and not counted). Serves until the
/// test's runtime ends.
struct TestOrigin {
    addr: SocketAddr,
    state: Arc<OriginState>,
}

impl TestOrigin {
    async fn start() -> TestOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test origin binds");
        let addr = listener.local_addr().expect("test origin address");
        let state = Arc::new(OriginState::default());
        let serving = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestOrigin { addr, state }
    }

    /// Answer `path` (or, ending in `/`, everything under it) with `script`.
    fn script(&self, path: &str, script: impl Fn(&Asked) -> Reply + Send + Sync + 'static) {
        let script: Script = Arc::new(script);
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_string(), script);
    }

    /// Answer `path` with `reply` every time.
    fn reply(&self, path: &str, reply: Reply) {
        self.script(path, move |_| reply.clone());
    }

    /// Requests `path` received so far.
    fn count(&self, path: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Header `name` of the last request to `path`.
    fn last_header(&self, path: &str, name: &str) -> Option<String> {
        let last = self.state.last.lock().unwrap();
        let value = last.get(path)?.get(name)?;
        value.to_str().ok().map(str::to_string)
    }
}

/// An object with an ETag: 200 with `body`, or 304 when If-None-Match names
/// it; both with `cache_control` (if any), the ETag and `x-version: N`, N
/// being the request's number (so a 304's new header is visible).
fn etagged(
    body: &'static str,
    cache_control: &'static str,
) -> impl Fn(&Asked) -> Reply + Send + Sync + 'static {
    move |r: &Asked| {
        let matched = r.header("if-none-match").is_some_and(|v| v.contains(ETAG));
        let reply = if matched {
            Reply::new(304, "")
        } else {
            Reply::ok(body)
        };
        let reply = reply
            .header("etag", ETAG)
            .header("x-version", r.n.to_string());
        if cache_control.is_empty() {
            reply
        } else {
            reply.cc(cache_control)
        }
    }
}

/// An object with `Last-Modified: date`: 200 with `body`, or 304
/// to any If-Modified-Since; both with `cache_control` (if any).
fn last_modified(
    body: &'static str,
    date: String,
    cache_control: &'static str,
) -> impl Fn(&Asked) -> Reply + Send + Sync + 'static {
    move |r: &Asked| {
        let reply = if r.header("if-modified-since").is_some() {
            Reply::new(304, "")
        } else {
            Reply::ok(body)
        };
        let reply = reply.header("last-modified", date.clone());
        if cache_control.is_empty() {
            reply
        } else {
            reply.cc(cache_control)
        }
    }
}

/// `n=N`, N being the request's number for its path, fresh for a minute.
fn numbered(r: &Asked) -> Reply {
    Reply::fresh(format!("n={}", r.n))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let since = t.duration_since(UNIX_EPOCH).expect("after 1970");
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (H. Hinnant's algorithm), for days since 1970-01-01.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------
// The edge in front of it.

/// A response as the client got it.
struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.text().chars().take(200).collect();
        f.debug_struct("Resp")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("body", &shown)
            .finish()
    }
}

/// The response is a 200 with `body`, and `x-cache: x_cache`.
#[track_caller]
fn seen_as(r: &Resp, x_cache: &str, body: &str) {
    assert_eq!(
        (r.status, r.x_cache(), r.text().as_str()),
        (200, x_cache, body),
        "{r:?}"
    );
}

/// One edge region ("solo") whose only backend is a [`TestOrigin`].
struct Site {
    origin: TestOrigin,
    edge: Edge,
    http: reqwest::Client,
}

impl Site {
    /// Start it with `t`, and wait until the cache has read the invalidation
    /// table once (before that, lookups may be bypassed).
    async fn start(t: &Tweaks) -> Site {
        let origin = TestOrigin::start().await;
        let regions = vec![RegionSpec::new("solo", vec![origin.addr])];
        let edge = start_region(&regions, 0, t).await;
        let http = client();
        let synced = eventually(HANG, || async {
            status_json(&http, &edge).await["cache"]["synced"] == true
        })
        .await;
        assert!(
            synced.is_some(),
            "the cache never synced: {}\nlog:\n{}",
            status_json(&http, &edge).await,
            edge.log_text()
        );
        Site { origin, edge, http }
    }

    /// `method path` with `Host: cache.test` (unless `headers` has a Host) and `headers`.
    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = self.http.request(method.clone(), self.edge.url(path));
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", HOST);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"));
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[]).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, path, headers).await
    }

    /// `POST /purge` on the admin listener, `body` as written.
    async fn purge(&self, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.edge.admin_url("/purge"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("POST /purge");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = match serde_json::from_str::<Value>(&text) {
            Ok(json) => json,
            Err(_) => Value::String(text),
        };
        (status, body)
    }

    /// A purge that must be accepted (202 with an id); returns `applied`.
    async fn purged(&self, spec: Value) -> u64 {
        let (status, body) = self.purge(Some(ADMIN_TOKEN), &spec.to_string()).await;
        assert_eq!(status, 202, "purge {spec}: {body}");
        assert!(
            body["id"].as_str().is_some_and(|id| !id.is_empty()),
            "a 202 names the purge: {body}"
        );
        body["applied"]
            .as_u64()
            .unwrap_or_else(|| panic!("a 202 says what it applied: {body}"))
    }

    /// Poll /metrics until the samples of `name` whose labels contain
    /// `label` sum to at least `min`; that sum.
    async fn metric_at_least(&self, name: &str, label: &str, min: f64) -> f64 {
        let reached = eventually(HANG, || async {
            labelled(&metrics(&self.http, &self.edge).await, name, label) >= min
        })
        .await;
        let text = metrics(&self.http, &self.edge).await;
        assert!(
            reached.is_some(),
            "{name}{{..{label}..}} stayed below {min}:\n{text}"
        );
        labelled(&text, name, label)
    }
}

/// The cache key URL of `path` on [`HOST`].
fn key(path: &str) -> String {
    format!("http://{HOST}{path}")
}

/// The sum of the samples of metric `name` whose labels contain `label`.
fn labelled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn cached() -> Tweaks {
    Tweaks {
        route_extra: CACHED,
        ..Tweaks::default()
    }
}

// ---------------------------------------------------------------------------
// Freshness.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_response_is_a_hit_the_second_time() {
    let s = Site::start(&cached()).await;
    s.origin.reply("/fresh", Reply::fresh("fresh body"));

    let first = s.get("/fresh").await;
    seen_as(&first, "MISS", "fresh body");
    let timing = first.header("server-timing").unwrap_or("");
    assert!(timing.contains("cache;desc=MISS"), "{first:?}");

    let second = s.get("/fresh").await;
    seen_as(&second, "HIT", "fresh body");
    let age = second.header("age");
    assert!(
        age.is_some_and(|a| a.parse::<u64>().is_ok()),
        "a copy from storage carries Age: {second:?}"
    );
    let timing = second.header("server-timing").unwrap_or("");
    assert!(
        timing.contains("cache;desc=HIT") && timing.contains("edge;dur="),
        "{second:?}"
    );
    assert_eq!(s.origin.count("/fresh"), 1);
    s.metric_at_least("edge_cache_lookups_total", "result=\"hit\"", 1.0)
        .await;
    s.metric_at_least("edge_cache_lookups_total", "result=\"miss\"", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_from_s_maxage_expires_and_upstream_age() {
    let s = Site::start(&cached()).await;
    // Already 100 s old with 102 s of life: fresh for about 2 s more.
    let aged = Reply::ok("aged").cc("max-age=102").header("age", "100");
    s.origin.reply("/aged", aged);
    let shared = Reply::ok("shared").cc("s-maxage=60, max-age=0");
    s.origin.reply("/s-maxage", shared);
    let expires = http_date(SystemTime::now() + Duration::from_secs(120));
    let expires = Reply::ok("expires").header("expires", expires);
    s.origin.reply("/expires", expires);

    seen_as(&s.get("/aged").await, "MISS", "aged");
    seen_as(&s.get("/aged").await, "HIT", "aged");
    for (path, body) in [("/s-maxage", "shared"), ("/expires", "expires")] {
        seen_as(&s.get(path).await, "MISS", body);
        seen_as(&s.get(path).await, "HIT", body);
        assert_eq!(s.origin.count(path), 1, "{path}");
    }

    // Without subtracting the upstream Age it would be fresh for 102 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = s.get("/aged").await;
    assert_eq!((r.status, r.text().as_str()), (200, "aged"), "{r:?}");
    assert_ne!(r.x_cache(), "HIT", "the upstream Age counts: {r:?}");
    assert_eq!(s.origin.count("/aged"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_and_private_are_never_stored() {
    let s = Site::start(&cached()).await;
    let no_store = Reply::ok("ns").cc("no-store, max-age=60");
    s.origin.reply("/no-store", no_store);
    let private = Reply::ok("pv").cc("private, max-age=60");
    s.origin.reply("/private", private);
    for (path, body) in [("/no-store", "ns"), ("/private", "pv")] {
        seen_as(&s.get(path).await, "MISS", body);
        seen_as(&s.get(path).await, "MISS", body);
        assert_eq!(s.origin.count(path), 2, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_freshness_and_no_validator_is_not_stored() {
    let s = Site::start(&cached()).await;
    s.origin.reply("/bare", Reply::ok("bare"));
    seen_as(&s.get("/bare").await, "MISS", "bare");
    seen_as(&s.get("/bare").await, "MISS", "bare");
    assert_eq!(s.origin.count("/bare"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_only_is_stored_and_revalidated_on_each_use() {
    let s = Site::start(&cached()).await;
    s.origin.script("/etag", etagged("etag body", ""));

    let first = s.get("/etag").await;
    seen_as(&first, "MISS", "etag body");
    assert_eq!(first.header("x-version"), Some("1"), "{first:?}");
    for n in 2..=3 {
        let r = s.get("/etag").await;
        seen_as(&r, "REVALIDATED", "etag body");
        assert_eq!(
            r.header("x-version"),
            Some(n.to_string().as_str()),
            "the 304's headers update the stored copy: {r:?}"
        );
        assert_eq!(s.origin.count("/etag"), n);
        assert_eq!(
            s.origin.last_header("/etag", "if-none-match").as_deref(),
            Some(ETAG),
            "revalidation {n} is conditional"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_with_last_modified_is_revalidated_each_time() {
    let s = Site::start(&cached()).await;
    let lm = http_date(SystemTime::now() - Duration::from_secs(3600));
    let script = last_modified("lm body", lm.clone(), "no-cache");
    s.origin.script("/lm", script);

    seen_as(&s.get("/lm").await, "MISS", "lm body");
    for n in 2..=3 {
        seen_as(&s.get("/lm").await, "REVALIDATED", "lm body");
        assert_eq!(s.origin.count("/lm"), n);
        assert_eq!(
            s.origin.last_header("/lm", "if-modified-since").as_deref(),
            Some(lm.as_str()),
            "revalidation {n} sends If-Modified-Since"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_freshness_only_when_the_route_opts_in() {
    const HEURISTIC: &str = "cache = true\ncache_heuristic = true";
    // A month old: 10 % of that is more than the one-day cap, so fresh for a day.
    let lm = http_date(SystemTime::now() - Duration::from_secs(30 * 86_400));
    for (route_extra, second) in [(HEURISTIC, "HIT"), (CACHED, "REVALIDATED")] {
        let s = Site::start(&Tweaks {
            route_extra,
            ..Tweaks::default()
        })
        .await;
        let script = last_modified("old", lm.clone(), "");
        s.origin.script("/old", script);
        seen_as(&s.get("/old").await, "MISS", "old");
        seen_as(&s.get("/old").await, second, "old");
        let expected = if second == "HIT" { 1 } else { 2 };
        assert_eq!(s.origin.count("/old"), expected, "{route_extra}");
    }
}

// ---------------------------------------------------------------------------
// Secondary keys and the primary key.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_variants_are_stored_apart_and_purged_together() {
    let s = Site::start(&cached()).await;
    s.origin.script("/vary", |r| {
        let encoding = r.header("accept-encoding").unwrap_or("none");
        let reply = Reply::fresh(format!("enc={encoding}"));
        reply.header("vary", "Accept-Encoding")
    });
    let gzip: &[(&str, &str)] = &[("accept-encoding", "gzip")];
    let plain: &[(&str, &str)] = &[("accept-encoding", "identity")];

    seen_as(&s.get_with("/vary", gzip).await, "MISS", "enc=gzip");
    seen_as(&s.get_with("/vary", plain).await, "MISS", "enc=identity");
    seen_as(&s.get_with("/vary", gzip).await, "HIT", "enc=gzip");
    seen_as(&s.get_with("/vary", plain).await, "HIT", "enc=identity");
    assert_eq!(s.origin.count("/vary"), 2);

    let applied = s.purged(json!({ "keys": [key("/vary")] })).await;
    assert_eq!(applied, 2, "both variants of the URL");
    seen_as(&s.get_with("/vary", gzip).await, "MISS", "enc=gzip");
    seen_as(&s.get_with("/vary", plain).await, "MISS", "enc=identity");
    assert_eq!(s.origin.count("/vary"), 4);

    let star = Reply::fresh("star").header("vary", "*");
    s.origin.reply("/vary-star", star);
    seen_as(&s.get("/vary-star").await, "MISS", "star");
    seen_as(&s.get("/vary-star").await, "MISS", "star");
    assert_eq!(s.origin.count("/vary-star"), 2, "Vary: * is never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keys_include_the_host() {
    let s = Site::start(&cached()).await;
    // The body names the request's number, whatever Host the origin is sent.
    s.origin.script("/who", numbered);
    let a: &[(&str, &str)] = &[("host", "a.example")];
    let b: &[(&str, &str)] = &[("host", "b.example")];
    let upper_a: &[(&str, &str)] = &[("host", "A.EXAMPLE")];

    seen_as(&s.get_with("/who", a).await, "MISS", "n=1");
    seen_as(&s.get_with("/who", b).await, "MISS", "n=2");
    seen_as(&s.get_with("/who", a).await, "HIT", "n=1");
    seen_as(&s.get_with("/who", b).await, "HIT", "n=2");
    seen_as(&s.get_with("/who", upper_a).await, "HIT", "n=1");
    assert_eq!(s.origin.count("/who"), 2);
}

// ---------------------------------------------------------------------------
// Stale copies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background() {
    let s = Site::start(&cached()).await;
    // The refreshed copy lives a minute, so the refresh is seen as a HIT.
    s.origin.script("/swr", |r| {
        let cc = if r.n == 1 {
            "max-age=1, stale-while-revalidate=30"
        } else {
            "max-age=60"
        };
        Reply::ok(format!("v{}", r.n)).cc(cc)
    });
    seen_as(&s.get("/swr").await, "MISS", "v1");
    tokio::time::sleep(PAST_MAX_AGE_1).await;

    seen_as(&s.get("/swr").await, "STALE", "v1");
    let refreshed = eventually(HANG, || async {
        let r = s.get("/swr").await;
        r.x_cache() == "HIT" && r.text() == "v2"
    })
    .await;
    assert!(
        refreshed.is_some(),
        "the background refresh never stored v2: {:?}",
        s.get("/swr").await
    );
    assert_eq!(s.origin.count("/swr"), 2, "exactly one background refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_stale_unless_must_revalidate() {
    let s = Site::start(&cached()).await;
    let lenient = Reply::ok("old").cc("max-age=1, stale-if-error=60");
    s.origin.reply("/sie", lenient);
    let strict = "max-age=1, must-revalidate, stale-if-error=60";
    s.origin.reply("/must", Reply::ok("old").cc(strict));
    seen_as(&s.get("/sie").await, "MISS", "old");
    seen_as(&s.get("/must").await, "MISS", "old");
    s.origin.reply("/sie", Reply::new(500, "boom"));
    s.origin.reply("/must", Reply::new(500, "boom"));
    tokio::time::sleep(PAST_MAX_AGE_1).await;

    seen_as(&s.get("/sie").await, "STALE", "old");
    assert_eq!(s.origin.count("/sie"), 2, "the origin was asked first");

    let r = s.get("/must").await;
    assert!(
        r.status >= 500 && r.text() != "old" && r.x_cache() != "STALE",
        "must-revalidate: the error reaches the client, never the stale copy: {r:?}"
    );
    assert_eq!(s.origin.count("/must"), 2);
}

// ---------------------------------------------------------------------------
// What may be stored.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_stored_only_with_public_or_s_maxage() {
    let s = Site::start(&cached()).await;
    let auth: &[(&str, &str)] = &[("authorization", "Bearer user-1")];
    s.origin.reply("/auth/plain", Reply::fresh("plain"));
    let public = Reply::ok("public").cc("public, max-age=60");
    s.origin.reply("/auth/public", public);
    let shared = Reply::ok("shared").cc("s-maxage=60");
    s.origin.reply("/auth/shared", shared);

    for _ in 0..2 {
        let r = s.get_with("/auth/plain", auth).await;
        assert_eq!((r.status, r.text().as_str()), (200, "plain"), "{r:?}");
        assert_ne!(r.x_cache(), "HIT", "{r:?}");
    }
    assert_eq!(s.origin.count("/auth/plain"), 2, "not stored");

    for (path, body) in [("/auth/public", "public"), ("/auth/shared", "shared")] {
        seen_as(&s.get_with(path, auth).await, "MISS", body);
        seen_as(&s.get_with(path, auth).await, "HIT", body);
        assert_eq!(s.origin.count(path), 1, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_is_stored_only_when_the_route_opts_in() {
    let cookie = || Reply::fresh("cookie").header("set-cookie", "a=1");

    let plain = Site::start(&cached()).await;
    plain.origin.reply("/cookie", cookie());
    for _ in 0..2 {
        let r = plain.get("/cookie").await;
        let seen = (r.status, r.header("set-cookie"));
        assert_eq!(seen, (200, Some("a=1")), "{r:?}");
        assert_ne!(r.x_cache(), "HIT", "{r:?}");
    }
    assert_eq!(plain.origin.count("/cookie"), 2, "not stored by default");

    let opted = Site::start(&Tweaks {
        route_extra: "cache = true\ncache_set_cookie = true",
        ..Tweaks::default()
    })
    .await;
    opted.origin.reply("/cookie", cookie());
    let first = opted.get("/cookie").await;
    seen_as(&first, "MISS", "cookie");
    assert_eq!(
        first.header("set-cookie"),
        Some("a=1"),
        "the client that caused the fill gets its cookie: {first:?}"
    );
    let hit = opted.get("/cookie").await;
    seen_as(&hit, "HIT", "cookie");
    assert_eq!(
        hit.header("set-cookie"),
        None,
        "no cookie from storage: {hit:?}"
    );
    assert_eq!(opted.origin.count("/cookie"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_served_from_a_stored_get() {
    let s = Site::start(&cached()).await;
    s.origin.reply("/head", Reply::fresh("head body"));
    seen_as(&s.get("/head").await, "MISS", "head body");
    let r = s.send(Method::HEAD, "/head", &[]).await;
    let seen = (r.status, r.x_cache(), r.body.len());
    assert_eq!(seen, (200, "HIT", 0), "{r:?}");
    assert_eq!(s.origin.count("/head"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_above_max_object_size_stream_through_uncached() {
    let s = Site::start(&Tweaks {
        route_extra: CACHED,
        tail: "\n[cache]\nmax_object_size = \"64KiB\"\n",
        ..Tweaks::default()
    })
    .await;
    let big: Vec<u8> = (0..200 * 1024usize).map(|i| (i % 251) as u8).collect();
    s.origin.reply("/big", Reply::fresh(big.clone()));
    for _ in 0..2 {
        let r = s.get("/big").await;
        assert_eq!((r.status, r.x_cache()), (200, "MISS"), "{r:?}");
        assert_eq!(r.body.len(), big.len(), "every byte arrives");
        assert!(r.body[..] == big[..], "the body arrives intact");
    }
    assert_eq!(s.origin.count("/big"), 2, "not stored");

    // Below the limit the same route stores.
    let small = Reply::fresh(vec![7u8; 32 * 1024]);
    s.origin.reply("/small", small);
    assert_eq!(s.get("/small").await.x_cache(), "MISS");
    let r = s.get("/small").await;
    assert_eq!((r.x_cache(), r.body.len()), ("HIT", 32 * 1024), "{r:?}");
}

// ---------------------------------------------------------------------------
// The client's request directives.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_directives() {
    let s = Site::start(&cached()).await;
    s.origin.script("/cc", etagged("cc body", "max-age=60"));
    seen_as(&s.get("/cc").await, "MISS", "cc body");
    seen_as(&s.get("/cc").await, "HIT", "cc body");
    assert_eq!(s.origin.count("/cc"), 1);

    // Revalidated with the origin before use.
    let mut expected = 1;
    for directive in ["no-cache", "max-age=0", "min-fresh=3600"] {
        let r = s.get_with("/cc", &[("cache-control", directive)]).await;
        seen_as(&r, "REVALIDATED", "cc body");
        expected += 1;
        assert_eq!(s.origin.count("/cc"), expected, "{directive}");
        assert_eq!(
            s.origin.last_header("/cc", "if-none-match").as_deref(),
            Some(ETAG),
            "{directive}: a conditional request"
        );
    }

    // Neither served from nor stored.
    let r = s.get_with("/cc", &[("cache-control", "no-store")]).await;
    seen_as(&r, "BYPASS", "cc body");
    assert_eq!(s.origin.count("/cc"), expected + 1);

    // From the cache or nothing.
    let only: &[(&str, &str)] = &[("cache-control", "only-if-cached")];
    seen_as(&s.get_with("/cc", only).await, "HIT", "cc body");
    let r = s.get_with("/never", only).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(s.origin.count("/never"), 0, "never goes upstream");

    // A stale copy is acceptable to this client.
    s.origin.reply("/old", Reply::ok("old").cc("max-age=1"));
    seen_as(&s.get("/old").await, "MISS", "old");
    tokio::time::sleep(PAST_MAX_AGE_1).await;
    let stale_ok: &[(&str, &str)] = &[("cache-control", "max-stale=60")];
    seen_as(&s.get_with("/old", stale_ok).await, "STALE", "old");
    assert_eq!(s.origin.count("/old"), 1);
    let r = s.get("/old").await;
    assert!(
        !matches!(r.x_cache(), "HIT" | "STALE"),
        "without max-stale the expired copy is not served: {r:?}"
    );
    assert_eq!(s.origin.count("/old"), 2);
}

// ---------------------------------------------------------------------------
// One fetch for many misses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_request() {
    const CLIENTS: usize = 200;
    let s = Site::start(&cached()).await;
    let slow = Reply::fresh("slow body").delay(Duration::from_millis(300));
    s.origin.reply("/slow", slow);
    let mut tasks = JoinSet::new();
    for _ in 0..CLIENTS {
        let http = s.http.clone();
        let url = s.edge.url("/slow");
        tasks.spawn(async move {
            let resp = http.get(url).header("host", HOST).send().await?;
            let status = resp.status().as_u16();
            let body = resp.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("client task") {
            Ok((200, body)) if body == "slow body" => {}
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients did not get the body: {failures:?}",
        failures.len()
    );
    assert_eq!(s.origin.count("/slow"), 1, "one request went upstream");
}

// ---------------------------------------------------------------------------
// Invalidation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_the_url_and_its_location() {
    let s = Site::start(&cached()).await;
    s.origin.script("/inv", |r| {
        if r.method == Method::POST {
            Reply::new(201, "created")
                .header("location", "/other")
                .header("content-location", format!("http://{HOST}/third"))
        } else {
            Reply::fresh("inv")
        }
    });
    s.origin.script("/keep", |r| {
        if r.method == Method::POST {
            Reply::new(500, "failed")
        } else {
            Reply::fresh("keep")
        }
    });
    s.origin.reply("/other", Reply::fresh("other"));
    s.origin.reply("/third", Reply::fresh("third"));
    for (path, body) in [
        ("/inv", "inv"),
        ("/other", "other"),
        ("/third", "third"),
        ("/keep", "keep"),
    ] {
        seen_as(&s.get(path).await, "MISS", body);
        seen_as(&s.get(path).await, "HIT", body);
    }

    let r = s.send(Method::POST, "/inv", &[]).await;
    assert_eq!(r.status, 201, "{r:?}");
    for (path, body) in [("/inv", "inv"), ("/other", "other"), ("/third", "third")] {
        seen_as(&s.get(path).await, "MISS", body);
    }

    let r = s.send(Method::POST, "/keep", &[]).await;
    assert_eq!(r.status, 500, "{r:?}");
    seen_as(&s.get("/keep").await, "HIT", "keep");
}

/// Purge bodies the admin API refuses (400).
const BAD_PURGES: [&str; 4] = [
    "not json",
    "{}",
    r#"{"soft":true}"#,
    r#"{"keys":"http://x/"}"#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_the_token_and_a_target() {
    let s = Site::start(&cached()).await;
    let all = r#"{"all":true}"#;
    assert_eq!(s.purge(None, all).await.0, 401, "no token");
    assert_eq!(s.purge(Some("wrong"), all).await.0, 401, "wrong token");
    for body in BAD_PURGES {
        let (status, answer) = s.purge(Some(ADMIN_TOKEN), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_key_and_by_prefix() {
    let s = Site::start(&cached()).await;
    s.origin.script("/", numbered);
    for path in ["/k1", "/k2", "/p/a", "/p/b", "/q"] {
        assert_eq!(s.get(path).await.x_cache(), "MISS", "{path}");
        assert_eq!(s.get(path).await.x_cache(), "HIT", "{path}");
    }

    // The host is matched whatever its case.
    let k1 = json!({ "keys": ["http://CACHE.Test/k1"] });
    assert_eq!(s.purged(k1).await, 1);
    assert_eq!(s.get("/k1").await.x_cache(), "MISS");
    assert_eq!(s.get("/k2").await.x_cache(), "HIT");

    let p = json!({ "prefixes": [key("/p/")] });
    assert_eq!(s.purged(p).await, 2);
    assert_eq!(s.get("/p/a").await.x_cache(), "MISS");
    assert_eq!(s.get("/p/b").await.x_cache(), "MISS");
    assert_eq!(s.get("/q").await.x_cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_and_all() {
    let s = Site::start(&cached()).await;
    let a = Reply::fresh("a").header("surrogate-key", "t1 t2");
    s.origin.reply("/tags/a", a);
    let b = Reply::fresh("b").header("cache-tag", "t2,t3");
    s.origin.reply("/tags/b", b);
    // Two GETs: their x-cache values.
    let site = &s;
    let fill = move |path: &'static str| async move {
        let first = site.get(path).await.x_cache().to_string();
        let second = site.get(path).await.x_cache().to_string();
        (first, second)
    };
    for path in ["/tags/a", "/tags/b"] {
        let (first, second) = fill(path).await;
        let seen = (first.as_str(), second.as_str());
        assert_eq!(seen, ("MISS", "HIT"), "{path}");
    }

    assert_eq!(s.purged(json!({ "tags": ["t1"] })).await, 1);
    assert_eq!(fill("/tags/a").await.0, "MISS");
    assert_eq!(s.get("/tags/b").await.x_cache(), "HIT");

    // Cache-Tag is comma-separated.
    assert_eq!(s.purged(json!({ "tags": ["t3"] })).await, 1);
    assert_eq!(fill("/tags/b").await.0, "MISS");
    assert_eq!(s.get("/tags/a").await.x_cache(), "HIT");

    assert_eq!(s.purged(json!({ "tags": ["t2"] })).await, 2);
    assert_eq!(fill("/tags/a").await.0, "MISS");
    assert_eq!(fill("/tags/b").await.0, "MISS");

    s.purged(json!({ "all": true })).await;
    assert_eq!(s.get("/tags/a").await.x_cache(), "MISS");
    assert_eq!(s.get("/tags/b").await.x_cache(), "MISS");
    assert_eq!(s.origin.count("/tags/a"), 4);
    assert_eq!(s.origin.count("/tags/b"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_purge_keeps_the_object_but_revalidates_it() {
    let s = Site::start(&cached()).await;
    s.origin.script("/soft", etagged("soft", "max-age=60"));
    seen_as(&s.get("/soft").await, "MISS", "soft");
    seen_as(&s.get("/soft").await, "HIT", "soft");

    let soft = json!({ "keys": [key("/soft")], "soft": true });
    assert_eq!(s.purged(soft).await, 1);
    seen_as(&s.get("/soft").await, "REVALIDATED", "soft");
    assert_eq!(s.origin.count("/soft"), 2);
    assert_eq!(
        s.origin.last_header("/soft", "if-none-match").as_deref(),
        Some(ETAG),
        "the kept copy's validator is used"
    );
    // The 304 made it fresh again.
    seen_as(&s.get("/soft").await, "HIT", "soft");
    assert_eq!(s.origin.count("/soft"), 2);
}

// ---------------------------------------------------------------------------
// Where the cache is not consulted.

/// A second route, without the cache, for `/plain/`.
const PLAIN_ROUTE: &str = r#"
[[routes]]
name = "plain"
host = "*"
path_prefix = "/plain/"
upstream = "api"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_bypass_and_uncached_routes_have_no_x_cache() {
    let s = Site::start(&Tweaks {
        route_extra: CACHED,
        tail: PLAIN_ROUTE,
        ..Tweaks::default()
    })
    .await;
    s.origin.reply("/bypass", Reply::fresh("bypass"));
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let r = s.send(method.clone(), "/bypass", &[]).await;
        let seen = (r.status, r.x_cache());
        assert_eq!(seen, (200, "BYPASS"), "{method}: {r:?}");
    }
    assert_eq!(s.origin.count("/bypass"), 4);

    s.origin.reply("/plain/x", Reply::fresh("plain"));
    for _ in 0..2 {
        let r = s.get("/plain/x").await;
        assert_eq!((r.status, r.text().as_str()), (200, "plain"), "{r:?}");
        assert_eq!(r.header("x-cache"), None, "not a cache route: {r:?}");
    }
    assert_eq!(s.origin.count("/plain/x"), 2);
}

// ---------------------------------------------------------------------------
// Memory.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_stays_within_max_bytes() {
    const MAX_BYTES: u64 = 4 << 20;
    const OBJECT: usize = 100 * 1024;
    const URLS: usize = 400;
    let s = Site::start(&Tweaks {
        route_extra: CACHED,
        tail: "\n[cache]\nmax_bytes = \"4MiB\"\nmax_object_size = \"1MiB\"\n",
        ..Tweaks::default()
    })
    .await;
    let body = Bytes::from(vec![b'x'; OBJECT]);
    let reply = Reply::ok(body).cc("max-age=3600");
    s.origin.script("/m/", move |_| reply.clone());

    for i in 0..URLS {
        let r = s.get(&format!("/m/{i}")).await;
        assert_eq!((r.status, r.body.len()), (200, OBJECT), "/m/{i}: {r:?}");
    }

    let within = eventually(HANG, || async {
        let status = status_json(&s.http, &s.edge).await;
        let bytes = status["cache"]["bytes"].as_u64();
        bytes.is_some_and(|b| b <= MAX_BYTES)
    })
    .await;
    let status = status_json(&s.http, &s.edge).await;
    let cache = &status["cache"];
    let through = (URLS * OBJECT) >> 20;
    assert!(
        within.is_some(),
        "{through} MiB through a {MAX_BYTES}-byte store: {cache}"
    );
    assert_eq!(cache["max_bytes"].as_u64(), Some(MAX_BYTES), "{cache}");
    s.metric_at_least("edge_cache_evictions_total", "cause=\"size\"", 1.0)
        .await;

    let path = format!("/proc/{}/status", s.edge.child.id());
    let proc_status = std::fs::read_to_string(path).unwrap_or_default();
    let rss_kib: u64 = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "cache memory: {through} MiB through max_bytes = 4MiB; \
         cache {cache}; edge-router RSS {rss_kib} KiB"
    );
    assert!(
        rss_kib < 256 * 1024,
        "RSS {rss_kib} KiB: the store grows without bound"
    );
}

// ---------------------------------------------------------------------------
// What an adversary or a race could make the cache keep.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_produced_before_a_purge_is_not_stored() {
    produced_before_a_purge(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_produced_before_a_purge_is_not_stored_for_https_clients_either() {
    // Keyed `https://…`; purges name the object `http://…`.
    produced_before_a_purge(&[("x-forwarded-proto", "https")]).await;
}

/// A slow answer (sent with `headers`) is purged on its way: it is served to
/// its own client, never stored.
async fn produced_before_a_purge(headers: &'static [(&'static str, &'static str)]) {
    let t = Tweaks {
        server_extra: "trusted_proxies = [\"127.0.0.1/32\"]",
        ..cached()
    };
    let s = Site::start(&t).await;
    // The first answer is slow: the purge lands while it is on its way.
    s.origin.script("/race", |r: &Asked| {
        let reply = Reply::fresh(format!("n={}", r.n));
        if r.n == 1 {
            reply.delay(Duration::from_millis(500))
        } else {
            reply
        }
    });
    let slow = {
        let http = s.http.clone();
        let url = s.edge.url("/race");
        tokio::spawn(async move {
            let mut req = http.get(url).header("host", HOST);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.send().await
        })
    };
    let asked = eventually(HANG, || async { s.origin.count("/race") == 1 }).await;
    assert!(asked.is_some(), "the first GET reached the origin");
    s.purged(json!({"keys": [key("/race")]})).await;
    let first = slow.await.expect("task").expect("GET");
    assert_eq!(first.text().await.unwrap_or_default(), "n=1");
    // Produced before the purge: served to its client, never to the next one.
    let next = s.get_with("/race", headers).await;
    assert_ne!(
        (next.x_cache(), next.text()),
        ("HIT", "n=1".to_string()),
        "{next:?}"
    );
    seen_as(&s.get_with("/race", headers).await, "HIT", &next.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_sees_only_what_the_key_holds() {
    let s = Site::start(&cached()).await;
    s.origin.reply(
        "/tagged",
        Reply::fresh("tagged")
            .header("surrogate-key", "t1")
            .header("cache-tag", "t2"),
    );
    // A port and forwarded host the key leaves out must not reach the
    // origin, or a response built from them would be served to everyone.
    let sneaky: &[(&str, &str)] = &[
        ("host", "cache.test:1337"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-port", "1337"),
        ("x-original-url", "/admin"),
        ("forwarded", "host=evil.example;proto=https"),
    ];
    let r = s.get_with("/tagged", sneaky).await;
    seen_as(&r, "MISS", "tagged");
    assert_eq!(
        s.origin.last_header("/tagged", "host").as_deref(),
        Some("cache.test")
    );
    assert_eq!(
        s.origin
            .last_header("/tagged", "x-forwarded-host")
            .as_deref(),
        Some("cache.test")
    );
    assert_eq!(
        s.origin
            .last_header("/tagged", "x-forwarded-proto")
            .as_deref(),
        Some("http")
    );
    for hint in ["x-forwarded-port", "x-original-url", "forwarded"] {
        assert_eq!(
            s.origin.last_header("/tagged", hint),
            None,
            "{hint} reached the origin"
        );
    }
    // Tags are for purging, not for clients; a hit is the same object.
    let hit = s.get("/tagged").await;
    seen_as(&hit, "HIT", "tagged");
    for r in [&r, &hit] {
        assert_eq!(r.header("surrogate-key"), None, "{r:?}");
        assert_eq!(r.header("cache-tag"), None, "{r:?}");
    }
    assert_eq!(s.purged(json!({"tags": ["t2"]})).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheme_a_trusted_proxy_reports_is_part_of_the_key() {
    let t = Tweaks {
        server_extra: "trusted_proxies = [\"127.0.0.1/32\"]",
        ..cached()
    };
    let s = Site::start(&t).await;
    s.origin.script("/scheme", |r: &Asked| {
        let proto = r.header("x-forwarded-proto").unwrap_or("-").to_string();
        Reply::fresh(proto)
    });
    let https: &[(&str, &str)] = &[("x-forwarded-proto", "https")];
    seen_as(&s.get_with("/scheme", https).await, "MISS", "https");
    seen_as(&s.get("/scheme").await, "MISS", "http");
    seen_as(&s.get_with("/scheme", https).await, "HIT", "https");
    seen_as(&s.get("/scheme").await, "HIT", "http");
    // A proxy that appended its own scheme: the first is the client's.
    let appended: &[(&str, &str)] = &[("x-forwarded-proto", "https, http")];
    seen_as(&s.get_with("/scheme", appended).await, "HIT", "https");
    // One purge names the object, whichever scheme fetched it.
    assert_eq!(s.purged(json!({"keys": [key("/scheme")]})).await, 2);
}

// ---------------------------------------------------------------------------
// Misbehaving peers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_never_stored() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    // A cacheable answer whose connection ends 100 bytes into a 1,000-byte
    // body, every time: nothing of it may be served as a stored copy.
    let asked = Arc::new(AtomicUsize::new(0));
    let seen = asked.clone();
    let backend = raw_origin(move |mut stream: tokio::net::TcpStream, _head: String| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            let head = "HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nContent-Length: 1000\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&[b'x'; 100]).await;
            let _ = stream.shutdown().await;
        }
    })
    .await;
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    let edge = start_region(&regions, 0, &cached()).await;
    let http = client();
    let synced = eventually(HANG, || async {
        status_json(&http, &edge).await["cache"]["synced"] == true
    })
    .await;
    assert!(synced.is_some(), "the cache never synced");
    for n in 1..=2 {
        let resp = http
            .get(edge.url("/cut"))
            .header("host", HOST)
            .send()
            .await
            .expect("the head arrives");
        let x_cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert_ne!(x_cache, "HIT", "attempt {n}: a truncated body was stored");
        let body = resp.bytes().await;
        assert!(
            body.is_err(),
            "attempt {n}: the client saw a complete response: {body:?}"
        );
        assert_eq!(
            asked.load(Ordering::SeqCst),
            n,
            "attempt {n} went to the origin"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_purge_on_the_traffic_listener_is_refused() {
    let s = Site::start(&cached()).await;
    s.origin.reply("/kept", Reply::fresh("kept"));
    seen_as(&s.get("/kept").await, "MISS", "kept");
    let forged = json!({
        "id": "f00d",
        "region": "us-east-1",
        "time_ms": 0,
        "spec": {"all": true}
    });
    for signature in [None, Some("v1.00000000.00"), Some("garbage")] {
        let mut req = s
            .http
            .post(s.edge.url("/.edge/purge"))
            .header("host", HOST)
            .body(forged.to_string());
        if let Some(sig) = signature {
            req = req.header("x-edge-purge", sig);
        }
        let resp = req.send().await.expect("POST /.edge/purge");
        assert_eq!(resp.status().as_u16(), 403, "{signature:?}");
    }
    seen_as(&s.get("/kept").await, "HIT", "kept");
    assert_eq!(s.origin.count("/kept"), 1);
}

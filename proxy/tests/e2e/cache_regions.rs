//! The HTTP cache across regions, on `edge-router demo` (us-east-1,
//! eu-west-1, ap-southeast-1 sharing a simulated global table): a purge
//! through one region's admin, or a write through a cache route, clears the
//! object in every region, through the direct fan-out or, for a region the
//! fan-out cannot reach, through the replicated table, and each region
//! applies it once; a region whose table is out stops serving hits and
//! catches up when the table is back; a consistency token outranks the cache.
//!
//! Propagation times are measured and printed (`-- --nocapture` shows them).
//! The contract bounds them by replication delay + 2 x poll interval; the
//! assertions only bound them generously, to catch a hang.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::demo_harness::{header, sample, Demo, REGION_NAMES};
use crate::support::{client, eventually, metric_total};

/// A purge reaching a region, a fill becoming a hit: only catches a hang.
const GUARD: Duration = Duration::from_secs(10);

/// Replication, and a table outage noticed after max_unsynced (5 s).
const SLOW_GUARD: Duration = Duration::from_secs(30);

/// The demo's regions, by index (0 = us-east-1).
const REGIONS: [u16; 3] = [0, 1, 2];

/// The Host of every request here: the cache key has the host, and one
/// Host keeps a URL under one key in every region, whatever port each
/// region listens on, so that a purge by key names it once.
const HOST: &str = "cache.test";

/// A purge target for `path` under [`HOST`].
fn key(path: &str) -> String {
    format!("http://{HOST}{path}")
}

/// A response's `x-cache`, or "".
fn x_cache(resp: &reqwest::Response) -> String {
    header(resp, "x-cache")
}

/// What the cache tests read off a response.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub status: u16,
    pub x_cache: String,
    pub upstream_region: String,
    pub decision: String,
    /// `x-edge-consistency`, on writes through read-your-writes routes.
    pub token: String,
    pub body: String,
}

impl Fetched {
    async fn read(resp: reqwest::Response) -> Fetched {
        let (x_cache, upstream_region, decision, token) = (
            x_cache(&resp),
            header(&resp, "x-edge-upstream-region"),
            header(&resp, "x-edge-decision"),
            header(&resp, "x-edge-consistency"),
        );
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Fetched {
            status,
            x_cache,
            upstream_region,
            decision,
            token,
            body,
        }
    }

    pub fn is_hit(&self) -> bool {
        self.x_cache == "HIT"
    }

    /// One line for the log: status, value, who served it, `x-cache`.
    fn summary(&self) -> String {
        let value = self.value().unwrap_or_default();
        let Fetched {
            status,
            x_cache,
            upstream_region,
            decision,
            ..
        } = self;
        format!("{status} {value:?} from {upstream_region} ({decision}), x-cache {x_cache}")
    }

    /// The value of a demo key-value GET (`{"key", "value", ...}`), if the body is one.
    fn value(&self) -> Option<String> {
        let doc: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        doc.get("value")?.as_str().map(str::to_string)
    }
}

/// GET `url` with Host [`HOST`] and `headers`.
async fn fetch(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Fetched {
    let mut req = c.get(url).header(reqwest::header::HOST, HOST);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Fetched::read(resp).await
}

/// PUT `body` to `url` with Host [`HOST`]; it must succeed.
async fn put(c: &reqwest::Client, url: &str, body: &str) -> Fetched {
    let resp = c
        .put(url)
        .header(reqwest::header::HOST, HOST)
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    let written = Fetched::read(resp).await;
    assert!(
        (200..300).contains(&written.status),
        "PUT {url}: {written:?}"
    );
    written
}

/// GET `url` until it is a HIT (the first GET fills the cache, the second
/// should hit; a fill still being committed may take a GET more); returns
/// the HIT.
pub(crate) async fn cache_hit(c: &reqwest::Client, url: &str) -> Fetched {
    let start = Instant::now();
    let mut gets = 0;
    loop {
        let got = fetch(c, url, &[]).await;
        gets += 1;
        assert_eq!(got.status, 200, "GET {url}: {got:?}");
        if got.is_hit() {
            if gets > 2 {
                eprintln!("{url}: a HIT only at GET number {gets}");
            }
            return got;
        }
        assert!(
            start.elapsed() < GUARD,
            "{url}: never a HIT within {GUARD:?}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `path` through each demo region, in region order.
fn everywhere(demo: &Demo, path: &str) -> Vec<String> {
    REGIONS.iter().map(|&r| demo.url(r, path)).collect()
}

/// Fill `path` into every region's cache; returns each region's HIT.
async fn cache_everywhere(c: &reqwest::Client, demo: &Demo, path: &str) -> Vec<Fetched> {
    let mut hits = Vec::new();
    for url in everywhere(demo, path) {
        hits.push(cache_hit(c, &url).await);
    }
    hits
}

/// GET each of `urls` in turn until each has answered MISS once; returns,
/// per URL, how long after `since` it first did. Panics after [`GUARD`].
pub(crate) async fn first_miss(
    c: &reqwest::Client,
    urls: &[String],
    since: Instant,
) -> Vec<Duration> {
    let mut seen: Vec<Option<Duration>> = vec![None; urls.len()];
    let mut last: Vec<Option<Fetched>> = vec![None; urls.len()];
    while seen.iter().any(Option::is_none) && since.elapsed() < GUARD {
        for ((url, when), answer) in urls.iter().zip(&mut seen).zip(&mut last) {
            if when.is_some() {
                continue;
            }
            let got = fetch(c, url, &[]).await;
            if got.x_cache == "MISS" {
                *when = Some(since.elapsed());
            }
            *answer = Some(got);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut times = Vec::new();
    for ((url, when), answer) in urls.iter().zip(seen).zip(last) {
        match when {
            Some(t) => times.push(t),
            None => panic!("{url}: no MISS {GUARD:?} after the purge; last: {answer:?}"),
        }
    }
    times
}

/// `edge_cache_purges_applied_total` of one region, by path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applied {
    pub local: f64,
    pub direct: f64,
    pub table: f64,
}

impl Applied {
    /// From a region's Prometheus text.
    pub fn parse(metrics: &str) -> Applied {
        let path = |p: &str| {
            let label = format!("path=\"{p}\"");
            sample(metrics, "edge_cache_purges_applied_total", &label)
        };
        Applied {
            local: path("local"),
            direct: path("direct"),
            table: path("table"),
        }
    }

    /// What was applied between `before` and `self`.
    pub fn since(self, before: Applied) -> Applied {
        Applied {
            local: self.local - before.local,
            direct: self.direct - before.direct,
            table: self.table - before.table,
        }
    }

    pub fn total(self) -> f64 {
        self.local + self.direct + self.table
    }

    /// The paths that applied something, e.g. `direct` or `direct+table`.
    pub fn paths(self) -> String {
        let counts = [
            ("local", self.local),
            ("direct", self.direct),
            ("table", self.table),
        ];
        let applied: Vec<&str> = counts
            .into_iter()
            .filter(|(_, n)| *n > 0.0)
            .map(|(path, _)| path)
            .collect();
        if applied.is_empty() {
            "nothing".to_string()
        } else {
            applied.join("+")
        }
    }
}

/// Every demo region's counts, in region order.
async fn applied_everywhere(demo: &Demo) -> Vec<Applied> {
    let mut all = Vec::new();
    for r in REGIONS {
        all.push(Applied::parse(&demo.metrics(r).await));
    }
    all
}

/// Per region, what was applied between `before` and `now`.
fn growth(now: &[Applied], before: &[Applied]) -> Vec<Applied> {
    now.iter().zip(before).map(|(a, b)| a.since(*b)).collect()
}

/// Print when each region first answered MISS and which path applied the purge.
pub(crate) fn report(test: &str, names: &[&str], times: &[Duration], grew: &[Applied]) {
    for ((name, t), g) in names.iter().zip(times).zip(grew) {
        let (ms, paths) = (t.as_millis(), g.paths());
        eprintln!("{test}: {name:<15} MISS {ms:>5} ms after the purge (applied by {paths})");
    }
}

/// A demo (replication `delay`) with `path` cached in every region; the
/// path's URL in each region.
async fn cached_everywhere(delay: &str, path: &str) -> (Demo, reqwest::Client, Vec<String>) {
    let demo = Demo::start(delay).await;
    let c = client();
    let urls = everywhere(&demo, path);
    cache_everywhere(&c, &demo, path).await;
    (demo, c, urls)
}

/// Purge `spec` through us-east-1 (202 expected), wait until every region
/// answers MISS for `urls`, print when and by which path; the 202's body
/// and what each region applied since `before`.
async fn purge_and_watch(
    test: &str,
    demo: &Demo,
    c: &reqwest::Client,
    urls: &[String],
    before: &[Applied],
    spec: serde_json::Value,
) -> (serde_json::Value, Vec<Applied>) {
    let purged = Instant::now();
    let (status, body) = demo.purge(0, spec).await;
    assert_eq!(status, 202, "{body}");
    let times = first_miss(c, urls, purged).await;
    let grew = growth(&applied_everywhere(demo).await, before);
    report(test, &REGION_NAMES, &times, &grew);
    (body, grew)
}

#[tokio::test]
async fn a_purge_by_tag_through_one_region_clears_all_three() {
    const TEST: &str = "a_purge_by_tag_through_one_region_clears_all_three";
    let (demo, c, urls) = cached_everywhere("300ms", "/static/a").await;
    let before = applied_everywhere(&demo).await;
    let spec = json!({ "tags": ["static"] });
    let (body, _) = purge_and_watch(TEST, &demo, &c, &urls, &before, spec).await;
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    // us-east-1 held one object tagged `static`: /static/a.
    assert_eq!(body["applied"], 1, "{body}");

    // The table brings the purge too (replication 300 ms, a poll every
    // 100 ms): each region sees it a second time and skips it.
    for r in REGIONS {
        let repeated = eventually(GUARD, || async {
            let m = demo.metrics(r).await;
            sample(&m, "edge_cache_purges_repeated_total", "path=\"table\"") >= 1.0
        })
        .await;
        assert!(
            repeated.is_some(),
            "{}: the table's copy never arrived",
            REGION_NAMES[r as usize]
        );
    }
    let grew = growth(&applied_everywhere(&demo).await, &before);
    for (name, g) in REGION_NAMES.iter().zip(&grew) {
        assert_eq!(g.total(), 1.0, "{name} applied the purge {g:?}");
    }
    let accepting = grew[0];
    assert_eq!(accepting.local, 1.0, "us-east-1: {accepting:?}");
}

#[tokio::test]
async fn a_put_through_one_region_clears_the_url_everywhere() {
    const TEST: &str = "a_put_through_one_region_clears_the_url_everywhere";
    const PATH: &str = "/static/kv/item";
    let demo = Demo::start("300ms").await;
    let c = client();
    let urls = everywhere(&demo, PATH);
    put(&c, &urls[1], "v1").await;
    // Replicated everywhere (the 404s before that are not cached).
    for (name, url) in REGION_NAMES.iter().zip(&urls) {
        let replicated = eventually(SLOW_GUARD, || async {
            fetch(&c, url, &[]).await.value().as_deref() == Some("v1")
        })
        .await;
        assert!(replicated.is_some(), "v1 never reached {name}");
    }
    let hits = cache_everywhere(&c, &demo, PATH).await;
    for (name, hit) in REGION_NAMES.iter().zip(hits) {
        assert_eq!(hit.value().as_deref(), Some("v1"), "{name}: {hit:?}");
    }
    let before = applied_everywhere(&demo).await;

    let written = Instant::now();
    put(&c, &urls[1], "v2").await;
    // Per region: when the purge arrived (its first MISS) and when v2 was
    // first served. In between, a region may still read v1 from its replica
    // (replication takes 300 ms), but once the purge has arrived it must
    // never answer v1 from its cache.
    let mut miss: Vec<Option<Duration>> = vec![None; urls.len()];
    let mut fresh: Vec<Option<Duration>> = vec![None; urls.len()];
    let mut last: Vec<Option<Fetched>> = vec![None; urls.len()];
    while fresh.iter().any(Option::is_none) && written.elapsed() < GUARD {
        for (i, url) in urls.iter().enumerate() {
            if fresh[i].is_some() {
                continue;
            }
            let got = fetch(&c, url, &[]).await;
            let t = written.elapsed();
            if miss[i].is_none() && got.x_cache == "MISS" {
                miss[i] = Some(t);
            }
            if let Some(purged) = miss[i] {
                let name = REGION_NAMES[i];
                let stale = got.is_hit() && got.value().as_deref() == Some("v1");
                assert!(
                    !stale,
                    "{name}: a cached v1 at {t:?}, after the purge arrived ({purged:?}): {got:?}"
                );
                if got.value().as_deref() == Some("v2") {
                    fresh[i] = Some(t);
                }
            }
            last[i] = Some(got);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let grew = growth(&applied_everywhere(&demo).await, &before);
    for (i, name) in REGION_NAMES.iter().enumerate() {
        let (Some(purged), Some(v2)) = (miss[i], fresh[i]) else {
            let answer = &last[i];
            panic!("{name}: no MISS then v2 within {GUARD:?} of the write; last: {answer:?}");
        };
        let (purged, v2, paths) = (purged.as_millis(), v2.as_millis(), grew[i].paths());
        eprintln!("{TEST}: {name:<15} MISS {purged:>5} ms, v2 {v2:>5} ms (applied by {paths})");
    }
}

#[tokio::test]
async fn direct_path_beats_replication() {
    const TEST: &str = "direct_path_beats_replication";
    let (demo, c, urls) = cached_everywhere("2s", "/static/d").await;
    let before = applied_everywhere(&demo).await;
    let spec = json!({ "keys": [key("/static/d")] });
    let (_, grew) = purge_and_watch(TEST, &demo, &c, &urls, &before, spec).await;
    // Replication takes 2 s: the fan-out applied it in the other regions.
    for (name, g) in REGION_NAMES.iter().zip(&grew).skip(1) {
        assert_eq!(
            g.direct, 1.0,
            "{name}: not applied by the direct path: {g:?}"
        );
    }
}

#[tokio::test]
async fn a_region_cut_off_from_the_fanout_gets_the_purge_from_the_table() {
    const TEST: &str = "a_region_cut_off_from_the_fanout_gets_the_purge_from_the_table";
    let (demo, c, urls) = cached_everywhere("300ms", "/static/e").await;
    demo.set_link(0, 1, "blocked").await;
    let before = applied_everywhere(&demo).await;
    let fanout_errors = |m: &str| sample(m, "edge_purge_fanout_total", "result=\"error\"");
    let errors_before = fanout_errors(&demo.metrics(0).await);

    let spec = json!({ "prefixes": [key("/static/")] });
    let (_, grew) = purge_and_watch(TEST, &demo, &c, &urls, &before, spec).await;
    let (cut_off, reached) = (grew[1], grew[2]);
    assert_eq!(
        (cut_off.direct, cut_off.table),
        (0.0, 1.0),
        "eu-west-1 cannot be reached by the fan-out: {cut_off:?}"
    );
    assert_eq!(reached.direct, 1.0, "ap-southeast-1: {reached:?}");
    let counted = eventually(GUARD, || async {
        fanout_errors(&demo.metrics(0).await) > errors_before
    })
    .await;
    assert!(
        counted.is_some(),
        "the failed fan-out to eu-west-1 is not counted as an error"
    );
    demo.set_link(0, 1, "open").await;
}

#[tokio::test]
async fn table_outage_bypasses_then_recovers_without_restart() {
    const TEST: &str = "table_outage_bypasses_then_recovers_without_restart";
    const PATH: &str = "/static/f";
    let demo = Demo::start("300ms").await;
    let c = client();
    let url = demo.url(1, PATH);
    let cached = cache_hit(&c, &url).await;

    demo.set_table(1, "down").await;
    let bypass = eventually(SLOW_GUARD, || async {
        fetch(&c, &url, &[]).await.x_cache == "BYPASS"
    })
    .await;
    let Some(after) = bypass else {
        let last = fetch(&c, &url, &[]).await;
        panic!("eu-west-1 still uses its cache {SLOW_GUARD:?} after its table failed: {last:?}");
    };
    let ms = after.as_millis();
    eprintln!("{TEST}: eu-west-1 BYPASS {ms} ms after its table went down (max_unsynced 5 s)");
    let served = fetch(&c, &url, &[]).await;
    assert_eq!(
        (served.status, served.x_cache.as_str()),
        (200, "BYPASS"),
        "traffic keeps flowing, uncached: {served:?}"
    );
    let cache = demo.status(1).await["cache"].clone();
    assert_eq!(cache["synced"], false, "{cache}");
    assert_eq!(cache["state"], "unsynced", "{cache}");

    // Nor can the fan-out reach eu-west-1: the purge gets there through its
    // replica only, once the replica answers again.
    demo.set_link(0, 1, "blocked").await;
    let before = Applied::parse(&demo.metrics(1).await);
    let cleared_before = metric_total(&demo.metrics(1).await, "edge_cache_cleared_total");
    let spec = json!({ "keys": [key(PATH)] });
    let (status, body) = demo.purge(0, spec).await;
    assert_eq!(status, 202, "us-east-1's table is fine: {body}");
    // Past the replication delay: the row waits in eu-west-1's replica.
    tokio::time::sleep(Duration::from_secs(1)).await;

    demo.set_table(1, "up").await;
    let synced = eventually(SLOW_GUARD, || async {
        demo.status(1).await["cache"]["synced"] == true
    })
    .await;
    let Some(after) = synced else {
        let cache = demo.status(1).await["cache"].clone();
        panic!("eu-west-1 never synced again: {cache}");
    };
    let ms = after.as_millis();
    eprintln!("{TEST}: eu-west-1 synced {ms} ms after its table came back");
    let got = fetch(&c, &url, &[]).await;
    assert_eq!(
        got.x_cache, "MISS",
        "synced again, eu-west-1 must have applied the purge made during the outage: {got:?}"
    );
    assert_ne!(got.body, cached.body, "the pre-purge copy: {got:?}");
    let grew = Applied::parse(&demo.metrics(1).await).since(before);
    let paths = grew.paths();
    eprintln!("{TEST}: eu-west-1 applied the purge by {paths}");
    assert_eq!(grew.table, 1.0, "{grew:?}");
    let cleared = metric_total(&demo.metrics(1).await, "edge_cache_cleared_total");
    assert_eq!(
        cleared, cleared_before,
        "an outage far shorter than purge_retention must not clear the whole cache"
    );
    demo.set_link(0, 1, "open").await;
}

#[tokio::test]
async fn consistency_outranks_the_cache() {
    const TEST: &str = "consistency_outranks_the_cache";
    const PATH: &str = "/cached/kv/doc";
    let demo = Demo::start("2s").await;
    let c = client();
    let (writer, reader) = (demo.url(0, PATH), demo.url(1, PATH));
    put(&c, &writer, "v1").await;
    let replicated = eventually(SLOW_GUARD, || async {
        fetch(&c, &reader, &[]).await.value().as_deref() == Some("v1")
    })
    .await;
    assert!(replicated.is_some(), "v1 never reached eu-west-1");
    let hit = cache_hit(&c, &reader).await;
    assert_eq!(hit.value().as_deref(), Some("v1"), "{hit:?}");

    let written = Instant::now();
    let token = put(&c, &writer, "v2").await.token;
    assert!(
        !token.is_empty(),
        "a write through a read-your-writes route carries a token"
    );
    // At once (replication takes 2 s): eu-west-1's replica, and its cache,
    // only know v1, so the writer's region serves the read.
    let with_token = fetch(&c, &reader, &[("x-edge-consistency", &token)]).await;
    let (ms, seen) = (written.elapsed().as_millis(), with_token.summary());
    eprintln!("{TEST}: with the token, {ms} ms after the write: {seen}");
    assert_eq!(with_token.status, 200, "{with_token:?}");
    assert_eq!(with_token.value().as_deref(), Some("v2"), "{with_token:?}");
    assert_eq!(with_token.upstream_region, "us-east-1", "{with_token:?}");
    assert_ne!(with_token.x_cache, "HIT", "{with_token:?}");
    // Without the token a stale read is allowed, from the cache or not.
    let without = fetch(&c, &reader, &[]).await;
    let seen = without.summary();
    eprintln!("{TEST}: without the token: {seen}");
    assert_eq!(without.status, 200, "{without:?}");
}

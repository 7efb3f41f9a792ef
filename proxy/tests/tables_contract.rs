//! The table trait's conformance suite: the same
//! assertions run against every backend. `contract_single` is what one
//! region's table must do; `contract_replicated` what two regions of one
//! global table must do. The embedded backend runs them always; the DynamoDB
//! backend (cargo feature `dynamodb`) runs them against the DynamoDB-compatible
//! server `.ci/run` starts (MiniStack), found through
//! `EDGE_TEST_DYNAMODB_ENDPOINT`.
//!
//! Replication is waited for by polling with a deadline, never by sleeping a
//! guessed time; the deadlines are generous because they only bound a
//! failure.

use std::time::{Duration, Instant};

use edge_router::clock::unix_ms;
use edge_router::tables::embedded::{EmbeddedTable, SimulatedGlobal};
use edge_router::tables::{Attr, Item, Table, TableError, EXPIRES_AT};

const US: &str = "us-east-1";
const EU: &str = "eu-west-1";

/// Between two reads while waiting for replication.
const POLL: Duration = Duration::from_millis(20);

// === helpers ===

fn now_s() -> i64 {
    (unix_ms() / 1000) as i64
}

fn must<T>(t: &dyn Table, what: &str, result: Result<T, TableError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} on {}: {e}", t.describe()),
    }
}

async fn put(t: &dyn Table, item: Item) {
    let what = format!("put {}/{}", item.pk, item.sk);
    must(t, &what, t.put(item).await);
}

async fn get(t: &dyn Table, pk: &str, sk: &str) -> Option<Item> {
    must(t, &format!("get {pk}/{sk}"), t.get(pk, sk).await)
}

async fn query(t: &dyn Table, pk: &str, after: Option<&str>, limit: usize) -> Vec<Item> {
    must(
        t,
        &format!("query {pk} after {after:?} limit {limit}"),
        t.query(pk, after, limit).await,
    )
}

fn sks(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| i.sk.as_str()).collect()
}

/// Poll `t` until row `want.pk/want.sk` reads as `want`, or panic after `max`.
async fn await_row(t: &dyn Table, want: &Item, max: Duration, what: &str) {
    let deadline = Instant::now() + max;
    loop {
        let got = get(t, &want.pk, &want.sk).await;
        if got.as_ref() == Some(want) {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: after {max:?} {} has {got:?}, want {want:?}",
                t.describe()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll `t` until partition `pk` holds exactly `want` (sort keys), or panic after `max`.
async fn await_sks(t: &dyn Table, pk: &str, want: &[&str], max: Duration, what: &str) {
    let deadline = Instant::now() + max;
    loop {
        let got = query(t, pk, None, 100).await;
        if sks(&got) == want {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: after {max:?} {} has {:?} in {pk}, want {want:?}",
                t.describe(),
                sks(&got)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// === the contract ===

/// What one region's table does, on a fresh (empty) table.
async fn contract_single(t: &dyn Table) {
    must(t, "ensure", t.ensure().await);

    // An unknown partition or row is empty, not an error.
    assert!(query(t, "c#none", None, 10).await.is_empty());
    assert_eq!(get(t, "c#none", "x").await, None);

    // A row reads back as written; other sort keys of its partition do not exist.
    let first = Item::new("c#rows", "b")
        .with("v", Attr::S("one".into()))
        .with("n", Attr::N(1));
    put(t, first.clone()).await;
    assert_eq!(get(t, "c#rows", "b").await, Some(first));
    assert_eq!(get(t, "c#rows", "a").await, None);

    // A put with the same keys replaces the whole row: attributes are not merged.
    let second = Item::new("c#rows", "b").with("w", Attr::Bool(true));
    put(t, second.clone()).await;
    assert_eq!(get(t, "c#rows", "b").await, Some(second.clone()));

    // Rows come back in sort-key order, whatever the order of the writes.
    for sk in ["d", "a", "e", "c"] {
        put(t, Item::new("c#rows", sk)).await;
    }
    let all = query(t, "c#rows", None, 100).await;
    assert_eq!(sks(&all), ["a", "b", "c", "d", "e"]);
    assert_eq!(all[1], second);

    // `after` is exclusive and need not be a stored sort key.
    assert_eq!(
        sks(&query(t, "c#rows", Some("b"), 100).await),
        ["c", "d", "e"]
    );
    assert_eq!(
        sks(&query(t, "c#rows", Some("bz"), 100).await),
        ["c", "d", "e"]
    );
    assert!(query(t, "c#rows", Some("e"), 100).await.is_empty());

    // `limit` keeps the first rows; paging with `after` = the last sort key
    // seen walks the whole partition once.
    assert_eq!(sks(&query(t, "c#rows", None, 2).await), ["a", "b"]);
    assert_eq!(sks(&query(t, "c#rows", Some("b"), 2).await), ["c", "d"]);
    let mut walked = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = query(t, "c#rows", after.as_deref(), 2).await;
        let Some(last) = page.last() else { break };
        after = Some(last.sk.clone());
        walked.extend(page);
    }
    assert_eq!(walked, all);

    // Sort keys compare as strings, not numbers (so times in keys are zero-padded).
    for sk in ["9", "100", "10"] {
        put(t, Item::new("c#order", sk)).await;
    }
    assert_eq!(
        sks(&query(t, "c#order", None, 10).await),
        ["10", "100", "9"]
    );

    // Expired rows are never returned, by `get` or `query`, and `limit`
    // counts only live rows (a page of expired rows is not the end).
    let now = now_s();
    let live = |sk: &str| Item::new("c#ttl", sk).with(EXPIRES_AT, Attr::N(now + 3600));
    let dead = |sk: &str| Item::new("c#ttl", sk).with(EXPIRES_AT, Attr::N(now - 60));
    for item in [
        live("1-live"),
        dead("2-dead"),
        dead("3-dead"),
        live("4-live"),
        dead("5-dead"),
        Item::new("c#ttl", "6-no-expiry"),
    ] {
        put(t, item).await;
    }
    assert_eq!(
        sks(&query(t, "c#ttl", None, 100).await),
        ["1-live", "4-live", "6-no-expiry"]
    );
    assert_eq!(sks(&query(t, "c#ttl", None, 2).await), ["1-live", "4-live"]);
    assert_eq!(sks(&query(t, "c#ttl", Some("1-live"), 1).await), ["4-live"]);
    assert_eq!(get(t, "c#ttl", "2-dead").await, None);
    assert_eq!(get(t, "c#ttl", "4-live").await, Some(live("4-live")));

    // Every attribute type round-trips, negative numbers and false included.
    let full = Item::new("c#attrs", "x")
        .with("s", Attr::S("é ✓ #/:= ".into()))
        .with("neg", Attr::N(-42))
        .with("zero", Attr::N(0))
        .with("min", Attr::N(i64::MIN))
        .with("max", Attr::N(i64::MAX))
        .with("yes", Attr::Bool(true))
        .with("no", Attr::Bool(false));
    put(t, full.clone()).await;
    assert_eq!(get(t, "c#attrs", "x").await, Some(full.clone()));
    assert_eq!(query(t, "c#attrs", None, 10).await, vec![full]);
}

/// What two regions of one global table do: `a` and `b` are fresh replicas;
/// writes reach the other region within `max_lag`.
async fn contract_replicated(a: &dyn Table, b: &dyn Table, max_lag: Duration) {
    must(a, "ensure", a.ensure().await);
    must(b, "ensure", b.ensure().await);

    // A write in A is visible in A at once and in B later, whole.
    let from_a = Item::new("r#rows", "k1")
        .with("v", Attr::S("from-a".into()))
        .with("n", Attr::N(-7))
        .with("soft", Attr::Bool(false));
    put(a, from_a.clone()).await;
    assert_eq!(get(a, "r#rows", "k1").await, Some(from_a.clone()));
    await_row(b, &from_a, max_lag, "A's write reaches B").await;
    await_sks(b, "r#rows", &["k1"], max_lag, "A's write in B's query").await;

    // And the other way.
    let from_b = Item::new("r#rows", "k2").with("v", Attr::S("from-b".into()));
    put(b, from_b.clone()).await;
    await_row(a, &from_b, max_lag, "B's write reaches A").await;
    await_sks(
        a,
        "r#rows",
        &["k1", "k2"],
        max_lag,
        "B's write in A's query",
    )
    .await;

    // Last writer wins: the same key written in A, then in B, ends as B's
    // value in both regions, whatever order the replicas see the writes in.
    // Writes are ordered by time (ms), a tie by region name: keep the two
    // writes apart by more than the clock's resolution.
    let lww_a = Item::new("r#lww", "k").with("v", Attr::S("a".into()));
    let lww_b = Item::new("r#lww", "k").with("v", Attr::S("b".into()));
    put(a, lww_a).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    put(b, lww_b.clone()).await;
    // Barriers instead of sleeps: a row written after the two writes, seen
    // in the other region, means the writes before it have arrived there.
    let barrier_a = Item::new("r#barrier", "from-a");
    let barrier_b = Item::new("r#barrier", "from-b");
    put(a, barrier_a.clone()).await;
    put(b, barrier_b.clone()).await;
    await_row(b, &barrier_a, max_lag, "A's barrier reaches B").await;
    await_row(a, &barrier_b, max_lag, "B's barrier reaches A").await;
    assert_eq!(
        get(a, "r#lww", "k").await,
        Some(lww_b.clone()),
        "A after LWW"
    );
    assert_eq!(
        get(b, "r#lww", "k").await,
        Some(lww_b.clone()),
        "B after LWW"
    );
    assert_eq!(query(a, "r#lww", None, 10).await, vec![lww_b.clone()]);
    assert_eq!(query(b, "r#lww", None, 10).await, vec![lww_b]);
}

// === embedded ===

#[tokio::test]
async fn embedded_single_region() {
    let t = EmbeddedTable::single(US);
    assert_eq!(t.describe(), "embedded (us-east-1)");
    contract_single(&t).await;
}

// One replica of a simulated global table is a table like any other.
#[tokio::test]
async fn embedded_replica_alone() {
    let global = SimulatedGlobal::new(&[US, EU], Duration::from_millis(200));
    contract_single(&global.replica(US).expect("region")).await;
}

#[tokio::test]
async fn embedded_replicated() {
    let global = SimulatedGlobal::new(&[US, EU], Duration::from_millis(200));
    let a = global.replica(US).expect("region");
    let b = global.replica(EU).expect("region");
    contract_replicated(&a, &b, Duration::from_secs(5)).await;
}

// A write reaches another region after the replication delay, not before.
#[tokio::test]
async fn embedded_replication_waits_for_the_delay() {
    // Far longer than a put and two reads take: B cannot have it early.
    let delay = Duration::from_secs(2);
    let global = SimulatedGlobal::new(&[US, EU], delay);
    let a = global.replica(US).expect("region");
    let b = global.replica(EU).expect("region");
    let row = Item::new("d#rows", "k").with("v", Attr::N(1));
    let written = Instant::now();
    put(&a, row.clone()).await;
    let early_get = get(&b, "d#rows", "k").await;
    let early_query = query(&b, "d#rows", None, 10).await;
    assert_eq!(early_get, None, "visible in B right after the write");
    assert!(early_query.is_empty(), "in B's query right after the write");
    await_row(&b, &row, Duration::from_secs(5), "write reaches B").await;
    assert!(
        written.elapsed() >= delay,
        "visible in B after {:?}, before the {delay:?} delay",
        written.elapsed()
    );
}

// Lowering the delay releases writes already in flight, at once.
#[tokio::test]
async fn embedded_zero_delay_releases_pending_writes() {
    let global = SimulatedGlobal::new(&[US, EU], Duration::from_secs(3600));
    let a = global.replica(US).expect("region");
    let b = global.replica(EU).expect("region");
    let row = Item::new("z#rows", "k").with("v", Attr::S("pending".into()));
    put(&a, row.clone()).await;
    assert_eq!(get(&b, "z#rows", "k").await, None);
    global.set_delay(Duration::ZERO);
    assert_eq!(get(&b, "z#rows", "k").await, Some(row.clone()));
    assert_eq!(query(&b, "z#rows", None, 10).await, vec![row]);
}

// A switched-off replica fails every operation as unreachable; the others
// carry on, and it catches up when switched back on.
#[tokio::test]
async fn embedded_unreachable_replica() {
    let global = SimulatedGlobal::new(&[US, EU], Duration::ZERO);
    let a = global.replica(US).expect("region");
    let b = global.replica(EU).expect("region");
    global.set_unreachable(EU, true).expect("region");
    let unreachable = |what: &str, r: Result<(), TableError>| match r {
        Err(TableError::Unreachable(_)) => {}
        other => panic!("{what} on a switched-off replica: {other:?}"),
    };
    unreachable("get", b.get("u#rows", "k").await.map(drop));
    unreachable("query", b.query("u#rows", None, 10).await.map(drop));
    unreachable("put", b.put(Item::new("u#rows", "b")).await);
    unreachable("ensure", b.ensure().await);

    let row = Item::new("u#rows", "k").with("v", Attr::Bool(true));
    put(&a, row.clone()).await;
    assert_eq!(get(&a, "u#rows", "k").await, Some(row.clone()));

    global.set_unreachable(EU, false).expect("region");
    must(&b, "ensure", b.ensure().await);
    assert_eq!(get(&b, "u#rows", "k").await, Some(row));
}

// === dynamodb ===

#[cfg(feature = "dynamodb")]
mod dynamodb {
    use std::sync::atomic::{AtomicU32, Ordering};

    use edge_router::tables::dynamodb::{DynamoSettings, DynamoTable};

    use super::*;

    const ENDPOINT_VAR: &str = "EDGE_TEST_DYNAMODB_ENDPOINT";

    /// The test server's endpoint. Missing is a failure, not a skip: a
    /// backend whose tests silently pass is untested.
    fn endpoint() -> String {
        match std::env::var(ENDPOINT_VAR) {
            Ok(endpoint) if !endpoint.is_empty() => endpoint,
            _ => panic!(
                "{ENDPOINT_VAR} is not set, and the dynamodb tests need a DynamoDB-compatible server. \
                 Run .ci/run (it starts MiniStack and sets it), or start MiniStack yourself: \
                 python3 -m venv .ci/.venv && .ci/.venv/bin/pip install ministack==1.5.33 && \
                 env -u EDGE_PORT GATEWAY_PORT=4566 BIND_HOST=127.0.0.1 SERVICES=dynamodb,dynamodbstreams \
                 .ci/.venv/bin/ministack & then export {ENDPOINT_VAR}=http://127.0.0.1:4566"
            ),
        }
    }

    /// A table name no other test, run or process uses.
    fn unique_table(tag: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "edge-test-{tag}-{}-{}-{}",
            std::process::id(),
            unix_ms(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A client signing with fixed dummy credentials: the test server checks
    /// no signatures, and this keeps the tests independent of the
    /// environment's AWS settings (no `set_var` in a multi-threaded test
    /// process).
    async fn client(table: &str, region: &str, endpoint: &str, create: bool) -> DynamoTable {
        let settings = DynamoSettings {
            table: table.to_string(),
            endpoint: Some(endpoint.to_string()),
            aws_region: region.to_string(),
            create_if_missing: create,
        };
        DynamoTable::connect_with_static_credentials(settings, "test", "test").await
    }

    #[tokio::test]
    async fn dynamodb_single_region() {
        let endpoint = endpoint();
        let name = unique_table("single");
        let t = client(&name, US, &endpoint, true).await;
        assert_eq!(
            t.describe(),
            format!("dynamodb {name} in us-east-1 via {endpoint}")
        );
        // Creating, then finding it there.
        must(&t, "ensure (create)", t.ensure().await);
        contract_single(&t).await;
    }

    #[tokio::test]
    async fn dynamodb_global_table() {
        let endpoint = endpoint();
        let name = unique_table("global");
        let a = client(&name, US, &endpoint, true).await;
        must(&a, "ensure", a.ensure().await);
        let regions = [US.to_string(), EU.to_string()];
        must(&a, "make_global", a.make_global(&regions).await);
        // Again: the replica exists, nothing to do.
        must(&a, "make_global again", a.make_global(&regions).await);
        // B may not create: the replica must exist by now.
        let b = client(&name, EU, &endpoint, false).await;
        contract_replicated(&a, &b, Duration::from_secs(10)).await;
    }

    // Nothing listening: every operation gives up on its own, quickly, as
    // Unreachable, naming where it tried.
    #[tokio::test]
    async fn dynamodb_nothing_listening_is_unreachable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("local addr").port()
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let t = client("edge-test-unreachable", US, &endpoint, true).await;
        let check =
            |what: &str, r: Result<Result<(), TableError>, tokio::time::error::Elapsed>| match r {
                Err(_) => panic!("{what} hung: the table's own timeouts must end it"),
                Ok(Err(TableError::Unreachable(msg))) => {
                    assert!(msg.contains(&endpoint), "{what}: {msg}")
                }
                Ok(other) => panic!("{what} with nothing listening: {other:?}"),
            };
        let limit = Duration::from_secs(10);
        check(
            "get",
            tokio::time::timeout(limit, async { t.get("p", "s").await.map(drop) }).await,
        );
        check(
            "query",
            tokio::time::timeout(limit, async { t.query("p", None, 10).await.map(drop) }).await,
        );
        check(
            "put",
            tokio::time::timeout(limit, t.put(Item::new("p", "s"))).await,
        );
        check("ensure", tokio::time::timeout(limit, t.ensure()).await);
    }

    // A missing table that may not be created is NotFound, with a message
    // an operator can act on; it stays missing.
    #[tokio::test]
    async fn dynamodb_missing_table_is_not_found() {
        let endpoint = endpoint();
        let name = unique_table("missing");
        let t = client(&name, EU, &endpoint, false).await;
        match t.ensure().await {
            Err(TableError::NotFound(msg)) => {
                assert!(msg.contains(&name), "{msg}");
                assert!(msg.contains(EU), "{msg}");
                assert!(msg.contains("docs/dynamodb.md"), "{msg}");
            }
            other => panic!("ensure of a missing table: {other:?}"),
        }
        assert!(
            matches!(t.get("p", "s").await, Err(TableError::NotFound(_))),
            "get of a missing table"
        );
        assert!(
            matches!(t.query("p", None, 1).await, Err(TableError::NotFound(_))),
            "query of a missing table"
        );
        assert!(
            matches!(t.ensure().await, Err(TableError::NotFound(_))),
            "ensure must not have created it"
        );
    }
}

//! Read-your-writes over a real DynamoDB-compatible server (MiniStack,
//! started by `.ci/run`), and what happens when that server stalls, stops
//! and comes back. MiniStack replicates a global table at once, so these
//! tests assert the routing, not the lag.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_router::tables::dynamodb::{DynamoSettings, DynamoTable};
use edge_router::tables::Table;

use crate::cache_regions::{cache_hit, first_miss, report, Applied};
use crate::support::*;

/// Only catches a hang.
const HANG: Duration = Duration::from_secs(30);

const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-1"];

fn endpoint_from_env() -> String {
    std::env::var("EDGE_TEST_DYNAMODB_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .expect("EDGE_TEST_DYNAMODB_ENDPOINT is not set: run .ci/run, which starts MiniStack")
}

/// A fresh global table with a replica in each of `regions`.
async fn global_table(endpoint: &str, regions: &[&str]) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "e2e-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let first = DynamoTable::connect_with_static_credentials(
        DynamoSettings {
            table: name.clone(),
            endpoint: Some(endpoint.to_string()),
            aws_region: regions[0].to_string(),
            create_if_missing: true,
        },
        "test",
        "test",
    )
    .await;
    // MiniStack on a loaded 2-core CI machine can miss the client's 2 s
    // operation timeout once; the set-up asks again (what is tested is
    // what edge-router does with the table, not MiniStack's speed).
    let mut attempt = 0;
    loop {
        attempt += 1;
        match first.ensure().await {
            Ok(_) => break,
            Err(e) if attempt < 5 => eprintln!("create the table (attempt {attempt}): {e:?}"),
            Err(e) => panic!("create the table: {e:?}"),
        }
    }
    let others: Vec<String> = regions[1..].iter().map(|r| r.to_string()).collect();
    first.make_global(&others).await.expect("make it global");
    name
}

/// `[tables]` of a DynamoDB-backed region, with `extra` lines.
fn tables_section(table: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "\n[tables]\nbackend = \"dynamodb\"\ntable = \"{table}\"\nendpoint = \"{endpoint}\"\n{extra}"
    )
}

/// The config tail for a DynamoDB-backed region.
fn tables_tail(table: &str, endpoint: &str, margin: &str) -> String {
    format!(
        "{}\n[consistency]\nclock_margin = \"{margin}\"\n",
        tables_section(table, endpoint, "")
    )
}

const AWS_ENV: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
];

async fn start_dynamo_regions(regions: &[RegionSpec], tail: &'static str) -> Vec<Edge> {
    let t = Tweaks {
        policy: "read-your-writes",
        tail,
        ..Tweaks::default()
    };
    let mut edges = Vec::new();
    for i in 0..regions.len() {
        let r = &regions[i];
        edges.push(
            Edge::start_with_env(&config_for(regions, i, &t), r.port, r.admin, &AWS_ENV).await,
        );
    }
    edges
}

/// `/status`'s tables section of `edge`.
async fn tables_status(c: &reqwest::Client, edge: &Edge) -> serde_json::Value {
    status_json(c, edge).await["tables"].clone()
}

/// Wait until `edge` reads every region's heartbeat.
async fn wait_lag_known(c: &reqwest::Client, edge: &Edge) {
    let known = eventually(HANG, || async {
        let t = tables_status(c, edge).await;
        t["reachable"] == true
            && t["lag"]
                .as_object()
                .is_some_and(|m| m.values().all(|v| v["watermark_ms"].is_u64()))
    })
    .await;
    assert!(
        known.is_some(),
        "lag never known: {}\n{}",
        tables_status(c, edge).await,
        edge.log_text()
    );
}

async fn put_token(c: &reqwest::Client, url: &str) -> String {
    let resp = c.put(url).body("v").send().await.expect("PUT");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.headers()
        .get("x-edge-consistency")
        .and_then(|v| v.to_str().ok())
        .expect("a write carries a token")
        .to_string()
}

#[tokio::test]
async fn read_your_writes_routes_by_token_over_dynamodb() {
    let endpoint = endpoint_from_env();
    let table = global_table(&endpoint, &REGIONS).await;
    let mut origins = Vec::new();
    let mut regions = Vec::new();
    for name in REGIONS {
        let o = origin(name, name).await;
        regions.push(RegionSpec::new(name, vec![o.addr()]));
        origins.push(o);
    }
    // A wide margin: the read right after the write must come before the
    // writer's next heartbeat passes t + margin, even on a busy machine.
    let tail: &'static str = Box::leak(tables_tail(&table, &endpoint, "2s").into_boxed_str());
    let edges = start_dynamo_regions(&regions, tail).await;
    let c = client();
    wait_lag_known(&c, &edges[1]).await;

    let token = put_token(&c, &edges[0].url("/doc")).await;
    let s = get(&c, &edges[1].url("/doc"), &[("x-edge-consistency", &token)]).await;
    assert_eq!(s.upstream_region, "us-east-1", "{s:?}");
    assert_eq!(s.decision, "ryw:lagging:us-east-1");
    let s = get(&c, &edges[1].url("/doc"), &[]).await;
    assert_eq!(s.upstream_region, "eu-west-1", "no token: local ({s:?})");

    // The writer's heartbeats pass t + margin in eu-west-1's replica: local.
    let local = eventually(HANG, || async {
        get(&c, &edges[1].url("/doc"), &[("x-edge-consistency", &token)])
            .await
            .upstream_region
            == "eu-west-1"
    })
    .await;
    assert!(local.is_some(), "eu-west-1 never caught up with the token");
    // The third region reads its replica on its own heartbeat rounds.
    let third = eventually(HANG, || async {
        get(&c, &edges[2].url("/doc"), &[("x-edge-consistency", &token)])
            .await
            .decision
            == "ryw:caught-up:us-east-1"
    })
    .await;
    assert!(
        third.is_some(),
        "ap-southeast-1 never caught up with the token"
    );
    let m = metrics(&c, &edges[1]).await;
    assert!(
        m.contains("edge_replication_lag_seconds{from=\"us-east-1\""),
        "{m}"
    );
    assert!(
        m.contains("edge_table_reachable{region=\"eu-west-1\"} 1"),
        "{m}"
    );
}

/// A MiniStack of the test's own, so it can be stalled and stopped.
struct OwnServer {
    child: Child,
    port: u16,
    state: tempfile::TempDir,
}

impl OwnServer {
    async fn start(port: u16, state: tempfile::TempDir) -> OwnServer {
        let bin = std::env::var("EDGE_TEST_MINISTACK")
            .expect("EDGE_TEST_MINISTACK (the ministack executable) is not set: run .ci/run");
        let child = Command::new(bin)
            .env_remove("EDGE_PORT")
            .env("GATEWAY_PORT", port.to_string())
            .env("BIND_HOST", "127.0.0.1")
            .env("SERVICES", "dynamodb,dynamodbstreams")
            // Saved on a clean stop, loaded on start: a restart keeps the table.
            .env("PERSIST_STATE", "1")
            .env("STATE_DIR", state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ministack starts");
        let server = OwnServer { child, port, state };
        let c = client();
        let up = eventually(HANG, || async {
            c.get(format!("http://127.0.0.1:{port}/_ministack/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(up.is_some(), "ministack did not start");
        server
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} ministack");
    }

    /// Stop cleanly (the state is saved) and hand back its state folder.
    async fn stop(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        for _ in 0..500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.state, dir)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_stalled_or_stopped_table_keeps_traffic_flowing_and_recovers() {
    let port = free_port();
    let server = OwnServer::start(port, tempfile::tempdir().expect("tempdir")).await;
    let endpoint = server.endpoint();
    let table = global_table(&endpoint, &REGIONS[..2]).await;
    let a = origin("us-east-1", "a").await;
    let b = origin("eu-west-1", "b").await;
    let regions = [
        RegionSpec::new("us-east-1", vec![a.addr()]),
        RegionSpec::new("eu-west-1", vec![b.addr()]),
    ];
    let tail: &'static str = Box::leak(tables_tail(&table, &endpoint, "100ms").into_boxed_str());
    let edges = start_dynamo_regions(&regions, tail).await;
    let c = client();
    wait_lag_known(&c, &edges[1]).await;
    let token = put_token(&c, &edges[0].url("/doc")).await;
    let served_locally = || async {
        get(&c, &edges[1].url("/doc"), &[("x-edge-consistency", &token)])
            .await
            .upstream_region
            == "eu-west-1"
    };
    assert!(
        eventually(HANG, served_locally).await.is_some(),
        "never caught up"
    );

    // Each fault: the table hangs (SIGSTOP), then is gone (stopped).
    let mut server = Some(server);
    for fault in ["stall", "stop"] {
        let running = server.take().expect("server");
        let (stalled, state) = match fault {
            "stall" => {
                running.signal("STOP");
                (Some(running), None)
            }
            _ => (None, Some(running.stop().await)),
        };
        let unreachable = eventually(HANG, || async {
            tables_status(&c, &edges[1]).await["reachable"] == false
        })
        .await;
        assert!(
            unreachable.is_some(),
            "{fault}: /status never said the table is unreachable"
        );
        let t = tables_status(&c, &edges[1]).await;
        assert!(
            t["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{fault}: no reason in /status: {t}"
        );
        assert!(t["lag"]["us-east-1"]["unknown"] == true, "{fault}: {t}");
        // Plain traffic does not care.
        let s = get(&c, &edges[1].url("/doc"), &[]).await;
        assert_eq!(
            (s.status, s.upstream_region.as_str()),
            (200, "eu-west-1"),
            "{fault}: {s:?}"
        );
        // Lag unknown is the worst case: the token's region serves.
        let s = get(&c, &edges[1].url("/doc"), &[("x-edge-consistency", &token)]).await;
        assert_eq!(
            (s.status, s.upstream_region.as_str()),
            (200, "us-east-1"),
            "{fault}: {s:?}"
        );
        assert_eq!(s.decision, "ryw:lagging:us-east-1");
        let m = metrics(&c, &edges[1]).await;
        assert!(
            m.contains("edge_table_reachable{region=\"eu-west-1\"} 0"),
            "{fault}"
        );
        assert!(
            !m.contains("edge_replication_lag_seconds{from="),
            "{fault}: a lag while unknown"
        );

        // The server comes back: the proxy recovers by itself.
        server = Some(match (stalled, state) {
            (Some(running), _) => {
                running.signal("CONT");
                running
            }
            (None, Some(state)) => OwnServer::start(port, state).await,
            (None, None) => unreachable!("each fault keeps either the process or its state"),
        });
        let recovered = eventually(HANG, || async {
            tables_status(&c, &edges[1]).await["reachable"] == true
        })
        .await;
        assert!(
            recovered.is_some(),
            "{fault}: never reachable again\n{}",
            edges[1].log_text()
        );
        assert!(
            eventually(HANG, served_locally).await.is_some(),
            "{fault}: token reads never local again"
        );
    }
    assert!(
        edges[1].log_text().contains("replicated table failing"),
        "{}",
        edges[1].log_text()
    );
}

/// An origin whose every answer may be cached for 60 s and carries the
/// surrogate key `t`; each body counts the requests it answered.
async fn tagged_origin() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    let served = Arc::new(AtomicU64::new(0));
    raw_origin(move |mut stream, _head| {
        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let body = format!("{{\"served\":{n}}}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: public, max-age=60\r\nsurrogate-key: t\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}

/// Three regions caching one route over one DynamoDB global table: a purge
/// by tag through us-east-1's admin clears the other two. us-east-1's peer
/// entry for ap-southeast-1 points at a closed port, so its fan-out never
/// reaches ap-southeast-1, which can only learn the purge from its replica.
#[tokio::test]
async fn three_proxies_purge_through_dynamodb() {
    const TEST: &str = "three_proxies_purge_through_dynamodb";
    let endpoint = endpoint_from_env();
    let table = global_table(&endpoint, &REGIONS).await;
    let mut regions = Vec::new();
    for name in REGIONS {
        regions.push(RegionSpec::new(name, vec![tagged_origin().await]));
    }
    let tail = tables_section(
        &table,
        &endpoint,
        "create_if_missing = true\npoll_interval = \"100ms\"\n",
    );
    let t = Tweaks {
        route_extra: "cache = true",
        tail: Box::leak(tail.into_boxed_str()),
        ..Tweaks::default()
    };
    let closed = free_port();
    let cut: Vec<RegionSpec> = regions
        .iter()
        .map(|r| RegionSpec {
            name: r.name,
            port: if r.name == "ap-southeast-1" {
                closed
            } else {
                r.port
            },
            admin: r.admin,
            backends: r.backends.clone(),
        })
        .collect();
    let mut edges = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let config = if i == 0 {
            config_for(&cut, i, &t)
        } else {
            config_for(&regions, i, &t)
        };
        edges.push(Edge::start_with_env(&config, r.port, r.admin, &AWS_ENV).await);
    }
    let c = client();
    let urls: Vec<String> = edges.iter().map(|e| e.url("/p")).collect();
    for url in &urls {
        cache_hit(&c, url).await;
    }
    let mut before = Vec::new();
    for edge in &edges[1..] {
        before.push(Applied::parse(&metrics(&c, edge).await));
    }

    let purged = Instant::now();
    let resp = c
        .post(edges[0].admin_url("/purge"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "tags": ["t"] }))
        .send()
        .await
        .expect("POST /purge");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{body}\n{}", edges[0].log_text());
    let times = first_miss(&c, &urls[1..], purged).await;
    let mut grew = Vec::new();
    for (edge, was) in edges[1..].iter().zip(&before) {
        grew.push(Applied::parse(&metrics(&c, edge).await).since(*was));
    }
    report(TEST, &REGIONS[1..], &times, &grew);
    assert_eq!(
        (grew[1].direct, grew[1].table),
        (0.0, 1.0),
        "ap-southeast-1 can only learn the purge from DynamoDB: {:?}\n{}",
        grew[1],
        edges[2].log_text()
    );
    // Both paths have had time to deliver to eu-west-1 (MiniStack
    // replicates at once; a poll is 100 ms): it applied the purge once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = metrics(&c, &edges[1]).await;
    let once = Applied::parse(&now).since(before[0]);
    assert_eq!(once.total(), 1.0, "eu-west-1 applied the purge {once:?}");
}

//! `x-edge-hop`: forged hops are stripped, valid hops are served locally and never forwarded again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_router::hop::{HopSigner, SignedRequest};
use tokio::net::TcpStream;

use crate::support::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_hops_are_stripped_and_valid_hops_stay_local() {
    let a = [origin("us-east-1", "a1").await];
    let b = [
        origin("eu-west-1", "b1").await,
        origin("eu-west-1", "b2").await,
    ];
    let c = [origin("ap-southeast-1", "c1").await];
    let regions = vec![
        RegionSpec::new("us-east-1", a.iter().map(|o| o.addr()).collect()),
        RegionSpec::new("eu-west-1", b.iter().map(|o| o.addr()).collect()),
        RegionSpec::new("ap-southeast-1", c.iter().map(|o| o.addr()).collect()),
    ];
    let t = Tweaks::default();
    let edges = start_all(&regions, &t).await;
    let http = client();
    let path = "/echo?echo=1";

    // A forged hop to A: stripped, routed normally, not seen by the backend;
    // a spoofed x-forwarded-for from an untrusted client is replaced.
    let forged = format!("v1:eu-west-1:{}:AAAAAAAA", now_ms());
    let seen = get(
        &http,
        &edges[0].url(path),
        &[
            ("x-edge-hop", forged.as_str()),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-edge-region", "spoof"),
        ],
    )
    .await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.decision, "local", "routed normally");
    let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    let headers = &body["headers"];
    assert!(
        headers.get("x-edge-hop").is_none(),
        "forged hop reached the backend: {headers}"
    );
    assert!(
        headers.get("x-edge-region").is_none(),
        "x-edge-* from clients are stripped: {headers}"
    );
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers["x-request-id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));

    // A valid hop to B, signed as us-east-1 would: served by B's own backends.
    let signer = HopSigner::new(HOP_SECRET.as_bytes(), None, Duration::from_secs(60));
    let host = format!("127.0.0.1:{}", regions[1].port);
    let sign = || {
        signer.sign(
            "us-east-1",
            now_ms(),
            SignedRequest {
                method: "GET",
                host: &host,
                path,
            },
        )
    };
    let seen = get(
        &http,
        &edges[1].url(path),
        &[
            ("x-edge-hop", sign().as_str()),
            ("x-forwarded-for", "6.6.6.6"),
        ],
    )
    .await;
    assert_eq!(
        (
            seen.status,
            seen.decision.as_str(),
            seen.upstream_region.as_str()
        ),
        (200, "hop:local", "eu-west-1")
    );
    let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert!(body["headers"].get("x-edge-hop").is_none());
    assert_eq!(
        body["headers"]["x-forwarded-for"], "6.6.6.6, 127.0.0.1",
        "a peer's forwarding headers are kept"
    );

    // B's backends go down: without a hop B fails over (to us-east-1, first in order) ...
    let [b1, b2] = b;
    b1.stop().await;
    b2.stop().await;
    let failed_over = eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), edges[1].url(path));
        async move {
            let seen = get(&http, &url, &[]).await;
            seen.status == 200
                && seen.decision == "failover:no-healthy-local"
                && seen.upstream_region == "us-east-1"
        }
    })
    .await;
    assert!(failed_over.is_some(), "B should fail over without a hop");
    // ... but a request that already hopped is never forwarded again.
    let seen = get(
        &http,
        &edges[1].url(path),
        &[("x-edge-hop", sign().as_str())],
    )
    .await;
    assert_eq!(seen.status, 503, "{seen:?}");
    assert_eq!(seen.decision, "unavailable:no-healthy-local");
    assert!(seen.body.contains("no region can serve"), "{seen:?}");

    // And A, whose own backend is healthy, still forwards nothing.
    let seen = get(&http, &edges[0].url("/x"), &[]).await;
    assert_eq!(seen.upstream_region, "us-east-1");
}

/// Each region sees its own backend eligible and its peer reachable with a
/// healthy backend, so each would retry a failed GET in the other.
fn ready_to_bounce(status: &serde_json::Value) -> bool {
    let upstream = &status["upstreams"][0];
    let local = upstream["backends"]
        .as_array()
        .is_some_and(|bs| !bs.is_empty() && bs.iter().all(|b| b["eligible"] == true));
    let peer = upstream["regions"].as_array().is_some_and(|rs| {
        rs.iter().any(|r| {
            r["local"] == false && r["reachable"] == true && r["healthy"].as_u64() > Some(0)
        })
    });
    local && peer
}

/// Two regions whose `EDGE_HOP_SECRET`s differ (a key rotation half done)
/// cannot bounce a request between them: `Via` stops it on its way back.
///
/// Setting up the bounce takes care. A region fails over only to a peer
/// whose health report (its health path, which carries its local backend
/// counts) says it has a healthy backend; backends that are really down
/// would be reported as 0 on both sides, and both would answer 503 without
/// forwarding anything. So each region's only backend passes its health
/// probes (`GET /health`) but closes every other request without a word.
/// Then one GET to A goes:
///
/// 1. A's backend resets. A GET may be retried after a reset; with no other
///    local backend, the retry goes to the next region, B
///    (`failover:retry`), with a hop signed with A's key and
///    `Via: 1.1 edge-router.us-east-1`.
/// 2. B cannot verify A's hop (`edge_hop_invalid_total`), so it serves the
///    request as a client's: its own backend resets too, and its retry goes
///    to the only other region, A, with `Via` naming both regions.
/// 3. A cannot verify B's hop either. Without `Via` it would serve the
///    request as a new one and send it round again, a loop bounded only by
///    the retry budgets; with `Via` it sees its own name and answers 508
///    (`edge_loops_total`), which travels back through B to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_key_mismatch_cannot_bounce_between_regions() {
    let closes = |stream: TcpStream, _head: String| async move { drop(stream) };
    let regions = vec![
        RegionSpec::new("us-east-1", vec![raw_origin(closes).await]),
        RegionSpec::new("eu-west-1", vec![raw_origin(closes).await]),
    ];
    let t = Tweaks::default();
    let start = |i: usize, secret: &'static str| {
        let config = config_for(&regions, i, &t);
        let (port, admin) = (regions[i].port, regions[i].admin);
        async move { Edge::start_with_env(&config, port, admin, &[("EDGE_HOP_SECRET", secret)]).await }
    };
    let a = start(0, "hop-key-a-of-at-least-thirty-two-bytes").await;
    let b = start(1, "hop-key-b-of-at-least-thirty-two-bytes").await;
    let http = client();

    let ready = eventually(Duration::from_secs(15), || async {
        ready_to_bounce(&status_json(&http, &a).await)
            && ready_to_bounce(&status_json(&http, &b).await)
    })
    .await;
    assert!(
        ready.is_some(),
        "both regions must look able to serve;\nA: {}\nB: {}",
        status_json(&http, &a).await,
        status_json(&http, &b).await
    );

    // The client's timeout (10 s) catches a request that never ends.
    let resp = http.get(a.url("/bounce")).send().await.unwrap_or_else(|e| {
        panic!(
            "no answer: {e}\nA's log:\n{}\nB's log:\n{}",
            a.log_text(),
            b.log_text()
        )
    });
    let status = resp.status().as_u16();
    let (ma, mb) = (metrics(&http, &a).await, metrics(&http, &b).await);
    let loops = metric_total(&ma, "edge_loops_total") + metric_total(&mb, "edge_loops_total");
    println!("bounce: status {status}, loops refused {loops} (508 expected, refused by A)");
    assert!(
        (500..600).contains(&status),
        "status {status}; A's log:\n{}",
        a.log_text()
    );
    assert!(
        status == 508 || loops >= 1.0,
        "the loop was not recognised (status {status}):\nA:\n{ma}\nB:\n{mb}"
    );
    assert!(
        metric_total(&mb, "edge_hop_invalid_total") >= 1.0,
        "B counts the hop it could not verify:\n{mb}"
    );
}

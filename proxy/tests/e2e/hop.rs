//! `x-edge-hop`: forged hops are stripped, valid hops are served locally and never forwarded again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_router::hop::{HopSigner, SignedRequest};

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
    let signer = HopSigner::new(HOP_SECRET.as_bytes(), Duration::from_secs(60));
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
    assert!(seen.body.contains("no healthy upstream"));

    // And A, whose own backend is healthy, still forwards nothing.
    let seen = get(&http, &edges[0].url("/x"), &[]).await;
    assert_eq!(seen.upstream_region, "us-east-1");
}

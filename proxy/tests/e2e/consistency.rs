//! Consistency policies end to end: tokens issued and honoured, residency,
//! primary, and read-your-writes / bounded staleness over the demo's
//! simulated global table with a real replication delay.

use std::time::{Duration, Instant};

use crate::demo_harness::{header, sample, Demo};
use crate::support::*;

/// Generous bound that only catches a hang.
const HANG: Duration = Duration::from_secs(20);

/// The `x-edge-consistency` token of a successful write through `url`.
async fn write(c: &reqwest::Client, url: &str, body: &str) -> (String, String) {
    let resp = c
        .put(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    assert!(resp.status().is_success(), "PUT {url}: {}", resp.status());
    let token = header(&resp, "x-edge-consistency");
    let cookie = header(&resp, "set-cookie");
    assert!(!token.is_empty(), "a successful write carries a token");
    (token, cookie)
}

#[tokio::test]
async fn a_write_gets_a_token_and_the_token_never_reaches_the_backend() {
    let a = origin("us-east-1", "a").await;
    let regions = [RegionSpec::new("us-east-1", vec![a.addr()])];
    let t = Tweaks {
        policy: "read-your-writes",
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;
    let c = client();
    let (token, cookie) = write(&c, &edge.url("/doc?echo=1"), "v1").await;
    assert!(token.starts_with("v1."), "{token}");
    assert!(cookie.starts_with(&format!("edge_ct={token};")), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=300"] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    // A failed write gets no token.
    let resp = c
        .put(edge.url("/doc?status=500"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(header(&resp, "x-edge-consistency"), "");
    assert_eq!(header(&resp, "set-cookie"), "");

    // Presented back: read by the proxy, never forwarded (header or cookie).
    let resp = c
        .get(edge.url("/doc?echo=1"))
        .header("x-edge-consistency", &token)
        .header("cookie", format!("a=1; edge_ct={token}; b=2"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let headers = &body["headers"];
    assert!(headers.get("x-edge-consistency").is_none(), "{headers}");
    assert_eq!(headers["cookie"], "a=1; b=2", "{headers}");
    // Only the token cookie: the Cookie header goes away entirely.
    let resp = c
        .get(edge.url("/doc?echo=1"))
        .header("cookie", format!("edge_ct={token}"))
        .send()
        .await
        .expect("GET");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(body["headers"].get("cookie").is_none(), "{body}");

    // Forged, expired-looking and garbage tokens are ignored and counted, never an error.
    let mut forged: Vec<String> = token.split('.').map(str::to_string).collect();
    forged[3] = "AAAA".into();
    for bad in [
        forged.join("."),
        "garbage".to_string(),
        "v1.x.y.z".to_string(),
    ] {
        let s = get(&c, &edge.url("/doc"), &[("x-edge-consistency", &bad)]).await;
        assert_eq!(s.status, 200, "{bad}: {s:?}");
        assert_eq!(s.upstream_region, "us-east-1");
    }
    let m = metrics(&c, &edge).await;
    let tokens = |result: &str| {
        sample(
            &m,
            "edge_consistency_tokens_total",
            &format!("result=\"{result}\""),
        )
    };
    // The altered signature is forged; "garbage" and "v1.x.y.z" (no
    // signature bytes) are not tokens at all.
    assert_eq!(tokens("forged"), 1.0, "{m}");
    assert_eq!(tokens("malformed"), 2.0, "{m}");
    assert_eq!(tokens("issued"), 1.0, "{m}");
    // The header read, then the cookie alone.
    assert_eq!(tokens("valid"), 2.0, "{m}");
}

/// us-east-1 and eu-west-1, one origin each, both edge-routers started.
async fn two_regions(t: &Tweaks) -> ([edge_loadtest::origin::Origin; 2], Vec<Edge>) {
    let a = origin("us-east-1", "a").await;
    let b = origin("eu-west-1", "b").await;
    let regions = [
        RegionSpec::new("us-east-1", vec![a.addr()]),
        RegionSpec::new("eu-west-1", vec![b.addr()]),
    ];
    let edges = start_all(&regions, t).await;
    ([a, b], edges)
}

#[tokio::test]
async fn residency_never_leaves_the_allowed_regions() {
    let t = Tweaks {
        route_extra: "allowed_regions = [\"eu-west-1\"]",
        ..Tweaks::default()
    };
    let ([_a, b], edges) = two_regions(&t).await;
    let c = client();
    // us-east-1 may not serve it: forwarded to the allowed region.
    let s = get(&c, &edges[0].url("/x"), &[]).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.upstream_region, "eu-west-1");
    assert_eq!(s.decision, "residency");
    // The allowed region's backend fails: never served from us-east-1,
    // however healthy it is; a clear 503 instead.
    b.stop().await;
    let refused = eventually(HANG, || async {
        let s = try_get(&c, &edges[1].url("/x")).await;
        s.status == 503 && s.decision.starts_with("unavailable")
    })
    .await;
    assert!(
        refused.is_some(),
        "eu-west-1 never refused once its backend died"
    );
    for edge in &edges {
        let s = try_get(&c, &edge.url("/x")).await;
        assert_ne!(s.upstream_region, "us-east-1", "{s:?}");
        assert_ne!(s.status, 200, "{s:?}");
    }
    let m = metrics(&c, &edges[1]).await;
    assert!(
        sample(
            &m,
            "edge_requests_total",
            "decision=\"unavailable:residency\""
        ) >= 1.0,
        "{m}"
    );
    // The body says nothing about internals; the reason is in the header (debug on).
    let s = try_get(&c, &edges[1].url("/x")).await;
    assert!(!s.body.contains("residency"), "{}", s.body);
}

#[tokio::test]
async fn primary_routes_reads_and_writes_to_the_primary_and_fails_when_it_is_down() {
    let t = Tweaks {
        policy: "primary",
        upstream_extra: "primary_region = \"us-east-1\"",
        ..Tweaks::default()
    };
    let ([a, _b], edges) = two_regions(&t).await;
    let c = client();
    let s = get(&c, &edges[1].url("/x"), &[]).await;
    assert_eq!(
        (s.status, s.upstream_region.as_str()),
        (200, "us-east-1"),
        "{s:?}"
    );
    assert_eq!(s.decision, "primary");
    let resp = c.post(edges[1].url("/x")).send().await.expect("POST");
    assert_eq!(header(&resp, "x-edge-upstream-region"), "us-east-1");
    // on_primary_down defaults to "fail": no write lands elsewhere.
    a.stop().await;
    let failed = eventually(HANG, || async {
        let s = try_get(&c, &edges[1].url("/x")).await;
        s.status == 503 && s.decision == "unavailable:primary-down"
    })
    .await;
    assert!(
        failed.is_some(),
        "eu-west-1 kept serving with the primary down"
    );
}

// ---------------------------------------------------------------- demo

#[tokio::test]
async fn read_your_writes_across_three_regions_with_a_two_second_delay() {
    let demo = Demo::start("2s").await;
    demo.wait_lag_known(1).await;
    let c = client();
    let key = format!("k{}", std::process::id());
    let written = Instant::now();
    let (token, _) = write(&c, &demo.url(0, &format!("/kv/{key}")), "v1").await;

    // At once through eu-west-1 with the token: its replica has not seen
    // the write, so us-east-1 serves it, with the new value.
    let with_token = get(
        &c,
        &demo.url(1, &format!("/kv/{key}")),
        &[("x-edge-consistency", &token)],
    )
    .await;
    assert_eq!(with_token.status, 200, "{with_token:?}");
    assert_eq!(with_token.upstream_region, "us-east-1", "{with_token:?}");
    assert_eq!(with_token.decision, "ryw:lagging:us-east-1");
    let body: serde_json::Value = serde_json::from_str(&with_token.body).expect("json");
    assert_eq!(body["value"], "v1");

    // The cookie works the same, through the third region.
    let cookie = format!("edge_ct={token}");
    let via_cookie = get(
        &c,
        &demo.url(2, &format!("/kv/{key}")),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(via_cookie.upstream_region, "us-east-1", "{via_cookie:?}");

    // Without the token, eu-west-1 serves from its own replica: stale is allowed.
    let without = get(&c, &demo.url(1, &format!("/kv/{key}")), &[]).await;
    assert_eq!(without.upstream_region, "eu-west-1", "{without:?}");
    assert_eq!(without.decision, "local");
    // Not replicated yet: the 2 s delay is far longer than these few requests.
    assert_eq!(without.status, 404, "not replicated yet: {without:?}");

    // Once replication catches up, eu-west-1 serves the token itself.
    let caught_up = eventually(HANG, || async {
        let s = get(
            &c,
            &demo.url(1, &format!("/kv/{key}")),
            &[("x-edge-consistency", &token)],
        )
        .await;
        s.upstream_region == "eu-west-1" && s.status == 200
    })
    .await
    .map(|_| written.elapsed());
    let after = caught_up.expect("eu-west-1 never caught up");
    assert!(
        after >= Duration::from_secs(2),
        "served locally before the replication delay: {after:?}"
    );
    let s = get(
        &c,
        &demo.url(1, &format!("/kv/{key}")),
        &[("x-edge-consistency", &token)],
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&s.body).expect("json");
    assert_eq!(body["value"], "v1", "{s:?}");
    assert_eq!(s.decision, "ryw:caught-up:us-east-1");
}

#[tokio::test]
async fn bounded_staleness_follows_the_replication_delay() {
    let demo = Demo::start("500ms").await;
    demo.wait_lag_known(1).await;
    let c = client();
    let url = demo.url(1, "/bounded/kv/x");
    let local = eventually(HANG, || async {
        get(&c, &url, &[]).await.upstream_region == "eu-west-1"
    })
    .await;
    assert!(
        local.is_some(),
        "lag under max_staleness (3s) but not served locally"
    );
    assert!(get(&c, &url, &[])
        .await
        .decision
        .starts_with("staleness:ok"));

    // Above max_staleness: the primary serves.
    demo.set_delay("6s").await;
    let primary = eventually(HANG, || async {
        let s = get(&c, &url, &[]).await;
        s.upstream_region == "us-east-1" && s.decision.starts_with("staleness:lag=")
    })
    .await;
    assert!(
        primary.is_some(),
        "lag over max_staleness but still served locally"
    );

    // Lowered again: writes in flight are released and reads go local.
    demo.set_delay("200ms").await;
    let back = eventually(HANG, || async {
        get(&c, &url, &[]).await.upstream_region == "eu-west-1"
    })
    .await;
    assert!(
        back.is_some(),
        "never local again after the delay was lowered"
    );
    let m = c
        .get(demo.admin(1, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        m.contains("edge_replication_lag_seconds{from=\"us-east-1\""),
        "{m}"
    );
}

/// The writer's region goes down before the other replicas have its write:
/// a token-bearing read is refused by every replica still behind (never
/// answered stale), and served by another region as soon as its replica
/// has caught up.
#[tokio::test]
async fn read_your_writes_survives_the_writers_region_going_down() {
    // Longer than the test: no replica sees another region's rows (or its
    // heartbeats) until the delay is lowered.
    let demo = Demo::start("60s").await;
    let c = client();
    let key = format!("w{}", std::process::id());
    let (token, _) = write(&c, &demo.url(1, &format!("/kv/{key}")), "v1").await;

    // eu-west-1's two origins fail: us-east-1 learns it from eu-west-1's report.
    for i in 0..2 {
        let origin = format!("http://127.0.0.1:{}/.demo/fail", demo.base + 100 + 2 + i);
        let resp = c.post(origin).send().await.expect("origin");
        assert!(resp.status().is_success());
    }
    let read = || async {
        get(
            &c,
            &demo.url(0, &format!("/kv/{key}")),
            &[("x-edge-consistency", &token)],
        )
        .await
    };
    let refused = eventually(HANG, || async {
        let s = read().await;
        s.status == 503 && s.decision == "ryw:writer-down:eu-west-1"
    })
    .await;
    assert!(
        refused.is_some(),
        "with the writer down and every replica behind, the read must be refused: {:?}",
        read().await
    );
    // Only ap-southeast-1's replica catches up; us-east-1's stays behind.
    demo.set_delay_at("?from=eu-west-1&to=ap-southeast-1", "0s")
        .await;
    let served = eventually(HANG, || async {
        let s = read().await;
        s.status == 200 && s.upstream_region == "ap-southeast-1"
    })
    .await;
    assert!(
        served.is_some(),
        "never served once a replica caught up: {:?}",
        read().await
    );
    let s = read().await;
    let body: serde_json::Value = serde_json::from_str(&s.body).expect("json");
    assert_eq!(body["value"], "v1", "{s:?}");
    assert_eq!(body["served_by"], "ap-southeast-1", "{s:?}");
}

/// A peer forwards a read-your-writes read with its token: the receiving
/// region checks the token whatever its own route says, and refuses a read
/// its replica cannot show to be recent enough, or a token it cannot verify.
#[tokio::test]
async fn a_forwarded_token_is_checked_by_the_region_it_reaches() {
    use edge_router::hop::{HopSigner, SignedRequest};
    use edge_router::token::TokenSigner;

    // Each region on its own embedded table: eu-west-1 never learns
    // us-east-1's watermark, so any token from us-east-1 is "behind" there.
    let (_origins, edges) = two_regions(&Tweaks::default()).await;
    let c = client();
    let now = edge_router::clock::unix_ms;
    let host = format!("127.0.0.1:{}", edges[1].port);
    let hop = HopSigner::new(HOP_SECRET.as_bytes(), None, Duration::from_secs(60)).sign(
        "us-east-1",
        now(),
        SignedRequest {
            method: "GET",
            host: &host,
            path: "/doc",
        },
    );
    let tokens = TokenSigner::new(
        HOP_SECRET.as_bytes(),
        None,
        Duration::from_secs(300),
        Duration::from_secs(300),
    );
    let behind = tokens.issue("us-east-1", now());
    let s = get(
        &c,
        &edges[1].url("/doc"),
        &[("x-edge-hop", &hop), ("x-edge-consistency", &behind)],
    )
    .await;
    assert_eq!(s.status, 503, "{s:?}");
    assert_eq!(s.decision, "unavailable:ryw-behind:us-east-1");
    // Its own region's token is always satisfied.
    let own = tokens.issue("eu-west-1", now());
    let s = get(
        &c,
        &edges[1].url("/doc"),
        &[("x-edge-hop", &hop), ("x-edge-consistency", &own)],
    )
    .await;
    assert_eq!((s.status, s.decision.as_str()), (200, "hop:local"), "{s:?}");
    // A token it cannot verify is refused on a hop (ignored from a client).
    let s = get(
        &c,
        &edges[1].url("/doc"),
        &[
            ("x-edge-hop", &hop),
            ("x-edge-consistency", "v1.00000000.eA.eA"),
        ],
    )
    .await;
    assert_eq!(s.status, 503, "{s:?}");
    assert_eq!(s.decision, "unavailable:ryw-unverified");
    let s = get(
        &c,
        &edges[1].url("/doc"),
        &[("x-edge-consistency", "garbage")],
    )
    .await;
    assert_eq!(s.status, 200, "{s:?}");
}

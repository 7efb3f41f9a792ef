//! No open proxy, the admin API's reads and its bearer-token guard.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_metrics_status_and_drain_auth() {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let t = Tweaks {
        host: "api.test",
        ..Tweaks::default()
    };
    let edge = Edge::start(
        &config_for(&regions, 0, &t),
        regions[0].port,
        regions[0].admin,
    )
    .await;
    let http = client();

    let seen = get(&http, &edge.url("/"), &[("host", "evil.test")]).await;
    assert_eq!(seen.status, 404, "unknown host must not be proxied");
    let seen = get(&http, &edge.url("/"), &[("host", "api.test")]).await;
    assert_eq!((seen.status, seen.upstream_region.as_str()), (200, "solo"));
    let resp = http
        .get(edge.url("/"))
        .header("host", "api.test")
        .send()
        .await
        .unwrap();
    let timing = resp.headers()["server-timing"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        timing.starts_with("edge;dur=") && timing.contains("upstream;dur="),
        "{timing}"
    );
    assert_eq!(resp.headers()["x-edge-region"], "solo");

    let metrics = http
        .get(edge.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "edge_requests_total{",
        "edge_request_duration_seconds_bucket{",
        "edge_upstream_duration_seconds_bucket{",
        "edge_backend_healthy{",
        "edge_backend_ejections_total{",
        "edge_retries_total{",
        "edge_draining",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains("status_class=\"4xx\"") && metrics.contains("decision=\"no-route\""));
    assert!(metrics.contains("decision=\"local\"") && metrics.contains("status_class=\"2xx\""));

    let status: serde_json::Value = http
        .get(edge.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .expect("valid JSON");
    assert_eq!(status["region"], "solo");
    assert_eq!(status["upstreams"][0]["backends"][0]["eligible"], true);

    let code = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        code(http.post(edge.admin_url("/drain")).send().await.unwrap()),
        401
    );
    assert_eq!(
        code(
            http.post(edge.admin_url("/drain"))
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        code(http.get(edge.url("/.edge/health")).send().await.unwrap()),
        200,
        "not draining yet"
    );
    assert_eq!(
        code(
            http.post(edge.admin_url("/drain"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        code(http.get(edge.url("/.edge/health")).send().await.unwrap()),
        503
    );
    assert_eq!(
        code(
            http.delete(edge.admin_url("/drain"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
        ),
        200
    );
    assert_eq!(
        code(http.get(edge.url("/.edge/health")).send().await.unwrap()),
        200
    );
}

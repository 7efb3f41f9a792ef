//! No open proxy, the admin API's reads and its bearer-token guard.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_metrics_status_and_drain_auth() {
    let t = Tweaks {
        host: "api.test",
        ..Tweaks::default()
    };
    let (_o, edge) = solo_edge(&t).await;
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

    let metrics = metrics(&http, &edge).await;
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

    let status = status_json(&http, &edge).await;
    assert_eq!(status["region"], "solo");
    assert_eq!(status["upstreams"][0]["backends"][0]["eligible"], true);

    let code = |req: reqwest::RequestBuilder| async move {
        req.send().await.expect("request").status().as_u16()
    };
    let health = || http.get(edge.url("/.edge/health"));
    let drain = |m: reqwest::Method| http.request(m, edge.admin_url("/drain"));
    assert_eq!(code(drain(reqwest::Method::POST)).await, 401, "no token");
    assert_eq!(
        code(drain(reqwest::Method::POST).bearer_auth("wrong")).await,
        401
    );
    assert_eq!(code(health()).await, 200, "not draining yet");
    assert_eq!(
        code(drain(reqwest::Method::POST).bearer_auth(ADMIN_TOKEN)).await,
        200
    );
    assert_eq!(code(health()).await, 503, "draining");
    assert_eq!(
        code(drain(reqwest::Method::DELETE).bearer_auth(ADMIN_TOKEN)).await,
        200
    );
    assert_eq!(code(health()).await, 200, "drain cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_taken_out_of_rotation_gets_no_requests_until_put_back() {
    let (a, b) = (origin("solo", "a").await, origin("solo", "b").await);
    let regions = vec![RegionSpec::new("solo", vec![a.addr(), b.addr()])];
    let edge = start_region(&regions, 0, &Tweaks::default()).await;
    let c = client();
    let address = a.addr().to_string();
    let call = |path: &'static str, token: bool| {
        let mut req = c.post(edge.admin_url(&format!("{path}?upstream=api&address={address}")));
        if token {
            req = req.bearer_auth(ADMIN_TOKEN);
        }
        req.send()
    };
    assert_eq!(
        call("/backends/disable", false)
            .await
            .expect("POST")
            .status(),
        401
    );
    assert_eq!(
        call("/backends/disable", true)
            .await
            .expect("POST")
            .status(),
        200
    );
    for i in 0..20 {
        let s = try_get(&c, &edge.url(&format!("/out/{i}"))).await;
        assert_eq!((s.status, s.origin.as_str()), (200, "b"), "request {i}");
    }
    let status = status_json(&c, &edge).await;
    let backends = status["upstreams"][0]["backends"].clone();
    assert!(
        backends.as_array().is_some_and(|bs| bs
            .iter()
            .any(|x| x["address"] == address.as_str() && x["disabled"] == true)),
        "{backends}"
    );
    // Unknown names say so.
    let unknown = c
        .post(edge.admin_url("/backends/disable?upstream=api&address=10.0.0.1:1"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("POST");
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        call("/backends/enable", true).await.expect("POST").status(),
        200
    );
    let back = eventually(std::time::Duration::from_secs(10), || async {
        try_get(&c, &edge.url("/back")).await.origin == "a"
    })
    .await;
    assert!(back.is_some(), "the backend never came back into rotation");
}

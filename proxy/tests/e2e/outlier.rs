//! Passive outlier ejection: a backend answering 5xx is ejected and re-admitted later.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_returning_5xx_is_ejected_then_readmitted() {
    let good = origin("solo", "good").await;
    let bad = origin("solo", "bad").await;
    let regions = vec![RegionSpec::new("solo", vec![good.addr(), bad.addr()])];
    let t = Tweaks {
        // Active checks only once at start, so only passive detection acts here.
        health: r#"{ path = "/health", interval = "1h", timeout = "500ms", healthy = 1, unhealthy = 1 }"#,
        outlier: r#"{ consecutive_gateway_failures = 3, base_ejection = "1s", max_ejection_percent = 50 }"#,
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;
    let http = client();
    let status = || async {
        let s = status_json(&http, &edge).await;
        s["upstreams"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == bad.addr().to_string())
            .cloned()
            .unwrap()
    };

    bad.set_failing(true);
    let mut five_xx = 0;
    for _ in 0..12 {
        if get(&http, &edge.url("/x"), &[]).await.status >= 500 {
            five_xx += 1;
        }
    }
    assert_eq!(
        five_xx, 3,
        "exactly consecutive_failures 5xx reach clients before ejection"
    );
    let b = status().await;
    assert_eq!(b["ejected"], true, "{b}");
    assert_eq!(b["times_ejected"], 1);
    let metrics = metrics(&http, &edge).await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("edge_backend_ejections_total") && l.contains(&bad.addr().to_string())
        })
        .expect("ejections metric");
    assert!(line.ends_with(" 1"), "{line}");
    for _ in 0..6 {
        let seen = get(&http, &edge.url("/x"), &[]).await;
        assert_eq!(
            (seen.status, seen.origin.as_str()),
            (200, "good"),
            "ejected backend gets no traffic"
        );
    }

    // Healthy again: after the ejection time it is re-admitted and serves.
    bad.set_failing(false);
    let readmitted = eventually(Duration::from_secs(10), || async {
        status().await["ejected"] == false
    })
    .await;
    assert!(readmitted.is_some(), "backend never re-admitted");
    let served = eventually(Duration::from_secs(5), || {
        let (http, url) = (http.clone(), edge.url("/x"));
        async move { get(&http, &url, &[]).await.origin == "bad" }
    })
    .await;
    assert!(served.is_some(), "re-admitted backend serves again");
}

/// A client asking for 500s is not a failing backend: only gateway failures
/// (connect, reset, timeout, 502/503/504) eject by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_chosen_errors_do_not_eject_backends() {
    let o1 = origin("solo", "o1").await;
    let o2 = origin("solo", "o2").await;
    let regions = vec![RegionSpec::new("solo", vec![o1.addr(), o2.addr()])];
    let t = Tweaks {
        outlier: r#"{ consecutive_gateway_failures = 3, base_ejection = "30s", max_ejection_percent = 50 }"#,
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;
    let http = client();
    for _ in 0..12 {
        assert_eq!(get(&http, &edge.url("/?status=500"), &[]).await.status, 500);
    }
    let s = status_json(&http, &edge).await;
    for b in s["upstreams"][0]["backends"].as_array().expect("backends") {
        assert_eq!(b["ejected"], false, "{b}");
    }
}

/// Many failures at once cannot eject more than `max_ejection_percent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_respect_the_ejection_cap() {
    let mut origins = Vec::new();
    for i in 0..4 {
        origins.push(origin("solo", &format!("o{i}")).await);
    }
    let regions = vec![RegionSpec::new(
        "solo",
        origins.iter().map(|o| o.addr()).collect(),
    )];
    let t = Tweaks {
        health: r#"{ path = "/health", interval = "1h", timeout = "500ms", healthy = 1, unhealthy = 1 }"#,
        outlier: r#"{ consecutive_gateway_failures = 1, base_ejection = "60s", max_ejection_percent = 50 }"#,
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;
    for o in &origins {
        o.set_failing(true);
    }
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (http, url) = (http.clone(), edge.url("/x"));
        tasks.push(tokio::spawn(
            async move { get(&http, &url, &[]).await.status },
        ));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let s = status_json(&http, &edge).await;
    let ejected = s["upstreams"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|b| b["ejected"] == true)
        .count();
    assert_eq!(ejected, 2, "50 % of 4 backends, never more: {s}");
}

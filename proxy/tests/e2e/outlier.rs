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
        outlier: r#"{ consecutive_failures = 3, base_ejection = "1s", max_ejection_percent = 50 }"#,
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

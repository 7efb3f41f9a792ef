//! SIGTERM: health turns 503 at once, traffic is served through the drain period, then the process exits.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let t = Tweaks {
        drain: "2s",
        ..Tweaks::default()
    };
    let mut edge = start_region(&regions, 0, &t).await;
    let http = client();
    assert_eq!(
        http.get(edge.url("/.edge/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    edge.signal("TERM");
    let sent = Instant::now();
    let unhealthy = eventually(Duration::from_secs(2), || {
        let (http, url) = (http.clone(), edge.url("/.edge/health"));
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    println!("drain: health path 503 after {unhealthy:?}");
    assert!(unhealthy.is_some(), "health path did not turn 503");
    for _ in 0..5 {
        assert_eq!(
            get(&http, &edge.url("/x"), &[]).await.status,
            200,
            "traffic is still served while draining"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = edge.wait_exit(Duration::from_secs(10)).await;
    let total = sent.elapsed();
    println!("drain: process exited {total:?} after SIGTERM (drain_period 2 s)");
    assert!(
        exited.is_some(),
        "process did not exit; log:\n{}",
        edge.log_text()
    );
    assert!(
        total >= Duration::from_secs(2),
        "exited before the drain period: {total:?}"
    );
    assert!(
        total <= Duration::from_secs(2 + 2),
        "exited later than drain period + 2 s: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let t = Tweaks {
        drain: "60s",
        ..Tweaks::default()
    };
    let mut edge = start_region(&regions, 0, &t).await;
    edge.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.signal("TERM");
    let exited = edge.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exited.is_some(),
        "a second SIGTERM must not wait for the 60 s drain"
    );
}

//! SIGTERM: health turns 503 at once and responses say `Connection: close`,
//! traffic is served through the drain period, requests in flight may finish
//! within `shutdown_timeout`, then the process exits.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    let t = Tweaks {
        drain: "2s",
        ..Tweaks::default()
    };
    let (_o, mut edge) = solo_edge(&t).await;
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
    // Only a hang catcher: nothing is in flight, so the exit follows the
    // drain period closely (the figure is printed above), but CI shares its
    // two cores with other tests.
    assert!(
        total <= Duration::from_secs(2 + 15),
        "exited long after the drain period: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_responses_close_the_connection() {
    let t = Tweaks {
        drain: "60s",
        ..Tweaks::default()
    };
    let (_o, edge) = solo_edge(&t).await;
    let http = client();
    let before = http.get(edge.url("/x")).send().await.expect("GET");
    assert_ne!(
        before.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    edge.signal("TERM");
    let closes = eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), edge.url("/x"));
        async move {
            http.get(url).send().await.is_ok_and(|r| {
                r.status() == 200
                    && r.headers().get("connection").map(|v| v.as_bytes()) == Some(&b"close"[..])
            })
        }
    })
    .await;
    assert!(
        closes.is_some(),
        "responses during drain carry Connection: close"
    );
    // The accelerator's probe and the admin see the drain; it cannot be cancelled.
    let cancel = http
        .delete(edge.admin_url("/drain"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("DELETE /drain");
    assert_eq!(cancel.status(), 409, "a SIGTERM drain cannot be cancelled");
    assert_eq!(
        http.get(edge.url("/.edge/health"))
            .send()
            .await
            .expect("health")
            .status(),
        503
    );
    edge.signal("TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_request_outlives_the_drain_period() {
    let t = Tweaks {
        drain: "1s",
        ..Tweaks::default()
    };
    let (_o, mut edge) = solo_edge(&t).await;
    let http = client();
    // Answered 3 s after it starts: past the 1 s drain period, well within
    // the default 30 s shutdown_timeout.
    let slow = tokio::spawn({
        let (http, url) = (http.clone(), edge.url("/slow?delay=3s"));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let in_flight = wait_for_metric(
        &http,
        &edge,
        "edge_requests_in_flight",
        "1",
        Duration::from_secs(10),
    )
    .await;
    assert!(in_flight, "the slow request is in flight");
    edge.signal("TERM");
    let status = slow.await.expect("task");
    assert_eq!(status.ok(), Some(200), "the request in flight completed");
    let exited = edge.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exited.is_some(),
        "exits once nothing is in flight, well before shutdown_timeout; log:\n{}",
        edge.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let t = Tweaks {
        drain: "60s",
        ..Tweaks::default()
    };
    let (_o, mut edge) = solo_edge(&t).await;
    edge.signal("TERM");
    // The first signal has been handled once the health path turns 503.
    let http = client();
    let draining = eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), edge.url("/.edge/health"));
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    assert!(draining.is_some(), "the first SIGTERM starts the drain");
    edge.signal("TERM");
    let exited = edge.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exited.is_some(),
        "a second SIGTERM must not wait for the 60 s drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_term_int_and_quit_end_the_process() {
    let (_origin, mut edge) = solo_edge(&Tweaks::default()).await;
    let c = client();
    // logrotate's SIGUSR1, `systemctl reload`'s SIGHUP, and stray ones.
    for (sig, logged) in [
        ("HUP", "Reload"),
        ("USR1", "ReopenLogs"),
        ("USR2", "graceful upgrade needs server.upgrade_sock"),
        ("ALRM", "SIGALRM ignored"),
    ] {
        edge.signal(sig);
        let seen = eventually(Duration::from_secs(10), || async {
            edge.log_text().contains(logged)
        })
        .await;
        assert!(
            seen.is_some(),
            "SIG{sig} left no log line:\n{}",
            edge.log_text()
        );
        assert!(
            edge.wait_exit(Duration::from_millis(200)).await.is_none(),
            "SIG{sig} ended the process"
        );
        let s = try_get(&c, &edge.url(&format!("/after-{sig}"))).await;
        assert_eq!(s.status, 200, "after SIG{sig}");
    }
    edge.signal("TERM");
    assert!(
        edge.wait_exit(Duration::from_secs(30)).await.is_some(),
        "SIGTERM did not end it"
    );
}

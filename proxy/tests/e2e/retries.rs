//! Retries: only what cannot duplicate a write, within a budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// An origin written for the test: answers `/health` with 200, counts every
/// other request and never answers it (the connection stays open).
async fn stalling_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).to_string();
                    got.drain(..end + 4);
                    if head.starts_with("GET /health ") {
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        continue;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Hold the connection open without answering.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(s);
                    return;
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_post_is_not_retried_after_a_timeout_nor_in_another_region() {
    let (stall, stalled) = stalling_origin().await;
    let (other, other_seen) = stalling_origin().await;
    let b = origin("eu-west-1", "b1").await;
    let regions = vec![
        RegionSpec::new("us-east-1", vec![stall, other]),
        RegionSpec::new("eu-west-1", vec![b.addr()]),
    ];
    let t = Tweaks {
        upstream_extra: "read_timeout = \"500ms\"",
        ..Tweaks::default()
    };
    let edges = start_all(&regions, &t).await;
    let http = client();
    let resp = http
        .post(edges[0].url("/orders"))
        .header("idempotency-key", "k-1")
        .body("{}")
        .send()
        .await
        .expect("POST answered");
    assert_eq!(
        resp.status(),
        504,
        "a timed-out write is reported, not retried"
    );
    let sent_to = stalled.load(Ordering::SeqCst) + other_seen.load(Ordering::SeqCst);
    assert_eq!(sent_to, 1, "the write reached exactly one backend");
    let m = metrics(&http, &edges[1]).await;
    let peer_requests: f64 = m
        .lines()
        .filter(|l| l.starts_with("edge_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(peer_requests, 0.0, "never retried in another region:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_budget_refuses_retries_beyond_it() {
    let good = origin("solo", "good").await;
    // Passes its health check, then closes every request without a byte: a
    // reset before any response, which a GET may normally retry.
    let resets = raw_origin(|stream: tokio::net::TcpStream, _head: String| async move {
        drop(stream);
    })
    .await;
    let regions = vec![RegionSpec::new("solo", vec![good.addr(), resets])];
    let t = Tweaks {
        outlier: r#"{ consecutive_gateway_failures = 1000, base_ejection = "1s", max_ejection_percent = 50 }"#,
        // No retry may be in flight at all.
        upstream_extra: "retry_budget = { budget_percent = 0, min_retry_concurrency = 0 }",
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;
    let http = client();
    let mut failed = 0;
    for _ in 0..8 {
        if try_get(&http, &edge.url("/x")).await.status == 502 {
            failed += 1;
        }
    }
    assert!(
        failed > 0,
        "round-robin met the resetting backend and could not retry"
    );
    let m = metrics(&http, &edge).await;
    let refused = m
        .lines()
        .find(|l| l.starts_with("edge_retries_refused_total{") && l.contains("reason=\"budget\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(refused, f64::from(failed), "{m}");

    // With the default budget the same backend costs the client nothing.
    let t = Tweaks {
        outlier: r#"{ consecutive_gateway_failures = 1000, base_ejection = "1s", max_ejection_percent = 50 }"#,
        ..Tweaks::default()
    };
    let regions = vec![RegionSpec::new("solo", vec![good.addr(), resets])];
    let edge = start_region(&regions, 0, &t).await;
    for _ in 0..8 {
        assert_eq!(try_get(&http, &edge.url("/x")).await.status, 200);
    }
}

//! The access log never blocks a request: a stalled reader of stderr costs
//! log lines (counted), never traffic.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_log_reader_never_blocks_requests() {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let t = Tweaks {
        // A small queue so that the test fills it quickly.
        tail: "[log]\nqueue_lines = 64\n",
        ..Tweaks::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config_for(&regions, 0, &t)).expect("config");
    // stderr is a pipe nobody reads: once its 64 KiB buffer is full, every
    // write the log thread makes blocks for good.
    let mut child = Command::new(edge_binary())
        .args(["run", "-c"])
        .arg(&path)
        .env("EDGE_HOP_SECRET", HOP_SECRET)
        .env("EDGE_LOG", "info")
        .env_remove("EDGE_REGION")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("edge-router starts");
    let _stderr_never_read = child.stderr.take();
    let r = &regions[0];
    let (url, health, admin) = (
        format!("http://127.0.0.1:{}/x", r.port),
        format!("http://127.0.0.1:{}/.edge/health", r.port),
        format!("http://127.0.0.1:{}/metrics", r.admin),
    );
    let http = client();
    let up = eventually(Duration::from_secs(30), || {
        let (http, health) = (http.clone(), health.clone());
        async move { http.get(health).send().await.is_ok() }
    })
    .await;
    assert!(up.is_some(), "edge-router did not start");
    // Each access-log line is a few hundred bytes: 3,000 requests write far
    // more than the pipe and the queue can hold.
    for i in 0..3000 {
        let resp = http.get(&url).send().await;
        let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(
            status, 200,
            "request {i} failed while the log reader is stalled"
        );
    }
    let health_status = http
        .get(&health)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(health_status, 200, "the health path still answers");
    let text = http
        .get(&admin)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let dropped = text
        .lines()
        .find(|l| l.starts_with("edge_log_dropped_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dropped > 0.0, "dropped lines are counted:\n{text}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_logs_each_request_once_and_the_reason_stays_out_of_the_body() {
    // One region whose only backend is a closed port: every request fails,
    // first by connecting, then (once it is found down) by policy.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let regions = vec![RegionSpec::new("solo", vec![dead])];
    let edge = start_region(&regions, 0, &Tweaks::default()).await;
    let c = client();
    let mut bodies = Vec::new();
    for i in 0..40 {
        let s = try_get(&c, &edge.url(&format!("/outage/{i}"))).await;
        assert!(s.status >= 500, "request {i}: {}", s.status);
        bodies.push(s.body);
    }
    let logged = eventually(Duration::from_secs(10), || async {
        edge.log_text().matches("path=\"/outage/").count() >= 40
    })
    .await;
    let log = edge.log_text();
    assert!(
        logged.is_some(),
        "not every request has its access line:\n{log}"
    );
    assert_eq!(
        log.matches("Fail to proxy").count(),
        0,
        "Pingora's line per failure is back:\n{log}"
    );
    assert!(
        log.matches("request failed").count() <= 2,
        "failures are warned about at most once per interval:\n{log}"
    );
    for b in bodies {
        assert!(
            !b.contains("unavailable") && !b.contains("no-healthy") && !b.contains("127.0.0.1"),
            "internals in an error body: {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_the_proxy_are_logged_and_counted() {
    let (_origin, edge) = solo_edge(&Tweaks::default()).await;
    let c = client();
    // Pingora's parser refuses these (two Host headers), before any hook of ours.
    for i in 0..5 {
        let r = raw_request(
            edge.port,
            &format!("GET /twice/{i} HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 400, "request {i}");
    }
    // Pingora refuses CONNECT (no forward proxying) with 405.
    let connect = raw_request(
        edge.port,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(connect.status, 405);
    // Ours: a head larger than the limit.
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: a.test\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert_eq!(raw_request(edge.port, &big).await.status, 431);
    // An HTTP/2 client (the h2c preface) on a listener without `server.h2c`.
    let h2c = raw_request(edge.port, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert_eq!(h2c.status, 400, "h2c refused: {h2c:?}");
    // And one the proxy answers, for comparison.
    assert_eq!(try_get(&c, &edge.url("/fine")).await.status, 200);

    let counted = |text: &str, decision: &str| {
        text.lines()
            .filter(|l| l.starts_with("edge_requests_total{"))
            .filter(|l| l.contains(&format!("decision=\"{decision}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let m = metrics(&c, &edge).await;
    assert_eq!(
        counted(&m, "bad-request") + counted(&m, "header_invalid"),
        6.0,
        "the five double Hosts and the h2c preface: {m}"
    );
    assert_eq!(counted(&m, "header_too_large"), 1.0, "{m}");
    assert_eq!(counted(&m, "connect-refused"), 1.0, "{m}");
    let logged = eventually(Duration::from_secs(10), || async {
        let log = edge.log_text();
        log.matches("path=\"/twice/").count() >= 5 && log.contains("path=\"/fine\"")
    })
    .await;
    let log = edge.log_text();
    assert!(
        logged.is_some(),
        "refused requests left no access line:\n{log}"
    );
    assert!(
        log.contains("decision=\"header_too_large\"") || log.contains("decision=header_too_large"),
        "{log}"
    );
    assert_eq!(
        log.matches("path=\"/fine\"").count() + log.matches("path=/fine").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_what_operators_expect_and_no_query_by_default() {
    let (_origin, edge) = solo_edge(&Tweaks::default()).await;
    let c = client();
    let resp = c
        .post(edge.url("/fields?token=secret-value"))
        .header("user-agent", "fields-test/1.0")
        .body("0123456789")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200);
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body_len = resp.bytes().await.expect("body").len();
    let found = eventually(Duration::from_secs(10), || async {
        edge.log_text().contains(&request_id)
    })
    .await;
    let log = edge.log_text();
    assert!(found.is_some(), "no access line for {request_id}:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains(&request_id) && l.contains("edge_router::access"))
        .unwrap_or("");
    for field in [
        "client=\"127.0.0.1:",
        "method=POST",
        "path=\"/fields\"",
        "status=200",
        "bytes_in=10",
        "user_agent=\"fields-test/1.0\"",
        "upstream_status=200",
        "backend=\"127.0.0.1:",
        "decision=",
        "duration_us=",
    ] {
        assert!(line.contains(field), "`{field}` missing from: {line}");
    }
    assert!(line.contains(&format!("bytes_out={body_len}")), "{line}");
    assert!(
        !line.contains("secret-value"),
        "the query string was logged: {line}"
    );

    let m = metrics(&c, &edge).await;
    assert!(
        metric_total(&m, "edge_request_body_bytes_total") >= 10.0,
        "{m}"
    );
    assert!(metric_total(&m, "edge_response_body_bytes_total") >= body_len as f64);
    assert!(m.contains("edge_build_info{"), "no build info");
    assert!(
        m.contains("process_resident_memory_bytes"),
        "no process metrics"
    );

    // Asked for: the query string too.
    let t = Tweaks {
        tail: "[log]\naccess_query = true",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    assert_eq!(try_get(&c, &edge.url("/q?page=2")).await.status, 200);
    let logged = eventually(Duration::from_secs(10), || async {
        edge.log_text().contains("path=\"/q?page=2\"")
    })
    .await;
    assert!(logged.is_some(), "{}", edge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_file_of_its_own_is_reopened_on_sigusr1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let tail: &'static str =
        Box::leak(format!("[log]\naccess_path = \"{}\"", path.display()).into_boxed_str());
    let t = Tweaks {
        tail,
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let c = client();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert_eq!(try_get(&c, &edge.url("/before-rotation")).await.status, 200);
    let written = eventually(Duration::from_secs(10), || async {
        read(&path).contains("/before-rotation")
    })
    .await;
    assert!(
        written.is_some(),
        "no access line in the file; stderr:\n{}",
        edge.log_text()
    );
    assert!(
        !edge.log_text().contains("/before-rotation"),
        "the access line also went to stderr"
    );
    assert!(
        edge.log_text().contains("edge-router starting"),
        "operations stay on stderr"
    );

    // logrotate: rename, then SIGUSR1.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).expect("rename");
    edge.signal("USR1");
    let reopened = eventually(Duration::from_secs(10), || async {
        try_get(&c, &edge.url("/after-rotation")).await;
        read(&path).contains("/after-rotation")
    })
    .await;
    assert!(
        reopened.is_some(),
        "the new file never got a line; stderr:\n{}",
        edge.log_text()
    );
    assert!(
        !read(&rotated).contains("/after-rotation"),
        "kept writing to the rotated file"
    );
    assert!(read(&rotated).contains("/before-rotation"));
}

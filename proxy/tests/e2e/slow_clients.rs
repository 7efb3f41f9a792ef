//! Slow and idle clients: a request head must arrive within
//! `header_read_timeout` (408), a client that stops reading is cut off after
//! `send_timeout`, and `max_connections` makes room by closing idle
//! keep-alive connections before it refuses new ones.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Send `request` on a new connection and read until the edge closes it (a
/// refused connection may reset before the write: that reads as nothing).
/// The 10 s limit only catches a hang.
async fn exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    let _ = s.write_all(request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_get_408_after_header_read_timeout() {
    let t = Tweaks {
        server_extra: "header_read_timeout = \"1s\"",
        ..Tweaks::default()
    };
    let (_o, edge) = solo_edge(&t).await;
    let mut s = TcpStream::connect(("127.0.0.1", edge.port))
        .await
        .expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\n").await.expect("write");
    // One header line every 300 ms: each read is quick, the head never ends.
    let trickle = async {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    // Hang catcher only: the configured bound is 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let http = client();
    let m = metrics(&http, &edge).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("edge_client_refusals_total")
                && l.contains("kind=\"header_timeout\"")
                && !l.ends_with(" 0")),
        "{m}"
    );
}

/// An edge with `max_connections = 3` and three connections open, each
/// after one request (`kept_alive`) or silent; returns when all three are
/// counted (admission happens when a connection's task runs, not in accept
/// order).
async fn edge_at_its_limit(
    kept_alive: bool,
) -> (
    Edge,
    edge_loadtest::origin::Origin,
    Vec<TcpStream>,
    reqwest::Client,
) {
    let t = Tweaks {
        server_extra: "max_connections = 3\nheader_read_timeout = \"60s\"",
        ..Tweaks::default()
    };
    let (o, edge) = solo_edge(&t).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", edge.port))
            .await
            .expect("connect");
        if kept_alive {
            s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .expect("write");
            let mut buf = vec![0u8; 16 * 1024];
            let n = s.read(&mut buf).await.expect("response");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
        held.push(s);
    }
    let http = client();
    let counted = wait_for_metric(
        &http,
        &edge,
        "edge_client_connections",
        "3",
        Duration::from_secs(10),
    )
    .await;
    assert!(counted, "three connections are open");
    (edge, o, held, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused() {
    // Connections that never sent a request are not idle keep-alive ones:
    // nothing can be closed to make room.
    let (edge, _o, idle, http) = edge_at_its_limit(false).await;
    let got = exchange(
        edge.port,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let refused = got.is_empty().then_some(());
    assert!(
        refused.is_some(),
        "a fourth connection is refused: {}",
        String::from_utf8_lossy(&got)
    );
    // The admin listener is not subject to the traffic limit.
    let m = metrics(&http, &edge).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("edge_client_refusals_total")
                && l.contains("kind=\"max_connections\"")
                && !l.ends_with(" 0")),
        "{m}"
    );
    // Freeing a slot admits new clients again.
    drop(idle);
    let served = eventually(Duration::from_secs(10), || {
        let (http, url) = (http.clone(), edge.url("/x"));
        async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    assert!(
        served.is_some(),
        "clients are served once connections close"
    );
}

/// Blank lines before the request line end nothing: the deadline still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_blank_lines_do_not_evade_the_header_deadline() {
    let t = Tweaks {
        server_extra: "header_read_timeout = \"1s\"",
        ..Tweaks::default()
    };
    let (_o, edge) = solo_edge(&t).await;
    // Hang catcher only: the configured bound is 1 s.
    let got = exchange(edge.port, b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

/// A client that stops reading a large response is cut off after
/// `send_timeout` instead of holding the response and its upstream forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let t = Tweaks {
        server_extra: "send_timeout = \"1s\"",
        ..Tweaks::default()
    };
    let (_o, edge) = solo_edge(&t).await;
    const SIZE: usize = 64 * 1024 * 1024;
    let mut s = TcpStream::connect(("127.0.0.1", edge.port))
        .await
        .expect("connect");
    s.write_all(format!("GET /big?size={SIZE} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let http = client();
    let started = wait_for_metric(
        &http,
        &edge,
        "edge_requests_in_flight",
        "1",
        Duration::from_secs(10),
    )
    .await;
    assert!(started, "the request is in flight");
    // We read nothing; the proxy's writes stall, and after send_timeout it gives up.
    let ended = wait_for_metric(
        &http,
        &edge,
        "edge_requests_in_flight",
        "0",
        Duration::from_secs(20),
    )
    .await;
    assert!(ended, "the stalled response was ended");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got)).await;
    assert!(
        got.len() < SIZE,
        "the client did not get a complete response: {} bytes",
        got.len()
    );
}

/// At `max_connections`, an idle keep-alive connection is closed to make
/// room (nginx's behaviour), so a new client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_make_room_at_the_limit() {
    let (edge, _o, mut idle, _http) = edge_at_its_limit(true).await;
    let got = exchange(
        edge.port,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "the new client is served: {}",
        String::from_utf8_lossy(&got)
    );
    // One of the idle ones was closed to make room.
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 1, "exactly one idle connection made room");
}

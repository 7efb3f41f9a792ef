//! Once a response has started, an upstream failure aborts the client's
//! connection: no terminating chunk that would make a truncated body look
//! complete, and no error text spliced into the body or an upgraded stream.
//! The origins are written here, byte by byte, to misbehave on purpose.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

const GET_X: &str = "GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n";

const WS_UPGRADE: &str = concat!(
    "GET /ws HTTP/1.1\r\n",
    "Host: a.test\r\n",
    "Connection: Upgrade\r\n",
    "Upgrade: websocket\r\n",
    "Sec-WebSocket-Version: 13\r\n",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    "\r\n",
);

const SWITCHING: &str = concat!(
    "HTTP/1.1 101 Switching Protocols\r\n",
    "Upgrade: websocket\r\n",
    "Connection: Upgrade\r\n",
    "\r\n",
);

/// One region whose only backend is `backend`.
async fn edge_for(backend: SocketAddr, t: &Tweaks) -> Edge {
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    start_region(&regions, 0, t).await
}

/// The head (as text) and the bytes after it of a raw HTTP/1 response.
fn split(bytes: &[u8]) -> (String, &[u8]) {
    let end = head_end(bytes)
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
    (
        String::from_utf8_lossy(&bytes[..end]).into_owned(),
        &bytes[end..],
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The access-log line of an aborted request (text: `outcome="upstream_aborted"`;
/// JSON, if `EDGE_LOG_FORMAT` says so: `"outcome":"upstream_aborted"`).
/// An edge in front of a backend that sends `bytes` and closes: a response cut short.
async fn edge_cut_short(bytes: &'static [u8]) -> Edge {
    let backend = raw_origin(move |mut stream: TcpStream, _head: String| async move {
        let _ = stream.write_all(bytes).await;
        let _ = stream.shutdown().await;
    })
    .await;
    edge_for(backend, &Tweaks::default()).await
}

fn logged_as_aborted(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("outcome") && l.contains("upstream_aborted"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mid_body_upstream_reset_is_not_completed() {
    // One chunk of a chunked body, then the connection ends mid-message.
    let edge =
        edge_cut_short(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await;

    let bytes = raw_until_eof(edge.port, GET_X).await;
    let (head, body) = split(&bytes);
    let shown = String::from_utf8_lossy(body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let hello = body
        .windows(5)
        .position(|w| w == b"hello")
        .unwrap_or_else(|| panic!("the bytes sent before the failure reach the client: {shown:?}"));
    assert!(
        !contains(&body[hello..], b"0\r\n\r\n"),
        "a terminating chunk would make the truncated body look complete: {shown:?}"
    );
    assert!(
        !contains(body, b"upstream"),
        "no error text in the body: {shown:?}"
    );

    let http = client();
    let counted = eventually(Duration::from_secs(10), || async {
        metrics(&http, &edge)
            .await
            .lines()
            .any(|l| l.starts_with("edge_upstream_aborted_total") && l.ends_with(" 1"))
    })
    .await;
    assert!(
        counted.is_some(),
        "edge_upstream_aborted_total counts the abort:\n{}",
        metrics(&http, &edge).await
    );
    let logged = eventually(Duration::from_secs(10), || async {
        logged_as_aborted(&edge.log_text())
    })
    .await;
    assert!(
        logged.is_some(),
        "the access log says outcome=upstream_aborted; log:\n{}",
        edge.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_length_short_body_is_not_padded_with_error_text() {
    // 100 bytes promised, 5 sent.
    let edge = edge_cut_short(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello").await;

    // Returning at all means the edge closed the connection.
    let bytes = raw_until_eof(edge.port, GET_X).await;
    let (head, body) = split(&bytes);
    let shown = String::from_utf8_lossy(body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body.len() < 100,
        "the client gets fewer bytes than promised, never a padded body: {shown:?}"
    );
    assert!(
        !contains(body, b"upstream"),
        "no error text in the body: {shown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_idle_past_read_timeout_gets_no_error_bytes() {
    let backend = raw_origin(|mut stream: TcpStream, _head: String| async move {
        let _ = stream.write_all(SWITCHING.as_bytes()).await;
        // Upgraded, then silent: the socket stays open well past the read timeout.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let t = Tweaks {
        upstream_extra: r#"read_timeout = "500ms""#,
        ..Tweaks::default()
    };
    let edge = edge_for(backend, &t).await;

    // Returning at all means the edge closed the connection after the timeout.
    let bytes = raw_until_eof(edge.port, WS_UPGRADE).await;
    let (head, after) = split(&bytes);
    let shown = String::from_utf8_lossy(after);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !contains(after, b"upstream timed out"),
        "error text written into the upgraded stream: {shown:?}"
    );
    assert!(
        !contains(after, b"504"),
        "an error response written into the upgraded stream: {shown:?}"
    );
}

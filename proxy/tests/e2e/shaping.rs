//! Per-route shaping (issue 10): routes that answer themselves (`return`:
//! redirects and maintenance pages) and response compression (`compress`,
//! gzip and brotli), over raw sockets so that every header and byte the
//! client gets is seen as sent.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Routes added after the proxied route `api`: a redirect, a maintenance
/// page with a header rule, and a page behind a rate limit.
const STATIC_ROUTES: &str = r#"
[[routes]]
name = "moved"
host = "*"
path_prefix = "/old"
return = { status = 301, location = "https://new.example.com$request_uri" }

[[routes]]
name = "maintenance"
host = "*"
path_prefix = "/maint"
return = { status = 503, body = "down for maintenance\n", content_type = "text/plain" }
response_headers = { set = { "retry-after" = "600" } }

[[routes]]
name = "limited"
host = "*"
path_prefix = "/limited"
return = { status = 200, body = "ok\n" }
rate_limit = { rate = "2/m" }
"#;

/// `GET target` with `extra` header lines (each ending in CRLF).
fn get_request(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n{extra}\r\n")
}

/// Sum of `edge_requests_total` samples whose labels contain every one of `labels`.
fn requests_with(metrics: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("edge_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn header_has(resp: &RawResponse, name: &str, token: &str) -> bool {
    resp.headers
        .iter()
        .filter(|(n, _)| n == name)
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn unbrotli(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_routes_redirect_with_path_and_query_and_serve_a_maintenance_page() {
    let t = Tweaks {
        tail: STATIC_ROUTES,
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;

    // The redirect carries the path as matched (normalised) and the query as sent.
    let moved = raw_request(edge.port, &get_request("/old/./a//b?x=1&y=two", "")).await;
    assert_eq!(moved.status, 301, "{moved:?}");
    assert_eq!(
        moved.header("location"),
        Some("https://new.example.com/old/a/b?x=1&y=two")
    );
    assert_eq!(moved.header("content-length"), Some("0"));
    assert!(moved.body.is_empty());

    let page = raw_request(edge.port, &get_request("/maint/anything", "")).await;
    assert_eq!(page.status, 503, "{page:?}");
    assert_eq!(page.text(), "down for maintenance\n");
    assert_eq!(page.header("content-type"), Some("text/plain"));
    assert_eq!(page.header("content-length"), Some("21"));
    // The route's rule, not the proxy's own `Retry-After: 1` for a 503.
    assert_eq!(page.header("retry-after"), Some("600"));

    // HEAD: the same head, no body (the connection closes, so whatever
    // came after the head would be read).
    let head = raw_request(
        edge.port,
        "HEAD /maint HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 503, "{head:?}");
    assert_eq!(head.header("content-length"), Some("21"));
    assert!(head.body.is_empty(), "HEAD got a body: {:?}", head.text());

    // A rate limit applies to a route that answers itself too.
    let c = client();
    for i in 0..2 {
        assert_eq!(
            try_get(&c, &edge.url("/limited")).await.status,
            200,
            "request {i}"
        );
    }
    assert_eq!(try_get(&c, &edge.url("/limited")).await.status, 429);

    // Counted as answered by the proxy (after the response is sent: polled).
    let decision = "decision=\"return\"";
    let expected: [(&[&str], f64); 4] = [
        (&["route=\"moved\"", decision, "status_class=\"3xx\""], 1.0),
        (
            &["route=\"maintenance\"", decision, "status_class=\"5xx\""],
            2.0,
        ),
        (
            &["route=\"limited\"", decision, "status_class=\"2xx\""],
            2.0,
        ),
        (&["route=\"limited\"", "decision=\"rate-limited\""], 1.0),
    ];
    let counted = eventually(Duration::from_secs(10), || async {
        let m = metrics(&c, &edge).await;
        expected
            .iter()
            .all(|(labels, n)| requests_with(&m, labels) == *n)
    })
    .await;
    assert!(counted.is_some(), "{}", metrics(&c, &edge).await);

    // One access-log line each, naming the decision.
    let ids: Vec<String> = [&moved, &page, &head]
        .iter()
        .map(|r| {
            r.header("x-request-id")
                .expect("an x-request-id")
                .to_string()
        })
        .collect();
    let access_lines = |id: &str| {
        edge.log_text()
            .lines()
            .filter(|l| l.contains("edge_router::access") && l.contains(id))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let logged = eventually(Duration::from_secs(10), || async {
        ids.iter().all(|id| !access_lines(id).is_empty())
    })
    .await;
    assert!(
        logged.is_some(),
        "access lines missing:\n{}",
        edge.log_text()
    );
    for id in &ids {
        let lines = access_lines(id);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("return"), "{}", lines[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_brotli_decode_to_the_origins_body_and_identity_is_the_default() {
    let t = Tweaks {
        route_extra: "compress = true",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;

    // No Accept-Encoding: the origin's bytes, saying they could vary.
    let plain = raw_request(edge.port, &get_request("/doc", "")).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.header("content-length").is_some(), "{plain:?}");
    assert!(header_has(&plain, "vary", "accept-encoding"), "{plain:?}");
    let original = plain.body.clone();
    assert!(plain.json()["path"] == "/doc", "{}", plain.text());

    let gz = raw_request(edge.port, &get_request("/doc", "Accept-Encoding: gzip\r\n")).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"), "{gz:?}");
    assert!(header_has(&gz, "vary", "accept-encoding"), "{gz:?}");
    assert_eq!(gunzip(&gz.body).expect("a whole gzip stream"), original);

    let br = raw_request(edge.port, &get_request("/doc", "Accept-Encoding: br\r\n")).await;
    assert_eq!(br.header("content-encoding"), Some("br"), "{br:?}");
    assert!(header_has(&br, "vary", "accept-encoding"), "{br:?}");
    assert_eq!(unbrotli(&br.body).expect("a whole brotli stream"), original);

    // What browsers send (gzip listed first, equal weight): brotli, the smaller.
    let browser = raw_request(
        edge.port,
        &get_request("/doc", "Accept-Encoding: gzip, deflate, br, zstd\r\n"),
    )
    .await;
    assert_eq!(
        browser.header("content-encoding"),
        Some("br"),
        "{browser:?}"
    );
    assert_eq!(unbrotli(&browser.body).expect("brotli"), original);

    // q=0 refuses a coding (Pingora alone would still use the first listed).
    let refused = raw_request(
        edge.port,
        &get_request("/doc", "Accept-Encoding: gzip;q=0, br;q=0\r\n"),
    )
    .await;
    assert_eq!(refused.header("content-encoding"), None, "{refused:?}");
    assert_eq!(refused.body, original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_responses_and_unlisted_types_pass_through_untouched() {
    // An origin that compresses by itself.
    let text = "already compressed by the origin\n".repeat(40);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut encoder, text.as_bytes()).expect("gzip in memory");
    let encoded: &'static [u8] = Box::leak(encoder.finish().expect("gzip").into_boxed_slice());
    let self_compressing = raw_origin(move |mut stream: TcpStream, _head: String| async move {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            encoded.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(encoded).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let tail: &'static str = Box::leak(
        format!(
            "\n[upstreams.encoded]\nhealth = {}\nbackends.solo = [\"{self_compressing}\"]\n\n[[routes]]\nname = \"encoded\"\nhost = \"*\"\npath_prefix = \"/enc\"\nupstream = \"encoded\"\ncompress = true\n",
            Tweaks::default().health
        )
        .into_boxed_str(),
    );
    let t = Tweaks {
        route_extra: "compress = true",
        tail,
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;

    for accept in ["gzip", "br"] {
        let resp = raw_request(
            edge.port,
            &get_request("/enc", &format!("Accept-Encoding: {accept}\r\n")),
        )
        .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.header("content-encoding"), Some("gzip"), "{accept}");
        assert_eq!(
            resp.body, encoded,
            "{accept}: the origin's bytes, not encoded twice"
        );
        assert_eq!(gunzip(&resp.body).expect("gzip"), text.as_bytes());
    }

    // application/octet-stream is not among the default types (Pingora
    // alone would compress it).
    let binary = raw_request(
        edge.port,
        &get_request("/blob?size=2000", "Accept-Encoding: gzip, br\r\n"),
    )
    .await;
    assert_eq!(binary.status, 200);
    assert_eq!(
        binary.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(binary.header("content-encoding"), None, "{binary:?}");
    assert_eq!(binary.header("content-length"), Some("2000"));
    assert_eq!(binary.body, vec![b'x'; 2000]);
    assert!(
        !header_has(&binary, "vary", "accept-encoding"),
        "a type never compressed does not vary: {binary:?}"
    );

    // The same text is compressed when public...
    let public = raw_request(edge.port, &get_request("/doc", "Accept-Encoding: gzip\r\n")).await;
    assert_eq!(
        public.header("content-encoding"),
        Some("gzip"),
        "{public:?}"
    );
    // ...not when marked private (BREACH), nor for an HTTP/1.0 client
    // (a compressed body is chunked, which HTTP/1.0 cannot read).
    let private = raw_request(
        edge.port,
        &get_request("/doc?cache-control=private", "Accept-Encoding: gzip\r\n"),
    )
    .await;
    assert_eq!(private.status, 200);
    assert_eq!(private.header("content-encoding"), None, "{private:?}");
    assert!(
        String::from_utf8_lossy(&private.body).contains("\"solo\""),
        "{private:?}"
    );
    let old = raw_request(
        edge.port,
        "GET /doc HTTP/1.0\r\nHost: a.test\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await;
    assert_eq!(old.status, 200);
    assert_eq!(old.header("content-encoding"), None, "{old:?}");
    assert!(
        String::from_utf8_lossy(&old.body).contains("\"solo\""),
        "{old:?}"
    );
}

/// The data of the chunks in a chunked body read so far, and whether the
/// last (zero-size) chunk came.
fn chunks_so_far(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size = std::str::from_utf8(&data[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        data = &data[line_end + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        if data.len() < size + 2 {
            return (out, false);
        }
        data = &data[size + 2..];
    }
}

/// Send `GET /big` with `Accept-Encoding: coding` on a new connection,
/// read the response head, let the origin reset (`reset_now`), and read
/// until the edge closes: the whole exchange's bytes.
async fn cut_short(port: u16, coding: &str, reset_now: &tokio::sync::Notify) -> Vec<u8> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = get_request("/big", &format!("Accept-Encoding: {coding}\r\n"));
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let got_head = tokio::time::timeout(Duration::from_secs(10), async {
        while head_end(&bytes).is_none() {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    assert_eq!(
        got_head,
        Ok(true),
        "no response head; got {:?}",
        String::from_utf8_lossy(&bytes)
    );
    reset_now.notify_one();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the edge kept the connection open");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_reset_mid_body_does_not_end_the_compressed_stream() {
    // The origin promises 200,000 bytes, sends 60,000, waits until the
    // client has the response head, then resets the connection.
    let reset_now = Arc::new(tokio::sync::Notify::new());
    let signal = reset_now.clone();
    let backend = raw_origin(move |mut stream: TcpStream, _head: String| {
        let signal = signal.clone();
        async move {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 200000\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let line = "the same line of text, over and over again\n";
            let body = line.repeat(60_000 / line.len());
            let _ = stream.write_all(body.as_bytes()).await;
            signal.notified().await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    })
    .await;
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    let t = Tweaks {
        route_extra: "compress = true",
        ..Tweaks::default()
    };
    let edge = start_region(&regions, 0, &t).await;

    for (coding, decode) in [
        ("gzip", gunzip as fn(&[u8]) -> std::io::Result<Vec<u8>>),
        ("br", unbrotli),
    ] {
        let bytes = cut_short(edge.port, coding, &reset_now).await;
        let end = head_end(&bytes).expect("a head");
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("content-encoding: {coding}")),
            "{head}"
        );
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let (data, last_chunk) = chunks_so_far(&bytes[end..]);
        assert!(
            !last_chunk,
            "{coding}: the terminating chunk would make a truncated body look complete"
        );
        let decoded = decode(&data);
        assert!(
            decoded.is_err(),
            "{coding}: the stream was ended as if the body were whole ({} bytes decoded)",
            decoded.map(|d| d.len()).unwrap_or_default()
        );
    }

    let c = client();
    assert!(
        wait_for_metric(
            &c,
            &edge,
            "edge_upstream_aborted_total",
            "2",
            Duration::from_secs(10)
        )
        .await,
        "each abort is counted:\n{}",
        metrics(&c, &edge).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_copy_is_compressed_for_each_client_as_it_asks() {
    let t = Tweaks {
        route_extra: "cache = true\ncompress = true",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let target = "/cached?cache-control=public,max-age=300";

    let first = raw_request(edge.port, &get_request(target, "Accept-Encoding: gzip\r\n")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"), "{first:?}");
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    let original = gunzip(&first.body).expect("gzip");

    // The stored copy is the origin's bytes: a client without
    // Accept-Encoding gets them, not the gzip another client got.
    let plain = raw_request(edge.port, &get_request(target, "")).await;
    assert_eq!(plain.header("x-cache"), Some("HIT"), "{plain:?}");
    assert_eq!(plain.header("content-encoding"), None, "{plain:?}");
    assert_eq!(plain.body, original);
    assert!(header_has(&plain, "vary", "accept-encoding"), "{plain:?}");

    let br = raw_request(edge.port, &get_request(target, "Accept-Encoding: br\r\n")).await;
    assert_eq!(br.header("x-cache"), Some("HIT"), "{br:?}");
    assert_eq!(br.header("content-encoding"), Some("br"), "{br:?}");
    assert_eq!(unbrotli(&br.body).expect("brotli"), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_turn_compression_on_without_a_restart() {
    let o = origin("solo", "o1").await;
    let regions = vec![RegionSpec::new("solo", vec![o.addr()])];
    let edge = start_region(&regions, 0, &Tweaks::default()).await;
    let compressing = Tweaks {
        route_extra: "compress = true",
        ..Tweaks::default()
    };
    std::fs::write(edge.config_path(), config_for(&regions, 0, &compressing)).expect("rewrite");
    let (status, body) = post_reload(&edge).await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("compress") && error.contains("restart"),
        "{body}"
    );
    // The old config serves on, uncompressed.
    let served = raw_request(edge.port, &get_request("/doc", "Accept-Encoding: gzip\r\n")).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-encoding"), None, "{served:?}");
}

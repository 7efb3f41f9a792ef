//! Hosts are validated and paths normalised before a route is matched, and
//! the path matched is the path the backend gets; forwarding headers are
//! believed only from trusted proxies; `Via` names the region and refuses
//! loops. Requests go over raw sockets: reqwest would normalise the path
//! (dot-segments) or refuse the Host before the edge ever saw it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_loadtest::origin::Origin;
use edge_router::hop::{HopSigner, SignedRequest};

use crate::support::*;

const REGION: &str = "us-east-1";

/// `*.example.com` goes to `public`, except `/admin` and below to `admin`;
/// the exact host `api.example.com` goes to `exact`.
const ROUTES: &str = r#"[[routes]]
name = "public"
host = "*.example.com"
path_prefix = "/"
upstream = "public"

[[routes]]
name = "admin"
host = "*.example.com"
path_prefix = "/admin/"
upstream = "admin"

[[routes]]
name = "exact"
host = "api.example.com"
upstream = "exact"
"#;

/// One edge with [`ROUTES`], each upstream a stock origin named after it
/// (`x-origin-name`), which answers with the path it received and, with
/// `?echo=1`, the headers.
struct Site {
    edge: Edge,
    _origins: Vec<Origin>,
}

/// Start a [`Site`]; `server_extra` is added to `[server]` as raw TOML.
async fn site(server_extra: &str) -> Site {
    let health = Tweaks::default().health;
    let mut origins = Vec::new();
    let mut upstreams = String::new();
    for name in ["public", "admin", "exact"] {
        let o = origin(REGION, name).await;
        upstreams.push_str(&format!(
            "[upstreams.{name}]\nhealth = {health}\nbackends.{REGION} = [\"{}\"]\n\n",
            o.addr()
        ));
        origins.push(o);
    }
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[server]\nregion = \"{REGION}\"\nlisten = [\"127.0.0.1:{port}\"]\nthreads = 1\n\
         debug_headers = true\ndrain_period = \"2s\"\n{server_extra}\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{upstreams}{}",
        ROUTES
    );
    Site {
        edge: Edge::start(&config, port, admin).await,
        _origins: origins,
    }
}

/// `GET target` with `Host: host` and `extra` header lines (each ending in
/// CRLF), sent exactly as written.
async fn send(site: &Site, host: &str, target: &str, extra: &str) -> RawResponse {
    let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
    raw_request(site.edge.port, &request).await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encoded_dot_segments_cannot_skip_a_route() {
    let s = site("").await;
    for target in [
        "/%61dmin/x",
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "//admin//x",
        "/public/..;/admin/x",
    ] {
        let r = send(&s, "www.example.com", target, "").await;
        assert_eq!(
            (r.status, r.header("x-origin-name")),
            (200, Some("admin")),
            "{target} is the admin route: {r:?}"
        );
        assert_eq!(
            r.json()["path"],
            "/admin/x",
            "{target}: the backend gets the path that was matched"
        );
    }
}

/// Targets a backend might read differently from us are refused (by
/// Pingora's parser or by our rules), never matched as something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_targets_are_refused() {
    let s = site("").await;
    for target in ["/public\\..\\admin/x", "foo:bar://x/admin/x", "admin/x"] {
        let r = send(&s, "www.example.com", target, "").await;
        assert_eq!(r.status, 400, "{target}: {r:?}");
    }
    let r = send(&s, "www.example.com", "/admin;jsessionid=1/x", "").await;
    assert_eq!(
        r.header("x-origin-name"),
        Some("admin"),
        "path parameters do not hide a segment: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefixes_match_whole_segments() {
    let s = site("").await;
    let r = send(&s, "www.example.com", "/adminx", "").await;
    assert_eq!(
        (r.status, r.header("x-origin-name")),
        (200, Some("public")),
        "/adminx is not under /admin: {r:?}"
    );
    assert_eq!(r.json()["path"], "/adminx");
    for target in ["/admin", "/admin/"] {
        let r = send(&s, "www.example.com", target, "").await;
        assert_eq!(
            (r.status, r.header("x-origin-name")),
            (200, Some("admin")),
            "{target}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn escaped_slashes_are_kept_by_default_and_rejected_when_configured() {
    let target = "/public%2F..%2Fadmin/x";
    let keep = site("").await;
    let r = send(&keep, "www.example.com", target, "").await;
    assert_eq!(
        (r.status, r.header("x-origin-name")),
        (200, Some("public")),
        "an encoded slash never splits a segment, so `..%2F` climbs nothing: {r:?}"
    );
    assert_eq!(r.json()["path"], target, "forwarded as it was matched");

    let reject = site(r#"escaped_slashes = "reject""#).await;
    let r = send(&reject, "www.example.com", target, "").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = send(&reject, "www.example.com", "/admin/x", "").await;
    assert_eq!(
        (r.status, r.header("x-origin-name")),
        (200, Some("admin")),
        "paths without encoded slashes are unaffected: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_must_be_a_valid_authority() {
    let s = site("").await;
    for host in ["evil.com/.example.com", "api.example.com:junk"] {
        let r = send(&s, host, "/x", "").await;
        assert_eq!(r.status, 400, "Host: {host}: {r:?}");
    }
    // Case, one trailing dot and the port do not matter: the exact route serves.
    let r = send(&s, "API.Example.COM.:8080", "/x", "").await;
    assert_eq!(
        (r.status, r.header("x-origin-name")),
        (200, Some("exact")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_headers_are_replaced_for_untrusted_clients() {
    let forged = "X-Forwarded-For: 6.6.6.6\r\n\
                  X-Forwarded-For: 7.7.7.7\r\n\
                  Forwarded: for=6.6.6.6\r\n";

    let untrusted = site("").await;
    let body = send(&untrusted, "www.example.com", "/x?echo=1", forged)
        .await
        .json();
    let headers = &body["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert!(
        headers.get("forwarded").is_none(),
        "an untrusted client's Forwarded is removed: {headers}"
    );

    let trusted = site(r#"trusted_proxies = ["127.0.0.1"]"#).await;
    let body = send(&trusted, "www.example.com", "/x?echo=1", forged)
        .await
        .json();
    let headers = &body["headers"];
    assert_eq!(
        headers["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 127.0.0.1",
        "every line of a trusted proxy's header is kept: {headers}"
    );
    let forwarded = headers["forwarded"].as_str().unwrap_or_default();
    assert!(
        forwarded.starts_with("for=6.6.6.6, for=127.0.0.1"),
        "a trusted Forwarded is kept and ours appended: {headers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn via_names_this_region_and_loops_are_refused() {
    let s = site("").await;
    let me = format!("edge-router.{REGION}");

    let body = send(&s, "www.example.com", "/x?echo=1", "").await.json();
    let via = body["headers"]["via"].as_str().unwrap_or_default();
    assert!(via.contains(&me), "{body}");

    // Another region in Via is no loop: ours is appended.
    let r = send(
        &s,
        "www.example.com",
        "/x?echo=1",
        "Via: 1.1 edge-router.eu-west-1\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["headers"]["via"],
        format!("1.1 edge-router.eu-west-1, 1.1 {me}")
    );

    // Our own name: the request was here before. A hop signed with this
    // edge's key changes nothing.
    let signer = HopSigner::new(HOP_SECRET.as_bytes(), None, Duration::from_secs(60));
    let hop = signer.sign(
        "eu-west-1",
        now_ms(),
        SignedRequest {
            method: "GET",
            host: "www.example.com",
            path: "/x",
        },
    );
    let extra = format!("Via: 1.0 cdn.example, 1.1 {me}\r\nx-edge-hop: {hop}\r\n");
    let r = send(&s, "www.example.com", "/x", &extra).await;
    assert_eq!(r.status, 508, "{r:?}");
    let text = metrics(&client(), &s.edge).await;
    assert_eq!(metric_total(&text, "edge_loops_total"), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_body_limit_timeouts_and_header_rules_apply() {
    let t = Tweaks {
        route_extra: "max_body = \"16\"\nread_timeout = \"300ms\"\nrequest_headers = { set = { \"x-added\" = \"by-route\" }, remove = [\"x-drop\"] }\nresponse_headers = { set = { \"x-frame-options\" = \"DENY\" }, remove = [\"x-origin-name\"] }",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let c = client();
    // Declared larger than max_body: 413 before the upstream is asked.
    let big = c
        .post(edge.url("/upload"))
        .body(vec![b'x'; 100])
        .send()
        .await
        .expect("POST");
    assert_eq!(big.status(), 413);
    // Streamed (chunked) past it: refused too.
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{}\r\n0\r\n\r\n",
        "x".repeat(100)
    );
    assert_eq!(raw_request(edge.port, &chunked).await.status, 413);
    let small = c
        .post(edge.url("/upload?echo=1"))
        .header("x-drop", "secret")
        .body("0123456789")
        .send()
        .await
        .expect("POST");
    assert_eq!(small.status(), 200);
    assert_eq!(
        small
            .headers()
            .get("x-frame-options")
            .and_then(|v| v.to_str().ok()),
        Some("DENY")
    );
    assert!(
        small.headers().get("x-origin-name").is_none(),
        "removed from the response"
    );
    let echoed = small.text().await.expect("body");
    assert!(echoed.contains("\"x-added\":\"by-route\""), "{echoed}");
    assert!(
        !echoed.contains("x-drop"),
        "removed from the request: {echoed}"
    );
    // The route's read timeout, not the upstream's 30 s.
    let slow = try_get(&c, &edge.url("/slow?delay=2s")).await;
    assert_eq!(slow.status, 504, "{}", slow.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_rate_limit_answers_429_with_retry_after_per_key() {
    // Three a minute: the fourth within the minute is over, however slow the machine.
    let t = Tweaks {
        route_extra: "rate_limit = { rate = \"3/m\", by = \"header:x-api-key\" }",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let c = client();
    let get = |key: &'static str| {
        let c = c.clone();
        let url = edge.url("/limited");
        async move {
            c.get(url)
                .header("x-api-key", key)
                .send()
                .await
                .expect("GET")
        }
    };
    for i in 0..3 {
        assert_eq!(
            get("alice").await.status(),
            200,
            "request {i} within the burst"
        );
    }
    let over = get("alice").await;
    assert_eq!(over.status(), 429);
    let wait: u64 = over
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    // Another key has its own bucket.
    assert_eq!(get("bob").await.status(), 200);
    let m = metrics(&c, &edge).await;
    assert_eq!(metric_total(&m, "edge_rate_limited_total"), 1.0, "{m}");
}

//! The demo's origin: a small HTTP server standing in for one backend of one
//! region. It says who it is (JSON body, `x-origin-region`, `x-origin-name`),
//! can be told to fail so failover can be watched, and keeps a key-value
//! store in its region's replica of the simulated global table, so that
//! reads through different regions can disagree until replication catches
//! up. It trusts the demo's proxies and serves loopback only; it is not a
//! general-purpose test origin (the load tester has that).
//!
//! - `POST /.demo/fail`: every answer, health included, is 503 until
//!   `POST /.demo/recover`.
//! - `GET /health`: 200 while not failing.
//! - `PUT` or `POST` `…/kv/KEY`: store the body (UTF-8, at most 64 KiB) as
//!   written by this region; 201.
//! - `GET` `…/kv/KEY`: the value as this region's replica has it; 404 if it
//!   has none. Only the last two segments count, so the same store is
//!   reachable under every route prefix (`/kv/KEY`, `/bounded/kv/KEY`).
//! - Anything else: 200 with `{"region", "origin", "path", "served"}`
//!   (`served` counts the requests this origin answered).
//! - Under `/static/` and `/cached/` (the demo's cached routes) a 200 to a
//!   GET is cacheable: `Cache-Control: public, max-age=60`, an `ETag`, and
//!   `Surrogate-Key: <first segment> <last segment>` to purge by.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use super::{
    json_response, method_not_allowed, read_body, spawn_server, text_response, Body, BodyError,
};
use crate::clock::unix_ms;
use crate::tables::embedded::EmbeddedTable;
use crate::tables::{Attr, Item, Table, TableError};

/// Partition of the key-value rows, apart from heartbeats and invalidations.
const KV_PARTITION: &str = "demo-kv";

/// Largest value a PUT may store.
const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Longest key.
const MAX_KEY_LEN: usize = 128;

/// Where one demo origin listens, who it is, and its region's replica.
pub(super) struct OriginSpec {
    /// Fixed loopback address from the demo plan.
    pub(super) addr: SocketAddr,
    /// E.g. `us-east-1-a`.
    pub(super) name: String,
    /// The region it serves, which is also the replica it writes to.
    pub(super) region: String,
    /// That region's replica.
    pub(super) table: EmbeddedTable,
}

struct Origin {
    name: String,
    region: String,
    table: EmbeddedTable,
    failing: AtomicBool,
    served: AtomicU64,
}

/// Bind the origin's port and serve it on the current runtime.
pub(super) async fn start(spec: OriginSpec) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(spec.addr).await?;
    let origin = Arc::new(Origin {
        name: spec.name,
        region: spec.region,
        table: spec.table,
        failing: AtomicBool::new(false),
        served: AtomicU64::new(0),
    });
    spawn_server(listener, move |req| handle(origin.clone(), req));
    Ok(())
}

async fn handle(origin: Arc<Origin>, req: Request<Incoming>) -> Response<Body> {
    origin.served.fetch_add(1, Ordering::Relaxed);
    let cacheable = (req.method() == Method::GET || req.method() == Method::HEAD)
        .then(|| surrogate_key(req.uri().path()))
        .flatten();
    let mut resp = answer(&origin, req).await;
    if let Some(tags) = cacheable.filter(|_| resp.status() == StatusCode::OK) {
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let etag = format!("\"{:x}\"", body_hash(&bytes));
        resp = Response::from_parts(parts, Body::new(bytes));
        let h = resp.headers_mut();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60"),
        );
        if let Ok(v) = HeaderValue::from_str(&tags) {
            h.insert("surrogate-key", v);
        }
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
    }
    // On every answer, errors included, so that a response seen through the
    // proxy always tells which backend produced it.
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin.region) {
        h.insert("x-origin-region", v);
    }
    if let Ok(v) = HeaderValue::from_str(&origin.name) {
        h.insert("x-origin-name", v);
    }
    resp
}

async fn answer(origin: &Origin, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    // The switches answer even while failing: that is how the demo recovers.
    if path == "/.demo/fail" || path == "/.demo/recover" {
        if parts.method != Method::POST {
            return method_not_allowed("POST");
        }
        let failing = path == "/.demo/fail";
        origin.failing.store(failing, Ordering::Relaxed);
        let state = if failing {
            "now failing: every answer is 503 until POST /.demo/recover"
        } else {
            "healthy again"
        };
        return text_response(StatusCode::OK, format!("{} is {state}\n", origin.name));
    }
    if origin.failing.load(Ordering::Relaxed) {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} is failing (demo)\n", origin.name),
        );
    }
    if path == "/health" {
        return text_response(StatusCode::OK, "ok\n");
    }
    if let Some(key) = kv_key(path) {
        return kv(origin, &parts, key, body).await;
    }
    // Read the body to its end so the proxy's connection stays reusable
    // after a POST to a plain path.
    let _ = read_body(&parts, body, MAX_VALUE_BYTES).await;
    json_response(
        StatusCode::OK,
        &json!({
            "region": origin.region,
            "origin": origin.name,
            "path": path,
            "served": origin.served.load(Ordering::Relaxed),
        }),
    )
}

/// Tags of a response on one of the demo's cached routes: its first and
/// last path segments (`/static/kv/item` => `static item`).
fn surrogate_key(path: &str) -> Option<String> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let first = segments.next()?;
    if first != "static" && first != "cached" {
        return None;
    }
    let last = segments.next_back().unwrap_or(first);
    Some(if last == first {
        first.to_string()
    } else {
        format!("{first} {last}")
    })
}

/// A short fingerprint of a body for its `ETag` (FNV-1a).
fn body_hash(body: &[u8]) -> u64 {
    body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The last segment of a path whose last two segments are `kv/KEY`, not yet
/// validated: `/kv/k` and `/bounded/kv/k` give `k`, `/kv/` gives an empty key.
fn kv_key(path: &str) -> Option<&str> {
    let mut segments = path.rsplit('/');
    let key = segments.next()?;
    (segments.next()? == "kv").then_some(key)
}

/// 1 to 128 characters of `A-Z a-z 0-9 . _ -`: used as they are in URLs,
/// log lines and the table's sort key, with nothing to escape.
fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn kv(
    origin: &Origin,
    parts: &http::request::Parts,
    key: &str,
    body: Incoming,
) -> Response<Body> {
    let mut resp = if !valid_key(key) {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": format!("a key is 1 to {MAX_KEY_LEN} characters of A-Z a-z 0-9 . _ -"),
                "served_by": origin.region,
            }),
        )
    } else if parts.method == Method::GET || parts.method == Method::HEAD {
        kv_get(origin, key).await
    } else if parts.method == Method::PUT || parts.method == Method::POST {
        kv_put(origin, parts, key, body).await
    } else {
        method_not_allowed("GET, HEAD, PUT, POST")
    };
    // Each answer is one replica's state at one moment, which is the point
    // of the demo; a cached copy would hide it.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn kv_get(origin: &Origin, key: &str) -> Response<Body> {
    match origin.table.get(KV_PARTITION, key).await {
        Ok(Some(item)) => json_response(
            StatusCode::OK,
            &json!({
                "key": key,
                "value": item.s("value"),
                "region": item.s("region"),
                "served_by": origin.region,
                "origin": origin.name,
            }),
        ),
        Ok(None) => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "key": key, "error": "not found", "served_by": origin.region }),
        ),
        Err(e) => table_error(origin, key, &e),
    }
}

async fn kv_put(
    origin: &Origin,
    parts: &http::request::Parts,
    key: &str,
    body: Incoming,
) -> Response<Body> {
    let refuse = |status: StatusCode, error: String| {
        json_response(
            status,
            &json!({ "key": key, "error": error, "served_by": origin.region }),
        )
    };
    let bytes = match read_body(parts, body, MAX_VALUE_BYTES).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a value is at most {} KiB", MAX_VALUE_BYTES / 1024),
            )
        }
        Err(BodyError::Read(e)) => {
            return refuse(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
        }
    };
    let Ok(value) = std::str::from_utf8(&bytes) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a value must be UTF-8 text".to_string(),
        );
    };
    let item = Item::new(KV_PARTITION, key)
        .with("value", Attr::S(value.to_string()))
        .with("region", Attr::S(origin.region.clone()))
        .with("t", Attr::N(i64::try_from(unix_ms()).unwrap_or(i64::MAX)));
    match origin.table.put(item).await {
        Ok(()) => json_response(
            StatusCode::CREATED,
            &json!({
                "key": key,
                "value": value,
                "region": origin.region,
                "served_by": origin.region,
                "origin": origin.name,
            }),
        ),
        Err(e) => table_error(origin, key, &e),
    }
}

fn table_error(origin: &Origin, key: &str, e: &TableError) -> Response<Body> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "key": key, "error": e.to_string(), "served_by": origin.region }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_key_is_the_segment_after_a_final_kv() {
        assert_eq!(kv_key("/kv/greeting"), Some("greeting"));
        assert_eq!(kv_key("/bounded/kv/greeting"), Some("greeting"));
        assert_eq!(kv_key("/a/b/kv/x.y"), Some("x.y"));
        // Present but empty: refused by validation, not served as a plain path.
        assert_eq!(kv_key("/kv/"), Some(""));
    }

    #[test]
    fn paths_not_ending_in_kv_key_are_plain_paths() {
        assert_eq!(kv_key("/kv"), None);
        assert_eq!(kv_key("/"), None);
        assert_eq!(kv_key("/hello"), None);
        assert_eq!(kv_key("/kv/a/b"), None);
        assert_eq!(kv_key("/kv/a/"), None);
        assert_eq!(kv_key("/kvx/a"), None);
        assert_eq!(kv_key("/xkv/a"), None);
    }

    #[test]
    fn keys_are_1_to_128_url_safe_characters() {
        let longest = "k".repeat(MAX_KEY_LEN);
        let too_long = "k".repeat(MAX_KEY_LEN + 1);
        for ok in ["a", "greeting", "A-Z_0.9", "-", longest.as_str()] {
            assert!(valid_key(ok), "{ok:?}");
        }
        for bad in [
            "",
            too_long.as_str(),
            "a b",
            "a%20b",
            "a;b",
            "a/b",
            "é",
            "a~b",
            "a+b",
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }
}

//! The demo's control listener (loopback only): read and change the
//! simulated global table's replication delay while the demo runs, to watch
//! read-your-writes and bounded staleness react. Reads are open; a change
//! needs the admin token the demo prints, like the admin API's mutations.
//!
//! - `GET /replication-delay` => `{"delay_ms": 1000}`
//! - `PUT /replication-delay` with a body such as `2s` or `500ms` => the new
//!   value; 400 with a message when the body is not a duration.
//! - `PUT /replication-delay?from=eu-west-1&to=ap-southeast-1` sets one
//!   link's delay only (one replica catching up before the others).
//! - `PUT /table?region=eu-west-1` with `down` or `up`: that region's
//!   replica stops answering (every read and write fails) or answers again.
//! - `PUT /link?from=us-east-1&to=eu-west-1` with `blocked` or `open`: the
//!   traffic from one region's proxy to another's (forwarded requests,
//!   health probes, purges) is cut, or flows again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::relay::Links;
use super::{
    json_response, method_not_allowed, read_body, spawn_server, text_response, Body, BodyError,
};
use crate::tables::embedded::SimulatedGlobal;

const PATH: &str = "/replication-delay";

/// Longest delay accepted. The table adds the delay to an `Instant`, which
/// must not overflow, and no demo needs more.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// A duration is a few characters; anything longer is not one.
const MAX_BODY: usize = 1024;

struct Control {
    global: Arc<SimulatedGlobal>,
    links: Links,
    token: String,
}

/// Bind the control listener and serve it on the current runtime.
pub(super) async fn start(
    addr: SocketAddr,
    global: Arc<SimulatedGlobal>,
    links: Links,
    token: String,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let control = Arc::new(Control {
        global,
        links,
        token,
    });
    spawn_server(listener, move |req| handle(control.clone(), req));
    Ok(())
}

async fn handle(control: Arc<Control>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path != PATH && path != "/table" && path != "/link" {
        return text_response(
            StatusCode::NOT_FOUND,
            format!(
                "not found: the control listener has GET and PUT {PATH}, PUT /table, PUT /link\n"
            ),
        );
    }
    if path == PATH && (parts.method == Method::GET || parts.method == Method::HEAD) {
        return delay_response(control.global.delay());
    }
    if parts.method != Method::PUT {
        return method_not_allowed(if path == PATH {
            "GET, HEAD, PUT"
        } else {
            "PUT"
        });
    }
    if !authorized(parts.headers.get(header::AUTHORIZATION), &control.token) {
        let mut resp = text_response(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer <token>` is required (the admin token the demo printed)\n",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"edge-router demo\""),
        );
        return resp;
    }
    let bytes = match read_body(&parts, body, MAX_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "expected a duration such as 2s or 500ms\n",
            )
        }
        Err(BodyError::Read(e)) => {
            return text_response(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n"))
        }
    };
    if path != PATH {
        let word = String::from_utf8_lossy(&bytes).trim().to_string();
        return switch(&control, path, parts.uri.query(), &word);
    }
    let parsed = std::str::from_utf8(&bytes)
        .map_err(|_| {
            "expected a duration such as 2s or 500ms, got bytes that are not UTF-8".to_string()
        })
        .and_then(parse_delay);
    let link = match link_of(parts.uri.query()) {
        Ok(link) => link,
        Err(message) => return text_response(StatusCode::BAD_REQUEST, message + "\n"),
    };
    match (parsed, link) {
        (Ok(delay), Some((from, to))) => match control.global.set_link_delay(&from, &to, delay) {
            Ok(()) => {
                tracing::info!(%from, %to, delay = %humantime::format_duration(delay), "demo: link replication delay changed");
                delay_response(delay)
            }
            Err(e) => text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (Ok(delay), None) => {
            control.global.set_delay(delay);
            tracing::info!(
                delay = %humantime::format_duration(delay),
                "demo: replication delay changed"
            );
            delay_response(delay)
        }
        (Err(message), _) => text_response(StatusCode::BAD_REQUEST, message + "\n"),
    }
}

/// `PUT /table?region=R` (`down` | `up`) and `PUT /link?from=A&to=B` (`blocked` | `open`).
fn switch(control: &Control, path: &str, query: Option<&str>, word: &str) -> Response<Body> {
    let bad = |msg: String| text_response(StatusCode::BAD_REQUEST, msg + "\n");
    if path == "/table" {
        let Some(region) = query.and_then(|q| q.strip_prefix("region=")) else {
            return bad("use /table?region=REGION".to_string());
        };
        let down = match word {
            "down" => true,
            "up" => false,
            other => return bad(format!("expected `down` or `up`, got `{other}`")),
        };
        return match control.global.set_unreachable(region, down) {
            Ok(()) => {
                tracing::info!(%region, down, "demo: table replica switched");
                json_response(StatusCode::OK, &json!({ "region": region, "down": down }))
            }
            Err(e) => bad(e.to_string()),
        };
    }
    let (from, to) = match link_of(query) {
        Ok(Some(link)) => link,
        Ok(None) => return bad("use /link?from=REGION&to=REGION".to_string()),
        Err(message) => return bad(message),
    };
    let blocked = match word {
        "blocked" => true,
        "open" => false,
        other => return bad(format!("expected `blocked` or `open`, got `{other}`")),
    };
    if !control.links.set_blocked(&from, &to, blocked) {
        return bad(format!("no link from `{from}` to `{to}`"));
    }
    tracing::info!(%from, %to, blocked, "demo: link switched");
    json_response(
        StatusCode::OK,
        &json!({ "from": from, "to": to, "blocked": blocked }),
    )
}

/// `from=A&to=B` names one link; no query means every link.
fn link_of(query: Option<&str>) -> Result<Option<(String, String)>, String> {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    let (mut from, mut to) = (None, None);
    for pair in q.split('&') {
        match pair.split_once('=') {
            Some(("from", v)) if !v.is_empty() => from = Some(v.to_string()),
            Some(("to", v)) if !v.is_empty() => to = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "unexpected query `{pair}`: use from=REGION&to=REGION"
                ))
            }
        }
    }
    match (from, to) {
        (Some(f), Some(t)) => Ok(Some((f, t))),
        _ => Err("a link needs both from=REGION and to=REGION".to_string()),
    }
}

fn delay_response(delay: Duration) -> Response<Body> {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    json_response(StatusCode::OK, &json!({ "delay_ms": ms }))
}

/// A replication delay as written on the command line or sent to the
/// control listener: a human duration (`2s`, `500ms`, `1m 30s`; surrounding
/// whitespace ignored), at most an hour.
pub(super) fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("expected a duration such as 2s or 500ms, got nothing".to_string());
    }
    let delay = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration such as 2s or 500ms: {e}"))?;
    if delay > MAX_DELAY {
        return Err(format!(
            "`{text}` is longer than the {} the demo allows",
            humantime::format_duration(MAX_DELAY)
        ));
    }
    Ok(delay)
}

/// True when the header is `Bearer <token>` with the demo's token.
fn authorized(header: Option<&HeaderValue>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.as_bytes().strip_prefix(b"Bearer ")) else {
        return false;
    };
    !token.is_empty() && same_bytes(given, token.as_bytes())
}

/// Compares every byte, so the time taken does not tell how much of a
/// guessed token was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_named_by_from_and_to() {
        assert_eq!(link_of(None), Ok(None));
        assert_eq!(
            link_of(Some("from=a&to=b")),
            Ok(Some(("a".to_string(), "b".to_string())))
        );
        assert!(link_of(Some("from=a")).is_err());
        assert!(link_of(Some("to=b&x=1")).is_err());
        assert!(link_of(Some("from=&to=b")).is_err());
    }

    #[test]
    fn delays_are_human_durations() {
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn delay_whitespace_from_curl_or_echo_is_ignored() {
        assert_eq!(parse_delay(" 2s\n"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("1s\r\n"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn garbage_empty_and_unitless_delays_are_refused() {
        for bad in ["", "   ", "fast", "2", "-1s", "2 parsecs"] {
            let err = parse_delay(bad).unwrap_err();
            assert!(err.contains("duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn delays_over_an_hour_are_refused_so_the_table_cannot_overflow() {
        assert_eq!(parse_delay("1h"), Ok(MAX_DELAY));
        assert!(parse_delay("61m").is_err());
        assert!(parse_delay("1000000years").is_err());
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(authorized(Some(&h("Bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&h("Bearer s3cre")), "s3cret"));
        assert!(!authorized(Some(&h("Bearer s3cretx")), "s3cret"));
        assert!(!authorized(Some(&h("bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&h("s3cret")), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        // An empty configured token never matches, not even an empty bearer.
        assert!(!authorized(Some(&h("Bearer ")), ""));
    }
}

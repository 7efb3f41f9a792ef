//! A route that answers every request itself, validated: nginx's `return`
//! (a redirect, or a fixed page such as a maintenance notice; Envoy's
//! `redirect` and `direct_response`). Such a route has no upstream, so the
//! keys that only mean something towards one are refused, and a redirect's
//! `location` may hold `$request_uri` and `$host` and nothing else.

use bytes::Bytes;
use http::HeaderValue;

use super::diag::{ConfigError, Locator, Seg};
use super::raw::{RawCompress, RawReturn, RawRoute};

/// The statuses that send the client elsewhere (they need `location`).
pub const REDIRECTS: [u16; 5] = [301, 302, 303, 307, 308];

/// The `Content-Type` of a body given without one.
const DEFAULT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A route's fixed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticResponse {
    /// The status.
    pub status: u16,
    /// A redirect's target.
    pub location: Option<Location>,
    /// The body (empty for redirects).
    pub body: Bytes,
    /// `Content-Type` of the body (`None`: no body was configured).
    pub content_type: Option<HeaderValue>,
}

impl StaticResponse {
    /// The status carries no body at all (RFC 9110 15.3.5, 15.3.6): no
    /// `Content-Length` either.
    pub fn bodiless(&self) -> bool {
        matches!(self.status, 204 | 205)
    }
}

/// One piece of a `location` template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Written as is.
    Text(String),
    /// The request's path (as matched) and query.
    RequestUri,
    /// The request's host, lower case, without port.
    Host,
}

/// A redirect's `location`, with its variables found at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// As written (for the routes digest and messages).
    pub template: String,
    parts: Vec<Part>,
}

impl Location {
    /// The target for one request: `host` replaces `$host`, `request_uri`
    /// (path and query) replaces `$request_uri`.
    pub fn expand(&self, host: &str, request_uri: &str) -> String {
        let mut out = String::with_capacity(self.template.len() + request_uri.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::RequestUri => out.push_str(request_uri),
                Part::Host => out.push_str(host),
            }
        }
        out
    }
}

/// Parse a `location` template; the message says what is wrong.
pub fn parse_location(text: &str) -> Result<Location, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        if dollar > 0 {
            parts.push(Part::Text(rest[..dollar].to_string()));
        }
        let after = &rest[dollar + 1..];
        // `$name` or `${name}`, as nginx writes them.
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => return Err(format!("`{text}`: `${{` without a closing `}}`")),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        parts.push(match name {
            "request_uri" => Part::RequestUri,
            "host" => Part::Host,
            "" => return Err(format!("`{text}`: a `$` without a variable name")),
            other => {
                return Err(format!(
                "`{text}`: unknown variable `${other}` (only `$request_uri` and `$host` are known)"
            ))
            }
        });
        rest = &after[len..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    let literal_ok = parts.iter().all(|p| match p {
        Part::Text(t) => t.bytes().all(|b| b.is_ascii_graphic()),
        _ => true,
    });
    if !literal_ok {
        return Err(format!(
            "`{text}`: a URL has no spaces, control characters or non-ASCII characters (percent-encode them)"
        ));
    }
    // What the client will take for another site: a scheme-relative
    // `//host`, or `/\host`, which browsers read the same way. A path must
    // start with literal text, so that no variable can make it one.
    let opening = match parts.first() {
        Some(Part::Text(t)) => t.as_str(),
        _ => "",
    };
    let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
        opening
            .get(..scheme.len())
            .filter(|p| p.eq_ignore_ascii_case(scheme))
            .map(|_| &opening[scheme.len()..])
    });
    let ok = match after_scheme {
        // The host: literal text, or `$host` right after the scheme.
        Some("") => matches!(parts.get(1), Some(Part::Host)),
        Some(host) => !host.starts_with(['/', '\\']),
        None => {
            opening.starts_with('/')
                && !opening[1..].starts_with(['/', '\\'])
                && (opening.len() > 1 || parts.len() == 1)
        }
    };
    if !ok {
        return Err(format!(
            "`{text}` must be an absolute http:// or https:// URL, or a path that starts with `/` and literal text (never `//`: that names another host)"
        ));
    }
    Ok(Location {
        template: text.to_string(),
        parts,
    })
}

/// The route keys that only mean something with an upstream, and whether
/// each is set.
fn upstream_keys(raw: &RawRoute) -> [(&'static str, bool); 14] {
    let request_headers = &raw.request_headers;
    [
        ("upstream", raw.upstream.is_some()),
        ("policy", raw.policy.is_some()),
        ("on_primary_down", raw.on_primary_down.is_some()),
        ("writes", raw.writes.is_some()),
        ("max_staleness", raw.max_staleness.is_some()),
        ("allowed_regions", raw.allowed_regions.is_some()),
        ("cache", raw.cache),
        ("cache_heuristic", raw.cache_heuristic),
        ("cache_set_cookie", raw.cache_set_cookie),
        ("max_body", raw.max_body.is_some()),
        ("connect_timeout", raw.connect_timeout.is_some()),
        ("read_timeout", raw.read_timeout.is_some()),
        (
            "request_headers",
            !(request_headers.remove.is_empty() && request_headers.set.is_empty()),
        ),
        (
            "compress",
            !matches!(raw.compress, None | Some(RawCompress::Switch(false))),
        ),
    ]
}

/// Validate route `i`'s `return`, and refuse the keys such a route cannot
/// use (a config must not look like it does something it does not).
pub(super) fn route_return(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    ret: &RawReturn,
    errors: &mut Vec<ConfigError>,
) -> Option<StaticResponse> {
    let route = |k: &str| vec![Seg::from("routes"), Seg::from(i), Seg::from(k)];
    let at = |k: &str| {
        vec![
            Seg::from("routes"),
            Seg::from(i),
            Seg::from("return"),
            Seg::from(k),
        ]
    };
    let before = errors.len();
    for (key, set) in upstream_keys(raw) {
        if set {
            errors.push(loc.at_path(
                &route(key),
                format!("`{key}` does not apply to a route with `return` (it answers without an upstream)"),
            ));
        }
    }
    let status = match u16::try_from(ret.status) {
        Ok(s)
            if (200..=599).contains(&s) && (!(300..400).contains(&s) || REDIRECTS.contains(&s)) =>
        {
            s
        }
        _ => {
            errors.push(loc.at_path(
                &at("status"),
                format!(
                    "`{}` is not a status to return: 200 to 599, and among 3xx only the redirects 301, 302, 303, 307 and 308",
                    ret.status
                ),
            ));
            return None;
        }
    };
    let redirect = REDIRECTS.contains(&status);
    let location = match (&ret.location, redirect) {
        (Some(l), true) => match parse_location(l) {
            Ok(l) => Some(l),
            Err(msg) => {
                errors.push(loc.at_path(&at("location"), msg));
                None
            }
        },
        (None, true) => {
            errors.push(loc.at_path(
                &[Seg::from("routes"), Seg::from(i), Seg::from("return")],
                format!("a {status} redirect needs `location` (e.g. \"https://example.com$request_uri\")"),
            ));
            None
        }
        (Some(_), false) => {
            errors.push(loc.at_path(
                &at("location"),
                format!("`location` goes with a redirect (301, 302, 303, 307, 308), not {status}"),
            ));
            None
        }
        (None, false) => None,
    };
    if ret.body.is_some() && redirect {
        errors.push(loc.at_path(
            &at("body"),
            "a redirect has no `body` here: the client follows `location`",
        ));
    }
    if ret.body.is_some() && matches!(status, 204 | 205) {
        errors.push(loc.at_path(&at("body"), format!("a {status} response has no body")));
    }
    let content_type = match (&ret.content_type, &ret.body) {
        (Some(_), None) => {
            errors.push(loc.at_path(&at("content_type"), "`content_type` needs `body`"));
            None
        }
        (Some(ct), Some(_)) => match HeaderValue::from_str(ct) {
            Ok(v) if ct.contains('/') => Some(v),
            _ => {
                errors.push(loc.at_path(
                    &at("content_type"),
                    format!("`{ct}` is not a media type like \"text/html; charset=utf-8\""),
                ));
                None
            }
        },
        (None, Some(_)) => Some(HeaderValue::from_static(DEFAULT_CONTENT_TYPE)),
        (None, None) => None,
    };
    if errors.len() > before {
        return None;
    }
    Some(StaticResponse {
        status,
        location,
        body: ret
            .body
            .as_ref()
            .map(|b| Bytes::from(b.clone()))
            .unwrap_or_default(),
        content_type,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_location;

    #[test]
    fn locations_expand_request_uri_and_host() {
        let l = parse_location("https://$host/new${request_uri}").unwrap();
        assert_eq!(l.expand("a.test", "/x?y=1"), "https://a.test/new/x?y=1");
        let l = parse_location("/maintenance").unwrap();
        assert_eq!(l.expand("a.test", "/x"), "/maintenance");
        assert_eq!(parse_location("/").unwrap().expand("h", "/x"), "/");
    }

    #[test]
    fn locations_that_could_name_another_host_are_refused() {
        for bad in [
            "$request_uri",
            "/$request_uri",
            "//evil.test/x",
            "/\\evil.test",
            "https:///x",
            "https://$request_uri",
            "https://",
            "example.com/x",
            "https://a.test/$uri",
            "https://a.test/$",
            "https://a.test/${host",
            "https://a.test/a b",
        ] {
            assert!(parse_location(bad).is_err(), "{bad}");
        }
    }
}

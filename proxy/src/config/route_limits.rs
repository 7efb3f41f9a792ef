//! A route's own limits and header rules, validated: the request body size
//! limit (nginx's `client_max_body_size`, 413), connect and read timeouts
//! that override the upstream's (`proxy_connect_timeout` /
//! `proxy_read_timeout` in a `location`), and headers set on or removed
//! from the request to the upstream and the response to the client
//! (`proxy_set_header` / `add_header` / `proxy_hide_header`; Envoy's
//! `request_headers_to_add` / `_to_remove`). A `set` replaces every value
//! of the header (`set-cookie` included), as `proxy_set_header` does.

use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::diag::{ConfigError, Locator, Seg};
use super::raw::{RawHeaderRules, RawRoute, RawSize};

/// Headers a rule may not touch: framing, routing and ours.
const PROTECTED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

/// Headers to remove, then to set, in order.
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then set (replacing any value).
    pub set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    /// No rule at all.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }
}

/// A route's limits and header rules.
#[derive(Debug, Clone, Default)]
pub struct RouteLimits {
    /// Largest request body, in bytes.
    pub max_body: Option<u64>,
    /// Overrides the upstream's connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Overrides the upstream's read timeout.
    pub read_timeout: Option<Duration>,
    /// Towards the upstream.
    pub request_headers: HeaderRules,
    /// Towards the client.
    pub response_headers: HeaderRules,
}

/// Validate route `i`'s limits and header rules.
pub(super) fn route_limits(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    errors: &mut Vec<ConfigError>,
) -> RouteLimits {
    let at = |k: &str| vec![Seg::from("routes"), Seg::from(i), Seg::from(k)];
    let max_body = raw.max_body.as_ref().and_then(|s| {
        let parsed = match s {
            RawSize::Bytes(n) => Ok(*n),
            RawSize::Text(t) => super::cache::parse_size(t),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                errors.push(loc.at_path(&at("max_body"), e));
                None
            }
        }
    });
    let mut durations = Vec::new();
    if let Some(d) = raw.connect_timeout {
        durations.push(("connect_timeout", d, false));
    }
    if let Some(d) = raw.read_timeout {
        durations.push(("read_timeout", d, false));
    }
    super::check_durations(
        loc,
        &[Seg::from("routes"), Seg::from(i)],
        &durations,
        errors,
    );
    RouteLimits {
        max_body,
        connect_timeout: raw.connect_timeout,
        read_timeout: raw.read_timeout,
        request_headers: header_rules(loc, &at("request_headers"), &raw.request_headers, errors),
        response_headers: header_rules(loc, &at("response_headers"), &raw.response_headers, errors),
    }
}

fn header_rules(
    loc: &Locator<'_>,
    at: &[Seg],
    raw: &RawHeaderRules,
    errors: &mut Vec<ConfigError>,
) -> HeaderRules {
    let mut rules = HeaderRules::default();
    let name = |n: &str, key: &str, errors: &mut Vec<ConfigError>| {
        let mut p = at.to_vec();
        p.push(Seg::from(key));
        match HeaderName::from_bytes(n.as_bytes()) {
            Ok(h) if PROTECTED.contains(&h.as_str()) || h.as_str().starts_with("x-edge-") => {
                errors.push(loc.at_path(
                    &p,
                    format!(
                        "`{n}` is the proxy's to manage (framing, routing, or an x-edge-* header)"
                    ),
                ));
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                errors.push(loc.at_path(&p, format!("`{n}` is not a header name")));
                None
            }
        }
    };
    for n in &raw.remove {
        if let Some(h) = name(n, "remove", errors) {
            rules.remove.push(h);
        }
    }
    for (n, v) in &raw.set {
        let Some(h) = name(n, "set", errors) else {
            continue;
        };
        match HeaderValue::from_str(v) {
            Ok(value) => rules.set.push((h, value)),
            Err(_) => {
                let mut p = at.to_vec();
                p.push(Seg::from("set"));
                p.push(Seg::Key(n.clone()));
                errors.push(loc.at_path(&p, "not a valid header value (control characters?)"));
            }
        }
    }
    rules
}

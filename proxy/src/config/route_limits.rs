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
    /// Local rate limit.
    pub rate_limit: Option<RateLimit>,
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
        rate_limit: rate_limit(loc, i, raw, errors),
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

/// Whose requests share a rate-limit bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client's address (the connection's; Global Accelerator keeps it).
    Client,
    /// A request header's value (an API key); requests without it are keyed
    /// by the client's address.
    Header(HeaderName),
}

/// A route's local rate limit: a token bucket per key, one token every
/// `period`, at most `burst` saved (nginx's `limit_req zone=… rate=…
/// burst=… nodelay`; Envoy's local rate limit filter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// One request's worth of tokens comes back this often.
    pub period: Duration,
    /// Requests a key may make at once.
    pub burst: u32,
    /// The bucket key.
    pub by: RateKey,
}

/// Validate route `i`'s `rate_limit`.
pub(super) fn rate_limit(
    loc: &Locator<'_>,
    i: usize,
    raw: &RawRoute,
    errors: &mut Vec<ConfigError>,
) -> Option<RateLimit> {
    let r = raw.rate_limit.as_ref()?;
    let at = |k: &str| {
        vec![
            Seg::from("routes"),
            Seg::from(i),
            Seg::from("rate_limit"),
            Seg::from(k),
        ]
    };
    let before = errors.len();
    let (count, unit) = r.rate.split_once('/').unwrap_or((r.rate.as_str(), ""));
    let per = match unit.trim() {
        "s" => Some(Duration::from_secs(1)),
        "m" => Some(Duration::from_secs(60)),
        "h" => Some(Duration::from_secs(3600)),
        _ => None,
    };
    let count = count.trim().parse::<u32>().ok().filter(|n| *n > 0);
    let period = match (count, per) {
        (Some(n), Some(per)) => Some(per / n),
        _ => {
            errors.push(loc.at_path(
                &at("rate"),
                format!(
                    "`{}` is not a rate like \"10/s\", \"600/m\" or \"1000/h\"",
                    r.rate
                ),
            ));
            None
        }
    };
    let burst = r.burst.or(count).unwrap_or(1);
    if burst == 0 {
        errors.push(loc.at_path(&at("burst"), "must be at least 1"));
    }
    let by = match r.by.as_str() {
        "client" => Some(RateKey::Client),
        other => match other
            .strip_prefix("header:")
            .map(|h| HeaderName::from_bytes(h.as_bytes()))
        {
            Some(Ok(h)) => Some(RateKey::Header(h)),
            _ => {
                errors.push(loc.at_path(
                    &at("by"),
                    format!("`{other}` is not `client` or `header:NAME`"),
                ));
                None
            }
        },
    };
    if errors.len() > before || period.is_some_and(|p| p.is_zero()) {
        return None;
    }
    Some(RateLimit {
        period: period?,
        burst,
        by: by?,
    })
}

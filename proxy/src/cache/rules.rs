//! HTTP caching rules that Pingora leaves to the application: what a
//! response may be stored as (around `pingora_cache::filters`), what the
//! client's request directives ask of a stored copy, `Vary`, and tags.

use std::time::{Duration, SystemTime};

use http::header::{HeaderName, AUTHORIZATION, ETAG, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, Method, StatusCode};
use pingora::cache::cache_control::{CacheControl, Cacheable, DirectiveKey, InterpretCacheControl};
use pingora::cache::filters::{calculate_fresh_until, calculate_serve_stale_durations};
use pingora::cache::key::HashBinary;
use pingora::cache::VarianceBuilder;
use pingora::cache::{CacheMeta, CacheMetaDefaults, ForcedFreshness, NoCacheReason, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::RouteCache;

/// No default freshness: a response without explicit freshness is stored
/// only with a validator (or with the route's heuristic), decided here.
const NO_DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

/// Most tags kept per object, and their longest length.
const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 256;

/// Heuristic freshness never exceeds a day (as Squid and Varnish cap it).
const HEURISTIC_CAP: Duration = Duration::from_secs(86_400);

/// Statuses cacheable by default (RFC 9110 15.1): only these get heuristic freshness.
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decide whether (and for how long) a response may be stored.
pub fn response_cacheable(
    req: &RequestHeader,
    resp: &ResponseHeader,
    route: RouteCache,
    now: SystemTime,
) -> RespCacheable {
    let uncacheable = |why| RespCacheable::Uncacheable(NoCacheReason::Custom(why));
    // Partial content and interim responses are not stored (Pingora serves
    // ranges from whole objects); 304s only refresh a stored copy.
    if resp.status == StatusCode::PARTIAL_CONTENT
        || resp.status == StatusCode::NOT_MODIFIED
        || resp.status.is_informational()
    {
        return uncacheable("status");
    }
    if vary_names(&resp.headers).any(|n| n == "*") {
        return uncacheable("vary-star");
    }
    let mut header = resp.clone();
    if resp.headers.contains_key(SET_COOKIE) {
        if !route.set_cookie {
            return uncacheable("set-cookie");
        }
        // Stored without it: the cookie was for the client that caused the fill.
        header.remove_header(&SET_COOKIE);
    }
    let cc = CacheControl::from_resp_headers(resp);
    let authorized = req.headers.contains_key(AUTHORIZATION);
    if authorized
        && !cc
            .as_ref()
            .is_some_and(|c| c.allow_caching_authorized_req())
    {
        return uncacheable("authorization");
    }
    if cc
        .as_ref()
        .is_some_and(|c| c.is_cacheable() == Cacheable::No)
    {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    }
    // RFC 9111 4.2.3: the age the response already had when it arrived.
    let age = resp
        .headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default();
    let created = now.checked_sub(age).unwrap_or(now);
    let fresh_until = calculate_fresh_until(created, cc.as_ref(), resp, authorized, &NO_DEFAULTS)
        .or_else(|| {
            route
                .heuristic
                .then(|| heuristic_fresh_until(resp, created))
                .flatten()
        })
        .or_else(|| {
            // A validator alone: stored, and revalidated before every use.
            let has_validator =
                resp.headers.contains_key(ETAG) || resp.headers.contains_key(LAST_MODIFIED);
            has_validator.then(|| now.checked_sub(Duration::from_secs(1)).unwrap_or(now))
        });
    let Some(fresh_until) = fresh_until else {
        return uncacheable("no-freshness");
    };
    let (swr, sie) = calculate_serve_stale_durations(cc.as_ref(), &NO_DEFAULTS);
    if let Some(c) = &cc {
        c.strip_private_headers(&mut header);
    }
    RespCacheable::Cacheable(CacheMeta::new(fresh_until, created, swr, sie, header))
}

/// RFC 9111 4.2.2: 10 % of the time since `Last-Modified`, at most a day.
fn heuristic_fresh_until(resp: &ResponseHeader, created: SystemTime) -> Option<SystemTime> {
    if !heuristically_cacheable(resp.status) {
        return None;
    }
    let parse = |name: HeaderName| -> Option<SystemTime> {
        let v = resp.headers.get(name)?.to_str().ok()?;
        httpdate::parse_http_date(v).ok()
    };
    let modified = parse(LAST_MODIFIED)?;
    let date = parse(http::header::DATE).unwrap_or(created);
    let since = date.duration_since(modified).ok()?;
    let fresh = (since / 10).min(HEURISTIC_CAP);
    if fresh.is_zero() {
        return None;
    }
    created.checked_add(fresh)
}

/// Header names a response varies on, lowercase.
pub fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// The secondary key of a request for a stored response's `Vary`.
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let mut names: Vec<String> = vary_names(meta.headers()).collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    let mut b = VarianceBuilder::new();
    for name in names {
        // Several lines of one field are one value, as RFC 9110 5.3 combines them.
        let value: Vec<u8> = req
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect::<Vec<_>>()
            .join(&b", "[..]);
        b.add_owned_name_value(name, value);
    }
    b.finalize()
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated).
pub fn response_tags(headers: &HeaderMap) -> Box<[Box<str>]> {
    let mut tags: Vec<Box<str>> = Vec::new();
    let surrogate = headers
        .get_all("surrogate-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split_ascii_whitespace());
    let cache_tag = headers
        .get_all("cache-tag")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for t in surrogate.chain(cache_tag) {
        if t.is_empty() || t.len() > MAX_TAG_LEN || tags.iter().any(|x| x.as_ref() == t) {
            continue;
        }
        if tags.len() == MAX_TAGS {
            break;
        }
        tags.push(t.into());
    }
    tags.into_boxed_slice()
}

/// What the client's `Cache-Control` asks of the cache (RFC 9111 5.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-store`: neither served from nor stored.
    pub no_store: bool,
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`): revalidate first.
    pub no_cache: bool,
    /// `max-age=N`: nothing older.
    pub max_age: Option<u32>,
    /// `min-fresh=N`: fresh for at least N more seconds.
    pub min_fresh: Option<u32>,
    /// `max-stale[=N]`: stale is acceptable (up to N seconds; `u32::MAX` for any).
    pub max_stale: Option<u32>,
    /// `only-if-cached`: 504 rather than go to the origin.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Read the request's directives.
    pub fn of(req: &RequestHeader) -> RequestDirectives {
        let Some(cc) = CacheControl::from_req_headers(req) else {
            let pragma_no_cache = req
                .headers
                .get_all(http::header::PRAGMA)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
            return RequestDirectives {
                no_cache: pragma_no_cache,
                ..RequestDirectives::default()
            };
        };
        let seconds = |key: &str| -> Option<Option<u32>> {
            let present = cc.has_key(key);
            let value = cc
                .directives
                .get(&DirectiveKey::from_lowercase(key))
                .and_then(|v| v.as_ref())
                .and_then(|v| v.parse_as_delta_seconds().ok());
            present.then_some(value)
        };
        RequestDirectives {
            no_store: cc.no_store(),
            no_cache: cc.no_cache(),
            // An invalid max-age is treated as 0 (RFC 9111 1.2.2).
            max_age: seconds("max-age").map(|v| v.unwrap_or(0)),
            min_fresh: seconds("min-fresh").flatten(),
            max_stale: seconds("max-stale").map(|v| v.unwrap_or(u32::MAX)),
            only_if_cached: cc.only_if_cached(),
        }
    }

    /// How a stored copy must be treated for this request, if not as usual.
    /// `served_stale` is set when a stale copy is accepted under `max-stale`.
    pub fn freshness(
        &self,
        meta: &CacheMeta,
        is_fresh: bool,
        now: SystemTime,
    ) -> (Option<ForcedFreshness>, bool) {
        let age = meta.age().as_secs();
        // `max-age=0` is how clients ask for a revalidated copy (a reload),
        // whatever the stored copy's age in whole seconds.
        let must_revalidate = self.no_cache
            || self.max_age.is_some_and(|m| m == 0 || age > u64::from(m))
            || self.min_fresh.is_some_and(|m| {
                meta.fresh_until()
                    .duration_since(now)
                    .map_or(true, |left| left.as_secs() < u64::from(m))
            });
        if must_revalidate {
            return (Some(ForcedFreshness::ForceExpired), false);
        }
        if !is_fresh {
            if let Some(max_stale) = self.max_stale {
                let staleness = now
                    .duration_since(meta.fresh_until())
                    .unwrap_or_default()
                    .as_secs();
                // RFC 9111 5.2.2: these forbid serving it stale, whatever
                // the client accepts.
                let origin_forbids = CacheControl::from_resp_headers(meta.response_header())
                    .is_some_and(|c| {
                        c.must_revalidate()
                            || c.proxy_revalidate()
                            || c.no_cache()
                            || c.has_directive(&DirectiveKey::SMaxAge)
                    });
                if staleness <= u64::from(max_stale) && !origin_forbids {
                    return (Some(ForcedFreshness::ForceFresh), true);
                }
            }
        }
        (None, false)
    }
}

/// RFC 9111 4.3.4: a 304 updates the stored header fields. Pingora's merge
/// copies only Cache-Control, Expires, ETag and two CDN fields; this copies
/// every field the 304 carries except those that describe its own (empty)
/// body or connection.
pub fn merge_not_modified(stored: &mut ResponseHeader, not_modified: &HeaderMap) {
    use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, TRANSFER_ENCODING};
    let mut seen: Vec<&HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if [
            CONTENT_LENGTH,
            CONTENT_ENCODING,
            CONTENT_RANGE,
            TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            continue;
        }
        // The first value replaces what was stored, the next ones add to it.
        let result = if seen.contains(&name) {
            stored
                .append_header(name.clone(), value.clone())
                .map(|_| ())
        } else {
            seen.push(name);
            stored.insert_header(name.clone(), value.clone())
        };
        if result.is_err() {
            tracing::debug!(header = %name, "304 header not merged");
        }
    }
}

/// Only GET and HEAD are answered from the cache.
pub fn cacheable_method(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    const PLAIN: RouteCache = RouteCache {
        heuristic: false,
        set_cookie: false,
    };

    fn stored(
        req_h: &[(&str, &str)],
        resp_h: &[(&str, &str)],
        route: RouteCache,
    ) -> Option<CacheMeta> {
        match response_cacheable(&req(req_h), &resp(200, resp_h), route, SystemTime::now()) {
            RespCacheable::Cacheable(m) => Some(m),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn freshness_comes_from_s_maxage_max_age_expires_minus_age() {
        let now = SystemTime::now();
        let m = stored(&[], &[("cache-control", "max-age=0, s-maxage=60")], PLAIN).unwrap();
        assert!(m.is_fresh(now + Duration::from_secs(50)));
        let m = stored(
            &[],
            &[("cache-control", "max-age=100"), ("age", "90")],
            PLAIN,
        )
        .unwrap();
        assert!(m.is_fresh(now + Duration::from_secs(5)));
        assert!(!m.is_fresh(now + Duration::from_secs(15)));
        assert!(m.age().as_secs() >= 90, "Age counts the upstream's age");
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(60));
        assert!(stored(&[], &[("expires", &exp)], PLAIN)
            .unwrap()
            .is_fresh(now));
    }

    #[test]
    fn never_stored_without_permission() {
        for cc in ["no-store, max-age=60", "private, max-age=60"] {
            assert!(
                stored(&[], &[("cache-control", cc)], PLAIN).is_none(),
                "{cc}"
            );
        }
        assert!(
            stored(&[], &[], PLAIN).is_none(),
            "no freshness, no validator"
        );
        assert!(stored(
            &[],
            &[("vary", "*"), ("cache-control", "max-age=60")],
            PLAIN
        )
        .is_none());
        let auth = [("authorization", "Bearer x")];
        assert!(stored(&auth, &[("cache-control", "max-age=60")], PLAIN).is_none());
        assert!(stored(&auth, &[("cache-control", "public, max-age=60")], PLAIN).is_some());
        assert!(stored(&auth, &[("cache-control", "s-maxage=60")], PLAIN).is_some());
        let cookie = [("cache-control", "max-age=60"), ("set-cookie", "a=b")];
        assert!(stored(&[], &cookie, PLAIN).is_none());
        let opted = RouteCache {
            set_cookie: true,
            ..PLAIN
        };
        let m = stored(&[], &cookie, opted).unwrap();
        assert!(m.headers().get("set-cookie").is_none());
    }

    #[test]
    fn a_validator_alone_is_stored_stale_and_heuristics_need_opt_in() {
        let now = SystemTime::now();
        let m = stored(&[], &[("etag", "\"x\"")], PLAIN).unwrap();
        assert!(!m.is_fresh(now));
        let old = httpdate::fmt_http_date(now - Duration::from_secs(100_000));
        let lm = [("last-modified", old.as_str())];
        assert!(!stored(&[], &lm, PLAIN).unwrap().is_fresh(now));
        let heuristic = RouteCache {
            heuristic: true,
            ..PLAIN
        };
        let m = stored(&[], &lm, heuristic).unwrap();
        assert!(m.is_fresh(now + Duration::from_secs(9_000)));
        assert!(!m.is_fresh(now + Duration::from_secs(11_000)));
        let m = stored(
            &[],
            &[("cache-control", "no-cache"), ("etag", "\"x\"")],
            PLAIN,
        )
        .unwrap();
        assert!(!m.is_fresh(now), "no-cache: stored, revalidated every time");
    }

    #[test]
    fn request_directives_force_revalidation_or_accept_stale() {
        let now = SystemTime::now();
        let m = stored(
            &[],
            &[("cache-control", "max-age=60"), ("age", "30")],
            PLAIN,
        )
        .unwrap();
        let d = |h: &str| RequestDirectives::of(&req(&[("cache-control", h)]));
        assert_eq!(
            d("no-cache").freshness(&m, true, now).0,
            Some(ForcedFreshness::ForceExpired)
        );
        assert_eq!(
            d("max-age=10").freshness(&m, true, now).0,
            Some(ForcedFreshness::ForceExpired)
        );
        assert_eq!(d("max-age=100").freshness(&m, true, now).0, None);
        assert_eq!(
            d("min-fresh=50").freshness(&m, true, now).0,
            Some(ForcedFreshness::ForceExpired)
        );
        assert!(d("no-store").no_store && d("only-if-cached").only_if_cached);
        let stale = stored(&[], &[("cache-control", "max-age=1"), ("age", "30")], PLAIN).unwrap();
        assert_eq!(
            d("max-stale").freshness(&stale, false, now),
            (Some(ForcedFreshness::ForceFresh), true)
        );
        assert_eq!(d("max-stale=5").freshness(&stale, false, now).0, None);
        let pragma = RequestDirectives::of(&req(&[("pragma", "no-cache")]));
        assert!(pragma.no_cache);
    }

    #[test]
    fn a_304_updates_every_stored_field_but_the_body_ones() {
        let mut stored = resp(
            200,
            &[
                ("x-version", "1"),
                ("content-length", "9"),
                ("etag", "\"a\""),
            ],
        );
        let nm = resp(
            304,
            &[
                ("x-version", "2"),
                ("content-length", "0"),
                ("link", "a"),
                ("link", "b"),
            ],
        );
        merge_not_modified(&mut stored, &nm.headers);
        assert_eq!(stored.headers["x-version"], "2");
        assert_eq!(stored.headers["content-length"], "9");
        assert_eq!(stored.headers.get_all("link").iter().count(), 2);
        assert_eq!(stored.headers["etag"], "\"a\"");
    }

    #[test]
    fn vary_and_tags() {
        let m = stored(
            &[],
            &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
            PLAIN,
        )
        .unwrap();
        let gz = variance(&m, &req(&[("accept-encoding", "gzip")]));
        let id = variance(&m, &req(&[]));
        assert!(gz.is_some() && id.is_some() && gz != id);
        let plain = stored(&[], &[("cache-control", "max-age=60")], PLAIN).unwrap();
        assert_eq!(variance(&plain, &req(&[])), None);
        let mut h = HeaderMap::new();
        h.append("surrogate-key", "a  b".parse().unwrap());
        h.append("cache-tag", "b, c,".parse().unwrap());
        let tags = response_tags(&h);
        let tags: Vec<&str> = tags.iter().map(|t| t.as_ref()).collect();
        assert_eq!(tags, ["a", "b", "c"]);
    }
}

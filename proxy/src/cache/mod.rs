//! The region's HTTP cache: Pingora's cache machinery (`pingora-cache`:
//! freshness, revalidation, `Vary`, cache lock, stale-while-revalidate and
//! stale-if-error) over a store of ours ([`store`], on moka), the HTTP
//! rules Pingora leaves to the application ([`rules`]), and purges that
//! reach every region ([`invalidation`], [`purge`], [`signing`]).
//!
//! The request path (`service.rs`) enables the cache for a request only
//! when its one decision serves it in this region and the invalidations
//! are read (docs/cache.md: consistency outranks the cache).

pub mod consumer;
pub mod fanout;
pub mod invalidation;
pub mod purge;
pub mod request;
pub mod rules;
pub mod signing;
pub mod store;

use std::sync::Arc;

use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{CacheKey, CacheOptionOverrides, CachePhase, NoCacheReason};
use pingora::proxy::Session;

use crate::config::{CacheConfig, RouteCache};
use crate::path::PathRules;
use invalidation::Invalidation;
use rules::RequestDirectives;
use store::MemoryStore;

/// Why the cache was turned off for a request that a retry sent to another region.
pub const NOT_LOCAL: &str = "not-local";

/// One region's cache.
pub struct EdgeCache {
    /// The store (leaked: Pingora's cache takes `&'static` storage).
    pub store: &'static MemoryStore,
    lock: &'static CacheKeyLockImpl,
    /// Purges: applied here, published, consumed.
    pub invalidation: Arc<Invalidation>,
    /// `[cache]`.
    pub config: CacheConfig,
    /// How request paths are normalised (purge URLs are normalised alike).
    pub path_rules: PathRules,
}

impl EdgeCache {
    /// A cache over `store`, purged through `invalidation`.
    pub fn new(
        store: &'static MemoryStore,
        invalidation: Arc<Invalidation>,
        config: CacheConfig,
        path_rules: PathRules,
    ) -> EdgeCache {
        let lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(config.lock_timeout));
        EdgeCache {
            store,
            lock,
            invalidation,
            config,
            path_rules,
        }
    }

    /// Turn Pingora's cache on for this request.
    pub fn enable(&self, session: &mut Session) {
        // A waiter gives up after lock_timeout and fetches for itself (not
        // stored): a fill held back by its slow client must not stall the key.
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.config.lock_timeout);
        overrides.max_lock_retries = Some(1);
        session
            .cache
            .enable(self.store, None, None, Some(self.lock), Some(overrides));
        let max = usize::try_from(self.config.max_object_size).unwrap_or(usize::MAX);
        session.cache.set_max_file_size_bytes(max);
    }
}

/// The cache key of a request: `http://host/path?query`, the host as
/// routing validated it (lowercase, no port, no trailing dot) so that every
/// region and listener shares one key; the origin is sent the same host
/// (`service.rs`), so no response can depend on what the key leaves out.
/// `https` is the scheme a trusted proxy in front says the client used
/// (`X-Forwarded-Proto`): an origin may answer the two differently.
pub fn key_of(session: &Session, https: bool) -> CacheKey {
    let req = session.req_header();
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = purge::cache_url(&key_host(req), pq);
    let primary = if https {
        url.replacen("http://", "https://", 1)
    } else {
        url
    };
    CacheKey::new(primary, "")
}

/// The host part of a request's cache key.
pub fn key_host(req: &pingora::http::RequestHeader) -> String {
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    // request_filter refused requests whose Host does not validate.
    crate::host::validate_host(raw)
        .map(|h| h.name.into_owned())
        .unwrap_or_else(|_| raw.to_ascii_lowercase())
}

/// Per-request cache state.
#[derive(Debug, Default)]
pub struct CacheCtx {
    /// The route caches (`x-cache` is sent).
    pub route: Option<RouteCache>,
    /// The client's directives.
    pub directives: RequestDirectives,
    /// A stale copy was accepted under the client's `max-stale`.
    pub served_stale: bool,
    /// The header fields of a 304 that revalidated the stored copy.
    pub not_modified: Option<http::HeaderMap>,
    /// The store's purge sequence when the request was let into the cache:
    /// a response to it is not stored if a purge since then covers it.
    pub purge_seq: u64,
    /// The client used HTTPS (the listener's scheme, or a trusted proxy's
    /// word): part of the key; it also marks the token cookie `Secure`.
    pub https: bool,
}

/// `x-cache` for a request on a cache route, from Pingora's cache phase.
pub fn result_of(phase: CachePhase, served_stale: bool) -> &'static str {
    match phase {
        CachePhase::Hit if served_stale => "STALE",
        CachePhase::Hit => "HIT",
        CachePhase::Stale | CachePhase::StaleUpdating => "STALE",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        CachePhase::Miss | CachePhase::Expired => "MISS",
        CachePhase::Disabled(NoCacheReason::NeverEnabled)
        | CachePhase::Disabled(NoCacheReason::Custom(NOT_LOCAL)) => "BYPASS",
        // Looked up, then not stored (too large, uncacheable, lock timeout).
        CachePhase::Disabled(_) => "MISS",
        _ => "BYPASS",
    }
}

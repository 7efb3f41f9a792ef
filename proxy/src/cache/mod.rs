//! The region's HTTP cache: Pingora's cache machinery (`pingora-cache`:
//! freshness, revalidation, `Vary`, cache lock, stale-while-revalidate and
//! stale-if-error) over a store of ours ([`store`], on moka), the HTTP
//! rules Pingora leaves to the application ([`rules`]), and purges that
//! reach every region ([`invalidation`], [`purge`], [`signing`]).
//!
//! The request path (`service.rs`) enables the cache for a request only
//! when its one decision serves it in this region and the invalidations
//! are read (docs/cache.md: consistency outranks the cache).

pub mod invalidation;
pub mod purge;
pub mod request;
pub mod rules;
pub mod signing;
pub mod store;

use std::sync::Arc;

use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{CacheKey, CachePhase, NoCacheReason};
use pingora::proxy::Session;

use crate::config::{CacheConfig, RouteCache};
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
}

impl EdgeCache {
    /// A cache over `store`, purged through `invalidation`.
    pub fn new(
        store: &'static MemoryStore,
        invalidation: Arc<Invalidation>,
        config: CacheConfig,
    ) -> EdgeCache {
        let lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(config.lock_timeout));
        EdgeCache {
            store,
            lock,
            invalidation,
            config,
        }
    }

    /// Turn Pingora's cache on for this request.
    pub fn enable(&self, session: &mut Session) {
        session
            .cache
            .enable(self.store, None, None, Some(self.lock), None);
        let max = usize::try_from(self.config.max_object_size).unwrap_or(usize::MAX);
        session.cache.set_max_file_size_bytes(max);
    }
}

/// The cache key of a request: `http://host/path?query` (host lowercase,
/// without port, so that every region and listener shares one key).
pub fn key_of(session: &Session) -> CacheKey {
    let req = session.req_header();
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    CacheKey::new(purge::cache_url("http", host, pq), "")
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

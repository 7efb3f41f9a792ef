//! Facts about one request: its policy, method class, hop, token, residency
//! and the attempts that already failed. The proxy derives all of them
//! (verifying signatures, mapping names to indexes) before calling `decide`.

use crate::policy::Policy;
use crate::view::RegionSet;

/// A consistency token the proxy has already verified (signature, expiry) and mapped to a region index.
///
/// A region index outside the view is treated as a writer whose watermark is
/// unknown and which cannot serve, so a `read-your-writes` read carrying it is
/// unavailable (`unavailable:ryw-writer-down`), never served by a replica that
/// may be behind. The proxy should drop tokens it cannot map instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Index (into `UpstreamView::regions`) of the region that served the write.
    pub region: usize,
    /// When that region served the write (Unix ms, the writer's clock).
    pub written_ms: u64,
}

/// Why an attempt failed (the proxy records one per failed attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The connection could not be established.
    Connect,
    /// The connection was reset before a response.
    Reset,
    /// No response in time.
    Timeout,
    /// No untried eligible backend left in the region. Excludes the region
    /// whatever `Attempt::backend` says: the region has nothing left to try.
    NoBackend,
}

/// One failed attempt of this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Index (into `UpstreamView::regions`) of the region tried.
    pub region: usize,
    /// The backend tried; None: a peer region (its edge-router) or NoBackend.
    pub backend: Option<usize>,
    /// How it failed.
    pub failure: AttemptFailure,
}

/// How far a retry may go (the proxy derives it from method, Idempotency-Key and failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryScope {
    /// Any region the policy allows.
    Anywhere,
    /// Only the region of the last attempt (another backend there).
    SameRegion,
}

/// Facts about the request that matter for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// The route's policy.
    pub policy: Policy,
    /// Unsafe method (POST, PUT, PATCH, DELETE, or anything not GET/HEAD/OPTIONS/TRACE).
    pub write: bool,
    /// The request came from a peer edge-router with a valid signed hop: serve here or nowhere.
    pub valid_hop: bool,
    /// A verified consistency token, if the client sent one. Only `read-your-writes`
    /// reads look at it; writes and other policies ignore it.
    pub token: Option<Token>,
    /// Data residency: regions this route may be served from (RegionSet::ALL when unrestricted).
    pub allowed: RegionSet,
    /// Failed attempts so far, oldest first (empty for the first decision).
    pub attempts: &'a [Attempt],
    /// Scope of a retry (ignored when attempts is empty).
    pub retry_scope: RetryScope,
    /// Every peer checks a forwarded token against its own replica (all
    /// regions run a release that does). False during a rolling upgrade:
    /// a token-bearing read then goes only to the local region or the writer.
    pub peers_check_tokens: bool,
}

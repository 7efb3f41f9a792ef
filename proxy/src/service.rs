//! The Pingora `ProxyHttp` implementation, kept thin: `request_filter`
//! validates the Host, normalises the path, refuses loops, reads the
//! consistency token and makes the request's one decision
//! (`edge_policies::decide` over the composed health and lag snapshot),
//! kept in the context, or answers itself for a route with `return`;
//! `upstream_peer` only maps that decision to a peer.
//! A failed attempt goes into the attempt history and a retry asks `decide`
//! again with it. The other hooks apply header rules, issue tokens, record
//! outcomes and write one access-log event. Once a response has started, a
//! failure aborts it instead of writing into it.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use edge_policies::{
    decide, Attempt, AttemptFailure, Decision, Policy, RequestFacts, RetryScope, Target, Token,
};
use http::Method;
use ipnet::IpNet;
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, ForcedFreshness, HitHandler, NoCacheReason, RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};

use crate::backend_transport::BackendTransport;
use crate::cache::invalidation::{PurgePath, PURGE_PATH, PURGE_SIGNATURE};
use crate::cache::purge::PurgeSpec;
use crate::cache::request::{self as cache_request, CacheFacts, PeerPurgeError};
use crate::cache::rules::{self as cache_rules, RequestDirectives};
use crate::cache::signing::PurgeSigner;
use crate::cache::{self, CacheCtx, EdgeCache, NOT_LOCAL};
use crate::clock::unix_ms;
use crate::compression;
use crate::config::route_return::StaticResponse;
use crate::config::RouteConfig;
use crate::forwarding::{self, acceptable_request_id, new_request_id};
use crate::health::outlier::Outcome;
use crate::health::HealthState;
use crate::hop::{HopSigner, SignedRequest, HOP_HEADER};
use crate::host::validate_host;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::{status_class, Metrics};
use crate::path::{normalize_path, PathRules};
use crate::retry::{is_unsafe, Failure, RetryBudget, Retryable};
use crate::routing::RouteTable;
use crate::snapshot::Snapshots;
use crate::static_response;
use crate::telemetry::WarnLimiter;
use crate::token::{self, TokenCheck, TokenSigner, TOKEN_COOKIE, TOKEN_HEADER};

/// Attempts per request: the first, another backend, then the next region.
const MAX_ATTEMPTS: usize = 3;

/// Everything one region's proxy needs to handle a request, as one config
/// file made it: a reload builds a new one and swaps it in ([`EdgeProxy`]).
pub struct Region {
    /// Health and topology.
    pub health: Arc<HealthState>,
    /// Routes.
    pub routes: RouteTable,
    /// Hop signer.
    pub hop: HopSigner,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Drain state.
    pub lifecycle: Arc<Lifecycle>,
    /// Health path on the traffic listener.
    pub health_path: String,
    /// Add `x-edge-decision`.
    pub debug_headers: bool,
    /// Networks whose forwarding headers are kept.
    pub trusted_proxies: Vec<IpNet>,
    /// Path normalisation rules.
    pub path_rules: PathRules,
    /// Per upstream: requests and retries in flight.
    pub retry_budgets: Vec<Arc<RetryBudget>>,
    /// This region's `Via` pseudonym.
    pub via_name: String,
    /// Rate limit for warnings about hops that fail verification.
    pub hop_warnings: WarnLimiter,
    /// Rate limit for warnings about `Via` loops.
    pub loop_warnings: WarnLimiter,
    /// Rate limit for warnings about failed requests (each one is in the
    /// access log; Pingora's own line per failure is suppressed).
    pub error_warnings: WarnLimiter,
    /// A write to the client that makes no progress this long ends the response (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Health, replication lag and clock, composed for `decide`.
    pub snapshots: Snapshots,
    /// Issues and checks consistency tokens.
    pub tokens: TokenSigner,
    /// Every peer checks a forwarded token (false during a rolling upgrade, `hop_format = "v1"`).
    pub peers_check_tokens: bool,
    /// The HTTP cache (when a route has `cache = true`).
    pub cache: Option<Arc<EdgeCache>>,
    /// Verifies purges peers send to `/.edge/purge`.
    pub purge_signer: Arc<PurgeSigner>,
    /// Per upstream (config order): TLS and protocol towards its backends.
    pub backend_transports: Vec<BackendTransport>,
    /// How peer regions are reached (mutual TLS when `server.peer_ca` is set).
    pub peer_transport: BackendTransport,
    /// Mutual TLS between regions: hops and health detail only for peers with a certificate.
    pub peers_need_certificates: bool,
    /// `server.redirect_https`: plain-HTTP requests are sent to this TLS port.
    pub redirect_https: Option<u16>,
    /// `log.access_query`: the access log shows query strings.
    pub log_query: bool,
    /// Per route (config order): its rate limiter, if it has one.
    pub rate_limiters: Vec<Option<Arc<crate::rate_limit::RouteRateLimiter>>>,
}

/// Headers through which clients or proxies tell an origin about the URL;
/// the cache key does not hold them, so a request that may be stored does
/// not carry them (`Forwarded` may say `host=` and `proto=`).
const URL_HINTS: &[&str] = &[
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
];

/// Largest purge a peer may send.
const MAX_PEER_PURGE: usize = 1 << 20;

/// Who ended a response that had already started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aborted {
    /// The upstream failed mid-response.
    Upstream,
    /// The client went away (or could not be written to).
    Client,
}

/// Per-request state.
pub struct RequestCtx {
    /// The region setup this request started with (kept to its end across a reload).
    region: Option<Arc<Region>>,
    /// The status the upstream answered (before any change of ours).
    upstream_status: Option<u16>,
    /// The route's `max_body`, for a body without a declared length.
    max_body: Option<u64>,
    /// Request body bytes seen so far.
    body_seen: u64,
    /// Seconds a rate-limited client should wait.
    retry_after: Option<u64>,
    start: Instant,
    request_id: String,
    route: Option<usize>,
    hop_from: Option<String>,
    /// The current decision: made in `request_filter`, remade for each retry.
    decision: Option<Decision>,
    /// Its text (`ryw:lagging:eu-west-1`), built once when a header or the log needs it.
    decision_text: Option<Cow<'static, str>>,
    target_region: Option<usize>,
    backend: Option<usize>,
    /// Failed attempts, oldest first: `decide` reads them for a retry.
    attempts: Vec<Attempt>,
    /// An unsafe method: routed as a write.
    write: bool,
    /// A verified consistency token (read requests on read-your-writes routes).
    token: Option<Token>,
    /// Its value, forwarded to a peer region so that it checks the token too.
    token_value: Option<String>,
    /// A token to hand the client with this response.
    issued_token: Option<String>,
    /// How far a retry may go.
    retry_scope: RetryScope,
    upstream_start: Option<Instant>,
    upstream_time: Option<Duration>,
    got_response: bool,
    /// Set when the proxy answered itself: `health`, `no-route`, `bad-request`, `loop`.
    local_reply: Option<&'static str>,
    /// What this request allows by way of retries.
    retryable: Retryable,
    /// Retry slots taken from the upstream's budget (0 or 1; returned when the request ends).
    retries_held: u32,
    /// The upstream whose budget counts this request.
    budget_upstream: Option<usize>,
    /// The response had started when the request failed, and was aborted.
    aborted: Option<Aborted>,
    /// Cache state of this request.
    cache: CacheCtx,
    /// `x-cache` as sent (cache routes only).
    cache_result: Option<&'static str>,
    _in_flight: Option<InFlight>,
}

/// What a request's consistency token turned out to be.
enum TokenRead {
    /// None sent.
    Absent,
    /// Verified and mapped to a region; the value is forwarded to peers.
    Valid(Token, String),
    /// Sent, but not usable here (counted by result).
    Invalid,
}

impl RequestCtx {
    /// Failed attempts that reached for an upstream (not "no backend left" entries).
    fn upstream_attempts(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| !matches!(a.failure, AttemptFailure::NoBackend))
            .count()
    }
}

fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty())
}

fn path_and_query(req: &RequestHeader) -> &str {
    req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| forwarding::canonical_ip(a.ip()))
}

/// The connection presented a client certificate that the TLS listener
/// verified against `server.peer_ca`: another region's edge-router.
fn peer_authenticated(session: &Session) -> bool {
    session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some_and(|t| !t.cert_digest.is_empty())
}

/// The scheme the client used on this listener (`x-forwarded-proto` comes
/// from here, not from a constant).
fn listener_scheme(session: &Session) -> &'static str {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    if tls {
        "https"
    } else {
        "http"
    }
}

/// The host a request names: the URI's authority (absolute-form, HTTP/2
/// `:authority`) or the Host header. Both present and different is refused,
/// so the proxy and the backend cannot read two hosts from one request.
fn named_host(req: &RequestHeader) -> Result<Option<&str>, &'static str> {
    let header = match req.headers.get(http::header::HOST) {
        Some(h) => Some(h.to_str().map_err(|_| "Host is not ASCII")?),
        None => None,
    };
    match (req.uri.authority().map(|a| a.as_str()), header) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            Err("Host header and request target name different hosts")
        }
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h.filter(|h| !h.is_empty())),
    }
}

impl Region {
    fn local(&self) -> usize {
        self.health.topo.local
    }

    fn region_name(&self, index: usize) -> &str {
        &self.health.topo.regions[index].name
    }

    /// The route's name for labels, `-` before one is matched.
    fn route_label(&self, ctx: &RequestCtx) -> &str {
        ctx.route
            .map(|r| self.routes.routes()[r].name.as_str())
            .unwrap_or("-")
    }

    /// The region chosen for labels, `none` before one is.
    fn upstream_region_label(&self, ctx: &RequestCtx) -> &str {
        ctx.target_region
            .map(|r| self.region_name(r))
            .unwrap_or("none")
    }

    /// The route's `response_headers` rules, on a response to the client.
    fn apply_response_headers(&self, ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
        if let Some(route) = self.route(ctx) {
            let rules = &route.limits.response_headers;
            for name in &rules.remove {
                resp.remove_header(name);
            }
            for (name, value) in &rules.set {
                resp.insert_header(name.clone(), value.clone())?;
            }
        }
        Ok(())
    }

    /// Write a response the proxy makes itself, with the edge headers.
    async fn reply(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
    ) -> Result<()> {
        // Ours are short, and keep their Content-Length.
        compression::disable(session);
        let mut resp = ResponseHeader::build(status, Some(6))?;
        // The route's rules first: what follows is ours, and stays (an error
        // must not become cacheable).
        self.apply_response_headers(ctx, &mut resp)?;
        resp.insert_header(http::header::CONTENT_TYPE, content_type)?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        if status == 503 {
            // Health and replication change within seconds: say when to try again.
            resp.insert_header(http::header::RETRY_AFTER, "1")?;
        }
        if let (429, Some(secs)) = (status, ctx.retry_after) {
            resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
        }
        resp.insert_header("x-edge-region", self.region_name(self.local()))?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        if self.debug_headers {
            if let Some(text) = &ctx.decision_text {
                resp.insert_header("x-edge-decision", text.as_ref())?;
            }
        }
        if self.lifecycle.closes_connections() {
            session.set_keepalive(None);
        }
        let head_only = session.req_header().method == Method::HEAD;
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        kind: &'static str,
        msg: &str,
    ) -> Result<bool> {
        ctx.local_reply = Some(kind);
        // A refused request's body is not read: the connection cannot be reused.
        session.set_keepalive(None);
        self.reply(
            session,
            ctx,
            status,
            "text/plain",
            Bytes::from(format!("{msg}\n")),
        )
        .await?;
        Ok(true)
    }

    /// Answer from the route's `return` (a redirect, or a fixed page): the
    /// route's response header rules apply, then what the answer says.
    async fn serve_static(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        spec: &StaticResponse,
        host: &str,
    ) -> Result<bool> {
        ctx.local_reply = Some("return");
        // The URI is the path as matched by now (with the query as sent).
        let request_uri = path_and_query(session.req_header()).to_string();
        let mut resp = ResponseHeader::build(spec.status, Some(8))?;
        self.apply_response_headers(ctx, &mut resp)?;
        static_response::fill(&mut resp, spec, host, &request_uri)?;
        resp.insert_header("x-edge-region", self.region_name(self.local()))?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        if self.lifecycle.is_draining() || static_response::request_has_body(session) {
            session.set_keepalive(None);
        }
        static_response::write(session, resp, &spec.body).await?;
        Ok(true)
    }

    /// A hop that fails verification: a peer with another key (a rotation
    /// half done), a stale clock, or a forgery. Counted always, warned about
    /// at most once per interval.
    fn invalid_hop(&self, ctx: &RequestCtx) {
        self.metrics.hop_invalid.inc();
        if self.hop_warnings.allow() {
            tracing::warn!(request_id = %ctx.request_id, "x-edge-hop failed verification (peer with another EDGE_HOP_SECRET, clock skew, or forged); served as a client request (edge_hop_invalid_total counts every one)");
        }
    }

    async fn serve_health(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.local_reply = Some("health");
        let serviceable = self.health.snapshot().serviceable;
        let (status, code) = match (self.lifecycle.is_draining(), serviceable) {
            (true, _) => ("draining", 503),
            (false, false) => ("unavailable", 503),
            (false, true) => ("ok", 200),
        };
        // The detail (backends, regions) is for peers; with mutual TLS
        // between regions, others (the accelerator's checks) get the status.
        let body = if self.peers_need_certificates && !peer_authenticated(session) {
            serde_json::to_vec(&serde_json::json!({ "status": status })).unwrap_or_default()
        } else {
            serde_json::to_vec(&self.health.report(status)).unwrap_or_default()
        };
        self.reply(session, ctx, code, "application/json", body.into())
            .await?;
        Ok(true)
    }

    /// A purge sent by a peer's fan-out: verified, then applied once.
    async fn serve_peer_purge(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.peers_need_certificates && !peer_authenticated(session) {
            // As for hops: with mutual TLS between regions, the secret alone
            // does not make a sender a peer.
            self.invalid_hop(ctx);
            return self
                .refuse(session, ctx, 403, "purge", "purges come from peers only")
                .await;
        }
        let Some(cache) = self.cache.clone() else {
            return self
                .refuse(session, ctx, 404, "purge", "no route caches in this region")
                .await;
        };
        if session.req_header().method != Method::POST {
            return self.refuse(session, ctx, 405, "purge", "POST only").await;
        }
        let signature = session
            .req_header()
            .headers
            .get(PURGE_SIGNATURE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > MAX_PEER_PURGE {
                return self
                    .refuse(session, ctx, 413, "purge", "purge too large")
                    .await;
            }
            body.extend_from_slice(&chunk);
        }
        match cache_request::peer_purge(
            &self.purge_signer,
            signature.as_deref(),
            &body,
            unix_ms(),
            cache.path_rules,
        ) {
            Ok(purge) => {
                ctx.local_reply = Some("purge");
                let applied = cache.invalidation.apply(&purge, PurgePath::Direct);
                let msg: &'static [u8] = if applied.is_some() {
                    b"applied\n"
                } else {
                    b"already applied\n"
                };
                self.reply(session, ctx, 200, "text/plain", Bytes::from_static(msg))
                    .await?;
                Ok(true)
            }
            Err(PeerPurgeError::Signature) => {
                self.invalid_hop(ctx);
                self.refuse(session, ctx, 403, "purge", "purge not signed by a peer")
                    .await
            }
            Err(PeerPurgeError::Malformed) => {
                self.refuse(session, ctx, 400, "purge", "malformed purge")
                    .await
            }
            Err(PeerPurgeError::Stale) => {
                self.refuse(session, ctx, 400, "purge", "purge too old (replayed?)")
                    .await
            }
        }
    }

    /// The route of a request that has one.
    fn route(&self, ctx: &RequestCtx) -> Option<&RouteConfig> {
        ctx.route.map(|r| &self.routes.routes()[r])
    }

    /// Ask the policy where the request goes, from the composed snapshot
    /// (health, replication lag, clock) and the request's attempt history;
    /// `upstream` is the route's.
    fn decide_now(&self, route: &RouteConfig, upstream: usize, ctx: &RequestCtx) -> Decision {
        let snap = self.snapshots.load();
        let facts = RequestFacts {
            policy: route.policy,
            write: ctx.write,
            valid_hop: ctx.hop_from.is_some(),
            token: ctx.token,
            allowed: route.allowed,
            attempts: &ctx.attempts,
            retry_scope: ctx.retry_scope,
            peers_check_tokens: self.peers_check_tokens,
        };
        decide(snap.view(upstream), &snap.lag_view(), &facts)
    }

    /// Store a decision and, when a header or the log will show it, its text.
    fn set_decision(&self, ctx: &mut RequestCtx, d: Decision) {
        ctx.decision = Some(d);
        ctx.decision_text =
            self.route(ctx)
                .and_then(|route| route.upstream)
                .map(|upstream| match d.reason.detail {
                    // No detail: the static label, no snapshot load, no allocation.
                    edge_policies::Detail::None => Cow::Borrowed(d.reason.kind.as_str()),
                    _ => d.reason.describe(&self.health.snapshot().views[upstream]),
                });
    }

    /// Read the client's consistency token (header first, then cookie). An
    /// invalid one is counted and ignored, never an error.
    fn read_token(&self, req: &RequestHeader) -> TokenRead {
        let header = req
            .headers
            .get(TOKEN_HEADER)
            .map(|v| v.to_str().unwrap_or(""));
        let value = header.or_else(|| {
            req.headers
                .get_all(http::header::COOKIE)
                .iter()
                .find_map(|c| token::cookie_value(c.as_bytes(), TOKEN_COOKIE))
        });
        let Some(value) = value else {
            return TokenRead::Absent;
        };
        let check = self.tokens.check(value, unix_ms());
        let (result, token) = match check {
            TokenCheck::Valid(t) => match self
                .health
                .topo
                .regions
                .iter()
                .position(|r| r.name == t.region)
            {
                Some(region) => (
                    "valid",
                    TokenRead::Valid(
                        Token {
                            region,
                            written_ms: t.written_ms,
                        },
                        value.to_string(),
                    ),
                ),
                // Signed by us, naming a region this config does not have
                // (a deployment mid-change): nowhere to send it.
                None => ("unknown_region", TokenRead::Invalid),
            },
            other => (other.label(), TokenRead::Invalid),
        };
        self.metrics
            .consistency_tokens
            .with_label_values(&[result])
            .inc();
        token
    }

    /// Book-keeping after an attempt failed before a response: passive
    /// outlier detection and the attempt history.
    fn record_failed_attempt(&self, ctx: &mut RequestCtx, kind: &str, failure: AttemptFailure) {
        let Some(ui) = self.route(ctx).and_then(|r| r.upstream) else {
            return;
        };
        let upstream = &self.health.topo.upstreams[ui];
        let region = ctx.target_region.unwrap_or(self.local());
        self.metrics
            .upstream_errors
            .with_label_values(&[
                upstream.config.name.as_str(),
                self.region_name(region),
                kind,
            ])
            .inc();
        if let Some(b) = ctx.backend {
            self.health.observe_outcome(ui, b, Outcome::GatewayFailure);
        }
        ctx.attempts.push(Attempt {
            region,
            backend: ctx.backend,
            failure,
        });
    }

    /// Retry when the request, the failure and the retry budget allow
    /// another attempt and `decide`, given the attempt history, names a
    /// target; the new decision replaces the old one.
    fn maybe_retry(&self, session: &Session, ctx: &mut RequestCtx, e: &mut Error, f: Failure) {
        let Some((route, upstream)) = self.route(ctx).and_then(|r| Some((r, r.upstream?))) else {
            e.set_retry(false);
            return;
        };
        let allowed = ctx.retryable.allows(f)
            && !session.as_ref().retry_buffer_truncated()
            && ctx.upstream_attempts() < MAX_ATTEMPTS;
        ctx.retry_scope = if ctx.retryable.may_leave_region() {
            RetryScope::Anywhere
        } else {
            RetryScope::SameRegion
        };
        let next = allowed.then(|| self.decide_now(route, upstream, ctx));
        let Some(next) = next.filter(|d| d.target != Target::Unavailable) else {
            e.set_retry(false);
            return;
        };
        // Like Envoy's active retries, a request in its retry phase holds one
        // slot of the budget, however many attempts that phase takes.
        let granted = ctx.retries_held > 0
            || match ctx.budget_upstream {
                Some(u) => {
                    let cfg = &self.health.topo.upstreams[upstream].config.retry_budget;
                    let ok = self.retry_budgets[u].try_retry(cfg);
                    if !ok {
                        self.metrics
                            .retries_refused
                            .with_label_values(&[route.name.as_str(), "budget"])
                            .inc();
                    }
                    ok
                }
                None => false,
            };
        e.set_retry(granted);
        if granted {
            ctx.retries_held = 1;
            let kind = match next.target {
                Target::Region { index, .. } if Some(index) == ctx.target_region => "backend",
                _ => "region",
            };
            self.metrics
                .retries
                .with_label_values(&[route.name.as_str(), kind])
                .inc();
            self.set_decision(ctx, next);
        }
    }

    /// Backends of the local region this request already tried.
    fn tried_local(&self, ctx: &RequestCtx) -> Vec<usize> {
        ctx.attempts
            .iter()
            .filter(|a| a.region == self.local())
            .filter_map(|a| a.backend)
            .collect()
    }
}

/// The upstream of a proxied route: a route with `return` is answered in
/// `request_filter` and never reaches the hooks that need one.
fn upstream_of(route: &RouteConfig) -> Result<usize> {
    route.upstream.ok_or_else(|| {
        Error::explain(
            ErrorType::InternalError,
            "a route with `return` has no upstream",
        )
    })
}

/// Remove `Set-Cookie: edge_ct=…` lines a backend sent, keeping the others.
fn strip_token_cookies(resp: &mut ResponseHeader) -> Result<()> {
    let ours = |c: &http::HeaderValue| token::sets_cookie(c.as_bytes(), TOKEN_COOKIE);
    if !resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .any(ours)
    {
        return Ok(());
    }
    let kept: Vec<http::HeaderValue> = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter(|c| !ours(c))
        .cloned()
        .collect();
    resp.remove_header(&http::header::SET_COOKIE);
    for c in kept {
        resp.append_header(http::header::SET_COOKIE, c)?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for Region {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a (disabled) response
    /// compression module whose per-request cost we do not want to pay. (The
    /// proxy Pingora runs is [`EdgeProxy`], which adds it when a route
    /// compresses.)
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            region: None,
            upstream_status: None,
            max_body: None,
            body_seen: 0,
            retry_after: None,
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            hop_from: None,
            decision: None,
            decision_text: None,
            target_region: None,
            backend: None,
            attempts: Vec::new(),
            write: false,
            token: None,
            token_value: None,
            issued_token: None,
            retry_scope: RetryScope::Anywhere,
            upstream_start: None,
            upstream_time: None,
            got_response: false,
            local_reply: None,
            retryable: Retryable::Never,
            retries_held: 0,
            budget_upstream: None,
            aborted: None,
            cache: CacheCtx::default(),
            cache_result: None,
            _in_flight: Some(self.lifecycle.enter()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.lifecycle.closes_connections() {
            // Clients reconnect: the accelerator sends them to another
            // region, or (a graceful upgrade) the new process accepts them.
            session.set_keepalive(None);
        }
        // A client that stops reading must not hold a response (and its
        // upstream connection) forever.
        session.set_write_timeout(Some(self.send_timeout));
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| acceptable_request_id(id))
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        if req.uri.path() == self.health_path {
            return self.serve_health(session, ctx).await;
        }
        if req.uri.path() == PURGE_PATH {
            return self.serve_peer_purge(session, ctx).await;
        }
        let host = match named_host(req) {
            Ok(Some(h)) => h,
            Ok(None) => {
                return self
                    .refuse(session, ctx, 400, "bad-request", "missing Host header")
                    .await
            }
            Err(msg) => return self.refuse(session, ctx, 400, "bad-request", msg).await,
        };
        let host_name = match validate_host(host) {
            Ok(h) => h.name,
            Err(e) => {
                return self
                    .refuse(session, ctx, 400, "bad-request", &e.to_string())
                    .await
            }
        };
        // A peer's forwarded request (it carries a hop) is not a browser to send elsewhere.
        let plain_client =
            listener_scheme(session) == "http" && !req.headers.contains_key(HOP_HEADER);
        if let Some(port) = self.redirect_https.filter(|_| plain_client) {
            // nginx's `return 308 https://$host$request_uri`: the method and
            // body are kept by the client (308, not 301).
            let port = if port == 443 {
                String::new()
            } else {
                format!(":{port}")
            };
            let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let location = format!("https://{host_name}{port}{pq}");
            ctx.local_reply = Some("redirect");
            let mut resp = ResponseHeader::build(308, Some(4))?;
            resp.insert_header(http::header::LOCATION, location)?;
            resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
            resp.insert_header("x-request-id", ctx.request_id.as_str())?;
            session.set_keepalive(None);
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        }
        // Pingora keeps the raw bytes of a target it could not classify (and
        // stores `/` as its path): the backend would receive those bytes
        // while we matched `/`. Only origin-form and absolute-form pass.
        let origin_form = req.uri.path_and_query().map(|p| p.as_str().as_bytes());
        if req.uri.authority().is_none() && origin_form != Some(req.raw_path()) {
            return self
                .refuse(
                    session,
                    ctx,
                    400,
                    "bad-request",
                    "request target must be a path",
                )
                .await;
        }
        let path = match normalize_path(req.uri.path(), self.path_rules) {
            Ok(p) => p,
            Err(e) => {
                return self
                    .refuse(session, ctx, 400, "bad-request", &e.to_string())
                    .await
            }
        };
        // Whatever a hop's signature says, a request that already passed this
        // region is not forwarded again: hop keys can disagree mid-rotation.
        if forwarding::via_contains(&req.headers, &self.via_name) {
            self.metrics.loops.inc();
            if self.loop_warnings.allow() {
                tracing::warn!(request_id = %ctx.request_id, "request already passed this region (Via): refused with 508 (edge_loops_total counts every one; a client can send this Via too)");
            }
            return self
                .refuse(
                    session,
                    ctx,
                    508,
                    "loop",
                    "loop detected: this request already passed this region",
                )
                .await;
        }
        if let Some(hop) = req.headers.get(HOP_HEADER).and_then(|v| v.to_str().ok()) {
            let signed = SignedRequest {
                method: req.method.as_str(),
                host,
                path: path_and_query(req),
            };
            match self.hop.verify(hop, unix_ms(), signed) {
                // With mutual TLS between regions, a hop counts only on a
                // connection whose client certificate chains to the regions'
                // CA: a leaked secret alone does not make a client a peer.
                Some(_) if self.peers_need_certificates && !peer_authenticated(session) => {
                    self.invalid_hop(ctx)
                }
                Some(src) => ctx.hop_from = Some(src.to_string()),
                None => self.invalid_hop(ctx),
            }
        }
        ctx.route = self.routes.find(&host_name, &path);
        // A route with `return` answers itself: kept for then, with the host
        // its `location` may name (the request's borrow ends before).
        let answers_itself = self.route(ctx).is_some_and(|r| r.static_response.is_some());
        let static_host = answers_itself.then(|| host_name.to_string());
        // The scheme the client used: a trusted proxy's (or a peer's) word
        // when it gives one, else this listener's; the same rule as
        // x-forwarded-proto towards the origin. It keys the cache and marks
        // the token cookie Secure.
        let told = req.headers.get("x-forwarded-proto").filter(|_| {
            ctx.hop_from.is_some()
                || forwarding::is_trusted(client_ip(session), &self.trusted_proxies)
        });
        ctx.cache.https = match told {
            // A proxy that appended to the list: its first element is the
            // scheme the client used.
            Some(v) => v
                .as_bytes()
                .split(|b| *b == b',')
                .next()
                .is_some_and(|first| first.trim_ascii().eq_ignore_ascii_case(b"https")),
            None => listener_scheme(session) == "https",
        };
        if let Some(rc) = self.route(ctx).and_then(|r| r.cache) {
            ctx.cache.route = Some(rc);
            ctx.cache.directives = RequestDirectives::of(req);
        }
        ctx.retryable = Retryable::of(&req.method, req.headers.contains_key("idempotency-key"));
        ctx.write = is_unsafe(&req.method);
        // The token is ours (x-edge-*): read it before that namespace is
        // stripped. Only reads on read-your-writes routes consult it.
        // On a hop, whatever this region's route says: the sender routed
        // it as read-your-writes and forwarded the token to be checked here.
        let mut unverified_on_hop = false;
        if !ctx.write
            && !answers_itself
            && (ctx.hop_from.is_some()
                || self
                    .route(ctx)
                    .is_some_and(|r| matches!(r.policy, Policy::ReadYourWrites { .. })))
        {
            match self.read_token(req) {
                TokenRead::Valid(token, value) => {
                    ctx.token = Some(token);
                    ctx.token_value = Some(value);
                }
                TokenRead::Invalid => unverified_on_hop = ctx.hop_from.is_some(),
                TokenRead::Absent => {}
            }
        }
        let cookie_to_strip = req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .any(|v| token::has_cookie(v.as_bytes(), TOKEN_COOKIE));
        // The path forwarded is the path matched (origin-form), so the proxy
        // and the backend agree on the route a request took.
        let new_uri = match (&path, req.uri.authority()) {
            (Cow::Borrowed(_), None) => None,
            _ => {
                let mut pq = String::with_capacity(path.len() + 32);
                pq.push_str(&path);
                if let Some(q) = req.uri.query() {
                    pq.push('?');
                    pq.push_str(q);
                }
                Some(pq)
            }
        };
        let owned_host = req.uri.authority().is_some().then(|| host.to_string());
        // Our namespace: nothing a client sends under x-edge-* is believed or forwarded.
        let spoofable: Vec<String> = req
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-edge-"))
            .map(|k| k.as_str().to_string())
            .collect();
        if let Some(pq) = new_uri {
            match http::Uri::builder().path_and_query(pq).build() {
                Ok(uri) => session.req_header_mut().set_uri(uri),
                Err(_) => {
                    return self
                        .refuse(session, ctx, 400, "bad-request", "path cannot be forwarded")
                        .await
                }
            }
        }
        let req = session.req_header_mut();
        if let Some(h) = owned_host {
            // Absolute-form: the authority becomes the Host the backend sees.
            req.insert_header(http::header::HOST, h)?;
        }
        for name in &spoofable {
            req.remove_header(name.as_str());
        }
        if cookie_to_strip {
            // The token cookie is the proxy's: never forwarded upstream.
            // Other cookies pass as sent, on one line (RFC 6265 5.4).
            let kept: Vec<Vec<u8>> = req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| token::without_cookie(v.as_bytes(), TOKEN_COOKIE))
                .collect();
            req.remove_header(&http::header::COOKIE);
            if !kept.is_empty() {
                if let Ok(v) = http::HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
                    req.insert_header(http::header::COOKIE, v)?;
                }
            }
        }
        if unverified_on_hop {
            // A peer checked this token and this region cannot (expired in
            // between, a key or region this config lacks): refuse rather
            // than answer a read that may be older than the client's write.
            ctx.decision_text = Some(Cow::Borrowed("unavailable:ryw-unverified"));
            return self
                .refuse(
                    session,
                    ctx,
                    503,
                    "ryw-unverified",
                    "no region can serve this request now",
                )
                .await;
        }
        // A hop was limited in the region the client reached; here every
        // forwarded request would share the peer's address.
        let limiter = ctx
            .route
            .filter(|_| ctx.hop_from.is_none())
            .and_then(|r| self.rate_limiters.get(r).cloned().flatten());
        if let Some(limiter) = limiter {
            let client = client_ip(session)
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let key = match &limiter.by {
                crate::config::route_limits::RateKey::Client => client,
                crate::config::route_limits::RateKey::Header(h) => {
                    match session
                        .req_header()
                        .headers
                        .get(h)
                        .and_then(|v| v.to_str().ok())
                    {
                        Some(v) => format!("h:{v}"),
                        None => client,
                    }
                }
            };
            if let Err(wait) = limiter.check(&key) {
                self.metrics
                    .rate_limited
                    .with_label_values(&[self.route_label(ctx)])
                    .inc();
                ctx.retry_after = Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
                return self
                    .refuse(
                        session,
                        ctx,
                        429,
                        "rate-limited",
                        "too many requests: see Retry-After",
                    )
                    .await;
            }
        }
        // After the rate limit, which applies to it too: one answer, no decision.
        if let (Some(spec), Some(host)) = (
            self.route(ctx).and_then(|r| r.static_response.as_ref()),
            static_host.as_deref(),
        ) {
            return self.serve_static(session, ctx, spec, host).await;
        }
        if let Some(max) = self.route(ctx).and_then(|r| r.limits.max_body) {
            let declared = session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return self
                    .refuse(
                        session,
                        ctx,
                        413,
                        "body-too-large",
                        "the request body is larger than this route accepts",
                    )
                    .await;
            }
            // A chunked body is counted as it streams (request_body_filter).
            ctx.max_body = Some(max);
        }
        if ctx.route.is_none() {
            ctx.local_reply = Some("no-route");
            self.reply(
                session,
                ctx,
                404,
                "text/plain",
                Bytes::from_static(b"no route for this host and path\n"),
            )
            .await?;
            return Ok(true);
        }
        // The request's one decision, before any cache lookup: a read the
        // policy sends elsewhere must not be answered from local state.
        if let Some(route) = self.route(ctx) {
            let d = self.decide_now(route, upstream_of(route)?, ctx);
            self.set_decision(ctx, d);
            if d.target == Target::Unavailable {
                // The reason is in the log, the metric and (debug) x-edge-decision.
                session.set_keepalive(None);
                self.reply(
                    session,
                    ctx,
                    503,
                    "text/plain",
                    Bytes::from_static(b"no region can serve this request now\n"),
                )
                .await?;
                return Ok(true);
            }
        }
        // A peer region's answer is compressed, if at all, by the region
        // the client is at: it knows the client and caches the origin's bytes.
        let from_peer = ctx.hop_from.is_some();
        if let Some(settings) = self
            .route(ctx)
            .and_then(|r| r.compress.as_ref())
            .filter(|_| !from_peer)
        {
            compression::enable(session, settings)?;
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route_index = ctx.route.ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "upstream_peer without a route")
        })?;
        let route = &self.routes.routes()[route_index];
        let ui = upstream_of(route)?;
        let topo = &self.health.topo;
        let upstream = &topo.upstreams[ui];
        if ctx.budget_upstream.is_none() {
            self.retry_budgets[ui].start_request();
            ctx.budget_upstream = Some(ui);
        }
        let snap = self.health.snapshot();
        // Each pass either returns or adds an attempt that excludes a region,
        // so this ends; the bound only guards against a policy bug.
        for _ in 0..=topo.regions.len() {
            let d = ctx.decision.ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "upstream_peer without a decision")
            })?;
            let (index, panic) = match d.target {
                Target::Region { index, panic } => (index, panic),
                Target::Unavailable => {
                    let status = if ctx.upstream_attempts() == 0 {
                        503
                    } else {
                        502
                    };
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(status),
                        d.reason.kind.as_str(),
                    ));
                }
            };
            ctx.target_region = Some(index);
            if index != topo.local {
                if session.cache.enabled() {
                    // A retry leaving the region: another region's answer
                    // is neither served as ours nor stored here.
                    session.cache.disable(NoCacheReason::Custom(NOT_LOCAL));
                }
                ctx.backend = None;
                let peer = topo.regions[index].peer.as_ref().ok_or_else(|| {
                    Error::explain(ErrorType::InternalError, "chosen region has no peer")
                })?;
                let transport = if peer.tls {
                    &self.peer_transport
                } else {
                    &BackendTransport::plain()
                };
                return Ok(transport.peer_named(
                    peer.addr,
                    Some(&peer.host),
                    route
                        .limits
                        .connect_timeout
                        .unwrap_or(upstream.config.connect_timeout),
                    route
                        .limits
                        .read_timeout
                        .unwrap_or(upstream.config.read_timeout),
                ));
            }
            let tried = self.tried_local(ctx);
            match self.health.pick_local(&snap, ui, &tried, panic) {
                Some(b) => {
                    ctx.backend = Some(b);
                    let addr = upstream.backends[b].addr;
                    return Ok(self.backend_transports[ui].peer(
                        addr,
                        route
                            .limits
                            .connect_timeout
                            .unwrap_or(upstream.config.connect_timeout),
                        route
                            .limits
                            .read_timeout
                            .unwrap_or(upstream.config.read_timeout),
                    ));
                }
                None => {
                    ctx.attempts.push(Attempt {
                        region: index,
                        backend: None,
                        failure: AttemptFailure::NoBackend,
                    });
                    let next = self.decide_now(route, ui, ctx);
                    self.set_decision(ctx, next);
                }
            }
        }
        Err(Error::explain(
            ErrorType::HTTPStatus(502),
            "no target left after every region was tried",
        ))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        for name in forwarding::hop_by_hop_present(&upstream_request.headers, true) {
            upstream_request.remove_header(&name);
        }
        let ip = client_ip(session);
        let trusted = ctx.hop_from.is_some() || forwarding::is_trusted(ip, &self.trusted_proxies);
        let existing = |name: &str| {
            upstream_request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (prior_for, prior_forwarded, prior_via, has_proto, has_host) = (
            forwarding::joined(&upstream_request.headers, "x-forwarded-for"),
            forwarding::joined(&upstream_request.headers, "forwarded"),
            forwarding::joined(&upstream_request.headers, "via"),
            existing("x-forwarded-proto").is_some(),
            existing("x-forwarded-host").is_some(),
        );
        if let Some(xff) = forwarding::forwarded_for(prior_for.as_deref(), ip, trusted) {
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        // RFC 7239 `Forwarded` is believed exactly when `X-Forwarded-*` is.
        match (trusted, prior_forwarded) {
            (true, Some(prev)) => {
                let host = request_host(session.req_header()).unwrap_or_default();
                let mine = forwarding::forwarded_element(ip, host, listener_scheme(session));
                upstream_request.insert_header("forwarded", format!("{prev}, {mine}"))?;
            }
            (false, Some(_)) => {
                upstream_request.remove_header("forwarded");
            }
            (_, None) => {}
        }
        let version = if session.req_header().version == http::Version::HTTP_2 {
            "2"
        } else {
            "1.1"
        };
        let via = match prior_via {
            Some(prev) => format!("{prev}, {version} {}", self.via_name),
            None => format!("{version} {}", self.via_name),
        };
        upstream_request.insert_header(http::header::VIA, via)?;
        let host = request_host(session.req_header())
            .unwrap_or_default()
            .to_string();
        if session.cache.enabled() {
            // What the response may depend on is what the key holds: the
            // host without its port, the scheme, and nothing else a client
            // or a proxy says about the URL (cache poisoning).
            let key_host = cache::key_host(session.req_header());
            upstream_request.insert_header(http::header::HOST, key_host.as_str())?;
            upstream_request.insert_header("x-forwarded-host", key_host.as_str())?;
            let proto = if ctx.cache.https { "https" } else { "http" };
            upstream_request.insert_header("x-forwarded-proto", proto)?;
            for name in URL_HINTS {
                upstream_request.remove_header(*name);
            }
        } else {
            if !(trusted && has_proto) {
                upstream_request.insert_header("x-forwarded-proto", listener_scheme(session))?;
            }
            if !(trusted && has_host) {
                upstream_request.insert_header("x-forwarded-host", host.as_str())?;
            }
        }
        upstream_request.insert_header("x-request-id", ctx.request_id.as_str())?;
        if ctx.target_region.is_some_and(|r| r != self.local()) {
            if let Some(t) = &ctx.token_value {
                // The peer serves this read only if its own replica has the write.
                upstream_request.insert_header(TOKEN_HEADER, t.as_str())?;
            }
            let signed = SignedRequest {
                method: upstream_request.method.as_str(),
                host: &host,
                path: path_and_query(upstream_request),
            };
            let value = self
                .hop
                .sign(self.region_name(self.local()), unix_ms(), signed);
            upstream_request.insert_header(HOP_HEADER, value)?;
        }
        // A retry replays the body through request_body_filter: count it afresh.
        ctx.body_seen = 0;
        // Towards a peer region the rules are its own to apply (it trusts
        // the forwarding headers we send).
        let to_peer = ctx.target_region.is_some_and(|r| r != self.local());
        if let Some(route) = self.route(ctx).filter(|_| !to_peer) {
            let rules = &route.limits.request_headers;
            for name in &rules.remove {
                upstream_request.remove_header(name);
            }
            for (name, value) in &rules.set {
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        ctx.upstream_start = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.got_response = true;
        ctx.upstream_time = ctx.upstream_start.map(|t| t.elapsed());
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        let upstream = ctx.route.and_then(|r| self.routes.routes()[r].upstream);
        if let (Some(upstream), Some(b)) = (upstream, ctx.backend) {
            self.health
                .observe_outcome(upstream, b, Outcome::from_status(status));
            if status >= 500 {
                let name = &self.health.topo.upstreams[upstream].config.name;
                self.metrics
                    .upstream_errors
                    .with_label_values(&[
                        name.as_str(),
                        self.region_name(self.local()),
                        "status_5xx",
                    ])
                    .inc();
            }
        }
        for name in forwarding::hop_by_hop_present(&upstream_response.headers, status == 101) {
            upstream_response.remove_header(&name);
        }
        if status == 304 && session.cache.maybe_cache_meta().is_some() {
            // Revalidation: response_cache_filter merges these fields next.
            ctx.cache.not_modified = Some(upstream_response.headers.clone());
        }
        if ctx.write && (200..400).contains(&status) && ctx.cache.route.is_some() {
            if let Some(cache) = self.cache.clone() {
                // Before the client hears of the write (and before its
                // token is issued): its next read anywhere must not be the
                // old copy.
                let req = session.req_header();
                let host = cache::key_host(req);
                let urls = cache_request::invalidated_urls(
                    req,
                    upstream_response,
                    &host,
                    cache.path_rules,
                );
                cache
                    .invalidation
                    .publish_write(PurgeSpec::urls(urls))
                    .await;
            }
        }
        let from_peer = ctx.target_region.is_some_and(|r| r != self.local());
        if !from_peer {
            // Only an edge-router mints tokens (a peer's pass through); a
            // backend cannot set or overwrite the client's.
            upstream_response.remove_header(TOKEN_HEADER);
            strip_token_cookies(upstream_response)?;
            let write_succeeded = ctx.write && (200..300).contains(&status);
            if write_succeeded
                && self
                    .route(ctx)
                    .is_some_and(|r| matches!(r.policy, Policy::ReadYourWrites { .. }))
            {
                // Served here: the write is in this region's data by now.
                ctx.issued_token =
                    Some(self.tokens.issue(self.region_name(self.local()), unix_ms()));
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.apply_response_headers(ctx, resp)?;
        if let Some(settings) = self.route(ctx).and_then(|r| r.compress.as_ref()) {
            // After the rules (a rule may set Cache-Control: no-transform),
            // before the module, which sees the response next.
            compression::on_response(session, settings, resp)?;
        }
        resp.insert_header("x-edge-region", self.region_name(self.local()))?;
        if ctx.cache.route.is_some() {
            // Tags are for purging here, not for clients (as Fastly and Cloudflare do).
            resp.remove_header("surrogate-key");
            resp.remove_header("cache-tag");
            let result = cache::result_of(session.cache.phase(), ctx.cache.served_stale);
            ctx.cache_result = Some(result);
            resp.insert_header("x-cache", result)?;
            self.metrics
                .cache_lookups
                .with_label_values(&[self.route_label(ctx), &result.to_ascii_lowercase()])
                .inc();
        }
        if let Some(r) = ctx.target_region {
            resp.insert_header("x-edge-upstream-region", self.region_name(r))?;
        }
        match (self.debug_headers, &ctx.decision_text) {
            (true, Some(text)) => resp.insert_header("x-edge-decision", text.as_ref())?,
            _ => {
                resp.remove_header("x-edge-decision");
            }
        }
        if let Some(t) = ctx.issued_token.take() {
            self.metrics
                .consistency_tokens
                .with_label_values(&["issued"])
                .inc();
            // Over HTTPS (by the listener, or a trusted proxy's word) the
            // browser must not send it back in clear.
            let secure = if ctx.cache.https { "; Secure" } else { "" };
            let cookie = format!(
                "{TOKEN_COOKIE}={t}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                self.tokens.ttl().as_secs()
            );
            resp.insert_header(TOKEN_HEADER, t)?;
            resp.append_header(http::header::SET_COOKIE, cookie)?;
        }
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        let mut timing = String::with_capacity(48);
        forwarding::push_timing(&mut timing, "edge", ctx.start.elapsed().as_micros());
        if let Some(up) = ctx.upstream_time {
            forwarding::push_timing(&mut timing, "upstream", up.as_micros());
        }
        if let Some(result) = ctx.cache_result {
            timing.push_str(", cache;desc=");
            timing.push_str(result);
        }
        if let Some(prev) = resp
            .headers
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
        {
            if !prev.is_empty() {
                timing.push_str(", ");
                timing.push_str(prev);
            }
        }
        resp.insert_header("server-timing", timing)?;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An upgraded connection (WebSocket) is a stream, not a body.
        if session.was_upgraded() {
            return Ok(());
        }
        if let (Some(max), Some(chunk)) = (ctx.max_body, body.as_ref()) {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > max {
                ctx.local_reply = Some("body-too-large");
                let mut e = Error::explain(
                    ErrorType::HTTPStatus(413),
                    "the request body grew past the route's max_body",
                );
                e.set_retry(false);
                return Err(e);
            }
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let (Some(cache), Some(_)) = (&self.cache, ctx.cache.route) else {
            return Ok(());
        };
        let local = ctx.decision.is_some_and(
            |d| matches!(d.target, Target::Region { index, .. } if index == self.local()),
        );
        let facts = CacheFacts {
            cacheable_method: cache_rules::cacheable_method(&session.req_header().method),
            client_no_store: ctx.cache.directives.no_store,
            local,
            foreign_token: ctx.token.is_some_and(|t| t.region != self.local()),
            lag_read_ms: self.snapshots.lag.snapshot().last_ok_ms,
            sync: cache.invalidation.sync(),
            now_ms: unix_ms(),
        };
        if cache_request::use_cache(&facts).is_ok() {
            cache.enable(session);
            ctx.cache.purge_seq = cache.store.purge_seq();
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        Ok(cache::key_of(session, ctx.cache.https))
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<ForcedFreshness>> {
        let (forced, stale) = ctx
            .cache
            .directives
            .freshness(meta, is_fresh, SystemTime::now());
        ctx.cache.served_stale = stale;
        Ok(forced)
    }

    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        if ctx.cache.route.is_some() && ctx.cache.directives.only_if_cached {
            // RFC 9111 5.2.1.7: answer from the cache or not at all.
            ctx.local_reply = Some("only-if-cached");
            self.reply(
                session,
                ctx,
                504,
                "text/plain",
                Bytes::from_static(b"not in this region's cache (only-if-cached)\n"),
            )
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        if let Some(cache) = &self.cache {
            let key = cache::key_of(session, ctx.cache.https);
            // As purges name it: an `https://` key's URL is written `http://`.
            let url = cache::store::url_of(&key);
            let tags = cache_rules::response_tags(&resp.headers);
            if cache.store.purged_since(ctx.cache.purge_seq, &url, &tags) {
                // Produced before a purge that covers it: served, not stored.
                return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    "purged-in-flight",
                )));
            }
            if cache.invalidation.settling(&url, &tags, unix_ms()) {
                // Served, not stored: this region's data may predate the purge.
                return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                    "purge-settling",
                )));
            }
        }
        Ok(match ctx.cache.route {
            Some(route) => match ctx.cache.not_modified.take() {
                Some(fields) => {
                    let mut merged = resp.clone();
                    cache_rules::merge_not_modified(&mut merged, &fields);
                    let now = SystemTime::now();
                    cache_rules::response_cacheable(session.req_header(), &merged, route, now)
                }
                None => cache_rules::response_cacheable(
                    session.req_header(),
                    resp,
                    route,
                    SystemTime::now(),
                ),
            },
            None => RespCacheable::Uncacheable(NoCacheReason::Custom("route")),
        })
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        cache_rules::variance(meta, req)
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        // Whether the stored copy allows it (stale-while-revalidate,
        // stale-if-error, no must-revalidate) Pingora checks on the meta;
        // here: which failures count as the origin's (RFC 5861 4).
        error.is_none_or(|e| {
            e.esource() == &ErrorSource::Upstream
                || matches!(e.etype(), ErrorType::HTTPStatus(code) if *code >= 500)
                || matches!(
                    e.etype(),
                    ErrorType::ConnectTimedout
                        | ErrorType::ConnectRefused
                        | ErrorType::ConnectError
                )
        })
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let kind = match e.etype() {
            ErrorType::ConnectTimedout => "connect_timeout",
            _ => "connect",
        };
        self.record_failed_attempt(ctx, kind, AttemptFailure::Connect);
        self.maybe_retry(session, ctx, &mut e, Failure::Connect);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        if ctx.got_response || e.esource() != &ErrorSource::Upstream {
            e.set_retry(false);
            return e;
        }
        // The upstream failed before answering (reset, closed keep-alive, read timeout).
        let (kind, failure) = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => ("timeout", Failure::Timeout),
            _ => ("reset", Failure::Reset),
        };
        self.record_failed_attempt(ctx, kind, failure.attempt());
        self.maybe_retry(session, ctx, &mut e, failure);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let Some(started) = session.response_written().map(|r| r.status.as_u16()) {
            // The response (or an upgraded stream) has begun: writing our own
            // error now would splice it into the body and let the client take
            // a truncated response for a complete one. Abort instead: HTTP/1
            // closes without the terminating chunk, HTTP/2 resets the stream.
            session.downstream_session.shutdown().await;
            if e.esource() != &ErrorSource::Upstream {
                // The client went away, or something of ours failed: not
                // the upstream's doing.
                ctx.aborted = (e.esource() == &ErrorSource::Downstream).then_some(Aborted::Client);
                return FailToProxy {
                    error_code: started,
                    can_reuse_downstream: false,
                };
            }
            ctx.aborted = Some(Aborted::Upstream);
            let (route, region) = (self.route_label(ctx), self.upstream_region_label(ctx));
            self.metrics
                .upstream_aborted
                .with_label_values(&[route, region])
                .inc();
            return FailToProxy {
                error_code: started,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            // The reason is in the log, the metric and (debug) x-edge-decision, not the body.
            let msg = match code {
                503 => "no region can serve this request now\n".to_string(),
                502 => "upstream failed before answering\n".to_string(),
                508 => "loop detected\n".to_string(),
                504 => "upstream timed out\n".to_string(),
                _ => format!(
                    "{}\n",
                    http::StatusCode::from_u16(code)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                ),
            };
            // The connection is not reused after an error (its request body
            // may be unread): say so, or the client reuses a closing socket.
            session.set_keepalive(None);
            if let Err(err) = self
                .reply(session, ctx, code, "text/plain", Bytes::from(msg))
                .await
            {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Every request, failed or not, gets its access-log line in
        // `logging` (with the error); Pingora's ERROR line per failure would
        // flood the log in an outage (every policy 503 too). A failure of
        // the upstream's or ours is also warned about, at most once per
        // interval.
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // Retried attempts: counted in edge_retries_total and the access
        // log's `attempts`.
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(u) = ctx.budget_upstream.take() {
            self.retry_budgets[u].end_request(ctx.retries_held);
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let (route, upstream_region) = (self.route_label(ctx), self.upstream_region_label(ctx));
        let decision = ctx
            .decision
            .map(|d| d.reason.kind.as_str())
            .or(ctx.local_reply)
            .unwrap_or("none");
        let elapsed = ctx.start.elapsed();
        let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
        if ctx.local_reply != Some("health") {
            self.metrics
                .request_bytes
                .with_label_values(&[route])
                .inc_by(bytes_in as u64);
            self.metrics
                .response_bytes
                .with_label_values(&[route])
                .inc_by(bytes_out as u64);
            self.metrics
                .requests
                .with_label_values(&[route, upstream_region, decision, status_class(status)])
                .inc();
            self.metrics
                .request_duration
                .with_label_values(&[route, upstream_region])
                .observe(elapsed.as_secs_f64());
            if let Some(up) = ctx.upstream_time {
                self.metrics
                    .upstream_duration
                    .with_label_values(&[route, upstream_region])
                    .observe(up.as_secs_f64());
            }
            if let Some(d) = ctx
                .decision
                .filter(|d| d.reason.is_failover() && status > 0)
            {
                self.metrics
                    .failovers
                    .with_label_values(&[route, upstream_region, d.reason.kind.as_str()])
                    .inc();
            }
        }
        if let Some(e) = e.filter(|e| {
            // A policy's answer (HTTPStatus) or a client that went away is not a failure to warn about.
            !matches!(e.etype(), ErrorType::HTTPStatus(_))
                && e.esource() != &ErrorSource::Downstream
        }) {
            if self.error_warnings.allow() {
                tracing::warn!(
                    route,
                    region = upstream_region,
                    status,
                    error = %e,
                    request_id = %ctx.request_id,
                    "request failed (at most one such line per interval; each failure is in the access log and edge_upstream_errors_total)"
                );
            }
        }
        let req = session.req_header();
        if ctx.local_reply == Some("health") {
            // Peers and the accelerator poll this every few seconds: keep it out of the info log.
            tracing::debug!(target: "edge_router::access", status, request_id = %ctx.request_id, "health probe");
            return;
        }
        let path = if self.log_query {
            path_and_query(req)
        } else {
            req.uri.path()
        };
        let upstream = ctx.route.and_then(|r| self.routes.routes()[r].upstream);
        let backend = match (upstream, ctx.backend) {
            (Some(upstream), Some(b)) => Some(
                self.health.topo.upstreams[upstream].backends[b]
                    .label
                    .as_str(),
            ),
            // Another region's edge-router.
            _ => ctx
                .target_region
                .filter(|&r| r != self.local())
                .and_then(|r| self.health.topo.regions[r].peer.as_ref())
                .map(|p| p.authority.as_str()),
        };
        tracing::info!(
            target: "edge_router::access",
            client = session.client_addr().map(|a| a.to_string()),
            method = %req.method,
            host = request_host(req).unwrap_or("-"),
            path,
            status,
            bytes_in,
            bytes_out,
            user_agent = req
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
            backend,
            upstream_status = ctx.upstream_status,
            duration_us = elapsed.as_micros() as u64,
            upstream_us = ctx.upstream_time.map(|d| d.as_micros() as u64),
            route,
            region = upstream_region,
            decision = ctx.decision_text.as_deref().unwrap_or(decision),
            attempts = ctx.upstream_attempts() + 1,
            hop_from = ctx.hop_from.as_deref(),
            cache = ctx.cache_result,
            outcome = match (ctx.aborted, e) {
                (Some(Aborted::Upstream), _) => "upstream_aborted",
                (Some(Aborted::Client), _) => "client_aborted",
                (None, Some(_)) => "error",
                (None, None) => "ok",
            },
            request_id = %ctx.request_id,
            error = e.map(|e| e.to_string()),
            "request"
        );
    }
}

/// The proxy Pingora runs: the current [`Region`], swapped whole by a
/// reload. A request keeps the `Region` it started with to its end, so
/// in-flight requests finish on the setup they began with.
pub struct EdgeProxy {
    current: Arc<arc_swap::ArcSwap<Region>>,
    /// Pingora's compression module is in the chain (a route compressed at start).
    compression: bool,
}

impl EdgeProxy {
    /// A proxy serving whatever `current` holds; `compression`: with
    /// Pingora's compression module, which only a start can add.
    pub fn new(current: Arc<arc_swap::ArcSwap<Region>>, compression: bool) -> EdgeProxy {
        EdgeProxy {
            current,
            compression,
        }
    }

    /// The request's region setup (`new_ctx` sets it; the current one otherwise).
    fn region(&self, ctx: &RequestCtx) -> Arc<Region> {
        ctx.region
            .clone()
            .unwrap_or_else(|| self.current.load_full())
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    /// Pingora's default adds its compression module (switched off) to
    /// every proxy; it costs each request even then (measured: 5–8 % CPU),
    /// so it is added only when a route compressed at start.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        if self.compression {
            compression::add_module(modules);
        }
    }

    fn new_ctx(&self) -> RequestCtx {
        crate::downstream::note_reached();
        let region = self.current.load_full();
        let mut ctx = region.new_ctx();
        ctx.region = Some(region);
        ctx
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.region(ctx).request_filter(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.region(ctx).upstream_peer(session, ctx).await
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.region(ctx)
            .upstream_request_filter(session, upstream_request, ctx)
            .await
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.region(ctx)
            .upstream_response_filter(session, upstream_response, ctx)
            .await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.region(ctx).response_filter(session, resp, ctx).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.region(ctx)
            .request_body_filter(session, body, end_of_stream, ctx)
            .await
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        self.region(ctx).request_cache_filter(session, ctx)
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        self.region(ctx).cache_key_callback(session, ctx)
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<ForcedFreshness>> {
        self.region(ctx)
            .cache_hit_filter(session, meta, hit_handler, is_fresh, ctx)
            .await
    }

    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        self.region(ctx).proxy_upstream_filter(session, ctx).await
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        self.region(ctx).response_cache_filter(session, resp, ctx)
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        self.region(ctx).cache_vary_filter(meta, ctx, req)
    }

    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        self.region(ctx).should_serve_stale(session, ctx, error)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        self.region(ctx).fail_to_connect(session, peer, ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        self.region(ctx)
            .error_while_proxy(peer, session, e, ctx, client_reused)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.region(ctx).fail_to_proxy(session, e, ctx).await
    }

    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        self.region(ctx).suppress_error_log(session, ctx, error)
    }

    fn suppress_proxy_warn_log(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        self.region(ctx)
            .suppress_proxy_warn_log(session, ctx, error, context)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.region(ctx).logging(session, e, ctx).await
    }
}

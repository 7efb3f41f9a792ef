//! The rules: `decide` maps snapshots and request facts to a [`Decision`].
//! The order of the rules and the choices the policy tables leave open
//! are documented on [`decide`], where the proxy's authors will read them.

use crate::policy::{OnPrimaryDown, Policy, Writes};
use crate::reason::{Detail, Reason, ReasonKind};
use crate::request::{AttemptFailure, RequestFacts, RetryScope};
use crate::view::{LagView, RegionSet, RegionView, UpstreamView};
use std::time::Duration;

/// Where the request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Region `index` in the view. `panic` means: ignore backend health there.
    Region {
        /// Index into `UpstreamView::regions`.
        index: usize,
        /// Health is ignored (panic threshold reached): any backend may be used.
        panic: bool,
    },
    /// No region may serve it: answer 503 with the reason.
    Unavailable,
}

/// The answer: a target and the reason for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub target: Target,
    /// Why.
    pub reason: Reason,
}

// === impl Decision ===

impl Decision {
    fn region(index: usize, reason: Reason) -> Self {
        Decision {
            target: Target::Region {
                index,
                panic: false,
            },
            reason,
        }
    }

    fn panic(index: usize) -> Self {
        Decision {
            target: Target::Region { index, panic: true },
            reason: Reason::plain(ReasonKind::Panic),
        }
    }

    fn unavailable(reason: Reason) -> Self {
        Decision {
            target: Target::Unavailable,
            reason,
        }
    }

    /// The same target with another kind, when this decision has kind `from`.
    fn rename(self, from: ReasonKind, to: Reason) -> Self {
        if self.reason.kind == from {
            Decision { reason: to, ..self }
        } else {
            self
        }
    }
}

/// The front door: decide which region serves a request.
///
/// Pure and cheap: reads the snapshots, never a clock; allocates only inside
/// [`nearest`]. With no local region in the view the answer is
/// `unavailable:no-healthy-region`.
///
/// # Order of the rules
///
/// 1. *Candidates.* A region may be chosen only if it is in `allowed`
///    (residency), reachable (peers; the local region always is), not
///    excluded by the attempts (two failures there, or one with
///    `backend: None` or [`AttemptFailure::NoBackend`]) and, for a
///    same-region retry, the last attempt's region. Every rule picks from the
///    candidates, which is why no target ever leaves `allowed`.
/// 2. *Hop, then policy.* A valid hop is served locally or not at all. The
///    one policy rule that applies to it: a `read-your-writes` read whose
///    token (forwarded by the peer) the local replica has not caught up with
///    is refused (`unavailable:ryw-behind`), never answered stale. A
///    same-region retry whose region is used up is unavailable. Otherwise the policy's rule for reads or writes picks a
///    target and a kind; `read-your-writes` writes with `writes = local` follow
///    `local-first`, and the token is read only for `read-your-writes` reads.
/// 3. *Retry labels.* On a retry, the health kinds (`local`,
///    `failover:no-healthy-local`, `residency`) become `retry:same-region` when
///    the retry stays in the last attempt's region and `failover:retry` when it
///    moves to a peer; a retry that lands back on a recovered local region
///    after a peer failed stays `local`. Kinds that name a constraint (hop,
///    panic, primary, ryw and staleness kinds, `failover:primary-down`) are
///    kept with their detail: they say why that region, which matters more
///    than that it is a retry (the proxy knows that from the attempts).
///
/// # Choices the contract leaves open
///
/// - *Panic on a consistency target.* The primary (with `on_primary_down =
///   fail`) and the token's writer W are used in panic mode rather than
///   refuse the request; the primary with `nearest`, and the local region of
///   a fresh-enough `bounded-staleness` read, only when no candidate serves
///   normally, as for `local-first`.
/// - *Writer down.* A `read-your-writes` read behind its token whose writer W
///   cannot serve goes to the nearest other region that serves
///   (`ryw:writer-down`), never the local replica; the proxy forwards the
///   token and that region's edge-router serves it only once its own replica
///   has caught up.
/// - *Fresh but local down.* A `bounded-staleness` read within the bound whose
///   local region cannot serve goes to the primary (the one region known to
///   be fresh) labelled by its cause, `failover:no-healthy-local` (or
///   `residency`), not `staleness`, so the failover metric counts it. The lag
///   is `now - watermark(primary)` with no margin: the bound is the
///   operator's tolerance and already absorbs skew.
/// - *Nearest finds nothing.* With `on_primary_down = nearest` and no other
///   region able to serve, the kind is local-first's own unavailable kind.
/// - *Which unavailable.* `unavailable:residency` when residency ruled out a
///   region that could have served (normally or in panic), or when only the
///   local region may serve and it is not allowed; otherwise the health kind.
///   A same-region retry confined to the local region that cannot serve is
///   `unavailable:no-healthy-local`.
/// - *Out-of-range indexes.* A missing or out-of-range primary is a primary
///   that cannot serve; a token naming a region outside the view is a writer
///   with an unknown watermark that cannot serve (never served locally);
///   attempts outside the view exclude nothing.
pub fn decide(view: &UpstreamView, lag: &LagView<'_>, req: &RequestFacts<'_>) -> Decision {
    let Some(local) = view.regions.iter().position(|r| r.local) else {
        return Decision::unavailable(Reason::plain(ReasonKind::UnavailableNoHealthyRegion));
    };
    let rules = Rules::new(view, lag, req, local);
    rules.relabel_retry(rules.policy_decision())
}

/// One request's view of the world: the snapshots plus which regions it may use.
struct Rules<'a, 'b> {
    view: &'a UpstreamView,
    lag: &'a LagView<'b>,
    req: &'a RequestFacts<'b>,
    local: usize,
    /// Allowed, reachable (or local), not excluded, in retry scope.
    candidates: RegionSet,
    /// Like `candidates` but ignoring residency, to tell "residency" from "no health" when unavailable.
    unrestricted: RegionSet,
    /// Regions the attempts used up.
    excluded: RegionSet,
    /// Same-region retry: the only region it may use.
    scope: Option<usize>,
}

// === impl Rules ===

impl<'a, 'b> Rules<'a, 'b> {
    fn new(
        view: &'a UpstreamView,
        lag: &'a LagView<'b>,
        req: &'a RequestFacts<'b>,
        local: usize,
    ) -> Self {
        let excluded = excluded_by(req);
        let scope = match (req.retry_scope, req.attempts.last()) {
            (RetryScope::SameRegion, Some(last)) => Some(last.region),
            _ => None,
        };
        let mut unrestricted = RegionSet::empty();
        for (i, r) in view.regions.iter().enumerate() {
            let usable =
                (r.local || r.reachable) && !excluded.contains(i) && scope.is_none_or(|s| s == i);
            if usable {
                unrestricted = unrestricted.with(i);
            }
        }
        let candidates = RegionSet(unrestricted.0 & req.allowed.0);
        Rules {
            view,
            lag,
            req,
            local,
            candidates,
            unrestricted,
            excluded,
            scope,
        }
    }

    /// The decision before retry labels.
    fn policy_decision(&self) -> Decision {
        let req = self.req;
        if req.valid_hop {
            // A peer forwards the client's token with a read-your-writes
            // read, so this replica never answers from behind it.
            if let Some(w) = self.ryw_read_behind() {
                return Decision::unavailable(Reason {
                    kind: ReasonKind::UnavailableRywBehind,
                    detail: Detail::Region(w),
                });
            }
            return self.local_only(ReasonKind::Hop);
        }
        // A same-region retry whose region is used up has nowhere to go. The
        // kind is the one a first decision confined to that region would get.
        if let Some(s) = self.scope {
            if self.excluded.contains(s) {
                return Decision::unavailable(Reason::plain(if s == self.local {
                    ReasonKind::UnavailableNoHealthyLocal
                } else {
                    ReasonKind::UnavailableNoHealthyRegion
                }));
            }
        }
        match req.policy {
            Policy::Local => self.local_only(ReasonKind::Local),
            Policy::LocalFirst => self.local_first(self.candidates),
            Policy::Primary { on_primary_down } => self.primary(on_primary_down),
            Policy::ReadYourWrites {
                writes,
                on_primary_down,
            } => match (req.write, writes) {
                (true, Writes::Local) => self.local_first(self.candidates),
                (true, Writes::Primary) => self.primary(on_primary_down),
                (false, _) => self.read_your_writes(),
            },
            Policy::BoundedStaleness {
                max_staleness,
                on_primary_down,
            } => {
                if req.write {
                    self.primary(on_primary_down)
                } else {
                    self.bounded_staleness(max_staleness, on_primary_down)
                }
            }
        }
    }

    /// `local` policy and hops: the local region or nothing.
    fn local_only(&self, ok: ReasonKind) -> Decision {
        let local = self.local;
        if !self.req.allowed.contains(local) {
            return Decision::unavailable(Reason::plain(ReasonKind::UnavailableResidency));
        }
        if self.candidates.contains(local) {
            let r = &self.view.regions[local];
            if serves(self.view, r) {
                return Decision::region(local, Reason::plain(ok));
            }
            if in_panic(self.view, r) {
                return Decision::panic(local);
            }
        }
        Decision::unavailable(Reason::plain(ReasonKind::UnavailableNoHealthyLocal))
    }

    /// Local if it serves, else the nearest candidate that serves.
    ///
    /// Panic is judged per region (Envoy judges it per priority level): a
    /// region whose healthy share is under the threshold is passed over while
    /// another candidate serves normally, and only when none does is health
    /// ignored, locally first.
    fn local_first(&self, candidates: RegionSet) -> Decision {
        let (view, local) = (self.view, self.local);
        if candidates.contains(local) && serves(view, &view.regions[local]) {
            return Decision::region(local, Reason::plain(ReasonKind::Local));
        }
        let away = if self.req.allowed.contains(local) {
            ReasonKind::FailoverNoHealthyLocal
        } else {
            ReasonKind::Residency
        };
        let peer = |i: usize| i != local && candidates.contains(i);
        if let Some(i) = nearest(view, |i, r| peer(i) && serves(view, r)) {
            return Decision::region(i, Reason::plain(away));
        }
        // No candidate serves normally. If too few backends are healthy,
        // health checks are probably wrong: spread load over everything
        // rather than overload the few that pass (Envoy's panic mode).
        if candidates.contains(local) && in_panic(view, &view.regions[local]) {
            return Decision::panic(local);
        }
        if let Some(i) = nearest(view, |i, r| peer(i) && in_panic(view, r)) {
            return Decision::panic(i);
        }
        Decision::unavailable(Reason::plain(self.unavailable_kind()))
    }

    /// Primary, writes of `bounded-staleness`, writes of `read-your-writes` with `writes = primary`.
    fn primary(&self, on_down: OnPrimaryDown) -> Decision {
        let p = self.primary_index();
        if let Some(p) = p {
            let r = &self.view.regions[p];
            if self.candidates.contains(p) && serves(self.view, r) {
                return Decision::region(p, Reason::plain(ReasonKind::Primary));
            }
            // With `fail` the only alternative is a 503: ignore health in
            // the primary first. With `nearest`, only when nothing else serves.
            let no_alternative = on_down == OnPrimaryDown::Fail || !self.any_serves();
            if self.candidates.contains(p) && in_panic(self.view, r) && no_alternative {
                return Decision::panic(p);
            }
        }
        self.primary_down(p, on_down)
    }

    /// The primary cannot serve (not a candidate, unhealthy, or in panic while another region serves).
    fn primary_down(&self, p: Option<usize>, on_down: OnPrimaryDown) -> Decision {
        match on_down {
            OnPrimaryDown::Fail => {
                Decision::unavailable(Reason::plain(ReasonKind::UnavailablePrimaryDown))
            }
            OnPrimaryDown::Nearest => {
                let others = match p {
                    Some(p) if p < 64 => RegionSet(self.candidates.0 & !(1u64 << p)),
                    _ => self.candidates,
                };
                let down = Reason::plain(ReasonKind::PrimaryDown);
                self.local_first(others)
                    .rename(ReasonKind::Local, down)
                    .rename(ReasonKind::FailoverNoHealthyLocal, down)
                    .rename(ReasonKind::Residency, down)
            }
        }
    }

    /// The token's region W when this is a read-your-writes read whose
    /// token the local replica has not caught up with.
    fn ryw_read_behind(&self) -> Option<usize> {
        // On a hop the token is checked whatever this region's own route
        // says: the sender routed it as read-your-writes (routes may drift).
        let ryw = matches!(self.req.policy, Policy::ReadYourWrites { .. });
        if self.req.write || !(ryw || self.req.valid_hop) {
            return None;
        }
        let token = self.req.token?;
        let w = token.region;
        // u128: t + margin must not wrap into "already visible".
        let satisfied = w == self.local
            || self.lag.watermark(w).is_some_and(|seen| {
                u128::from(seen) >= u128::from(token.written_ms) + u128::from(self.lag.margin_ms)
            });
        (!satisfied).then_some(w)
    }

    /// `read-your-writes` reads: local unless the token is ahead of the local replica.
    ///
    /// Whatever region the read is sent to, the proxy forwards the token with
    /// it, and that region's edge-router serves it only if its own replica
    /// has caught up (`unavailable:ryw-behind` otherwise): so failing over
    /// to a third region is safe, and keeps reads available while the
    /// writer's region is down once replication has caught up elsewhere.
    fn read_your_writes(&self) -> Decision {
        let local = self.local;
        let (view, local_r) = (self.view, &self.view.regions[local]);
        let Some(w) = self.ryw_read_behind() else {
            let Some(w) = self.req.token.map(|t| t.region) else {
                return self.local_first(self.candidates);
            };
            let local_serves = self.candidates.contains(local) && serves(view, local_r);
            let writer_serves = w != local
                && self.candidates.contains(w)
                && view.regions.get(w).is_some_and(|r| serves(view, r));
            if !local_serves && writer_serves {
                // W has the write for certain; any other region only maybe.
                let away = if self.req.allowed.contains(local) {
                    ReasonKind::FailoverNoHealthyLocal
                } else {
                    ReasonKind::Residency
                };
                return Decision::region(w, Reason::plain(away));
            }
            let reach = if self.req.peers_check_tokens {
                self.candidates
            } else {
                RegionSet(self.candidates.0 & RegionSet::empty().with(local).with(w).0)
            };
            let decision = self.local_first(reach);
            if w == local {
                return decision;
            }
            let caught_up = Reason {
                kind: ReasonKind::RywCaughtUp,
                detail: Detail::Region(w),
            };
            return decision.rename(ReasonKind::Local, caught_up);
        };
        // The local replica may be behind the write: W has it for certain.
        if self.candidates.contains(w) {
            if let Some(r) = self.view.regions.get(w) {
                if serves(self.view, r) {
                    return Decision::region(
                        w,
                        Reason {
                            kind: ReasonKind::RywLagging,
                            detail: Detail::Region(w),
                        },
                    );
                }
            }
        }
        // W in panic still has the write, where any other region is
        // probably behind it: ignore health in W before going elsewhere.
        if let Some(r) = self.view.regions.get(w) {
            if self.candidates.contains(w) && in_panic(self.view, r) {
                return Decision::panic(w);
            }
        }
        // W cannot serve: another region may have caught up (it checks the
        // forwarded token itself); never the local replica, which is behind.
        let others = if self.req.peers_check_tokens {
            RegionSet(self.candidates.0 & !RegionSet::empty().with(local).0)
        } else {
            RegionSet::empty()
        };
        let writer_down = Reason {
            kind: ReasonKind::RywWriterDown,
            detail: Detail::Region(w),
        };
        if let Some(i) = nearest(self.view, |i, r| others.contains(i) && serves(self.view, r)) {
            return Decision::region(i, writer_down);
        }
        if let Some(i) = nearest(self.view, |i, r| {
            others.contains(i) && in_panic(self.view, r)
        }) {
            return Decision::panic(i);
        }
        Decision::unavailable(Reason {
            kind: ReasonKind::UnavailableRywWriterDown,
            detail: Detail::Region(w),
        })
    }

    /// `bounded-staleness` reads: local while lag(primary → local) is within `max`, else primary.
    ///
    /// The lag is `now_ms - watermark(primary)` without the token margin: the
    /// bound is the operator's own tolerance and already absorbs skew.
    fn bounded_staleness(&self, max: Duration, on_down: OnPrimaryDown) -> Decision {
        let (view, local) = (self.view, self.local);
        let p = self.primary_index();
        if p == Some(local) {
            // The local replica is the primary's own: no lag to measure.
            return self.primary(on_down);
        }
        // A watermark ahead of our clock is skew, not negative lag.
        let lag_ms = p
            .and_then(|p| self.lag.watermark(p))
            .map(|seen| self.lag.now_ms.saturating_sub(seen));
        let fresh = lag_ms.is_some_and(|l| Duration::from_millis(l) <= max);
        let detail = lag_ms.map_or(Detail::LagUnknown, Detail::LagMs);
        let local_r = &view.regions[local];
        if fresh && self.candidates.contains(local) && serves(view, local_r) {
            let ok = Reason {
                kind: ReasonKind::StalenessOk,
                detail,
            };
            return Decision::region(local, ok);
        }
        if let Some(p) = p {
            let r = &view.regions[p];
            if self.candidates.contains(p) && serves(view, r) {
                // Fresh enough but the local region cannot serve: the primary
                // is the one region known to be fresh, and the reason is health
                // (or residency), which is what the failover metric counts.
                let reason = if !fresh {
                    Reason {
                        kind: ReasonKind::StalenessExceeded,
                        detail,
                    }
                } else if self.req.allowed.contains(local) {
                    Reason::plain(ReasonKind::FailoverNoHealthyLocal)
                } else {
                    Reason::plain(ReasonKind::Residency)
                };
                return Decision::region(p, reason);
            }
        }
        let nothing_serves = !self.any_serves();
        if nothing_serves && fresh && self.candidates.contains(local) && in_panic(view, local_r) {
            return Decision::panic(local);
        }
        // As for `primary`: with `fail` the alternative is a 503, so the
        // primary in panic is used even while another region serves.
        if let Some(p) = p {
            let no_alternative = nothing_serves || on_down == OnPrimaryDown::Fail;
            if no_alternative && self.candidates.contains(p) && in_panic(view, &view.regions[p]) {
                return Decision::panic(p);
            }
        }
        self.primary_down(p, on_down)
    }

    /// Retry labels (see the module docs): health kinds become retry kinds.
    fn relabel_retry(&self, d: Decision) -> Decision {
        let (Some(last), Target::Region { index, .. }) = (self.req.attempts.last(), d.target)
        else {
            return d;
        };
        let health = matches!(
            d.reason.kind,
            ReasonKind::Local | ReasonKind::FailoverNoHealthyLocal | ReasonKind::Residency
        );
        if !health {
            return d;
        }
        let kind = if index == last.region {
            ReasonKind::RetrySameRegion
        } else if index != self.local {
            ReasonKind::FailoverRetry
        } else {
            // Back to the local region after a peer failed: plain local.
            return d;
        };
        Decision {
            reason: Reason::plain(kind),
            ..d
        }
    }

    /// The primary's index, if the view has a valid one.
    fn primary_index(&self) -> Option<usize> {
        self.view.primary.filter(|&p| p < self.view.regions.len())
    }

    /// Some candidate serves normally.
    fn any_serves(&self) -> bool {
        self.view
            .regions
            .iter()
            .enumerate()
            .any(|(i, r)| self.candidates.contains(i) && serves(self.view, r))
    }

    /// Nothing can serve: blame residency when it ruled out a region that could
    /// have (normally or in panic), else health.
    fn unavailable_kind(&self) -> ReasonKind {
        let ruled_out = self.view.regions.iter().enumerate().any(|(i, r)| {
            self.unrestricted.contains(i)
                && !self.req.allowed.contains(i)
                && (serves(self.view, r) || in_panic(self.view, r))
        });
        if ruled_out {
            ReasonKind::UnavailableResidency
        } else if self.scope == Some(self.local) {
            // A same-region retry confined to the local region: say so.
            ReasonKind::UnavailableNoHealthyLocal
        } else {
            ReasonKind::UnavailableNoHealthyRegion
        }
    }
}

/// Regions the attempts rule out: two failures, or one that used the region up
/// (a peer region's edge-router failed, or no backend was left to try).
fn excluded_by(req: &RequestFacts<'_>) -> RegionSet {
    let (mut once, mut excluded) = (RegionSet::empty(), RegionSet::empty());
    for a in req.attempts {
        let used_up = a.backend.is_none() || a.failure == AttemptFailure::NoBackend;
        if used_up || once.contains(a.region) {
            excluded = excluded.with(a.region);
        }
        once = once.with(a.region);
    }
    excluded
}

/// A region serves normally: some backend is healthy and it is not in panic.
fn serves(view: &UpstreamView, r: &RegionView) -> bool {
    r.healthy > 0 && !in_panic(view, r)
}

/// True when the region's healthy share is below the panic threshold.
fn in_panic(view: &UpstreamView, r: &RegionView) -> bool {
    view.panic_threshold_percent > 0
        && r.total > 0
        && u64::from(r.healthy) * 100 < u64::from(view.panic_threshold_percent) * u64::from(r.total)
}

/// The nearest region among those `eligible` accepts: lowest RTT, where RTTs
/// closer than the tolerance tie and the configured order decides.
pub fn nearest(
    view: &UpstreamView,
    eligible: impl Fn(usize, &RegionView) -> bool,
) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..view.regions.len())
        .filter(|&i| eligible(i, &view.regions[i]))
        .collect();
    candidates.sort_by(|&a, &b| {
        let (ra, rb) = (&view.regions[a], &view.regions[b]);
        (ra.order, &ra.name).cmp(&(rb.order, &rb.name))
    });
    let mut best = *candidates.first()?;
    for &c in &candidates[1..] {
        if let (Some(c_rtt), Some(b_rtt)) = (view.regions[c].rtt, view.regions[best].rtt) {
            if c_rtt + view.rtt_tolerance < b_rtt {
                best = c;
            }
        }
    }
    Some(best)
}

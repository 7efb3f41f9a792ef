//! Why a decision was made: a bounded kind for metric labels plus a detail
//! (a region, a lag) that only the log line and the debug header show, so
//! metric cardinality never depends on region names or lag values.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use crate::view::UpstreamView;

/// Bounded label: the metric label and the start of the log/x-edge-decision text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    /// Local backends are healthy.
    Local,
    /// A valid hop from a peer: served locally, never forwarded again.
    Hop,
    /// No region serves normally and this one has too few healthy backends: health ignored there.
    Panic,
    /// No healthy local backend: the nearest healthy region serves.
    FailoverNoHealthyLocal,
    /// An earlier attempt failed and the retry moves to another region.
    FailoverRetry,
    /// An earlier attempt failed and the retry stays in its region (another backend).
    RetrySameRegion,
    /// The request may only be served locally (`local` policy, a hop, a same-region retry) and cannot be.
    UnavailableNoHealthyLocal,
    /// No region the request may use has a healthy backend.
    UnavailableNoHealthyRegion,
    /// The primary region serves (it may be local).
    Primary,
    /// The primary cannot serve and `on_primary_down = "nearest"`: local-first over the others.
    PrimaryDown,
    /// The primary cannot serve and `on_primary_down = "fail"`.
    UnavailablePrimaryDown,
    /// The token is from another region and the local replica has its write; detail `Region(W)`.
    RywCaughtUp,
    /// The local replica is behind the token: sent to the token's region W; detail `Region(W)`.
    RywLagging,
    /// The local replica is behind the token and W cannot serve: the nearest
    /// other region serves if its own replica has caught up; detail `Region(W)`.
    RywWriterDown,
    /// The local replica is behind the token and no region can serve; detail `Region(W)`.
    UnavailableRywWriterDown,
    /// A forwarded read-your-writes read whose token this replica has not
    /// caught up with: refused rather than answered stale; detail `Region(W)`.
    UnavailableRywBehind,
    /// Served locally, replication lag within the bound; detail `LagMs`.
    StalenessOk,
    /// Lag over the bound (or unknown): sent to the primary; detail `LagMs` or `LagUnknown`.
    StalenessExceeded,
    /// The local region is not allowed for this route: the nearest allowed region serves.
    Residency,
    /// No allowed region can serve: only local may serve and it is not allowed,
    /// or a region that could serve is ruled out by residency.
    UnavailableResidency,
}

impl ReasonKind {
    /// Every kind, for priming metrics.
    pub const ALL: [ReasonKind; 20] = [
        ReasonKind::Local,
        ReasonKind::Hop,
        ReasonKind::Panic,
        ReasonKind::FailoverNoHealthyLocal,
        ReasonKind::FailoverRetry,
        ReasonKind::RetrySameRegion,
        ReasonKind::UnavailableNoHealthyLocal,
        ReasonKind::UnavailableNoHealthyRegion,
        ReasonKind::Primary,
        ReasonKind::PrimaryDown,
        ReasonKind::UnavailablePrimaryDown,
        ReasonKind::RywCaughtUp,
        ReasonKind::RywLagging,
        ReasonKind::RywWriterDown,
        ReasonKind::UnavailableRywWriterDown,
        ReasonKind::UnavailableRywBehind,
        ReasonKind::StalenessOk,
        ReasonKind::StalenessExceeded,
        ReasonKind::Residency,
        ReasonKind::UnavailableResidency,
    ];

    /// The label as it appears in metrics, logs and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonKind::Local => "local",
            ReasonKind::Hop => "hop:local",
            ReasonKind::Panic => "panic",
            ReasonKind::FailoverNoHealthyLocal => "failover:no-healthy-local",
            ReasonKind::FailoverRetry => "failover:retry",
            ReasonKind::RetrySameRegion => "retry:same-region",
            ReasonKind::UnavailableNoHealthyLocal => "unavailable:no-healthy-local",
            ReasonKind::UnavailableNoHealthyRegion => "unavailable:no-healthy-region",
            ReasonKind::Primary => "primary",
            ReasonKind::PrimaryDown => "failover:primary-down",
            ReasonKind::UnavailablePrimaryDown => "unavailable:primary-down",
            ReasonKind::RywCaughtUp => "ryw:caught-up",
            ReasonKind::RywLagging => "ryw:lagging",
            ReasonKind::RywWriterDown => "ryw:writer-down",
            ReasonKind::UnavailableRywWriterDown => "unavailable:ryw-writer-down",
            ReasonKind::UnavailableRywBehind => "unavailable:ryw-behind",
            ReasonKind::StalenessOk => "staleness:ok",
            ReasonKind::StalenessExceeded => "staleness",
            ReasonKind::Residency => "residency",
            ReasonKind::UnavailableResidency => "unavailable:residency",
        }
    }
}

impl fmt::Display for ReasonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the log line adds to the kind; never a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detail {
    /// Nothing to add.
    None,
    /// A region index into `UpstreamView::regions` (the token's writer).
    Region(usize),
    /// Replication lag from the primary to the local replica, in milliseconds.
    LagMs(u64),
    /// Replication lag unknown (no heartbeat seen): treated as over any bound.
    LagUnknown,
}

/// Why the decision was made: a bounded kind and its detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason {
    /// The bounded label.
    pub kind: ReasonKind,
    /// Extra context for logs and debug headers.
    pub detail: Detail,
}

impl Reason {
    /// A reason with no detail.
    pub(crate) const fn plain(kind: ReasonKind) -> Reason {
        Reason {
            kind,
            detail: Detail::None,
        }
    }

    /// True when the request left the local region because of health (failover metric).
    pub fn is_failover(self) -> bool {
        matches!(
            self.kind,
            ReasonKind::FailoverNoHealthyLocal
                | ReasonKind::FailoverRetry
                | ReasonKind::PrimaryDown
        )
    }

    /// Log/header text: kind label, then `:<region name>` for Region, `:lag=2.4s` for LagMs
    /// (seconds, one decimal), `:lag=unknown` for LagUnknown. E.g. `ryw:lagging:eu-west-1`,
    /// `staleness:lag=2.4s`. Allocates only when there is a detail: the
    /// common reasons are the static label itself.
    ///
    /// The lag is rounded to the nearest tenth, halves up (2450 ms is "2.5s").
    /// A region index outside `view` is written as `#<index>` so the line
    /// still says which one it was.
    pub fn describe(self, view: &UpstreamView) -> Cow<'static, str> {
        if self.detail == Detail::None {
            return Cow::Borrowed(self.kind.as_str());
        }
        let mut s = String::from(self.kind.as_str());
        // Writing into a String cannot fail, so the fmt::Results are ignored.
        match self.detail {
            Detail::None => {}
            Detail::Region(i) => match view.regions.get(i) {
                Some(r) => {
                    s.push(':');
                    s.push_str(&r.name);
                }
                None => {
                    let _ = write!(s, ":#{i}");
                }
            },
            Detail::LagMs(ms) => {
                let tenths = ms / 100 + u64::from(ms % 100 >= 50);
                let _ = write!(s, ":lag={}.{}s", tenths / 10, tenths % 10);
            }
            Detail::LagUnknown => s.push_str(":lag=unknown"),
        }
        Cow::Owned(s)
    }
}

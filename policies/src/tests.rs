//! Every rule of `decide` as a named row, plus the invariants of docs/policies.md as properties.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;
use std::time::Duration;

/// The request's arrival time in every row (Unix ms).
const NOW: u64 = 1_700_000_000_000;
/// Clock-skew margin in every row.
const MARGIN: u64 = 500;

const PRIMARY_FAIL: Policy = Policy::Primary {
    on_primary_down: OnPrimaryDown::Fail,
};
const PRIMARY_NEAREST: Policy = Policy::Primary {
    on_primary_down: OnPrimaryDown::Nearest,
};
const RYW: Policy = Policy::ReadYourWrites {
    writes: Writes::Local,
    on_primary_down: OnPrimaryDown::Fail,
};
const RYW_PRIMARY_WRITES: Policy = Policy::ReadYourWrites {
    writes: Writes::Primary,
    on_primary_down: OnPrimaryDown::Nearest,
};
const STALE_FAIL: Policy = Policy::BoundedStaleness {
    max_staleness: Duration::from_secs(2),
    on_primary_down: OnPrimaryDown::Fail,
};
const STALE_NEAREST: Policy = Policy::BoundedStaleness {
    max_staleness: Duration::from_secs(2),
    on_primary_down: OnPrimaryDown::Nearest,
};

/// A write served by B a second ago: the local replica has it once B's watermark reaches NOW - 500.
const TOKEN_B: Token = Token {
    region: 1,
    written_ms: NOW - 1000,
};
const TOKEN_C: Token = Token {
    region: 2,
    written_ms: NOW - 1000,
};

/// One local backend failed: local is not used up yet.
const LOCAL_B0: Attempt = Attempt {
    region: 0,
    backend: Some(0),
    failure: AttemptFailure::Connect,
};
/// A second local backend failed: two failures use local up.
const LOCAL_B1: Attempt = Attempt {
    region: 0,
    backend: Some(1),
    failure: AttemptFailure::Reset,
};
/// The proxy found no untried local backend.
const LOCAL_NONE: Attempt = Attempt {
    region: 0,
    backend: None,
    failure: AttemptFailure::NoBackend,
};
/// B's edge-router failed.
const PEER_B: Attempt = Attempt {
    region: 1,
    backend: None,
    failure: AttemptFailure::Timeout,
};
/// C's edge-router failed.
const PEER_C: Attempt = Attempt {
    region: 2,
    backend: None,
    failure: AttemptFailure::Connect,
};

fn region(name: &str, local: bool, healthy: u32, total: u32) -> RegionView {
    RegionView {
        name: name.to_string(),
        local,
        healthy,
        total,
        reachable: true,
        rtt: None,
        order: 0,
    }
}

/// Three regions: A (local), B (order 1), C (order 2), two backends each, no primary.
fn three(a: u32, b: u32, c: u32) -> UpstreamView {
    let mut bv = region("b", false, b, 2);
    bv.order = 1;
    let mut cv = region("c", false, c, 2);
    cv.order = 2;
    UpstreamView {
        regions: vec![region("a", true, a, 2), bv, cv],
        panic_threshold_percent: 0,
        rtt_tolerance: Duration::from_millis(5),
        primary: None,
    }
}

/// `three` with region `p` as the upstream's primary.
fn primaried(mut view: UpstreamView, p: usize) -> UpstreamView {
    view.primary = Some(p);
    view
}

/// A first read with no hop, no token, no residency limit.
fn facts(policy: Policy) -> RequestFacts<'static> {
    RequestFacts {
        policy,
        write: false,
        valid_hop: false,
        token: None,
        allowed: RegionSet::ALL,
        attempts: &[],
        retry_scope: RetryScope::Anywhere,
        peers_check_tokens: true,
    }
}

fn write(policy: Policy) -> RequestFacts<'static> {
    RequestFacts {
        write: true,
        ..facts(policy)
    }
}

fn allowed(regions: &[usize]) -> RegionSet {
    regions.iter().fold(RegionSet::empty(), |s, &i| s.with(i))
}

/// The local replica's watermarks for A, B, C.
struct Repl {
    watermarks: Vec<Option<u64>>,
}

impl Repl {
    /// Every region's writes visible up to now.
    fn caught_up() -> Repl {
        Repl {
            watermarks: vec![Some(NOW); 3],
        }
    }

    fn seen(mut self, region: usize, watermark: Option<u64>) -> Repl {
        self.watermarks[region] = watermark;
        self
    }

    fn view(&self) -> LagView<'_> {
        LagView {
            watermarks_ms: &self.watermarks,
            now_ms: NOW,
            margin_ms: MARGIN,
        }
    }
}

fn to(index: usize, kind: ReasonKind) -> Decision {
    to_d(index, kind, Detail::None)
}

fn to_d(index: usize, kind: ReasonKind, detail: Detail) -> Decision {
    Decision {
        target: Target::Region {
            index,
            panic: false,
        },
        reason: Reason { kind, detail },
    }
}

fn panic_at(index: usize) -> Decision {
    Decision {
        target: Target::Region { index, panic: true },
        reason: Reason {
            kind: ReasonKind::Panic,
            detail: Detail::None,
        },
    }
}

fn unavailable(kind: ReasonKind) -> Decision {
    unavailable_d(kind, Detail::None)
}

fn unavailable_d(kind: ReasonKind, detail: Detail) -> Decision {
    Decision {
        target: Target::Unavailable,
        reason: Reason { kind, detail },
    }
}

struct Row {
    name: &'static str,
    view: UpstreamView,
    repl: Repl,
    req: RequestFacts<'static>,
    want: Decision,
    /// `Reason::describe` of the decision: the log line and `x-edge-decision`.
    text: &'static str,
}

impl Row {
    /// A row with every watermark caught up.
    fn new(
        name: &'static str,
        view: UpstreamView,
        req: RequestFacts<'static>,
        want: Decision,
        text: &'static str,
    ) -> Row {
        Row {
            name,
            view,
            repl: Repl::caught_up(),
            req,
            want,
            text,
        }
    }

    fn repl(self, repl: Repl) -> Row {
        Row { repl, ..self }
    }
}

/// Rows from before issue 7: local and local-first, health, RTT, panic, hops, retries.
fn health_rows() -> Vec<Row> {
    use ReasonKind::*;
    let mut rtt_view = three(0, 2, 2);
    rtt_view.regions[1].rtt = Some(Duration::from_millis(90));
    rtt_view.regions[2].rtt = Some(Duration::from_millis(40));
    let mut rtt_tie = three(0, 2, 2);
    rtt_tie.regions[1].rtt = Some(Duration::from_millis(3));
    rtt_tie.regions[2].rtt = Some(Duration::from_millis(1));
    let mut unreachable_b = three(0, 2, 2);
    unreachable_b.regions[1].reachable = false;
    let mut panic_view = three(0, 0, 0);
    panic_view.panic_threshold_percent = 50;
    let mut healthy_region_before_panic = three(0, 0, 1);
    healthy_region_before_panic.panic_threshold_percent = 50;
    // Local 1 of 4 healthy (25 % < 50 %): the region is in panic; a peer serves normally.
    let mut local_in_panic_peer_healthy = three(1, 2, 2);
    local_in_panic_peer_healthy.regions[0].total = 4;
    local_in_panic_peer_healthy.panic_threshold_percent = 50;
    let mut panic_off_when_healthy = three(1, 2, 2);
    panic_off_when_healthy.panic_threshold_percent = 50;
    let mut local_panic = three(0, 2, 2);
    local_panic.panic_threshold_percent = 50;
    let mut no_local_backends = three(0, 2, 2);
    no_local_backends.regions[0].total = 0;
    let lf = Policy::LocalFirst;

    vec![
        Row::new(
            "local_first_healthy_local_stays_local",
            three(2, 2, 2),
            facts(lf),
            to(0, Local),
            "local",
        ),
        Row::new(
            "local_first_one_healthy_local_is_enough",
            three(1, 2, 2),
            facts(lf),
            to(0, Local),
            "local",
        ),
        Row::new(
            "local_first_no_healthy_local_goes_to_lowest_order_before_rtt",
            three(0, 2, 2),
            facts(lf),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "local_first_measured_rtt_beats_order",
            rtt_view,
            facts(lf),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "local_first_rtt_within_tolerance_is_a_tie_and_order_decides",
            rtt_tie,
            facts(lf),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "local_first_skips_region_without_healthy_backends",
            three(0, 0, 2),
            facts(lf),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "local_first_skips_unreachable_peer",
            unreachable_b,
            facts(lf),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "local_first_nothing_healthy_is_unavailable",
            three(0, 0, 0),
            facts(lf),
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "local_first_upstream_without_local_backends_uses_nearest",
            no_local_backends,
            facts(lf),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        // Two failed local backends use the local region up.
        Row::new(
            "retry_after_local_failure_goes_to_next_region",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0, LOCAL_B1],
                ..facts(lf)
            },
            to(1, FailoverRetry),
            "failover:retry",
        ),
        Row::new(
            "retry_after_two_regions_failed_goes_to_third",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0, LOCAL_B1, PEER_B],
                ..facts(lf)
            },
            to(2, FailoverRetry),
            "failover:retry",
        ),
        Row::new(
            "retry_with_every_region_tried_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0, LOCAL_B1, PEER_B, PEER_C],
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "local_policy_healthy_local_serves",
            three(2, 2, 2),
            facts(Policy::Local),
            to(0, Local),
            "local",
        ),
        Row::new(
            "local_policy_never_fails_over",
            three(0, 2, 2),
            facts(Policy::Local),
            unavailable(UnavailableNoHealthyLocal),
            "unavailable:no-healthy-local",
        ),
        Row::new(
            "valid_hop_is_served_locally",
            three(2, 2, 2),
            RequestFacts {
                valid_hop: true,
                ..facts(lf)
            },
            to(0, Hop),
            "hop:local",
        ),
        Row::new(
            "valid_hop_with_no_healthy_local_is_unavailable_not_forwarded",
            three(0, 2, 2),
            RequestFacts {
                valid_hop: true,
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyLocal),
            "unavailable:no-healthy-local",
        ),
        Row::new(
            "panic_below_threshold_ignores_health_locally",
            panic_view,
            facts(lf),
            panic_at(0),
            "panic",
        ),
        Row::new(
            "a_region_serving_normally_is_chosen_before_any_panic",
            healthy_region_before_panic,
            facts(lf),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "panic_is_per_region_so_local_first_fails_over_first",
            local_in_panic_peer_healthy,
            facts(lf),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "panic_not_entered_above_threshold",
            panic_off_when_healthy,
            facts(lf),
            to(0, Local),
            "local",
        ),
        Row::new(
            "local_policy_panics_on_its_own_region_share",
            local_panic,
            facts(Policy::Local),
            panic_at(0),
            "panic",
        ),
    ]
}

/// Retries: which attempts use a region up, and how far a retry may go.
fn retry_rows() -> Vec<Row> {
    use ReasonKind::*;
    let lf = Policy::LocalFirst;
    vec![
        Row::new(
            "retry_after_one_failed_local_backend_stays_local_on_another_backend",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                ..facts(lf)
            },
            to(0, RetrySameRegion),
            "retry:same-region",
        ),
        Row::new(
            "retry_after_no_backend_left_locally_moves_on",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_NONE],
                ..facts(lf)
            },
            to(1, FailoverRetry),
            "failover:retry",
        ),
        // NoBackend means the region has nothing left, whatever backend index came with it.
        Row::new(
            "no_backend_failure_uses_the_region_up_even_with_a_backend_index",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[Attempt {
                    region: 0,
                    backend: Some(1),
                    failure: AttemptFailure::NoBackend,
                }],
                ..facts(lf)
            },
            to(1, FailoverRetry),
            "failover:retry",
        ),
        Row::new(
            "retry_back_to_a_recovered_local_after_a_peer_failed_is_plain_local",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[PEER_B],
                ..facts(lf)
            },
            to(0, Local),
            "local",
        ),
        Row::new(
            "retry_anywhere_leaves_a_local_region_that_went_unhealthy",
            three(0, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                ..facts(lf)
            },
            to(1, FailoverRetry),
            "failover:retry",
        ),
        Row::new(
            "same_region_retry_never_leaves_the_region",
            three(0, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                retry_scope: RetryScope::SameRegion,
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyLocal),
            "unavailable:no-healthy-local",
        ),
        Row::new(
            "same_region_retry_with_local_used_up_is_unavailable_no_healthy_local",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0, LOCAL_B1],
                retry_scope: RetryScope::SameRegion,
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyLocal),
            "unavailable:no-healthy-local",
        ),
        Row::new(
            "same_region_retry_with_peer_used_up_is_unavailable_no_healthy_region",
            three(0, 2, 2),
            RequestFacts {
                attempts: &[PEER_B],
                retry_scope: RetryScope::SameRegion,
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "same_region_retry_on_a_local_backend_stays_local",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                retry_scope: RetryScope::SameRegion,
                ..facts(lf)
            },
            to(0, RetrySameRegion),
            "retry:same-region",
        ),
        Row::new(
            "local_policy_retry_on_another_local_backend",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                ..facts(Policy::Local)
            },
            to(0, RetrySameRegion),
            "retry:same-region",
        ),
        Row::new(
            "local_policy_retry_with_local_used_up_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0, LOCAL_B1],
                ..facts(Policy::Local)
            },
            unavailable(UnavailableNoHealthyLocal),
            "unavailable:no-healthy-local",
        ),
        Row::new(
            "hop_retry_keeps_the_hop_kind",
            three(2, 2, 2),
            RequestFacts {
                valid_hop: true,
                attempts: &[LOCAL_B0],
                ..facts(lf)
            },
            to(0, Hop),
            "hop:local",
        ),
    ]
}

/// Data residency: no target outside `allowed`, and the labels that say so.
fn residency_rows() -> Vec<Row> {
    use ReasonKind::*;
    let lf = Policy::LocalFirst;
    let mut all_in_panic = three(0, 0, 0);
    all_in_panic.panic_threshold_percent = 50;
    vec![
        Row::new(
            "residency_local_not_allowed_goes_to_nearest_allowed",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[1, 2]),
                ..facts(lf)
            },
            to(1, Residency),
            "residency",
        ),
        Row::new(
            "residency_failover_skips_a_healthy_region_not_allowed",
            three(0, 2, 2),
            RequestFacts {
                allowed: allowed(&[0, 2]),
                ..facts(lf)
            },
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "residency_is_blamed_when_only_a_region_not_allowed_could_serve",
            three(0, 2, 0),
            RequestFacts {
                allowed: allowed(&[0, 2]),
                ..facts(lf)
            },
            unavailable(UnavailableResidency),
            "unavailable:residency",
        ),
        Row::new(
            "residency_is_not_blamed_when_nothing_could_serve_anyway",
            three(0, 0, 0),
            RequestFacts {
                allowed: allowed(&[0]),
                ..facts(lf)
            },
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "residency_local_policy_with_local_not_allowed_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[1, 2]),
                ..facts(Policy::Local)
            },
            unavailable(UnavailableResidency),
            "unavailable:residency",
        ),
        Row::new(
            "residency_hop_where_local_is_not_allowed_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                valid_hop: true,
                allowed: allowed(&[1]),
                ..facts(lf)
            },
            unavailable(UnavailableResidency),
            "unavailable:residency",
        ),
        Row::new(
            "residency_panic_stays_within_allowed",
            all_in_panic,
            RequestFacts {
                allowed: allowed(&[2]),
                ..facts(lf)
            },
            panic_at(2),
            "panic",
        ),
        Row::new(
            "residency_retry_moves_to_the_next_allowed_region",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[1, 2]),
                attempts: &[PEER_B],
                ..facts(lf)
            },
            to(2, FailoverRetry),
            "failover:retry",
        ),
        Row::new(
            "residency_empty_set_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                allowed: RegionSet::empty(),
                ..facts(lf)
            },
            unavailable(UnavailableResidency),
            "unavailable:residency",
        ),
    ]
}

/// `primary`, and the primary rule that writes of the other policies share.
fn primary_rows() -> Vec<Row> {
    use ReasonKind::*;
    let mut b_unreachable = primaried(three(2, 2, 2), 1);
    b_unreachable.regions[1].reachable = false;
    let mut all_in_panic = primaried(three(0, 0, 0), 1);
    all_in_panic.panic_threshold_percent = 50;
    let mut primary_in_panic_others_serve = primaried(three(2, 0, 2), 1);
    primary_in_panic_others_serve.panic_threshold_percent = 50;
    vec![
        Row::new(
            "primary_reads_go_to_the_primary",
            primaried(three(2, 2, 2), 1),
            facts(PRIMARY_FAIL),
            to(1, Primary),
            "primary",
        ),
        Row::new(
            "primary_writes_go_to_the_primary",
            primaried(three(2, 2, 2), 1),
            write(PRIMARY_FAIL),
            to(1, Primary),
            "primary",
        ),
        Row::new(
            "primary_that_is_local_serves_locally",
            primaried(three(2, 2, 2), 0),
            facts(PRIMARY_FAIL),
            to(0, Primary),
            "primary",
        ),
        Row::new(
            "primary_down_with_fail_is_unavailable",
            primaried(three(2, 0, 2), 1),
            facts(PRIMARY_FAIL),
            unavailable(UnavailablePrimaryDown),
            "unavailable:primary-down",
        ),
        Row::new(
            "primary_down_with_nearest_serves_locally",
            primaried(three(2, 0, 2), 1),
            facts(PRIMARY_NEAREST),
            to(0, PrimaryDown),
            "failover:primary-down",
        ),
        Row::new(
            "primary_down_with_nearest_and_local_down_goes_to_nearest_other",
            primaried(three(0, 0, 2), 1),
            facts(PRIMARY_NEAREST),
            to(2, PrimaryDown),
            "failover:primary-down",
        ),
        Row::new(
            "primary_down_with_nearest_and_nothing_healthy_is_unavailable",
            primaried(three(0, 0, 0), 1),
            facts(PRIMARY_NEAREST),
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "primary_unreachable_counts_as_down",
            b_unreachable,
            facts(PRIMARY_FAIL),
            unavailable(UnavailablePrimaryDown),
            "unavailable:primary-down",
        ),
        Row::new(
            "primary_not_allowed_counts_as_down",
            primaried(three(2, 2, 2), 1),
            RequestFacts {
                allowed: allowed(&[0, 2]),
                ..facts(PRIMARY_NEAREST)
            },
            to(0, PrimaryDown),
            "failover:primary-down",
        ),
        Row::new(
            "primary_used_up_by_attempts_with_fail_is_unavailable",
            primaried(three(2, 2, 2), 1),
            RequestFacts {
                attempts: &[PEER_B],
                ..facts(PRIMARY_FAIL)
            },
            unavailable(UnavailablePrimaryDown),
            "unavailable:primary-down",
        ),
        Row::new(
            "primary_used_up_by_attempts_with_nearest_keeps_the_primary_down_kind",
            primaried(three(2, 2, 2), 1),
            RequestFacts {
                attempts: &[PEER_B],
                ..facts(PRIMARY_NEAREST)
            },
            to(0, PrimaryDown),
            "failover:primary-down",
        ),
        Row::new(
            "primary_retry_on_another_backend_keeps_the_primary_kind",
            primaried(three(2, 2, 2), 0),
            RequestFacts {
                attempts: &[LOCAL_B0],
                retry_scope: RetryScope::SameRegion,
                ..facts(PRIMARY_FAIL)
            },
            to(0, Primary),
            "primary",
        ),
        Row::new(
            "primary_in_panic_when_nothing_serves_panics_on_the_primary",
            all_in_panic,
            facts(PRIMARY_NEAREST),
            panic_at(1),
            "panic",
        ),
        Row::new(
            // With `fail` the alternative is a 503: ignore health in the primary instead.
            "primary_in_panic_with_fail_ignores_health_there_rather_than_refuse",
            primary_in_panic_others_serve,
            facts(PRIMARY_FAIL),
            panic_at(1),
            "panic",
        ),
        Row::new(
            "primary_missing_from_the_view_is_down",
            three(2, 2, 2),
            facts(PRIMARY_FAIL),
            unavailable(UnavailablePrimaryDown),
            "unavailable:primary-down",
        ),
        Row::new(
            "primary_hop_is_served_where_it_arrived",
            primaried(three(2, 2, 2), 1),
            RequestFacts {
                valid_hop: true,
                ..facts(PRIMARY_FAIL)
            },
            to(0, Hop),
            "hop:local",
        ),
    ]
}

/// `read-your-writes`: tokens against the local replica's watermarks.
fn ryw_rows() -> Vec<Row> {
    use ReasonKind::*;
    let mut b_unreachable = three(2, 2, 2);
    b_unreachable.regions[1].reachable = false;
    let mut all_in_panic = three(0, 0, 0);
    all_in_panic.panic_threshold_percent = 50;
    let lagging_b = || Repl::caught_up().seen(1, Some(NOW - MARGIN - 1));
    let with_token = |token| RequestFacts {
        token: Some(token),
        ..facts(RYW)
    };
    vec![
        Row::new(
            "ryw_read_without_token_is_local",
            three(2, 2, 2),
            facts(RYW),
            to(0, Local),
            "local",
        ),
        Row::new(
            "ryw_token_from_the_local_region_is_local_whatever_the_watermark",
            three(2, 2, 2),
            with_token(Token {
                region: 0,
                written_ms: NOW,
            }),
            to(0, Local),
            "local",
        )
        .repl(Repl::caught_up().seen(0, None)),
        Row::new(
            "ryw_caught_up_at_exactly_write_time_plus_margin_is_served_locally",
            three(2, 2, 2),
            with_token(TOKEN_B),
            to_d(0, RywCaughtUp, Detail::Region(1)),
            "ryw:caught-up:b",
        )
        .repl(Repl::caught_up().seen(1, Some(NOW - MARGIN))),
        Row::new(
            "ryw_lagging_reader_goes_to_writer",
            three(2, 2, 2),
            with_token(TOKEN_B),
            to_d(1, RywLagging, Detail::Region(1)),
            "ryw:lagging:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_watermark_at_write_time_is_not_enough_without_the_margin",
            three(2, 2, 2),
            with_token(TOKEN_B),
            to_d(1, RywLagging, Detail::Region(1)),
            "ryw:lagging:b",
        )
        .repl(Repl::caught_up().seen(1, Some(TOKEN_B.written_ms))),
        Row::new(
            "ryw_unknown_watermark_is_lagging",
            three(2, 2, 2),
            with_token(TOKEN_B),
            to_d(1, RywLagging, Detail::Region(1)),
            "ryw:lagging:b",
        )
        .repl(Repl::caught_up().seen(1, None)),
        Row::new(
            "ryw_lagging_reader_goes_to_writer_even_when_it_is_not_nearest",
            three(2, 2, 2),
            with_token(TOKEN_C),
            to_d(2, RywLagging, Detail::Region(2)),
            "ryw:lagging:c",
        )
        .repl(Repl::caught_up().seen(2, None)),
        Row::new(
            // The third region checks the forwarded token against its own replica.
            "ryw_lagging_with_writer_down_goes_to_another_region_never_local",
            three(2, 0, 2),
            with_token(TOKEN_B),
            to_d(2, RywWriterDown, Detail::Region(1)),
            "ryw:writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_with_writer_and_every_other_region_down_is_unavailable",
            three(2, 0, 0),
            with_token(TOKEN_B),
            unavailable_d(UnavailableRywWriterDown, Detail::Region(1)),
            "unavailable:ryw-writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_with_writer_unreachable_goes_to_another_region",
            b_unreachable,
            with_token(TOKEN_B),
            to_d(2, RywWriterDown, Detail::Region(1)),
            "ryw:writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_with_writer_not_allowed_goes_to_an_allowed_region",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[0, 2]),
                ..with_token(TOKEN_B)
            },
            to_d(2, RywWriterDown, Detail::Region(1)),
            "ryw:writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_with_only_local_allowed_is_unavailable",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[0]),
                ..with_token(TOKEN_B)
            },
            unavailable_d(UnavailableRywWriterDown, Detail::Region(1)),
            "unavailable:ryw-writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_retry_with_writer_used_up_tries_another_region",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[PEER_B],
                ..with_token(TOKEN_B)
            },
            to_d(2, RywWriterDown, Detail::Region(1)),
            "ryw:writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_lagging_writer_in_panic_is_used_when_nothing_serves",
            all_in_panic,
            with_token(TOKEN_B),
            panic_at(1),
            "panic",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_token_region_outside_the_view_is_never_served_locally",
            three(2, 2, 2),
            with_token(Token {
                region: 7,
                written_ms: NOW - 1000,
            }),
            to_d(1, RywWriterDown, Detail::Region(7)),
            "ryw:writer-down:#7",
        ),
        // Satisfied locally but local is down: the writer has the write for
        // certain, so it goes before a nearer region that may be behind.
        Row::new(
            "ryw_caught_up_with_local_down_fails_over_to_the_writer_first",
            three(0, 2, 2),
            with_token(TOKEN_C),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        // Writer down too: the nearest region, which checks the forwarded token.
        Row::new(
            "ryw_caught_up_with_local_and_writer_down_fails_over_to_the_nearest",
            three(0, 2, 0),
            with_token(TOKEN_C),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        // During a rolling upgrade a peer may not check the token: only W.
        Row::new(
            "ryw_caught_up_with_local_and_writer_down_mid_upgrade_is_refused",
            three(0, 2, 0),
            RequestFacts {
                peers_check_tokens: false,
                ..with_token(TOKEN_C)
            },
            unavailable(UnavailableNoHealthyRegion),
            "unavailable:no-healthy-region",
        ),
        Row::new(
            "ryw_lagging_with_writer_down_mid_upgrade_is_refused",
            three(2, 0, 2),
            RequestFacts {
                peers_check_tokens: false,
                ..with_token(TOKEN_B)
            },
            unavailable_d(UnavailableRywWriterDown, Detail::Region(1)),
            "unavailable:ryw-writer-down:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_caught_up_retry_on_another_local_backend_keeps_the_kind",
            three(2, 2, 2),
            RequestFacts {
                attempts: &[LOCAL_B0],
                ..with_token(TOKEN_B)
            },
            to_d(0, RywCaughtUp, Detail::Region(1)),
            "ryw:caught-up:b",
        ),
        Row::new(
            "ryw_caught_up_with_local_not_allowed_goes_by_residency",
            three(2, 2, 2),
            RequestFacts {
                allowed: allowed(&[2]),
                ..with_token(TOKEN_B)
            },
            to(2, Residency),
            "residency",
        ),
        // A peer forwards the token with the read: a hop this replica is
        // behind is refused, never answered stale.
        Row::new(
            "ryw_hop_behind_the_token_is_refused",
            three(2, 2, 2),
            RequestFacts {
                valid_hop: true,
                ..with_token(TOKEN_B)
            },
            unavailable_d(UnavailableRywBehind, Detail::Region(1)),
            "unavailable:ryw-behind:b",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_hop_caught_up_with_the_token_is_served_locally",
            three(2, 2, 2),
            RequestFacts {
                valid_hop: true,
                ..with_token(TOKEN_B)
            },
            to(0, Hop),
            "hop:local",
        )
        .repl(Repl::caught_up().seen(1, Some(NOW - MARGIN))),
        Row::new(
            "ryw_writes_local_ignore_the_token",
            three(2, 2, 2),
            RequestFacts {
                token: Some(TOKEN_B),
                ..write(RYW)
            },
            to(0, Local),
            "local",
        )
        .repl(lagging_b()),
        Row::new(
            "ryw_writes_local_fail_over_like_local_first",
            three(0, 2, 2),
            write(RYW),
            to(1, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        ),
        Row::new(
            "ryw_writes_primary_go_to_the_primary",
            primaried(three(2, 2, 2), 2),
            write(RYW_PRIMARY_WRITES),
            to(2, Primary),
            "primary",
        ),
        Row::new(
            "ryw_writes_primary_with_primary_down_use_on_primary_down",
            primaried(three(2, 2, 0), 2),
            write(RYW_PRIMARY_WRITES),
            to(0, PrimaryDown),
            "failover:primary-down",
        ),
        Row::new(
            "ryw_reads_with_writes_primary_still_stay_local",
            primaried(three(2, 2, 2), 2),
            facts(RYW_PRIMARY_WRITES),
            to(0, Local),
            "local",
        ),
    ]
}

/// `bounded-staleness`: lag(primary → local) against `max_staleness` (2 s here).
fn staleness_rows() -> Vec<Row> {
    use ReasonKind::*;
    let b_primary = || primaried(three(2, 2, 2), 1);
    let b_lag = |ms: u64| Repl::caught_up().seen(1, Some(NOW - ms));
    // Primary b has 1 of 4 healthy (under 50 %); a and c serve normally.
    let mut b_in_panic = primaried(three(2, 1, 2), 1);
    b_in_panic.regions[1].total = 4;
    b_in_panic.panic_threshold_percent = 50;
    vec![
        Row::new(
            // With `fail` the alternative is a 503: the primary in panic serves.
            "staleness_over_bound_with_fail_uses_the_primary_in_panic",
            b_in_panic.clone(),
            facts(STALE_FAIL),
            panic_at(1),
            "panic",
        )
        .repl(b_lag(2400)),
        Row::new(
            "staleness_over_bound_with_nearest_prefers_a_region_that_serves",
            b_in_panic,
            facts(STALE_NEAREST),
            to(0, PrimaryDown),
            "failover:primary-down",
        )
        .repl(b_lag(2400)),
        Row::new(
            "staleness_within_bound_reads_locally",
            b_primary(),
            facts(STALE_FAIL),
            to_d(0, StalenessOk, Detail::LagMs(1500)),
            "staleness:ok:lag=1.5s",
        )
        .repl(b_lag(1500)),
        Row::new(
            "staleness_exactly_at_bound_reads_locally",
            b_primary(),
            facts(STALE_FAIL),
            to_d(0, StalenessOk, Detail::LagMs(2000)),
            "staleness:ok:lag=2.0s",
        )
        .repl(b_lag(2000)),
        Row::new(
            "staleness_over_bound_goes_to_primary",
            b_primary(),
            facts(STALE_FAIL),
            to_d(1, StalenessExceeded, Detail::LagMs(2400)),
            "staleness:lag=2.4s",
        )
        .repl(b_lag(2400)),
        Row::new(
            "staleness_unknown_lag_goes_to_primary",
            b_primary(),
            facts(STALE_FAIL),
            to_d(1, StalenessExceeded, Detail::LagUnknown),
            "staleness:lag=unknown",
        )
        .repl(Repl::caught_up().seen(1, None)),
        Row::new(
            "staleness_watermark_ahead_of_the_clock_is_zero_lag",
            b_primary(),
            facts(STALE_FAIL),
            to_d(0, StalenessOk, Detail::LagMs(0)),
            "staleness:ok:lag=0.0s",
        )
        .repl(Repl::caught_up().seen(1, Some(NOW + 300))),
        Row::new(
            "staleness_writes_go_to_primary_however_fresh",
            b_primary(),
            write(STALE_FAIL),
            to(1, Primary),
            "primary",
        ),
        Row::new(
            "staleness_with_local_primary_reads_locally_as_primary",
            primaried(three(2, 2, 2), 0),
            facts(STALE_FAIL),
            to(0, Primary),
            "primary",
        )
        .repl(Repl {
            watermarks: vec![None; 3],
        }),
        Row::new(
            "staleness_over_bound_with_primary_down_and_fail_is_unavailable",
            primaried(three(2, 0, 2), 1),
            facts(STALE_FAIL),
            unavailable(UnavailablePrimaryDown),
            "unavailable:primary-down",
        )
        .repl(b_lag(5000)),
        Row::new(
            "staleness_over_bound_with_primary_down_and_nearest_reads_stale_locally",
            primaried(three(2, 0, 2), 1),
            facts(STALE_NEAREST),
            to(0, PrimaryDown),
            "failover:primary-down",
        )
        .repl(b_lag(5000)),
        // Fresh enough, but the local region cannot serve: the primary is the
        // one region known to be fresh, and the cause is health.
        Row::new(
            "staleness_within_bound_with_local_down_goes_to_primary_as_failover",
            primaried(three(0, 2, 2), 2),
            facts(STALE_FAIL),
            to(2, FailoverNoHealthyLocal),
            "failover:no-healthy-local",
        )
        .repl(Repl::caught_up().seen(2, Some(NOW - 100))),
        Row::new(
            "staleness_within_bound_with_local_not_allowed_goes_to_primary_by_residency",
            primaried(three(2, 2, 2), 2),
            RequestFacts {
                allowed: allowed(&[1, 2]),
                ..facts(STALE_FAIL)
            },
            to(2, Residency),
            "residency",
        ),
        Row::new(
            "staleness_retry_on_another_local_backend_keeps_the_lag",
            b_primary(),
            RequestFacts {
                attempts: &[LOCAL_B0],
                ..facts(STALE_FAIL)
            },
            to_d(0, StalenessOk, Detail::LagMs(1000)),
            "staleness:ok:lag=1.0s",
        )
        .repl(b_lag(1000)),
        Row::new(
            "staleness_within_bound_with_local_used_up_retries_on_primary",
            b_primary(),
            RequestFacts {
                attempts: &[LOCAL_NONE],
                ..facts(STALE_FAIL)
            },
            to(1, FailoverRetry),
            "failover:retry",
        )
        .repl(b_lag(1000)),
    ]
}

fn all_rows() -> Vec<Row> {
    let mut rows = health_rows();
    rows.extend(retry_rows());
    rows.extend(residency_rows());
    rows.extend(primary_rows());
    rows.extend(ryw_rows());
    rows.extend(staleness_rows());
    rows
}

#[test]
fn decision_table() {
    for row in all_rows() {
        let d = decide(&row.view, &row.repl.view(), &row.req);
        assert_eq!(d, row.want, "rule {}", row.name);
        assert_eq!(d.reason.describe(&row.view), row.text, "rule {}", row.name);
    }
}

#[test]
fn every_reason_kind_has_a_row() {
    let rows = all_rows();
    let seen: HashSet<ReasonKind> = rows.iter().map(|r| r.want.reason.kind).collect();
    for kind in ReasonKind::ALL {
        assert!(seen.contains(&kind), "no table row decides {kind}");
    }
}

#[test]
fn row_names_are_unique() {
    let rows = all_rows();
    let mut names = HashSet::new();
    for row in &rows {
        assert!(names.insert(row.name), "duplicate row {}", row.name);
    }
}

#[test]
fn reason_labels_are_stable() {
    use ReasonKind::*;
    let want = [
        (Local, "local"),
        (Hop, "hop:local"),
        (Panic, "panic"),
        (FailoverNoHealthyLocal, "failover:no-healthy-local"),
        (FailoverRetry, "failover:retry"),
        (RetrySameRegion, "retry:same-region"),
        (UnavailableNoHealthyLocal, "unavailable:no-healthy-local"),
        (UnavailableNoHealthyRegion, "unavailable:no-healthy-region"),
        (Primary, "primary"),
        (PrimaryDown, "failover:primary-down"),
        (UnavailablePrimaryDown, "unavailable:primary-down"),
        (RywCaughtUp, "ryw:caught-up"),
        (RywLagging, "ryw:lagging"),
        (RywWriterDown, "ryw:writer-down"),
        (UnavailableRywWriterDown, "unavailable:ryw-writer-down"),
        (UnavailableRywBehind, "unavailable:ryw-behind"),
        (StalenessOk, "staleness:ok"),
        (StalenessExceeded, "staleness"),
        (Residency, "residency"),
        (UnavailableResidency, "unavailable:residency"),
    ];
    assert_eq!(ReasonKind::ALL.len(), want.len());
    for (i, (kind, label)) in want.into_iter().enumerate() {
        assert_eq!(ReasonKind::ALL[i], kind, "ALL is in declaration order");
        assert_eq!(kind.as_str(), label);
        assert_eq!(kind.to_string(), label);
    }
}

#[test]
fn only_health_moves_count_as_failover() {
    use ReasonKind::*;
    for kind in ReasonKind::ALL {
        let failover = matches!(kind, FailoverNoHealthyLocal | FailoverRetry | PrimaryDown);
        let reason = Reason {
            kind,
            detail: Detail::None,
        };
        assert_eq!(reason.is_failover(), failover, "{kind}");
    }
}

#[test]
fn describe_rounds_lag_to_the_nearest_tenth_of_a_second() {
    let view = three(2, 2, 2);
    let lag = |ms| {
        Reason {
            kind: ReasonKind::StalenessExceeded,
            detail: Detail::LagMs(ms),
        }
        .describe(&view)
    };
    assert_eq!(lag(0), "staleness:lag=0.0s");
    assert_eq!(lag(49), "staleness:lag=0.0s");
    assert_eq!(lag(50), "staleness:lag=0.1s");
    assert_eq!(lag(2449), "staleness:lag=2.4s");
    assert_eq!(lag(2450), "staleness:lag=2.5s");
    assert_eq!(lag(59_960), "staleness:lag=60.0s");
    assert_eq!(lag(u64::MAX), "staleness:lag=18446744073709551.6s");
}

#[test]
fn describe_names_regions_and_unknown_lag() {
    let mut view = three(2, 2, 2);
    view.regions[2].name = "eu-west-1".to_string();
    let text = |kind, detail| Reason { kind, detail }.describe(&view);
    assert_eq!(
        text(ReasonKind::RywLagging, Detail::Region(2)),
        "ryw:lagging:eu-west-1"
    );
    assert_eq!(
        text(ReasonKind::StalenessExceeded, Detail::LagUnknown),
        "staleness:lag=unknown"
    );
    assert_eq!(text(ReasonKind::Primary, Detail::None), "primary");
}

#[test]
fn policy_names_parse_and_print() {
    let names = [
        ("local", PolicyName::Local),
        ("local-first", PolicyName::LocalFirst),
        ("primary", PolicyName::Primary),
        ("read-your-writes", PolicyName::ReadYourWrites),
        ("bounded-staleness", PolicyName::BoundedStaleness),
    ];
    for (text, name) in names {
        assert_eq!(text.parse::<PolicyName>(), Ok(name));
        assert_eq!(name.as_str(), text);
    }
    assert_eq!(PolicyName::default(), PolicyName::LocalFirst);
}

#[test]
fn unknown_policy_error_lists_all_five() {
    let Err(err) = "nearest".parse::<PolicyName>() else {
        panic!("`nearest` parsed as a policy");
    };
    assert_eq!(err, PolicyError::Unknown("nearest".to_string()));
    let msg = err.to_string();
    for name in [
        "local,",
        "local-first",
        "primary",
        "read-your-writes",
        "bounded-staleness",
    ] {
        assert!(msg.contains(name), "{msg} does not list {name}");
    }
    // Names are exact: no case folding, no trimming.
    assert!("Local".parse::<PolicyName>().is_err());
    assert!(" local".parse::<PolicyName>().is_err());
}

#[test]
fn policy_parameters_parse_with_their_defaults() {
    assert_eq!("fail".parse::<OnPrimaryDown>(), Ok(OnPrimaryDown::Fail));
    assert_eq!(
        "nearest".parse::<OnPrimaryDown>(),
        Ok(OnPrimaryDown::Nearest)
    );
    assert_eq!(
        "primary".parse::<OnPrimaryDown>(),
        Err(PolicyError::UnknownOnPrimaryDown("primary".to_string()))
    );
    assert_eq!(OnPrimaryDown::default(), OnPrimaryDown::Fail);
    assert_eq!("local".parse::<Writes>(), Ok(Writes::Local));
    assert_eq!("primary".parse::<Writes>(), Ok(Writes::Primary));
    assert_eq!(
        "nearest".parse::<Writes>(),
        Err(PolicyError::UnknownWrites("nearest".to_string()))
    );
    assert_eq!(Writes::default(), Writes::Local);
}

#[test]
fn policies_name_themselves_without_parameters() {
    let cases = [
        (Policy::Local, PolicyName::Local),
        (Policy::LocalFirst, PolicyName::LocalFirst),
        (PRIMARY_NEAREST, PolicyName::Primary),
        (RYW_PRIMARY_WRITES, PolicyName::ReadYourWrites),
        (STALE_FAIL, PolicyName::BoundedStaleness),
    ];
    for (policy, name) in cases {
        assert_eq!(policy.name(), name);
        assert_eq!(policy.as_str(), name.as_str());
    }
}

#[test]
fn region_sets_hold_indexes_below_64() {
    let s = RegionSet::empty().with(0).with(5).with(63);
    assert_eq!(s, RegionSet(1 | 1 << 5 | 1 << 63));
    assert!(s.contains(0) && s.contains(5) && s.contains(63));
    assert!(!s.contains(1) && !s.contains(62));
    // Past 64 there is no bit: never a member, and `with` leaves the set alone.
    assert!(!RegionSet::ALL.contains(64));
    assert_eq!(s.with(64), s);
    assert!((0..64).all(|i| RegionSet::ALL.contains(i)));
    assert!((0..64).all(|i| !RegionSet::empty().contains(i)));
}

#[test]
fn no_local_region_is_unavailable() {
    let mut view = three(2, 2, 2);
    view.regions[0].local = false;
    let d = decide(&view, &Repl::caught_up().view(), &facts(Policy::LocalFirst));
    assert_eq!(d, unavailable(ReasonKind::UnavailableNoHealthyRegion));
}

// === properties ===

/// One generated request with everything it borrows.
#[derive(Debug, Clone)]
struct Case {
    view: UpstreamView,
    watermarks: Vec<Option<u64>>,
    margin_ms: u64,
    policy: Policy,
    write: bool,
    valid_hop: bool,
    token: Option<Token>,
    allowed: RegionSet,
    attempts: Vec<Attempt>,
    retry_scope: RetryScope,
    peers_check_tokens: bool,
}

impl Case {
    fn lag(&self) -> LagView<'_> {
        LagView {
            watermarks_ms: &self.watermarks,
            now_ms: NOW,
            margin_ms: self.margin_ms,
        }
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            policy: self.policy,
            write: self.write,
            valid_hop: self.valid_hop,
            token: self.token,
            allowed: self.allowed,
            attempts: &self.attempts,
            retry_scope: self.retry_scope,
            peers_check_tokens: self.peers_check_tokens,
        }
    }

    fn decide(&self) -> Decision {
        decide(&self.view, &self.lag(), &self.facts())
    }

    fn local(&self) -> usize {
        self.view.regions.iter().position(|r| r.local).unwrap_or(0)
    }

    /// Regions the attempts use up, counted here independently of `decide`.
    fn excluded(&self, i: usize) -> bool {
        let mine: Vec<&Attempt> = self.attempts.iter().filter(|a| a.region == i).collect();
        mine.len() >= 2
            || mine
                .iter()
                .any(|a| a.backend.is_none() || a.failure == AttemptFailure::NoBackend)
    }

    /// Regions this request may use: allowed, reachable, not used up, in retry scope.
    fn usable(&self, i: usize) -> bool {
        let r = &self.view.regions[i];
        let in_scope = match (self.retry_scope, self.attempts.last()) {
            (RetryScope::SameRegion, Some(last)) => last.region == i,
            _ => true,
        };
        self.allowed.contains(i) && (r.local || r.reachable) && !self.excluded(i) && in_scope
    }
}

/// The panic rule, restated for the properties.
fn normal(view: &UpstreamView, r: &RegionView) -> bool {
    let p = u64::from(view.panic_threshold_percent);
    r.healthy > 0 && u64::from(r.healthy) * 100 >= p * u64::from(r.total)
}

fn arb_view() -> impl Strategy<Value = UpstreamView> {
    let region = (
        0u32..4,
        0u32..4,
        any::<bool>(),
        proptest::option::of(0u64..200),
        0u32..5,
    );
    (
        proptest::collection::vec(region, 1..6),
        0usize..6,
        prop_oneof![Just(0u8), 1u8..100],
        proptest::option::of(0usize..6),
    )
        .prop_map(|(rs, local, panic, primary)| {
            let local = local % rs.len();
            let primary = primary.map(|p| p % rs.len());
            let regions = rs
                .into_iter()
                .enumerate()
                .map(|(i, (healthy, extra, reachable, rtt, order))| RegionView {
                    name: format!("r{i}"),
                    local: i == local,
                    healthy,
                    total: healthy + extra,
                    reachable: reachable || i == local,
                    rtt: rtt.map(Duration::from_millis),
                    order,
                })
                .collect();
            UpstreamView {
                regions,
                panic_threshold_percent: panic,
                rtt_tolerance: Duration::from_millis(5),
                primary,
            }
        })
}

fn arb_on_primary_down() -> impl Strategy<Value = OnPrimaryDown> {
    prop_oneof![Just(OnPrimaryDown::Fail), Just(OnPrimaryDown::Nearest)]
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Local),
        Just(Policy::LocalFirst),
        arb_on_primary_down().prop_map(|on_primary_down| Policy::Primary { on_primary_down }),
        (
            prop_oneof![Just(Writes::Local), Just(Writes::Primary)],
            arb_on_primary_down()
        )
            .prop_map(|(writes, on_primary_down)| Policy::ReadYourWrites {
                writes,
                on_primary_down
            }),
        (0u64..4000, arb_on_primary_down()).prop_map(|(ms, on_primary_down)| {
            Policy::BoundedStaleness {
                max_staleness: Duration::from_millis(ms),
                on_primary_down,
            }
        }),
    ]
}

fn arb_attempt() -> impl Strategy<Value = Attempt> {
    (
        0usize..7,
        proptest::option::of(0usize..3),
        prop_oneof![
            Just(AttemptFailure::Connect),
            Just(AttemptFailure::Reset),
            Just(AttemptFailure::Timeout),
            Just(AttemptFailure::NoBackend),
        ],
    )
        .prop_map(|(region, backend, failure)| Attempt {
            region,
            backend,
            failure,
        })
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        arb_view(),
        // Watermarks around the token times below, so both sides of t + margin occur.
        proptest::collection::vec(proptest::option::of(NOW - 4000..NOW + 500), 0..7),
        0u64..1000,
        arb_policy(),
        any::<bool>(),
        prop::bool::weighted(0.1),
        proptest::option::of((0usize..7, NOW - 3000..NOW)),
        prop_oneof![Just(RegionSet::ALL), (0u64..64).prop_map(RegionSet)],
        proptest::collection::vec(arb_attempt(), 0..4),
        prop_oneof![Just(RetryScope::Anywhere), Just(RetryScope::SameRegion)],
        any::<bool>(),
    )
        .prop_map(
            |(
                view,
                watermarks,
                margin_ms,
                policy,
                write,
                hop,
                token,
                allowed,
                attempts,
                scope,
                peers_check,
            )| {
                Case {
                    view,
                    watermarks,
                    margin_ms,
                    policy,
                    write,
                    valid_hop: hop,
                    token: token.map(|(region, written_ms)| Token { region, written_ms }),
                    allowed,
                    attempts,
                    retry_scope: scope,
                    peers_check_tokens: peers_check,
                }
            },
        )
}

/// A first local-first read with no hop, token or residency limit: the pre-issue-7 request.
fn plain_local_first(view: &UpstreamView) -> Decision {
    decide(view, &Repl::caught_up().view(), &facts(Policy::LocalFirst))
}

proptest! {
    /// (a) A read-your-writes read with a token from W != local is served by
    /// the local region only once the local replica has W's write (plus margin).
    #[test]
    fn ryw_read_is_never_served_by_a_replica_behind_the_token(
        mut case in arb_case(),
        writes in prop_oneof![Just(Writes::Local), Just(Writes::Primary)],
        on_primary_down in arb_on_primary_down(),
        w in 0usize..7,
        written_ms in NOW - 3000..NOW,
    ) {
        let local = case.local();
        prop_assume!(w != local);
        case.policy = Policy::ReadYourWrites { writes, on_primary_down };
        case.write = false;
        // Hops included: a peer forwards the token with the read.
        case.token = Some(Token { region: w, written_ms });
        let d = case.decide();
        if let Target::Region { index, .. } = d.target {
            if index == local {
                let seen = case.watermarks.get(w).copied().flatten();
                prop_assert!(
                    seen.is_some_and(|s| s >= written_ms + case.margin_ms),
                    "{d:?} served locally with watermark {seen:?} behind token {written_ms} + {}",
                    case.margin_ms
                );
            }
        }
    }

    /// While peers may not check a forwarded token (rolling upgrade), a
    /// read-your-writes read with a token from W goes only to local or W.
    #[test]
    fn mid_upgrade_token_reads_go_only_to_local_or_the_writer(
        mut case in arb_case(),
        w in 0usize..7,
        written_ms in NOW - 3000..NOW,
    ) {
        case.policy = Policy::ReadYourWrites { writes: Writes::Local, on_primary_down: OnPrimaryDown::Fail };
        case.write = false;
        case.valid_hop = false;
        case.peers_check_tokens = false;
        case.token = Some(Token { region: w, written_ms });
        let d = case.decide();
        if let Target::Region { index, .. } = d.target {
            prop_assert!(index == case.local() || index == w, "{d:?} with a token from {w}");
        }
    }

    /// (b) No decision's target leaves `allowed`, whatever the policy, attempts, hop or panic.
    #[test]
    fn no_target_leaves_the_allowed_regions(case in arb_case()) {
        let d = case.decide();
        if let Target::Region { index, .. } = d.target {
            prop_assert!(case.allowed.contains(index), "{d:?} outside {:?}", case.allowed);
        }
    }

    /// (c) Local-first keeps a local region that serves, is allowed and is not used up.
    #[test]
    fn local_first_keeps_a_local_region_that_serves(mut case in arb_case()) {
        case.policy = Policy::LocalFirst;
        // A hop carrying a token was a read-your-writes read where it came
        // from: its own property (a) governs it.
        if case.valid_hop {
            case.token = None;
        }
        let local = case.local();
        let r = &case.view.regions[local];
        if normal(&case.view, r) && case.usable(local) {
            prop_assert_eq!(
                case.decide().target,
                Target::Region { index: local, panic: false }
            );
        }
    }

    /// (d) Never a region with no healthy backend while one with healthy backends exists (outside panic).
    #[test]
    fn never_an_unhealthy_region_while_a_healthy_one_exists(view in arb_view()) {
        let d = plain_local_first(&view);
        let any_healthy = view.regions.iter().any(|r| r.healthy > 0 && (r.local || r.reachable));
        match d.target {
            Target::Region { index, panic: false } => {
                prop_assert!(view.regions[index].healthy > 0, "{d:?} picked an unhealthy region");
            }
            Target::Region { panic: true, .. } => prop_assert_eq!(d.reason.kind, ReasonKind::Panic),
            Target::Unavailable => prop_assert!(!any_healthy, "{d:?} although a healthy region exists"),
        }
    }

    /// (d) Health is ignored only when no usable region serves normally.
    #[test]
    fn panic_only_when_no_region_serves_normally(view in arb_view()) {
        let d = plain_local_first(&view);
        if d.reason.kind == ReasonKind::Panic {
            let serving = view.regions.iter().any(|r| (r.local || r.reachable) && normal(&view, r));
            prop_assert!(!serving, "{d:?} panicked although a region serves normally");
        }
    }

    /// (d) The same two invariants under residency, attempts and retry scope:
    /// "exists" then means among the regions the request may use.
    #[test]
    fn local_first_health_invariants_hold_for_retries_and_residency(mut case in arb_case()) {
        case.policy = Policy::LocalFirst;
        case.valid_hop = false;
        let d = case.decide();
        let usable: Vec<usize> = (0..case.view.regions.len()).filter(|&i| case.usable(i)).collect();
        let any_healthy = usable.iter().any(|&i| case.view.regions[i].healthy > 0);
        let any_normal = usable.iter().any(|&i| normal(&case.view, &case.view.regions[i]));
        match d.target {
            Target::Region { index, panic: false } => {
                prop_assert!(case.view.regions[index].healthy > 0, "{d:?} picked an unhealthy region");
            }
            Target::Region { panic: true, .. } => {
                prop_assert_eq!(d.reason.kind, ReasonKind::Panic);
                prop_assert!(!any_normal, "{d:?} panicked although a usable region serves normally");
            }
            Target::Unavailable => prop_assert!(!any_healthy, "{d:?} although a usable region is healthy"),
        }
    }

    /// A valid hop always stays local: never forwarded again, whatever the policy or health.
    #[test]
    fn a_valid_hop_always_stays_local(mut case in arb_case()) {
        case.valid_hop = true;
        match case.decide().target {
            Target::Region { index, .. } => prop_assert!(case.view.regions[index].local),
            Target::Unavailable => {}
        }
    }

    /// The `local` policy never leaves the region.
    #[test]
    fn local_policy_never_leaves_the_region(mut case in arb_case()) {
        case.policy = Policy::Local;
        match case.decide().target {
            Target::Region { index, .. } => prop_assert!(case.view.regions[index].local),
            Target::Unavailable => {}
        }
    }

    /// A retry never goes back to a region the attempts used up, under any policy.
    #[test]
    fn retries_never_revisit_a_used_up_region(case in arb_case()) {
        if let Target::Region { index, .. } = case.decide().target {
            prop_assert!(!case.excluded(index), "{index} was used up by {:?}", case.attempts);
        }
    }

    /// A same-region retry stays in the last attempt's region or gives up.
    #[test]
    fn same_region_retries_stay_in_the_region(mut case in arb_case()) {
        case.retry_scope = RetryScope::SameRegion;
        if let (Some(last), Target::Region { index, .. }) = (case.attempts.last(), case.decide().target) {
            prop_assert_eq!(index, last.region);
        }
    }

    /// `primary` with `fail` goes to the primary or nowhere.
    #[test]
    fn primary_with_fail_never_serves_elsewhere(mut case in arb_case()) {
        case.policy = PRIMARY_FAIL;
        case.valid_hop = false;
        let d = case.decide();
        if let Target::Region { index, .. } = d.target {
            prop_assert_eq!(Some(index), case.view.primary, "{:?}", d);
        }
    }

    /// A bounded-staleness read is served locally as fresh only within the bound.
    #[test]
    fn staleness_ok_only_within_the_bound(mut case in arb_case(), max_ms in 0u64..4000) {
        case.policy = Policy::BoundedStaleness {
            max_staleness: Duration::from_millis(max_ms),
            on_primary_down: OnPrimaryDown::Fail,
        };
        case.write = false;
        case.valid_hop = false;
        let d = case.decide();
        if d.reason.kind == ReasonKind::StalenessOk {
            let p = case.view.primary;
            let seen = p.and_then(|p| case.watermarks.get(p).copied().flatten());
            prop_assert!(seen.is_some_and(|s| NOW.saturating_sub(s) <= max_ms), "{d:?} with {seen:?}");
            prop_assert_eq!(d.target, Target::Region { index: case.local(), panic: false });
        }
    }

    /// The log text always starts with the bounded label.
    #[test]
    fn describe_starts_with_the_label(case in arb_case()) {
        let reason = case.decide().reason;
        prop_assert!(reason.describe(&case.view).starts_with(reason.kind.as_str()));
    }
}

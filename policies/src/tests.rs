//! Every rule of `decide` as a named row, plus the DESIGN.md invariants as properties.

use super::*;
use proptest::prelude::*;

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

/// Three regions: A (local), B (order 1), C (order 2), two backends each.
fn three(a: u32, b: u32, c: u32) -> UpstreamView {
    let mut bv = region("b", false, b, 2);
    bv.order = 1;
    let mut cv = region("c", false, c, 2);
    cv.order = 2;
    UpstreamView {
        regions: vec![region("a", true, a, 2), bv, cv],
        panic_threshold_percent: 0,
        rtt_tolerance: Duration::from_millis(5),
    }
}

fn facts(policy: Policy) -> RequestFacts<'static> {
    RequestFacts {
        policy,
        valid_hop: false,
        exclude: &[],
    }
}

fn to(index: usize, reason: Reason) -> Decision {
    Decision {
        target: Target::Region {
            index,
            panic: false,
        },
        reason,
    }
}

fn unavailable(reason: Reason) -> Decision {
    Decision {
        target: Target::Unavailable,
        reason,
    }
}

struct Row {
    name: &'static str,
    view: UpstreamView,
    req: RequestFacts<'static>,
    want: Decision,
}

#[test]
fn decision_table() {
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

    let rows = vec![
        Row {
            name: "local_first_healthy_local_stays_local",
            view: three(2, 2, 2),
            req: facts(Policy::LocalFirst),
            want: to(0, Reason::Local),
        },
        Row {
            name: "local_first_one_healthy_local_is_enough",
            view: three(1, 2, 2),
            req: facts(Policy::LocalFirst),
            want: to(0, Reason::Local),
        },
        Row {
            name: "local_first_no_healthy_local_goes_to_lowest_order_before_rtt",
            view: three(0, 2, 2),
            req: facts(Policy::LocalFirst),
            want: to(1, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "local_first_measured_rtt_beats_order",
            view: rtt_view,
            req: facts(Policy::LocalFirst),
            want: to(2, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "local_first_rtt_within_tolerance_is_a_tie_and_order_decides",
            view: rtt_tie,
            req: facts(Policy::LocalFirst),
            want: to(1, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "local_first_skips_region_without_healthy_backends",
            view: three(0, 0, 2),
            req: facts(Policy::LocalFirst),
            want: to(2, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "local_first_skips_unreachable_peer",
            view: unreachable_b,
            req: facts(Policy::LocalFirst),
            want: to(2, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "local_first_nothing_healthy_is_unavailable",
            view: three(0, 0, 0),
            req: facts(Policy::LocalFirst),
            want: unavailable(Reason::UnavailableNoHealthyRegion),
        },
        Row {
            name: "local_first_upstream_without_local_backends_uses_nearest",
            view: no_local_backends,
            req: facts(Policy::LocalFirst),
            want: to(1, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "retry_after_local_failure_goes_to_next_region",
            view: three(2, 2, 2),
            req: RequestFacts {
                policy: Policy::LocalFirst,
                valid_hop: false,
                exclude: &[0],
            },
            want: to(1, Reason::FailoverRetry),
        },
        Row {
            name: "retry_after_two_regions_failed_goes_to_third",
            view: three(2, 2, 2),
            req: RequestFacts {
                policy: Policy::LocalFirst,
                valid_hop: false,
                exclude: &[0, 1],
            },
            want: to(2, Reason::FailoverRetry),
        },
        Row {
            name: "retry_with_every_region_tried_is_unavailable",
            view: three(2, 2, 2),
            req: RequestFacts {
                policy: Policy::LocalFirst,
                valid_hop: false,
                exclude: &[0, 1, 2],
            },
            want: unavailable(Reason::UnavailableNoHealthyRegion),
        },
        Row {
            name: "local_policy_healthy_local_serves",
            view: three(2, 2, 2),
            req: facts(Policy::Local),
            want: to(0, Reason::Local),
        },
        Row {
            name: "local_policy_never_fails_over",
            view: three(0, 2, 2),
            req: facts(Policy::Local),
            want: unavailable(Reason::UnavailableNoHealthyLocal),
        },
        Row {
            name: "valid_hop_is_served_locally",
            view: three(2, 2, 2),
            req: RequestFacts {
                policy: Policy::LocalFirst,
                valid_hop: true,
                exclude: &[],
            },
            want: to(0, Reason::Hop),
        },
        Row {
            name: "valid_hop_with_no_healthy_local_is_unavailable_not_forwarded",
            view: three(0, 2, 2),
            req: RequestFacts {
                policy: Policy::LocalFirst,
                valid_hop: true,
                exclude: &[],
            },
            want: unavailable(Reason::UnavailableNoHealthyLocal),
        },
        Row {
            name: "panic_below_threshold_ignores_health_locally",
            view: panic_view,
            req: facts(Policy::LocalFirst),
            want: Decision {
                target: Target::Region {
                    index: 0,
                    panic: true,
                },
                reason: Reason::Panic,
            },
        },
        Row {
            name: "a_region_serving_normally_is_chosen_before_any_panic",
            view: healthy_region_before_panic,
            req: facts(Policy::LocalFirst),
            want: to(2, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "panic_is_per_region_so_local_first_fails_over_first",
            view: local_in_panic_peer_healthy,
            req: facts(Policy::LocalFirst),
            want: to(1, Reason::FailoverNoHealthyLocal),
        },
        Row {
            name: "panic_not_entered_above_threshold",
            view: panic_off_when_healthy,
            req: facts(Policy::LocalFirst),
            want: to(0, Reason::Local),
        },
        Row {
            name: "local_policy_panics_on_its_own_region_share",
            view: local_panic,
            req: facts(Policy::Local),
            want: Decision {
                target: Target::Region {
                    index: 0,
                    panic: true,
                },
                reason: Reason::Panic,
            },
        },
    ];
    for row in rows {
        assert_eq!(decide(&row.view, &row.req), row.want, "rule {}", row.name);
    }
}

#[test]
fn reasons_are_stable_labels() {
    assert_eq!(Reason::Local.to_string(), "local");
    assert_eq!(
        Reason::FailoverNoHealthyLocal.to_string(),
        "failover:no-healthy-local"
    );
    assert!(Reason::FailoverRetry.is_failover());
    assert!(!Reason::Hop.is_failover());
}

#[test]
fn policy_names_parse_and_later_policies_are_named_as_such() {
    assert_eq!("local".parse::<Policy>(), Ok(Policy::Local));
    assert_eq!("local-first".parse::<Policy>(), Ok(Policy::LocalFirst));
    assert!(matches!(
        "primary".parse::<Policy>(),
        Err(PolicyError::NotYetAvailable(_))
    ));
    assert!(matches!(
        "nearest".parse::<Policy>(),
        Err(PolicyError::Unknown(_))
    ));
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
    )
        .prop_map(|(rs, local, panic)| {
            let local = local % rs.len();
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
            }
        })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Local), Just(Policy::LocalFirst)]
}

proptest! {
    /// Never a region with no healthy backend while one with healthy backends exists (outside panic).
    #[test]
    fn never_an_unhealthy_region_while_a_healthy_one_exists(view in arb_view()) {
        let d = decide(&view, &facts(Policy::LocalFirst));
        let any_healthy = view.regions.iter().any(|r| r.healthy > 0 && (r.local || r.reachable));
        match d.target {
            Target::Region { index, panic: false } => {
                prop_assert!(view.regions[index].healthy > 0, "{d:?} picked an unhealthy region");
            }
            Target::Region { panic: true, .. } => prop_assert_eq!(d.reason, Reason::Panic),
            Target::Unavailable => prop_assert!(!any_healthy, "{d:?} although a healthy region exists"),
        }
    }

    /// Health is ignored only when no usable region serves normally.
    #[test]
    fn panic_only_when_no_region_serves_normally(view in arb_view()) {
        let d = decide(&view, &facts(Policy::LocalFirst));
        if d.reason == Reason::Panic {
            let p = u64::from(view.panic_threshold_percent);
            let serving = view.regions.iter().any(|r| {
                (r.local || r.reachable)
                    && r.healthy > 0
                    && u64::from(r.healthy) * 100 >= p * u64::from(r.total)
            });
            prop_assert!(!serving, "{d:?} panicked although a region serves normally");
        }
    }

    /// A valid hop always stays local: never forwarded again, whatever the policy or health.
    #[test]
    fn a_valid_hop_always_stays_local(view in arb_view(), policy in arb_policy()) {
        let req = RequestFacts { policy, valid_hop: true, exclude: &[] };
        match decide(&view, &req).target {
            Target::Region { index, .. } => prop_assert!(view.regions[index].local),
            Target::Unavailable => {}
        }
    }

    /// The `local` policy never leaves the region.
    #[test]
    fn local_policy_never_leaves_the_region(view in arb_view()) {
        match decide(&view, &facts(Policy::Local)).target {
            Target::Region { index, .. } => prop_assert!(view.regions[index].local),
            Target::Unavailable => {}
        }
    }

    /// A retry never goes back to a region already tried.
    #[test]
    fn retries_never_revisit_an_excluded_region(view in arb_view(), ex in proptest::collection::vec(0usize..6, 0..3)) {
        let req = RequestFacts { policy: Policy::LocalFirst, valid_hop: false, exclude: &ex };
        if let Target::Region { index, .. } = decide(&view, &req).target {
            prop_assert!(!ex.contains(&index));
        }
    }
}

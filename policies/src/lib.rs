//! Pure routing decisions for edge-router.
//!
//! This crate owns one question: *which region's backends serve this request?*
//! It answers from snapshots the proxy builds in the background (health in
//! [`UpstreamView`], replication in [`LagView`]) and from facts about the
//! request ([`RequestFacts`]). It must not do I/O, read clocks or touch
//! sockets: the request's arrival time is a field of [`LagView`], every rule
//! here is a row in a table test, and the invariants in docs/policies.md are property
//! tests. The proxy feeds it snapshots and acts on its [`Decision`].
//!
//! Modules, all re-exported here: `policy` (what config names), `view` (the
//! snapshots), `request` (the request's facts), `reason` (bounded labels) and
//! `decide` (the rules).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod decide;
mod policy;
mod reason;
mod request;
mod view;

pub use decide::{decide, nearest, Decision, Target};
pub use policy::{OnPrimaryDown, Policy, PolicyError, PolicyName, Writes};
pub use reason::{Detail, Reason, ReasonKind};
pub use request::{Attempt, AttemptFailure, RequestFacts, RetryScope, Token};
pub use view::{LagView, RegionSet, RegionView, UpstreamView};

#[cfg(test)]
mod tests;

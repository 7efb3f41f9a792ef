//! Backend and peer-region health for one proxy.
//!
//! Background tasks ([`prober`]) and the request path (passive outcomes)
//! write observations here; each change that matters rebuilds an immutable
//! [`Snapshot`] published through `ArcSwap`, which the hot path only reads and
//! hands to `edge_policies::decide`. The maths (hysteresis, ejection) are pure
//! functions in their own modules.
//!
//! One file per concern; everything public is re-exported here, so callers
//! name `crate::health::X`:
//!
//! - `topology.rs`: the static shape from config ([`Topology`],
//!   [`UpstreamTopology`], [`Backend`], [`RoutePolicy`]). No health, no locks.
//! - `state.rs`: [`HealthState`], the mutable health: observations
//!   (probes, outcomes, peers, re-admission), the rebuild that takes the locks
//!   and publishes metrics, and `pick_local` for the request path.
//! - `snapshot.rs`: [`Snapshot`], what the request path reads, and the pure
//!   function building it from plain inputs (no locks, clock or metrics).
//! - `report.rs`: the peer wire format ([`RegionReport`], [`UpstreamCount`])
//!   and the pure function building this proxy's own report.
//! - `status.rs`: the health part of the admin `/status` document.
//! - [`hysteresis`], [`outlier`]: the pure maths; [`prober`]: the async probes.

pub mod hysteresis;
pub mod outlier;
pub mod prober;

mod report;
mod snapshot;
mod state;
mod status;
mod topology;

pub use report::{RegionReport, UpstreamCount};
pub use snapshot::Snapshot;
pub use state::HealthState;
pub use topology::{Backend, RoutePolicy, Topology, UpstreamTopology};

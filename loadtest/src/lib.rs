//! edge-loadtest: the instruments for measuring edge-router from outside.
//!
//! [`engine`] generates load (open loop with coordinated-omission correction,
//! or closed loop) over [`client`] connections to [`target`]s; [`report`]
//! turns a run into text, JSON and `.hgrm`; [`compare`] alternates two
//! targets in rounds; [`plot`] draws latency-by-percentile curves;
//! [`origin`] is the shaped test origin used behind the proxy.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
pub mod compare;
pub mod engine;
pub mod origin;
pub mod plot;
pub mod report;
pub mod target;

//! edge-loadtest: the instruments for measuring edge-router from outside.
//!
//! This release holds the reference test origin ([`origin`]), the backend that
//! tests, the demo and benchmarks put behind the proxy. The open-loop load
//! generator builds on it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod origin;

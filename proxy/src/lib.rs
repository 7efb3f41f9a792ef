//! edge-router: a multi-region active-active reverse proxy on Pingora.
//!
//! One module per concern: [`config`] (two-stage, located errors), [`routing`]
//! (host and path to route), [`health`] (active checks, outlier ejection, the
//! snapshot `edge_policies::decide` reads), [`service`] (the thin Pingora
//! `ProxyHttp`), [`static_response`] (a route's `return`), [`compression`]
//! (a route's `compress`), [`hop`] (signed forwarding between regions), [`forwarding`]
//! (header rules), [`keys`] (a key per purpose from one secret), [`token`]
//! (consistency tokens), [`tables`] (the replicated table and heartbeat lag),
//! [`admin`], [`metrics`], [`lifecycle`] (drain and signals), [`telemetry`],
//! [`demo`]; [`app`] assembles them. The binary is `main.rs`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backend_transport;
pub mod cache;
pub mod clock;
pub mod compression;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod forwarding;
pub mod health;
pub mod hop;
pub mod host;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod path;
pub mod rate_limit;
pub mod reload;
pub mod retry;
pub mod routing;
pub mod sd_notify;
pub mod service;
pub mod signals;
pub mod snapshot;
pub mod static_response;
pub mod tables;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upgrade;

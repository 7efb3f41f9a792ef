//! End-to-end tests: the real `edge-router` binary, real origins, real sockets on 127.0.0.1.

mod demo_harness;
mod support;

mod access_log;
mod admin;
mod cache;
mod cache_regions;
mod check_cli;
mod consistency;
mod dns;
mod drain;
#[cfg(feature = "dynamodb")]
mod dynamodb;
mod failover;
mod hop;
mod outlier;
mod peer_tls;
mod reload;
mod request_path;
mod retries;
mod shaping;
mod slow_clients;
mod tls;
mod upstream_abort;
mod upstream_tls;

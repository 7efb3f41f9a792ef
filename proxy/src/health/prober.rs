//! Active probes: local backends on their health path, peer regions on their
//! edge-router's health path (which also measures RTT and carries the peer's
//! own backend counts). Runs as a Pingora background service.
//!
//! Pingora's `HttpHealthCheck` validates only a status on a fixed schedule;
//! we need jittered intervals, per-target hysteresis feeding our snapshot,
//! RTT and the peer's report body, so probes are plain hyper requests and the
//! state lives in `HealthState`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;

use super::{HealthState, RegionReport};
use crate::backend_transport::BackendTransport;
use crate::config::UpstreamProtocol;

/// How often ejections are checked for expiry.
const EJECTION_TICK: Duration = Duration::from_millis(100);
/// Largest peer report read.
const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The background service probing everything one proxy depends on.
pub struct Prober {
    state: Arc<HealthState>,
    health_path: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Per upstream: how its backends are spoken to (and so probed).
    transports: Vec<BackendTransport>,
    /// How `https://` peers are reached.
    peer_transport: BackendTransport,
}

impl Prober {
    /// Probes for `state`; peers are probed on `health_path`; backends of
    /// upstream `i` over `transports[i]`.
    pub fn new(
        state: Arc<HealthState>,
        health_path: String,
        transports: Vec<BackendTransport>,
        peer_transport: BackendTransport,
    ) -> Prober {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Prober {
            state,
            health_path,
            client,
            transports,
            peer_transport,
        }
    }
}

/// A probe of a backend spoken to over TLS or HTTP/2: a fresh connection
/// each time (handshake included, as a new upstream connection would make),
/// the status and (when wanted) the body.
async fn probe_transport(
    t: &BackendTransport,
    addr: SocketAddr,
    name: &str,
    path: &str,
    timeout: Duration,
    want_body: bool,
) -> Option<(u16, Bytes)> {
    let fut = async {
        let req = http::Request::get(path)
            .header(http::header::USER_AGENT, "edge-router-health/1")
            .header(http::header::HOST, name)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = t.one_shot(addr, name, req).await?;
        answer(resp, want_body).await
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// One GET with a timeout: the status and body, or None on any failure.
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    want_body: bool,
) -> Option<(u16, Bytes)> {
    let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "edge-router-health/1")
        .body(Empty::new())
        .ok()?;
    let fut = async {
        let resp = client.request(req).await.ok()?;
        answer(resp, want_body).await
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// A probe's status and, when wanted, its body (a peer's report, bounded);
/// otherwise the body is drained so a pooled connection can be reused.
async fn answer(
    resp: http::Response<hyper::body::Incoming>,
    want_body: bool,
) -> Option<(u16, Bytes)> {
    let status = resp.status().as_u16();
    let body = if want_body {
        Limited::new(resp.into_body(), MAX_REPORT_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes()
    } else {
        let _ = resp.into_body().collect().await;
        Bytes::new()
    };
    Some((status, body))
}

fn jittered(interval: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return interval;
    }
    interval + rand::rng().random_range(Duration::ZERO..=jitter)
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let topo = self.state.topo.clone();
        let mut tasks = tokio::task::JoinSet::new();
        for (ui, u) in topo.upstreams.iter().enumerate() {
            for &bi in &u.by_region[topo.local] {
                let (state, client, cfg) = (
                    self.state.clone(),
                    self.client.clone(),
                    u.config.health.clone(),
                );
                let transport = self.transports.get(ui).cloned();
                let addr = u.backends[bi].addr;
                tasks.spawn(async move {
                    loop {
                        let ok = match &transport {
                            Some(t) if t.tls || t.protocol != UpstreamProtocol::Http1 => {
                                probe_transport(
                                    t,
                                    addr,
                                    &t.sni_for(addr),
                                    &cfg.path,
                                    cfg.timeout,
                                    false,
                                )
                                .await
                                .is_some_and(|(s, _)| (200..300).contains(&s))
                            }
                            _ => get(&client, addr, &cfg.path, cfg.timeout, false)
                                .await
                                .is_some_and(|(s, _)| (200..300).contains(&s)),
                        };
                        state.observe_probe(ui, bi, ok);
                        tokio::time::sleep(jittered(cfg.interval, cfg.jitter)).await;
                    }
                });
            }
        }
        // Peers are probed as often as the most eager upstream, with its thresholds.
        let fastest = topo
            .upstreams
            .iter()
            .map(|u| &u.config.health)
            .min_by_key(|h| h.interval);
        let (interval, jitter, timeout, healthy, unhealthy) = fastest
            .map(|h| (h.interval, h.jitter, h.timeout, h.healthy, h.unhealthy))
            .unwrap_or((
                Duration::from_secs(2),
                Duration::from_millis(200),
                Duration::from_secs(1),
                2,
                3,
            ));
        for (ri, r) in topo.regions.iter().enumerate() {
            let Some(peer) = r.peer.clone().filter(|_| ri != topo.local) else {
                continue;
            };
            let (state, client, path) = (
                self.state.clone(),
                self.client.clone(),
                self.health_path.clone(),
            );
            let transport = peer.tls.then(|| self.peer_transport.clone());
            tasks.spawn(async move {
                loop {
                    let started = Instant::now();
                    // Over TLS the probe makes a new connection (and so
                    // measures the handshake too, alike for every peer):
                    // a report from a server without a certificate from the
                    // regions' CA is never read.
                    let answer = match &transport {
                        Some(t) => {
                            probe_transport(t, peer.addr, &peer.host, &path, timeout, true).await
                        }
                        None => get(&client, peer.addr, &path, timeout, true).await,
                    };
                    let result = answer.and_then(|(status, body)| {
                        let rtt = started.elapsed();
                        (status == 200).then_some(())?;
                        serde_json::from_slice::<RegionReport>(&body)
                            .ok()
                            .map(|r| (rtt, r))
                    });
                    state.observe_peer(ri, result, healthy, unhealthy);
                    tokio::time::sleep(jittered(interval, jitter)).await;
                }
            });
        }
        let state = self.state.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(EJECTION_TICK);
            loop {
                tick.tick().await;
                state.tick();
            }
        });
        let _ = shutdown.changed().await;
        tasks.abort_all();
    }
}

//! The direct path: a purge sent at once to every peer edge-router's
//! traffic listener (`/.edge/purge`), signed, best effort. A peer it misses
//! gets the purge from the replicated table.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::invalidation::{PURGE_PATH, PURGE_SIGNATURE};
use super::purge::Purge;
use super::signing::PurgeSigner;
use crate::backend_transport::BackendTransport;
use crate::config::PeerAddr;
use crate::metrics::Metrics;

/// Best-effort delivery of a purge to every peer, in the background.
pub(super) struct Fanout {
    peers: Vec<(String, PeerAddr)>,
    signer: Arc<PurgeSigner>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    /// How `https://` peers are reached (mutual TLS).
    tls: BackendTransport,
}

impl Fanout {
    pub(super) fn new(
        peers: Vec<(String, PeerAddr)>,
        signer: Arc<PurgeSigner>,
        timeout: Duration,
        tls: BackendTransport,
    ) -> Fanout {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Fanout {
            peers,
            signer,
            timeout,
            client,
            tls,
        }
    }

    pub(super) fn send(&self, purge: &Purge, metrics: &Arc<Metrics>) {
        if self.peers.is_empty() {
            return;
        }
        let Ok(body) = serde_json::to_vec(purge) else {
            return;
        };
        let body = Bytes::from(body);
        let signature = self.signer.sign(&body);
        for (name, peer) in &self.peers {
            let req = http::Request::post(format!("http://{}{PURGE_PATH}", peer.addr))
                .header(http::header::HOST, peer.authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(PURGE_SIGNATURE, signature.as_str())
                .body(Full::new(body.clone()));
            let Ok(req) = req else { continue };
            let (client, metrics, timeout, name, id) = (
                self.client.clone(),
                metrics.clone(),
                self.timeout,
                name.clone(),
                purge.id.clone(),
            );
            let tls = peer
                .tls
                .then(|| (self.tls.clone(), peer.addr, peer.host.clone()));
            tokio::spawn(async move {
                let ok = match tls {
                    // A fresh mutual-TLS connection per purge.
                    Some((t, addr, host)) => {
                        let sent = t.one_shot(addr, &host, req);
                        matches!(
                            tokio::time::timeout(timeout, sent).await,
                            Ok(Some(resp)) if resp.status().is_success()
                        )
                    }
                    None => matches!(
                        tokio::time::timeout(timeout, client.request(req)).await,
                        Ok(Ok(resp)) if resp.status().is_success()
                    ),
                };
                let result = if ok { "ok" } else { "error" };
                metrics.purge_fanout.with_label_values(&[result]).inc();
                if !ok {
                    tracing::debug!(peer = %name, id = %id, "direct purge not delivered; the table carries it");
                }
            });
        }
    }
}

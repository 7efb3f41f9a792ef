//! The admin listener (loopback by default): `GET /metrics`, `GET /status`,
//! `POST /drain` and `DELETE /drain`, `POST /purge` (bearer token). Reads
//! are open to whoever can reach the listener; mutations need the token.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::cache::purge::PurgeSpec;
use crate::cache::EdgeCache;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::reload::{ConfigInfo, ReloadHandle};
use crate::service::Region;
use crate::tables::heartbeat::LagState;

/// The admin HTTP app of one proxy.
pub struct AdminApp {
    live: Arc<arc_swap::ArcSwap<Region>>,
    lifecycle: Arc<Lifecycle>,
    metrics: Arc<Metrics>,
    lag: Arc<LagState>,
    table: String,
    token: Option<String>,
    cache: Option<Arc<EdgeCache>>,
    tls: Vec<Arc<edge_certs::resolver::DirResolver>>,
    reload: Option<(ReloadHandle, Arc<arc_swap::ArcSwap<ConfigInfo>>)>,
}

/// Largest `POST /purge` body.
const MAX_PURGE_BODY: usize = 1 << 20;

impl AdminApp {
    /// `token` is the bearer token for mutations; None refuses them all.
    /// `table` describes the replicated table for `/status`.
    pub fn new(
        live: Arc<arc_swap::ArcSwap<Region>>,
        lifecycle: Arc<Lifecycle>,
        metrics: Arc<Metrics>,
        lag: Arc<LagState>,
        table: String,
        token: Option<String>,
    ) -> Self {
        AdminApp {
            live,
            reload: None,
            lifecycle,
            metrics,
            lag,
            table,
            token: token.filter(|t| !t.is_empty()),
            cache: None,
            tls: Vec::new(),
        }
    }

    /// Show the TLS listeners' certificates in `/status`.
    pub fn with_tls(mut self, tls: Vec<Arc<edge_certs::resolver::DirResolver>>) -> Self {
        self.tls = tls;
        self
    }

    fn tls_json(&self) -> serde_json::Value {
        let now = std::time::SystemTime::now();
        let listeners: Vec<serde_json::Value> = self
            .tls
            .iter()
            .map(|r| {
                let certs: Vec<serde_json::Value> = r
                    .certs()
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "dns_names": c.dns_names,
                            "not_after": c.not_after,
                            "expires_in_s": c.expires_in(now),
                        })
                    })
                    .collect();
                serde_json::json!({"dir": r.dir().display().to_string(), "certs": certs})
            })
            .collect();
        serde_json::Value::Array(listeners)
    }

    /// Serve `POST /purge` and the `/status` cache section for `cache`.
    /// `POST /reload` asks `handle`; `/status` shows `info`.
    pub fn with_reload(
        mut self,
        handle: ReloadHandle,
        info: Arc<arc_swap::ArcSwap<ConfigInfo>>,
    ) -> Self {
        self.reload = Some((handle, info));
        self
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        let Some((handle, _)) = &self.reload else {
            return text(
                StatusCode::CONFLICT,
                "this process has no config file to reload",
            );
        };
        // A reload reads files and resolves names: bounded, so a stuck one
        // cannot hold the request (it goes on, and says how it ended in the log).
        let outcome =
            tokio::time::timeout(std::time::Duration::from_secs(30), handle.reload()).await;
        match outcome {
            Err(_) => text(
                StatusCode::GATEWAY_TIMEOUT,
                "the reload is still running after 30 s; its result will be in the log and edge_config_reloads_total",
            ),
            Ok(Ok(info)) => json(StatusCode::OK, info.json()),
            Ok(Err(why)) if why.starts_with("the reloader") => {
                text(StatusCode::SERVICE_UNAVAILABLE, &why)
            }
            Ok(Err(why)) if why.contains("not started from a config file") => {
                text(StatusCode::CONFLICT, &why)
            }
            Ok(Err(why)) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "error": why, "kept": "the previous config keeps serving" }),
            ),
        }
    }

    pub fn with_cache(mut self, cache: Option<Arc<EdgeCache>>) -> Self {
        self.cache = cache;
        self
    }

    async fn purge(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let Some(cache) = &self.cache else {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "no route has `cache = true`: nothing to purge"}),
            );
        };
        let body = match read_body(session, MAX_PURGE_BODY).await {
            Ok(b) => b,
            Err(msg) => return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": msg})),
        };
        let spec = match serde_json::from_slice::<PurgeSpec>(&body)
            .map_err(|e| format!("bad purge body: {e}"))
            .and_then(|spec| spec.normalized(cache.path_rules))
        {
            Ok(s) => s,
            Err(msg) => return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": msg})),
        };
        match cache.invalidation.publish_durable(spec).await {
            Ok((purge, objects)) => json(
                StatusCode::ACCEPTED,
                serde_json::json!({"id": purge.id, "applied": objects}),
            ),
            Err(e) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({
                    "error": format!("purge not accepted: the replicated table did not take it ({e}); nothing was purged, retry"),
                }),
            ),
        }
    }

    fn authorized(&self, header: Option<&[u8]>) -> bool {
        let (Some(token), Some(header)) = (&self.token, header) else {
            return false;
        };
        let Some(given) = header.strip_prefix(b"Bearer ") else {
            return false;
        };
        constant_time_eq(given, token.as_bytes())
    }
}

/// Compare without leaking the position of the first difference through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut builder = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len());
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header(
            http::header::WWW_AUTHENTICATE,
            "Bearer realm=\"edge-router admin\"",
        );
    }
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json(status: StatusCode, doc: serde_json::Value) -> Response<Vec<u8>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec(&doc).unwrap_or_default(),
    )
}

/// The request body, refused past `limit` bytes.
async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(format!("body larger than {limit} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(format!("could not read the body: {e}")),
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Response<Vec<u8>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        format!("{msg}\n").into_bytes(),
    )
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        let mutation = matches!(
            (&method, path.as_str()),
            (
                &Method::POST,
                "/purge" | "/reload" | "/backends/disable" | "/backends/enable"
            ) | (&Method::POST | &Method::DELETE, "/drain")
                // Header rules may carry credentials: the file is for the token holder.
                | (&Method::GET, "/config")
        );
        if mutation && !self.authorized(auth.as_deref()) {
            tracing::warn!(
                path,
                "admin mutation refused: missing or wrong bearer token"
            );
            return text(
                StatusCode::UNAUTHORIZED,
                "a valid `Authorization: Bearer <token>` is required",
            );
        }
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(),
            ),
            (Method::GET, "/status") => {
                let mut doc = self.live.load().health.status_json();
                if let Some((_, info)) = &self.reload {
                    doc["config"] = info.load().json();
                }
                doc["draining"] = self.lifecycle.is_draining().into();
                // Which process answers (it changes with a graceful upgrade).
                doc["pid"] = std::process::id().into();
                doc["tables"] = self.lag.status_json(&self.table);
                doc["tls"] = self.tls_json();
                doc["cache"] = match &self.cache {
                    Some(c) => c.invalidation.status_json(c.config.max_bytes),
                    None => serde_json::json!({"enabled": false}),
                };
                let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
            (Method::GET, "/config") => match &self.reload {
                // The file as loaded: secrets are never in it (they come
                // from the environment), so nothing needs redacting.
                Some((handle, info)) => {
                    let mut doc = info.load().json();
                    doc["text"] = handle.text().into();
                    json(StatusCode::OK, doc)
                }
                None => text(StatusCode::NOT_FOUND, "no config file"),
            },
            (Method::POST, "/purge") => self.purge(session).await,
            (Method::POST, "/reload") => self.reload().await,
            (Method::POST, p @ ("/backends/disable" | "/backends/enable")) => {
                let disable = p == "/backends/disable";
                let query = session.req_header().uri.query().unwrap_or("").to_string();
                let arg = |name: &str| {
                    query
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.to_string())
                };
                let (Some(upstream), Some(address)) = (arg("upstream"), arg("address")) else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "give ?upstream=NAME&address=IP:PORT (a local backend)",
                    );
                };
                match self
                    .live
                    .load()
                    .health
                    .set_disabled(&upstream, &address, disable)
                {
                    Ok(()) => {
                        tracing::warn!(upstream, address, disabled = disable, "backend rotation changed through the admin API");
                        json(
                            StatusCode::OK,
                            serde_json::json!({"upstream": upstream, "address": address, "disabled": disable}),
                        )
                    }
                    Err(why) => text(StatusCode::NOT_FOUND, &why),
                }
            }
            (m @ (Method::POST | Method::DELETE), "/drain") => {
                let drain = m == Method::POST;
                if drain {
                    self.lifecycle.start_drain();
                } else if !self.lifecycle.cancel_drain() {
                    return text(
                        StatusCode::CONFLICT,
                        "the process is shutting down (SIGTERM): its drain cannot be cancelled",
                    );
                }
                tracing::info!(
                    draining = drain,
                    "drain state changed through the admin API"
                );
                text(
                    StatusCode::OK,
                    if drain {
                        "draining: health path answers 503"
                    } else {
                        "drain cancelled"
                    },
                )
            }
            (
                _,
                "/metrics" | "/status" | "/config" | "/drain" | "/purge" | "/reload" | "/backends/disable"
                | "/backends/enable",
            ) => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /status, POST /drain, /purge, /reload, /backends/disable, /backends/enable",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}

//! A fast HTTP origin whose responses are shaped by query parameters.
//!
//! `GET /anything?size=1024&delay=50ms&status=201&cache-control=max-age=60&region=x&etag=v1&echo=1`
//! answers `status` after `delay` with a `size`-byte body (default: a small
//! JSON document naming the origin), the given `cache-control` and `etag`, and
//! `region` echoed in `x-origin-region`. `echo=1` puts the request headers in
//! the JSON body so tests can see what a proxy forwarded.
//!
//! Control paths (for demos and failure tests): `POST /.demo/fail` makes every
//! answer a 503 (health checks included) until `POST /.demo/recover`;
//! `GET /.origin/stats` reports the requests served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Who this origin says it is.
#[derive(Debug, Clone)]
pub struct OriginIdentity {
    /// A name, e.g. `us-east-1-a`.
    pub name: String,
    /// The region it stands in, reported in `x-origin-region` unless a request overrides it.
    pub region: String,
}

#[derive(Debug)]
struct OriginState {
    identity: OriginIdentity,
    failing: AtomicBool,
    served: AtomicU64,
}

/// A running origin. Dropping it does not stop it; call [`Origin::stop`].
#[derive(Debug)]
pub struct Origin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Origin {
    /// Bind `listen` (port 0 for any free port) and serve until stopped.
    pub async fn start(listen: SocketAddr, identity: OriginIdentity) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(OriginState {
            identity,
            failing: AtomicBool::new(false),
            served: AtomicU64::new(0),
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state.clone(), rx));
        Ok(Origin {
            addr,
            state,
            shutdown,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far (control paths excluded).
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Make every answer a 503 (true) or back to normal (false).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::Relaxed);
    }

    /// Stop accepting and close every open connection, as a crashed process would.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Serve until the process ends.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<OriginState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Connections live in the set so that stopping the origin drops (aborts) them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

/// The shape a request asks for, read from its query string.
#[derive(Debug, Default, PartialEq)]
struct Shape {
    size: Option<usize>,
    delay: Option<Duration>,
    status: Option<u16>,
    cache_control: Option<String>,
    region: Option<String>,
    etag: Option<String>,
    echo: bool,
}

impl Shape {
    fn parse(query: Option<&str>) -> Result<Shape, String> {
        let mut shape = Shape::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "size" => shape.size = Some(v.parse().map_err(|_| format!("bad size `{v}`"))?),
                "delay" => shape.delay = Some(parse_delay(&v)?),
                "status" => {
                    let code: u16 = v.parse().map_err(|_| format!("bad status `{v}`"))?;
                    StatusCode::from_u16(code).map_err(|_| format!("bad status `{v}`"))?;
                    shape.status = Some(code);
                }
                "cache-control" => shape.cache_control = Some(v),
                "region" => shape.region = Some(v),
                "etag" => shape.etag = Some(v),
                "echo" => shape.echo = v != "0",
                _ => {}
            }
        }
        Ok(shape)
    }
}

fn parse_delay(v: &str) -> Result<Duration, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(v).map_err(|e| format!("bad delay `{v}`: {e}"))
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some((hi, lo)), _) => {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(text.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    resp
}

async fn handle(
    state: Arc<OriginState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/.demo/fail") => {
            state.failing.store(true, Ordering::Relaxed);
            return Ok(plain(
                StatusCode::OK,
                format!("{} is now failing\n", state.identity.name),
            ));
        }
        (&Method::POST, "/.demo/recover") => {
            state.failing.store(false, Ordering::Relaxed);
            return Ok(plain(
                StatusCode::OK,
                format!("{} is healthy again\n", state.identity.name),
            ));
        }
        (&Method::GET, "/.origin/stats") => {
            let body = serde_json::json!({
                "name": state.identity.name,
                "region": state.identity.region,
                "served": state.served.load(Ordering::Relaxed),
                "failing": state.failing.load(Ordering::Relaxed),
            });
            return Ok(json(StatusCode::OK, &body));
        }
        _ => {}
    }
    state.served.fetch_add(1, Ordering::Relaxed);
    let shape = match Shape::parse(req.uri().query()) {
        Ok(s) => s,
        Err(e) => return Ok(plain(StatusCode::BAD_REQUEST, e + "\n")),
    };
    if let Some(delay) = shape.delay {
        tokio::time::sleep(delay).await;
    }
    let region = shape
        .region
        .clone()
        .unwrap_or_else(|| state.identity.region.clone());
    let mut resp = if state.failing.load(Ordering::Relaxed) {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{} is failing (demo)\n", state.identity.name),
        )
    } else {
        let status = shape
            .status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        match shape.size {
            Some(size) => {
                let mut r = Response::new(Full::new(Bytes::from(vec![b'x'; size])));
                r.headers_mut().insert(
                    "content-type",
                    HeaderValue::from_static("application/octet-stream"),
                );
                *r.status_mut() = status;
                r
            }
            None => {
                let method = req.method().to_string();
                let mut body = serde_json::json!({
                    "origin": state.identity.name,
                    "region": region,
                    "method": method,
                    "path": path,
                });
                if shape.echo {
                    let headers: serde_json::Map<String, serde_json::Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into(),
                            )
                        })
                        .collect();
                    body["headers"] = headers.into();
                }
                // Drain the body so keep-alive stays usable for POSTs.
                let _ = req.into_body().collect().await;
                json(status, &body)
            }
        }
    };
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-origin-name", Some(state.identity.name.as_str())),
        ("x-origin-region", Some(region.as_str())),
        ("cache-control", shape.cache_control.as_deref()),
        ("etag", shape.etag.as_deref()),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut text = body.to_string();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_reads_every_parameter() {
        let s = Shape::parse(Some(
            "size=10&delay=50ms&status=201&cache-control=max-age%3D60&region=eu&etag=v1&echo=1",
        ))
        .unwrap();
        assert_eq!(
            s,
            Shape {
                size: Some(10),
                delay: Some(Duration::from_millis(50)),
                status: Some(201),
                cache_control: Some("max-age=60".into()),
                region: Some("eu".into()),
                etag: Some("v1".into()),
                echo: true,
            }
        );
    }

    #[test]
    fn bare_delay_number_is_milliseconds_and_bad_values_are_errors() {
        assert_eq!(
            Shape::parse(Some("delay=20")).unwrap().delay,
            Some(Duration::from_millis(20))
        );
        assert!(Shape::parse(Some("status=99")).is_err());
        assert!(Shape::parse(Some("size=big")).is_err());
    }

    #[test]
    fn percent_decoding_handles_truncated_escapes() {
        assert_eq!(percent_decode("a%2Cb"), "a,b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("100%"), "100%");
    }
}

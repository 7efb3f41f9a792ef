//! Client connections before Pingora's proxy sees them: a connection limit
//! (`server.max_connections`, nginx's `worker_connections`), a deadline for
//! a whole request head (`server.header_read_timeout`, nginx's
//! `client_header_timeout`: 408 and close), and the keep-alive wait
//! (`server.keepalive_timeout`).
//!
//! The wait for a request's first bytes happens here, in a small future:
//! Pingora's own keep-alive loop enters its (large, boxed) request future
//! at once and holds it while the connection idles. The head we read is
//! handed to Pingora as a "pipelined prefix", which its parser reads before
//! the socket, so the proxy path is unchanged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::service::EdgeProxy;

/// A request head larger than this is refused (Pingora's own limit is 1 MiB;
/// nginx's `large_client_header_buffers` default is 32 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// Limits applied to client connections.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Open client connections at most; 0 is no limit.
    pub max_connections: usize,
    /// A request head must arrive within this, from its first byte (or from accept).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
}

/// Pingora's HTTP proxy behind our connection handling.
pub struct EdgeApp {
    proxy: Arc<HttpProxy<EdgeProxy>>,
    limits: ClientLimits,
    open: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Counts one open connection until dropped.
struct Open<'a>(&'a AtomicUsize, &'a Metrics);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.client_connections.dec();
    }
}

/// How waiting for a request head ended.
enum Head {
    /// A complete head (and perhaps the start of the body).
    Ready(BytesMut),
    /// The client closed, idled out, or the server is stopping: close quietly.
    Close,
    /// The head did not complete in time: 408.
    TimedOut,
    /// Larger than `MAX_HEAD`: 431.
    TooLarge,
}

impl EdgeApp {
    /// Wrap a proxy with client limits.
    pub fn new(proxy: HttpProxy<EdgeProxy>, limits: ClientLimits, metrics: Arc<Metrics>) -> Self {
        EdgeApp {
            proxy: Arc::new(proxy),
            limits,
            open: AtomicUsize::new(0),
            metrics,
        }
    }

    fn admit(&self) -> Option<Open<'_>> {
        let max = self.limits.max_connections;
        let admitted = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| {
            self.metrics.client_connections.inc();
            Open(&self.open, &self.metrics)
        })
    }

    /// Read one request head: the first byte within `idle` (None: the
    /// header deadline applies from now), the rest within the header deadline.
    async fn read_head(
        &self,
        stream: &mut Stream,
        idle: Option<Duration>,
        shutdown: &mut ShutdownWatch,
    ) -> Head {
        let mut first = [0u8; 1];
        let header_deadline = self.limits.header_read_timeout;
        let wait = idle.unwrap_or(header_deadline);
        let n = tokio::select! {
            r = tokio::time::timeout(wait, stream.read(&mut first)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return Head::Close,
                // An idle keep-alive connection simply closes; a new one
                // that never sent a byte gets 408 as nginx does.
                Err(_) if idle.is_some() => return Head::Close,
                Err(_) => return Head::TimedOut,
            },
            _ = shutdown.changed() => return Head::Close,
        };
        if n == 0 {
            return Head::Close;
        }
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(&first);
        let rest = async {
            loop {
                if head_complete(&buf) {
                    return Head::Ready(std::mem::take(&mut buf));
                }
                if buf.len() > MAX_HEAD {
                    return Head::TooLarge;
                }
                buf.reserve(4096);
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Head::Close,
                    Ok(_) => {}
                }
            }
        };
        match tokio::time::timeout(header_deadline, rest).await {
            Ok(head) => head,
            Err(_) => Head::TimedOut,
        }
    }

    async fn refuse(&self, mut stream: Stream, status: &str, kind: &'static str) {
        self.metrics
            .client_refusals
            .with_label_values(&[kind])
            .inc();
        tracing::info!(target: "edge_router::access", status, kind, "request head refused");
        let resp = format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ncache-control: no-store\r\n\r\n"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// The head ends at the first empty line (`\r\n\r\n`, or a bare `\n\n`,
/// which Pingora's parser also accepts).
fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(_open) = self.admit() else {
            self.metrics
                .client_refusals
                .with_label_values(&["max_connections"])
                .inc();
            // Closing at once is the refusal: nothing was read, nothing is owed.
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own idle and header handling in Pingora.
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let mut shutdown_rx = shutdown.clone();
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut idle = None;
        loop {
            let head = match self.read_head(&mut stream, idle, &mut shutdown_rx).await {
                Head::Ready(head) => head,
                Head::Close => return None,
                Head::TimedOut => {
                    self.refuse(stream, "408 Request Timeout", "header_timeout")
                        .await;
                    return None;
                }
                Head::TooLarge => {
                    self.refuse(
                        stream,
                        "431 Request Header Fields Too Large",
                        "header_too_large",
                    )
                    .await;
                    return None;
                }
            };
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                None => session.set_keepalive(Some(self.limits.keepalive_timeout.as_secs().max(1))),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            session.set_pipelined_prefix(head);
            let reused = HttpServerApp::process_new_http(&self.proxy, session, shutdown).await?;
            let (next, persistent) = reused.consume();
            stream = next;
            settings = persistent;
            idle = Some(self.limits.keepalive_timeout);
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::head_complete;

    #[test]
    fn heads_end_at_the_first_empty_line() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
    }
}

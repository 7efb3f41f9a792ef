//! Client connections before Pingora's proxy sees them: a connection limit
//! (`server.max_connections`, nginx's `worker_connections`: at the limit an
//! idle keep-alive connection is closed to make room, as nginx does, and
//! only when none is idle is the new one refused), a deadline for a whole
//! request head (`server.header_read_timeout`, nginx's
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

use tokio::sync::Notify;
use tokio::time::Instant;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::service::EdgeProxy;

/// A request head larger than this is refused (Pingora's own limit is 1 MiB;
/// nginx's `large_client_header_buffers` default is 32 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// The first read of each request head, into the connection's own future.
const FIRST_READ: usize = 1024;
/// Blank lines a client may send before a request line (RFC 9112 2.2 says
/// to ignore "at least one"); more is refused rather than read forever.
const MAX_LEADING_BLANK: usize = 8;

/// Limits applied to client connections.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Open client connections at most; 0 is no limit.
    pub max_connections: usize,
    /// A request head must arrive within this, from its first byte (or from accept).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
    /// A connection opening with the HTTP/2 preface is served in HTTP/2 (h2c).
    pub h2c: bool,
}

/// Pingora's HTTP proxy behind our connection handling.
pub struct EdgeApp {
    proxy: Arc<HttpProxy<EdgeProxy>>,
    limits: ClientLimits,
    open: AtomicUsize,
    /// Connections waiting for their next request (keep-alive idle).
    idle: AtomicUsize,
    /// Wakes one idle connection to close when the limit is reached.
    reclaim: Notify,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
}

/// Counts one idle keep-alive wait until dropped.
struct Idle<'a>(&'a AtomicUsize);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
    /// Not a request head at all: 400.
    Invalid,
    /// The HTTP/2 connection preface (h2c with prior knowledge), as read.
    H2Preface(BytesMut),
}

tokio::task_local! {
    /// Set when Pingora accepted the head handed to it and made the
    /// request's context (the proxy then logs it): one that Pingora refuses
    /// first (a head its parser rejects, CONNECT) leaves it unset.
    static REACHED: std::cell::Cell<bool>;
}

/// The proxy has the current request (called from its `new_ctx`).
pub fn note_reached() {
    let _ = REACHED.try_with(|l| l.set(true));
}

/// Up to this much of a request line is kept to log a request Pingora refuses.
const LINE_KEPT: usize = 256;

/// The start of a request's first line, kept while Pingora reads the head.
struct RequestLine {
    bytes: [u8; LINE_KEPT],
    len: usize,
}

impl RequestLine {
    fn of(head: &[u8]) -> RequestLine {
        let start = head
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(head.len());
        let line = &head[start..];
        let end = line
            .iter()
            .position(|b| *b == b'\r' || *b == b'\n')
            .unwrap_or(line.len())
            .min(LINE_KEPT);
        let mut bytes = [0u8; LINE_KEPT];
        bytes[..end].copy_from_slice(&line[..end]);
        RequestLine { bytes, len: end }
    }

    /// Method and target, as far as they can be read (`-` otherwise).
    fn parts(&self) -> (String, String) {
        let text = String::from_utf8_lossy(&self.bytes[..self.len]);
        let mut words = text.split(' ');
        let method = words.next().filter(|w| !w.is_empty()).unwrap_or("-");
        let target = words.next().unwrap_or("-");
        (
            method.escape_default().to_string(),
            target.escape_default().to_string(),
        )
    }
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the bytes so far hold a whole request head, judged as Pingora's
/// parser (httparse) will judge them, so that Pingora never has to read
/// head bytes from the socket itself (it would do so without our deadline).
#[derive(Debug, PartialEq, Eq)]
enum HeadState {
    /// Not yet: keep reading.
    Partial,
    /// Complete, or malformed: hand it to Pingora (which answers 400 to the latter).
    HandOver,
    /// Too many blank lines before the request line.
    Garbage,
}

/// `scanned` is how far earlier calls looked (the terminator search resumes
/// there, so a client sending a byte at a time costs linear work).
///
/// httparse skips blank lines before the request line, and after a
/// non-empty line the first empty line ends the head (or the head is
/// malformed: obs-fold is refused), so "an empty line after the leading
/// blank lines" is exactly when httparse stops saying "partial".
fn head_state(buf: &[u8], scanned: &mut usize) -> HeadState {
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if blank > MAX_LEADING_BLANK {
        return HeadState::Garbage;
    }
    let from = (*scanned).max(blank);
    let rest = &buf[from.saturating_sub(2).max(blank)..];
    let ends = rest.windows(2).any(|w| w == b"\n\n") || rest.windows(3).any(|w| w == b"\n\r\n");
    *scanned = buf.len();
    if ends {
        HeadState::HandOver
    } else {
        HeadState::Partial
    }
}

/// Where a complete head ends (its blank line included), as `head_state`
/// finds it: the first empty line, CRLF or bare LF.
fn head_len(buf: &[u8]) -> usize {
    // Blank lines before the request line are skipped, as `head_state` does.
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let rest = &buf[blank..];
    let lf = rest.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    let crlf = rest.windows(3).position(|w| w == b"\n\r\n").map(|p| p + 3);
    blank
        + match (lf, crlf) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(rest.len()),
        }
}

impl EdgeApp {
    /// Wrap a proxy with client limits.
    pub fn new(
        proxy: HttpProxy<EdgeProxy>,
        limits: ClientLimits,
        metrics: Arc<Metrics>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        EdgeApp {
            proxy: Arc::new(proxy),
            limits,
            open: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            reclaim: Notify::new(),
            metrics,
            lifecycle,
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
        let admitted = admitted || {
            // At the limit: like nginx, close an idle keep-alive connection
            // to make room, and admit this one (the count is over the limit
            // by one until the idle one has gone).
            let reclaimable = self.idle.load(Ordering::Relaxed) > 0;
            if reclaimable {
                self.reclaim.notify_one();
                self.open.fetch_add(1, Ordering::Relaxed);
            }
            reclaimable
        };
        admitted.then(|| {
            self.metrics.client_connections.inc();
            Open(&self.open, &self.metrics)
        })
    }

    /// Read one request head. On a new connection (`idle` None) the whole
    /// head, first byte included, must arrive within the header deadline; on
    /// a kept-alive one the first byte may take `idle`, and the deadline
    /// counts from it.
    async fn read_head(
        &self,
        stream: &mut Stream,
        idle: Option<Duration>,
        shutdown: &mut ShutdownWatch,
    ) -> Head {
        let header_timeout = self.limits.header_read_timeout;
        // Most request heads fit in this: one read call per request, as with
        // Pingora's own buffer, while an idle connection holds only this
        // much (not a heap buffer) while it waits.
        let mut first = [0u8; FIRST_READ];
        let first_deadline = Instant::now() + idle.unwrap_or(header_timeout);
        let n = {
            let _idle = idle.map(|_| {
                self.idle.fetch_add(1, Ordering::Relaxed);
                Idle(&self.idle)
            });
            tokio::select! {
                r = tokio::time::timeout_at(first_deadline, stream.read(&mut first)) => match r {
                    Ok(Ok(n)) => n,
                    // Nothing was asked, so nothing is answered: an idle or
                    // preconnected socket just closes (nginx does the same).
                    Ok(Err(_)) | Err(_) => return Head::Close,
                },
                // An idle keep-alive connection closes on shutdown; a new one
                // was accepted to be answered (its request may be on the way
                // as the listener closes, during a graceful upgrade too).
                _ = shutdown.changed(), if idle.is_some() => return Head::Close,
                _ = self.reclaim.notified(), if idle.is_some() => return Head::Close,
            }
        };
        if n == 0 {
            return Head::Close;
        }
        let deadline = match idle {
            Some(_) => Instant::now() + header_timeout,
            None => first_deadline,
        };
        let mut buf = BytesMut::with_capacity(n.max(4096));
        buf.extend_from_slice(&first[..n]);
        let mut scanned = 0;
        // Only a connection's first bytes can be the HTTP/2 preface.
        let mut h2c = self.limits.h2c && idle.is_none() && stream.get_ssl_digest().is_none();
        let rest = async {
            loop {
                if h2c {
                    let n = buf.len().min(H2_PREFACE.len());
                    if buf[..n] != H2_PREFACE[..n] {
                        h2c = false;
                    } else if n == H2_PREFACE.len() {
                        return Head::H2Preface(std::mem::take(&mut buf));
                    } else {
                        // A strict prefix of the preface: read on (it holds
                        // a blank line, which would end an HTTP/1 head).
                        buf.reserve(64);
                        match stream.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return Head::Close,
                            Ok(_) => continue,
                        }
                    }
                }
                match head_state(&buf, &mut scanned) {
                    // A whole head that arrived at once can still be too
                    // large (the read may also hold the body's start).
                    HeadState::HandOver if buf.len() > MAX_HEAD && head_len(&buf) > MAX_HEAD => {
                        return Head::TooLarge
                    }
                    HeadState::HandOver => return Head::Ready(std::mem::take(&mut buf)),
                    HeadState::Garbage => return Head::Invalid,
                    HeadState::Partial if buf.len() > MAX_HEAD => return Head::TooLarge,
                    HeadState::Partial => {}
                }
                buf.reserve(4096);
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Head::Close,
                    Ok(_) => {}
                }
            }
        };
        match tokio::time::timeout_at(deadline, rest).await {
            Ok(head) => head,
            Err(_) => Head::TimedOut,
        }
    }

    /// One access-log line and one count for a response made before the
    /// proxy saw the request (ours, or Pingora's parser's).
    fn log_rejected(
        &self,
        line: &RequestLine,
        client: Option<&pingora::protocols::l4::socket::SocketAddr>,
        status: u16,
        kind: &'static str,
    ) {
        self.metrics
            .requests
            .with_label_values(&["-", "none", kind, crate::metrics::status_class(status)])
            .inc();
        let (method, path) = line.parts();
        tracing::info!(
            target: "edge_router::access",
            client = client.map(|c| c.to_string()),
            method,
            path,
            status,
            route = "-",
            region = "none",
            decision = kind,
            outcome = "rejected",
            "request"
        );
    }

    async fn refuse(
        &self,
        mut stream: Stream,
        status: &str,
        kind: &'static str,
        line: Option<&RequestLine>,
    ) {
        self.metrics
            .client_refusals
            .with_label_values(&[kind])
            .inc();
        let code = status
            .split(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(400);
        let client = stream.get_socket_digest();
        let empty = RequestLine::of(b"");
        self.log_rejected(
            line.unwrap_or(&empty),
            client.as_ref().and_then(|d| d.peer_addr()),
            code,
            kind,
        );
        let resp = format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ncache-control: no-store\r\n\r\n"
        );
        // A lingering close: the client may still be sending (a large
        // head), and closing with unread data makes the kernel reset the
        // connection, losing the answer. Read and discard briefly first.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
            // On the heap: a buffer here would be part of every connection's
            // future (refusing is one of its states), idle ones included.
            let mut sink = vec![0u8; 4096];
            let mut drained = 0;
            while drained < 256 * 1024 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }
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
                Head::H2Preface(preface) => {
                    // Pingora's HTTP/2 server reads the preface again. Only
                    // plain listeners get here, and their stream is L4's.
                    let Ok(mut l4) = stream.into_any().downcast::<L4Stream>() else {
                        tracing::warn!(
                            "h2c: a connection whose stream is not a plain socket was closed"
                        );
                        self.metrics
                            .client_refusals
                            .with_label_values(&["h2c_unsupported"])
                            .inc();
                        return None;
                    };
                    l4.rewind(&preface);
                    return ServerApp::process_new(&self.proxy, l4, shutdown).await;
                }
                Head::Close => return None,
                Head::Invalid => {
                    self.refuse(stream, "400 Bad Request", "header_invalid", None)
                        .await;
                    return None;
                }
                Head::TimedOut => {
                    self.refuse(stream, "408 Request Timeout", "header_timeout", None)
                        .await;
                    return None;
                }
                Head::TooLarge => {
                    self.refuse(
                        stream,
                        "431 Request Header Fields Too Large",
                        "header_too_large",
                        None,
                    )
                    .await;
                    return None;
                }
            };
            // A request has been received: it counts as in flight for the
            // shutdown watcher from now on, not only once Pingora has a context.
            let _in_flight = self.lifecycle.enter_pending();
            let line = RequestLine::of(&head);
            let client = stream.get_socket_digest();
            let mut session = ServerSession::new_http1(stream);
            if let Some(s) = settings.take() {
                // Pipelining is off (Pingora's default, never enabled here),
                // so persisted settings carry no pipelined prefix of their own.
                s.apply_to_session(&mut session);
            }
            // Our wait enforces keep-alive; Pingora's value (which it may have
            // persisted as "infinite") only shapes its `Connection` header.
            session.set_keepalive(if *shutdown.borrow() {
                None
            } else {
                Some(self.limits.keepalive_timeout.as_secs().max(1))
            });
            session.set_pipelined_prefix(head);
            let (reused, reached) = REACHED
                .scope(std::cell::Cell::new(false), async {
                    let reused =
                        HttpServerApp::process_new_http(&self.proxy, session, shutdown).await;
                    (reused, REACHED.with(|l| l.get()))
                })
                .await;
            if !reached && !*shutdown.borrow() {
                // We hold a whole head, so Pingora's reading it cannot have
                // failed for want of bytes: it refused it (its parser: 400;
                // CONNECT: 405) and closed. Nobody else logs or counts that.
                let (status, kind) = if line.parts().0 == "CONNECT" {
                    (405, "connect-refused")
                } else {
                    (400, "bad-request")
                };
                self.log_rejected(
                    &line,
                    client.as_ref().and_then(|d| d.peer_addr()),
                    status,
                    kind,
                );
            }
            let reused = reused?;
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
    use super::{head_state, HeadState};

    fn state(buf: &[u8]) -> HeadState {
        head_state(buf, &mut 0)
    }

    #[test]
    fn heads_end_where_pingoras_parser_ends_them() {
        assert_eq!(
            state(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            HeadState::HandOver
        );
        assert_eq!(state(b"GET / HTTP/1.1\nHost: a\n\n"), HeadState::HandOver);
        assert_eq!(
            state(b"GET / HTTP/1.1\r\nHost: a\n\r\n"),
            HeadState::HandOver
        );
        assert_eq!(state(b"GET / HTTP/1.1\r\nHost: a\r\n"), HeadState::Partial);
        // Leading blank lines are skipped by the parser: they end nothing.
        assert_eq!(state(b"\r\n\r\n"), HeadState::Partial);
        assert_eq!(
            state(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"),
            HeadState::Partial
        );
        assert_eq!(state(&[b'\n'; 20]), HeadState::Garbage);
        // Garbage with an empty line goes to Pingora, which answers 400 at once.
        assert_eq!(state(b"\x16\x03\x01 hello\n\n"), HeadState::HandOver);
    }

    #[test]
    fn a_byte_at_a_time_is_found_where_it_ends() {
        let head = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut scanned = 0;
        for end in 1..head.len() {
            assert_eq!(
                head_state(&head[..end], &mut scanned),
                HeadState::Partial,
                "{end}"
            );
        }
        assert_eq!(head_state(head, &mut scanned), HeadState::HandOver);
    }

    proptest::proptest! {
        /// Whatever the bytes, "hand over" agrees with httparse: never a head it calls partial.
        #[test]
        fn agrees_with_httparse(head in proptest::collection::vec(proptest::sample::select(b"GET / HTTP/1.1\r\nHost:a \t".to_vec()), 0..60)) {
            if state(&head) == HeadState::HandOver {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let parsed = httparse::Request::new(&mut headers).parse(&head);
                proptest::prop_assert!(!matches!(parsed, Ok(httparse::Status::Partial)), "{:?}", String::from_utf8_lossy(&head));
            }
        }
    }
}

//! TLS towards backends and peer regions, opened by us and handed to
//! Pingora as a connected socket, so that every connection to a backend
//! shares one rustls client configuration and with it one session cache:
//! a reconnection resumes the last session instead of a full handshake.
//!
//! Pingora 0.9's own connector builds a fresh client configuration (and so
//! an empty session cache) for every connection whose peer names a CA
//! bundle or a client certificate, which every peer region under mutual
//! TLS does. HTTP/2 backends keep Pingora's connector: they multiplex one
//! connection, and HTTP/2 needs Pingora to know the stream is TLS.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::ext::set_tcp_keepalive;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::{Error, ErrorType, Result};
use prometheus::IntCounterVec;
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Opens a TCP connection and a TLS session over it, verified against the
/// shared configuration's roots for `name`.
#[derive(Debug)]
pub struct TlsConnect {
    /// Shared by every connection to these backends (its session cache too).
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and verified in the certificate.
    pub name: ServerName<'static>,
    /// Bound on the TCP connect and the handshake together.
    pub timeout: Duration,
    /// `edge_upstream_tls_handshakes_total`, already labelled with the target.
    pub handshakes: Option<HandshakeCounter>,
}

/// Counts handshakes by kind (full, resumed) for one upstream or the peers.
#[derive(Clone, Debug)]
pub struct HandshakeCounter {
    /// The metric.
    pub metric: IntCounterVec,
    /// The `target` label: an upstream's name, or `peers`.
    pub target: String,
}

#[async_trait]
impl L4Connect for TlsConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "TLS backends are TCP addresses");
        };
        let inet = *inet;
        let open = async {
            let tcp = TcpStream::connect(inet).await.map_err(|e| {
                let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
                    ErrorType::ConnectRefused
                } else {
                    ErrorType::ConnectError
                };
                Error::because(kind, format!("connecting to {inet}"), e)
            })?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(self.config.clone())
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| {
                    Error::because(
                        ErrorType::TLSHandshakeFailure,
                        format!("TLS handshake with {inet} as {}", self.name.to_str()),
                        e,
                    )
                })
        };
        let tls = match tokio::time::timeout(self.timeout, open).await {
            Ok(r) => r?,
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("connecting to {inet} over TLS: timeout {:?}", self.timeout),
                )
            }
        };
        if let Some(c) = &self.handshakes {
            let kind = match tls.get_ref().1.handshake_kind() {
                Some(HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            c.metric.with_label_values(&[c.target.as_str(), kind]).inc();
        }
        Ok(VirtualSocketStream::new(Box::new(TlsSocket(tls))).into())
    }
}

/// A client TLS session over TCP, as Pingora's virtual socket.
#[derive(Debug)]
struct TlsSocket(TlsStream<TcpStream>);

impl VirtualSocket for TlsSocket {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        let tcp = self.0.get_ref().0;
        match opt {
            VirtualSockOpt::NoDelay => tcp.set_nodelay(true),
            VirtualSockOpt::KeepAlive(ka) => {
                set_tcp_keepalive(tcp, &ka).map_err(|e| io::Error::other(e.to_string()))
            }
            _ => Ok(()),
        }
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

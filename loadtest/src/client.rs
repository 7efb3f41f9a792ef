//! One client connection: HTTP/1.1 with keep-alive, or HTTP/2 (h2c, or TLS
//! with ALPN). hyper's connection-level API keeps us in charge of when a
//! connection is opened, so connect errors are counted, not hidden in a pool.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::target::Target;

/// Why a request did not produce a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// TCP or TLS connection could not be made.
    Connect,
    /// No complete response within the timeout.
    Timeout,
    /// The connection closed or reset before the response completed.
    Reset,
    /// Anything else (protocol errors).
    Other,
}

/// How connections are made.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Speak HTTP/2 (h2c on http://, ALPN h2 on https://).
    pub http2: bool,
    /// TLS client config for https targets.
    pub tls: Arc<rustls::ClientConfig>,
}

/// An open connection.
pub enum Conn {
    /// HTTP/1.1.
    H1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2.
    H2(http2::SendRequest<Full<Bytes>>),
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Open a connection to `target`.
pub async fn connect(target: &Target, opts: &ConnectOptions) -> Result<Conn, ErrorKind> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if target.tls {
        let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())
            .map_err(|_| ErrorKind::Connect)?;
        let tls = tokio_rustls::TlsConnector::from(opts.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|_| ErrorKind::Connect)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let io = TokioIo::new(io);
    if opts.http2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|_| ErrorKind::Connect)?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await.map_err(|_| ErrorKind::Connect)?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

fn classify(e: &hyper::Error) -> ErrorKind {
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return ErrorKind::Reset;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Reset,
            };
        }
        source = s.source();
    }
    ErrorKind::Other
}

impl Conn {
    /// Wait until the connection can take a request; false when the server
    /// closed it (e.g. after its keep-alive limit): reconnect, it is no error.
    pub async fn ready(&mut self) -> bool {
        match self {
            Conn::H1(s) => s.ready().await.is_ok(),
            Conn::H2(s) => s.ready().await.is_ok(),
        }
    }

    /// Send one request and read the whole response; returns status and body bytes.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<(u16, u64), ErrorKind> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready().await.map_err(|e| classify(&e))?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                s.ready().await.map_err(|e| classify(&e))?;
                s.send_request(req).await
            }
        }
        .map_err(|e| classify(&e))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| classify(&e))?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
            }
        }
        Ok((status, bytes))
    }
}

/// TLS config: the system's roots, or (with `insecure`) no verification, for dev certificates.
pub fn tls_config(
    insecure: bool,
    http2: bool,
    resume: bool,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    if !resume {
        // Every new connection a full handshake: what first-time clients cost.
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// Accepts any certificate: only for `--insecure` against dev certificates.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

//! How the proxy speaks to an upstream's backends: plain HTTP/1.1, TLS
//! (verified against a configured CA bundle or the system's roots, with an
//! SNI of choice), HTTP/2 over TLS by ALPN, or HTTP/2 in cleartext (gRPC
//! servers without TLS). Used by `upstream_peer` and by the health prober,
//! so that a backend is probed the way it is spoken to.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};
use rustls::pki_types::CertificateDer;

use crate::config::{UpstreamProtocol, UpstreamTransport};

/// Idle upstream connections are kept this long for reuse.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// One upstream's transport, with its CA bundle loaded.
#[derive(Clone)]
pub struct BackendTransport {
    /// TLS to the backends.
    pub tls: bool,
    /// Server name to send and verify.
    pub sni: Option<String>,
    /// CA certificates (DER) to verify against; `None`: the system's roots.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    ca_pingora: Option<Arc<[WrappedX509]>>,
    /// The protocol.
    pub protocol: UpstreamProtocol,
}

impl std::fmt::Debug for BackendTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTransport")
            .field("tls", &self.tls)
            .field("sni", &self.sni)
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl BackendTransport {
    /// Plain HTTP/1.1 (peers, and upstreams without TLS settings).
    pub fn plain() -> BackendTransport {
        BackendTransport {
            tls: false,
            sni: None,
            ca: None,
            ca_pingora: None,
            protocol: UpstreamProtocol::Http1,
        }
    }

    /// Load `t`'s CA bundle.
    pub fn load(t: &UpstreamTransport) -> Result<BackendTransport, String> {
        let ca = match &t.ca {
            Some(path) => Some(load_ca(path)?),
            None => None,
        };
        let ca_pingora = ca.as_ref().map(|certs| {
            certs
                .iter()
                .map(|c| WrappedX509::new(c.as_ref().to_vec(), parse_x509))
                .collect::<Vec<_>>()
                .into()
        });
        Ok(BackendTransport {
            tls: t.tls,
            sni: t.sni.clone(),
            ca,
            ca_pingora,
            protocol: t.protocol,
        })
    }

    /// The server name for a backend at `addr`.
    pub fn sni_for(&self, addr: SocketAddr) -> String {
        self.sni.clone().unwrap_or_else(|| addr.ip().to_string())
    }

    /// A peer for the backend at `addr`.
    pub fn peer(&self, addr: SocketAddr, connect: Duration, read: Duration) -> Box<HttpPeer> {
        let sni = if self.tls {
            self.sni_for(addr)
        } else {
            String::new()
        };
        // `new` resolves through ToSocketAddrs, which for an already-parsed SocketAddr cannot fail.
        let mut peer = HttpPeer::new(addr, self.tls, sni);
        peer.options.connection_timeout = Some(connect);
        peer.options.read_timeout = Some(read);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        if self.tls {
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            peer.options.ca = self.ca_pingora.clone();
        }
        match self.protocol {
            UpstreamProtocol::Http1 => peer.options.alpn = ALPN::H1,
            UpstreamProtocol::H2 => peer.options.alpn = ALPN::H2,
            UpstreamProtocol::H2c => peer.options.set_http_version(2, 2),
        }
        Box::new(peer)
    }

    /// The rustls client configuration the health prober uses for this upstream.
    pub fn probe_tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        if !self.tls {
            return None;
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(certs) => {
                for c in certs {
                    let _ = roots.add(c.clone());
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let provider = edge_certs::tls::provider();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = match self.protocol {
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            _ => vec![b"http/1.1".to_vec()],
        };
        Some(Arc::new(config))
    }
}

fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    for c in &certs {
        // Pingora parses these again and would panic on one it cannot read.
        edge_certs::dir::describe(c).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(certs)
}

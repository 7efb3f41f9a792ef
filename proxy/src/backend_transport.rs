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
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{PeerTls, UpstreamProtocol, UpstreamTransport};

/// A client certificate presented to the other side (mutual TLS).
struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pingora: Arc<CertKey>,
}

impl Clone for ClientCert {
    fn clone(&self) -> Self {
        ClientCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            pingora: self.pingora.clone(),
        }
    }
}

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
    client: Option<ClientCert>,
    /// The rustls configuration probes and one-shot requests use (built once).
    probe: Option<Arc<rustls::ClientConfig>>,
    /// The CA and client certificate are the proxy's connector's own (the
    /// peers'), not set per connection: see [`BackendTransport::connector_options`].
    in_connector: bool,
    /// Pingora's pool key part for this transport.
    id: u64,
}

impl std::fmt::Debug for BackendTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTransport")
            .field("tls", &self.tls)
            .field("sni", &self.sni)
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("protocol", &self.protocol)
            .field("client_cert", &self.client.is_some())
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
            client: None,
            probe: None,
            in_connector: false,
            id: 0,
        }
    }

    /// Peers over mutual TLS: verified against the regions' CA, presenting
    /// this region's certificate. Both are the proxy connector's own
    /// ([`BackendTransport::connector_options`]), so connections to peers
    /// share one TLS configuration and resume each other's sessions.
    pub fn for_peers(p: &PeerTls) -> Result<BackendTransport, String> {
        // Pingora reads these files again for its connector, and panics on
        // what it cannot load: try its loaders first.
        let mut roots = rustls::RootCertStore::empty();
        pingora::tls::load_ca_file_into_store(&p.ca, &mut roots)
            .map_err(|e| format!("{}: {e}", p.ca.display()))?;
        let (cert, key) = (p.cert.to_string_lossy(), p.key.to_string_lossy());
        match pingora::tls::load_certs_and_key_files(&cert, &key) {
            Ok(Some((chain, _))) if !chain.is_empty() => {}
            Ok(_) => return Err(format!("{cert} / {key}: no certificate and key")),
            Err(e) => return Err(format!("{cert} / {key}: {e}")),
        }
        let mut out = BackendTransport::load(
            &UpstreamTransport {
                tls: true,
                sni: None,
                ca: Some(p.ca.clone()),
                protocol: UpstreamProtocol::Http1,
                client_cert: Some((p.cert.clone(), p.key.clone())),
            },
            false,
        )?;
        out.in_connector = true;
        out.id = out.pool_id(&UpstreamTransport {
            tls: true,
            sni: None,
            ca: Some(p.ca.clone()),
            protocol: UpstreamProtocol::Http1,
            client_cert: Some((p.cert.clone(), p.key.clone())),
        });
        Ok(out)
    }

    /// The proxy's upstream connector options with the peers' CA and client
    /// certificate in them. Pingora 0.9 builds a new rustls configuration,
    /// and so an empty session cache, for every connection whose peer
    /// carries its own CA or client certificate; a connection using the
    /// connector's shares the connector's, and resumes TLS sessions.
    pub fn connector_options(
        p: &PeerTls,
        base: pingora::connectors::ConnectorOptions,
    ) -> Result<pingora::connectors::ConnectorOptions, String> {
        let path = |f: &Path| {
            f.to_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{}: the path is not UTF-8", f.display()))
        };
        let mut options = base;
        options.ca_file = Some(path(&p.ca)?);
        options.cert_key_file = Some((path(&p.cert)?, path(&p.key)?));
        Ok(options)
    }

    fn load_client(cert: &Path, key: &Path) -> Result<ClientCert, String> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate", cert.display()));
        }
        for c in &chain {
            // Pingora parses these again and would panic on one it cannot read.
            edge_certs::dir::describe(c).map_err(|e| format!("{}: {e}", cert.display()))?;
        }
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let pingora = Arc::new(CertKey::new(
            chain.iter().map(|c| c.as_ref().to_vec()).collect(),
            key.secret_der().to_vec(),
        ));
        Ok(ClientCert {
            chain,
            key,
            pingora,
        })
    }

    /// Load `t`'s CA bundle. `own_roots`: the proxy's connector trusts the
    /// peers' CA (mutual TLS between regions), so a TLS upstream without a
    /// CA bundle carries the system's roots itself.
    pub fn load(t: &UpstreamTransport, own_roots: bool) -> Result<BackendTransport, String> {
        let ca = match &t.ca {
            Some(path) => Some(load_ca(path)?),
            None if t.tls && own_roots => Some(system_roots()?),
            None => None,
        };
        let ca_pingora = ca.as_ref().map(|certs| {
            certs
                .iter()
                .map(|c| WrappedX509::new(c.as_ref().to_vec(), parse_x509))
                .collect::<Vec<_>>()
                .into()
        });
        let client = match &t.client_cert {
            Some((cert, key)) => Some(BackendTransport::load_client(cert, key)?),
            None => None,
        };
        let mut out = BackendTransport {
            tls: t.tls,
            sni: t.sni.clone(),
            ca,
            ca_pingora,
            protocol: t.protocol,
            client,
            probe: None,
            in_connector: false,
            id: 0,
        };
        out.probe = out.build_probe_config()?;
        out.id = out.pool_id(t);
        Ok(out)
    }

    /// Tells apart the connection pools of transports to one address and
    /// name (Pingora's pool key leaves out the CA, and the peers' material
    /// is the connector's, so nothing else separates them): a digest of the
    /// settings and the certificates themselves, so a reload that changes
    /// neither keeps the pooled connections, and one that does gets new ones.
    fn pool_id(&self, t: &UpstreamTransport) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{t:?}").hash(&mut h);
        self.in_connector.hash(&mut h);
        for c in self.ca.iter().flatten() {
            c.as_ref().hash(&mut h);
        }
        if let Some(c) = &self.client {
            for cert in &c.chain {
                cert.as_ref().hash(&mut h);
            }
        }
        // 0 is the pool of plain peers.
        h.finish() | 1
    }

    /// The server name for a backend at `addr`.
    pub fn sni_for(&self, addr: SocketAddr) -> String {
        self.sni.clone().unwrap_or_else(|| addr.ip().to_string())
    }

    /// A peer for the backend at `addr`.
    pub fn peer(&self, addr: SocketAddr, connect: Duration, read: Duration) -> Box<HttpPeer> {
        self.peer_named(addr, None, connect, read)
    }

    /// A peer at `addr` whose TLS server name is `name` (peer regions: the
    /// host their URL names), or the configured one.
    pub fn peer_named(
        &self,
        addr: SocketAddr,
        name: Option<&str>,
        connect: Duration,
        read: Duration,
    ) -> Box<HttpPeer> {
        let sni = match (self.tls, name) {
            (false, _) => String::new(),
            (true, Some(n)) => n.to_string(),
            (true, None) => self.sni_for(addr),
        };
        // `new` resolves through ToSocketAddrs, which for an already-parsed SocketAddr cannot fail.
        let mut peer = HttpPeer::new(addr, self.tls, sni);
        peer.options.connection_timeout = Some(connect);
        peer.options.read_timeout = Some(read);
        peer.options.idle_timeout = Some(UPSTREAM_IDLE);
        if self.tls {
            peer.group_key = self.id;
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            if !self.in_connector {
                peer.options.ca = self.ca_pingora.clone();
                peer.client_cert_key = self.client.as_ref().map(|c| c.pingora.clone());
            }
        }
        match self.protocol {
            UpstreamProtocol::Http1 => peer.options.alpn = ALPN::H1,
            UpstreamProtocol::H2 => peer.options.alpn = ALPN::H2,
            UpstreamProtocol::H2c => peer.options.set_http_version(2, 2),
        }
        Box::new(peer)
    }

    /// The rustls client configuration the health prober (and other
    /// one-shot requests) use for these backends; `None` without TLS.
    pub fn probe_tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.probe.clone()
    }

    fn build_probe_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if !self.tls {
            return Ok(None);
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
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &self.client {
            Some(c) => builder
                .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
                .map_err(|e| format!("client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match self.protocol {
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            _ => vec![b"http/1.1".to_vec()],
        };
        Ok(Some(Arc::new(config)))
    }
}

impl BackendTransport {
    /// One request on a fresh connection to `addr` (TLS with server name
    /// `name`, and the HTTP version, as configured): probes and purges,
    /// which are too rare to keep connections for.
    pub async fn one_shot<B>(
        &self,
        addr: SocketAddr,
        name: &str,
        mut req: http::Request<B>,
    ) -> Option<http::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let h2 = self.protocol != UpstreamProtocol::Http1;
        if h2 {
            // HTTP/2 takes the authority from the URI, not a Host header.
            let host = req
                .headers_mut()
                .remove(http::header::HOST)
                .and_then(|h| h.to_str().ok().map(str::to_string))
                .unwrap_or_else(|| name.to_string());
            let scheme = if self.tls { "https" } else { "http" };
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            *req.uri_mut() = format!("{scheme}://{host}{pq}").parse().ok()?;
        }
        macro_rules! exchange {
            ($io:expr) => {
                if h2 {
                    let (mut sender, conn) =
                        hyper::client::conn::http2::handshake(TokioExecutor::new(), $io)
                            .await
                            .ok()?;
                    tokio::spawn(conn);
                    sender.send_request(req).await.ok()
                } else {
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake($io).await.ok()?;
                    tokio::spawn(conn);
                    sender.send_request(req).await.ok()
                }
            };
        }
        match &self.probe {
            // Never in clear to a backend or peer that is reached over TLS.
            None if self.tls => None,
            Some(config) => {
                let server = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server, tcp)
                    .await
                    .ok()?;
                exchange!(TokioIo::new(tls))
            }
            None => exchange!(TokioIo::new(tcp)),
        }
    }
}

/// The system's root certificates, those Pingora can parse.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let roots: Vec<_> = rustls_native_certs::load_native_certs()
        .certs
        .into_iter()
        .filter(|c| edge_certs::dir::describe(c).is_ok() && usable_root(c))
        .collect();
    if roots.is_empty() {
        return Err("no system root certificates: set `ca`".to_string());
    }
    Ok(roots)
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
        if !usable_root(c) {
            return Err(format!(
                "{}: a certificate cannot be used as a trust anchor",
                path.display()
            ));
        }
    }
    Ok(certs)
}

/// Whether rustls (webpki) takes `c` as a trust anchor, as every connection will.
fn usable_root(c: &CertificateDer<'_>) -> bool {
    rustls::RootCertStore::empty()
        .add(c.clone().into_owned())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    #[test]
    fn tls_transports_share_a_pool_only_with_the_same_material() {
        let dir = tempfile::tempdir().unwrap();
        let files = edge_certs::dev::write_dev(dir.path()).unwrap();
        let t = UpstreamTransport {
            tls: true,
            sni: Some("localhost".into()),
            ca: Some(files.ca_cert.clone()),
            protocol: UpstreamProtocol::Http1,
            client_cert: None,
        };
        let (a, b) = (
            BackendTransport::load(&t, false).unwrap(),
            BackendTransport::load(&t, false).unwrap(),
        );
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let d = Duration::from_secs(1);
        let peer = |x: &BackendTransport| x.peer_named(addr, Some("localhost"), d, d).reuse_hash();
        assert_eq!(
            peer(&a),
            peer(&b),
            "the same settings and files: one pool (kept across a reload)"
        );
        let other = tempfile::tempdir().unwrap();
        let other_ca = edge_certs::dev::write_dev(other.path()).unwrap();
        let c = BackendTransport::load(
            &UpstreamTransport {
                ca: Some(other_ca.ca_cert.clone()),
                ..t.clone()
            },
            false,
        )
        .unwrap();
        assert_ne!(peer(&a), peer(&c), "another CA: another pool");
        let peers = BackendTransport::for_peers(&PeerTls {
            ca: files.ca_cert.clone(),
            cert: files.leaf_cert.clone(),
            key: files.leaf_key.clone(),
        })
        .unwrap();
        assert_ne!(
            peer(&peers),
            peer(&a),
            "peers and an upstream at one address"
        );
    }
}

//! TLS listeners end to end: rustls clients against `[[server.tls]]`,
//! certificates chosen by SNI, refused protocols, HTTP/2 by ALPN to an
//! HTTP/1.1 origin, and certificates replaced on disk while serving.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

const HANG: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate and remembers the leaf it was shown: for tests
/// of *which* certificate a name gets, not of trust.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(
    verifier: Option<Arc<Recorder>>,
    ca: Option<&Path>,
    alpn: &[&[u8]],
) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let mut config = match (verifier, ca) {
        (Some(v), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(v)
            .with_no_client_auth(),
        (None, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            let pem = std::fs::read(ca).expect("CA file");
            for cert in rustls_pemfile_certs(&pem) {
                roots.add(cert).expect("CA certificate");
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => panic!("a verifier or a CA"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}

async fn connect(
    port: u16,
    sni: &str,
    config: ClientConfig,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The leaf a client asking for `sni` is shown.
async fn presented(port: u16, sni: &str) -> CertificateDer<'static> {
    let rec = Arc::new(Recorder::default());
    let _conn = connect(
        port,
        sni,
        client_config(Some(rec.clone()), None, &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    let leaf = rec.0.lock().unwrap().clone();
    leaf.expect("a certificate was presented")
}

/// One HTTP/1.1 request on an open TLS stream; the status line and body.
async fn http1(stream: &mut TlsStream<TcpStream>, path: &str, host: &str) -> (String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(HANG, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + len {
                let n = stream.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head.lines().next().unwrap_or("").to_string();
            return (
                status,
                String::from_utf8_lossy(&buf[end..end + len]).to_string(),
            );
        }
        assert!(n > 0, "connection closed before a response");
    }
}

/// A self-signed pair for `names` written as `dir/NAME.crt` + `.key`; its DER.
fn pair(dir: &Path, name: &str, names: &[&str]) -> CertificateDer<'static> {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("certificate");
    std::fs::write(dir.join(format!("{name}.crt")), ck.cert.pem()).expect("write crt");
    std::fs::write(dir.join(format!("{name}.key")), ck.key_pair.serialize_pem())
        .expect("write key");
    ck.cert.der().clone()
}

/// An edge with a plain and a TLS listener whose certificates are in `certs`.
async fn tls_edge(certs: &Path) -> (edge_loadtest::origin::Origin, Edge, u16) {
    let tls_port = free_port();
    let extra = tls_listener_toml(tls_port, certs);
    let t = Tweaks {
        server_extra: extra,
        ..Tweaks::default()
    };
    let (origin, edge) = solo_edge(&t).await;
    (origin, edge, tls_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_chosen_by_sni_with_a_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = pair(dir.path(), "a", &["a.test"]);
    let wild = pair(dir.path(), "wild", &["*.b.test"]);
    let default = pair(dir.path(), "default", &["default.test"]);
    let (_origin, _edge, port) = tls_edge(dir.path()).await;
    assert_eq!(presented(port, "a.test").await, a);
    assert_eq!(presented(port, "x.b.test").await, wild);
    assert_eq!(
        presented(port, "unknown.test").await,
        default,
        "unknown SNI gets the default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_dev_ca_gets_h2_and_h1_through_to_an_http1_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = edge_certs::dev::write_dev(dir.path()).expect("dev CA");
    let (_origin, _edge, port) = tls_edge(dir.path()).await;

    // HTTP/1.1, the dev CA verified for localhost.
    let mut h1 = connect(
        port,
        "localhost",
        client_config(None, Some(&files.ca_cert), &[b"http/1.1"]),
    )
    .await
    .expect("verified handshake");
    let (status, body) = http1(&mut h1, "/x?echo=1", "localhost").await;
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("\"x-forwarded-proto\":\"https\""),
        "proto from the listener: {body}"
    );

    // HTTP/2 negotiated by ALPN, proxied to the HTTP/1.1 origin.
    let tls = connect(
        port,
        "localhost",
        client_config(None, Some(&files.ca_cert), &[b"h2", b"http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/h2?echo=1")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("/h2"), "{body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_and_plain_http_on_the_tls_port_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    pair(dir.path(), "default", &["localhost"]);
    let (_origin, _edge, port) = tls_edge(dir.path()).await;
    // rustls speaks nothing below TLS 1.2: ask for 1.1 with a raw ClientHello
    // (record version 3,1 / client version 3,2 = TLS 1.1, no supported_versions).
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2f, // record: handshake, TLS 1.0, length 47
        0x01, 0x00, 0x00, 0x2b, // ClientHello, length 43
        0x03, 0x02, // TLS 1.1
    ];
    hello.extend_from_slice(&[0u8; 32]); // random
    hello.extend_from_slice(&[0x00, 0x00, 0x04, 0x00, 0x2f, 0x00, 0x35, 0x01, 0x00]); // no session, 2 suites, null compression
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(&hello).await.expect("hello");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut answer)).await;
    assert!(
        answer.first() != Some(&0x16),
        "a TLS 1.1 hello got a handshake answer: {answer:02x?}"
    );
    // Plain HTTP to the TLS port: no HTTP answer.
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_serves_the_next_handshake_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = pair(dir.path(), "default", &["localhost"]);
    let (_origin, edge, port) = tls_edge(dir.path()).await;
    assert_eq!(presented(port, "localhost").await, old);

    // A connection opened before the change keeps working after it.
    let rec = Arc::new(Recorder::default());
    let mut open = connect(
        port,
        "localhost",
        client_config(Some(rec), None, &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    let (status, _) = http1(&mut open, "/before", "localhost").await;
    assert!(status.contains("200"), "{status}");

    let new = pair(dir.path(), "default", &["localhost"]);
    let swapped = eventually(HANG, || async { presented(port, "localhost").await == new }).await;
    assert!(
        swapped.is_some(),
        "the new certificate never served a handshake"
    );
    let (status, _) = http1(&mut open, "/after", "localhost").await;
    assert!(
        status.contains("200"),
        "the open connection broke: {status}"
    );

    // A broken file: refused, counted, and the last good certificate serves on.
    std::fs::write(
        dir.path().join("default.crt"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .expect("write");
    let c = client();
    let refused = eventually(HANG, || async {
        metrics(&c, &edge).await.lines().any(|l| {
            l.starts_with("edge_tls_reloads_total")
                && l.contains("result=\"error\"")
                && !l.ends_with(" 0")
        })
    })
    .await;
    assert!(
        refused.is_some(),
        "the broken file was not refused; log:\n{}",
        edge.log_text()
    );
    assert_eq!(presented(port, "localhost").await, new);
    let m = metrics(&c, &edge).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("edge_tls_cert_expiry_seconds{")
                && l.contains("name=\"default\"")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_does_not_end_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    pair(dir.path(), "default", &["localhost"]);
    let (_origin, mut edge, port) = tls_edge(dir.path()).await;
    let c = client();
    let reloads = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("edge_tls_reloads_total") && l.contains("result=\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = reloads(&metrics(&c, &edge).await);
    edge.signal("HUP");
    let reloaded = eventually(HANG, || async {
        reloads(&metrics(&c, &edge).await) > before
    })
    .await;
    assert!(
        reloaded.is_some(),
        "SIGHUP did not reload; log:\n{}",
        edge.log_text()
    );
    assert!(
        edge.wait_exit(Duration::from_millis(500)).await.is_none(),
        "SIGHUP ended the process"
    );
    let mut conn = connect(
        port,
        "localhost",
        client_config(Some(Arc::new(Recorder::default())), None, &[b"http/1.1"]),
    )
    .await
    .expect("still serving TLS");
    let (status, _) = http1(&mut conn, "/after-hup", "localhost").await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_the_tls_listener_but_health_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    pair(dir.path(), "default", &["localhost"]);
    let tls_port = free_port();
    let extra: &'static str = Box::leak(
        format!(
            "redirect_https = true{}",
            tls_listener_toml(tls_port, dir.path())
        )
        .into_boxed_str(),
    );
    let t = Tweaks {
        server_extra: extra,
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let r = raw_request(
        edge.port,
        "GET /a/b?c=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 308, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.example:{tls_port}/a/b?c=1").as_str())
    );
    let health = raw_request(edge.port, "GET /.edge/health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        health.status, 200,
        "the accelerator's health check stays on plain HTTP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consistency_cookie_is_secure_over_https_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = edge_certs::dev::write_dev(dir.path()).expect("dev CA");
    let tls_port = free_port();
    let extra = tls_listener_toml(tls_port, dir.path());
    let t = Tweaks {
        server_extra: extra,
        policy: "read-your-writes",
        ..Tweaks::default()
    };
    let (_origin, edge) = solo_edge(&t).await;
    let write =
        "POST /doc HTTP/1.1\r\nHost: localhost\r\ncontent-length: 0\r\nConnection: close\r\n\r\n";
    let cookie_of = |answer: &str| {
        answer
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: edge_ct="))
            .unwrap_or("")
            .to_string()
    };

    let mut tls = connect(
        tls_port,
        "localhost",
        client_config(None, Some(&files.ca_cert), &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    tls.write_all(write.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let secure = cookie_of(&answer);
    assert!(
        secure.contains("; Secure") && secure.contains("HttpOnly"),
        "over HTTPS: {answer}"
    );

    let mut plain = TcpStream::connect(("127.0.0.1", edge.port))
        .await
        .expect("connect");
    plain.write_all(write.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, plain.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let cookie = cookie_of(&answer);
    assert!(
        !cookie.is_empty() && !cookie.contains("Secure"),
        "over plain HTTP: {answer}"
    );
}

//! Upstreams over TLS and HTTP/2: a backend verified against a configured CA
//! (and refused when it is not), HTTP/2 by ALPN, and gRPC over h2c with its
//! trailers, end to end through a TLS listener speaking HTTP/2 to the client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A gRPC message frame: uncompressed flag, big-endian length, bytes.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The messages in a gRPC body.
fn grpc_messages(mut body: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        body.advance(1);
        let n = body.get_u32() as usize;
        out.push(body.split_to(n.min(body.len())));
    }
    out
}

/// Health probes the gRPC server answered (over h2c: the prober speaks it too).
static HEALTH_PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The test gRPC service: `Unary` echoes, `Stream` answers three messages;
/// both end with `grpc-status: 0` in the trailers. `GET /health` is 200.
async fn grpc_answer(req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        HEALTH_PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ok = Full::new(Bytes::from_static(b"ok"))
            .map_err(|e| match e {})
            .boxed();
        return Ok(Response::new(ok));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let asked = grpc_messages(body).into_iter().next().unwrap_or_default();
    let messages: Vec<Bytes> = match path.as_str() {
        "/test.Echo/Unary" => vec![asked.clone()],
        "/test.Echo/Stream" => (1..=3)
            .map(|i| Bytes::from(format!("{}-{i}", String::from_utf8_lossy(&asked))))
            .collect(),
        _ => Vec::new(),
    };
    let mut trailers = HeaderMap::new();
    let status = if messages.is_empty() { "12" } else { "0" };
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    trailers.insert("grpc-message", HeaderValue::from_static("done"));
    let frames: std::collections::VecDeque<Frame<Bytes>> = messages
        .iter()
        .map(|m| Frame::data(grpc_frame(m)))
        .chain(std::iter::once(Frame::trailers(trailers)))
        .collect();
    let mut resp = Response::new(Frames(frames).boxed());
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

/// A body of frames given in advance (data, then trailers).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// Serve `grpc_answer` over HTTP/2 in cleartext (prior knowledge).
async fn grpc_h2c_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(grpc_answer))
                    .await;
            });
        }
    });
    addr
}

/// Serve a plain answer naming the HTTP version over TLS with `cert`/`key`
/// (ALPN h2 and http/1.1).
async fn tls_server(cert: &Path, key: &Path) -> SocketAddr {
    tls_server_requiring(cert, key, None).await
}

/// [`tls_server`], requiring a client certificate from `client_ca` when given.
async fn tls_server_requiring(cert: &Path, key: &Path, client_ca: Option<&Path>) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).expect("ca") {
                roots.add(c.expect("ca")).expect("root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let text = format!("{:?} {}", req.version(), req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// An edge whose upstream is `backend` with `upstream_extra` TOML, with a
/// TLS listener (the dev CA in `certs`) as well as its plain one.
async fn edge_with(backend: SocketAddr, upstream_extra: &'static str, certs: &Path) -> (Edge, u16) {
    let tls_port = free_port();
    let extra = tls_listener_toml(tls_port, certs);
    let t = Tweaks {
        server_extra: extra,
        upstream_extra,
        ..Tweaks::default()
    };
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    (start_region(&regions, 0, &t).await, tls_port)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_is_verified_against_the_configured_ca_and_spoken_to_in_h2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = edge_certs::dev::write_dev(dir.path()).expect("dev CA");
    let backend = tls_server(&files.leaf_cert, &files.leaf_key).await;
    let extra = leak(format!(
        "tls = true\nsni = \"localhost\"\nca = \"{}\"\nprotocol = \"h2\"",
        files.ca_cert.display()
    ));
    let (edge, _) = edge_with(backend, extra, dir.path()).await;
    let c = client();
    let ok = eventually(std::time::Duration::from_secs(20), || async {
        try_get(&c, &edge.url("/over-tls")).await.status == 200
    })
    .await;
    assert!(ok.is_some(), "never served; log:\n{}", edge.log_text());
    let body = c
        .get(edge.url("/over-tls"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "HTTP/2.0 /over-tls", "spoken to in HTTP/2 over TLS");

    // Another CA: the backend's certificate is not trusted, so it is never used.
    let other = tempfile::tempdir().expect("tempdir");
    let wrong = edge_certs::dev::write_dev(other.path()).expect("other CA");
    let extra = leak(format!(
        "tls = true\nsni = \"localhost\"\nca = \"{}\"",
        wrong.ca_cert.display()
    ));
    let (edge, _) = edge_with(backend, extra, dir.path()).await;
    let seen = try_get(&c, &edge.url("/untrusted")).await;
    assert!(
        seen.status >= 500,
        "an untrusted backend answered: {}",
        seen.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_calls_keep_their_trailers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = edge_certs::dev::write_dev(dir.path()).expect("dev CA");
    let backend = grpc_h2c_server().await;
    let (edge, tls_port) = edge_with(backend, "protocol = \"h2c\"", dir.path()).await;
    let c = client();
    // Probes are answered over h2c (an HTTP/1.1 probe would fail), and the
    // backend stays healthy through several of them.
    let probed = eventually(std::time::Duration::from_secs(20), || async {
        HEALTH_PROBES.load(std::sync::atomic::Ordering::SeqCst) >= 4
    })
    .await;
    assert!(
        probed.is_some(),
        "the prober never reached the h2c backend's health path"
    );
    let healthy = eventually(std::time::Duration::from_secs(20), || async {
        status_json(&c, &edge).await["upstreams"][0]["backends"][0]["active_healthy"] == true
    })
    .await;
    assert!(
        healthy.is_some(),
        "the h2c backend never passed its probe: {}",
        status_json(&c, &edge).await
    );

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&files.ca_cert).expect("ca") {
        roots.add(cert.expect("ca")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let mut sender = h2_sender(tls).await;

    for (method, expected) in [
        ("Unary", vec!["hello".to_string()]),
        (
            "Stream",
            vec!["hello-1".into(), "hello-2".into(), "hello-3".into()],
        ),
    ] {
        let req = Request::post(format!("https://localhost/test.Echo/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(b"hello")))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{method}");
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
            Some("0"),
            "{method}: trailers {trailers:?}"
        );
        let got: Vec<String> = grpc_messages(collected.to_bytes())
            .iter()
            .map(|m| String::from_utf8_lossy(m).to_string())
            .collect();
        assert_eq!(got, expected, "{method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_requiring_a_client_certificate_gets_the_configured_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = edge_certs::dev::write_dev(dir.path()).expect("dev CA");
    // The backend trusts client certificates from the same dev CA (the dev
    // leaf has the client usage too).
    let backend =
        tls_server_requiring(&files.leaf_cert, &files.leaf_key, Some(&files.ca_cert)).await;
    let c = client();
    let base = format!(
        "tls = true\nsni = \"localhost\"\nca = \"{}\"",
        files.ca_cert.display()
    );
    let (without, _) = edge_with(backend, leak(base.clone()), dir.path()).await;
    let seen = try_get(&c, &without.url("/no-client-cert")).await;
    assert!(
        seen.status >= 500,
        "served without a client certificate: {}",
        seen.status
    );
    let with = leak(format!(
        "{base}\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        files.leaf_cert.display(),
        files.leaf_key.display()
    ));
    let (edge, _) = edge_with(backend, with, dir.path()).await;
    let ok = eventually(std::time::Duration::from_secs(20), || async {
        try_get(&c, &edge.url("/client-cert")).await.status == 200
    })
    .await;
    assert!(
        ok.is_some(),
        "never served with the client certificate; log:\n{}",
        edge.log_text()
    );
}

/// An HTTP/2 client on `io` (TLS with ALPN h2, or cleartext with prior knowledge).
async fn h2_sender<T>(io: T) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    sender
}

/// One gRPC call on an HTTP/2 connection; its reply messages and `grpc-status`.
async fn grpc_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    base: &str,
    method: &str,
) -> (u16, Vec<String>, Option<String>) {
    let req = Request::post(format!("{base}/test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(b"hello")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let got = grpc_messages(collected.to_bytes())
        .iter()
        .map(|m| String::from_utf8_lossy(m).to_string())
        .collect();
    (status, got, grpc_status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_h2c_serves_http2_with_prior_knowledge_and_http1_alike_on_a_plain_listener() {
    let backend = grpc_h2c_server().await;
    let t = Tweaks {
        server_extra: "h2c = true",
        upstream_extra: "protocol = \"h2c\"",
        ..Tweaks::default()
    };
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    let edge = start_region(&regions, 0, &t).await;
    let c = client();
    let healthy = eventually(std::time::Duration::from_secs(20), || async {
        status_json(&c, &edge).await["upstreams"][0]["backends"][0]["active_healthy"] == true
    })
    .await;
    assert!(healthy.is_some(), "the h2c backend never passed its probe");

    // gRPC from a client with prior knowledge, end to end in cleartext.
    let tcp = TcpStream::connect(("127.0.0.1", edge.port))
        .await
        .expect("connect");
    let mut sender = h2_sender(tcp).await;
    let base = format!("http://127.0.0.1:{}", edge.port);
    let (status, got, grpc) = grpc_call(&mut sender, &base, "Unary").await;
    assert_eq!(
        (status, got, grpc.as_deref()),
        (200, vec!["hello".to_string()], Some("0"))
    );
    let (status, got, grpc) = grpc_call(&mut sender, &base, "Stream").await;
    assert_eq!(
        (status, got, grpc.as_deref()),
        (
            200,
            vec!["hello-1".into(), "hello-2".into(), "hello-3".into()],
            Some("0")
        )
    );

    // HTTP/1 on the same listener: a head shorter than the preface is
    // answered, not held waiting for 24 bytes.
    let answer = raw_exchange(edge.port, b"GET /test.Echo/Unary HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1."), "HTTP/1 answer: {answer}");
    let short = b"GET / HTTP/1.0\r\n\r\n";
    assert!(short.len() < H2_PREFACE_LEN);
    let answer = raw_exchange(edge.port, short).await;
    assert!(
        answer.starts_with("HTTP/1."),
        "a head shorter than the preface: {answer}"
    );

    // Without `h2c`, the preface is not taken for HTTP/2.
    let t = Tweaks {
        upstream_extra: "protocol = \"h2c\"",
        ..Tweaks::default()
    };
    let regions = vec![RegionSpec::new("solo", vec![backend])];
    let plain = start_region(&regions, 0, &t).await;
    let tcp = TcpStream::connect(("127.0.0.1", plain.port))
        .await
        .expect("connect");
    let refused = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .ok()?;
        tokio::spawn(conn);
        grpc_status_of_unary(&mut sender, &base).await
    };
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), refused)
        .await
        .expect("an h2c client hung on a listener without h2c");
    assert_eq!(outcome, None, "HTTP/2 without `server.h2c`");
}

/// Send `request` on a new connection to `port` and read until it closes
/// (a bound only catches a hang).
async fn raw_exchange(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    raw.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        raw.read_to_end(&mut answer),
    )
    .await
    .expect("the answer hung")
    .expect("read");
    String::from_utf8_lossy(&answer).to_string()
}

/// The length of the HTTP/2 connection preface.
const H2_PREFACE_LEN: usize = 24;

/// The HTTP status of a unary call; None when the request fails.
async fn grpc_status_of_unary(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    base: &str,
) -> Option<u16> {
    let req = Request::post(format!("{base}/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .body(Full::new(grpc_frame(b"hello")))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    Some(resp.status().as_u16())
}

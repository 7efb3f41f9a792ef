//! Three regions with TLS between peers and mutual TLS required: peers are
//! reached over `https://`, each presenting a certificate from the regions'
//! CA. A hop from a client without such a certificate is not honoured (even
//! signed with the right secret), a health report from a server without one
//! is never read, and the health detail is for peers only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edge_router::hop::{HopSigner, SignedRequest};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const HANG: Duration = Duration::from_secs(20);

/// The regions' CA, and a leaf per region (server and client use) for localhost.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(regions: &[&str]) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).expect("write CA");
        for r in regions {
            let key = KeyPair::generate().expect("key");
            let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            leaf.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = leaf.signed_by(&key, &ca_cert, &ca_key).expect("leaf");
            let certs = dir.path().join(r);
            std::fs::create_dir_all(&certs).expect("mkdir");
            std::fs::write(certs.join("default.crt"), cert.pem()).expect("write");
            std::fs::write(certs.join("default.key"), key.serialize_pem()).expect("write");
        }
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn certs(&self, region: &str) -> PathBuf {
        self.dir.path().join(region)
    }
}

fn client_config(ca: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(c.expect("CA")).expect("root");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// One HTTP/1.1 request over TLS without a client certificate; the raw answer.
async fn tls_request(port: u16, ca: &Path, request: &str) -> String {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca)))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("a client without a certificate may connect");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_speak_mutual_tls_and_a_client_cannot_pose_as_one() {
    let names = ["us-east-1", "eu-west-1", "ap-southeast-1"];
    let pki = Pki::new(&names);
    let origins = [
        origin(names[0], "a").await,
        origin(names[1], "b").await,
        origin(names[2], "c").await,
    ];
    let regions: Vec<RegionSpec> = names
        .iter()
        .zip(&origins)
        .map(|(n, o)| RegionSpec::new(n, vec![o.addr()]))
        .collect();
    let tls_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    // The listeners' own directory holds a "public" certificate for the same
    // name from another CA: peers must still be shown the peer certificate.
    let public = Pki::new(&["public"]);
    let mut edges = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let server_extra: &'static str = Box::leak(
            format!(
                "peer_ca = \"{ca}\"\npeer_cert = \"{dir}/default.crt\"\npeer_key = \"{dir}/default.key\"\n[[server.tls]]\nlisten = \"127.0.0.1:{port}\"\ncerts = \"{public}\"\n",
                ca = pki.ca().display(),
                dir = pki.certs(name).display(),
                port = tls_ports[i],
                public = public.certs("public").display(),
            )
            .into_boxed_str(),
        );
        let t = Tweaks {
            server_extra,
            ..Tweaks::default()
        };
        let mut config = config_for(&regions, i, &t);
        for (j, r) in regions.iter().enumerate() {
            config = config.replace(
                &format!("peer = \"http://127.0.0.1:{}\"", r.port),
                &format!("peer = \"https://localhost:{}\"", tls_ports[j]),
            );
        }
        edges.push(Edge::start(&config, regions[i].port, regions[i].admin).await);
    }
    let c = client();

    // Every region reads its peers' reports over mutual TLS.
    for (i, edge) in edges.iter().enumerate() {
        let all_up = eventually(HANG, || async {
            let s = status_json(&c, edge).await;
            s["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["healthy"] == true))
        })
        .await;
        assert!(
            all_up.is_some(),
            "{}: peers never healthy over mTLS: {}\nlog:\n{}",
            names[i],
            status_json(&c, edge).await["peers"],
            edge.log_text()
        );
    }

    // A forwarded read works: us-east-1's backend down, it goes to a peer over mTLS.
    origins[0].set_failing(true);
    let failed_over = eventually(HANG, || async {
        let s = try_get(&c, &edges[0].url("/via-peer")).await;
        s.status == 200 && s.upstream_region != "us-east-1"
    })
    .await;
    assert!(
        failed_over.is_some(),
        "no failover over mTLS; log:\n{}",
        edges[0].log_text()
    );
    origins[0].set_failing(false);

    // eu-west-1's own backend down: a genuine request fails over; a hop
    // would be served from local backends only (a 503 here).
    origins[1].set_failing(true);
    let down = eventually(HANG, || async {
        status_json(&c, &edges[1]).await["upstreams"][0]["regions"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["local"] == true && r["healthy"] == 0))
    })
    .await;
    assert!(down.is_some(), "eu-west-1's backend never went down");
    let host = "localhost";
    let path = "/forged";
    let hop = HopSigner::new(HOP_SECRET.as_bytes(), None, Duration::from_secs(60)).sign(
        "us-east-1",
        edge_router::clock::unix_ms(),
        SignedRequest {
            method: "GET",
            host,
            path,
        },
    );
    let answer = tls_request(
        tls_ports[1],
        &pki.ca(),
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nx-edge-hop: {hop}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a signed hop without the peer certificate was honoured (served locally only): {answer}"
    );
    let m = metrics(&c, &edges[1]).await;
    assert!(
        metric_total(&m, "edge_hop_invalid_total") >= 1.0,
        "not counted as an invalid hop"
    );

    // A purge signed with the right secret, from a client without the peer
    // certificate: refused.
    let purge = serde_json::json!({
        "id": "forged", "region": "us-east-1", "time_ms": edge_router::clock::unix_ms(),
        "spec": {"all": true}
    })
    .to_string();
    let signature = edge_router::cache::signing::PurgeSigner::new(HOP_SECRET.as_bytes(), None)
        .sign(purge.as_bytes());
    let answer = tls_request(
        tls_ports[1],
        &pki.ca(),
        &format!(
            "POST /.edge/purge HTTP/1.1\r\nHost: localhost\r\nx-edge-purge: {signature}\r\ncontent-length: {}\r\nConnection: close\r\n\r\n{purge}",
            purge.len()
        ),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "a purge without the peer certificate: {answer}"
    );

    // The health detail is for peers: a client without the certificate gets the status only.
    let report = tls_request(
        tls_ports[2],
        &pki.ca(),
        "GET /.edge/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = report.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(body.contains("\"status\""), "{report}");
    assert!(
        !body.contains("backends"),
        "a non-peer read the detail: {body}"
    );
    origins[1].set_failing(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_from_a_server_without_the_regions_certificate_is_never_read() {
    let names = ["us-east-1", "eu-west-1"];
    let pki = Pki::new(&names);
    // An impostor for eu-west-1: a TLS server with a certificate of another
    // CA, answering a perfect health report.
    let impostor = Pki::new(&["eu-west-1"]);
    let (chain, key) = pem_pair(&impostor.certs("eu-west-1"), "default");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let impostor_port = listener.local_addr().expect("addr").port();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count, attempts) = (served.clone(), accepted.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = r#"{"status":"ok","region":"eu-west-1","upstreams":[]}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    let o = origin("us-east-1", "a").await;
    let edge = us_east_with_tls_peer(&pki, o.addr(), impostor_port).await;
    let c = client();
    // Probes reach the impostor's port and fail their handshake there.
    let tried = eventually(HANG, || async {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    assert!(tried.is_some(), "the prober never tried the peer");
    let peers = status_json(&c, &edge).await["peers"].clone();
    assert!(
        peers
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["healthy"] != true)),
        "a report from a server without the regions' certificate was believed: {peers}"
    );
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the impostor completed a handshake with the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_demo_serves_https_and_forwards_between_regions_over_mutual_tls() {
    use crate::demo_harness::{header, Demo};
    let dir = tempfile::tempdir().expect("tempdir");
    // A 2 s replication delay: a read with a fresh token must go to the writer.
    let demo = Demo::start_with("2s", Some(dir.path())).await;
    let dev = dir.path().join("certs/dev");
    let ca = dev.join("ca/ca.crt");
    assert!(ca.exists(), "demo --tls wrote no development CA");
    for key in ["default.key", "ca/ca.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dev.join(key))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key} is readable by others: {mode:o}");
    }

    // Clients reach each region's TLS listener (BASE+10+i) trusting the dev CA.
    for i in 0..3u16 {
        let answer = tls_request(
            demo.base + 10 + i,
            &ca,
            "GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "region {i}: {answer}");
    }

    // A write through us-east-1, read through eu-west-1 with its token:
    // eu-west-1 forwards it to us-east-1 through its TLS listener.
    let c = client();
    let put = c
        .put(demo.url(0, "/kv/over-tls"))
        .body("written")
        .send()
        .await
        .expect("PUT");
    assert!(put.status().is_success(), "PUT: {}", put.status());
    let token = header(&put, "x-edge-consistency");
    assert!(!token.is_empty(), "no consistency token");
    let read = c
        .get(demo.url(1, "/kv/over-tls"))
        .header("x-edge-consistency", &token)
        .send()
        .await
        .expect("GET");
    assert_eq!(read.status(), 200);
    assert_eq!(header(&read, "x-edge-upstream-region"), "us-east-1");
    let doc: serde_json::Value = read.json().await.expect("JSON");
    assert_eq!(doc["value"], "written", "{doc}");
}

/// What a peer saw of one request: its path, whether its connection resumed
/// an earlier TLS session, whether the client had shown a certificate, and
/// the connection's number.
type SeenRequest = (String, bool, bool, usize);

/// A peer region over mutual TLS (the certificate of `region` in `pki`,
/// client certificates from its CA required) that answers 200 to anything
/// and, with `close`, closes every connection after one answer (else keeps
/// it open for more); it records each request.
async fn recording_peer(
    pki: &Pki,
    region: &str,
    close: bool,
) -> (u16, Arc<std::sync::Mutex<Vec<SeenRequest>>>) {
    let (chain, key) = pem_pair(&pki.certs(region), "default");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.ca()).expect("CA") {
        roots.add(c.expect("CA")).expect("root");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        for conn_id in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (resumed, has_cert) = {
                    let conn = tls.get_ref().1;
                    (
                        conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                        conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                    )
                };
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tokio::time::timeout(HANG, tls.read(&mut byte)).await {
                            Ok(Ok(1)) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    if let Ok(mut v) = record.lock() {
                        v.push((path.clone(), resumed, has_cert, conn_id));
                    }
                    // Its health report says its `api` backends are up.
                    let body = if path == "/.edge/health" {
                        r#"{"region":"eu-west-1","status":"ok","upstreams":{"api":{"healthy":1,"total":1}}}"#
                    } else {
                        "peer"
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{body}",
                        body.len(),
                        if close { "close" } else { "keep-alive" }
                    );
                    if tls.write_all(resp.as_bytes()).await.is_err() || close {
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// us-east-1 (certificate and CA from `pki`, one backend at `backend`)
/// with mutual TLS towards its one peer, eu-west-1 at `https://localhost:PORT`.
async fn us_east_with_tls_peer(pki: &Pki, backend: std::net::SocketAddr, peer_port: u16) -> Edge {
    let regions = vec![
        RegionSpec::new("us-east-1", vec![backend]),
        RegionSpec::new("eu-west-1", vec![]),
    ];
    let tls_port = free_port();
    let server_extra: &'static str = Box::leak(
        format!(
            "peer_ca = \"{ca}\"\npeer_cert = \"{dir}/default.crt\"\npeer_key = \"{dir}/default.key\"\n[[server.tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncerts = \"{dir}\"\n",
            ca = pki.ca().display(),
            dir = pki.certs("us-east-1").display(),
        )
        .into_boxed_str(),
    );
    let t = Tweaks {
        server_extra,
        ..Tweaks::default()
    };
    let config = config_for(&regions, 0, &t).replace(
        &format!("peer = \"http://127.0.0.1:{}\"", regions[1].port),
        &format!("peer = \"https://localhost:{peer_port}\""),
    );
    Edge::start(&config, regions[0].port, regions[0].admin).await
}

/// us-east-1 with mutual TLS towards eu-west-1 at `peer_port`, its only
/// backend a closed port (so everything goes to the peer), once it has
/// forwarded a request there.
async fn forwarding_to_peer(pki: &Pki, peer_port: u16) -> Edge {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let edge = us_east_with_tls_peer(pki, dead, peer_port).await;
    let c = client();
    let forwarded = eventually(HANG, || async {
        let s = try_get(&c, &edge.url("/first")).await;
        s.status == 200 && s.upstream_region == "eu-west-1"
    })
    .await;
    assert!(
        forwarded.is_some(),
        "never forwarded to the peer; log:\n{}",
        edge.log_text()
    );
    edge
}

/// us-east-1 forwarding ten sequential requests to a recording eu-west-1
/// (closing every connection with `close`); what the peer saw.
async fn ten_forwarded(close: bool) -> Vec<SeenRequest> {
    let pki = Pki::new(&["us-east-1", "eu-west-1"]);
    let (peer_port, seen) = recording_peer(&pki, "eu-west-1", close).await;
    let edge = forwarding_to_peer(&pki, peer_port).await;
    let c = client();
    for i in 0..10 {
        let s = try_get(&c, &edge.url(&format!("/again/{i}"))).await;
        assert_eq!((s.status, s.body.as_str()), (200, "peer"), "request {i}");
    }
    let seen = seen.lock().expect("records").clone();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_to_a_peer_resume_the_tls_session_and_keep_the_client_certificate() {
    // eu-west-1 closes every connection after one answer, so each forwarded
    // request opens a new one: a full handshake unless the session resumes.
    let seen = ten_forwarded(true).await;
    let again: Vec<&SeenRequest> = seen.iter().filter(|r| r.0.starts_with("/again/")).collect();
    assert_eq!(again.len(), 10, "{seen:?}");
    assert!(
        again.iter().all(|r| r.1),
        "a new connection to the peer made a full handshake: {again:?}"
    );
    assert!(
        seen.iter().all(|r| r.2),
        "a connection without the client certificate: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_peer_are_kept_alive_and_reused() {
    let seen = ten_forwarded(false).await;
    let connections: std::collections::BTreeSet<usize> = seen
        .iter()
        .filter(|r| r.0.starts_with("/again/"))
        .map(|r| r.3)
        .collect();
    // Sequential requests: the pooled connection serves them all.
    assert_eq!(
        connections.len(),
        1,
        "forwarded requests opened {} connections: {seen:?}",
        connections.len()
    );
}

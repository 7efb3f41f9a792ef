//! Backends given as names: every address a name resolves to is a backend,
//! the names are resolved again every `server.dns_refresh`, and a lookup
//! that fails keeps the last addresses. The resolver is the system's
//! (getaddrinfo, /etc/hosts first): edge-router runs in a mount namespace
//! of its own where /etc/hosts is a file the test rewrites.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const NAME: &str = "backend.edge-test";
const HANG: Duration = Duration::from_secs(20);

/// `unshare` with a private mount namespace (and a user namespace, so that
/// no privilege is needed where user namespaces are allowed) in which the
/// file at `hosts` is /etc/hosts.
fn with_hosts_file(hosts: &std::path::Path) -> Vec<String> {
    let script = "mount --bind \"$0\" /etc/hosts && exec \"$@\"";
    let mut w: Vec<String> = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    w.push(script.to_string());
    w.push(hosts.display().to_string());
    w
}

/// Rewrite the hosts file in place: the bind mount holds its inode.
fn hosts(path: &std::path::Path, lines: &[&str]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open hosts");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    f.write_all(text.as_bytes()).expect("write hosts");
}

async fn backend_addresses(edge: &Edge) -> Vec<String> {
    let status = status_json(&client(), edge).await;
    let mut v: Vec<String> = status["upstreams"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_name_is_a_backend_and_follows_the_answer() {
    // Two origins on one port of two loopback addresses.
    let a = origin_at(SocketAddr::from(([127, 0, 0, 9], 0)), "solo", "a").await;
    let port = a.addr().port();
    let b = origin_at(SocketAddr::from(([127, 0, 0, 10], port)), "solo", "b").await;
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());

    let dir = tempfile::tempdir().expect("tempdir");
    let hosts_path = dir.path().join("hosts");
    std::fs::write(&hosts_path, "").expect("hosts");
    hosts(&hosts_path, &[&format!("127.0.0.9 {NAME}")]);

    let regions = vec![RegionSpec::new("solo", vec![a.addr()])];
    let config = config_for(&regions, 0, &Tweaks::default())
        .replace(&format!("\"{a_addr}\""), &format!("\"{NAME}:{port}\""))
        .replacen("[server]\n", "[server]\ndns_refresh = \"200ms\"\n", 1);
    assert!(config.contains(NAME), "{config}");
    let wrapper = with_hosts_file(&hosts_path);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let edge = Edge::start_wrapped(&wrapper, &config, regions[0].port, regions[0].admin, &[]).await;
    assert_eq!(backend_addresses(&edge).await, vec![a_addr.clone()]);

    // A client loop across every change: none of its requests may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let loop_task = {
        let (stop, failed, url) = (stop.clone(), failed.clone(), edge.url("/loop"));
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                if try_get(&c, &url).await.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let c = client();
    let serves = |name: &'static str| {
        let c = c.clone();
        let url = edge.url("/which");
        async move {
            eventually(HANG, || async { try_get(&c, &url).await.origin == name })
                .await
                .is_some()
        }
    };

    // The name gains an address: both are backends.
    hosts(
        &hosts_path,
        &[&format!("127.0.0.9 {NAME}"), &format!("127.0.0.10 {NAME}")],
    );
    let both = eventually(HANG, || async {
        let mut want = vec![a_addr.clone(), b_addr.clone()];
        want.sort();
        backend_addresses(&edge).await == want
    })
    .await;
    assert!(
        both.is_some(),
        "never two backends: {}",
        status_json(&c, &edge).await["upstreams"]
    );
    assert!(serves("b").await, "the new address gets requests");
    assert!(edge.log_text().contains("DNS answer changed"));

    // It loses the first: only b remains.
    hosts(&hosts_path, &[&format!("127.0.0.10 {NAME}")]);
    let only_b = eventually(HANG, || async {
        backend_addresses(&edge).await == vec![b_addr.clone()]
    })
    .await;
    assert!(
        only_b.is_some(),
        "a stayed a backend; log:\n{}",
        edge.log_text()
    );

    // The lookup fails: b stays, the failure is logged and counted.
    hosts(&hosts_path, &["127.0.0.1 localhost"]);
    let counted = eventually(HANG, || async {
        metrics(&c, &edge)
            .await
            .lines()
            .any(|l| l.starts_with("edge_dns_refreshes_total{") && l.contains("result=\"error\""))
    })
    .await;
    assert!(
        counted.is_some(),
        "no failed lookup counted; log:\n{}",
        edge.log_text()
    );
    assert!(edge
        .log_text()
        .contains("DNS lookup failed: keeping the addresses it had"));
    assert_eq!(backend_addresses(&edge).await, vec![b_addr.clone()]);
    for i in 0..10 {
        let s = try_get(&c, &edge.url(&format!("/kept/{i}"))).await;
        assert_eq!((s.status, s.origin.as_str()), (200, "b"), "{}", s.body);
    }

    stop.store(true, Ordering::Relaxed);
    let _ = loop_task.await;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed while the backends changed; log:\n{}",
        edge.log_text()
    );
}

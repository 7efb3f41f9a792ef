//! Backends given as names: every address a name resolves to is a backend,
//! the names are resolved again every `server.dns_refresh`, and a lookup
//! that fails keeps the last addresses. The resolver is the system's
//! (getaddrinfo, /etc/hosts first): edge-router runs in a mount namespace
//! of its own where /etc/hosts is a file the test rewrites, and
//! /etc/resolv.conf names a server that refuses every query.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const NAME: &str = "backend.edge-test";
const HANG: Duration = Duration::from_secs(20);

/// Size of the hosts file: always written whole, in one write, so that a
/// lookup never reads it half written.
const HOSTS_SIZE: usize = 512;

/// `unshare` with a private mount namespace in which the file at `hosts` is
/// /etc/hosts and `resolv` is /etc/resolv.conf (a name not in the file
/// then fails at once instead of waiting on a real DNS server). A user
/// namespace makes that unprivileged where the host allows it; root
/// needs none.
fn in_namespace(hosts: &std::path::Path, resolv: &std::path::Path) -> Vec<String> {
    let script = "mount --bind \"$0\" /etc/hosts && mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"";
    let userns = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let mut w: Vec<String> = vec!["unshare".into()];
    if userns {
        w.extend(["--user".into(), "--map-root-user".into()]);
    } else {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        assert!(
            root,
            "this test runs edge-router with its own /etc/hosts: it needs `unshare --user` or root"
        );
    }
    w.extend(["--mount".into(), "sh".into(), "-c".into(), script.into()]);
    w.push(hosts.display().to_string());
    w.push(resolv.display().to_string());
    w
}

/// Rewrite the hosts file in place (the bind mount holds its inode), padded
/// to [`HOSTS_SIZE`] so that one write replaces it all.
fn hosts(path: &std::path::Path, lines: &[&str]) {
    use std::io::{Seek, Write};
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    assert!(text.len() < HOSTS_SIZE);
    text.push('#');
    while text.len() < HOSTS_SIZE - 1 {
        text.push(' ');
    }
    text.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open hosts");
    f.seek(std::io::SeekFrom::Start(0)).expect("seek");
    f.write_all(text.as_bytes()).expect("write hosts");
}

fn dns_errors(metrics_text: &str) -> f64 {
    metrics_text
        .lines()
        .filter(|l| l.starts_with("edge_dns_refreshes_total{") && l.contains("result=\"error\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    // Queries to a port where nothing listens: refused at once.
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .expect("resolv");

    let regions = vec![RegionSpec::new("solo", vec![a.addr()])];
    let config = config_for(&regions, 0, &Tweaks::default())
        .replace(&format!("\"{a_addr}\""), &format!("\"{NAME}:{port}\""))
        .replacen("[server]\n", "[server]\ndns_refresh = \"1s\"\n", 1);
    assert!(config.contains(NAME), "{config}");
    let wrapper = in_namespace(&hosts_path, &resolv);
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
    let before = dns_errors(&metrics(&c, &edge).await);
    assert_eq!(before, 0.0, "no lookup has failed yet");
    hosts(&hosts_path, &["127.0.0.1 localhost"]);
    let counted = eventually(HANG, || async {
        dns_errors(&metrics(&c, &edge).await) >= 2.0
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

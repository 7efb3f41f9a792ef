//! Reloading the config (SIGHUP, `POST /reload`) under load: routes and
//! backends swap with no request failing, a bad file keeps the old config
//! and says why, and what needs a restart is refused, not half applied. A
//! graceful upgrade (SIGUSR2) applies that too: a new process takes the
//! listening sockets, with no request failing either.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const HANG: Duration = Duration::from_secs(20);

/// A client loop of `tasks` concurrent requesters until `stop`; it counts
/// answers, and failures (anything but a 200).
struct Load {
    started: std::time::Instant,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_failure: Arc<parking_lot::Mutex<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `rate` requests a second in all, spread over `tasks` requesters (a
    /// slow answer delays its requester's next request, not the others').
    fn paced(url: String, rate: u32, tasks: usize) -> Load {
        let period = Duration::from_secs(tasks as u64) / rate;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let last_failure = Arc::new(parking_lot::Mutex::new(String::new()));
        let handles = (0..tasks)
            .map(|_| {
                let (stop, ok, failed, last) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    last_failure.clone(),
                );
                let url = url.clone();
                tokio::spawn(async move {
                    let c = client();
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let s = try_get(&c, &url).await;
                        if s.status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            *last.lock() = format!("{} {}", s.status, s.body);
                        }
                    }
                })
            })
            .collect();
        Load {
            started: std::time::Instant::now(),
            stop,
            ok,
            failed,
            last_failure,
            tasks: handles,
        }
    }

    /// Wait until `n` more requests were answered: each reload happens with traffic flowing.
    async fn flowing(&self, n: u64) {
        let from = self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        let moved = eventually(HANG, || async {
            self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed) >= from + n
        })
        .await;
        assert!(moved.is_some(), "the client loop stalled");
    }

    async fn finish(self) -> (u64, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let total = self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        // For the record (the note quotes it); nothing asserts a speed.
        eprintln!(
            "client loop: {total} requests in {secs:.1} s ({:.0}/s)",
            total as f64 / secs
        );
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.last_failure.lock().clone(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_and_a_graceful_upgrade_at_a_thousand_requests_a_second_fail_no_request() {
    let (a, b) = (origin("solo", "a").await, origin("solo", "b").await);
    let spec = |backend| vec![RegionSpec::new("solo", vec![backend])];
    let regions_a = spec(a.addr());
    let mut regions_b = spec(b.addr());
    regions_b[0].port = regions_a[0].port;
    regions_b[0].admin = regions_a[0].admin;
    let t = Tweaks::default();
    // A directory of our own (0700) for the socket the upgrade goes through.
    let sock_dir = private_dir();
    let sock = sock_dir.path().join("upgrade.sock");
    let with_sock = |text: String| with_upgrade_sock(text, &sock);
    let config_a = with_sock(config_for(&regions_a, 0, &t));
    let config_b = with_sock(config_for(&regions_b, 0, &t));
    assert!(config_a.contains("upgrade_sock"), "{config_a}");
    let mut edge = Edge::start(&config_a, regions_a[0].port, regions_a[0].admin).await;
    let c = client();
    let which = edge.url("/which");
    let served_by = |name: &'static str| {
        let c = c.clone();
        let url = which.clone();
        async move {
            eventually(HANG, || async { try_get(&c, &url).await.origin == name })
                .await
                .is_some()
        }
    };
    assert!(served_by("a").await);
    let hash_before = status_json(&c, &edge).await["config"]["hash"].clone();
    assert!(hash_before.is_string(), "no config hash in /status");

    let load = Load::paced(edge.url("/under-load"), 1000, 8);
    for i in 0..10 {
        let (text, name) = if i % 2 == 0 {
            (&config_b, "b")
        } else {
            (&config_a, "a")
        };
        load.flowing(50).await;
        std::fs::write(edge.config_path(), text).expect("rewrite the config");
        if i % 4 == 3 {
            edge.signal("HUP");
        } else {
            let (status, body) = post_reload(&edge).await;
            assert_eq!(status, 200, "reload {i}: {body}");
            assert!(body["hash"].is_string(), "{body}");
        }
        assert!(
            served_by(name).await,
            "reload {i}: never served by {name}; log:\n{}",
            edge.log_text()
        );
    }

    // A broken file: refused with its location, the old config serving on.
    std::fs::write(edge.config_path(), "[server\nregion = ").expect("write");
    let (status, body) = post_reload(&edge).await;
    assert_eq!(status, 422, "{body}");
    let why = body["error"].as_str().unwrap_or("");
    assert!(
        why.contains("edge.toml:1:"),
        "the error names the file and line: {body}"
    );
    // What only a restart can change is refused whole.
    let moved = config_b.replace(
        &format!("127.0.0.1:{}\"]", regions_a[0].port),
        &format!("127.0.0.1:{}\"]", free_port()),
    );
    assert_ne!(moved, config_b);
    std::fs::write(edge.config_path(), &moved).expect("write");
    let (status, body) = post_reload(&edge).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("[server]"),
        "{body}"
    );

    load.flowing(50).await;
    // Still the last good config: served by a.
    assert_eq!(try_get(&c, &edge.url("/after")).await.origin, "a");

    let m = metrics(&c, &edge).await;
    let count = |result: &str| {
        m.lines()
            .filter(|l| l.starts_with("edge_config_reloads_total{"))
            .filter(|l| l.contains(&format!("result=\"{result}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(count("ok"), 10.0, "{m}");
    assert_eq!(count("error"), 2.0, "{m}");
    let info: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("edge_config_info{"))
        .collect();
    assert_eq!(info.len(), 1, "one config serving: {info:?}");
    let status = status_json(&c, &edge).await;
    assert_eq!(status["config"]["reloads"], 10);
    assert_eq!(
        status["config"]["hash"], hash_before,
        "config a again, so its hash"
    );

    // What a reload refused, a graceful upgrade applies: config b with a
    // second listener. The new process takes the sockets; nothing fails.
    let second = free_port();
    let upgraded = config_b.replace(
        &format!("listen = [\"127.0.0.1:{}\"]", regions_a[0].port),
        &format!(
            "listen = [\"127.0.0.1:{}\", \"127.0.0.1:{second}\"]",
            regions_a[0].port
        ),
    );
    assert_ne!(upgraded, config_b, "the listener line was not found");
    std::fs::write(edge.config_path(), &upgraded).expect("write");
    let old_pid = status["pid"].as_u64().expect("/status has the pid");
    edge.signal("USR2");
    let _successor = Successor::answering(&edge, old_pid).await;
    assert!(
        edge.wait_exit(Duration::from_secs(30)).await.is_some(),
        "the old process did not exit; log:\n{}",
        edge.log_text()
    );
    assert!(served_by("b").await, "the new process serves config b");
    load.flowing(500).await;
    let (ok, failed, last) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the reloads and the upgrade; last: {last}\nlog:\n{}",
        ok + failed,
        edge.log_text()
    );
    let on_second = try_get(&c, &format!("http://127.0.0.1:{second}/second")).await;
    assert_eq!(on_second.status, 200, "the new listener serves");
    let log = edge.log_text();
    assert!(
        log.contains("graceful upgrade: handing the listening sockets"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// A directory only we can enter, for the upgrade socket (edge-router
/// refuses one other users could reach).
fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// A graceful upgrade's new process, stopped when the test ends (the harness
/// owns only the process it started).
struct Successor(u64);

impl Successor {
    /// Wait until the admin listener is answered by another process than `old_pid`.
    async fn answering(edge: &Edge, old_pid: u64) -> Successor {
        let c = client();
        let limit = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < limit {
            if let Ok(r) = c.get(edge.admin_url("/status")).send().await {
                let pid = r.json::<serde_json::Value>().await.unwrap_or_default()["pid"].as_u64();
                if let Some(pid) = pid.filter(|p| *p != old_pid) {
                    return Successor(pid);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no new process answered; log:\n{}", edge.log_text());
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_new_process_fails_keeps_the_old_one_serving() {
    let sock_dir = private_dir();
    let sock = sock_dir.path().join("upgrade.sock");
    let (_origin, regions) = {
        let a = origin("solo", "a").await;
        let regions = vec![RegionSpec::new("solo", vec![a.addr()])];
        (a, regions)
    };
    let config = with_upgrade_sock(config_for(&regions, 0, &Tweaks::default()), &sock);
    let mut edge = Edge::start(&config, regions[0].port, regions[0].admin).await;
    let c = client();
    let load = Load::paced(edge.url("/during"), 200, 2);
    let failures = |edge: &Edge| {
        let c = c.clone();
        let url = edge.admin_url("/metrics");
        async move {
            let text = c.get(url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .find(|l| l.starts_with("edge_upgrades_total{") && l.contains("result=\"error\""))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        }
    };
    assert_eq!(failures(&edge).await, Some(0.0), "counted from zero");

    // 1. The new process refuses the file it reads.
    std::fs::write(edge.config_path(), "[server\n").expect("write");
    edge.signal("USR2");
    let seen = eventually(HANG, || async { failures(&edge).await == Some(1.0) }).await;
    assert!(
        seen.is_some(),
        "no failed upgrade counted; log:\n{}",
        edge.log_text()
    );
    // 2. It cannot bind a new listener (a port someone else holds): it
    //    says so before taking any socket.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held_port = held.local_addr().expect("addr").port();
    let taken = config.replace(
        &format!("listen = [\"127.0.0.1:{}\"]", regions[0].port),
        &format!(
            "listen = [\"127.0.0.1:{}\", \"127.0.0.1:{held_port}\"]",
            regions[0].port
        ),
    );
    assert_ne!(taken, config);
    std::fs::write(edge.config_path(), &taken).expect("write");
    edge.signal("USR2");
    let seen = eventually(HANG, || async { failures(&edge).await == Some(2.0) }).await;
    assert!(
        seen.is_some(),
        "the second failure was not counted; log:\n{}",
        edge.log_text()
    );
    let logged = eventually(HANG, || async {
        let log = edge.log_text();
        log.matches("graceful upgrade failed: this process keeps serving")
            .count()
            == 2
            && log.contains(&format!("127.0.0.1:{held_port}"))
    })
    .await;
    assert!(logged.is_some(), "{}", edge.log_text());
    assert!(
        matches!(edge.child.try_wait(), Ok(None)),
        "the old process exited"
    );
    assert_eq!(try_get(&c, &edge.url("/still")).await.status, 200);
    drop(held);

    // 3. A later SIGUSR2 with a good file still works.
    std::fs::write(edge.config_path(), &config).expect("write");
    let old_pid = status_json(&c, &edge).await["pid"].as_u64().expect("pid");
    edge.signal("USR2");
    let _successor = Successor::answering(&edge, old_pid).await;
    assert!(edge.wait_exit(Duration::from_secs(30)).await.is_some());
    load.flowing(100).await;
    let (ok, failed, last) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed; last: {last}",
        ok + failed
    );
}

/// `text` with `upgrade_sock` set in its [server] table.
fn with_upgrade_sock(text: String, sock: &std::path::Path) -> String {
    text.replacen(
        "[server]\n",
        &format!("[server]\nupgrade_sock = \"{}\"\n", sock.display()),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_nobody_completes_exits_with_an_error_and_sigquit_alone_drains() {
    let sock_dir = private_dir();
    let sock = sock_dir.path().join("upgrade.sock");
    let a = origin("solo", "a").await;
    let regions = vec![RegionSpec::new("solo", vec![a.addr()])];
    let config = with_upgrade_sock(config_for(&regions, 0, &Tweaks::default()), &sock);

    // A misbehaving successor: it listens on the socket, takes the
    // connection and drops it, and never removes the socket.
    let mut edge = Edge::start(&config, regions[0].port, regions[0].admin).await;
    let fake = std::os::unix::net::UnixListener::bind(&sock).expect("bind the socket");
    let taker = std::thread::spawn(move || {
        if let Ok((conn, _)) = fake.accept() {
            drop(conn);
        }
    });
    edge.signal("QUIT");
    let code = async {
        let limit = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < limit {
            if let Ok(Some(status)) = edge.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
    .await;
    let _ = taker.join();
    assert_eq!(
        code,
        Some(1),
        "a hand-over nobody completed must end with status 1; log:\n{}",
        edge.log_text()
    );
    assert!(edge
        .log_text()
        .contains("graceful upgrade failed after the listening sockets were offered"));
    drop(edge);
    let _ = std::fs::remove_file(&sock);

    // SIGQUIT with nobody waiting: a drain (health 503), as on SIGTERM.
    let edge = Edge::start(&config, regions[0].port, regions[0].admin).await;
    edge.signal("QUIT");
    let c = client();
    let draining = eventually(HANG, || async {
        c.get(edge.url("/.edge/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(
        draining.is_some(),
        "SIGQUIT alone did not drain; log:\n{}",
        edge.log_text()
    );
    assert!(edge.log_text().contains("no new process waits"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_dead_backend_down_and_needs_the_token() {
    let a = origin("solo", "a").await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let regions = vec![RegionSpec::new("solo", vec![a.addr(), dead])];
    let t = Tweaks::default();
    let config = config_for(&regions, 0, &t);
    let edge = Edge::start(&config, regions[0].port, regions[0].admin).await;
    let c = client();
    let down = eventually(HANG, || async {
        status_json(&c, &edge).await["upstreams"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["active_healthy"] == false))
    })
    .await;
    assert!(down.is_some(), "the dead backend was never found down");
    // The same backends with another debug setting: the dead one must not
    // come back as healthy (every request to it would fail until probed).
    std::fs::write(
        edge.config_path(),
        config.replace("debug_headers = true", "debug_headers = false"),
    )
    .expect("write");
    let unauthorized = c
        .post(edge.admin_url("/reload"))
        .send()
        .await
        .expect("POST");
    assert_eq!(unauthorized.status(), 401);
    let (status, body) = post_reload(&edge).await;
    assert_eq!(status, 200, "{body}");
    let backends = status_json(&c, &edge).await["upstreams"][0]["backends"].clone();
    assert!(
        backends
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["active_healthy"] == false)),
        "the reload revived a dead backend: {backends}"
    );
    for i in 0..20 {
        let s = try_get(&c, &edge.url(&format!("/after/{i}"))).await;
        assert_eq!(s.status, 200, "request {i} after the reload: {}", s.body);
    }
    // A reload that fails late (a CA file that is not PEM) changes nothing,
    // the health gauges included.
    let not_pem = edge.config_path().with_file_name("not-a-ca.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    std::fs::write(
        edge.config_path(),
        config.replace(
            "[upstreams.api]",
            &format!(
                "[upstreams.api]\ntls = true\nca = \"{}\"",
                not_pem.display()
            ),
        ),
    )
    .expect("write");
    let (status, body) = post_reload(&edge).await;
    assert_eq!(status, 422, "{body}");
    let m = metrics(&c, &edge).await;
    let dead_gauge = m
        .lines()
        .find(|l| l.starts_with("edge_backend_healthy{") && l.contains(&dead.to_string()))
        .unwrap_or("");
    assert!(
        dead_gauge.ends_with(" 0"),
        "a failed reload showed the dead backend healthy: {dead_gauge}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_whose_routes_differ_say_so_until_a_reload_aligns_them() {
    let (a, b) = (
        origin("us-east-1", "a").await,
        origin("eu-west-1", "b").await,
    );
    let regions = vec![
        RegionSpec::new("us-east-1", vec![a.addr()]),
        RegionSpec::new("eu-west-1", vec![b.addr()]),
    ];
    let same = Tweaks::default();
    let other = Tweaks {
        route_extra: "max_body = \"1KiB\"",
        ..Tweaks::default()
    };
    let east = start_region(&regions, 0, &same).await;
    let west = start_region(&regions, 1, &other).await;
    let c = client();
    let differs = |edge: &Edge, peer: &'static str| {
        let c = c.clone();
        let url = edge.admin_url("/metrics");
        async move {
            let text = c.get(url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .find(|l| {
                    l.starts_with("edge_peer_routes_differ{")
                        && l.contains(&format!("peer=\"{peer}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        }
    };
    let seen = eventually(HANG, || async {
        differs(&east, "eu-west-1").await == Some(1)
    })
    .await;
    assert!(
        seen.is_some(),
        "us-east-1 never noticed; log:\n{}",
        east.log_text()
    );
    assert!(east.log_text().contains("routes differ from ours"));
    let status = status_json(&c, &east).await;
    let peer = &status["peers"][0];
    assert_eq!(peer["routes_match"], false, "{status}");

    // The config as loaded, from the admin listener.
    let unauthorized = c
        .get(west.admin_url("/config"))
        .send()
        .await
        .expect("GET /config");
    assert_eq!(
        unauthorized.status(),
        401,
        "the file may hold header values: token only"
    );
    let shown: serde_json::Value = c
        .get(west.admin_url("/config"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /config")
        .json()
        .await
        .expect("JSON");
    assert!(
        shown["text"].as_str().unwrap_or("").contains("max_body"),
        "{shown}"
    );

    // eu-west-1 takes us-east-1's routes: the difference goes away.
    std::fs::write(west.config_path(), config_for(&regions, 1, &same)).expect("write");
    let (status, body) = post_reload(&west).await;
    assert_eq!(status, 200, "{body}");
    let aligned = eventually(HANG, || async {
        differs(&east, "eu-west-1").await == Some(0)
    })
    .await;
    assert!(aligned.is_some(), "the difference never cleared");
}

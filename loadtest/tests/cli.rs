//! edge-loadtest against its own origin, through the real binary.

use std::net::SocketAddr;
use std::process::Command;

use edge_loadtest::origin::{Origin, OriginIdentity};
use serde_json::Value;

async fn origin() -> Origin {
    Origin::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        OriginIdentity {
            name: "o".into(),
            region: "r".into(),
        },
    )
    .await
    .unwrap()
}

/// Run `edge-loadtest ARGS --json FILE` off the async runtime; returns the JSON report.
async fn run_json(args: Vec<String>) -> Value {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("r.json");
        let out = Command::new(env!("CARGO_BIN_EXE_edge-loadtest"))
            .args(&args)
            .arg("--json")
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("latency ms"), "{text}");
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    })
    .await
    .unwrap()
}

/// Sum of a JSON object of counts (`status`, `errors`).
fn sum_counts(counts: &Value) -> u64 {
    counts
        .as_object()
        .expect("an object of counts")
        .values()
        .map(|v| v.as_u64().expect("a count"))
        .sum()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_counts_add_up() {
    let o = origin().await;
    let url = format!("http://{}/x", o.addr());
    let r = run_json(args(&[
        "run", &url, "--rate", "200", "-d", "1s", "--warmup", "0s",
    ]))
    .await;
    let status_sum = sum_counts(&r["status"]);
    let errors = sum_counts(&r["errors"]);
    assert_eq!(r["responses"].as_u64().unwrap(), status_sum);
    assert_eq!(r["requests"].as_u64().unwrap(), status_sum + errors);
    assert_eq!(
        r["requests"].as_u64().unwrap() + r["unsent"].as_u64().unwrap(),
        200,
        "rate × duration requests were due: {r}"
    );
    assert_eq!(r["status"]["200"].as_u64().unwrap(), status_sum);
    assert!(
        o.served() >= status_sum,
        "the origin served at least what was counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_origin_shows_its_delay() {
    let o = origin().await;
    let url = format!("http://{}/x?delay=50ms", o.addr());
    let r = run_json(args(&[
        "run", &url, "-c", "4", "-d", "1s", "--warmup", "0s",
    ]))
    .await;
    let p50 = r["latency_ms"]["p50"].as_f64().unwrap();
    assert!(p50 >= 50.0, "p50 {p50} ms < 50 ms delay");
    assert_eq!(r["mode"], "closed-loop");
}

/// A stalled origin (500 ms per request, one connection, 20 req/s due): the
/// generator cannot send on time, and the report must show the queueing that
/// caused, measured from each request's intended send time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_origin_is_reported_with_coordinated_omission_correction() {
    let o = origin().await;
    let url = format!("http://{}/x?delay=500ms", o.addr());
    let open = run_json(args(&[
        "run", &url, "--rate", "20", "-c", "1", "-d", "2s", "--warmup", "0s",
    ]))
    .await;
    let closed = run_json(args(&[
        "run", &url, "-c", "1", "-d", "2s", "--warmup", "0s",
    ]))
    .await;
    let (open_p50, open_max) = (
        open["latency_ms"]["p50"].as_f64().unwrap(),
        open["latency_ms"]["max"].as_f64().unwrap(),
    );
    let closed_p50 = closed["latency_ms"]["p50"].as_f64().unwrap();
    // Service time is 500 ms; the 2nd..4th requests were due 50..150 ms in but
    // waited for the one before, so corrected latency grows past it.
    assert!(
        open_p50 > 700.0,
        "open-loop p50 {open_p50} ms hides the stall"
    );
    assert!(
        open_max > 1300.0,
        "open-loop max {open_max} ms hides the stall"
    );
    // Closed loop measures service time only: at least the delay, and below
    // the open loop's corrected figure (a relation, not a speed bound, so a
    // busy CI machine slows both alike).
    assert!(
        closed_p50 >= 500.0 && closed_p50 < open_p50,
        "closed loop measures service time only: {closed_p50} vs open {open_p50}"
    );
    assert!(
        open["unsent"].as_u64().unwrap() > 0,
        "due-but-unsent requests are reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_carries_every_field_and_hgrm_is_written() {
    let o = origin().await;
    let url = format!("http://{}/x?status=503", o.addr());
    let dir = tempfile::tempdir().unwrap();
    let hgrm = dir.path().join("r.hgrm");
    let r = run_json(args(&[
        "run",
        &url,
        &url,
        "--rate",
        "100",
        "-d",
        "500ms",
        "--warmup",
        "100ms",
        "-H",
        "x-test: 1",
        "--hgrm",
        hgrm.to_str().unwrap(),
    ]))
    .await;
    for key in [
        "urls",
        "mode",
        "rate",
        "connections",
        "http2",
        "duration_s",
        "warmup_s",
        "requests",
        "responses",
        "achieved_rps",
        "unsent",
        "status",
        "errors",
        "latency_ms",
        "bytes_received",
    ] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    for key in ["p50", "p90", "p99", "p99_9", "p99_99", "max", "min", "mean"] {
        assert!(r["latency_ms"][key].is_number(), "latency_ms.{key}");
    }
    for key in ["connect", "timeout", "reset", "other"] {
        assert!(r["errors"][key].is_u64(), "errors.{key}");
    }
    assert_eq!(r["urls"].as_array().unwrap().len(), 2);
    assert!(
        r["status"]["503"].as_u64().unwrap() > 0,
        "status codes are counted as they come"
    );
    let h = std::fs::read_to_string(&hgrm).unwrap();
    assert!(h.contains("Percentile") && h.contains("#[Max"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_an_error_kind_not_a_crash() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let r = run_json(args(&[
        "run", &url, "--rate", "50", "-d", "300ms", "--warmup", "0s", "-c", "2",
    ]))
    .await;
    assert!(r["errors"]["connect"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["responses"].as_u64().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_alternates_and_plots() {
    let (a, b) = (origin().await, origin().await);
    let dir = tempfile::tempdir().unwrap();
    let (svg, json) = (dir.path().join("c.svg"), dir.path().join("c.json"));
    let argv = args(&[
        "compare",
        "--a",
        &format!("http://{}/x", a.addr()),
        "--b",
        &format!("http://{}/x?delay=2ms", b.addr()),
        "--rate",
        "200",
        "--rounds",
        "2",
        "-d",
        "300ms",
        "--warmup",
        "0s",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_edge-loadtest"))
            .args(&argv)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| {
                let mut w = l.split_whitespace();
                matches!(
                    (w.next(), w.next()),
                    (Some("1" | "2"), Some("A" | "B" | "B/A"))
                )
            })
            .count(),
        6,
        "A, B and B/A per round:\n{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("all    B/A")), "{text}");
    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["rounds"].as_array().unwrap().len(), 2);
    // B adds 2 ms per request, so its median is above A's.
    assert!(doc["overall"][2]["p50"].as_f64().unwrap() > 1.0, "{doc}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert!(a.served() > 0 && b.served() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_prior_knowledge_works() {
    let o = origin().await;
    let url = format!("http://{}/x", o.addr());
    let r = run_json(args(&[
        "run", &url, "--http2", "--rate", "100", "-d", "500ms", "--warmup", "0s", "-c", "2",
    ]))
    .await;
    assert_eq!(r["http2"], true);
    assert!(r["status"]["200"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"]["connect"].as_u64().unwrap(), 0, "{r}");
}

/// A server answering 200 only to requests with exactly one `Host`, equal
/// to `want(its port)`, and 400 otherwise (as nginx answers two Host headers).
async fn host_checker(want: impl Fn(u16) -> String) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let want = want(addr.port());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let want = want.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let hosts: Vec<&str> = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                        .map(|(_, v)| v.trim())
                        .collect();
                    let status = if hosts == [want.as_str()] {
                        "200 OK"
                    } else {
                        "400 Bad Request"
                    };
                    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_host_replaces_the_urls_and_resolve_pins_the_address() {
    let addr = host_checker(|_| "api.example.test".into()).await;
    let url = format!("http://{addr}/x");
    let r = run_json(args(&[
        "run",
        &url,
        "-H",
        "Host: api.example.test",
        "-c",
        "1",
        "-d",
        "300ms",
        "--warmup",
        "0s",
    ]))
    .await;
    assert!(r["status"]["200"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(
        r["status"].get("400").is_none(),
        "two Host headers sent: {r}"
    );

    // A name that resolves nowhere, pinned to the server: the Host sent is
    // the URL's (with its port, as written).
    let addr = host_checker(|port| format!("edge.invalid:{port}")).await;
    let url = format!("http://edge.invalid:{}/x", addr.port());
    let pin = format!("edge.invalid:{}:127.0.0.1", addr.port());
    let r = run_json(args(&[
        "run",
        &url,
        "--resolve",
        &pin,
        "-c",
        "1",
        "-d",
        "300ms",
        "--warmup",
        "0s",
    ]))
    .await;
    assert!(r["status"]["200"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["status"].get("400").is_none(), "{r}");
}

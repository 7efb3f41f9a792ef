//! `edge-router check`: every mistake with its location, exit 2; the shipped examples pass.

use std::process::Command;

use crate::support::edge_binary;

/// `edge-router check -c PATH`.
fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(edge_binary())
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_reports_three_mistakes_with_lines_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[server]
region = "us-east-1"
listen = ["127.0.0.1:8080"]
drain_period = "ten seconds"

[regions.us-east-1]
peer = "http://127.0.0.1:8080"
[regions.eu-west-1]
order = 1

[upstreams.api]
backends.us-east-1 = ["127.0.0.1:9000"]

[[routes]]
host = "*"
upstream = "ap"
"#,
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    let file = path.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{file}:4:")) && lines[0].contains("server.drain_period"),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:8:"))
            && lines[1].contains("regions.eu-west-1")
            && lines[1].contains("no peer"),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:16:")) && lines[2].contains("routes[0].upstream"),
        "{stderr}"
    );
}

#[test]
fn shipped_examples_check_ok() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(edge_binary())
                .args(["check", "-c"])
                .arg(&path)
                .env_remove("EDGE_REGION")
                // As an operator would have them set (`check` reads them as `run` does).
                .env("EDGE_HOP_SECRET", crate::support::HOP_SECRET)
                .env_remove("EDGE_ADMIN_TOKEN")
                .output()
                .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            if !cfg!(feature = "dynamodb") && text.contains("backend = \"dynamodb\"") {
                // A build without the backend says so instead of accepting it.
                assert_eq!(out.status.code(), Some(2), "{}", path.display());
                assert!(String::from_utf8_lossy(&out.stderr).contains("--features dynamodb"));
                n += 1;
                continue;
            }
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "ok",
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success());
            n += 1;
        }
    }
    assert!(n >= 3, "expected the three example configs");
}

#[test]
fn unreadable_config_is_exit_2() {
    let out = Command::new(edge_binary())
        .args(["check", "-c", "/nonexistent/edge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn check_warns_about_an_expired_listener_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["old.example.com".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(certs.join("old.crt"), cert.pem()).unwrap();
    std::fs::write(certs.join("old.key"), key.serialize_pem()).unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
region = "us-east-1"
listen = ["127.0.0.1:8080"]

[[server.tls]]
listen = "127.0.0.1:8443"
certs = "{}"

[upstreams.api]
backends.us-east-1 = ["127.0.0.1:9000"]

[[routes]]
host = "*"
upstream = "api"
"#,
            certs.display()
        ),
    )
    .unwrap();
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It loads (an operator may be mid-rotation), but says so.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: server.tls[0].certs: old") && stderr.contains("has expired"),
        "{stderr}"
    );
}

#[test]
fn check_reports_what_run_would_trip_on_and_nothing_it_would_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        r#"[server]
region = "US_East"
listen = ["127.0.0.1:18080"]

[admin]
listen = "127.0.0.1:18080"

[regions.US_East]
peer = "http://127.0.0.1:18080"
[regions.eu-west-1]
peer = "http://127.0.0.1:18081"

[upstreams.api]
helth = { path = "/health" }
backends.US_East = ["127.0.0.1:9000"]

[upstreams.web]
connect_timeout = "0s"
outlier = { base_ejection = "300000000000y" }
health = { path = "/he alth" }
backends.US_East = ["127.0.0.1:99999"]

[[routes]]
host = "*"
upstream = "api"
"#,
    )
    .unwrap();
    let out = Command::new(edge_binary())
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("EDGE_HOP_SECRET")
        .env("EDGE_ADMIN_TOKEN", "short")
        .env_remove("EDGE_REGION")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let has = |key: &str, text: &str| stderr.lines().any(|l| l.contains(key) && l.contains(text));
    assert!(has("upstreams.api", "helth"), "{stderr}");
    assert!(
        !stderr.contains("unknown upstream"),
        "a broken upstream is also reported unknown by its route:\n{stderr}"
    );
    assert!(
        has("upstreams.web.backends.US_East[0]", "out of range"),
        "{stderr}"
    );
    assert!(
        has("upstreams.web.connect_timeout", "more than 0s"),
        "{stderr}"
    );
    assert!(
        has("upstreams.web.outlier.base_ejection", "at most 365d"),
        "{stderr}"
    );
    assert!(
        has("upstreams.web.health.path", "without spaces"),
        "{stderr}"
    );
    assert!(has("server.region", "lower-case"), "{stderr}");
    assert!(has("admin.listen", "also a traffic listener"), "{stderr}");
    // Config mistakes stop before the environment is looked at; a config
    // without them gets its secrets checked (below).
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"[server]
region = "us-east-1"
listen = ["127.0.0.1:18080"]
trusted_proxies = ["0.0.0.0/0"]

[admin]
listen = "0.0.0.0:19901"

[regions.us-east-1]
peer = "http://127.0.0.1:18080"
[regions.eu-west-1]
peer = "http://127.0.0.1:18081"

[upstreams.api]
backends.us-east-1 = ["127.0.0.1:9000"]

[[routes]]
host = "*"
upstream = "api"
"#,
    )
    .unwrap();
    let run_check = |hop: Option<&str>, admin: Option<&str>| {
        let mut cmd = Command::new(edge_binary());
        cmd.args(["check", "-c"])
            .arg(&good)
            .env_remove("EDGE_REGION");
        match hop {
            Some(v) => cmd.env("EDGE_HOP_SECRET", v),
            None => cmd.env_remove("EDGE_HOP_SECRET"),
        };
        match admin {
            Some(v) => cmd.env("EDGE_ADMIN_TOKEN", v),
            None => cmd.env_remove("EDGE_ADMIN_TOKEN"),
        };
        cmd.output().unwrap()
    };
    let long = crate::support::HOP_SECRET;
    let no_secret = run_check(None, None);
    assert_eq!(no_secret.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_secret.stderr).contains("EDGE_HOP_SECRET is not set"));
    let short_token = run_check(Some(long), Some("short"));
    assert_eq!(short_token.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short_token.stderr).contains("EDGE_ADMIN_TOKEN is 5 bytes"));
    let ok = run_check(Some(long), Some(crate::support::ADMIN_TOKEN));
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: admin.listen 0.0.0.0:19901 is not a loopback address"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: server.trusted_proxies has `0.0.0.0/0`"),
        "{stderr}"
    );
}

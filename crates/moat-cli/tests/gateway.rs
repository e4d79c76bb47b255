//! End-to-end: the egress gateway, from real clients inside a real sandbox
//! to real servers on the host's loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;

use common::*;

/// A static HTTP server on the host's loopback; returns its port and the child to kill.
fn http_server(dir: &std::path::Path) -> (u16, KillOnDrop) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    wait_for_port(port);
    (port, child)
}

#[test]
fn the_policy_decides_applies_at_once_and_every_request_is_logged() {
    let sb = Sandbox::new("gw");
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), "hello from the host\n").unwrap();
    let (port, _server) = http_server(site.path());
    let url = format!("http://host.docker.internal:{port}/hello.txt");

    // New sandboxes start balanced: the host's loopback is closed.
    let out = sb.sh(&format!("curl -s -w '\\n%{{http_code}}' {url}"));
    let body = text(&out.stdout);
    assert!(body.ends_with("\n403"), "{body}");
    assert!(
        body.contains("blocked for sandbox")
            && body.contains(&format!(
                "moat sandbox network proxy {} --allow-host localhost",
                sb.name
            )),
        "{body}"
    );

    // One rule for one port opens it, at once; other ports stay closed.
    sb.network_proxy(&["--allow-host", &format!("localhost:{port}")]);
    let out = sb.sh(&format!("curl -s {url}; python3 -c \"import urllib.request;print(urllib.request.urlopen('{url}').read().decode(), end='')\""));
    assert_eq!(
        text(&out.stdout),
        "hello from the host\nhello from the host\n",
        "{}",
        text(&out.stderr)
    );
    let other = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = sb.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://host.docker.internal:{other}/"
    ));
    assert_eq!(text(&out.stdout), "403");

    // The log has every request, with its rule and decision. Rows are written
    // when a response ends, by a thread that batches them: wait for all four,
    // and compare them in a fixed order.
    let mut rows: Vec<serde_json::Value> = vec![];
    for _ in 0..600 {
        rows = serde_json::from_str(&moat_ok(&["sandbox", "network", "log", &sb.name, "--json"]))
            .unwrap();
        if rows.len() >= 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut seen: Vec<(String, String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                format!("{}:{}", r["host"].as_str().unwrap(), r["port"]),
                r["rule"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
                r["status"].as_i64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let here = format!("localhost:{port}");
    let allowed_rule = format!("allow-host localhost:{port}");
    let mut want = vec![
        (
            here.clone(),
            "<default policy>".to_string(),
            "blocked".to_string(),
            403,
        ),
        (
            here.clone(),
            allowed_rule.clone(),
            "allowed".to_string(),
            200,
        ),
        (
            here.clone(),
            allowed_rule.clone(),
            "allowed".to_string(),
            200,
        ),
        (
            format!("localhost:{other}"),
            "<default policy>".to_string(),
            "blocked".to_string(),
            403,
        ),
    ];
    want.sort();
    assert_eq!(seen, want);
    let table = moat_ok(&["sandbox", "network", "log", &sb.name]);
    assert!(table.starts_with("Blocked requests\nSANDBOX"), "{table}");
    let allowed_line = table.lines().find(|l| l.contains(&allowed_rule)).unwrap();
    assert!(allowed_line.trim_end().ends_with(" 2"), "{table}");
}

#[test]
fn no_spelling_of_a_blocked_address_gets_through_the_proxy() {
    let sb = Sandbox::new("gwatk");
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("secret.txt"), "host secret\n").unwrap();
    let (port, _server) = http_server(site.path());
    sb.network_proxy(&["--preset", "allow-all"]);
    let spellings = [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "127.1",
        "0177.0.0.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "localhost",
        "LOCALHOST.",
        "host.docker.internal",
        "[::ffff:7f00:1]",
        "%31%32%37.0.0.1",
    ];
    let mut script = String::new();
    for h in spellings {
        // Through the proxy, explicitly: NO_PROXY would otherwise send some of these nowhere.
        script.push_str(&format!(
            "printf '%s ' '{h}'; curl -s -g --noproxy '' -x http://host.docker.internal:3128 -o /dev/null -w '%{{http_code}}\\n' 'http://{h}:{port}/secret.txt'\n"
        ));
        script.push_str(&format!(
            "printf 'CONNECT %s ' '{h}'; curl -s -g --noproxy '' -p -x http://host.docker.internal:3128 -o /dev/null -w '%{{http_connect}}\\n' 'http://{h}:{port}/secret.txt'\n"
        ));
    }
    // The metadata address and private ranges, by name and number.
    for h in [
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "[fd00::1]",
        "[::ffff:169.254.169.254]",
        "0",
    ] {
        script.push_str(&format!(
            "printf '%s ' '{h}'; curl -s -g --noproxy '' -x http://host.docker.internal:3128 -o /dev/null -w '%{{http_code}}\\n' 'http://{h}:80/'\n"
        ));
    }
    let out = sb.sh(&script);
    let report = text(&out.stdout);
    for line in report.lines() {
        assert!(line.ends_with(" 403"), "got through: {line}\n{report}");
    }
    assert_eq!(report.lines().count(), spellings.len() * 2 + 6, "{report}");
}

#[test]
fn a_slow_client_is_cut_off_and_the_gateway_serves_on() {
    let _daemon = use_isolated_roots("gateway-slow");
    stop_daemon();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[gateway]\nheader_timeout = \"2s\"\n").unwrap();
    start_daemon_with(&[("MOAT_CONFIG", config.path().as_os_str())]);
    let sb = Sandbox::new("slow");
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), "hello\n").unwrap();
    let (port, _server) = http_server(site.path());
    sb.network_proxy(&["--allow-host", &format!("localhost:{port}")]);

    // Half a request head, then nothing; and a connection that never speaks.
    // Each is closed after the timeout, not held open.
    let out = python_in_sandbox(
        &sb,
        r#"
import socket, time
def held(first):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.settimeout(20)
    t = time.monotonic()
    if first:
        s.sendall(first)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    return time.monotonic() - t
half = held(b"GET http://host.docker.internal/ HTTP/1.1\r\nHost: host.docker.internal\r\n")
silent = held(b"")
print(f"{half:.1f} {silent:.1f}")
"#,
        false,
    );
    let times: Vec<f64> = text(&out.stdout)
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(times.len(), 2, "{}", text(&out.stderr));
    for t in &times {
        assert!(
            (1.5..10.0).contains(t),
            "a slow client was held {t} s with a 2 s timeout: {times:?}"
        );
    }
    // The gateway serves the next client as before.
    let out = sb.sh(&format!(
        "curl -s http://host.docker.internal:{port}/hello.txt"
    ));
    assert_eq!(text(&out.stdout), "hello\n", "{}", text(&out.stderr));
}

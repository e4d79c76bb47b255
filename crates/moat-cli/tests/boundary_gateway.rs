//! The egress gateway's boundary, attacked from inside a real sandbox: a key
//! echoed back compressed (the sandbox picks `Accept-Encoding`), a tunnel
//! opened before `--block-host` that tries to carry on after it, and the
//! host's model runner reached through `--allow-host localhost`, which must
//! answer in the sandbox's scope, as the sandbox's own door does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::Upstream;
use common::*;

const KEY: &str = "sk-ant-boundary-93e1c7d05a";

/// Echoes the request's headers, gzip-compressed where the client accepts
/// it (`/v1/polite`), or always (`/v1/always`), and logs what it saw.
const GZIP_ECHO: &str = r#"
import http.server, json, gzip
log = open("seen.log", "a")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        seen = {k.lower(): v for k, v in self.headers.items()}
        log.write(json.dumps({"path": self.path, "headers": seen}) + "\n"); log.flush()
        out = json.dumps(seen).encode()
        self.send_response(200)
        if self.path == "/v1/always" or "gzip" in seen.get("accept-encoding", ""):
            out = gzip.compress(out)
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a): pass
"#;

/// A daemon of this test's own, started with `env`; stopped when dropped.
fn own_daemon(test: &str, env: &[(&str, String)]) -> OwnDaemon {
    let stop = fresh_isolated_roots(&format!("boundary-gateway-{test}"));
    let mut cmd = moat_cmd();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = cmd.args(["sandbox", "ls"]).output().unwrap();
    assert!(started.status.success(), "{}", text(&started.stderr));
    stop
}

#[test]
fn a_compressed_echo_of_the_key_never_reaches_the_sandbox() {
    let up = Upstream::start(GZIP_ECHO, &["api.anthropic.com"]);
    let _daemon = own_daemon(
        "gzip",
        &[
            ("ANTHROPIC_API_KEY", KEY.to_string()),
            ("MOAT_EXTRA_CA_CERTS", up.ca().display().to_string()),
            (
                "MOAT_GATEWAY_HOSTS",
                format!("api.anthropic.com=127.0.0.1:{}", up.port),
            ),
            ("MOAT_MODEL_PORT", free_port().to_string()),
        ],
    );
    let sb = Sandbox::new("gzip");
    // curl --compressed, a client that asks for gzip and gunzips by hand,
    // against a server that compresses when asked and one that always does.
    let out = sb.sh(
        "for p in polite always; do \
           curl -sS --compressed https://api.anthropic.com/v1/$p -H 'x-api-key: proxy-managed'; echo; \
           curl -sS -H 'Accept-Encoding: gzip, deflate' -o /tmp/raw https://api.anthropic.com/v1/$p -H 'x-api-key: proxy-managed'; \
           cat /tmp/raw; echo; gzip -dc </tmp/raw 2>/dev/null; echo; \
         done",
    );
    let inside = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!inside.contains(KEY), "the key flowed back: {inside}");
    assert_eq!(
        inside.matches("\"x-api-key\": \"proxy-managed\"").count(),
        4,
        "{inside}"
    );
    // The server got the key, and was asked for no compression.
    let seen: Vec<serde_json::Value> = up
        .seen()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for s in &seen {
        assert_eq!(s["headers"]["x-api-key"], KEY);
        assert_eq!(s["headers"]["accept-encoding"], "identity", "{s}");
    }
}

/// A line echo server on the host's loopback; its port and the child.
fn line_echo() -> (u16, KillOnDrop) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-c",
            "import socketserver, sys\n\
             class H(socketserver.StreamRequestHandler):\n\
             \x20   def handle(self):\n\
             \x20       for line in self.rfile: self.wfile.write(line); self.wfile.flush()\n\
             socketserver.ThreadingTCPServer.allow_reuse_address = True\n\
             socketserver.ThreadingTCPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    wait_for_port(port);
    (port, child)
}

#[test]
fn a_tunnel_opened_before_a_block_does_not_outlive_it() {
    let sb = Sandbox::new("gwblock");
    let (port, _server) = line_echo();
    sb.network_proxy(&["--allow-host", &format!("localhost:{port}")]);
    // Inside: a CONNECT tunnel that works, then, once the host has blocked
    // the port, one more line through the same tunnel.
    let probe = sb.ws().join("tunnel.py");
    std::fs::write(
        &probe,
        format!(
            r#"
import os, socket, time
ws = os.path.dirname(os.path.abspath(__file__))
s = socket.create_connection(("127.0.0.1", 3128))
s.settimeout(10)
s.sendall(b"CONNECT host.docker.internal:{port} HTTP/1.1\r\nHost: host.docker.internal:{port}\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
print(head.split(b"\r\n")[0].decode())
s.sendall(b"before\n")
print(s.recv(100).decode().strip())
open(os.path.join(ws, "ready"), "w").close()
while not os.path.exists(os.path.join(ws, "blocked")):
    time.sleep(0.05)
t = time.monotonic()
try:
    s.sendall(b"after\n")
    got = s.recv(100)
    print("after:", got.decode().strip() or "closed")
except OSError as e:
    print("after:", type(e).__name__)
print(f"{{time.monotonic() - t:.1f}}")
"#
        ),
    )
    .unwrap();
    let child = moat_cmd()
        .args(["sandbox", "exec", &sb.name, "python3"])
        .arg(&probe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sb.ws().join("ready").exists() {
        assert!(Instant::now() < deadline, "the tunnel never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
    sb.network_proxy(&["--block-host", &format!("localhost:{port}")]);
    std::fs::write(sb.ws().join("blocked"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    let report = format!("{lines:?} {}", text(&out.stderr));
    assert_eq!(lines.len(), 4, "{report}");
    assert_eq!(lines[..2], ["HTTP/1.1 200 OK", "before"], "{report}");
    // Closed: an end of file, a reset or a broken pipe; never the echo.
    assert!(
        [
            "after: closed",
            "after: ConnectionResetError",
            "after: BrokenPipeError"
        ]
        .contains(&lines[2].as_str()),
        "the tunnel carried on after the block: {report}"
    );
    let secs: f64 = lines[3].parse().unwrap();
    assert!(secs < 5.0, "{report}");
}

#[test]
fn the_host_model_runner_through_the_gateway_answers_in_the_sandbox_scope() {
    let port = free_port();
    let _daemon = own_daemon("models", &[("MOAT_MODEL_PORT", port.to_string())]);
    let sb = Sandbox::new("gwmodels");
    wait_for_port(port);
    // On the host, the host's scope: a delete of a missing model is a 404.
    let host = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "DELETE"])
        .arg(format!("http://127.0.0.1:{port}/models/ai/nothing"))
        .output()
        .unwrap();
    assert_eq!(text(&host.stdout), "404");
    // The seed's rule, then the same calls through the gateway and on the
    // sandbox's own door: listing answers, managing is refused, alike.
    sb.network_proxy(&["--allow-host", "localhost"]);
    let calls = [
        ("GET", "/models", ""),
        ("DELETE", "/models/ai/nothing", ""),
        ("POST", "/models/create", r#"{"from":"ai/nothing"}"#),
        ("POST", "/api/pull", r#"{"model":"ai/nothing"}"#),
        ("POST", "/api/delete", r#"{"model":"ai/nothing"}"#),
    ];
    let mut script = String::new();
    for base in [
        format!("http://host.docker.internal:{port}"),
        "http://127.0.0.1:12434".to_string(),
    ] {
        for (method, path, body) in calls {
            let data = if body.is_empty() {
                String::new()
            } else {
                format!("-H 'content-type: application/json' -d '{body}'")
            };
            script.push_str(&format!(
                "curl -s -o /dev/null -w '%{{http_code}} ' -X {method} {data} {base}{path}\n"
            ));
        }
        script.push_str("echo\n");
    }
    let out = sb.sh(&script);
    let got = text(&out.stdout);
    let rows: Vec<&str> = got.lines().map(str::trim).collect();
    assert_eq!(
        rows,
        ["200 403 403 403 403", "200 403 403 403 403"],
        "through the gateway, then on the door: {got} {}",
        text(&out.stderr)
    );
    // The gateway logged the requests it carried, as to the host's port
    // (rows are written in batches once each response ends: wait for them).
    let mut carried = 0;
    for _ in 0..600 {
        let log: Vec<serde_json::Value> =
            serde_json::from_str(&moat_ok(&["sandbox", "network", "log", &sb.name, "--json"]))
                .unwrap();
        carried = log
            .iter()
            .filter(|r| r["port"] == port && r["decision"] == "allowed")
            .count();
        if carried >= calls.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(carried, calls.len());
}

//! End-to-end: TLS interception and API keys, from real clients inside a real
//! sandbox to a real HTTPS server on the host's loopback (with a test CA the
//! daemon is told to trust, and the service names mapped to it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::upstream::Upstream;
use common::*;

const KEY: &str = "sk-ant-test-7f3a9c1e5b";
const TOKEN: &str = "ghp_test_4d2e8a6c";

/// An HTTPS server that answers every request with what it received, and logs it.
fn upstream() -> Upstream {
    Upstream::start(
        ECHO,
        &[
            "api.anthropic.com",
            "api.openai.com",
            "github.com",
            "other.example",
        ],
    )
}

const ECHO: &str = r#"
import http.server, ssl, sys, json
log = open("seen.log", "a")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_ANY(self):
        n = int(self.headers.get("content-length") or 0)
        seen = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": self.rfile.read(n).decode()}
        log.write(json.dumps(seen) + "\n"); log.flush()
        out = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("x-echo", json.dumps(seen["headers"]))
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_ANY
    def log_message(self, *a): pass
"#;

#[test]
fn keys_go_in_on_the_way_out_and_never_come_back() {
    let _daemon = use_isolated_roots("credentials");
    let up = upstream();
    // The daemon takes its keys and names from the environment it starts with.
    stop_daemon();
    let names = format!(
        "api.anthropic.com=127.0.0.1:{p},api.openai.com=127.0.0.1:{p},github.com=127.0.0.1:{p},other.example=127.0.0.1:{p},x.wild.example=127.0.0.1:{p}",
        p = up.port
    );
    let started = moat_cmd()
        .env("ANTHROPIC_API_KEY", KEY)
        .env("GH_TOKEN", TOKEN)
        .env("MOAT_EXTRA_CA_CERTS", up.ca())
        .env("MOAT_GATEWAY_HOSTS", names)
        .args(["image", "ls"])
        .output()
        .unwrap();
    assert!(started.status.success(), "{}", text(&started.stderr));
    let sb = Sandbox::new("keys");
    sb.network_proxy(&["--allow-host", "other.example"]);

    // The sandbox holds only the placeholder.
    let out = sb.sh("echo $ANTHROPIC_API_KEY $GH_TOKEN");
    assert_eq!(text(&out.stdout), "proxy-managed proxy-managed\n");

    // curl with the placeholder, and an attacker's extra credential header.
    let out = sb.sh(
        "curl -sS -D - https://api.anthropic.com/v1/messages -H 'x-api-key: proxy-managed' -H 'authorization: Bearer attacker' -d '{\"q\":1}'",
    );
    let seen_inside = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !seen_inside.contains(KEY),
        "the key flowed back: {seen_inside}"
    );
    assert!(
        seen_inside.contains("\"x-api-key\": \"proxy-managed\""),
        "{seen_inside}"
    );
    let seen_upstream = up.seen();
    let first: serde_json::Value =
        serde_json::from_str(seen_upstream.lines().next().unwrap()).unwrap();
    assert_eq!(first["headers"]["x-api-key"], KEY);
    assert_eq!(
        first["headers"].get("authorization"),
        None,
        "the attacker's header went on: {first}"
    );
    assert_eq!(first["body"], "{\"q\":1}");

    // HTTP/2 where the client offers it (ALPN), the key put in all the same.
    let before = up.seen().lines().count();
    let out = sb.sh("curl -sS --http2 -o /dev/null -w '%{http_version}' https://api.anthropic.com/v1/h2 -H 'x-api-key: proxy-managed'");
    assert_eq!(text(&out.stdout), "2", "{}", text(&out.stderr));
    let h2: serde_json::Value =
        serde_json::from_str(up.seen().lines().nth(before).unwrap()).unwrap();
    assert_eq!(
        (h2["path"].clone(), h2["headers"]["x-api-key"].clone()),
        (serde_json::json!("/v1/h2"), serde_json::json!(KEY))
    );

    // Python's urllib through the proxy, trusting the sandbox's CA from the system bundle.
    let out = sb.sh("python3 -c \"import urllib.request as u;print(u.urlopen(u.Request('https://api.anthropic.com/v1/x', headers={'x-api-key':'proxy-managed'})).status)\"");
    assert_eq!(text(&out.stdout), "200\n", "{}", text(&out.stderr));

    // Python's requests, and Node's fetch with NODE_USE_ENV_PROXY=1 (Node
    // 26 from the workspace): each trusts the sandbox's CA through the
    // variable it reads, sends the placeholder, and sees only the placeholder.
    let node = sb.ws().join("node");
    std::fs::copy(node_binary(), &node).unwrap();
    let out = sb.sh(&format!(
        "python3 -c \"import requests;r=requests.post('https://api.anthropic.com/v1/requests',headers={{'x-api-key':'proxy-managed'}},data='{{}}');print(r.status_code,'proxy-managed' in r.text,'{KEY}' in r.text)\"; \
         NODE_USE_ENV_PROXY=1 {} -e \"fetch('https://api.anthropic.com/v1/fetch',{{method:'POST',headers:{{'x-api-key':'proxy-managed'}},body:'{{}}'}}).then(async r=>{{const t=await r.text();console.log(r.status,t.includes('proxy-managed'),t.includes('{KEY}'))}})\"",
        node.display()
    ));
    assert_eq!(
        text(&out.stdout),
        "200 True False\n200 true false\n",
        "{}",
        text(&out.stderr)
    );
    for path in ["/v1/requests", "/v1/fetch"] {
        let seen = up
            .seen()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["path"] == path);
        assert_eq!(
            seen.map(|v| v["headers"]["x-api-key"].clone()),
            Some(serde_json::json!(KEY)),
            "{path} reached the upstream with the key"
        );
    }
    std::fs::remove_file(&node).unwrap();

    // git over HTTPS gets the token as basic auth (the echo server is no git server, so git fails after).
    let _ = sb.sh("git ls-remote https://github.com/moat/test.git >/dev/null 2>&1");
    let git = up
        .seen()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["path"].as_str().unwrap().contains("info/refs"));
    let basic = format!("Basic {}", base64(&format!("x-access-token:{TOKEN}")));
    assert_eq!(
        git.map(|g| g["headers"]["authorization"].clone()),
        Some(serde_json::json!(basic))
    );

    // The placeholder sent to a host that is not the service's stays the placeholder.
    let before = up.seen().lines().count();
    let out = sb.sh("curl -sS https://other.example/ -H 'x-api-key: proxy-managed' -o /dev/null -w '%{http_code}'");
    assert_eq!(text(&out.stdout), "200", "{}", text(&out.stderr));
    let other: serde_json::Value =
        serde_json::from_str(up.seen().lines().nth(before).unwrap()).unwrap();
    assert_eq!(other["headers"]["x-api-key"], "proxy-managed");

    // Domain fronting: a CONNECT to one allowed name, TLS or Host naming another.
    let out = sb.sh(
        "curl -s -o /dev/null -w '%{http_code} ' --connect-to api.anthropic.com:443:other.example:443 https://api.anthropic.com/; \
         curl -s -o /dev/null -w '%{http_code}' -H 'Host: api.anthropic.com' https://other.example/",
    );
    assert_eq!(text(&out.stdout), "421 421", "{}", text(&out.stderr));

    // A wildcard rule does not open a name that resolves to a blocked range.
    sb.network_proxy(&["--allow-host", "*.wild.example"]);
    let out = sb.sh("curl -s -o /dev/null -w '%{http_code}' https://x.wild.example/; curl -s http://x.wild.example/ | head -1");
    assert_eq!(
        text(&out.stdout),
        format!("000moat: x.wild.example:80 is blocked for sandbox {} by rule <blocked range: loopback>.\n", sb.name)
    );

    // Nowhere the sandbox can read holds the key: environments, files, the network log.
    let out = sb.root_sh(&format!("cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c '{KEY}'; grep -rlsF '{KEY}' /etc /home /root /tmp /usr/local /var /run {} | wc -l", sb.ws().display()));
    assert_eq!(text(&out.stdout), "0\n0\n", "{}", text(&out.stderr));
    let log = moat_ok(&["sandbox", "network", "log", &sb.name, "--json"]);
    assert!(!log.contains(KEY) && !log.contains(TOKEN));
    assert!(
        log.contains("/v1/messages"),
        "intercepted requests are logged with their path: {log}"
    );
    let (state, runtime) = roots();
    let daemon_log = std::fs::read_to_string(runtime.join("daemon.log")).unwrap_or_default();
    assert!(!daemon_log.contains(KEY));
    let listed = moat_ok(&["secret", "ls", "--json"]);
    assert!(
        !listed.contains(KEY) && listed.contains("env:ANTHROPIC_API_KEY"),
        "{listed}"
    );
    let inspect = moat_ok(&["sandbox", "inspect", &sb.name]);
    assert!(!inspect.contains(KEY));
    // The CA's key stays on the host, readable by the daemon's user only.
    let id = sb.inspect()["id"].as_str().unwrap().to_string();
    let key_file = state.join("sandboxes").join(&id).join("ca.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out =
        sb.root_sh("grep -rlsF 'PRIVATE KEY' /etc/ssl /usr/local/share/ca-certificates | wc -l");
    assert_eq!(text(&out.stdout), "0\n");
}

#[test]
fn a_secret_set_from_stdin_is_used_and_never_shown() {
    let _daemon = use_isolated_roots("secrets");
    let out = run_with_stdin(
        moat_cmd().args(["secret", "set", "openai"]),
        b"sk-openai-secret-42\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!shown.contains("sk-openai-secret-42"), "{shown}");
    let table = moat_ok(&["secret", "ls"]);
    let line = table.lines().find(|l| l.starts_with("openai")).unwrap();
    assert!(line.ends_with("yes (secret)"), "{table}");
    let out = moat(&["secret", "set", "no-such-service"]);
    assert!(
        text(&out.stderr).contains("no service named"),
        "{}",
        text(&out.stderr)
    );
    moat_ok(&["secret", "rm", "openai"]);
    let (state, _) = roots();
    assert!(!std::fs::read_to_string(state.join("secrets.json"))
        .unwrap()
        .contains("sk-openai"));
    stop_daemon();
}

fn base64(s: &str) -> String {
    text(&run_with_stdin(Command::new("base64").arg("-w0"), s.as_bytes()).stdout)
}

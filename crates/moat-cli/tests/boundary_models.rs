//! The model runner's boundary, attacked from inside a real sandbox: the
//! real daemon, the real SmolLM2, the attack run by Python in the sandbox
//! against its door at 127.0.0.1:12434. A sandbox cannot unload or pin a
//! model for everyone; cannot hold connections open by sending a byte now
//! and then, nor use up the daemon's descriptors; and cannot stall the
//! model with a request of many messages. Meanwhile the host and other
//! sandboxes are served. Each test has a daemon of its own, with its time
//! limits set low through the environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const MODEL: &str = "ai/smollm2:135M-Q4_1";

/// A daemon of this test's own, started with `env`, serving models on a
/// port of its own with SmolLM2 in its store; stopped when dropped.
struct Runner {
    port: u16,
    _daemon: OwnDaemon,
}

impl Runner {
    fn start(test: &str, env: &[(&str, &str)]) -> Runner {
        let stop = fresh_isolated_roots(&format!("boundary-models-{test}"));
        let port = free_port();
        let mut all = vec![("MOAT_MODEL_PORT", port.to_string())];
        all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        package_smollm2(MODEL, &all);
        wait_for_port(port);
        Runner {
            port,
            _daemon: stop,
        }
    }

    /// `curl` on the host: (status, body).
    fn curl(&self, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--noproxy", "*", "--max-time", "60"])
            .args(["-w", "\n%{http_code}"]);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "-d"])
                .arg(body.to_string());
        }
        let out = cmd
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap();
        let all = text(&out.stdout);
        let (body, status) = all.rsplit_once('\n').unwrap_or(("", &all));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Seconds until the first token of a one-token streamed answer.
    fn first_token_secs(&self) -> f64 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": 1, "temperature": 0, "stream": true});
        let out = Command::new("curl")
            .args([
                "-sS",
                "-N",
                "--noproxy",
                "*",
                "--max-time",
                "60",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code} %{time_starttransfer}"])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!(
                "http://127.0.0.1:{}/engines/v1/chat/completions",
                self.port
            ))
            .output()
            .unwrap();
        let got = text(&out.stdout);
        let (status, secs) = got.split_once(' ').unwrap();
        assert_eq!(status, "200", "{got} {}", text(&out.stderr));
        secs.parse().unwrap()
    }
}

/// The loaded models, from `moat model ps --json`.
fn ps() -> Vec<Value> {
    serde_json::from_str(&moat_ok(&["model", "ps", "--json"])).unwrap()
}

/// Runs `code` with `python3` inside `sb` and parses the JSON it prints last.
fn python_json(sb: &Sandbox, code: &str) -> Value {
    let out = python_in_sandbox(sb, code, false);
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "python in the sandbox: {e}\n{stdout}\n{}",
            text(&out.stderr)
        )
    })
}

#[test]
fn a_sandbox_cannot_unload_or_pin_a_model_nor_manage_the_store() {
    let runner = Runner::start("keepalive", &[]);
    let sb = Sandbox::new("bka");
    // The host loads the model with the runner's keep-alive.
    let (status, body) = runner.curl(
        "/api/generate",
        Some(&json!({"model": MODEL, "prompt": "Hi", "stream": false,
                     "options": {"num_predict": 2, "temperature": 0}})),
    );
    assert_eq!(status, 200, "{body}");
    let before = ps();
    assert_eq!(before.len(), 1, "{before:?}");
    let keep_alive = before[0]["keep_alive"].clone();
    assert!(!keep_alive.is_null(), "{before:?}");
    let pid = before[0]["pid"].clone();

    // A host client streams a long answer meanwhile.
    let port = runner.port;
    let stream = std::thread::spawn(move || {
        let body = json!({"model": MODEL, "prompt": "Count: 1, 2, 3,", "stream": true,
                          "max_tokens": 150, "temperature": 0, "ignore_eos": true});
        let out = Command::new("curl")
            .args(["-sS", "-N", "--noproxy", "*", "--max-time", "120"])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(body.to_string())
            .arg(format!("http://127.0.0.1:{port}/v1/completions"))
            .output()
            .unwrap();
        text(&out.stdout)
    });
    std::thread::sleep(Duration::from_millis(300));

    // From inside: every way Ollama's API has to unload or pin the model.
    let got = python_json(
        &sb,
        &format!(
            r#"
import json, urllib.request
def call(method, path, body):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request("http://127.0.0.1:12434" + path, data=data, method=method,
                                 headers={{"content-type": "application/json"}})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
m = "{MODEL}"
out = {{}}
out["generate_unload"] = call("POST", "/api/generate", {{"model": m, "keep_alive": 0}})
out["chat_unload"] = call("POST", "/api/chat", {{"model": m, "messages": [], "keep_alive": "0s"}})
out["generate_zero"] = call("POST", "/api/generate", {{"model": m, "prompt": "Hi", "stream": False, "keep_alive": 0, "options": {{"num_predict": 1}}}})
out["chat_pin"] = call("POST", "/api/chat", {{"model": m, "messages": [{{"role": "user", "content": "Hi"}}], "stream": False, "keep_alive": -1, "options": {{"num_predict": 1}}}})
out["embed_zero"] = call("POST", "/api/embed", {{"model": m, "input": "hi", "keep_alive": 0}})
out["embeddings_pin"] = call("POST", "/api/embeddings", {{"model": m, "prompt": "hi", "keep_alive": "-1"}})
refused = {{}}
for method, path, body in [
    ("POST", "/api/pull", {{"model": "evil.example/x:1"}}),
    ("POST", "/api/push", {{"model": m}}),
    ("POST", "/api/create", {{"model": "x", "from": m}}),
    ("POST", "/api/copy", {{"source": m, "destination": "x"}}),
    ("DELETE", "/api/delete", {{"model": m}}),
    ("POST", "/engines/unload", {{"all": True}}),
    ("POST", "/engines/_configure", {{"model": m, "keep_alive": "0"}}),
    ("POST", "/engines/llama.cpp/_configure", {{"model": m, "keep_alive": "-1"}}),
    ("POST", "/models/create", {{"from": "evil.example/x:1"}}),
    ("DELETE", "/models/" + m, None),
    ("POST", "/models/" + m + "/tag?repo=x&tag=y", None),
]:
    refused[method + " " + path] = call(method, path, body)
out["refused"] = refused
print(json.dumps(out))
"#
        ),
    );
    for key in [
        "generate_unload",
        "chat_unload",
        "generate_zero",
        "chat_pin",
        "embed_zero",
        "embeddings_pin",
    ] {
        assert_eq!(got[key], 200, "{key}: {got}");
    }
    for (route, status) in got["refused"].as_object().unwrap() {
        assert_eq!(status, 403, "{route} from inside a sandbox: {got}");
    }

    // The host's stream was not cut: all its tokens, and a clean end.
    let streamed = stream.join().unwrap();
    assert!(streamed.contains("data: [DONE]"), "{streamed}");
    assert!(!streamed.contains("\"error\""), "{streamed}");
    let pieces = streamed.matches("\"text\":").count();
    assert!(pieces >= 100, "{pieces} pieces: {streamed}");

    // Still loaded, by the same worker, with the runner's keep-alive.
    std::thread::sleep(Duration::from_millis(1500));
    let after = ps();
    assert_eq!(after.len(), 1, "the model was unloaded: {after:?}");
    assert_eq!(after[0]["pid"], pid, "the model was reloaded: {after:?}");
    assert_eq!(after[0]["keep_alive"], keep_alive, "{after:?}");
    assert!(!moat_ok(&["model", "ls", "-q"]).trim().is_empty());

    // The host may still set a model's keep-alive through the same API.
    let (status, body) = runner.curl(
        "/api/generate",
        Some(&json!({"model": MODEL, "keep_alive": 0})),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"unload\""), "{body}");
}

#[test]
fn a_slow_flood_from_inside_is_cut_and_the_host_and_others_are_served() {
    let runner = Runner::start(
        "door",
        &[
            ("MOAT_MODELS_HEADER_TIMEOUT", "2s"),
            ("MOAT_MODELS_IDLE_TIMEOUT", "3s"),
            ("MOAT_MODELS_MAX_CONNECTIONS", "16"),
        ],
    );
    let sb = Sandbox::new("bflood");
    let other = Sandbox::new("bother");
    let attack = std::thread::spawn(move || {
        let got = python_json(
            &sb,
            r#"
import json, socket, threading, time
until = time.monotonic() + 9
lock = threading.Lock()
refused, lives = 0, []
def slowloris():
    global refused
    while time.monotonic() < until:
        s = socket.create_connection(("127.0.0.1", 12434))
        start = time.monotonic()
        s.settimeout(0.5)
        closed = False
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            closed = True
        # A byte of the head every 0.7 s, for as long as the door allows.
        while not closed and time.monotonic() - start < 30:
            try:
                closed = s.recv(100) == b""
            except socket.timeout:
                pass
            except OSError:
                closed = True
            if not closed:
                try:
                    s.sendall(b"X")
                except OSError:
                    closed = True
                time.sleep(0.2)
        life = time.monotonic() - start
        s.close()
        with lock:
            if life < 0.45:
                refused += 1
            else:
                lives.append(life)
        if life < 0.45:
            time.sleep(0.05)
def idle():
    # One answer, then silence: the keep-alive connection is closed.
    s = socket.create_connection(("127.0.0.1", 12434))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(30)
    s.recv(4096)
    start = time.monotonic()
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    return time.monotonic() - start
threads = [threading.Thread(target=slowloris) for _ in range(40)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# After the flood, when the door has room again.
idle_for = idle()
print(json.dumps({"refused": refused, "served": len(lives), "longest": max(lives), "idle": idle_for}))
"#,
        );
        (got, other_door(&other))
    });
    // While the flood goes on: the host's own door, and a chat on it.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let (status, body) = runner.curl("/health", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = runner.curl(
        "/v1/chat/completions",
        Some(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 4, "temperature": 0}),
        ),
    );
    assert_eq!(status, 200, "{body}");

    let (got, other_status) = attack.join().unwrap();
    eprintln!("flood from inside: {got}");
    // Over the cap of 16, connections were closed at once...
    assert!(got["refused"].as_u64().unwrap() > 0, "{got}");
    // ...and those let in were cut by the 2 s header timeout, bytes or not.
    let longest = got["longest"].as_f64().unwrap();
    assert!((1.5..6.0).contains(&longest), "held {longest} s: {got}");
    assert!(got["served"].as_u64().unwrap() >= 16, "{got}");
    // An idle kept-alive connection is closed after the 3 s idle timeout.
    let idle = got["idle"].as_f64().unwrap();
    assert!((1.5..8.0).contains(&idle), "idle for {idle} s: {got}");
    // Another sandbox's door answered during the flood.
    assert_eq!(other_status, "200");
}

/// `/health` through `sb`'s own door, while the other floods its own.
fn other_door(sb: &Sandbox) -> String {
    std::thread::sleep(Duration::from_secs(1));
    let out =
        sb.sh("curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:12434/health");
    text(&out.stdout)
}

#[test]
fn a_chat_of_thirty_thousand_messages_is_refused_at_once_and_others_answer_promptly() {
    let runner = Runner::start("prompt", &[]);
    let sb = Sandbox::new("bprompt");
    // Loaded and warm, and the first-token time of a quiet model to
    // compare with.
    runner.first_token_secs();
    let quiet = runner.first_token_secs();
    let attack = std::thread::spawn(move || {
        python_json(
            &sb,
            &format!(
                r#"
import json, time, urllib.request
def chat(n, rounds):
    msgs = [{{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"}} for i in range(n)]
    body = json.dumps({{"model": "{MODEL}", "messages": msgs, "max_tokens": 1}}).encode()
    results = []
    for _ in range(rounds):
        req = urllib.request.Request("http://127.0.0.1:12434/v1/chat/completions", data=body,
                                     headers={{"content-type": "application/json"}})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        results.append((status, time.monotonic() - start, text[:300]))
    return results
def long(rounds):
    # One message of some 2,500 tokens: a valid prompt, read in chunks.
    body = json.dumps({{"model": "{MODEL}", "max_tokens": 1,
                        "messages": [{{"role": "user", "content": "hello " * 2500}}]}}).encode()
    results = []
    for _ in range(rounds):
        req = urllib.request.Request("http://127.0.0.1:12434/v1/chat/completions", data=body,
                                     headers={{"content-type": "application/json"}})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                results.append((r.status, time.monotonic() - start, json.loads(r.read())["usage"]["prompt_tokens"]))
        except urllib.error.HTTPError as e:
            results.append((e.code, time.monotonic() - start, e.read().decode()[:300]))
    return results
out = {{"huge": chat(30000, 3), "at_limit": chat(4096, 3), "long": long(2)}}
print(json.dumps(out))
"#
            ),
        )
    });
    // A one-token request from the host, again and again meanwhile.
    let mut busy = Vec::new();
    while !attack.is_finished() {
        busy.push(runner.first_token_secs());
    }
    let got = attack.join().unwrap();
    eprintln!("quiet first token {quiet:.3} s; meanwhile {busy:?}; from inside: {got}");
    for (status, secs, message) in got["huge"].as_array().unwrap().iter().map(|r| {
        (
            r[0].as_u64().unwrap(),
            r[1].as_f64().unwrap(),
            r[2].as_str().unwrap().to_string(),
        )
    }) {
        assert_eq!(status, 400, "{message}");
        assert!(message.contains("30000 messages"), "{message}");
        assert!(message.contains("max_messages"), "{message}");
        assert!(secs < 5.0, "refused after {secs} s");
    }
    // At the limit the prompt is rendered and tokenized, and is over the
    // context: refused too, in bounded time.
    for r in got["at_limit"].as_array().unwrap() {
        assert_eq!(r[0], 400, "{r}");
        assert!(r[1].as_f64().unwrap() < 10.0, "{r}");
    }
    // A long valid prompt is read a micro-batch (512 tokens) a step: a
    // request beside it waits for the step under way and its own (which
    // holds some of the long prompt too), not for all of it. Steps vary on
    // a busy machine, hence the margin over two.
    let long = &got["long"][0];
    assert_eq!(long[0], 200, "{long}");
    let prompt_secs = long[1].as_f64().unwrap();
    let chunk_secs = prompt_secs * 512.0 / long[2].as_f64().unwrap();
    assert!(!busy.is_empty());
    let worst = busy.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "the long prompt took {prompt_secs:.2} s ({chunk_secs:.2} s a step); the worst first token beside it {worst:.2} s"
    );
    assert!(
        worst < quiet + 2.5 * chunk_secs + 1.0,
        "a one-token request waited {worst:.2} s for its first token (quiet: {quiet:.2} s; a step of the long prompt: {chunk_secs:.2} s)"
    );
}

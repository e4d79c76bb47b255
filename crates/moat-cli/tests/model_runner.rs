//! The model runner end to end: the real `moat` daemon serving the real
//! SmolLM2 (and Gemma 3) through llama.cpp, driven by the official OpenAI
//! SDK, by `curl`, and by `curl` from inside a sandbox through its door;
//! and its faults: a worker killed mid-request, bad requests, a damaged
//! model file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

const SMOLLM2: &str = "ai/smollm2:135M-Q4_1";

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// An isolated daemon whose model runner listens on a port of its own,
/// with SmolLM2 packaged.
fn runner(name: &str) -> (u16, OwnDaemon) {
    let daemon = use_isolated_roots(name);
    let port = free_port();
    package_smollm2(SMOLLM2, &[("MOAT_MODEL_PORT", port.to_string())]);
    wait_for_port(port);
    (port, daemon)
}

fn openai(port: u16, checks: &[&str]) -> Output {
    Command::new(sdk_python())
        .arg(script("openai_client.py"))
        .arg(format!("http://127.0.0.1:{port}/engines/llama.cpp/v1"))
        .arg(SMOLLM2)
        .args(checks)
        .output()
        .unwrap()
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// `curl` with a JSON body; returns (status, body).
fn curl(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-X", method, "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some(b) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
        let out = run_with_stdin(&mut cmd, b.as_bytes());
        return split_status(&out);
    }
    split_status(&cmd.output().unwrap())
}

fn split_status(out: &Output) -> (u16, String) {
    let all = text(&out.stdout);
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `moat model ps --json`, parsed.
fn ps_json() -> serde_json::Value {
    serde_json::from_str(&moat_ok(&["model", "ps", "--json"])).unwrap()
}

/// SmolLM2 answers a short chat request.
fn assert_answers(port: u16) {
    let (status, body) = curl(
        port,
        "POST",
        "/v1/chat/completions",
        Some(&chat_body(SMOLLM2, "Hi", serde_json::json!({}))),
    );
    assert_eq!(status, 200, "{body}");
}

/// A chat request; `extra` fields are added to (or replace) the defaults.
fn chat_body(model: &str, content: &str, extra: serde_json::Value) -> String {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body.to_string()
}

#[test]
fn the_openai_sdk_drives_chat_streams_tools_schemas_and_embeddings() {
    let (port, _guard) = runner("runner-openai");
    let out = openai(
        port,
        &[
            "models",
            "chat",
            "stream",
            "tools",
            "schema",
            "completions",
            "embeddings",
        ],
    );
    let stdout = assert_ok(&out, "the OpenAI SDK checks");
    assert!(stdout.contains("\"tool\": \"get_weather\""), "{stdout}");
    // The same API under the other two prefixes.
    for prefix in ["/v1", "/engines/v1"] {
        let (status, body) = curl(
            port,
            "POST",
            &format!("{prefix}/chat/completions"),
            Some(&chat_body(SMOLLM2, "Hi", serde_json::json!({}))),
        );
        assert_eq!(status, 200, "{prefix}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{body}"
        );
        assert!(v["timings"]["predicted_n"].as_u64().unwrap() > 0, "{body}");
    }
    // `moat model run` answers on the command line.
    let answer = moat_ok(&["model", "run", SMOLLM2, "Say hello in one word."]);
    assert!(!answer.trim().is_empty(), "moat model run printed nothing");
    let ps = moat_ok(&["model", "ps", "--json"]);
    let ps: serde_json::Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(ps[0]["name"], SMOLLM2, "{ps}");
    // Prometheus metrics under llama-server's names, per model.
    let (status, metrics) = curl(port, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "llamacpp:tokens_predicted_total{{model=\"{SMOLLM2}\"}}"
        )),
        "{metrics}"
    );
}

/// A streamed generation of 4000 tokens by `curl`, read until its first
/// text: the process, the rest of its output, and what was read.
// The caller waits for the process; a failed test leaves it to end alone.
#[allow(clippy::zombie_processes)]
fn long_stream(
    port: u16,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let body = chat_body(
        SMOLLM2,
        "Tell a very long story.",
        serde_json::json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}),
    );
    let mut child = Command::new("curl")
        .args([
            "-sN",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut streamed = String::new();
    loop {
        let mut line = String::new();
        assert!(
            lines.read_line(&mut line).unwrap() > 0,
            "the stream ended early: {streamed}"
        );
        streamed.push_str(&line);
        // A content delta with text (the first chunk has an empty one).
        if line.contains(r#""delta":{"content":""#) && !line.contains(r#""content":"""#) {
            return (child, lines, streamed);
        }
    }
}

/// CPU seconds `pid` (all its threads) used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): fields 14 and 15 are utime
    // and stime, in clock ticks.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn cpu_over(pid: i32, span: std::time::Duration) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(span);
    cpu_seconds(pid) - before
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot_at_once() {
    let (port, _guard) = runner("runner-disconnect");
    let (mut child, lines, _) = long_stream(port);
    let ps = ps_json();
    let pid = ps[0]["pid"].as_i64().unwrap() as i32;
    let second = std::time::Duration::from_secs(1);
    let busy = cpu_over(pid, second);
    assert!(busy > 0.5, "the worker is generating: {busy} CPU s in 1 s");

    // The client goes away mid-stream.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lines);
    // Freed as soon as the runner sees the connection gone: within a few
    // seconds even on a loaded 2-core machine, not after the whole answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut ps = ps_json();
    while ps[0]["in_flight"] != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        ps = ps_json();
    }
    assert_eq!(
        ps[0]["in_flight"], 0,
        "the slot was not freed within 10 s: {ps}"
    );
    // And the worker stops generating: its CPU falls to nothing within a
    // few seconds (a step under way finishes first, slowly when the cores
    // are shared), long before the 4000 tokens asked for would be done.
    let mut idle = Vec::new();
    while idle.len() < 10 && idle.last().is_none_or(|&cpu| cpu >= 0.1) {
        idle.push(cpu_over(pid, second));
    }
    assert!(
        idle.last().is_some_and(|&cpu| cpu < 0.1),
        "the worker still generates for nobody: CPU s per second since the slot was freed: {idle:?} (was {busy})"
    );
    // The slot serves the next request.
    assert_answers(port);
}

#[test]
fn eight_streams_at_once_and_a_worker_killed_mid_request() {
    let (port, _guard) = runner("runner-faults");
    assert_ok(&openai(port, &["concurrent"]), "eight concurrent streams");

    // A long generation, then the worker is killed under it.
    let (mut child, mut lines, mut streamed) = long_stream(port);
    let ps = ps_json();
    assert_eq!(ps[0]["in_flight"], 1, "{ps}");
    let pid = ps[0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::io::Read::read_to_string(&mut lines, &mut streamed).unwrap();
    child.wait().unwrap();
    assert!(
        streamed.contains("was killed by signal 9") && streamed.contains("\"code\":503"),
        "the stream did not end with the worker's death: {}",
        &streamed[streamed.len().saturating_sub(600)..]
    );
    // The runner lives on: the next request starts a new worker.
    assert_answers(port);
    let ps = ps_json();
    assert_ne!(
        ps[0]["pid"].as_i64().unwrap() as i32,
        pid,
        "the dead worker is still listed"
    );
}

/// `moat model configure --temperature 0` makes every request of the model
/// greedy, whatever temperature it asks for, so that a client that sends its
/// own (as the agents do) gets the same answer every time; `--seed` (here
/// through DMR's `raw-runtime-flags`) fixes a sampled answer the same way.
#[test]
fn a_models_configured_sampling_wins_over_the_clients() {
    let (port, _guard) = runner("runner-sampling");
    // A story asked for with `extra` settings: the whole answer, parsed.
    let story = |extra: serde_json::Value| {
        let (status, body) = curl(
            port,
            "POST",
            "/v1/chat/completions",
            Some(&chat_body(SMOLLM2, "Tell me a story about a cat.", extra)),
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let ask = |temperature: f64| {
        story(serde_json::json!({"temperature": temperature, "max_tokens": 32}))["choices"][0]
            ["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let greedy = ask(0.0);
    // Unconfigured, the client's temperature holds: 32 tokens sampled hot
    // four times are not all the same.
    let hot: Vec<String> = (0..4).map(|_| ask(2.0)).collect();
    assert!(
        hot.iter().any(|a| a != &hot[0]),
        "four answers at temperature 2 were the same: {hot:?}"
    );

    moat_ok(&["model", "configure", "--temperature", "0", SMOLLM2]);
    for _ in 0..3 {
        assert_eq!(ask(2.0), greedy, "configured greedy, the answer changed");
    }
    let (status, body) = curl(port, "GET", "/engines/_configure", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""raw-runtime-flags":"--temp 0""#), "{body}");

    let bad = moat(&["model", "configure", "--temperature", "3", SMOLLM2]);
    assert!(!bad.status.success());
    assert_eq!(
        text(&bad.stderr).trim(),
        "moat: --temperature: temperature 3 is outside 0 to 2 (0: greedy)"
    );

    let (status, body) = curl(
        port,
        "POST",
        "/engines/_configure",
        Some(
            &serde_json::json!({"model": SMOLLM2, "raw-runtime-flags": "--temp 1.5 --seed 7"})
                .to_string(),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let seeded = ask(0.0);
    assert_eq!(ask(0.0), seeded, "a fixed seed, the answer changed");

    // `--max-tokens` cuts every answer off, whatever the client asked for.
    moat_ok(&["model", "configure", "--max-tokens", "5", SMOLLM2]);
    for asked in [serde_json::json!(32), serde_json::Value::Null] {
        let v = story(serde_json::json!({"max_tokens": asked, "ignore_eos": true}));
        assert_eq!(
            (
                v["usage"]["completion_tokens"].as_u64(),
                v["choices"][0]["finish_reason"].as_str()
            ),
            (Some(5), Some("length")),
            "max_tokens {asked}: {v}"
        );
    }
}

#[test]
fn bad_requests_get_a_status_and_a_reason() {
    let (port, _guard) = runner("runner-bad");
    let chat = "/engines/llama.cpp/v1/chat/completions";
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(&chat_body("ai/nothere:1", "Hi", serde_json::json!({}))),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("moat model pull ai/nothere:1"), "{body}");
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(r#"{"model":"ai/smollm2:135M-Q4_1","messages":[],"max_tokens":"ten"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`max_tokens`"), "{body}");
    let (status, body) = curl(port, "POST", chat, Some("{not json"));
    assert_eq!(status, 400, "{body}");
    let big = format!(
        r#"{{"model":"x","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(11 << 20)
    );
    let (status, _) = curl(port, "POST", chat, Some(&big));
    assert_eq!(status, 413);
    // A prompt over the context: both numbers in the answer.
    moat_ok(&["model", "configure", "--context-size", "256", SMOLLM2]);
    let long = "word ".repeat(400);
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(&chat_body(SMOLLM2, &long, serde_json::json!({}))),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context size of 256"), "{body}");
    moat_ok(&["model", "configure", "--context-size", "2048", SMOLLM2]);
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(&chat_body(SMOLLM2, "Hi", serde_json::json!({}))),
    );
    assert_eq!(status, 200, "{body}");

    // A model file damaged in the store is refused by the header check
    // before llama.cpp opens it; the other models keep being served. (A
    // copy with a few bytes more is a GGUF of its own blob.)
    let mut bytes = std::fs::read(smollm2_gguf()).unwrap();
    let whole = bytes.len() as u64 + 7;
    bytes.extend_from_slice(b"padding");
    let copy = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runner-bad-copy.gguf");
    std::fs::write(&copy, &bytes).unwrap();
    moat_ok(&[
        "model",
        "package",
        "--gguf",
        copy.to_str().unwrap(),
        "ai/broken:1",
    ]);
    let (state, _) = roots();
    let blob = find_blob(&state, whole).expect("the copy's blob");
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    f.set_len(whole / 2).unwrap();
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(&chat_body("ai/broken:1", "Hi", serde_json::json!({}))),
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("moat model rm"), "{body}");
    let (status, body) = curl(
        port,
        "POST",
        chat,
        Some(&chat_body(SMOLLM2, "Hi", serde_json::json!({}))),
    );
    assert_eq!(status, 200, "{body}");
}

/// The store's blob of `len` bytes.
fn find_blob(state: &std::path::Path, len: u64) -> Option<PathBuf> {
    let dir = state.join("models/blobs/sha256");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.len() == len)
                .unwrap_or(false)
        })
}

#[test]
fn a_sandbox_reaches_the_runner_through_its_door_but_cannot_manage_it() {
    // The shared test daemon: its sandboxes' doors use the default port,
    // which inside each sandbox's own network namespace is always free.
    let gguf = smollm2_gguf();
    moat_ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        SMOLLM2,
    ]);
    let sb = Sandbox::new("modeldoor");
    let body = chat_body(SMOLLM2, "Say hi.", serde_json::json!({}));
    std::fs::write(sb.ws().join("chat.json"), &body).unwrap();
    let out = sb.sh(&format!(
        "curl -s -w '\\n%{{http_code}}' -d @{}/chat.json http://127.0.0.1:12434/engines/llama.cpp/v1/chat/completions",
        sb.ws().display()
    ));
    let (status, answer) = split_status(&out);
    assert_eq!(status, 200, "{answer} {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{answer}"
    );
    // The name Docker's sandboxes use reaches the same door.
    let out = sb.sh("curl -s -o /dev/null -w '%{http_code}' http://model-runner.docker.internal:12434/engines/v1/models");
    assert_eq!(text(&out.stdout), "200", "{}", text(&out.stderr));
    // Managing models is the host's business: no pulls (the host would
    // fetch what the sandbox's policy forbids), no deletes, no unloads.
    for (method, path, data) in [
        ("POST", "/models/create", r#"{"from":"evil.example/x:1"}"#),
        ("DELETE", &*format!("/models/{SMOLLM2}"), ""),
        ("POST", "/api/pull", r#"{"model":"evil.example/x:1"}"#),
        ("POST", "/engines/unload", r#"{"all":true}"#),
        (
            "POST",
            "/engines/_configure",
            r#"{"model":"ai/smollm2:135M-Q4_1","context-size":512}"#,
        ),
    ] {
        let out = sb.sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -X {method} -d '{data}' http://127.0.0.1:12434{path}"
        ));
        assert_eq!(
            text(&out.stdout),
            "403",
            "{method} {path} from inside a sandbox"
        );
    }
    let listed = moat_ok(&["model", "ls", "-q"]);
    assert!(!listed.trim().is_empty(), "the model is gone");
}

#[test]
fn two_models_are_served_at_once_and_unloaded_on_request() {
    let (port, _guard) = runner("runner-two");
    package_gemma3("ai/gemma3:270M-Q4_K_M");
    let models = [SMOLLM2, "ai/gemma3:270M-Q4_K_M"];
    let answers: Vec<_> = models
        .iter()
        .map(|m| {
            let body = chat_body(m, "The sky is", serde_json::json!({"max_tokens": 8}));
            std::thread::spawn(move || curl(port, "POST", "/v1/chat/completions", Some(&body)))
        })
        .collect();
    for (model, answer) in models.iter().zip(answers) {
        let (status, body) = answer.join().unwrap();
        assert_eq!(status, 200, "{model}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["model"], *model, "{body}");
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{body}"
        );
    }
    let ps = ps_json();
    let mut names: Vec<&str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ai/gemma3:270M-Q4_K_M", SMOLLM2]);
    let pid_of = |name: &str| {
        ps.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["pid"]
            .as_i64()
            .unwrap()
    };
    let (smol_pid, gemma_pid) = (pid_of(SMOLLM2), pid_of("ai/gemma3:270M-Q4_K_M"));
    assert_ne!(smol_pid, gemma_pid, "each model has its own worker");
    moat_ok(&["model", "unload", "ai/gemma3:270M-Q4_K_M"]);
    let ps = ps_json();
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(ps[0]["name"], SMOLLM2);
    assert!(
        !std::path::Path::new(&format!("/proc/{gemma_pid}")).exists(),
        "the unloaded worker still runs"
    );
}

#[test]
fn a_model_over_the_memory_budget_is_refused_with_the_numbers() {
    let (port, _guard) = runner("runner-budget");
    const GEMMA: &str = "ai/gemma3:270M-Q4_K_M";
    package_gemma3(GEMMA);
    // What each takes when loaded, as the runner reckons it.
    let mut memory = std::collections::HashMap::new();
    for model in [SMOLLM2, GEMMA] {
        let body = chat_body(model, "Hi", serde_json::json!({"max_tokens": 1}));
        let (status, answer) = curl(port, "POST", "/v1/chat/completions", Some(&body));
        assert_eq!(status, 200, "{answer}");
        let ps = ps_json();
        let loaded = ps.as_array().unwrap().iter().find(|m| m["name"] == model);
        memory.insert(model, loaded.unwrap()["memory"].as_u64().unwrap());
    }
    // A daemon whose budget holds either model, not both.
    let (smol, gem) = (memory[SMOLLM2], memory[GEMMA]);
    let budget = smol.max(gem) + smol.min(gem) / 2;
    stop_daemon();
    let config = roots().0.join("budget.toml");
    std::fs::write(
        &config,
        format!("[models]\nmemory_budget = \"{}k\"\n", budget / 1024),
    )
    .unwrap();
    let out = moat_cmd()
        .env("MOAT_CONFIG", &config)
        .env("MOAT_MODEL_PORT", port.to_string())
        .args(["model", "ls", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for_port(port);

    // SmolLM2 busy: Gemma does not fit, and is refused before it loads.
    let (mut child, lines, _) = long_stream(port);
    let body = chat_body(GEMMA, "Hi", serde_json::json!({"max_tokens": 1}));
    let (status, answer) = curl(port, "POST", "/v1/chat/completions", Some(&body));
    assert_eq!(status, 503, "{answer}");
    let message = serde_json::from_str::<serde_json::Value>(&answer).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    let mib = |bytes: u64| format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64);
    for part in [
        format!("{GEMMA} needs about {}", mib(gem)),
        format!("memory budget of {}", mib(budget / 1024 * 1024)),
        format!("loaded and busy: {SMOLLM2}"),
        "moat model unload".to_string(),
    ] {
        assert!(message.contains(&part), "{part:?} is not in: {message}");
    }
    let ps = ps_json();
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");

    // SmolLM2 idle: it is unloaded to make room.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lines);
    // The runner frees the slot when it sees the client gone: on a loaded
    // machine that can take longer than a fixed pause.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ps_json()[0]["in_flight"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "SmolLM2 still has a request in flight 30 s after its client went away"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (status, answer) = curl(port, "POST", "/v1/chat/completions", Some(&body));
    assert_eq!(status, 200, "{answer}");
    let ps = ps_json();
    let names: Vec<&str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [GEMMA]);
}

#[test]
fn a_model_port_in_use_is_reported_by_status() {
    let _daemon = fresh_isolated_roots("model-port-taken");
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    package_smollm2(SMOLLM2, &[("MOAT_MODEL_PORT", port.to_string())]);
    let v: serde_json::Value =
        serde_json::from_str(&moat_ok(&["model", "status", "--json"])).unwrap();
    assert_eq!(v["running"], false, "{v}");
    let why = v["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("127.0.0.1:{port}")) && why.contains("MOAT_MODEL_PORT"),
        "{v}"
    );
    let said = moat_ok(&["model", "status"]);
    assert!(said.contains("not on the host's loopback"), "{said}");
    // The model is still there for the door and for a port that is free.
    assert!(moat_ok(&["model", "ls", "-q"]).lines().count() == 1);
}

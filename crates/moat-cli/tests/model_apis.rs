//! End-to-end: the real `moat` daemon serving the real SmolLM2-135M, driven
//! through each API surface by the clients users have: the official
//! `anthropic` SDK, the official `ollama` Python client, and `curl` on
//! Docker Model Runner's own routes (what `docker model` speaks). Each test
//! has a daemon of its own on a port of its own.
//!
//! The Python is the venv `scripts/pyenv.sh` makes (or `$MOAT_TEST_PYTHON`);
//! the scripts under `tests/python/` print one JSON line per check and exit
//! non-zero with the reason when a check fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const MODEL: &str = "ai/smollm2:135M-Q4_1";

/// A daemon of this test's own, serving models on `port`, with SmolLM2 in
/// its store; stopped when dropped.
struct Runner {
    port: u16,
    _daemon: OwnDaemon,
}

impl Runner {
    fn start(test: &str) -> Runner {
        // A daemon an earlier run left would keep its old port, and its
        // state its settings: each run starts from nothing.
        let stop = fresh_isolated_roots(&format!("model-apis-{test}"));
        let gguf = smollm2_gguf();
        let port = free_port();
        // The first command starts the daemon, with this model port.
        let out = moat_cmd()
            .env("MOAT_MODEL_PORT", port.to_string())
            .args(["model", "package", "--gguf", gguf.to_str().unwrap(), MODEL])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "moat model package: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        wait_for_port(port);
        Runner {
            port,
            _daemon: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `curl` a route: the status and the body.
    fn curl(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--noproxy", "*", "--max-time", "300", "-X", method])
            .args(["-w", "\n%{http_code}"]);
        if let Some(body) = body {
            cmd.args(["-H", "content-type: application/json", "-d"])
                .arg(body.to_string());
        }
        let out = cmd.arg(format!("{}{path}", self.url())).output().unwrap();
        assert!(
            out.status.success(),
            "curl {method} {path}: {}",
            text(&out.stderr)
        );
        let all = text(&out.stdout);
        let (body, status) = all.rsplit_once('\n').unwrap();
        (status.parse().unwrap(), body.to_string())
    }

    /// A route that must answer 200 with JSON.
    fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, text) = self.curl(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    }

    /// Run one of the client scripts with `checks`; what every check
    /// printed, merged into one object.
    fn python(&self, script: &str, checks: &[&str]) -> serde_json::Map<String, Value> {
        self.python_at(script, &self.url(), checks)
    }

    /// The same, with the base URL the script's SDK wants.
    fn python_at(
        &self,
        script: &str,
        base: &str,
        checks: &[&str],
    ) -> serde_json::Map<String, Value> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let out = Command::new(sdk_python())
            .arg(&path)
            .arg(base)
            .arg(MODEL)
            .args(checks)
            // Loopback goes direct, whatever proxy the test runs behind.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env_remove("OLLAMA_HOST")
            .env_remove("ANTHROPIC_BASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script} {checks:?} failed:\n{}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        let mut merged = serde_json::Map::new();
        for line in text(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{script} printed {line:?}: {e}"));
            merged.extend(v.as_object().unwrap().clone());
        }
        merged
    }

    /// An OpenAI-shaped chat on DMR's engine route: the status and the body.
    fn chat(&self, content: &str, max_tokens: u32) -> (u16, Value) {
        let (status, body) = self.curl(
            "POST",
            "/engines/llama.cpp/v1/chat/completions",
            Some(&json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            })),
        );
        (status, serde_json::from_str(&body).unwrap())
    }
}

fn str_of<'a>(v: &'a serde_json::Map<String, Value>, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key:?} in {v:?}"))
}

#[test]
fn the_anthropic_sdk_talks_to_smollm2() {
    let runner = Runner::start("anthropic");
    let out = runner.python(
        "anthropic_client.py",
        &[
            "messages",
            "stream",
            "tools",
            "structured",
            "count_tokens",
            "prefix",
            "errors",
        ],
    );
    assert!(!str_of(&out, "messages").trim().is_empty(), "{out:?}");
    assert!(out["pieces"].as_u64().unwrap() >= 2, "{out:?}");
    assert!(
        ["get_weather", "get_time"].contains(&str_of(&out, "tool")),
        "{out:?}"
    );
    assert_eq!(out["streamed"]["unit"], json!("celsius"), "{out:?}");
    // The same text through /anthropic/v1 as through /v1 (no system prompt,
    // as in the stream check).
    assert_eq!(str_of(&out, "prefix"), str_of(&out, "stream"));
    let counted = out["count_tokens"].as_u64().unwrap();
    assert!(counted > 5 && counted < 64, "{out:?}");
    assert!(
        str_of(&out, "not_found").contains("ai/no-such-model:1B"),
        "{out:?}"
    );
}

#[test]
fn the_ollama_client_talks_to_smollm2() {
    let runner = Runner::start("ollama");
    let out = runner.python(
        "ollama_client.py",
        &[
            "version", "list", "show", "chat", "stream", "generate", "format", "embed", "ps",
            "unload", "errors",
        ],
    );
    assert_eq!(out["list"], json!([MODEL]));
    assert_eq!(str_of(&out, "parameter_size"), "134.52M");
    // The context the model runs with: the runner's default, below the
    // model's own 8192; the agents' start scripts size their prompts by it.
    assert_eq!(out["show"]["parameters"], "num_ctx 4096");
    // The chat's answer streamed and whole, and through generate, is one text.
    assert_eq!(str_of(&out, "stream"), str_of(&out, "chat"));
    assert_eq!(str_of(&out, "generate"), str_of(&out, "chat"));
    assert_eq!(out["ps"], json!([MODEL]));
    assert_eq!(out["embed"], json!(576), "SmolLM2-135M's embedding length");
    assert!(
        str_of(&out, "not_found").contains("ai/no-such-model:1B"),
        "{out:?}"
    );
}

#[test]
fn the_openai_sdk_speaks_the_responses_api_codex_uses() {
    let runner = Runner::start("responses");
    let out = runner.python_at(
        "openai_client.py",
        &format!("{}/engines/llama.cpp/v1", runner.url()),
        &["responses"],
    );
    assert!(!str_of(&out, "responses").trim().is_empty(), "{out:?}");
    assert!(
        !str_of(&out, "responses_stream").trim().is_empty(),
        "{out:?}"
    );
    assert_eq!(str_of(&out, "responses_tool"), "get_weather");
    // Bad input gets a 400 that names the field, as chat's does.
    for (body, field) in [
        (json!({"model": MODEL, "input": []}), "`input`"),
        (
            json!({"model": MODEL, "instructions": "Be brief."}),
            "`input`",
        ),
        (
            json!({"model": MODEL, "input": "Hi", "temperature": 5}),
            "`temperature`",
        ),
        (
            json!({"model": MODEL, "input": "Hi", "top_p": 2}),
            "`top_p`",
        ),
    ] {
        let (status, said) = runner.curl("POST", "/v1/responses", Some(&body));
        assert_eq!(status, 400, "{body}: {said}");
        assert!(said.contains(field), "{body}: {said}");
    }
}

#[test]
fn every_api_gives_the_same_answer_to_the_same_prompt() {
    let runner = Runner::start("same-answer");
    // Each script's check asks "Write one short sentence about the sea."
    // with 24 tokens at temperature 0, without a system prompt.
    let openai = runner.python_at(
        "openai_client.py",
        &format!("{}/engines/llama.cpp/v1", runner.url()),
        &["chat"],
    );
    let anthropic = runner.python("anthropic_client.py", &["stream"]);
    let ollama = runner.python("ollama_client.py", &["chat"]);
    let text = str_of(&openai, "chat");
    assert!(!text.trim().is_empty());
    assert_eq!(str_of(&anthropic, "stream"), text);
    assert_eq!(str_of(&ollama, "chat"), text);
    assert_eq!(
        anthropic["output_tokens"], ollama["eval_count"],
        "{anthropic:?} {ollama:?}"
    );
}

#[test]
fn docker_model_runner_routes_manage_the_engine() {
    let runner = Runner::start("dmr");
    let listed: Vec<Value> = serde_json::from_str(&moat_ok(&["model", "ls", "--json"])).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");

    // The store.
    let models = runner.json("GET", "/models", None);
    let models = models.as_array().unwrap();
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(
        (models[0]["id"].as_str().unwrap(), models[0]["tags"].clone()),
        (id.as_str(), json!([MODEL]))
    );
    assert_eq!(models[0]["config"]["format"], json!("gguf"));
    assert_eq!(models[0]["config"]["quantization"], json!("Q4_1"));
    assert_eq!(models[0]["config"]["architecture"], json!("llama"));
    assert!(models[0]["created"].as_i64().unwrap() > 1_600_000_000);
    let one = runner.json("GET", &format!("/models/{MODEL}"), None);
    assert_eq!(one["id"], json!(id));
    let (status, body) = runner.curl("GET", "/models/ai/no-such-model:1B", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("moat model pull"), "{body}");

    // The engine: running, nothing loaded yet.
    let status = runner.json("GET", "/engines/status", None);
    assert!(
        status["llama.cpp"]
            .as_str()
            .unwrap()
            .starts_with("running llama.cpp"),
        "{status}"
    );
    assert_eq!(runner.json("GET", "/engines/ps", None), json!([]));
    let df = runner.json("GET", "/engines/df", None);
    let gguf_size = std::fs::metadata(smollm2_gguf()).unwrap().len();
    assert!(
        df["models_disk_usage"].as_u64().unwrap() >= gguf_size,
        "{df} for a GGUF of {gguf_size} bytes"
    );
    assert!(
        df["default_backend_disk_usage"].as_u64().unwrap() > 1 << 20,
        "{df}"
    );

    // A chat loads the model; ps shows it, idle.
    let (status, answer) = runner.chat("Write one short sentence about the sea.", 8);
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{answer}");
    let ps = runner.json("GET", "/engines/ps", None);
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(
        (
            ps[0]["backend_name"].clone(),
            ps[0]["model_name"].clone(),
            ps[0]["mode"].clone(),
            ps[0]["keep_alive"].clone(),
            ps[0].get("in_use").cloned(),
        ),
        (
            json!("llama.cpp"),
            json!(MODEL),
            json!("completion"),
            json!("5m0s"),
            None
        ),
        "{ps}"
    );
    let ollama_ps = runner.json("GET", "/api/ps", None);
    let default_context = ollama_ps["models"][0]["context_length"].as_u64().unwrap();
    assert!(default_context > 512, "{ollama_ps}");

    // A smaller context: configured, the idle model unloads, and the next
    // load has it.
    let configured = runner.json(
        "POST",
        "/engines/_configure",
        Some(&json!({"model": MODEL, "context-size": 512})),
    );
    assert_eq!(
        configured,
        json!({"model": MODEL, "id": id, "context-size": 512})
    );
    assert_eq!(
        runner.json("GET", "/engines/_configure", None),
        json!([{"model": MODEL, "id": id, "context-size": 512}])
    );
    assert_eq!(
        runner.json("GET", "/engines/ps", None),
        json!([]),
        "the idle model unloads to take its new context"
    );
    let (status, answer) = runner.chat("Write one short sentence about the sea.", 8);
    assert_eq!(status, 200, "{answer}");
    let ollama_ps = runner.json("GET", "/api/ps", None);
    assert_eq!(
        ollama_ps["models"][0]["context_length"],
        json!(512),
        "{ollama_ps}"
    );
    // A prompt over it is refused with both numbers.
    let long = "the sea is wide and deep and blue ".repeat(80);
    let (status, refused) = runner.chat(&long, 8);
    assert_eq!(status, 400, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    let tokens: u64 = message
        .strip_prefix("the prompt is ")
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prompt size in {message:?}"));
    assert!(tokens > 512, "{message}");
    assert!(
        message.contains("context size of 512") && message.contains("moat model configure"),
        "{message}"
    );
    // The model still serves after the refusal.
    let (status, answer) = runner.chat("Write one short sentence about the sea.", 8);
    assert_eq!(status, 200, "{answer}");

    // Bad settings are refused with the field named.
    let (status, body) = runner.curl(
        "POST",
        "/engines/_configure",
        Some(&json!({"model": MODEL, "context-size": 10})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("context-size"), "{body}");

    // Unload: everything, then nothing is left to unload.
    assert_eq!(
        runner.json("POST", "/engines/unload", Some(&json!({"all": true}))),
        json!({"unloaded_runners": 1})
    );
    assert_eq!(runner.json("GET", "/engines/ps", None), json!([]));
    assert_eq!(
        runner.json("POST", "/engines/unload", Some(&json!({"all": true}))),
        json!({"unloaded_runners": 0})
    );
    // By name, after loading it again.
    let (status, answer) = runner.chat("Hi", 2);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        runner.json("POST", "/engines/unload", Some(&json!({"models": [MODEL]}))),
        json!({"unloaded_runners": 1})
    );
    assert_eq!(runner.json("GET", "/engines/ps", None), json!([]));
}

#[test]
fn a_model_is_named_as_asked_whichever_of_its_tags_comes_first() {
    let runner = Runner::start("named-as-asked");
    // Two tags on one model, the short name resolving to the second one.
    moat_ok(&["model", "tag", MODEL, "ai/smollm2:latest"]);
    for (asked, id) in [
        ("ai/smollm2", "ai/smollm2:latest"),
        ("smollm2", "ai/smollm2:latest"),
        (MODEL, MODEL),
    ] {
        let (status, body) = runner.curl(
            "GET",
            &format!("/engines/llama.cpp/v1/models/{asked}"),
            None,
        );
        assert_eq!(status, 200, "{asked}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], id, "{asked}: {body}");
    }
}

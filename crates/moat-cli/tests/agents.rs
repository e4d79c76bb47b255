//! Agents in sandboxes, end to end: the real OpenClaw, Claude Code and Codex
//! in their templates (built from `templates/`, their npm packages fetched
//! through the gateway), on the real SmolLM2 served by moat's model runner
//! through each sandbox's door; OpenClaw's terminal UI driven through tmux;
//! a cloud model reached through the gateway with the key kept on the host;
//! and the seed's own `docker …` lines, run by the real `docker` client
//! through moat's plugins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/registry.rs"]
#[allow(dead_code)]
mod registry_support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::tmux::Session;
use common::upstream::Upstream;
use common::*;
use registry_support::Registry;

const SMOLLM2: &str = "ai/smollm2:135M-Q4_1";
const KEY: &str = "sk-agents-test-5e1f9a3c";

/// A daemon of the test's own, started with `env`, with SmolLM2 packaged,
/// given the 8k context OpenClaw needs, sampled greedily and cut off at 200
/// tokens: the agents send their own temperatures and limits, and the
/// model's settings win, so that a turn is the same every run and ends in
/// seconds even when SmolLM2 rambles (it repeats itself to the end of the
/// context otherwise). Stopped and removed when dropped (each state root
/// holds a gigabyte of unpacked templates).
struct Daemon {
    port: u16,
    _own: OwnDaemon,
}

impl Daemon {
    fn start(name: &str, env: &[(&str, String)]) -> Daemon {
        let own = fresh_isolated_roots(name);
        let port = free_port();
        let mut env = env.to_vec();
        env.push(("MOAT_MODEL_PORT", port.to_string()));
        package_smollm2(SMOLLM2, &env);
        moat_ok(&[
            "model",
            "configure",
            "--context-size",
            "8192",
            "--temperature",
            "0",
            "--max-tokens",
            "200",
            SMOLLM2,
        ]);
        Daemon { port, _own: own }
    }

    /// A counter of the model runner's (llama-server's metric names).
    fn prompt_tokens(&self) -> f64 {
        let out = Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{}/metrics", self.port)])
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("llamacpp:prompt_tokens_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Everything stopped first (the guard, dropped after this, then
        // finds nothing), so that the roots' gigabyte can go.
        let (state, runtime) = roots();
        stop_everything();
        let _ = std::fs::remove_dir_all(state);
        let _ = std::fs::remove_dir_all(runtime);
    }
}

/// A sandbox of `agent` on a fresh workspace.
fn agent_sandbox(agent: &str) -> Sandbox {
    agent_sandbox_in(agent, "namespaces")
}

/// A sandbox of `agent` on a fresh workspace, in the isolation tier `tier`.
fn agent_sandbox_in(agent: &str, tier: &str) -> Sandbox {
    let workspace = tempfile::Builder::new()
        .prefix("moat-ws-")
        .tempdir_in("/tmp")
        .unwrap();
    let name = unique(agent);
    moat_ok(&[
        "sandbox",
        "create",
        "--isolation",
        tier,
        "--name",
        &name,
        agent,
        workspace.path().to_str().unwrap(),
    ]);
    Sandbox {
        name,
        workspace,
        rootless: None,
    }
}

fn exec(sb: &Sandbox, argv: &[&str]) -> Output {
    let mut args = vec!["sandbox", "exec", &sb.name];
    args.extend_from_slice(argv);
    moat(&args)
}

fn exec_ok(sb: &Sandbox, argv: &[&str]) -> String {
    let out = exec(sb, argv);
    assert!(
        out.status.success(),
        "{argv:?} failed:\n{}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// One agent turn on SmolLM2, judged on what must hold whatever the tiny
/// model samples: the agent ran, asked the model runner (its prompt tokens
/// counted), and printed an answer. An answer that ran past the agent's own
/// output limit (SmolLM2 sometimes rambles: Claude Code's "exceeded the …
/// output token maximum", Codex's "Incomplete response … max_output_tokens")
/// is still an answer that came through the runner.
fn agent_turn(daemon: &Daemon, sb: &Sandbox, argv: &[&str]) -> String {
    let before = daemon.prompt_tokens();
    let out = exec(sb, argv);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{stdout}{stderr}");
    let ran_long = all.contains("output token maximum") || all.contains("max_output_tokens");
    assert!(
        out.status.success() || ran_long,
        "{argv:?} failed:\n{stderr}\n{stdout}"
    );
    assert!(
        daemon.prompt_tokens() > before,
        "{argv:?} never reached the model runner:\n{stderr}\n{stdout}"
    );
    if out.status.success() {
        stdout
    } else {
        all
    }
}

fn json_file(sb: &Sandbox, path: &str) -> serde_json::Value {
    serde_json::from_str(&exec_ok(sb, &["cat", path])).unwrap()
}

/// One OpenClaw turn, non-interactive; returns its `--json` answer.
fn openclaw_turn(sb: &Sandbox, message: &str) -> serde_json::Value {
    let out = exec_ok(
        sb,
        &[
            "openclaw",
            "agent",
            "--local",
            "--session-id",
            "test",
            "--message",
            message,
            "--json",
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The sandbox holds no key: not in any process's environment, not in any
/// file it can read, not in its network log.
fn assert_no_key_inside(sb: &Sandbox) {
    let out = moat(&[
        "sandbox", "exec", "-u", "root", &sb.name, "sh", "-c",
        &format!("grep -rlsF -- {KEY} /proc/[0-9]*/environ /home /root /tmp /etc /usr/local /opt; echo searched"),
    ]);
    assert_eq!(text(&out.stdout), "searched\n", "{}", text(&out.stderr));
    let log = moat_ok(&["sandbox", "network", "log", "--json", &sb.name]);
    assert!(!log.contains(KEY), "the key is in the network log");
}

#[test]
fn openclaw_answers_from_the_local_model_and_nothing_leaves_the_machine() {
    let daemon = Daemon::start("agents-openclaw", &[("ANTHROPIC_API_KEY", KEY.into())]);
    let sb = agent_sandbox("openclaw");

    assert_eq!(
        exec_ok(&sb, &["start-openclaw", "list"]),
        format!("{SMOLLM2}\n")
    );
    let unknown = exec(&sb, &["start-openclaw", "ai/nope"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains(&format!("no model ai/nope. It has:\n  {SMOLLM2}")),
        "{}",
        text(&unknown.stderr)
    );

    exec_ok(&sb, &["start-openclaw", SMOLLM2, "--configure-only"]);
    let config = json_file(&sb, "/home/agent/.openclaw/openclaw.json");
    let provider = &config["models"]["providers"]["moat"];
    assert_eq!(
        (
            provider["baseUrl"].as_str(),
            provider["api"].as_str(),
            provider["models"][0]["contextWindow"].as_u64(),
            config["agents"]["defaults"]["model"]["primary"].as_str(),
            config["gateway"]["mode"].as_str(),
        ),
        (
            Some("http://127.0.0.1:12434/engines/llama.cpp/v1"),
            Some("openai-completions"),
            Some(8192),
            Some(format!("moat/{SMOLLM2}").as_str()),
            Some("local"),
        )
    );

    // Configured again, it keeps the gateway's token: a gateway still up
    // from an earlier start must accept the TUI of the next one.
    exec_ok(&sb, &["start-openclaw", SMOLLM2, "--configure-only"]);
    let again = json_file(&sb, "/home/agent/.openclaw/openclaw.json");
    assert_eq!(
        again["gateway"]["auth"]["token"],
        config["gateway"]["auth"]["token"]
    );

    let before = daemon.prompt_tokens();
    let answer = openclaw_turn(&sb, "Say hello in one short sentence.");
    let reply = answer["payloads"][0]["text"].as_str().unwrap_or_default();
    assert!(!reply.trim().is_empty(), "no reply: {answer}");
    assert_eq!(answer["meta"]["agentMeta"]["provider"], "moat", "{answer}");
    assert_eq!(answer["meta"]["agentMeta"]["model"], SMOLLM2, "{answer}");
    // The model runner read OpenClaw's prompt (its system prompt alone is ~2k tokens).
    let read = daemon.prompt_tokens() - before;
    assert!(read > 1000.0, "the model runner read {read} prompt tokens");

    // Nothing left the machine: the gateway allowed no request of this sandbox.
    let log: Vec<serde_json::Value> =
        serde_json::from_str(&moat_ok(&["sandbox", "network", "log", "--json", &sb.name])).unwrap();
    let allowed: Vec<&serde_json::Value> =
        log.iter().filter(|e| e["decision"] == "allowed").collect();
    assert!(allowed.is_empty(), "requests left the machine: {allowed:?}");

    assert_eq!(
        exec_ok(&sb, &["sh", "-c", "echo $ANTHROPIC_API_KEY"]),
        "proxy-managed\n"
    );
    assert_no_key_inside(&sb);
}

/// The gVisor tier runs the same OpenClaw, with the same doors: its turn
/// reaches the model runner through the sandbox's 127.0.0.1:12434.
#[test]
fn openclaw_answers_from_the_local_model_in_the_gvisor_tier() {
    let daemon = Daemon::start("agents-openclaw-gvisor", &[]);
    let sb = agent_sandbox_in("openclaw", "gvisor");
    let info: serde_json::Value =
        serde_json::from_str(&moat_ok(&["sandbox", "inspect", &sb.name])).unwrap();
    assert_eq!(info[0]["isolation"]["tier"], "gvisor", "{info}");

    exec_ok(&sb, &["start-openclaw", SMOLLM2, "--configure-only"]);
    let before = daemon.prompt_tokens();
    let answer = openclaw_turn(&sb, "Say hello in one short sentence.");
    let reply = answer["payloads"][0]["text"].as_str().unwrap_or_default();
    assert!(!reply.trim().is_empty(), "no reply: {answer}");
    assert_eq!(answer["meta"]["agentMeta"]["provider"], "moat", "{answer}");
    assert_eq!(answer["meta"]["agentMeta"]["model"], SMOLLM2, "{answer}");
    let read = daemon.prompt_tokens() - before;
    assert!(read > 1000.0, "the model runner read {read} prompt tokens");
}

#[test]
fn start_openclaw_shows_the_terminal_ui_and_a_typed_message_gets_an_answer() {
    let _daemon = Daemon::start("agents-openclaw-tui", &[]);
    let sb = agent_sandbox("openclaw");
    let (state, runtime) = roots();
    let command = format!(
        "env MOAT_HOME={} MOAT_RUNTIME_DIR={} {BIN} sandbox exec -it {} start-openclaw {SMOLLM2}; sleep 60",
        state.display(),
        runtime.display(),
        sb.name,
    );
    let tty = Session::start(&unique("moat-openclaw"), 150, 40, &command);
    // The status line names the model; "connected" once the TUI reached OpenClaw's gateway.
    // OpenClaw's own gateway starts first (about 25 s here, more beside other tests).
    tty.wait_for(SMOLLM2, Duration::from_secs(180));
    tty.wait_for("connected", Duration::from_secs(120));
    tty.send(&["What is the capital of France?", "Enter"]);
    // The token count in the status line moves off `?` once the model answered.
    tty.wait_for("tokens 2", Duration::from_secs(180));
    // A long answer scrolls the question off the screen: read the history too.
    let screen = tty.history();
    let (_, after_question) = screen
        .rsplit_once("What is the capital of France?")
        .unwrap_or_else(|| panic!("the question is not on screen:\n{screen}"));
    let answer: String = after_question
        .lines()
        .take_while(|l| !l.contains("connected |") && !l.contains("agent main |"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!answer.trim().is_empty(), "no answer on screen:\n{screen}");

    // Started again from a second terminal: the first start's gateway goes
    // before a new one opens the port, and the first TUI, whose token still
    // holds, reconnects to the new gateway.
    let again = Session::start(&unique("moat-openclaw-again"), 150, 40, &command);
    again.wait_for("connected", Duration::from_secs(180));
    tty.wait_for("reconnected", Duration::from_secs(60));
    let gateways = exec_ok(
        &sb,
        &[
            "sh",
            "-c",
            "ps -eo stat=,args= | awk '$1 !~ /^Z/ && $2 == \"openclaw-gateway\"' | wc -l",
        ],
    );
    assert_eq!(gateways.trim(), "1", "OpenClaw gateways running");
}

/// A stand-in for OpenAI's chat completions API: logs what it received and
/// answers with the Authorization header it saw (so that an echoed key is
/// caught), streamed when asked. (`Upstream` serves the class `H` over TLS.)
const FAKE_OPENAI: &str = r#"
import http.server, ssl, sys, json
log = open("seen.log", "a")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        headers = {k.lower(): v for k, v in self.headers.items()}
        log.write(json.dumps({"path": self.path, "headers": headers, "model": body.get("model")}) + "\n"); log.flush()
        text = "cloud model here; you sent " + headers.get("authorization", "nothing")
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            def event(obj):
                data = ("data: " + json.dumps(obj) + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body.get("model")}
            event(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]))
            event(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            event(dict(base, choices=[], usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}))
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        else:
            out = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
    def log_message(self, *a): pass
"#;

#[test]
fn openclaw_reaches_a_cloud_model_through_the_gateway_and_never_holds_the_key() {
    let vendor = Upstream::start(FAKE_OPENAI, &["api.openai.com"]);
    let _daemon = Daemon::start(
        "agents-cloud",
        &[
            ("OPENAI_API_KEY", KEY.into()),
            ("MOAT_EXTRA_CA_CERTS", vendor.ca().display().to_string()),
            (
                "MOAT_GATEWAY_HOSTS",
                format!("api.openai.com=127.0.0.1:{}", vendor.port),
            ),
        ],
    );
    let sb = agent_sandbox("openclaw");
    // The stand-in lives on the host's loopback: only an exact rule opens it.
    sb.network_proxy(&["--allow-host", "api.openai.com"]);
    assert_eq!(
        exec_ok(&sb, &["sh", "-c", "echo $OPENAI_API_KEY"]),
        "proxy-managed\n"
    );

    exec_ok(
        &sb,
        &["start-openclaw", "openai/gpt-test", "--configure-only"],
    );
    let answer = openclaw_turn(&sb, "Hello, cloud.");
    let reply = answer["payloads"][0]["text"].as_str().unwrap_or_default();
    // The vendor saw the key; what came back into the sandbox names only the placeholder.
    assert_eq!(
        reply, "cloud model here; you sent proxy-managed",
        "{answer}"
    );
    let seen: serde_json::Value = serde_json::from_str(
        vendor
            .seen()
            .lines()
            .last()
            .expect("the vendor got a request"),
    )
    .unwrap();
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["model"], "gpt-test");
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {KEY}"));

    let log: Vec<serde_json::Value> =
        serde_json::from_str(&moat_ok(&["sandbox", "network", "log", "--json", &sb.name])).unwrap();
    assert!(
        log.iter().any(|e| e["host"] == "api.openai.com"
            && e["decision"] == "allowed"
            && e["path"] == "/v1/chat/completions"),
        "the gateway did not log the call: {log:?}"
    );
    assert_no_key_inside(&sb);
}

#[test]
fn claude_code_and_codex_answer_from_the_model_runner() {
    let daemon = Daemon::start("agents-claude-codex", &[]);

    let claude = agent_sandbox("claude");
    assert_eq!(
        exec_ok(&claude, &["claude", "--version"]),
        "2.1.332 (Claude Code)\n"
    );
    exec_ok(&claude, &["start-claude", SMOLLM2, "--configure-only"]);
    let settings = json_file(&claude, "/home/agent/.claude/settings.json");
    assert_eq!(
        settings["env"]["ANTHROPIC_BASE_URL"],
        "http://127.0.0.1:12434"
    );
    assert_eq!(settings["env"]["ANTHROPIC_MODEL"], SMOLLM2);
    assert_eq!(settings["env"]["CLAUDE_CODE_MAX_CONTEXT_TOKENS"], "8192");
    // With no key on the host, the cloud needs one, and says how.
    let cloud = exec(&claude, &["start-claude"]);
    assert!(!cloud.status.success());
    assert!(
        text(&cloud.stderr).contains("moat secret set anthropic"),
        "{}",
        text(&cloud.stderr)
    );
    // One real turn of Claude Code on SmolLM2, through the runner's Anthropic API
    // (`--bare`: Claude Code's full prompt is larger than SmolLM2's context).
    let turn = agent_turn(
        &daemon,
        &claude,
        &[
            "sh", "-c",
            "cd \"$HOME\" && eval \"$(jq -r '.env | to_entries[] | \"export \\(.key)=\\(.value | @sh)\"' ~/.claude/settings.json)\" \
             && claude --bare -p 'Say hello.' --dangerously-skip-permissions --tools Read",
        ],
    );
    assert!(!turn.trim().is_empty(), "Claude Code printed no answer");

    let codex = agent_sandbox("codex");
    assert_eq!(
        exec_ok(&codex, &["codex", "--version"]),
        "codex-cli 0.171.0\n"
    );
    exec_ok(&codex, &["start-codex", SMOLLM2, "--configure-only"]);
    let config = exec_ok(&codex, &["cat", "/home/agent/.codex/config.toml"]);
    // One real turn of Codex on SmolLM2, through the runner's Responses API.
    let turn = agent_turn(
        &daemon,
        &codex,
        &[
            "sh",
            "-c",
            "cd \"$HOME\" && codex exec --skip-git-repo-check 'Say hello.' </dev/null",
        ],
    );
    assert!(!turn.trim().is_empty(), "Codex printed no answer");
    for line in [
        format!("model = \"{SMOLLM2}\""),
        "model_provider = \"moat\"".to_string(),
        "base_url = \"http://127.0.0.1:12434/engines/llama.cpp/v1\"".to_string(),
        "approval_policy = \"never\"".to_string(),
        "sandbox_mode = \"danger-full-access\"".to_string(),
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "{line} is missing from:\n{config}"
        );
    }
}

/// The seed's four lines, as written, by the real `docker` client through
/// moat's plugins; Docker Hub names come from a local registry (the
/// daemon's mirror), since no hub is reachable here.
#[test]
fn the_seeds_docker_commands_run_unchanged_through_the_plugins() {
    let registry = Registry::start(None);
    let reg = registry.host();
    let _daemon = Daemon::start("agents-docker", &[("MOAT_REGISTRY_MIRRORS", reg.clone())]);
    // What Docker Hub would hold: ai/smollm2, and an openclaw image.
    let gguf = smollm2_gguf();
    let hub_model = format!("{reg}/ai/smollm2:latest");
    moat_ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        &hub_model,
    ]);
    moat_ok(&["model", "push", &hub_model]);
    moat_ok(&["model", "rm", &hub_model]);
    moat_ok(&["template", "build", "openclaw"]);
    let image = format!("{reg}/openclaw-moat:latest");
    moat_ok(&["image", "tag", "moat/openclaw:latest", &image]);
    moat_ok(&["image", "push", &image]);
    moat_ok(&["image", "rm", &image]);

    let docker_config = tempfile::tempdir().unwrap();
    let plugins = docker_config.path().join("cli-plugins");
    moat_ok(&["plugins", "install", "--dir", plugins.to_str().unwrap()]);
    let workspace = tempfile::Builder::new()
        .prefix("moat-ws-")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, runtime) = roots();
    let docker = |line: &str| {
        let args: Vec<&str> = line.split(' ').collect();
        let out = Command::new("docker")
            .args(&args)
            .current_dir(workspace.path())
            .env("DOCKER_CONFIG", docker_config.path())
            .env("MOAT_HOME", &state)
            .env("MOAT_RUNTIME_DIR", &runtime)
            .stdin(Stdio::null())
            .output()
            .expect("the docker client is installed");
        assert!(
            out.status.success(),
            "docker {line} failed:\n{}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
    };
    docker("model pull ai/smollm2");
    assert!(
        model_ls_json().iter().any(|m| m["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "ai/smollm2:latest"))),
        "{:?}",
        model_ls_json()
    );
    docker(&format!(
        "sandbox create --name openclaw -t {image} shell ."
    ));
    docker("sandbox network proxy openclaw --allow-host localhost");
    let _rm = RemoveSandbox("openclaw");

    let command = format!(
        "env DOCKER_CONFIG={} MOAT_HOME={} MOAT_RUNTIME_DIR={} docker sandbox run openclaw; sleep 30",
        docker_config.path().display(),
        state.display(),
        runtime.display(),
    );
    let tty = Session::start(&unique("moat-seed"), 120, 30, &command);
    tty.send(&["start-openclaw list", "Enter"]);
    tty.wait_for("ai/smollm2:latest", Duration::from_secs(60));
    // The name as the seed pulled it, short, is the model's full name.
    tty.send(&[
        "start-openclaw ai/smollm2 --configure-only && jq -r .agents.defaults.model.primary ~/.openclaw/openclaw.json",
        "Enter",
    ]);
    tty.wait_for("moat/ai/smollm2:latest", Duration::from_secs(60));
}

struct RemoveSandbox(&'static str);

impl Drop for RemoveSandbox {
    fn drop(&mut self) {
        let _ = moat(&["sandbox", "rm", self.0]);
    }
}

//! The prompt cache on disk and the shared KV pool, end to end: the real
//! daemon serving the real SmolLM2 and Gemma 3, a long prompt read once,
//! the model unloaded, and the same prompt after the reload restored from
//! the saved state instead of read again; a damaged cache file ignored and
//! removed; the cache's bound; four slots costing what one does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const SMOLLM2: &str = "ai/smollm2:135M-Q4_1";
const GEMMA3: &str = "ai/gemma3:270M-Q4_K_M";

/// A daemon of this test's roots with `config` as its configuration file,
/// its model runner on a port of its own, SmolLM2 and Gemma 3 packaged.
fn start(config: &str) -> u16 {
    let (state, _) = roots();
    std::fs::create_dir_all(&state).unwrap();
    let file = state.with_file_name("config.toml");
    std::fs::write(&file, config).unwrap();
    let port = free_port();
    start_daemon_with(&[
        ("MOAT_CONFIG", file.as_os_str()),
        ("MOAT_MODEL_PORT", port.to_string().as_ref()),
    ]);
    package_smollm2(SMOLLM2, &[]);
    package_gemma3(GEMMA3);
    wait_for_port(port);
    port
}

/// A system prompt of about `words` × 9 tokens, the same for a `seed`.
fn long_prompt(seed: u32, words: u32) -> String {
    (0..words)
        .map(|i| {
            format!(
                "Rule {seed}.{i}: check file{} before module{}.",
                i % 37,
                i % 11
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a greedy chat turn answered, and its timings.
#[derive(Debug)]
struct Turn {
    answer: String,
    prompt_tokens: u64,
    cache_n: u64,
}

fn ask(port: u16, model: &str, system: &str) -> Turn {
    ask_about(port, model, system, "Which file does rule 5 name?")
}

fn ask_about(port: u16, model: &str, system: &str, question: &str) -> Turn {
    let body = serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": 12,
        "temperature": 0,
    });
    let out = run_with_stdin(
        Command::new("curl")
            .args(["-sf", "-H", "content-type: application/json"])
            .args(["--data-binary", "@-"])
            .arg(format!("http://127.0.0.1:{port}/v1/chat/completions")),
        body.to_string().as_bytes(),
    );
    assert!(
        out.status.success(),
        "{model}: curl failed: {}",
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Turn {
        answer: v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap(),
        cache_n: v["timings"]["cache_n"].as_u64().unwrap(),
    }
}

/// The saved prefixes (files) of every model.
fn cache_files() -> Vec<PathBuf> {
    let (state, _) = roots();
    let mut files = Vec::new();
    for dir in std::fs::read_dir(state.join("prompt-cache"))
        .into_iter()
        .flatten()
    {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "kv") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// The model's log (its worker's standard error), as `moat model logs` shows it.
fn model_log(model: &str) -> String {
    moat_ok(&["model", "logs", model])
}

fn prompt_cache_size() -> String {
    let df = moat_ok(&["model", "df"]);
    df.lines()
        .find_map(|l| l.strip_prefix("Prompt cache"))
        .unwrap_or_else(|| panic!("no prompt cache row in:\n{df}"))
        .trim()
        .to_string()
}

#[test]
fn a_long_prompt_is_restored_after_an_unload_not_read_again() {
    let _daemon = fresh_isolated_roots("prompt-cache-unload");
    let port = start("");
    let system = long_prompt(1, 150);
    for model in [SMOLLM2, GEMMA3] {
        let cold = ask(port, model, &system);
        assert!(cold.prompt_tokens > 1000, "{model}: {cold:?}");
        assert_eq!(cold.cache_n, 0, "{model}: a cold model had a cache");
        let before = cache_files();
        moat_ok(&["model", "unload", model]);
        let saved: Vec<PathBuf> = cache_files()
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        assert_eq!(saved.len(), 1, "{model}: unload saved {saved:?}");
        assert_ne!(prompt_cache_size(), "0B");

        // Reloaded: the whole prompt but its last token comes from disk.
        let restored = ask(port, model, &system);
        assert_eq!(
            (restored.cache_n, restored.answer.as_str()),
            (cold.prompt_tokens - 1, cold.answer.as_str()),
            "{model}: after the reload"
        );

        // A damaged file is removed and the prompt read, to the same answer.
        moat_ok(&["model", "unload", model]);
        let mut bytes = std::fs::read(&saved[0]).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&saved[0], bytes).unwrap();
        let reread = ask(port, model, &system);
        assert_eq!(
            (reread.cache_n, reread.answer.as_str()),
            (0, cold.answer.as_str()),
            "{model}: with a damaged cache file"
        );
        assert!(
            model_log(model).contains("(its checksum does not match); the prompt is read instead"),
            "{model}: the model log does not say why:\n{}",
            model_log(model)
        );
        moat_ok(&["model", "unload", model]);
    }
    // Both models' prefixes are there; `cache rm MODEL` takes one's.
    assert_eq!(cache_files().len(), 2, "{:?}", cache_files());
    assert!(moat_ok(&["model", "cache", "rm", GEMMA3]).starts_with("Removed the prompt cache of"));
    assert_eq!(cache_files().len(), 1);
    moat_ok(&["model", "cache", "rm"]);
    assert_eq!(
        (cache_files(), prompt_cache_size()),
        (vec![], "0B".to_string())
    );
    let bad = moat(&["model", "cache", "rm", "ai/nope"]);
    assert!(!bad.status.success());
}

#[test]
fn the_cache_bound_evicts_the_least_recently_used_prefix() {
    let _daemon = fresh_isolated_roots("prompt-cache-bound");
    // One saved SmolLM2 prompt of ~2200 tokens is ~50 MiB: room for one.
    let port = start("[models]\nprompt_cache_size = \"80m\"\n");
    let (first, second) = (long_prompt(1, 150), long_prompt(2, 150));
    ask(port, SMOLLM2, &first);
    moat_ok(&["model", "unload", SMOLLM2]);
    let kept = cache_files();
    assert_eq!(kept.len(), 1);
    ask(port, SMOLLM2, &second);
    moat_ok(&["model", "unload", SMOLLM2]);
    let now = cache_files();
    assert_eq!(now.len(), 1, "the bound of 80m holds two: {now:?}");
    assert_ne!(now, kept, "the newer prefix was evicted, not the older");
    // The second comes back from disk; the first is read again.
    assert_eq!(ask(port, SMOLLM2, &first).cache_n, 0);
    let second_turn = ask(port, SMOLLM2, &second);
    assert_eq!(second_turn.cache_n, second_turn.prompt_tokens - 1);
}

/// Resident memory of a process, in bytes.
fn rss(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    kb << 10
}

/// SmolLM2 loaded by a daemon with `slots`, at 8192 tokens of context:
/// its worker's resident memory once loaded.
fn loaded_rss(slots: u32) -> u64 {
    start(&format!(
        "[models]\nslots = {slots}\ncontext_size = 8192\nprompt_cache_size = \"0\"\n"
    ));
    moat_ok(&["model", "run", "-d", SMOLLM2]);
    let ps: serde_json::Value = serde_json::from_str(&moat_ok(&["model", "ps", "--json"])).unwrap();
    assert_eq!(ps[0]["context_size"], 8192, "{ps}");
    let pid = ps[0]["pid"].as_i64().unwrap();
    let bytes = rss(pid);
    stop_everything();
    bytes
}

#[test]
fn four_slots_share_one_cache_and_cost_what_one_does() {
    let _daemon = fresh_isolated_roots("prompt-cache-slots");
    // 8192 tokens of SmolLM2's cache are 180 MiB: a cache per slot would
    // be three more of those.
    let one = loaded_rss(1);
    let four = loaded_rss(4);
    assert!(
        four as f64 <= one as f64 * 1.1,
        "4 slots: {} MiB resident, 1 slot: {} MiB",
        four >> 20,
        one >> 20
    );
}

#[test]
fn a_full_disk_drops_the_save_and_the_unload_goes_on() {
    let _daemon = fresh_isolated_roots("prompt-cache-full");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a small file system and must run as root"
    );
    let port = start("");
    // The cache's folder on a file system of 1 MiB: a prompt's state is
    // tens of MiB. The guard unmounts it with the rest of the test's state.
    let (state, _) = roots();
    let folder = state.join("prompt-cache");
    std::fs::create_dir_all(&folder).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "moat-test-full"])
        .arg(&folder)
        .status()
        .unwrap();
    assert!(mounted.success());
    let system = long_prompt(3, 150);
    let cold = ask(port, SMOLLM2, &system);
    let ps: serde_json::Value = serde_json::from_str(&moat_ok(&["model", "ps", "--json"])).unwrap();
    let pid = ps[0]["pid"].as_i64().unwrap() as i32;
    moat_ok(&["model", "unload", SMOLLM2]);
    assert!(!is_running(pid), "the worker still runs after the unload");
    assert_eq!(cache_files(), Vec::<PathBuf>::new());
    let log = model_log(SMOLLM2);
    assert!(
        log.contains("the prompt cache could not save") && log.contains("No space left on device"),
        "{log}"
    );
    // Nothing half-written is left, and the model serves as before.
    let left: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let again = ask(port, SMOLLM2, &system);
    assert_eq!((again.cache_n, again.answer), (0, cold.answer));
}

/// A prompt that shares a saved prefix but for its last few tokens: on
/// SmolLM2 the prefix is restored and cut back; Gemma 3's saved state has
/// only the window of its end in its sliding-window layers, so it is read
/// whole instead. Either way the answer is the one read from scratch.
#[test]
fn a_prompt_that_leaves_a_saved_prefix_early_answers_as_if_read_whole() {
    let _daemon = fresh_isolated_roots("prompt-cache-cut");
    let port = start("");
    let system = long_prompt(4, 150);
    let other = "Which module does rule 7 name?";
    for model in [SMOLLM2, GEMMA3] {
        let reference = ask_about(port, model, &system, other);
        moat_ok(&["model", "unload", model]);
        moat_ok(&["model", "cache", "rm", model]);
        let saved = ask(port, model, &system);
        moat_ok(&["model", "unload", model]);
        let after = ask_about(port, model, &system, other);
        assert_eq!(after.answer, reference.answer, "{model}");
        if model == GEMMA3 {
            assert_eq!(after.cache_n, 0, "{model}: cut before its window");
        } else {
            assert!(
                after.cache_n > saved.prompt_tokens - 20 && after.cache_n < saved.prompt_tokens - 1,
                "{model}: restored and cut back: {after:?} after {saved:?}"
            );
        }
        moat_ok(&["model", "unload", model]);
    }
}

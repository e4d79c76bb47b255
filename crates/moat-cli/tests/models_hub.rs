//! End-to-end: `moat model pull hf.co/ORG/REPO[:QUANT]` against a local
//! server that speaks the Hugging Face Hub's API (tests/python/hf_hub.py: the
//! paginated file list, the redirect to a CDN, ranged downloads, bearer
//! tokens), serving the real SmolLM2 and Gemma 3 GGUFs. A download cut off
//! halfway resumes; no tag means Q4_K_M; the pulled model answers; a wrong
//! quantization, a private repository and a file whose hash is not the one
//! listed are refused with what to do, and leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const TOKEN: &str = "hf_test_token";
const SMOL_REPO: &str = "moat-test/SmolLM2-135M-Instruct-GGUF";
const MIXED_REPO: &str = "moat-test/Mixed-GGUF";
const BROKEN_REPO: &str = "moat-test/Broken-GGUF";
const PRIVATE_REPO: &str = "moat-test/Private-GGUF";

struct Hub {
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _server: KillOnDrop,
}

impl Hub {
    /// Serves the real models as three repositories; the first download of
    /// SmolLM2's is cut off after 30 MiB.
    fn start() -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let repo = |name: &str, files: &[(&str, &Path)]| {
            let folder = dir.path().join(name.replace('/', "_"));
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("README.md"), "# a model\n").unwrap();
            for (file, target) in files {
                std::os::unix::fs::symlink(target, folder.join(file)).unwrap();
            }
            format!("{name}={}", folder.display())
        };
        let (smol, gemma) = (smollm2_gguf(), gemma3_gguf());
        let repos = [
            repo(SMOL_REPO, &[("SmolLM2-135M-Instruct.Q4_1.gguf", &smol)]),
            repo(
                MIXED_REPO,
                &[
                    ("a-smollm2-135m.Q4_1.gguf", &smol),
                    ("gemma-3-270m-it-Q4_K_M.gguf", &gemma),
                ],
            ),
            repo(BROKEN_REPO, &[("broken.Q4_1.gguf", &smol)]),
        ];
        let (port, cdn_port) = (free_port(), free_port());
        let log = dir.path().join("requests.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hf_hub.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(port.to_string())
            .arg(cdn_port.to_string())
            .arg(TOKEN)
            .arg(&log)
            .args(["--private", PRIVATE_REPO, "--wrong-sha", BROKEN_REPO])
            .args(["--cut", &format!("{SMOL_REPO}={}", 30 << 20)]);
        for r in &repos {
            cmd.args(["--repo", r]);
        }
        let server = KillOnDrop(cmd.stdout(Stdio::null()).spawn().unwrap());
        wait_for_port(port);
        wait_for_port(cdn_port);
        Hub {
            port,
            log,
            _dir: dir,
            _server: server,
        }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Downloads in the store's `incoming/` (the lock files beside them stay).
fn incoming() -> Vec<String> {
    let dir = roots().0.join("models").join("incoming");
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn models_are_pulled_from_a_hugging_face_hub() {
    let _daemon = fresh_isolated_roots("models-hub");
    let hub = Hub::start();
    // The first command starts the daemon, which reads the Hub's address
    // and the token from its environment as the Hub's own clients do.
    let out = moat_cmd()
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", hub.port))
        .env("HF_TOKEN", TOKEN)
        .env("MOAT_MODEL_PORT", free_port().to_string())
        .args(["model", "ls", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Cut off after 30 MiB: an error that says to pull again, no model named,
    // the bytes kept.
    let reference = format!("hf.co/{SMOL_REPO}:Q4_1");
    let cut = moat(&["model", "pull", &reference]);
    assert!(!cut.status.success());
    let err = text(&cut.stderr);
    assert!(
        err.contains("broke off") && err.contains("pull again"),
        "{err}"
    );
    assert_eq!(moat_ok(&["model", "ls", "-q"]), "");
    assert_eq!(incoming().len(), 1, "the partial download is kept");

    let again = moat(&["model", "pull", &reference]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("resuming at"),
        "{}",
        text(&again.stderr)
    );
    let ranges: Vec<String> = hub
        .requests()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/cdn/"))
        .filter_map(|r| r["range"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ranges.len(), 1, "one ranged download: {ranges:?}");
    let from: u64 = ranges[0]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from >= 20 << 20,
        "resumed where it broke off, not at {from}"
    );
    for r in hub.requests() {
        let cdn = r["path"].as_str().unwrap().starts_with("/cdn/");
        assert_eq!(
            r["auth"] == true,
            !cdn,
            "the token goes to the Hub's API and never to its CDN: {r}"
        );
    }
    assert!(incoming().is_empty(), "{:?}", incoming());

    let models = model_ls_json();
    assert_eq!(models.len(), 1);
    assert_eq!(
        models[0]["tags"],
        serde_json::json!(["hf.co/moat-test/smollm2-135m-instruct-gguf:Q4_1"])
    );
    let id = models[0]["id"].as_str().unwrap().to_string();
    let inspect: serde_json::Value =
        serde_json::from_str(&moat_ok(&["model", "inspect", &reference])).unwrap();
    assert_eq!(
        inspect["id"],
        id.as_str(),
        "any spelling of the name finds it"
    );
    let blob = roots()
        .0
        .join("models/blobs/sha256")
        .join(&sha256_digest_of(&smollm2_gguf())["sha256:".len()..]);
    assert!(blob.is_file(), "the GGUF is stored under its own hash");

    // Pulled again: up to date, nothing downloaded, the same model.
    let seen = hub.requests().len();
    let again = moat(&["model", "pull", &reference]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("up to date"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(model_ls_json().len(), 1, "no second model");
    assert_eq!(model_ls_json()[0]["id"], id.as_str());
    assert!(
        hub.requests()[seen..]
            .iter()
            .all(|r| !r["path"].as_str().unwrap().starts_with("/cdn/")),
        "nothing was downloaded again"
    );

    // The pulled model is a model: it answers.
    let answer = moat_ok(&["model", "run", &reference, "Say hello."]);
    assert!(!answer.trim().is_empty());

    // No tag: Q4_K_M, the Gemma file, although the SmolLM2 file comes first.
    let mixed = format!("hf.co/{MIXED_REPO}");
    let out = moat(&["model", "pull", &mixed]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let gemma = model_ls_json()
        .into_iter()
        .find(|m| m["tags"] == serde_json::json!(["hf.co/moat-test/mixed-gguf:latest"]))
        .expect("the untagged pull is named :latest");
    assert_eq!(gemma["config"]["architecture"], "gemma3");
    assert_eq!(gemma["config"]["quantization"], "Q4_K_M");

    // A quantization the repository lacks: what it has instead.
    let out = moat(&["model", "pull", &format!("{mixed}:Q8_0")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no GGUF file for Q8_0; it has Q4_1, Q4_K_M"),
        "{}",
        text(&out.stderr)
    );

    // A private repository: what to do about the token.
    let out = moat(&["model", "pull", &format!("hf.co/{PRIVATE_REPO}")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("HF_TOKEN"),
        "{}",
        text(&out.stderr)
    );

    // Bytes that are not what the Hub lists: refused, nothing kept.
    let before = moat_ok(&["model", "ls", "-q"]);
    let out = moat(&["model", "pull", &format!("hf.co/{BROKEN_REPO}:Q4_1")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("SHA-256"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(moat_ok(&["model", "ls", "-q"]), before);
    assert!(incoming().is_empty(), "{:?}", incoming());
}

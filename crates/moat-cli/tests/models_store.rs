//! End-to-end: the real SmolLM2 GGUF packaged by the real `moat` binary and
//! daemon, listed as `docker model ls` lists it, pushed to a real registry
//! (Debian's `docker-registry` on loopback, read back by `skopeo`), removed
//! and pulled back as the same model; a pull cut off halfway resumes and
//! names nothing until it is whole; a broken GGUF never enters the store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// Only the registry and the relay of it are used here.
#[allow(dead_code)]
#[path = "common/registry.rs"]
mod registry_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use registry_support::*;

/// The store of the test's daemon.
fn models_root() -> PathBuf {
    roots().0.join("models")
}

fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

/// Starts from an empty store (what an earlier run left is removed).
fn clear_models() {
    for id in moat_ok(&["model", "ls", "-q"]).lines() {
        moat_ok(&["model", "rm", "-f", id]);
    }
}

/// Cells of a `moat model ls` line (columns are at least two spaces apart).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_model_goes_through_a_registry_and_comes_back_the_same() {
    let _daemon = use_isolated_roots("models-roundtrip");
    let gguf = smollm2_gguf();
    let registry = Registry::start(None);
    clear_models();

    let dir = tempfile::tempdir().unwrap();
    let license = dir.path().join("LICENSE");
    std::fs::write(&license, "Apache License 2.0\n").unwrap();
    let packaged = moat_ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        "--license",
        license.to_str().unwrap(),
        "--context-size",
        "4096",
        "ai/smollm2:135M-Q4_1",
    ]);
    let listed = model_ls_json();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(packaged, format!("Packaged ai/smollm2:135M-Q4_1 ({id})\n"));
    let config = listed[0]["config"].clone();
    assert_eq!(
        (
            listed[0]["tags"].clone(),
            config["format"].clone(),
            config["quantization"].clone(),
            config["parameters"].clone(),
            config["architecture"].clone(),
            config["size"].clone(),
            config["context_size"].clone(),
            config["gguf"]["general.architecture"].clone(),
            config["gguf"]["llama.context_length"].clone(),
        ),
        (
            serde_json::json!(["ai/smollm2:135M-Q4_1"]),
            serde_json::json!("gguf"),
            serde_json::json!("Q4_1"),
            serde_json::json!("134.52 M"),
            serde_json::json!("llama"),
            serde_json::json!("93.81 MiB"),
            serde_json::json!(4096),
            serde_json::json!("llama"),
            serde_json::json!("8192"),
        )
    );

    // A second name, as `docker model ls` shows it: one row per tag.
    moat_ok(&["model", "tag", "ai/smollm2:135M-Q4_1", "smollm2"]);
    let table = moat_ok(&["model", "ls"]);
    let lines: Vec<Vec<String>> = table.lines().map(cells).collect();
    let short = id[7..19].to_string();
    let row = |name: &str| {
        vec![
            name.to_string(),
            "134.52 M".to_string(),
            "Q4_1".to_string(),
            "llama".to_string(),
            short.clone(),
            lines[1][5].clone(),
            "4096".to_string(),
            "93.81 MiB".to_string(),
        ]
    };
    assert_eq!(
        lines,
        vec![
            cells("MODEL NAME  PARAMETERS  QUANTIZATION  ARCHITECTURE  MODEL ID  CREATED  CONTEXT  SIZE"),
            row("smollm2:135M-Q4_1"),
            row("smollm2"),
        ],
        "{table}"
    );
    assert!(lines[1][5].ends_with(" ago"), "{table}");
    assert_eq!(moat_ok(&["model", "ls", "-q"]), format!("{short}\n"));
    let openai: serde_json::Value =
        serde_json::from_str(&moat_ok(&["model", "inspect", "--openai", "smollm2"])).unwrap();
    assert_eq!(
        (
            openai["id"].clone(),
            openai["object"].clone(),
            openai["owned_by"].clone()
        ),
        (
            serde_json::json!("ai/smollm2:135M-Q4_1"),
            serde_json::json!("model"),
            serde_json::json!("docker")
        )
    );
    // By id, a model with two tags goes only with -f.
    let refused = moat(&["model", "rm", &short]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--force"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(
        moat_ok(&["model", "rm", "smollm2"]),
        "Untagged: ai/smollm2:latest\n"
    );

    // To the registry; an independent client reads DMR's media types there.
    let remote = format!("{}/ai/smollm2:135M-Q4_1", registry.host());
    moat_ok(&["model", "tag", "ai/smollm2:135M-Q4_1", &remote]);
    let pushed = moat_ok(&["model", "push", &remote]);
    assert_eq!(
        pushed,
        format!("Pushed {remote}@{id} (3 uploaded, 0 mounted, 0 already there)\n")
    );
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{remote}"))
        .output()
        .expect("skopeo is installed");
    assert!(raw.status.success(), "{}", text(&raw.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let media: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        (manifest["config"]["mediaType"].as_str().unwrap(), media),
        (
            "application/vnd.docker.ai.model.config.v0.1+json",
            vec![
                "application/vnd.docker.ai.gguf.v3",
                "application/vnd.docker.ai.license"
            ]
        )
    );
    assert_eq!(
        manifest["layers"][0]["digest"].as_str().unwrap(),
        sha256_digest_of(&gguf)
    );
    // The image store tells a model from an image before fetching weights.
    let as_image = moat(&["image", "pull", &remote]);
    assert!(!as_image.status.success());
    assert!(
        text(&as_image.stderr).contains("it is a model")
            && text(&as_image.stderr).contains("moat model pull"),
        "{}",
        text(&as_image.stderr)
    );

    // Gone from the store, every blob with it.
    let removed = moat_ok(&["model", "rm", "-f", &id]);
    assert_eq!(
        removed,
        format!("Untagged: ai/smollm2:135M-Q4_1\nUntagged: {remote}\nDeleted: {id}\n")
    );
    assert_eq!(moat_ok(&["model", "ls", "-q"]), "");
    assert_eq!(
        files_in(&models_root().join("blobs/sha256")),
        Vec::<String>::new()
    );

    // Back from the registry: the same model, byte for byte.
    let pulled = moat(&["model", "pull", &remote]);
    assert!(pulled.status.success(), "{}", text(&pulled.stderr));
    assert_eq!(text(&pulled.stdout), format!("Pulled {remote} ({id})\n"));
    let back = model_ls_json();
    assert_eq!(
        (
            back.len(),
            back[0]["id"].as_str().unwrap(),
            &back[0]["config"]
        ),
        (1, id.as_str(), &config)
    );
    assert_eq!(
        sha256_digest_of(
            &models_root()
                .join("blobs/sha256")
                .join(&sha256_digest_of(&gguf)[7..])
        ),
        sha256_digest_of(&gguf)
    );
    let df = moat_ok(&["model", "df"]);
    assert!(
        df.starts_with("TYPE") && df.contains("Models") && df.contains("98."),
        "{df}"
    );
    moat_ok(&["model", "rm", &remote]);
    assert_eq!(moat_ok(&["model", "ls", "-q"]), "");
}

#[test]
fn a_pull_cut_off_halfway_resumes_and_names_nothing_until_whole() {
    let _daemon = use_isolated_roots("models-resume");
    let gguf = smollm2_gguf();
    let registry = Registry::start(None);
    clear_models();
    let direct = format!("{}/resume/smollm2:t", registry.host());
    moat_ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        &direct,
    ]);
    moat_ok(&["model", "push", &direct]);
    let id = model_ls_json()[0]["id"].as_str().unwrap().to_string();
    moat_ok(&["model", "rm", &direct]);

    let port = free_port();
    let through_relay = format!("localhost:{port}/resume/smollm2:t");
    let relay = CuttingRelay::start(port, registry.port, 0, 30 << 20);
    let cut = moat(&["model", "pull", &through_relay]);
    assert!(!cut.status.success(), "the relay cuts after 30 MiB");
    assert!(
        text(&cut.stderr).contains("to resume"),
        "{}",
        text(&cut.stderr)
    );
    assert_eq!(
        moat_ok(&["model", "ls", "-q"]),
        "",
        "no half model is named"
    );
    let partial: u64 = files_in(&models_root().join("incoming"))
        .iter()
        .map(|f| {
            std::fs::metadata(models_root().join("incoming").join(f))
                .unwrap()
                .len()
        })
        .sum();
    assert!(partial > 0, "what arrived is kept for the next pull");
    drop(relay);

    let _relay = CuttingRelay::start(port, registry.port, 0, 0);
    let again = moat(&["model", "pull", &through_relay]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("resuming at"),
        "{}",
        text(&again.stderr)
    );
    let back = model_ls_json();
    assert_eq!(
        (back[0]["id"].as_str().unwrap(), back[0]["tags"].clone()),
        (id.as_str(), serde_json::json!([through_relay]))
    );
    assert_eq!(
        files_in(&models_root().join("incoming")),
        Vec::<String>::new()
    );
    moat_ok(&["model", "rm", &through_relay]);
}

#[test]
fn a_broken_gguf_never_enters_the_store() {
    let _daemon = use_isolated_roots("models-broken");
    let gguf = smollm2_gguf();
    clear_models();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let zip = dir.path().join("zip.gguf");
    std::fs::write(&zip, b"PK\x03\x04 not a model").unwrap();

    for (file, why) in [(&cut, "it is truncated"), (&zip, "it is not a GGUF file")] {
        let out = moat(&[
            "model",
            "package",
            "--gguf",
            file.to_str().unwrap(),
            "broken",
        ]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        // Progress lines first; the error is one line of its own.
        let err = stderr.lines().last().unwrap_or_default();
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            err.starts_with(&format!("moat: {name} is not a usable GGUF model"))
                && err.contains(why),
            "{stderr}"
        );
    }
    assert_eq!(moat_ok(&["model", "ls", "-q"]), "");
    for dir in ["blobs/sha256", "manifests/sha256", "incoming"] {
        assert_eq!(
            files_in(&models_root().join(dir)),
            Vec::<String>::new(),
            "{dir}"
        );
    }

    let missing = moat(&["model", "inspect", "smollm2"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("run `moat model pull smollm2`"),
        "{}",
        text(&missing.stderr)
    );
    // No registry host means Docker Hub, which this machine cannot reach.
    let hub = moat(&["model", "pull", "ai/smollm2"]);
    assert!(!hub.status.success());
    assert!(
        text(&hub.stderr).contains("docker.io/ai/smollm2:latest")
            && text(&hub.stderr).contains("localhost:5000/ai/smollm2"),
        "{}",
        text(&hub.stderr)
    );
}

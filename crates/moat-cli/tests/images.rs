//! End-to-end: the image store under bad conditions, and `image import`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn blob(state: &Path, digest: &str) -> std::path::PathBuf {
    state
        .join("images/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn a_corrupt_layer_blob_is_reported_and_the_image_can_be_replaced() {
    let _daemon = use_isolated_roots("corrupt");
    ensure_template();
    let (state, _) = roots();
    let index = json_file(&state.join("images/index.json"));
    let manifest = json_file(&blob(
        &state,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let config = json_file(&blob(
        &state,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let diff_id = config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();

    // Flip one byte in the middle of the layer and drop its unpacked copy.
    let path = blob(&state, &layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_dir_all(state.join("images/layers/sha256").join(&diff_id)).unwrap();

    let ws = tempfile::tempdir_in("/tmp").unwrap();
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        "c1",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is corrupt") && err.contains("moat image rm"),
        "{err}"
    );
    // One line of error; a warning of create's (a disk budget larger than
    // the host's free space, on a full test machine) may come before it.
    let errors = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("moat: warning:"))
        .count();
    assert_eq!(errors, 1, "{err}");
    assert_eq!(moat_ok(&["sandbox", "ls", "-q"]), "");

    // Following the advice brings it back.
    moat_ok(&["image", "rm", "moat/shell:latest"]);
    ensure_template();
    moat_ok(&[
        "sandbox",
        "create",
        "--name",
        "c2",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    let out = moat(&["sandbox", "exec", "c2", "true"]);
    assert!(out.status.success());
    moat_ok(&["sandbox", "rm", "c2"]);
}

#[test]
fn a_template_build_on_a_full_disk_fails_in_one_line_and_leaves_no_image() {
    let _daemon = use_isolated_roots("fulldisk");
    // The daemon takes MOAT_CACHE_DIR from the command that starts it: start afresh.
    stop_everything();
    let _ = std::fs::remove_dir_all(roots().0);
    let small = tempfile::tempdir_in("/tmp").unwrap();
    let dir = small.path().to_str().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs", dir])
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small tmpfs needs root");
    let _unmount = Unmount(dir.to_string());
    let out = moat_cmd()
        .env("MOAT_CACHE_DIR", dir)
        .args(["template", "build", "shell"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success());
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("moat: not enough free space in") && last.contains("MOAT_CACHE_DIR"),
        "{err}"
    );
    assert_eq!(moat_ok(&["image", "ls", "-q"]), "");
    assert_eq!(
        files_under(small.path()),
        Vec::<std::path::PathBuf>::new(),
        "nothing left on the full disk"
    );
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.0])
            .status();
    }
}

#[test]
fn import_lists_and_removes_an_image() {
    let _daemon = use_isolated_roots("import");
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let root = tmp.path().join("root");
    for d in ["bin", "etc", "home/agent"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000::/home/agent:/bin/sh\n",
    )
    .unwrap();
    let tar = tmp.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .args([
            "cf",
            tar.to_str().unwrap(),
            "-C",
            root.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let id = moat_ok(&["image", "import", tar.to_str().unwrap(), "tiny:v1"]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&moat_ok(&["image", "ls", "--json"])).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|i| (i["reference"].as_str().unwrap(), i["id"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        vec![("tiny:v1", id.trim())]
    );
    assert_eq!(moat_ok(&["image", "rm", "tiny:v1"]), "Untagged: tiny:v1\n");
    assert_eq!(moat_ok(&["image", "ls", "-q"]), "");
    let out = moat(&["image", "import", "/nonexistent.tar", "x:y"]);
    assert!(
        text(&out.stderr).contains("cannot find /nonexistent.tar"),
        "{}",
        text(&out.stderr)
    );
    stop_daemon();
}

/// Names of the sandboxes `sandbox ls` shows.
fn sandbox_names() -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&moat_ok(&["sandbox", "ls", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_daemon_killed_mid_build_leaves_no_build_sandbox_behind() {
    // The shared daemon's cache has the shell tarball; this daemon gets a
    // cache of its own with only that, so that node's steps really run.
    let cache = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::create_dir(cache.path().join("templates")).unwrap();
    cached_shell_tarball_into(&cache.path().join("templates"));
    let _daemon = use_isolated_roots("killedbuild");
    stop_everything();
    let _ = std::fs::remove_dir_all(roots().0);
    start_daemon_with(&[("MOAT_CACHE_DIR", cache.path().as_os_str())]);
    let said = cache.path().join("build.out");
    let mut build = moat_cmd()
        .args(["template", "build", "node"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&said).unwrap())
        .stderr(std::fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while !sandbox_names()
        .iter()
        .any(|n| n.starts_with("template-build-node-"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no build sandbox appeared; the build said:\n{}",
            std::fs::read_to_string(&said).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // SIGKILL, mid-build.
    stop_daemon();
    assert!(
        !build.wait().unwrap().success(),
        "the build outlived its daemon"
    );
    // The next daemon removes what the interrupted build left.
    assert_eq!(sandbox_names(), Vec::<String>::new());
    assert!(!moat_ok(&["image", "ls"]).contains("moat/node"));
    // And no one else may take a build sandbox's name.
    let ws = tempfile::tempdir().unwrap();
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        "template-build-mine",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("template builds'"),
        "{}",
        text(&out.stderr)
    );
}

//! End-to-end: what a sandbox writes cannot make `sandbox save` produce a
//! layer bigger than its data, a layer that deletes the image's files, or
//! a layer that grants privileges the image did not have.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// A unique image name for this test process.
fn image(prefix: &str) -> String {
    format!("boundary/{}:v1", unique(prefix))
}

/// Stops the sandbox and saves it; returns the command's stderr.
fn stop_and_save(sb: &Sandbox, reference: &str) -> std::process::Output {
    moat_ok(&["sandbox", "stop", &sb.name]);
    moat(&["sandbox", "save", &sb.name, reference])
}

/// A sandbox made from a saved image, removed (with the image) when dropped.
struct FromImage {
    name: String,
    reference: String,
    _ws: tempfile::TempDir,
}

impl FromImage {
    fn new(reference: &str) -> FromImage {
        let ws = tempfile::tempdir_in("/tmp").unwrap();
        let name = unique("from-saved");
        let created = moat(&[
            "sandbox",
            "create",
            "--name",
            &name,
            "-t",
            reference,
            "shell",
            ws.path().to_str().unwrap(),
        ]);
        assert!(created.status.success(), "{}", text(&created.stderr));
        FromImage {
            name,
            reference: reference.to_string(),
            _ws: ws,
        }
    }

    /// `sh -c SCRIPT` inside as root; its stdout, insisting on success.
    fn root_sh(&self, script: &str) -> String {
        let out = moat(&[
            "sandbox", "exec", "-u", "root", &self.name, "sh", "-c", script,
        ]);
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
        text(&out.stdout)
    }
}

impl Drop for FromImage {
    fn drop(&mut self) {
        let _ = moat(&["sandbox", "rm", &self.name]);
        let _ = moat(&["image", "rm", &self.reference]);
    }
}

fn root_ok(sb: &Sandbox, script: &str) -> String {
    let out = sb.root_sh(script);
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn a_sparse_file_saves_as_a_small_layer_and_comes_back_whole() {
    let sb = Sandbox::new("sparse");
    root_ok(&sb, "truncate -s 3500M /root/f && echo x >> /root/f");
    let reference = image("sparse");
    let saved = stop_and_save(&sb, &reference);
    assert!(saved.status.success(), "{}", text(&saved.stderr));
    let restored = FromImage::new(&reference);

    let inspect: serde_json::Value =
        serde_json::from_str(&moat_ok(&["image", "inspect", &reference])).unwrap();
    let layers = inspect[0]["manifest"]["layers"].as_array().unwrap();
    let size = layers.last().unwrap()["size"].as_u64().unwrap();
    assert!(size < 64 << 10, "the saved layer is {size} bytes");

    // Same size and content; the hole is still a hole on disk.
    let out = restored.root_sh(
        "stat -c '%s %b' /root/f; tail -c 2 /root/f; head -c 1048576 /root/f | tr -d '\\0' | wc -c",
    );
    let lines: Vec<&str> = out.lines().collect();
    let (apparent, blocks) = lines[0].split_once(' ').unwrap();
    assert_eq!(apparent, ((3500u64 << 20) + 2).to_string(), "{out}");
    assert!(blocks.parse::<u64>().unwrap() < 2048, "{out}");
    assert_eq!(&lines[1..], ["x", "0"], "{out}");
}

#[test]
fn a_file_named_like_a_whiteout_refuses_the_save_until_it_is_renamed() {
    let sb = Sandbox::new("whiteout");
    root_ok(&sb, "echo evil > /etc/.wh.passwd");
    let reference = image("whiteout");
    let refused = stop_and_save(&sb, &reference);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("/etc/.wh.passwd"))
        .unwrap_or_else(|| panic!("the error names the file: {stderr}"));
    assert!(line.contains("rename or remove it"), "{stderr}");
    assert!(!moat_ok(&["image", "ls", "-q"])
        .lines()
        .any(|l| l == reference));

    // Renamed, it saves, and the image's /etc/passwd is still there.
    let started = moat(&["sandbox", "run", &sb.name, "--", "-c", "true"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    root_ok(&sb, "mv /etc/.wh.passwd /etc/wh.passwd");
    let saved = stop_and_save(&sb, &reference);
    assert!(saved.status.success(), "{}", text(&saved.stderr));
    let restored = FromImage::new(&reference);
    assert_eq!(
        restored.root_sh("grep -c '^root:' /etc/passwd; cat /etc/wh.passwd"),
        "1\nevil\n"
    );
}

#[test]
fn set_id_bits_survive_a_copy_up_but_a_sandbox_cannot_add_them() {
    let sb = Sandbox::new("setid");
    // Two setuid files of the image: one touched (copied up), one given a
    // second name; then every way to make a new one that seccomp may let by.
    let found = root_ok(
        &sb,
        r#"set -e
        set -- $(find /usr/bin -perm -4000 -type f | sort)
        test $# -ge 2
        echo "$1 $2 $(stat -c %a "$1")"
        touch "$1"
        ln "$2" /usr/local/bin/linked
        printf x > /usr/local/bin/made
        chmod 4755 /usr/local/bin/made 2>/dev/null || true
        perl -e 'use Fcntl; sysopen(F, "/usr/local/bin/opened", O_CREAT|O_WRONLY, 06755)' || true
        if [ "$(uname -m)" = x86_64 ]; then
          printf x > /usr/local/bin/capped
          perl -e 'my ($p, $n, $v) = ("/usr/local/bin/capped", "security.capability", pack("V5", 0x02000001, 0x2000, 0, 0, 0)); syscall(188, $p, $n, $v, 20, 0) == 0 or die "$!"' 2>/dev/null && echo capped || true
        fi
        stat -c '%a %n' /usr/local/bin/made /usr/local/bin/opened 2>/dev/null || true"#,
    );
    let mut lines = found.lines();
    let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
    let (touched, linked, mode) = (first[0], first[1], first[2]);
    assert_ne!(u32::from_str_radix(mode, 8).unwrap() & 0o4000, 0);
    let rest: Vec<&str> = lines.collect();

    let reference = image("setid");
    let saved = stop_and_save(&sb, &reference);
    assert!(saved.status.success(), "{}", text(&saved.stderr));
    let warnings = text(&saved.stderr);
    assert!(
        warnings.contains("/usr/local/bin/linked is saved without its setuid bit"),
        "{warnings}"
    );
    assert!(
        warnings.contains(&format!("{linked} is saved without its setuid bit")),
        "{warnings}"
    );
    assert!(!warnings.contains(&format!("{touched} ")), "{warnings}");
    // Whatever the sandbox managed to set is reported.
    for line in &rest {
        if let Some((mode, path)) = line.split_once(' ') {
            if u32::from_str_radix(mode, 8).unwrap() & 0o6000 != 0 {
                assert!(
                    warnings.contains(&format!("{path} is saved without")),
                    "{warnings}"
                );
            }
        }
    }
    if rest.contains(&"capped") {
        assert!(
            warnings.contains("/usr/local/bin/capped is saved without its file capability"),
            "{warnings}"
        );
    }

    let restored = FromImage::new(&reference);
    let modes = restored.root_sh(&format!(
        "stat -c '%a %n' {touched} {linked} /usr/local/bin/linked /usr/local/bin/made; stat -c '%a %n' /usr/local/bin/opened 2>/dev/null || true"
    ));
    let mut modes = modes.lines().map(|l| l.split_once(' ').unwrap());
    assert_eq!(
        modes.next().unwrap(),
        (mode, touched),
        "the copy-up keeps it"
    );
    for (mode, path) in modes {
        assert_eq!(
            u32::from_str_radix(mode, 8).unwrap() & 0o6000,
            0,
            "{path} is {mode} in the saved image"
        );
    }
}

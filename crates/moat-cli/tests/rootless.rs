//! End-to-end as an unprivileged user: the daemon, sandboxes and their
//! clean-up work without root, with the caller's subordinate ids.
//!
//! Needs the user `moat-test` with a subordinate id range; `scripts/test.sh`
//! (the test command) creates it. Runs as root, which switches to that user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

const USER: &str = "moat-test";

struct Rootless {
    dir: PathBuf,
    uid: u32,
}

impl Rootless {
    fn setup() -> Rootless {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the rootless tests switch users and must start as root"
        );
        let user = nix::unistd::User::from_name(USER)
            .unwrap()
            .unwrap_or_else(|| panic!("no user {USER}: run scripts/test.sh, which creates it"));
        let dir = PathBuf::from(format!("/tmp/moat-rootless-{}", unique("t")));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["", "cache/templates"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::copy(BIN, dir.join("moat")).unwrap();
        // The template's root file system, from the cache the root daemon filled.
        let target = cached_shell_tarball_into(&dir.join("cache/templates"));
        for p in [dir.clone(), dir.join("cache"), dir.join("cache/templates")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        for sub in ["user", "ws"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
            nix::unistd::chown(&dir.join(sub), Some(user.uid), Some(user.gid)).unwrap();
        }
        Rootless {
            dir,
            uid: user.uid.as_raw(),
        }
    }

    fn moat(&self, args: &[&str]) -> Output {
        Command::new("runuser")
            .args([
                "-u",
                USER,
                "--",
                "env",
                "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=/tmp",
            ])
            .arg(format!(
                "MOAT_HOME={}",
                self.dir.join("user/state").display()
            ))
            .arg(format!(
                "MOAT_RUNTIME_DIR={}",
                self.dir.join("user/run").display()
            ))
            .arg(format!(
                "MOAT_CACHE_DIR={}",
                self.dir.join("cache").display()
            ))
            .arg(self.dir.join("moat"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.moat(args);
        assert!(out.status.success(), "moat {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        let _ = self.moat(&["sandbox", "reset", "-f"]);
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("user/run/moat.lock")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn an_unprivileged_user_runs_sandboxes_end_to_end() {
    let r = Rootless::setup();
    let ws = r.dir.join("ws");
    let w = ws.to_str().unwrap();
    let out = r.moat(&["sandbox", "create", "--name", "rl", "shell", w]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Without cgroup delegation the limits cannot be enforced, and the user is told.
    let err = text(&out.stderr);
    assert!(err.contains("not enforced"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&r.ok(&["sandbox", "inspect", "rl"])).unwrap();
    assert_eq!(info[0]["limits"]["enforced"], false);

    let out = r.moat(&[
        "sandbox",
        "exec",
        "rl",
        "sh",
        "-c",
        "id -u; sudo -n id -u; stat -c %U /; echo hi > made; cat /proc/self/uid_map | wc -l",
    ]);
    assert_eq!(
        text(&out.stdout),
        "1000\n0\nroot\n3\n",
        "{}",
        text(&out.stderr)
    );
    // The agent's files belong to the user on the host.
    assert_eq!(std::fs::metadata(ws.join("made")).unwrap().uid(), r.uid);

    // The host outside the workspace stays out of reach.
    let out = r.moat(&[
        "sandbox",
        "exec",
        "-u",
        "root",
        "rl",
        "sh",
        "-c",
        &format!(
            "ls {} 2>&1; ls /tmp/moat-rootless-* 2>&1 | head -1",
            r.dir.join("user").display()
        ),
    ]);
    assert!(
        text(&out.stdout).contains("No such file or directory"),
        "{}",
        text(&out.stdout)
    );

    // Stop, run again, remove: nothing is left, not even files owned by subordinate ids.
    r.ok(&["sandbox", "stop", "rl"]);
    let out = r.moat(&[
        "sandbox",
        "run",
        "rl",
        "--",
        "-c",
        "sudo touch /etc/kept; echo back",
    ]);
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));
    let info: serde_json::Value =
        serde_json::from_str(&r.ok(&["sandbox", "inspect", "rl"])).unwrap();
    let pid = info[0]["pid"].as_i64().unwrap() as i32;
    let id = info[0]["id"].as_str().unwrap().to_string();
    r.ok(&["sandbox", "rm", "rl"]);
    assert_eq!(pids_in_sandbox(pid), Vec::<i32>::new());
    assert!(!r.dir.join("user/state/sandboxes").join(&id).exists());
}

#[test]
fn an_unprivileged_user_saves_a_sandbox_with_files_only_its_root_can_read() {
    let r = Rootless::setup();
    let w = r.dir.join("ws");
    let w = w.to_str().unwrap();
    r.ok(&["sandbox", "create", "--name", "orig", "shell", w]);
    let out = r.moat(&[
        "sandbox", "exec", "-u", "root", "orig", "sh", "-c",
        "echo hi > /root/secret && chmod 600 /root/secret && rm /etc/issue && rm -rf /etc/apt/apt.conf.d",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // No cgroup delegation here, so no freezer: a running sandbox must be stopped.
    let running = r.moat(&["sandbox", "save", "orig", "rootless/saved:v1"]);
    assert!(!running.status.success());
    assert!(
        text(&running.stderr).contains("stop it first"),
        "{}",
        text(&running.stderr)
    );
    r.ok(&["sandbox", "stop", "orig"]);
    r.ok(&["sandbox", "save", "orig", "rootless/saved:v1"]);
    r.ok(&[
        "sandbox",
        "create",
        "--name",
        "copy",
        "-t",
        "rootless/saved:v1",
        "shell",
        w,
    ]);
    let out = r.moat(&[
        "sandbox", "exec", "-u", "root", "copy", "sh", "-c",
        "stat -c '%U %a' /root/secret; cat /root/secret; ls /etc/issue /etc/apt/apt.conf.d 2>&1 | wc -l",
    ]);
    assert_eq!(
        text(&out.stdout),
        "root 600\nhi\n2\n",
        "{}",
        text(&out.stderr)
    );
}

/// The attacks of "Hold the boundary" that apply without root: a file
/// capability or a set-id file (through `O_TMPFILE` too) planted in the
/// workspace, and the caller's descriptors reaching the sandbox.
#[test]
fn a_rootless_sandbox_plants_no_capability_or_set_id_file_and_holds_no_caller_descriptor() {
    let r = Rootless::setup();
    let ws = r.dir.join("ws");
    let w = ws.to_str().unwrap();
    r.ok(&["sandbox", "create", "--name", "rlb", "shell", w]);
    let probe = format!(
        r#"import os, struct, ctypes
l = ctypes.CDLL(None, use_errno=True)
open("{w}/capfile", "w").write("x")
try:
    os.setxattr("{w}/capfile", "security.capability", struct.pack("<IIIIII", 0x03000001, 1 << 7, 0, 0, 0, 0))
    print("cap SET")
except OSError as e:
    print("cap", e.errno)
try:
    fd = os.open("{w}", 0o20000000 | os.O_DIRECTORY | os.O_WRONLY, 0o6755)
    l.linkat(-100, b"/proc/self/fd/%d" % fd, -100, b"{w}/planted", 0x400)
    print("tmpfile MADE")
except OSError as e:
    print("tmpfile", e.errno)
print(" ".join(os.readlink("/proc/self/fd/%d" % fd) for fd in (0, 1, 2)))
"#
    );
    std::fs::write(ws.join("probe.py"), &probe).unwrap();
    nix::unistd::chown(
        &ws.join("probe.py"),
        Some(nix::unistd::Uid::from_raw(r.uid)),
        None,
    )
    .unwrap();
    let out = r.moat(&[
        "sandbox",
        "exec",
        "-u",
        "root",
        "rlb",
        "python3",
        &format!("{w}/probe.py"),
    ]);
    let said = text(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 3, "{said}{}", text(&out.stderr));
    assert_eq!(lines[0], "cap 1");
    assert_eq!(lines[1], "tmpfile 1");
    for fd in lines[2].split(' ') {
        assert!(fd.starts_with("pipe:[") || fd == "/dev/null", "{said}");
    }
    assert!(!ws.join("planted").exists());
    let caps = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import os\ntry:\n os.getxattr('{w}/capfile', 'security.capability'); print('HAS')\nexcept OSError as e:\n print(e.errno)"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(text(&caps.stdout).trim(), "61");
}

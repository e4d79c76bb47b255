//! End-to-end as an unprivileged user: the daemon, sandboxes and their
//! clean-up work without root, with the caller's subordinate ids.
//!
//! Needs the user `moat-test` with a subordinate id range; `scripts/test.sh`
//! (the test command) creates it. Runs as root, which switches to that user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::rootless::Rootless;
use common::*;

#[test]
fn an_unprivileged_user_runs_sandboxes_end_to_end() {
    let r = Rootless::setup("t");
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
    let r = Rootless::setup("t");
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

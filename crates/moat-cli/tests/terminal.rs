//! End-to-end: a real terminal inside a sandbox, driven from tmux as a person
//! would: the window size passes through and follows resizes, Ctrl-C reaches
//! the process inside, and the exit code comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is installed (scripts/deps.sh)");
    text(&out.stdout)
}

fn wait_for_screen(session: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.contains(want) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "{want:?} never appeared; the screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_terminal_passes_size_resizes_ctrl_c_and_the_exit_code() {
    let sb = Sandbox::new("tty");
    let (state, runtime) = roots();
    let session = unique("moat-tty");
    let exit_file = sb.ws().join("exit-code");
    let command = format!(
        "env MOAT_HOME={} MOAT_RUNTIME_DIR={} {BIN} sandbox exec -it {} bash --norc; echo EXIT=$? > {}; sleep 30",
        state.display(),
        runtime.display(),
        sb.name,
        exit_file.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &command,
    ]);
    let _kill = KillSession(session.clone());

    tmux(&[
        "send-keys",
        "-t",
        &session,
        "PS1='moat-prompt$ '; stty size",
        "Enter",
    ]);
    wait_for_screen(&session, "30 100");

    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &session, "clear; stty size", "Enter"]);
    wait_for_screen(&session, "40 120");

    tmux(&["send-keys", "-t", &session, "sleep 1000", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", &session, "C-c", ""]);
    tmux(&["send-keys", "-t", &session, "echo after-$((40+2))", "Enter"]);
    wait_for_screen(&session, "after-42");

    tmux(&["send-keys", "-t", &session, "exit 5", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exit_file.exists() {
        assert!(Instant::now() < deadline, "the exec never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap(), "EXIT=5\n");
}

struct KillSession(String);

impl Drop for KillSession {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

//! End-to-end: a real terminal inside a sandbox, driven from tmux as a person
//! would: the window size passes through and follows resizes, Ctrl-C reaches
//! the process inside, and the exit code comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::tmux::{tmux, Session};
use common::*;

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
    let tty = Session::start(&session, 100, 30, &command);

    tty.send(&["PS1='moat-prompt$ '; stty size", "Enter"]);
    tty.wait_for("30 100", Duration::from_secs(20));

    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(300));
    tty.send(&["clear; stty size", "Enter"]);
    tty.wait_for("40 120", Duration::from_secs(20));

    tty.send(&["sleep 1000", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tty.send(&["C-c", ""]);
    tty.send(&["echo after-$((40+2))", "Enter"]);
    tty.wait_for("after-42", Duration::from_secs(20));

    tty.send(&["exit 5", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exit_file.exists() {
        assert!(Instant::now() < deadline, "the exec never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap(), "EXIT=5\n");
}

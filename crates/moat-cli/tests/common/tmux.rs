//! A terminal driven as a person would: a tmux session whose screen the
//! test reads and into which it types.

use std::process::Command;
use std::time::{Duration, Instant};

use super::text;

pub fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is installed (scripts/deps.sh)");
    text(&out.stdout)
}

/// A detached session of `cols` x `rows` running `command`, killed when dropped.
pub struct Session(pub String);

impl Session {
    pub fn start(name: &str, cols: u16, rows: u16, command: &str) -> Session {
        tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            command,
        ]);
        Session(name.to_string())
    }

    /// Types `keys` (tmux key names, e.g. "Enter").
    pub fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.0];
        args.extend_from_slice(keys);
        tmux(&args);
    }

    pub fn screen(&self) -> String {
        tmux(&["capture-pane", "-p", "-t", &self.0])
    }

    /// The screen with everything that scrolled off its top.
    pub fn history(&self) -> String {
        tmux(&["capture-pane", "-p", "-S", "-", "-E", "-", "-t", &self.0])
    }

    /// Waits until the screen shows `want`; returns the screen.
    pub fn wait_for(&self, want: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let screen = self.screen();
            if screen.contains(want) {
                // Shown when the test fails, to tell which step was slow.
                eprintln!("{want:?} appeared after {:?}", start.elapsed());
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{want:?} never appeared; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

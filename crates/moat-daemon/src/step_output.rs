//! Following one template step: its output line by line while it runs,
//! until the step's own process ends or its time limit passes.
//!
//! The end of the output is not the end of the step. A step that leaves a
//! process in the background (a server, `sleep 100 &`) hands that process
//! its stdout, so the pipe stays open after the step has exited; reading to
//! end of file would wait for ever. The step's exit code decides instead,
//! and the lines already written are still collected for a moment after it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long lines are still taken after the step has exited: enough for
/// what is already in the pipe, short enough not to wait on a leftover.
const AFTER_EXIT: Duration = Duration::from_millis(300);

/// How a step ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StepEnd {
    Exited(i32),
    /// Still running when its time ran out; the caller stops it.
    TimedOut,
}

enum Event<E> {
    Line(String),
    OutputClosed,
    Exited(Result<i32, E>),
}

/// Hand each line of `output` to `on_line` until `wait` (which blocks until
/// the step exits) returns, or until `limit` has passed.
pub(crate) fn follow<E: Send + 'static>(
    output: File,
    wait: impl FnOnce() -> Result<i32, E> + Send + 'static,
    limit: Duration,
    mut on_line: impl FnMut(String),
) -> Result<StepEnd, E> {
    let (tx, rx) = mpsc::channel();
    let lines = tx.clone();
    // Both threads end on their own: the reader when the last writer closes
    // the pipe (at the latest when the build's sandbox is stopped), the
    // waiter when the step ends; a send to a receiver that is gone is fine.
    std::thread::spawn(move || {
        for line in BufReader::new(output).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if lines.send(Event::Line(line)).is_err() {
                return;
            }
        }
        let _ = lines.send(Event::OutputClosed);
    });
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(wait()));
    });
    let deadline = Instant::now() + limit;
    let mut output_open = true;
    let code = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Line(line)) => on_line(line),
            Ok(Event::OutputClosed) => output_open = false,
            Ok(Event::Exited(code)) => break code?,
            Err(_) => return Ok(StepEnd::TimedOut),
        }
    };
    let until = Instant::now() + AFTER_EXIT;
    while output_open {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Event::Line(line)) => on_line(line),
            Ok(Event::OutputClosed) | Err(_) => output_open = false,
            Ok(Event::Exited(_)) => {}
        }
    }
    Ok(StepEnd::Exited(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    /// Run `script` with its stdout and stderr on a pipe, as a step's are.
    fn step(script: &str, limit: Duration) -> (Result<StepEnd, String>, Vec<String>, Duration) {
        let (read, write) = nix::unistd::pipe().unwrap();
        let write = File::from(write);
        let mut child = Command::new("bash")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(write.try_clone().unwrap())
            .stderr(write)
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = Instant::now();
        let mut lines = Vec::new();
        let end = follow(
            File::from(read),
            move || {
                child
                    .wait()
                    .map(|s| s.code().unwrap_or(-1))
                    .map_err(|e| e.to_string())
            },
            limit,
            |l| lines.push(l),
        );
        let took = started.elapsed();
        // Whatever the step left behind goes with its process group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        (end, lines, took)
    }

    #[test]
    fn a_step_that_leaves_a_process_holding_its_output_ends_when_it_exits() {
        let (end, lines, took) = step(
            "echo before; sleep 60 & echo after; exit 3",
            Duration::from_secs(30),
        );
        assert_eq!(end, Ok(StepEnd::Exited(3)));
        assert_eq!(lines, vec!["before", "after"]);
        assert!(took < Duration::from_secs(10), "it took {took:?}");
    }

    #[test]
    fn every_line_of_a_step_that_ends_normally_is_kept() {
        let (end, lines, _) = step(
            "for i in $(seq 1 2000); do echo line $i; done",
            Duration::from_secs(30),
        );
        assert_eq!(end, Ok(StepEnd::Exited(0)));
        assert_eq!(lines.len(), 2000);
        assert_eq!(lines.last().map(String::as_str), Some("line 2000"));
    }

    #[test]
    fn a_step_past_its_limit_times_out_with_its_output_so_far() {
        let (end, lines, took) = step("echo started; sleep 60", Duration::from_secs(1));
        assert_eq!(end, Ok(StepEnd::TimedOut));
        assert_eq!(lines, vec!["started"]);
        assert!(took < Duration::from_secs(10), "it took {took:?}");
    }

    #[test]
    fn a_wait_that_fails_is_handed_back() {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(write);
        let end = follow(
            File::from(read),
            || Err::<i32, _>("the sandbox went away".to_string()),
            Duration::from_secs(5),
            |_| {},
        );
        assert_eq!(end, Err("the sandbox went away".to_string()));
    }
}

//! Running a process in a sandbox from the caller's terminal. The sandbox's
//! init makes the process's standard descriptors inside the sandbox and
//! their other ends come back: pipes without a TTY, the terminal's master
//! side with one. We copy between them and our own stdin, stdout and stderr
//! (none of ours ever reaches the sandbox, where a process left behind could
//! keep reading our terminal), pass window size changes on, and return the
//! exit code.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{bail, Result};
use moat_api::{ExecRequest, Reply, Request};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};

use crate::client::Call;
use crate::output::Progress;

/// Run `req`; returns the process's exit code.
pub fn exec(mut req: ExecRequest, interactive: bool) -> Result<i32> {
    let detach = req.detach;
    if req.tty {
        let (rows, cols) = window_size(std::io::stdout().as_raw_fd())
            .or_else(|| window_size(0))
            .unwrap_or((24, 80));
        req.rows = rows;
        req.cols = cols;
        let call = Call::start(&Request::SandboxExec(req), &[])?;
        let (pid, mut fds) = wait_started(&call)?;
        if detach {
            println!("{pid}");
            return Ok(0);
        }
        let Some(master) = fds.pop() else {
            bail!("the daemon sent no terminal")
        };
        return tty_session(&call, master, interactive);
    }
    req.interactive = interactive;
    let call = Call::start(&Request::SandboxExec(req), &[])?;
    let (pid, mut fds) = wait_started(&call)?;
    if detach {
        println!("{pid}");
        return Ok(0);
    }
    let expected = 2 + usize::from(interactive);
    if fds.len() != expected {
        bail!("the daemon sent {} pipes, not {expected}", fds.len());
    }
    let stderr = fds.pop().map(std::fs::File::from);
    let stdout = fds.pop().map(std::fs::File::from);
    if let Some(to_process) = fds.pop() {
        copy_stdin_to(std::fs::File::from(to_process));
    }
    let outputs: Vec<(std::fs::File, Box<dyn Write>)> = stdout
        .map(|f| (f, Box::new(std::io::stdout()) as Box<dyn Write>))
        .into_iter()
        .chain(stderr.map(|f| (f, Box::new(std::io::stderr()) as Box<dyn Write>)))
        .collect();
    relay_until_exit(&call, outputs)
}

/// Copy our stdin to the process in the background; the process sees
/// end-of-file when ours ends.
fn copy_stdin_to(mut to_process: std::fs::File) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || to_process.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// Copy each of the process's outputs to its sink until the exit code has
/// come and the outputs are drained: at end-of-file, or after a short quiet
/// spell, for a process that left something running in the background that
/// holds them. A sink that fails (our stdout closed) stops being copied, and
/// its pipe closes, as it would for the process run directly.
fn relay_until_exit(call: &Call, mut outputs: Vec<(std::fs::File, Box<dyn Write>)>) -> Result<i32> {
    let mut buf = [0u8; 16384];
    let mut code = None;
    loop {
        if code.is_some() && outputs.is_empty() {
            break;
        }
        // The daemon's connection only until the exit code is in: it closes
        // after that, and a closed socket is always ready.
        let waiting = code.is_none();
        let mut fds: Vec<PollFd> = waiting
            .then(|| PollFd::new(call.conn.as_fd(), PollFlags::POLLIN))
            .into_iter()
            .collect();
        let first_output = fds.len();
        fds.extend(
            outputs
                .iter()
                .map(|(f, _)| PollFd::new(f.as_fd(), PollFlags::POLLIN)),
        );
        // Once the exit code is in, drain what the outputs still hold, briefly.
        let timeout = if code.is_some() {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        };
        let n = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("poll: {e}"),
        };
        if n == 0 {
            break;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut closed = vec![];
        for (i, (from, to)) in outputs.iter_mut().enumerate() {
            if !ready[first_output + i] {
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => closed.push(i),
                Ok(n) => {
                    if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                        closed.push(i);
                    }
                }
            }
        }
        for i in closed.into_iter().rev() {
            outputs.remove(i);
        }
        if waiting && ready[0] {
            code = Some(wait_exited(call)?);
        }
    }
    Ok(code.unwrap_or(0))
}

fn wait_started(call: &Call) -> Result<(i32, Vec<OwnedFd>)> {
    let mut progress = Progress::new();
    loop {
        match call.next()? {
            (Reply::Started { pid }, fds) => return Ok((pid, fds)),
            (Reply::Progress { message }, _) => progress.show(&message),
            (Reply::Warning { message }, _) => progress.warn(&message),
            (Reply::Error { message }, _) => {
                drop(progress);
                eprintln!("moat: {message}");
                // As Docker: 127 for a command that is not there, 126 for one that cannot run.
                let code = if message.contains("not found in $PATH") {
                    127
                } else if message.starts_with("cannot run") {
                    126
                } else {
                    125
                };
                std::process::exit(code);
            }
            (other, _) => bail!("unexpected reply from the daemon: {other:?}"),
        }
    }
}

fn wait_exited(call: &Call) -> Result<i32> {
    match call.next()?.0 {
        Reply::Exited { code } => Ok(code),
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

fn window_size(fd: i32) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize through the pointer, which is valid.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Restores the caller's terminal when dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

fn tty_session(call: &Call, master: OwnedFd, interactive: bool) -> Result<i32> {
    let raw = if interactive { RawMode::enter() } else { None };
    let master_fd = master.as_raw_fd();

    // Window size changes follow the caller's terminal.
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH]) {
        std::thread::spawn(move || {
            for _ in signals.forever() {
                if let Some((rows, cols)) = window_size(1).or_else(|| window_size(0)) {
                    let ws = libc::winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
                    unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &ws) };
                }
            }
        });
    }
    if interactive {
        copy_stdin_to(std::fs::File::from(master.try_clone()?));
    }

    let outputs: Vec<(std::fs::File, Box<dyn Write>)> =
        vec![(std::fs::File::from(master), Box::new(std::io::stdout()))];
    let code = relay_until_exit(call, outputs);
    drop(raw);
    code
}

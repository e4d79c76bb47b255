//! Running a process in a sandbox from the caller's terminal. Without a TTY
//! the caller's own descriptors go to the process and this only waits for the
//! exit code. With one, the terminal's master side comes back from the
//! sandbox; we put the caller's terminal in raw mode, copy both ways, pass
//! window size changes on, and return the exit code.

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
    let (fds, _null) = crate::cli::stdio_fds(interactive, detach)?;
    let call = Call::start(&Request::SandboxExec(req), &fds)?;
    let (pid, _) = wait_started(&call)?;
    if detach {
        println!("{pid}");
        return Ok(0);
    }
    wait_exited(&call)
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
        let mut to_master = std::fs::File::from(master.try_clone()?);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || to_master.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }

    let mut from_master = std::fs::File::from(master);
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    let mut master_open = true;
    let mut code = None;
    loop {
        if code.is_some() && !master_open {
            break;
        }
        let mut fds = vec![PollFd::new(call.conn.as_fd(), PollFlags::POLLIN)];
        if master_open {
            fds.push(PollFd::new(from_master.as_fd(), PollFlags::POLLIN));
        }
        // Once the exit code is in, drain what the terminal still holds, briefly.
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
        let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let master_ready = master_open && fds[1].revents().is_some_and(|r| !r.is_empty());
        if master_ready {
            match from_master.read(&mut buf) {
                Ok(0) | Err(_) => master_open = false,
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
            }
        }
        if conn_ready && code.is_none() {
            code = Some(wait_exited(call)?);
        }
    }
    drop(raw);
    Ok(code.unwrap_or(0))
}

//! Pseudo-terminals made inside the sandbox, from its own devpts instance.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};

use crate::SandboxError;

pub struct Pty {
    pub master: OwnedFd,
    pub slave_path: String,
}

pub fn open(rows: u16, cols: u16) -> Result<Pty, SandboxError> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("open /dev/ptmx", e))?;
    grantpt(&master).map_err(|e| SandboxError::sys("grantpt", e))?;
    unlockpt(&master).map_err(|e| SandboxError::sys("unlockpt", e))?;
    let slave_path = ptsname_r(&master).map_err(|e| SandboxError::sys("ptsname", e))?;
    set_size(master.as_raw_fd(), rows, cols);
    // SAFETY: we take over the descriptor that `master` gives up.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    Ok(Pty { master, slave_path })
}

/// Tell the terminal its size; a zero size (unknown) is left alone.
pub fn set_size(fd: i32, rows: u16, cols: u16) {
    if rows == 0 || cols == 0 {
        return;
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

//! The daemon's side of a running sandbox's control socket. Everything init
//! says comes from inside the sandbox, so the replies are checked: a socket
//! handed over for a door must be a fresh TCP socket of the sandbox's own
//! network namespace.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use moat_api::init::{InitExec, InitReply, InitRequest, InitStdio};
use moat_api::{recv_frame, send_frame};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};

use crate::SandboxError;

/// A network namespace, by the device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    pub fn from_metadata(m: &std::fs::Metadata) -> NetnsId {
        NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

impl std::str::FromStr for NetnsId {
    type Err = ();
    fn from_str(s: &str) -> Result<NetnsId, ()> {
        let (d, i) = s.split_once(':').ok_or(())?;
        Ok(NetnsId {
            dev: d.parse().map_err(|_| ())?,
            ino: i.parse().map_err(|_| ())?,
        })
    }
}

fn connect(path: &Path) -> Result<UnixStream, SandboxError> {
    UnixStream::connect(path).map_err(|err| SandboxError::Unreachable {
        path: path.display().to_string(),
        err,
    })
}

fn ask(
    path: &Path,
    req: &InitRequest,
    fds: &[i32],
) -> Result<(UnixStream, InitReply, Vec<OwnedFd>), SandboxError> {
    let conn = connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| SandboxError::io("socket timeout", e))?;
    send_frame(&conn, req, fds).map_err(|e| SandboxError::Protocol(e.to_string()))?;
    let (reply, fds) =
        recv_frame::<InitReply>(&conn).map_err(|e| SandboxError::Protocol(e.to_string()))?;
    if let InitReply::Error { message } = reply {
        return Err(SandboxError::Refused(message));
    }
    Ok((conn, reply, fds))
}

/// Whether init answers.
pub fn ping(path: &Path) -> Result<(), SandboxError> {
    match ask(path, &InitRequest::Ping, &[])?.1 {
        InitReply::Pong { .. } => Ok(()),
        other => Err(SandboxError::Protocol(format!(
            "expected pong, got {other:?}"
        ))),
    }
}

/// A process started in the sandbox; `wait` gives its exit code.
pub struct ExecSession {
    conn: UnixStream,
    pub pid: i32,
    /// The caller's ends of the process's standard descriptors, as
    /// [`InitStdio`] orders them: a terminal's master side, or pipes.
    pub stdio: Vec<OwnedFd>,
}

impl ExecSession {
    pub fn wait(self) -> Result<i32, SandboxError> {
        self.conn
            .set_read_timeout(None)
            .map_err(|e| SandboxError::io("socket timeout", e))?;
        match recv_frame::<InitReply>(&self.conn) {
            Ok((InitReply::Exited { code }, _)) => Ok(code),
            Ok((other, _)) => Err(SandboxError::Protocol(format!(
                "expected an exit code, got {other:?}"
            ))),
            Err(e) => Err(SandboxError::Protocol(format!(
                "the sandbox stopped before the process ended ({e})"
            ))),
        }
    }

    /// A descriptor that becomes readable when the exit code arrives or the sandbox goes away.
    pub fn as_raw_fd(&self) -> i32 {
        self.conn.as_raw_fd()
    }
}

/// Start a process. Its standard descriptors are made by init inside the
/// sandbox, as `exec.stdio` says; their caller's ends come back, checked.
pub fn exec(path: &Path, exec: &InitExec) -> Result<ExecSession, SandboxError> {
    let (conn, reply, stdio) = ask(path, &InitRequest::Exec(exec.clone()), &[])?;
    let InitReply::Started { pid } = reply else {
        return Err(SandboxError::Protocol(format!(
            "expected started, got {reply:?}"
        )));
    };
    if stdio.len() != exec.stdio.returned() {
        return Err(SandboxError::Protocol(format!(
            "expected {} descriptors, got {}",
            exec.stdio.returned(),
            stdio.len()
        )));
    }
    for fd in &stdio {
        match exec.stdio {
            InitStdio::Tty => check_is_pty_master(fd)?,
            InitStdio::Pipes { .. } => check_is_pipe(fd)?,
            InitStdio::Null => {}
        }
    }
    Ok(ExecSession { conn, pid, stdio })
}

/// Ask init to end everything and exit.
pub fn stop(path: &Path, grace: Duration) -> Result<(), SandboxError> {
    ask(
        path,
        &InitRequest::Stop {
            grace_ms: grace.as_millis() as u64,
        },
        &[],
    )
    .map(|_| ())
}

/// A fresh TCP socket in the sandbox's network namespace, for a door. The
/// caller binds or connects it; `netns` is the namespace it must be in.
pub fn door_socket(path: &Path, netns: NetnsId, ipv6: bool) -> Result<OwnedFd, SandboxError> {
    let (_, reply, mut fds) = ask(path, &InitRequest::Socket { ipv6 }, &[])?;
    if reply != InitReply::Socket || fds.len() != 1 {
        return Err(SandboxError::Protocol(format!(
            "expected one socket, got {reply:?} with {} descriptors",
            fds.len()
        )));
    }
    let fd = fds
        .pop()
        .ok_or_else(|| SandboxError::Protocol("no socket".into()))?;
    check_door_socket(&fd, netns, ipv6)?;
    Ok(fd)
}

fn refuse(what: &str) -> SandboxError {
    SandboxError::Protocol(format!("the sandbox handed over {what}; refusing it"))
}

fn check_door_socket(fd: &OwnedFd, netns: NetnsId, ipv6: bool) -> Result<(), SandboxError> {
    let ty =
        getsockopt(fd, sockopt::SockType).map_err(|_| refuse("something that is not a socket"))?;
    if ty != nix::sys::socket::SockType::Stream {
        return Err(refuse("a socket that is not a stream socket"));
    }
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|_| refuse("an unnamed socket"))?;
    let fresh = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
        (Some(v4), _) if !ipv6 => v4.port() == 0 && v4.ip().is_unspecified(),
        (_, Some(v6)) if ipv6 => v6.port() == 0 && v6.ip().is_unspecified(),
        _ => false,
    };
    if !fresh {
        return Err(refuse("a socket of the wrong family or one already bound"));
    }
    // SAFETY: SIOCGSKNS returns a new descriptor for the socket's network namespace.
    let ns = unsafe {
        libc::ioctl(fd.as_raw_fd(), 0x894C /* SIOCGSKNS */)
    };
    if ns < 0 {
        return Err(refuse("a socket whose network namespace cannot be read"));
    }
    // SAFETY: `ns` is a fresh descriptor we own.
    let ns = std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ns) });
    let theirs = ns
        .metadata()
        .map_err(|e| SandboxError::io("stat socket namespace", e))?;
    if NetnsId::from_metadata(&theirs) != netns {
        return Err(refuse("a socket from another network namespace"));
    }
    Ok(())
}

fn check_is_pty_master(fd: &OwnedFd) -> Result<(), SandboxError> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCGPTN writes an int; it succeeds only on a pseudo-terminal master.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGPTN, &mut n) } != 0 {
        return Err(refuse("a terminal that is not a pseudo-terminal master"));
    }
    Ok(())
}

fn check_is_pipe(fd: &OwnedFd) -> Result<(), SandboxError> {
    let meta = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|_| refuse("a bad descriptor"))?;
    if meta.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(refuse("a descriptor that is not a pipe"));
    }
    Ok(())
}

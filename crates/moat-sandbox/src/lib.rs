//! Sandboxes of the namespace tier: a [`SandboxSpec`] in, a running isolated
//! process tree out. The daemon calls [`launch::start`]; the process it starts
//! is the `moat` binary again in its hidden `__sandbox-init` role, which runs
//! [`init::main`]: it makes the user, mount, PID, IPC, UTS, cgroup and network
//! namespaces, builds the overlay root file system, the minimal `/dev` and the
//! masked `/proc`, installs the seccomp policy and then serves the daemon's
//! requests (start a process, hand over a socket made in the sandbox's network
//! namespace, stop) as the sandbox's PID 1. Nothing here knows about network
//! policy, images or models: paths and limits arrive in the spec.

pub mod cgroup;
pub mod control;
pub mod detached;
pub mod gvisor;
pub mod idmap;
pub mod init;
pub mod landlock;
pub mod launch;
mod mounts;
mod pty;
pub mod seccomp;
pub mod spec;
pub mod user;
pub mod userns;

pub use idmap::IdMap;
pub use spec::SandboxSpec;

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{call} failed: {err}")]
    Sys { call: String, err: nix::Error },
    #[error("{what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("the sandbox's start-up handshake broke: {0}")]
    Handshake(io::Error),
    #[error("the sandbox did not start: {0}")]
    Start(String),
    #[error(transparent)]
    IdMap(#[from] idmap::IdMapError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("the sandbox's root file system has a symlink at {0}, where moat mounts something; remove the sandbox (`moat sandbox rm`) and create it again")]
    SymlinkInRoot(String),
    #[error("the sandbox's init is not answering on {path}: {err}; it has probably stopped (see `moat sandbox ls`)")]
    Unreachable { path: String, err: io::Error },
    #[error("the sandbox's init answered wrongly: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
}

/// Mark every descriptor from `first` up close-on-exec, so that nothing a
/// process inherited by accident (from the shell that started the daemon,
/// say) reaches what it executes next.
pub fn cloexec_from(first: u32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
    // SAFETY: close_range only changes descriptor flags; async-signal-safe.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
}

impl SandboxError {
    pub fn sys(call: impl Into<String>, err: nix::Error) -> Self {
        SandboxError::Sys {
            call: call.into(),
            err,
        }
    }
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        SandboxError::Io {
            what: what.into(),
            err,
        }
    }
}

//! The daemon's side of starting a sandbox: bind its control socket, start
//! init in its hidden role, put it in its cgroup, map its ids and wait until
//! it says it is ready.

use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cgroup::Cgroup;
use crate::control::NetnsId;
use crate::idmap::IdMap;
use crate::init::CONTROL_FD;
use crate::spec::SandboxSpec;
use crate::SandboxError;

/// The name of init's hidden role in the `moat` binary.
pub const INIT_ROLE: &str = "__sandbox-init";

pub struct Launch<'a> {
    /// The `moat` binary (usually `/proc/self/exe`).
    pub exe: &'a Path,
    pub spec: &'a SandboxSpec,
    pub idmap: &'a IdMap,
    pub cgroup: Option<&'a Cgroup>,
    /// Where init's control socket goes; only the daemon's user may open it.
    pub control: &'a Path,
    /// Init's stderr: what goes wrong inside after start-up.
    pub log: &'a Path,
}

/// A started sandbox: its init's host pid and its network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    pub netns: NetnsId,
}

/// Start the sandbox.
pub fn start(l: &Launch) -> Result<Started, SandboxError> {
    let _ = std::fs::remove_file(l.control);
    let listener = UnixListener::bind(l.control)
        .map_err(|e| SandboxError::io(format!("bind {}", l.control.display()), e))?;
    std::fs::set_permissions(l.control, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| SandboxError::io(format!("chmod {}", l.control.display()), e))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(l.log)
        .map_err(|e| SandboxError::io(format!("open {}", l.log.display()), e))?;

    let listen_fd = listener.as_raw_fd();
    let mut cmd = Command::new(l.exe);
    // argv[0] is all a sandbox can learn of init's binary: not its host path.
    cmd.arg0("moat-init")
        .arg(INIT_ROLE)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if listen_fd == CONTROL_FD {
                if libc::fcntl(CONTROL_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listen_fd, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::cloexec_from(CONTROL_FD as u32 + 1);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| SandboxError::io(format!("start {}", l.exe.display()), e))?;
    drop(listener);

    let result = handshake(&mut child, l);
    // The first process exits once init is forked; reap it either way.
    if result.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    result
}

fn handshake(child: &mut std::process::Child, l: &Launch) -> Result<Started, SandboxError> {
    let spec = serde_json::to_string(l.spec).map_err(|e| SandboxError::Start(e.to_string()))?;
    let stdin = child
        .stdin
        .as_mut()
        .ok_or_else(|| SandboxError::Start("no stdin pipe".into()))?;
    writeln!(stdin, "{spec}").map_err(SandboxError::Handshake)?;
    let mut reader = crate::userns::map_child(child, l.idmap, |pid| match l.cgroup {
        Some(cg) => cg.add(pid).map_err(SandboxError::Start),
        None => Ok(()),
    })?;
    let mut init_pid = None;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(SandboxError::Handshake)?;
        let text = line.trim();
        if n == 0 {
            return Err(SandboxError::Start(format!(
                "init exited without saying why; see {}",
                l.log.display()
            )));
        }
        if let Some(pid) = text.strip_prefix("init ") {
            init_pid = pid.parse::<i32>().ok();
        } else if let Some(ns) = text.strip_prefix("ready ") {
            let pid =
                init_pid.ok_or_else(|| SandboxError::Start("init did not give its pid".into()))?;
            let netns = ns
                .parse()
                .map_err(|_| SandboxError::Start(format!("init gave a bad namespace id {ns:?}")))?;
            return Ok(Started { pid, netns });
        } else if let Some(err) = text.strip_prefix("error: ") {
            if let Some(pid) = init_pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            }
            // Init may say "did not start" itself: once is enough.
            let err = err
                .strip_prefix("the sandbox did not start: ")
                .unwrap_or(err);
            return Err(SandboxError::Start(err.to_string()));
        }
    }
}

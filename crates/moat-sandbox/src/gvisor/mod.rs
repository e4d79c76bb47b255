//! The gVisor tier: the same sandbox — image layers, workspaces at their
//! host paths, the `agent` user, limits, moat's doors on its loopback —
//! with gVisor's user-space kernel between its processes and the host's.
//!
//! Init makes the same namespaces as for the namespace tier (the sandbox's
//! user namespace, so that the sandbox's ids are the same unprivileged host
//! ids and idmapped workspaces work unchanged; a network namespace with
//! only loopback, where the daemon opens the doors) and becomes PID 1 of
//! its PID namespace. Instead of entering the root file system itself, it
//! puts it together in a private stage (a tmpfs over `/tmp` in init's own
//! mount namespace, seen by nothing outside it), starts `runsc` on it, and
//! serves the control socket as the namespace tier's init does, starting
//! each process with `runsc exec`. runsc's sandbox runs with
//! `--network=host`, where "host" is init's network namespace: the doors
//! moat opens there are the sandbox's 127.0.0.1:3128 and :12434, as in the
//! namespace tier. Everything runsc starts is in init's PID namespace, so
//! when init ends, by a stop or a SIGKILL, the kernel ends all of it.

mod guest;
mod oci;
pub mod runsc;
mod stage;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use moat_api::init::InitExec;
use nix::mount::MsFlags;

use crate::init::{loopback_up, make_stdio, serve, Never, Processes};
use crate::mounts::{m, HostMounts};
use crate::spec::{SandboxSpec, Tier};
use crate::SandboxError;
use stage::Stage;

/// Start runsc on the sandbox's root file system and serve the daemon.
pub(crate) fn run(
    spec: &SandboxSpec,
    host: HostMounts,
    listener: UnixListener,
) -> Result<Never, SandboxError> {
    let Tier::Gvisor {
        runsc,
        platform,
        release,
        pids,
    } = &spec.tier
    else {
        return Err(SandboxError::Start("not a gVisor sandbox".into()));
    };
    let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    m(None, Path::new("/"), None, private, None)?;
    // runsc finds its processes through /proc: ours, of this PID namespace.
    let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m(Some("proc"), Path::new("/proc"), Some("proc"), quiet, None)?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| SandboxError::sys("sethostname", e))?;
    loopback_up()?;

    let Stage {
        dir: stage,
        runsc: staged_runsc,
        state,
        bundle,
    } = stage::build(spec, host, runsc, *release)?;
    let shown = runsc.display().to_string();
    let runsc = staged_runsc.as_path();

    // runsc hands its own standard descriptors to the sandbox's first
    // process, and its sandbox and gofer keep them: stdin and stdout are
    // /dev/null, stderr a pipe that we read once `runsc run` has returned
    // (its errors are written by then) and close, never waiting for its end.
    // The guest's first process puts /dev/null over all three at once.
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("pipe", e))?;
    let globals = runsc::Globals {
        state,
        platform: platform.to_string(),
        date: *release,
    };
    let status = globals
        .command(runsc)
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(&spec.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_w))
        .status()
        .map_err(|e| SandboxError::io(format!("start {shown}"), e))?;
    let said = read_available(err_r);
    if !status.success() {
        return Err(SandboxError::Refused(format!(
            "runsc could not start the sandbox ({status}): {}",
            last_lines(&said, 3)
        )));
    }
    serve(
        listener,
        Gvisor {
            runsc: runsc.to_path_buf(),
            globals,
            stage,
            id: spec.id.clone(),
            no_new_privs: spec.no_new_privs,
            pids: *pids,
            pending: HashMap::new(),
            next: 0,
        },
    )
}

/// What is in the pipe now, without waiting for more (its other end may
/// stay open as long as the sandbox runs).
fn read_available(pipe: OwnedFd) -> String {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let _ = fcntl(pipe.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
    let mut file = fs::File::from(pipe);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < 1 << 16 {
        match std::io::Read::read(&mut file, &mut buf) {
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of what runsc said, on one line.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" / ");
    if tail.is_empty() {
        "it said nothing".into()
    } else {
        tail
    }
}

struct Gvisor {
    runsc: PathBuf,
    globals: runsc::Globals,
    stage: PathBuf,
    id: String,
    no_new_privs: bool,
    /// The sandbox's PID limit, which the guest helper sets as RLIMIT_NPROC.
    pids: Option<u64>,
    /// The process spec of each `runsc exec` still running, removed when it ends.
    pending: HashMap<i32, PathBuf>,
    next: u64,
}

impl Processes for Gvisor {
    fn spawn(&mut self, exec: &InitExec) -> Result<(i32, Vec<OwnedFd>), String> {
        if exec.argv.is_empty() {
            return Err("no command given".into());
        }
        if let Some(bad) = exec.env.iter().find(|kv| !kv.contains('=')) {
            return Err(format!(
                "an environment setting needs KEY=VALUE, not {bad:?}"
            ));
        }
        let stdio = make_stdio(exec)?;
        let [i, o, e] = match &stdio.slave {
            // runsc makes the process's terminal of the one it is given.
            Some(slave) => {
                let tty = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(slave)
                    .map_err(|e| format!("open {slave}: {e}"))?;
                let dup = || tty.try_clone().map(Stdio::from).map_err(|e| e.to_string());
                [dup()?, dup()?, Stdio::from(tty)]
            }
            None => {
                let [a, b, c] = stdio.child;
                let or_null = |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or_else(Stdio::null);
                [or_null(a), or_null(b), or_null(c)]
            }
        };
        let tty = exec.tty();
        let mut helper_args = vec![
            guest::FILTERS.to_string(),
            u8::from(self.no_new_privs).to_string(),
            self.pids.unwrap_or(0).to_string(),
            exec.user.clone().unwrap_or_default(),
            exec.cwd.clone().unwrap_or_default(),
            u8::from(tty).to_string(),
        ];
        helper_args.extend(exec.env.iter().cloned());
        let process = oci::exec_process(&exec.argv, helper_args, tty, exec.rows, exec.cols);
        self.next += 1;
        let path = self.stage.join("exec").join(format!("{}.json", self.next));
        fs::write(&path, process.to_string())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        let mut cmd = self.globals.command(&self.runsc);
        cmd.arg("exec")
            .arg("--process")
            .arg(&path)
            .arg(&self.id)
            .stdin(i)
            .stdout(o)
            .stderr(e);
        if tty {
            // `runsc exec` forwards the signals it gets to the foreground
            // process inside; as the terminal's session leader it gets
            // those the terminal sends: Ctrl-C's SIGINT, Ctrl-\'s SIGQUIT,
            // the SIGHUP when the caller's end closes. (The host's line
            // discipline makes them: the terminal inside is the host's.)
            // SAFETY: setsid and ioctl(TIOCSCTTY) on the child's own stdin,
            // between fork and exec, in single-threaded init.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.runsc.display()))?;
        let pid = child.id() as i32;
        self.pending.insert(pid, path);
        Ok((pid, stdio.theirs))
    }

    fn terminate(&mut self) {
        let _ = self
            .globals
            .command(&self.runsc)
            .args(["kill", "--all", &self.id, "TERM"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn settled(&mut self) -> bool {
        // Every process started for the daemon has ended; what is left
        // (the guest's init, runsc's own processes) ends with us.
        true
    }

    /// Our children are the `runsc exec`s we started and, once `runsc run`
    /// has detached them, runsc's sandbox (the user-space kernel) and its
    /// gofer: when either of those ends, so does the sandbox.
    fn reaped(&mut self, pid: i32) -> bool {
        match self.pending.remove(&pid) {
            Some(path) => {
                let _ = fs::remove_file(path);
                false
            }
            None => true,
        }
    }
}

//! The sandbox's init: the process the daemon starts for a sandbox. It makes
//! the namespaces, becomes PID 1 of the new PID namespace, builds the root
//! file system, locks itself down and then serves the daemon's requests on the
//! control socket it inherited as descriptor 3. It reaps orphans, forwards
//! stop requests to every process, and when it exits the kernel ends every
//! process left in the sandbox.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use moat_api::init::{InitExec, InitReply, InitRequest, InitStdio};
use moat_api::{recv_frame, send_frame};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Pid, Uid};

use crate::spec::{SandboxSpec, Tier};
use crate::user::{environment, find_program, resolve_user, User};
use crate::{mounts, pty, seccomp, userns, SandboxError};

/// The descriptor on which init finds its control socket's listener.
pub const CONTROL_FD: RawFd = 3;

/// Capabilities that root inside keeps (Docker's default set, less
/// CAP_SETFCAP: a file capability written into a workspace would be honoured
/// by the host; and less CAP_FSETID: a write to a set-id file in a workspace
/// must clear its bits, whoever owns it); every other is dropped from the
/// bounding set, so not even `sudo` gets it back.
const KEPT_CAPS: &[u32] = &[0, 1, 3, 5, 6, 7, 8, 10, 13, 18, 27, 29];

/// Entry point of the `__sandbox-init` role. Reads the spec from stdin, then
/// does the user-namespace handshake with the daemon on stdin and stdout.
pub fn main() -> i32 {
    match setup_and_fork() {
        Ok(()) => 0,
        Err(e) => {
            println!("error: {e}");
            1
        }
    }
}

fn setup_and_fork() -> Result<(), SandboxError> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(SandboxError::Handshake)?;
    let spec: SandboxSpec = serde_json::from_str(&line)
        .map_err(|e| SandboxError::Start(format!("bad sandbox spec: {e}")))?;
    // As root, the host's paths are reached now, as the host's root: the
    // sandbox's ids are unprivileged host ids (see mounts::HostMounts).
    let early = if Uid::effective().is_root() {
        // A mount namespace of our own to make them in, out of the host's.
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| SandboxError::sys("unshare(CLONE_NEWNS)", e))?;
        Some(mounts::open_host_mounts(&spec)?)
    } else {
        None
    };
    if let Some(owner) = spec.userns_owner {
        become_owner(owner)?;
    }
    userns::become_root_in_new_userns()?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| SandboxError::sys("unshare(namespaces)", e))?;
    let host = match early {
        Some(host) => host,
        None => mounts::open_host_mounts(&spec)?,
    };
    let _ = io::stdout().flush();
    // CLONE_PARENT makes init the daemon's child rather than ours, so that the
    // daemon reaps it and this process can exit now.
    // SAFETY: a raw clone without CLONE_VM is a fork; this process is single-threaded.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PARENT | libc::SIGCHLD,
            0,
            0,
            0,
            0,
        )
    };
    match pid {
        -1 => Err(SandboxError::sys("clone", Errno::last())),
        0 => {
            let code = match run_init(&spec, host) {
                Ok(never) => match never {},
                Err(e) => {
                    println!("error: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
        pid => {
            println!("init {pid}");
            Ok(())
        }
    }
}

pub(crate) enum Never {}

/// Drop the host's root for `owner`, who then owns the user namespace we
/// make next (see [`SandboxSpec::userns_owner`]).
///
/// CAP_SYS_ADMIN stays effective across the change, for the one call that
/// follows, `unshare(CLONE_NEWUSER)`: where the host lets only privileged
/// processes make user namespaces (Debian's `unprivileged_userns_clone=0`,
/// Ubuntu's AppArmor restriction), that is what allows it. The namespace
/// it makes leaves every host capability behind.
fn become_owner(owner: u32) -> Result<(), SandboxError> {
    const CAP_SYS_ADMIN: u32 = 21;
    nix::unistd::setgroups(&[]).map_err(|e| SandboxError::sys("setgroups", e))?;
    let gid = nix::unistd::Gid::from_raw(owner);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| SandboxError::sys("setresgid", e))?;
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::sys("prctl(PR_SET_KEEPCAPS)", Errno::last()));
    }
    let uid = Uid::from_raw(owner);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| SandboxError::sys("setresuid", e))?;
    set_caps(1 << CAP_SYS_ADMIN, 1 << CAP_SYS_ADMIN)
}

fn run_init(spec: &SandboxSpec, host: mounts::HostMounts) -> Result<Never, SandboxError> {
    // SAFETY: the daemon passed the listener as descriptor 3 and nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(CONTROL_FD) };
    set_cloexec(listener.as_raw_fd())?;
    if let Tier::Gvisor { .. } = &spec.tier {
        return crate::gvisor::run(spec, host, listener);
    }
    mounts::build_root(spec, host)?;
    // The second wall, now that `/` is the sandbox's and the last mount is
    // made (Landlock refuses mount calls from here on), and before the
    // seccomp filter: init and all it starts open nothing outside this tree.
    crate::landlock::restrict_init()?;
    nix::unistd::sethostname(&spec.hostname).map_err(|e| SandboxError::sys("sethostname", e))?;
    loopback_up()?;

    let filters = seccomp::compile()?;
    drop_bounding_caps()?;
    if spec.no_new_privs {
        // SAFETY: plain prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    }
    seccomp::install(&filters)?;
    restrict_own_caps()?;
    // Non-dumpable: processes in the sandbox cannot ptrace init or open its
    // descriptors through /proc/1/fd, even as the sandbox's root.
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    serve(listener, Forked)
}

/// How a tier starts the processes that the daemon asks for. Init serves the
/// control socket the same way for every tier; only this differs.
pub(crate) trait Processes {
    /// Start `exec`: the pid of the child of ours whose exit is the
    /// process's, and the caller's ends of its standard descriptors.
    fn spawn(&mut self, exec: &InitExec) -> Result<(i32, Vec<OwnedFd>), String>;
    /// Ask every process in the sandbox to end.
    fn terminate(&mut self);
    /// Whether nothing of the sandbox's is left to wait for, once every
    /// process started for the daemon has ended.
    fn settled(&mut self) -> bool;
    /// A child of ours ended: whether the sandbox is over with it.
    fn reaped(&mut self, _pid: i32) -> bool {
        false
    }
}

/// The namespace tier: processes are init's own children, forked inside.
struct Forked;

impl Processes for Forked {
    fn spawn(&mut self, exec: &InitExec) -> Result<(i32, Vec<OwnedFd>), String> {
        spawn(exec)
    }
    fn terminate(&mut self) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    }
    fn settled(&mut self) -> bool {
        matches!(
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
            Err(Errno::ECHILD)
        )
    }
}

/// Say that the sandbox is ready, then serve the daemon's requests on
/// `listener` until a stop request or a signal ends the sandbox.
pub(crate) fn serve(
    listener: UnixListener,
    processes: impl Processes,
) -> Result<Never, SandboxError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        mask.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(|e| SandboxError::sys("sigprocmask", e))?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| SandboxError::sys("signalfd", e))?;

    // Who we are, network-wise: the daemon checks every door socket against
    // this. No sandbox process has run yet, so the answer can be trusted.
    let ns = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| SandboxError::io("stat our network namespace", e))?;
    println!("ready {}", crate::control::NetnsId::from_metadata(&ns));
    let _ = io::stdout().flush();
    detach_stdio();

    let mut init = Init {
        sessions: HashMap::new(),
        processes,
    };
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(SandboxError::sys("poll", e)),
        }
        let conn_ready = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        let sig_ready = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                if info.ssi_signo != Signal::SIGCHLD as u32 {
                    init.stop(Duration::from_secs(5));
                }
            }
            init.reap();
        }
        if conn_ready {
            if let Ok((conn, _)) = listener.accept() {
                init.serve(conn);
            }
        }
    }
}

struct Init<P> {
    /// Processes started for the daemon, with the connection that waits for their exit code.
    sessions: HashMap<i32, UnixStream>,
    processes: P,
}

impl<P: Processes> Init<P> {
    fn serve(&mut self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        // Descriptors that arrive with a request are dropped unread: every
        // descriptor a sandboxed process gets is made here, inside.
        let Ok((req, _)) = recv_frame::<InitRequest>(&conn) else {
            return;
        };
        match req {
            InitRequest::Ping => reply(
                &conn,
                &InitReply::Pong {
                    pid: std::process::id() as i32,
                },
                &[],
            ),
            InitRequest::Socket { ipv6 } => match door_socket(ipv6) {
                Ok(sock) => reply(&conn, &InitReply::Socket, &[sock.as_raw_fd()]),
                Err(e) => reply(
                    &conn,
                    &InitReply::Error {
                        message: e.to_string(),
                    },
                    &[],
                ),
            },
            InitRequest::Exec(exec) => match self.processes.spawn(&exec) {
                Ok((pid, theirs)) => {
                    let fds: Vec<RawFd> = theirs.iter().map(|m| m.as_raw_fd()).collect();
                    reply(&conn, &InitReply::Started { pid }, &fds);
                    self.sessions.insert(pid, conn);
                }
                Err(e) => reply(&conn, &InitReply::Error { message: e }, &[]),
            },
            InitRequest::Stop { grace_ms } => {
                reply(&conn, &InitReply::Stopping, &[]);
                self.stop(Duration::from_millis(grace_ms));
            }
        }
    }

    /// Collect every child that has ended and tell whoever waits for it.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.ended(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.ended(pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn ended(&mut self, pid: i32, code: i32) {
        let over = self.processes.reaped(pid);
        if let Some(conn) = self.sessions.remove(&pid) {
            reply(&conn, &InitReply::Exited { code }, &[]);
        }
        if over {
            self.stop(Duration::ZERO);
        }
    }

    /// Ask everything to end, SIGKILL what is left after `grace`, then exit;
    /// the kernel kills whatever remains in the PID namespace with us.
    fn stop(&mut self, grace: Duration) -> ! {
        self.processes.terminate();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            self.reap();
            if self.sessions.is_empty() && self.processes.settled() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        self.reap();
        std::process::exit(0)
    }
}

fn reply(conn: &UnixStream, msg: &InitReply, fds: &[RawFd]) {
    let _ = send_frame(conn, msg, fds);
}

pub(crate) fn door_socket(ipv6: bool) -> Result<OwnedFd, SandboxError> {
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); we own the returned descriptor.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SandboxError::sys("socket", Errno::last()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

fn set_cloexec(fd: RawFd) -> Result<(), SandboxError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(|_| ())
        .map_err(|e| SandboxError::sys("fcntl(FD_CLOEXEC) on the control socket", e))
}

pub(crate) fn loopback_up() -> Result<(), SandboxError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let sock = door_socket(false)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq, which `req` is laid out as.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(SandboxError::sys("SIOCGIFFLAGS lo", Errno::last()));
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(SandboxError::sys("SIOCSIFFLAGS lo", Errno::last()));
        }
    }
    Ok(())
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn drop_bounding_caps() -> Result<(), SandboxError> {
    for cap in 0..=last_cap() {
        if KEPT_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(SandboxError::sys(
                format!("drop capability {cap}"),
                Errno::last(),
            ));
        }
    }
    Ok(())
}

/// Init itself keeps only what it needs to start processes as other users.
fn restrict_own_caps() -> Result<(), SandboxError> {
    let mask = KEPT_CAPS.iter().fold(0u64, |m, cap| m | 1 << cap);
    set_caps(mask, mask)
}

/// capset(2) with v3 structures: these effective and permitted sets, no
/// inheritable ones.
fn set_caps(effective: u64, permitted: u64) -> Result<(), SandboxError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let lo = Data {
        effective: effective as u32,
        permitted: permitted as u32,
        inheritable: 0,
    };
    let hi = Data {
        effective: (effective >> 32) as u32,
        permitted: (permitted >> 32) as u32,
        inheritable: 0,
    };
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [lo, hi];
    // SAFETY: capset reads a v3 header and two data structs, which these are.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(SandboxError::sys("capset", Errno::last()));
    }
    Ok(())
}

/// The standard descriptors of a process about to start: the child's
/// three (`None` is `/dev/null`) and the caller's ends, in the order
/// [`InitStdio`] gives.
pub(crate) struct Stdio {
    pub(crate) child: [Option<OwnedFd>; 3],
    /// The terminal's slave path, which the child opens as its controlling terminal.
    pub(crate) slave: Option<String>,
    pub(crate) theirs: Vec<OwnedFd>,
}

pub(crate) fn make_stdio(exec: &InitExec) -> Result<Stdio, String> {
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    Ok(match exec.stdio {
        InitStdio::Null => Stdio {
            child: [None, None, None],
            slave: None,
            theirs: vec![],
        },
        InitStdio::Tty => {
            let p = pty::open(exec.rows, exec.cols).map_err(|e| e.to_string())?;
            Stdio {
                child: [None, None, None],
                slave: Some(p.slave_path),
                theirs: vec![p.master],
            }
        }
        InitStdio::Pipes {
            stdin,
            merge_stderr,
        } => {
            let mut theirs = vec![];
            let child_in = if stdin {
                let (r, w) = pipe()?;
                theirs.push(w);
                Some(r)
            } else {
                None
            };
            let (out_r, out_w) = pipe()?;
            theirs.push(out_r);
            let child_err = if merge_stderr {
                out_w.try_clone().map_err(|e| format!("dup: {e}"))?
            } else {
                let (err_r, err_w) = pipe()?;
                theirs.push(err_r);
                err_w
            };
            Stdio {
                child: [child_in, Some(out_w), Some(child_err)],
                slave: None,
                theirs,
            }
        }
    })
}

/// Start `exec` and return its pid and the caller's ends of its standard descriptors.
fn spawn(exec: &InitExec) -> Result<(i32, Vec<OwnedFd>), String> {
    if exec.argv.is_empty() {
        return Err("no command given".into());
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let user = resolve_user(exec.user.as_deref(), &passwd, &group)?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let env = environment(&user, &hostname, exec.tty(), &exec.env);
    let program = find_program(&exec.argv[0], &env)
        .ok_or_else(|| format!("{}: executable file not found in $PATH", exec.argv[0]))?;
    let cwd = exec.cwd.clone().unwrap_or_else(|| user.home.clone());
    let stdio = make_stdio(exec)?;

    let to_c = |s: &str| CString::new(s).map_err(|_| format!("argument with a NUL byte: {s:?}"));
    let c_program = to_c(&program)?;
    let c_argv = exec
        .argv
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env.iter().map(|a| to_c(a)).collect::<Result<Vec<_>, _>>()?;
    let c_cwd = to_c(&cwd)?;
    let c_slave = stdio.slave.as_deref().map(to_c).transpose()?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;

    // SAFETY: init is single-threaded; the child only calls exec-preparation syscalls.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(err_r);
            let stage = child_exec(
                &user,
                &stdio.child,
                c_slave.as_ref(),
                &c_cwd,
                &c_program,
                &c_argv,
                &c_env,
            );
            let errno = Errno::last() as i32;
            let mut w = std::fs::File::from(err_w);
            let _ = w.write_all(format!("{stage}:{errno}").as_bytes());
            // SAFETY: leave without running destructors or atexit handlers of init.
            unsafe { libc::_exit(127) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(err_w);
            let Stdio {
                child: ours,
                theirs,
                ..
            } = stdio;
            // The child's ends must close here, or the caller would never
            // see end-of-file on its pipes.
            drop(ours);
            let mut msg = String::new();
            let _ = io::Read::read_to_string(&mut std::fs::File::from(err_r), &mut msg);
            if msg.is_empty() {
                return Ok((child.as_raw(), theirs));
            }
            let _ = waitpid(child, None);
            let (stage, errno) = msg.split_once(':').unwrap_or((msg.as_str(), "0"));
            let errno = Errno::from_raw(errno.parse().unwrap_or(0));
            Err(match stage {
                "chdir" => format!("cannot enter the working directory {cwd}: {errno}"),
                "exec" => format!("cannot run {program}: {errno}"),
                other => format!("cannot start {}: {other}: {errno}", exec.argv[0]),
            })
        }
    }
}

/// In the forked child: become the user, wire the standard descriptors, exec.
/// Returns only on failure, naming the step that failed.
fn child_exec(
    user: &User,
    fds: &[Option<OwnedFd>; 3],
    slave: Option<&CString>,
    cwd: &CString,
    program: &CString,
    argv: &[CString],
    env: &[CString],
) -> &'static str {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in 1..32 {
        // SAFETY: restoring default dispositions in the child before exec.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    if nix::unistd::setsid().is_err() {
        return "setsid";
    }
    if let Some(slave) = slave {
        // SAFETY: open(2) on a valid C string.
        let fd = unsafe { libc::open(slave.as_ptr(), libc::O_RDWR) };
        // SAFETY: TIOCSCTTY takes an int argument.
        if fd < 0 || unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } < 0 {
            return "terminal";
        }
        for target in 0..3 {
            // SAFETY: dup2 on descriptors we hold.
            unsafe { libc::dup2(fd, target) };
        }
    } else {
        // A pipe may sit at 0..2 already; move them all above first so that
        // dup2 never clobbers one before it is used.
        let moved: Vec<RawFd> = fds
            .iter()
            .map(|fd| match fd {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold.
                Some(fd) => unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) },
                None => -1,
            })
            .collect();
        for target in 0..3 {
            let src = match moved.get(target as usize) {
                Some(fd) if *fd >= 0 => *fd,
                // SAFETY: open(2) on a static C string.
                _ => unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) },
            };
            // SAFETY: dup2 on descriptors we hold.
            unsafe { libc::dup2(src, target) };
        }
    }
    let groups: Vec<nix::unistd::Gid> = user
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    if nix::unistd::setgroups(&groups).is_err() {
        return "setgroups";
    }
    let gid = nix::unistd::Gid::from_raw(user.gid);
    if nix::unistd::setresgid(gid, gid, gid).is_err() {
        return "setgid";
    }
    let uid = Uid::from_raw(user.uid);
    if nix::unistd::setresuid(uid, uid, uid).is_err() {
        return "setuid";
    }
    // SAFETY: chdir(2) on a valid C string.
    if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
        return "chdir";
    }
    crate::cloexec_from(3);
    let _ = nix::unistd::execve(program, argv, env);
    "exec"
}

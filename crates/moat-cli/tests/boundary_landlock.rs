//! Landlock, the second wall: a host directory descriptor that reaches a
//! sandboxed process (planted here through a Unix socket in the workspace,
//! as a leak or a mount bug could) opens nothing below it, for the agent and
//! for the sandbox's root, while the same descriptor opens all of it on the
//! host for the very id the agent runs as. Work inside goes on as before.
//!
//! The planted directory is open to every host id (mode 0777, files 0666),
//! so that nothing but Landlock stands between the sandbox and its files.
//! Where the kernel has no Landlock (or only ABI 1), only the work inside is
//! checked.
//!
//! Landlock checks opening, making, removing, renaming, linking, truncating
//! and running; not what a descriptor already open allows (this one, opened
//! for reading on the host, still lists its own entries) nor metadata
//! (`stat`, and where the host's permissions allow, `utimes` and extended
//! attributes). Those are not claimed here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::rootless::Rootless;
use common::*;

/// The default `uid_base` of a root daemon: the agent is `UID_BASE + 1000` on the host.
const UID_BASE: u32 = 1_000_000_000;

/// Takes the planted descriptor (from the socket path in `argv[1]`, or
/// inherited as the number `argv[1]`) and tries everything below it. Prints
/// one `name outcome` line each: `ok`, or the errno's name. With `host` in
/// `argv[2]`, what would change the directory is left out.
const PROBE: &str = r#"import errno, os, socket, subprocess, sys
where = sys.argv[1]
on_host = sys.argv[2:] == ["host"]
if where.isdigit():
    fd = int(where)
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(where)
    _, fds, _, _ = socket.recv_fds(s, 16, 1)
    fd = fds[0]

def t(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
    sys.stdout.flush()

def read_at(name, flags=os.O_RDONLY):
    os.close(os.open(name, flags, dir_fd=fd))

def opath_reopen():
    p = os.open("secret", os.O_PATH, dir_fd=fd)
    os.close(os.open("/proc/self/fd/%d" % p, os.O_RDONLY))

def through_cwd():
    here = os.open(".", os.O_PATH)
    os.fchdir(fd)
    try:
        os.close(os.open("secret", os.O_RDONLY))
    finally:
        os.fchdir(here)

t("fstat", lambda: os.fstat(fd))
t("open-secret", lambda: read_at("secret"))
t("open-deeper", lambda: read_at("sub/deeper"))
t("open-dot", lambda: read_at(".", os.O_RDONLY | os.O_DIRECTORY))
t("open-dotdot", lambda: read_at("..", os.O_RDONLY | os.O_DIRECTORY))
t("open-dotdot-file", lambda: read_at("../outside"))
t("write-secret", lambda: read_at("secret", os.O_WRONLY))
t("proc-reopen", lambda: os.close(os.open("/proc/self/fd/%d" % fd, os.O_RDONLY)))
t("proc-secret", lambda: os.close(os.open("/proc/self/fd/%d/secret" % fd, os.O_RDONLY)))
t("opath-reopen", opath_reopen)
t("fchdir-secret", through_cwd)
t("exec", lambda: subprocess.run(["/proc/self/fd/%d/tool" % fd], check=True, pass_fds=[fd]))
t("create", lambda: os.close(os.open("planted", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)))
if not on_host:
    t("mkdir", lambda: os.mkdir("planted-dir", dir_fd=fd))
    t("symlink", lambda: os.symlink("/", "planted-link", dir_fd=fd))
    t("truncate", lambda: os.truncate("/proc/self/fd/%d/secret" % fd, 0))
    t("unlink", lambda: os.unlink("secret", dir_fd=fd))
    t("rename", lambda: os.rename("secret", "renamed", src_dir_fd=fd, dst_dir_fd=fd))
    # Out into the workspace, where the probe is.
    stolen = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "stolen")
    t("link-out", lambda: os.link("secret", stolen, src_dir_fd=fd))
"#;

/// What must be refused inside, and what the host, with the same
/// descriptor and the agent's host id, does.
const REFUSED: &[&str] = &[
    "open-secret",
    "open-deeper",
    "open-dot",
    "open-dotdot",
    "open-dotdot-file",
    "write-secret",
    "proc-reopen",
    "proc-secret",
    "opath-reopen",
    "fchdir-secret",
    "exec",
    "create",
    "mkdir",
    "symlink",
    "truncate",
    "unlink",
    "rename",
];

/// Left out on the host: they would change the directory.
const INSIDE_ONLY: &[&str] = &["mkdir", "symlink", "truncate", "unlink", "rename"];

fn outcomes(out: &Output) -> Vec<(String, String)> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// A host directory, outside every workspace, that any host id may read
/// and write: `secret`, `sub/deeper`, an executable `tool`, and `outside`
/// next to it.
struct HostDir {
    _outer: tempfile::TempDir,
    dir: PathBuf,
}

impl HostDir {
    fn new() -> HostDir {
        let outer = tempfile::Builder::new()
            .prefix("moat-landlock-host-")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = outer.path().join("planted");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("secret"), b"host secret\n").unwrap();
        std::fs::write(dir.join("sub/deeper"), b"deeper\n").unwrap();
        std::fs::write(outer.path().join("outside"), b"outside\n").unwrap();
        std::fs::copy("/usr/bin/true", dir.join("tool")).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(outer.path(), 0o755);
        mode(&outer.path().join("outside"), 0o666);
        mode(&dir, 0o777);
        mode(&dir.join("sub"), 0o777);
        mode(&dir.join("secret"), 0o666);
        mode(&dir.join("sub/deeper"), 0o666);
        mode(&dir.join("tool"), 0o755);
        HostDir { _outer: outer, dir }
    }

    fn open(&self) -> OwnedFd {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.dir)
            .unwrap();
        OwnedFd::from(f)
    }

    /// Its entries, sorted, with the secret's content.
    fn state(&self) -> (Vec<String>, String) {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let secret = std::fs::read_to_string(self.dir.join("secret")).unwrap_or_default();
        (names, secret)
    }

    /// The probe run on the host, as `uid`, with the descriptor inherited
    /// as descriptor 3: what the sandbox would get but for Landlock.
    fn probe_on_host(&self, uid: u32) -> Vec<(String, String)> {
        use std::os::unix::process::CommandExt;
        let fd = self.open();
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            // The system's: one in root's home is out of that id's reach.
            "/usr/bin/python3",
            "-c",
            PROBE,
            "3",
            "host",
        ])
        .current_dir("/")
        .stdin(Stdio::null());
        // SAFETY: dup2 only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // At 3 already, it only has to survive the exec.
                let ok = if raw == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(raw, 3) == 3
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let got = outcomes(&out);
        // What the probe planted on the host goes again.
        let _ = std::fs::remove_file(self.dir.join("planted"));
        got
    }
}

/// Serves the descriptor of `dir` to whoever connects to a Unix socket at
/// `path` (in a workspace, where a host process and a sandboxed one meet).
struct FdServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
    path: PathBuf,
}

impl FdServer {
    fn start(path: &Path, dir: OwnedFd) -> FdServer {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let iov = [std::io::IoSlice::new(b"d")];
                        let fds = [dir.as_raw_fd()];
                        nix::sys::socket::sendmsg::<()>(
                            conn.as_raw_fd(),
                            &iov,
                            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                            nix::sys::socket::MsgFlags::empty(),
                            None,
                        )
                        .unwrap();
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            served
        });
        FdServer {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        }
    }

    /// How many processes got the descriptor.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether sandboxes on this host get the wall; says so when not.
fn landlock_here() -> bool {
    let abi = moat_sandbox::landlock::sandbox_abi();
    if abi.is_none() {
        eprintln!(
            "skipping the attacks: {}",
            moat_sandbox::landlock::describe()
        );
    }
    abi.is_some()
}

/// Every refused attempt fails with EACCES (the link out of the directory
/// crosses mounts too, so EXDEV is as good); the descriptor itself is valid.
fn assert_refused(who: &str, got: &[(String, String)], stderr: &str) {
    let get = |name: &str| {
        got.iter()
            .find(|(n, _)| n == name)
            .map(|(_, o)| o.as_str())
            .unwrap_or_else(|| panic!("{who}: no outcome for {name}: {got:?}\n{stderr}"))
    };
    assert_eq!(get("fstat"), "ok", "{who}: the descriptor did not arrive");
    for name in REFUSED {
        assert_eq!(get(name), "EACCES", "{who}: {name}: {got:?}\n{stderr}");
    }
    assert!(
        ["EACCES", "EXDEV"].contains(&get("link-out")),
        "{who}: link-out: {got:?}"
    );
}

/// On the host, with the same descriptor and the agent's host id, what the
/// sandbox was refused is done: only Landlock refused it.
fn assert_host_opens(got: &[(String, String)]) {
    for (name, outcome) in got {
        assert_eq!(outcome, "ok", "on the host, {name}: {got:?}");
    }
    for name in REFUSED.iter().filter(|n| !INSIDE_ONLY.contains(*n)) {
        assert!(got.iter().any(|(n, _)| n == name), "{name}: {got:?}");
    }
}

/// Reading and writing the workspace, /tmp and /proc, renames and links
/// across directories, sockets and fifos, running what the workspace holds,
/// `sudo` and apt: all as before Landlock.
fn work_script(ws: &str) -> String {
    format!(
        r#"set -e
echo a > {ws}/w && : > {ws}/w && echo b >> {ws}/w && cat {ws}/w
echo t > /tmp/t && mkdir -p /tmp/d && mv /tmp/t /tmp/d/t && ln /tmp/d/t /tmp/l && cat /tmp/l
grep -q '^Name:' /proc/self/status && echo proc
cp /usr/bin/true {ws}/mytrue && {ws}/mytrue && rm {ws}/mytrue && echo exec
mkfifo /tmp/fifo-$$ && rm /tmp/fifo-$$ && echo fifo
python3 -c 'import socket, os; s = socket.socket(socket.AF_UNIX); p = "/tmp/s-%d" % os.getpid(); s.bind(p); s.listen(); c = socket.socket(socket.AF_UNIX); c.connect(p); os.unlink(p); print("socket")'
sudo -n true && echo sudo
sudo -n sh -c 'echo x > /etc/ll-probe && mv /etc/ll-probe /var/tmp/ll-probe && rm /var/tmp/ll-probe' && echo root-rename
sudo -n apt-get -qq check && echo apt
"#
    )
}

const WORK_DONE: &str = "b\nt\nproc\nexec\nfifo\nsocket\nsudo\nroot-rename\napt\n";

#[test]
fn a_planted_host_directory_descriptor_opens_nothing_below_it() {
    let sb = Sandbox::new("landlock");
    let ws = sb.ws().to_str().unwrap().to_string();

    let out = sb.sh(&work_script(&ws));
    assert_eq!(text(&out.stdout), WORK_DONE, "{}", text(&out.stderr));
    if !landlock_here() {
        return;
    }

    let host = HostDir::new();
    let before = host.state();
    let sock = sb.ws().join("fd.sock");
    let server = FdServer::start(&sock, host.open());
    let code = PROBE.to_string();
    for root in [false, true] {
        let path = sb.ws().join(format!("probe-{}.py", unique("ll")));
        std::fs::write(&path, &code).unwrap();
        let mut args = vec!["sandbox", "exec"];
        if root {
            args.extend(["-u", "root"]);
        }
        let p = path.to_str().unwrap();
        let s = sock.to_str().unwrap();
        args.extend([sb.name.as_str(), "python3", p, s]);
        let out = moat(&args);
        let who = if root { "root inside" } else { "the agent" };
        assert_refused(who, &outcomes(&out), &text(&out.stderr));
    }
    assert_eq!(server.finish(), 2);
    assert_eq!(host.state(), before, "the host directory changed");
    assert!(!sb.ws().join("stolen").exists());

    // The agent's own host id, with the same descriptor on the host.
    assert_host_opens(&host.probe_on_host(UID_BASE + 1000));
}

/// The same, with the daemon run by an unprivileged user: there the agent
/// is that user on the host, and the host's own permissions would let it
/// through.
#[test]
fn a_rootless_sandbox_opens_nothing_below_a_planted_host_directory_descriptor() {
    let r = Rootless::setup("ll");
    let ws = r.dir.join("ws");
    let w = ws.to_str().unwrap();
    r.ok(&["sandbox", "create", "--name", "rll", "shell", w]);

    let out = r.moat(&["sandbox", "exec", "rll", "sh", "-c", &work_script(w)]);
    assert_eq!(text(&out.stdout), WORK_DONE, "{}", text(&out.stderr));
    if !landlock_here() {
        return;
    }

    let host = HostDir::new();
    // Owned by the user on the host, as its own files are.
    for p in ["", "secret", "sub", "sub/deeper", "tool"] {
        nix::unistd::chown(
            &host.dir.join(p),
            Some(nix::unistd::Uid::from_raw(r.uid)),
            Some(nix::unistd::Gid::from_raw(r.uid)),
        )
        .unwrap();
    }
    let before = host.state();
    let sock = ws.join("fd.sock");
    let server = FdServer::start(&sock, host.open());
    let probe = ws.join("probe.py");
    std::fs::write(&probe, PROBE).unwrap();
    nix::unistd::chown(&probe, Some(nix::unistd::Uid::from_raw(r.uid)), None).unwrap();
    for root in [false, true] {
        let mut args = vec!["sandbox", "exec"];
        if root {
            args.extend(["-u", "root"]);
        }
        args.extend([
            "rll",
            "python3",
            probe.to_str().unwrap(),
            sock.to_str().unwrap(),
        ]);
        let out = r.moat(&args);
        let who = if root {
            "root inside, rootless"
        } else {
            "the agent, rootless"
        };
        assert_refused(who, &outcomes(&out), &text(&out.stderr));
    }
    assert_eq!(server.finish(), 2);
    assert_eq!(host.state(), before, "the host directory changed");
    assert!(!ws.join("stolen").exists());

    assert_host_opens(&host.probe_on_host(r.uid));
}

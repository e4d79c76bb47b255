//! Attacks on the sandbox's walls that an outside attack found open ("Hold
//! the boundary"), each run from inside a real sandbox against the real
//! daemon, as the agent and as the sandbox's root (through `exec -u root`
//! and through the template's passwordless sudo). Each asserts that the
//! attack fails the way it must and that the host is as it was: whatever an
//! attack planted is removed.
//!
//! They run on every isolation tier: `boundary.rs` includes them for the
//! namespace tier, `boundary_gvisor.rs` for the gVisor tier (`crate::TIER`).
//! Every attack applies to both: each is about what reaches the host
//! (workspace files, host ids, the caller's terminal, per-user kernel
//! counts, init's host process, the daemon's checks before a start), not
//! about one tier's own machinery. Where gVisor refuses one differently,
//! the test says how, next to the namespace tier's expectation, which stays
//! as it was.
//!
//! As an unprivileged user:
//! [`a_rootless_sandbox_plants_no_capability_or_set_id_file_and_holds_no_caller_descriptor`]
//! here, on this binary's tier.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::TIER;

/// The default `uid_base` of a root daemon: every id inside maps above it.
const UID_BASE: u32 = 1_000_000_000;

/// A sandbox on this binary's tier, with a fresh workspace.
fn sandbox(prefix: &str) -> Sandbox {
    Sandbox::on(TIER, prefix, &[], &[])
}

/// Whether this run is on the gVisor tier.
fn gvisor() -> bool {
    TIER == Tier::Gvisor
}

/// Whether the template's `sudo` works inside. `Ok(false)` where this gVisor
/// release refuses it: its kernel takes every process to have no_new_privs
/// and ignores set-id bits at exec, so sudo stops before it runs anything and
/// there is no attack through it to try (root inside is tried through `exec
/// -u root`). Any other failure is the reason, which the test reports.
fn sudo_works(sb: &Sandbox) -> Result<bool, String> {
    let out = sb.sh("sudo -n id -u");
    if out.status.success() && text(&out.stdout) == "0\n" {
        return Ok(true);
    }
    let err = text(&out.stderr);
    if gvisor() && err.contains("The \"no new privileges\" flag is set") {
        eprintln!("sudo inside gVisor refuses to run (no_new_privs): no attack through it to try");
        return Ok(false);
    }
    Err(format!(
        "sudo inside does not work, so the attack through it could not run ({:?}): {}",
        out.status,
        err.trim()
    ))
}

fn host_python(code: &str) -> String {
    let out = Command::new("python3").args(["-c", code]).output().unwrap();
    text(&out.stdout).trim().to_string() + &text(&out.stderr)
}

/// Item 1: a v3 `security.capability` whose root id is the agent's was a
/// capability for host root. Root inside no longer holds CAP_SETFCAP, and
/// the agent is no longer host root.
#[test]
fn no_file_capability_reaches_the_workspace_and_the_agent_is_not_host_root() {
    let sb = sandbox("fcap");
    let ws = sb.ws().to_str().unwrap().to_string();
    let cp = sb.sh(&format!("cp /usr/bin/python3 {ws}/capfile"));
    assert!(cp.status.success(), "{}", text(&cp.stderr));
    let setcap = format!(
        r#"import os,struct
try:
    os.setxattr("{ws}/capfile","security.capability",struct.pack("<IIIIII",0x03000001,(1<<7)|(1<<6),0,0,0,1000))
    print("SET")
except OSError as e:
    print("ERRNO", e.errno)
for v in (2, 3):
    try:
        os.setxattr("{ws}/capfile","security.capability",struct.pack("<IIIII",0x02000001 if v == 2 else 0x03000001,1<<7,0,0,0) + (b"" if v == 2 else struct.pack("<I", 0)))
        print("SET")
    except OSError as e:
        print("ERRNO", e.errno)
"#
    );
    std::fs::write(sb.ws().join("setcap.py"), &setcap).unwrap();
    let script = format!("{ws}/setcap.py");
    // Root inside, through `exec -u root` and through the agent's sudo.
    let mut tries = vec![(
        "exec -u root",
        moat(&[
            "sandbox", "exec", "-u", "root", &sb.name, "python3", &script,
        ]),
    )];
    let sudo = sudo_works(&sb);
    if sudo == Ok(true) {
        tries.push((
            "sudo",
            moat(&[
                "sandbox", "exec", &sb.name, "sudo", "-n", "python3", &script,
            ]),
        ));
    }
    let capfile = sb.ws().join("capfile");
    let on_host = host_python(&format!(
        "import os\ntry:\n print(os.getxattr('{}', 'security.capability'))\nexcept OSError as e:\n print('ENODATA' if e.errno == 61 else e.errno)",
        capfile.display()
    ));
    let _ = std::fs::remove_file(&capfile);
    // gVisor's file system for the workspace keeps no extended attributes
    // at all (EOPNOTSUPP, before any capability check): none reaches the
    // host's file, which is checked below.
    let want = if gvisor() { "ERRNO 95" } else { "ERRNO 1" };
    for (how, out) in &tries {
        let said = text(&out.stdout);
        let lines: Vec<&str> = said.lines().collect();
        assert!(
            lines == [want; 3],
            "setxattr as root through {how}: {said}{}",
            text(&out.stderr)
        );
    }
    assert_eq!(on_host, "ENODATA");

    // Every process inside runs as an unprivileged host id, the agent's too
    // (on gVisor, the host processes are gVisor itself, its gofer and each
    // `runsc exec`).
    moat_ok(&["sandbox", "exec", "-d", &sb.name, "sleep", "30"]);
    std::thread::sleep(Duration::from_millis(300));
    let pids = sandbox_host_pids(sb.init_pid());
    assert!(pids.len() >= 2, "no sleep in the sandbox: {pids:?}");
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        for line in status
            .lines()
            .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:"))
        {
            for id in line.split_whitespace().skip(1) {
                let id: u32 = id.parse().unwrap();
                assert!(id >= UID_BASE, "pid {pid} runs as host id {id}: {line}");
            }
        }
    }
    if let Err(e) = sudo {
        panic!("{e}");
    }
}

/// What the agent and the sandbox's root write in a workspace belongs to
/// the workspace's owner and to an unprivileged id respectively, never to
/// host root; the agent still owns the owner's files inside.
#[test]
fn workspace_files_belong_to_its_owner_and_never_to_host_root() {
    let sb = sandbox("owner");
    std::os::unix::fs::chown(sb.ws(), Some(4242), Some(4343)).unwrap();
    std::fs::write(sb.ws().join("mine"), b"x").unwrap();
    std::os::unix::fs::chown(sb.ws().join("mine"), Some(4242), Some(4343)).unwrap();
    // A running sandbox keeps the mount it started with: start it again.
    moat_ok(&["sandbox", "stop", &sb.name]);
    moat_ok(&["sandbox", "run", &sb.name, "--", "-c", "true"]);
    let ws = sb.ws().to_str().unwrap().to_string();
    let out = sb.sh(&format!(
        "stat -c '%U %u' {ws}/mine && echo a > {ws}/by-agent"
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "agent 1000");
    let out = sb.root_sh(&format!("echo r > {ws}/by-root"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sudo = sudo_works(&sb);
    if sudo == Ok(true) {
        let out = sb.sh(&format!("sudo sh -c 'echo r > {ws}/by-sudo'"));
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let ids = |name: &str| {
        let m = std::fs::metadata(sb.ws().join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(ids("by-agent"), (4242, 4343));
    assert_eq!(ids("by-root"), (UID_BASE, UID_BASE));
    match sudo {
        Ok(true) => assert_eq!(ids("by-sudo"), (UID_BASE, UID_BASE)),
        Ok(false) => {}
        Err(e) => panic!("{e}"),
    }
}

/// Item 2: `O_TMPFILE` made a file with a set-id mode without `O_CREAT`.
#[test]
fn no_set_id_file_through_o_tmpfile() {
    let sb = sandbox("tmpfile");
    let ws = sb.ws().to_str().unwrap().to_string();
    for root in [false, true] {
        let out = python_in_sandbox(
            &sb,
            &format!(
                r#"import os, ctypes
l = ctypes.CDLL(None, use_errno=True)
for mode in (0o6755, 0o4755, 0o2755):
    try:
        fd = os.open("{ws}", 0o20000000 | os.O_DIRECTORY | os.O_WRONLY, mode)
        r = l.linkat(-100, b"/proc/self/fd/%d" % fd, -100, b"{ws}/planted-%o" % mode, 0x400)
        print("MADE", r)
    except OSError as e:
        print("ERRNO", e.errno)
"#
            ),
            root,
        );
        let said = text(&out.stdout);
        let planted: Vec<_> = std::fs::read_dir(sb.ws())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("planted"))
            .map(|e| (e.path(), e.metadata().unwrap().mode()))
            .collect();
        for (p, _) in &planted {
            let _ = std::fs::remove_file(p);
        }
        assert_eq!(
            said.lines().collect::<Vec<_>>(),
            ["ERRNO 1"; 3],
            "{said}{}",
            text(&out.stderr)
        );
        assert!(planted.iter().all(|(_, m)| m & 0o6000 == 0), "{planted:?}");
    }
}

/// Item 3: `exec` without `-t` handed the caller's terminal to the sandbox,
/// where a process left behind read what was typed into it later.
#[test]
fn exec_hands_no_host_descriptor_and_a_process_left_behind_reads_nothing_typed_later() {
    let sb = sandbox("tty");
    let ws = sb.ws().to_str().unwrap().to_string();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    // A process that outlives the command, keeping the descriptors it was
    // given, reads them after the command has returned.
    let script = format!(
        r#"python3 -c '
import os, stat, time
def kind(fd):
    st = os.fstat(fd)
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    if os.isatty(fd):
        return "tty"
    if stat.S_ISCHR(st.st_mode):
        return "chr"
    return oct(stat.S_IFMT(st.st_mode))
open("{ws}/fds", "w").write("".join(os.readlink("/proc/self/fd/%d" % fd) + " " + kind(fd) + "\n" for fd in (0, 1, 2)))
if os.fork() == 0:
    os.setsid()
    time.sleep(2)
    got = b""
    for fd in (0, 1, 2):
        try:
            got += os.read(fd, 100)
        except OSError as e:
            got += b"E%d " % e.errno
    open("{ws}/stolen2", "wb").write(got)
'
echo done"#
    );
    let mut cmd = moat_cmd();
    cmd.args(["sandbox", "exec", &sb.name, "sh", "-c", &script])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    let status = cmd.status().unwrap();
    assert!(status.success());
    // Typed into the host's terminal after the command returned.
    let mut master = std::fs::File::from(pty.master);
    master.write_all(b"hunter2\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sb.ws().join("stolen2").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds = std::fs::read_to_string(sb.ws().join("fds")).unwrap();
    let stolen = std::fs::read(sb.ws().join("stolen2")).unwrap_or_default();
    for line in fds.lines() {
        let (link, kind) = line.split_once(' ').unwrap();
        // On gVisor every descriptor a process gets from `runsc exec` is a
        // host file that gVisor wraps, named `host:[N]`: here the pipes and
        // the /dev/null that init made inside the sandbox, as on the
        // namespace tier (gVisor shows a host device's number as 0:0, so
        // /dev/null is a character device that is no terminal), never the
        // caller's terminal.
        let made_inside = if gvisor() {
            link.starts_with("host:[") && (kind == "fifo" || kind == "chr")
        } else {
            link.starts_with("pipe:[") || link == "/dev/null"
        };
        assert!(made_inside, "a sandboxed process holds {line}");
    }
    assert!(
        !String::from_utf8_lossy(&stolen).contains("hunter2"),
        "read from the host's terminal: {stolen:?}"
    );
    // Our terminal got the output, and nothing typed was eaten.
    let mut buf = [0u8; 4096];
    let fd = master.as_raw_fd();
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let n = master.read(&mut buf).unwrap_or(0);
    assert!(String::from_utf8_lossy(&buf[..n]).contains("done"));
}

/// Item 8: inotify instances of every sandbox counted against host root's
/// limit (root owned the sandboxes' user namespaces).
#[test]
fn a_sandbox_cannot_use_up_inotify_for_the_host_or_another_sandbox() {
    let a = sandbox("inotify-a");
    let b = sandbox("inotify-b");
    // Several ids inside, each taking all it can, and holding them.
    let hog = r#"import ctypes, os, time
l = ctypes.CDLL(None)
n = 0
for uid in (0, 1000, 2000, 3000):
    if os.fork() == 0:
        os.setuid(uid)
        k = 0
        while l.inotify_init() >= 0:
            k += 1
        open("/tmp/hog-%d" % uid, "w").write(str(k))
        time.sleep(60)
        os._exit(0)
time.sleep(60)
"#;
    let path = a.ws().join("hog.py");
    std::fs::write(&path, hog).unwrap();
    moat_ok(&[
        "sandbox",
        "exec",
        "-d",
        "-u",
        "root",
        &a.name,
        "python3",
        path.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let counts = loop {
        let out = a.root_sh(
            "cat /tmp/hog-0 /tmp/hog-1000 /tmp/hog-2000 /tmp/hog-3000 2>/dev/null | wc -l",
        );
        if text(&out.stdout).trim() == "0" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        std::thread::sleep(Duration::from_millis(1000));
        break text(&a.root_sh("cat /tmp/hog-*; echo").stdout);
    };
    // The host's root can still watch files.
    // SAFETY: plain syscalls; the descriptor is closed at once.
    let fd = unsafe { libc::inotify_init() };
    let host_errno = std::io::Error::last_os_error();
    if fd >= 0 {
        // SAFETY: we own fd.
        unsafe { libc::close(fd) };
    }
    // And so can another sandbox.
    let other = python_in_sandbox(
        &b,
        "import ctypes\nprint(ctypes.CDLL(None).inotify_init() >= 0)",
        false,
    );
    assert!(
        fd >= 0,
        "host root's inotify_init failed ({host_errno}) while a sandbox held {counts}"
    );
    assert_eq!(
        text(&other.stdout).trim(),
        "True",
        "{}",
        text(&other.stderr)
    );
}

/// Weaker items: init's OOM score cannot be raised (the kernel would pick
/// the whole sandbox first), and a sandbox has a CPU limit by default.
#[test]
fn init_keeps_its_oom_score_and_a_default_cpu_limit_applies() {
    let sb = sandbox("oom");
    // Every host process of the sandbox keeps its score: init, and on gVisor
    // gVisor itself (whose memory holds every process inside) and its gofer.
    let scores = || -> Vec<(i32, String)> {
        sandbox_host_pids(sb.init_pid())
            .into_iter()
            .filter_map(|p| {
                let s = std::fs::read_to_string(format!("/proc/{p}/oom_score_adj")).ok()?;
                Some((p, s))
            })
            .collect()
    };
    let before = scores();
    let out = sb.root_sh(
        "echo 1000 > /proc/1/oom_score_adj; echo 15 > /proc/1/oom_adj; cat /proc/1/oom_score_adj",
    );
    let after = scores();
    let moved: Vec<_> = after
        .iter()
        .filter(|(p, s)| before.iter().any(|(q, t)| p == q && s != t))
        .collect();
    assert!(
        moved.is_empty() && after.iter().any(|(p, _)| *p == sb.init_pid()),
        "{before:?} -> {after:?}: {}",
        text(&out.stderr)
    );
    if gvisor() {
        // /proc/1 is gVisor's guest helper, and its score is gVisor's own
        // number for it: gVisor takes the write (and refuses oom_adj), but
        // no host process's score moves (above), and the host's OOM killer
        // sees only gVisor's host processes.
        assert!(
            text(&out.stderr).contains("oom_adj: Operation not permitted"),
            "{}",
            text(&out.stderr)
        );
    } else {
        assert!(
            text(&out.stderr).contains("Read-only file system"),
            "{}",
            text(&out.stderr)
        );
    }

    let cores = std::thread::available_parallelism().unwrap().get();
    let expected = cores.saturating_sub(1).max(1) as f64;
    let limits = &sb.inspect()["limits"];
    assert_eq!(limits["cpus"].as_f64(), Some(expected), "{limits}");
}

/// A link planted in a workspace's path (through another workspace) would
/// send the next start's mount to a host directory of root's, idmapped to
/// the agent: the start refuses, and mounts nothing.
#[test]
fn a_link_planted_in_a_workspace_path_is_refused_at_the_next_start() {
    ensure_template();
    let ws = tempfile::Builder::new()
        .prefix("moat-ws-")
        .tempdir_in("/tmp")
        .unwrap();
    let secret = tempfile::Builder::new()
        .prefix("moat-secret-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir_all(ws.path().join("libs/x")).unwrap();
    std::fs::create_dir_all(secret.path().join("x")).unwrap();
    std::fs::write(secret.path().join("x/shadow"), b"root-only\n").unwrap();
    let name = unique("link");
    let w = ws.path().to_str().unwrap().to_string();
    let extra = format!("{w}/libs/x");
    let tier = TIER.flags();
    moat_ok(&[
        "sandbox", "create", "--name", &name, tier[0], tier[1], "shell", &w, &extra,
    ]);
    let sb = Sandbox {
        name: name.clone(),
        workspace: ws,
        rootless: None,
    };
    let plant = sb.sh(&format!(
        "mv {w}/libs {w}/libs.old && ln -s {} {w}/libs && echo planted",
        secret.path().display()
    ));
    assert_eq!(
        text(&plant.stdout).trim(),
        "planted",
        "{}",
        text(&plant.stderr)
    );
    moat_ok(&["sandbox", "stop", &name]);
    let started = moat(&[
        "sandbox",
        "run",
        &name,
        "--",
        "-c",
        "cat /proc/self/mountinfo",
    ]);
    let err = text(&started.stderr);
    assert!(
        !started.status.success(),
        "started: {}",
        text(&started.stdout)
    );
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read(secret.path().join("x/shadow")).unwrap(),
        b"root-only\n"
    );
}

/// A process left in the background holding exec's output: the command
/// returns once it exits, without waiting on the background process and
/// without spinning while it drains.
#[test]
fn exec_returns_when_its_process_exits_though_a_background_one_holds_the_output() {
    let sb = sandbox("bg");
    let cpu = || {
        // SAFETY: getrusage fills the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
        ru.ru_utime.tv_sec as f64
            + ru.ru_stime.tv_sec as f64
            + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) as f64 / 1e6
    };
    let before = cpu();
    let t = Instant::now();
    let out = sb.sh("sleep 20 & echo hi");
    let took = t.elapsed();
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(took < Duration::from_secs(10), "exec took {took:?}");
    assert!(
        cpu() - before < 2.0,
        "the CLI burnt {:.1} s of CPU",
        cpu() - before
    );
}

/// The attacks of "Hold the boundary" that apply without root, run by the
/// unprivileged user's daemon on this binary's tier: a file capability or a
/// set-id file (through `O_TMPFILE` too) planted in the workspace, and the
/// caller's descriptors reaching the sandbox.
#[test]
fn a_rootless_sandbox_plants_no_capability_or_set_id_file_and_holds_no_caller_descriptor() {
    use crate::common::rootless::{Created, Rootless};
    let r = Rootless::setup("rlb");
    let ws = r.ws();
    let w = ws.to_str().unwrap();
    if let Created::TierRefused(why) = r.create(TIER, "rlb", &ws) {
        eprintln!(
            "skipped: the daemon refuses the {} tier rootless: {why}",
            TIER.name()
        );
        return;
    }
    let info: serde_json::Value =
        serde_json::from_str(&r.ok(&["sandbox", "inspect", "rlb"])).unwrap();
    assert_eq!(info[0]["isolation"]["tier"].as_str(), Some(TIER.name()));
    let probe = format!(
        r#"import os, stat, struct, ctypes
l = ctypes.CDLL(None, use_errno=True)
open("{w}/capfile", "w").write("x")
try:
    os.setxattr("{w}/capfile", "security.capability", struct.pack("<IIIIII", 0x03000001, 1 << 7, 0, 0, 0, 0))
    print("cap SET")
except OSError as e:
    print("cap", e.errno)
try:
    fd = os.open("{w}", 0o20000000 | os.O_DIRECTORY | os.O_WRONLY, 0o6755)
    l.linkat(-100, b"/proc/self/fd/%d" % fd, -100, b"{w}/planted", 0x400)
    print("tmpfile MADE")
except OSError as e:
    print("tmpfile", e.errno)
def kind(fd):
    st = os.fstat(fd)
    if os.isatty(fd):
        return "tty"
    return "fifo" if stat.S_ISFIFO(st.st_mode) else "chr" if stat.S_ISCHR(st.st_mode) else oct(st.st_mode)
print(" ".join(os.readlink("/proc/self/fd/%d" % fd) + "=" + kind(fd) for fd in (0, 1, 2)))
"#
    );
    std::fs::write(ws.join("probe.py"), &probe).unwrap();
    nix::unistd::chown(
        &ws.join("probe.py"),
        Some(nix::unistd::Uid::from_raw(r.uid)),
        None,
    )
    .unwrap();
    for user in ["root", "agent"] {
        let out = r.moat(&[
            "sandbox",
            "exec",
            "-u",
            user,
            "rlb",
            "python3",
            &format!("{w}/probe.py"),
        ]);
        let said = text(&out.stdout);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), 3, "as {user}: {said}{}", text(&out.stderr));
        // gVisor keeps no extended attributes on the workspace (EOPNOTSUPP);
        // the host's file is checked below.
        let cap = if gvisor() { "cap 95" } else { "cap 1" };
        assert_eq!(lines[0], cap, "as {user}: {said}");
        assert_eq!(lines[1], "tmpfile 1", "as {user}: {said}");
        for fd in lines[2].split(' ') {
            let (link, kind) = fd.split_once('=').unwrap();
            // On gVisor, the pipes init made are host files that gVisor
            // wraps (`host:[N]`); never the caller's terminal.
            let made_inside = if gvisor() {
                link.starts_with("host:[") && (kind == "fifo" || kind == "chr")
            } else {
                link.starts_with("pipe:[") || link == "/dev/null"
            };
            assert!(made_inside, "as {user}: {said}");
        }
        assert!(!ws.join("planted").exists());
        let caps = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import os\ntry:\n os.getxattr('{w}/capfile', 'security.capability'); print('HAS')\nexcept OSError as e:\n print(e.errno)"
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(text(&caps.stdout).trim(), "61", "as {user}");
        let _ = std::fs::remove_file(ws.join("capfile"));
    }
    // Nothing in the workspace with a set-id bit, as the host sees it.
    for e in std::fs::read_dir(&ws).unwrap().flatten() {
        let mode = e.metadata().unwrap().mode();
        assert_eq!(mode & 0o6000, 0, "{} has mode {mode:o}", e.path().display());
    }
}

//! The seccomp allow-list (`crates/moat-sandbox/src/seccomp.json`), tried
//! from inside real sandboxes as the agent and as the sandbox's root: a
//! call the list leaves out is refused with the errno the policy gives
//! (ENOSYS, or EPERM for the calls it refuses by name), the argument
//! filters hold (personality, socket families, clone3, terminal
//! injection), and what programs need still works.
//!
//! Each attempt is made with arguments the kernel itself would answer
//! differently (EFAULT, EBADF, EINVAL or success), so that the errno shows
//! the filter's verdict. The probes are Python scripts that print
//! `LABEL OK VALUE` or `LABEL ERRNO_NAME`; syscall numbers are x86_64's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;

const PRELUDE: &str = r#"
import ctypes, errno, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def ename(n):
    return errno.errorcode.get(n, str(n))
def t(label, f):
    try:
        print(label, "OK", f(), flush=True)
    except OSError as e:
        print(label, ename(e.errno), flush=True)
def sc(nr, *args):
    a = [ctypes.c_long(x) if isinstance(x, int) else x for x in args]
    r = libc.syscall(ctypes.c_long(nr), *a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
def iso(label, f):
    # In a child, for attempts that would change the prober if they succeeded.
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            t(label, f)
        finally:
            sys.stdout.flush()
            os._exit(0)
    os.waitpid(pid, 0)
"#;

/// Who runs a probe inside.
#[derive(Clone, Copy, Debug)]
enum Who {
    Agent,
    Root,
}

const EVERYONE: [Who; 2] = [Who::Agent, Who::Root];

/// The outcome of one probe script: its lines by label.
struct Probe {
    who: Who,
    lines: BTreeMap<String, String>,
    output: String,
}

impl Probe {
    fn get(&self, label: &str) -> &str {
        self.lines
            .get(label)
            .map(String::as_str)
            .unwrap_or("(missing)")
    }
}

/// Run `body` (Python, after PRELUDE) inside as `who`; it must run to its end.
fn probe(sb: &Sandbox, who: Who, body: &str) -> Probe {
    let out = python_in_sandbox(
        sb,
        &format!("{PRELUDE}\n{body}\nprint('END', 'OK', flush=True)\n"),
        matches!(who, Who::Root),
    );
    let stdout = text(&out.stdout);
    let output = format!("{stdout}{}", text(&out.stderr));
    assert!(
        stdout.lines().any(|l| l == "END OK"),
        "the probe as {who:?} did not finish:\n{output}"
    );
    let lines = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Probe { who, lines, output }
}

/// Every expectation that did not hold, reported together.
#[derive(Default)]
struct Verdict(Vec<String>);

impl Verdict {
    fn expect(&mut self, p: &Probe, label: &str, want: &[&str]) {
        let got = p.get(label);
        if !want.contains(&got) {
            self.0.push(format!(
                "{label} as {:?}: got `{got}`, want {}",
                p.who,
                want.join(" or ")
            ));
        }
    }

    fn finish(self, outputs: &[Probe]) {
        assert!(
            self.0.is_empty(),
            "{} expectation(s) not held:\n  {}\n\nprobe output:\n{}",
            self.0.len(),
            self.0.join("\n  "),
            outputs
                .iter()
                .map(|p| format!("as {:?}:\n{}", p.who, p.output))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn is_x86_64() -> bool {
    if cfg!(target_arch = "x86_64") {
        return true;
    }
    eprintln!("skipped: the probes use x86_64 syscall numbers");
    false
}

/// Calls the allow-list leaves out, among them those an attack found
/// reaching the kernel: refused, with ENOSYS where a program should take
/// the call for one an older kernel lacks, and EPERM for those the policy
/// refuses by name.
#[test]
fn calls_outside_the_allow_list_are_refused() {
    if !is_x86_64() {
        return;
    }
    let sb = Sandbox::new("sc-list");
    // label, number, arguments, the errno the policy gives.
    let calls: &[(&str, i64, &[i64], &str)] = &[
        ("statmount", 457, &[0, 0, 0, 0], "ENOSYS"),
        ("listmount", 458, &[0, 0, 0, 0], "ENOSYS"),
        ("memfd_secret", 447, &[0], "ENOSYS"),
        ("mseal", 462, &[0, 0, 0], "ENOSYS"),
        ("cachestat", 451, &[-1, 0, 0, 0], "ENOSYS"),
        ("setxattrat", 463, &[-1, 0, 0, 0, 0, 0], "ENOSYS"),
        ("getxattrat", 464, &[-1, 0, 0, 0, 0, 0], "ENOSYS"),
        ("listxattrat", 465, &[-1, 0, 0, 0, 0], "ENOSYS"),
        ("removexattrat", 466, &[-1, 0, 0, 0], "ENOSYS"),
        ("file_getattr", 468, &[-1, 0, 0, 0, 0], "ENOSYS"),
        ("file_setattr", 469, &[-1, 0, 0, 0, 0], "ENOSYS"),
        ("lsm_get_self_attr", 459, &[0, 0, 0, 0], "ENOSYS"),
        ("lsm_set_self_attr", 460, &[0, 0, 0, 0], "ENOSYS"),
        ("lsm_list_modules", 461, &[0, 0, 0], "ENOSYS"),
        // LANDLOCK_CREATE_RULESET_VERSION: the kernel would answer its ABI.
        ("landlock_create_ruleset", 444, &[0, 0, 1], "ENOSYS"),
        ("landlock_add_rule", 445, &[-1, 1, 0, 0], "ENOSYS"),
        ("landlock_restrict_self", 446, &[-1, 0], "ENOSYS"),
        // Named nowhere in the file; the kernel would succeed.
        ("get_mempolicy", 239, &[0, 0, 0, 0, 0], "ENOSYS"),
        // No kernel has these; x32's getpid.
        ("nr-1000", 1000, &[], "ENOSYS"),
        ("nr-x32-getpid", 0x4000_0027, &[], "ENOSYS"),
        // Refused by name.
        ("open_tree_attr", 467, &[-100, 0, 0, 0, 0], "EPERM"),
        ("pidfd_getfd", 438, &[-1, 0, 0], "EPERM"),
        ("process_madvise", 440, &[-1, 0, 0, 0, 0], "EPERM"),
        ("quotactl_fd", 443, &[-1, 0, 0, 0], "EPERM"),
        ("fanotify_init", 300, &[0, 0], "EPERM"),
        ("io_uring_setup", 425, &[1, 0], "EPERM"),
        ("fsopen", 430, &[0, 0], "EPERM"),
        ("name_to_handle_at", 303, &[-1, 0, 0, 0, 0], "EPERM"),
    ];
    let list: Vec<String> = calls
        .iter()
        .map(|(l, n, a, _)| format!("({l:?}, {n}, {a:?})"))
        .collect();
    let body = format!(
        r#"
for label, nr, args in [{}]:
    iso(label, lambda: sc(nr, *args))
t("getpid", lambda: sc(39) > 0)
# KCMP_VM of this process with itself: the kernel would answer 0.
iso("kcmp", lambda: sc(312, os.getpid(), os.getpid(), 1, 0, 0))
"#,
        list.join(", ")
    );
    let mut v = Verdict::default();
    let mut probes = vec![];
    for who in EVERYONE {
        let p = probe(&sb, who, &body);
        for (label, _, _, want) in calls {
            v.expect(&p, label, &[want]);
        }
        v.expect(&p, "getpid", &["OK True"]);
        v.expect(&p, "kcmp", &["EPERM"]);
        probes.push(p);
    }
    v.finish(&probes);
}

/// personality(2) takes only the values Docker allows; READ_IMPLIES_EXEC
/// (every readable page executable) and ADDR_NO_RANDOMIZE are refused.
#[test]
fn personality_takes_only_dockers_values() {
    if !is_x86_64() {
        return;
    }
    let sb = Sandbox::new("sc-pers");
    let body = r#"
QUERY = 0xffffffff
t("query", lambda: sc(135, QUERY))
iso("read-implies-exec", lambda: sc(135, 0x0400000))
iso("addr-no-randomize", lambda: sc(135, 0x0040000))
iso("mmap-page-zero", lambda: sc(135, 0x0100000))
iso("read-implies-exec-high-bits", lambda: sc(135, 0x100400000))
iso("short-inode", lambda: sc(135, 0x1000000))
def set_and_back(value):
    old = sc(135, value)
    now = sc(135, QUERY)
    sc(135, old)
    return "%#x" % now
iso("linux32", lambda: set_and_back(0x8))
iso("uname26", lambda: set_and_back(0x20000))
iso("linux", lambda: set_and_back(0))
t("after", lambda: sc(135, QUERY))
"#;
    let mut v = Verdict::default();
    let mut probes = vec![];
    for who in EVERYONE {
        let p = probe(&sb, who, body);
        v.expect(&p, "query", &["OK 0"]);
        for label in [
            "read-implies-exec",
            "addr-no-randomize",
            "mmap-page-zero",
            "read-implies-exec-high-bits",
            "short-inode",
        ] {
            v.expect(&p, label, &["EPERM"]);
        }
        v.expect(&p, "linux32", &["OK 0x8"]);
        v.expect(&p, "uname26", &["OK 0x20000"]);
        v.expect(&p, "linux", &["OK 0x0"]);
        v.expect(&p, "after", &["OK 0"]);
        probes.push(p);
    }
    // As a person would try it.
    let out = sb.sh("setarch x86_64 -R true; echo rc=$?");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if !(said.contains("rc=1") && said.contains("Operation not permitted")) {
        v.0.push(format!("setarch -R: {said}"));
    }
    v.finish(&probes);
}

/// Sockets of AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK only: AF_PACKET
/// and AF_XDP (below IP), AF_VSOCK (out of a VM), AF_ALG and the other
/// families are refused, even to root inside, who holds CAP_NET_RAW in the
/// sandbox's network namespace.
#[test]
fn socket_families_are_limited() {
    if !is_x86_64() {
        return;
    }
    let sb = Sandbox::new("sc-sock");
    let refused: &[(&str, i64, i64)] = &[
        ("AF_PACKET-raw", 17, 3),
        ("AF_PACKET-dgram", 17, 2),
        ("AF_XDP", 44, 3),
        ("AF_VSOCK", 40, 1),
        ("AF_ALG", 38, 5),
        ("AF_TIPC", 30, 5),
        ("AF_RDS", 21, 5),
        ("AF_BLUETOOTH", 31, 3),
        ("AF_CAN", 29, 3),
        ("AF_KEY", 15, 3),
        ("AF_LLC", 26, 2),
        ("AF_X25", 9, 5),
        ("AF_AX25", 3, 2),
        ("AF_APPLETALK", 5, 2),
        ("AF_IEEE802154", 36, 2),
        ("AF_SMC", 43, 1),
        ("AF_MCTP", 45, 2),
        // The kernel reads an int: AF_PACKET with bits above it.
        ("AF_PACKET-high-bits", 0x1_0000_0011, 3),
    ];
    let list: Vec<String> = refused
        .iter()
        .map(|(l, f, t)| format!("({l:?}, {f}, {t})"))
        .collect();
    let body = format!(
        r#"
def sock(family, kind, proto=0):
    fd = sc(41, family, kind | 0o2000000, proto)
    os.close(fd)
    return "MADE"
for label, family, kind in [{}]:
    t(label, lambda: sock(family, kind))
t("socketpair-tipc", lambda: sc(53, 30, 5, 0, ctypes.byref((ctypes.c_int * 2)())))
t("AF_UNIX", lambda: sock(1, 1))
t("AF_INET-dgram", lambda: sock(2, 2))
t("AF_INET-stream", lambda: sock(2, 1))
t("AF_INET6", lambda: sock(10, 1))
t("AF_NETLINK-route", lambda: sock(16, 3, 0))
t("socketpair-unix", lambda: sc(53, 1, 1, 0, ctypes.byref((ctypes.c_int * 2)())) == 0)
t("if_nameindex", lambda: sorted(n for _, n in socket.if_nameindex()))
"#,
        list.join(", ")
    );
    let mut v = Verdict::default();
    let mut probes = vec![];
    for who in EVERYONE {
        let p = probe(&sb, who, &body);
        for (label, _, _) in refused {
            v.expect(&p, label, &["EPERM"]);
        }
        v.expect(&p, "socketpair-tipc", &["EPERM"]);
        for label in [
            "AF_UNIX",
            "AF_INET-dgram",
            "AF_INET-stream",
            "AF_NETLINK-route",
        ] {
            v.expect(&p, label, &["OK MADE"]);
        }
        // A host without IPv6 has no such family at all.
        v.expect(&p, "AF_INET6", &["OK MADE", "EAFNOSUPPORT"]);
        v.expect(&p, "socketpair-unix", &["OK True"]);
        v.expect(&p, "if_nameindex", &["OK ['lo']"]);
        probes.push(p);
    }
    v.finish(&probes);
}

/// clone3 answers ENOSYS (its flags sit in memory, where the filter cannot
/// look), so glibc and Python fall back to clone, whose namespace flags
/// are checked: processes and threads still start.
#[test]
fn clone3_is_enosys_and_processes_and_threads_still_start() {
    if !is_x86_64() {
        return;
    }
    let sb = Sandbox::new("sc-clone");
    let body = r#"
import subprocess, threading
def clone3(flags):
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls
    args = struct.pack("QQQQQQQQ", flags, 0, 0, 0, 17, 0, 0, 0)
    buf = ctypes.create_string_buffer(args)
    r = sc(435, buf, len(args))
    if r == 0:
        os._exit(0)
    os.waitpid(r, 0)
    return "CLONED"
iso("clone3-plain", lambda: clone3(0))
iso("clone3-newuser", lambda: clone3(0x10000000))
iso("clone3-bad-size", lambda: sc(435, 0, 0))
def clone(flags):
    r = sc(56, flags | 17, 0, 0, 0, 0)
    if r == 0:
        os._exit(0)
    os.waitpid(r, 0)
    return "CLONED"
iso("clone-plain", lambda: clone(0))
iso("clone-newuser", lambda: clone(0x10000000))
iso("clone-newpid", lambda: clone(0x20000000))
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
t("fork", fork)
t("subprocess", lambda: subprocess.run(["sh", "-c", "echo $((6 * 7))"], capture_output=True, text=True, check=True).stdout.strip())
def spawn():
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], os.environ)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
t("posix_spawn", spawn)
def threads():
    out = []
    ts = [threading.Thread(target=lambda i=i: out.append(i)) for i in range(4)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return sorted(out)
t("threads", threads)
"#;
    let mut v = Verdict::default();
    let mut probes = vec![];
    for who in EVERYONE {
        let p = probe(&sb, who, body);
        for label in ["clone3-plain", "clone3-newuser", "clone3-bad-size"] {
            v.expect(&p, label, &["ENOSYS"]);
        }
        v.expect(&p, "clone-plain", &["OK CLONED"]);
        v.expect(&p, "clone-newuser", &["EPERM"]);
        v.expect(&p, "clone-newpid", &["EPERM"]);
        v.expect(&p, "fork", &["OK 7"]);
        v.expect(&p, "subprocess", &["OK 42"]);
        v.expect(&p, "posix_spawn", &["OK 3"]);
        v.expect(&p, "threads", &["OK [0, 1, 2, 3]"]);
        probes.push(p);
    }
    v.finish(&probes);
}

/// TIOCSTI and TIOCLINUX (typing into a terminal) are refused on a real
/// terminal, however the command number is dressed; other terminal
/// controls work.
#[test]
fn no_typing_into_a_terminal() {
    if !is_x86_64() {
        return;
    }
    let sb = Sandbox::new("sc-tty");
    let body = r#"
import fcntl, termios
m, s = os.openpty()
t("tiocsti", lambda: fcntl.ioctl(s, termios.TIOCSTI, b"x"))
t("tiocsti-master", lambda: fcntl.ioctl(m, termios.TIOCSTI, b"x"))
t("tiocsti-high-bits", lambda: sc(16, s, 0xffffffff00005412, ctypes.c_char_p(b"x")))
t("tioclinux", lambda: fcntl.ioctl(s, 0x541C, b"\x06"))
t("tiocswinsz", lambda: fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0)) and "SET")
t("tiocgwinsz", lambda: struct.unpack("HHHH", fcntl.ioctl(s, termios.TIOCGWINSZ, b"\0" * 8))[:2])
os.set_blocking(m, False)
def pending():
    try:
        return os.read(m, 64)
    except BlockingIOError:
        return b""
t("injected", pending)
"#;
    let mut v = Verdict::default();
    let mut probes = vec![];
    for who in EVERYONE {
        let p = probe(&sb, who, body);
        for label in [
            "tiocsti",
            "tiocsti-master",
            "tiocsti-high-bits",
            "tioclinux",
        ] {
            v.expect(&p, label, &["EPERM"]);
        }
        v.expect(&p, "tiocswinsz", &["OK SET"]);
        v.expect(&p, "tiocgwinsz", &["OK (24, 80)"]);
        v.expect(&p, "injected", &["OK b''"]);
        probes.push(p);
    }
    v.finish(&probes);
}

/// What the agents' tools do every day still works under the allow-list:
/// git, Python's multiprocessing (POSIX semaphores, fork), sudo (set-id
/// calls, PAM, audit netlink), ps, bash's background jobs, tar.
#[test]
fn everyday_tools_still_work() {
    let sb = Sandbox::new("sc-tools");
    let out = sb.sh(r#"set -e
cd /tmp && rm -rf g && mkdir g && cd g
git init -q && echo hi > f && git add f
git -c user.email=a@example.com -c user.name=a commit -q -m first
echo "git $(git log --oneline | wc -l)"
python3 -c 'import multiprocessing as m
with m.Pool(2) as p: print("pool", sum(p.map(abs, [-1, -2, -3])))'
echo "sudo $(sudo -n id -u)"
echo "ps $(ps -e -o comm= | grep -cx ps)"
bash -c 'sleep 0.1 & wait $!; echo "job $?"'
echo "tar $(tar -cf - -C /tmp/g f | tar -tf -)"
"#);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["git 1", "pool 6", "sudo 0", "ps 1", "job 0", "tar f"],
        "{said}{}",
        text(&out.stderr)
    );
}

//! moat's helper inside a gVisor sandbox: a static binary that the gVisor
//! tier mounts read-only into the guest. It plays the part that the
//! namespace tier's init plays after its fork, so that both tiers start
//! processes the same way:
//!
//! - `moat-guest init`: the container's first process. It reaps orphans and
//!   otherwise waits; the sandbox lives as long as it does.
//! - `moat-guest exec FILTERS NNP NPROC USER CWD TTY [KEY=VALUE…] -- ARGV…`: started by
//!   `runsc exec` as root with moat's capability set plus CAP_SYS_ADMIN. It
//!   resolves USER from the guest's own `/etc/passwd`, installs moat's
//!   seccomp filters (compiled by the host from the same data file as the
//!   namespace tier's, read from FILTERS), leaves CAP_SYS_ADMIN behind,
//!   becomes the user, and executes ARGV with the user's environment and
//!   the KEY=VALUE settings over it (runsc adds settings of its own to a
//!   process's environment, so the caller's travel as arguments).
//!
//! It is compiled by `build.rs` with the standard library only (no crates:
//! it is one `rustc` call with a static C library), so it runs in any image.

#[path = "../src/user.rs"]
mod user;

use std::ffi::CString;
use std::io::Read;
use std::os::raw::{c_int, c_long, c_ulong, c_void};

extern "C" {
    fn setsid() -> c_int;
    fn ioctl(fd: c_int, req: c_ulong, ...) -> c_int;
    fn prctl(option: c_int, arg2: c_ulong, arg3: c_ulong, arg4: c_ulong, arg5: c_ulong) -> c_int;
    fn syscall(num: c_long, ...) -> c_long;
    fn setgroups(size: usize, list: *const u32) -> c_int;
    fn setresgid(r: u32, e: u32, s: u32) -> c_int;
    fn setresuid(r: u32, e: u32, s: u32) -> c_int;
    fn chdir(path: *const i8) -> c_int;
    fn execve(path: *const i8, argv: *const *const i8, envp: *const *const i8) -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn setrlimit(resource: c_int, rlim: *const [u64; 2]) -> c_int;
}

const TIOCSCTTY: c_ulong = 0x540E;
const PR_SET_NO_NEW_PRIVS: c_int = 38;
const PR_CAPBSET_DROP: c_int = 24;
const SYS_SECCOMP: c_long = 317;
const SYS_CAPSET: c_long = 126;
const SYS_CAPGET: c_long = 125;
const SECCOMP_SET_MODE_FILTER: c_long = 1;
const CAP_SYS_ADMIN: c_ulong = 21;
const SIG_IGN: usize = 1;
const RLIMIT_NPROC: c_int = 6;
const STATX_LIBRARY: &str = "/dev/.moat/statx.so";

/// The capabilities root keeps inside (the namespace tier's KEPT_CAPS).
const KEPT_CAPS: &[u32] = &[0, 1, 3, 5, 6, 7, 8, 10, 13, 18, 27, 29];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("init") => init(),
        Some("exec") => {
            let err = exec(&args[2..]);
            eprintln!("moat: {err}");
            std::process::exit(127)
        }
        _ => {
            eprintln!("moat-guest: moat's helper inside a gVisor sandbox; not for direct use");
            std::process::exit(2)
        }
    }
}

/// Wait for children forever, reaping what is orphaned to us.
fn init() -> ! {
    // runsc gives the first process the descriptors it had itself; nothing
    // inside may reach them (through /proc/1/fd), so they go.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto our own standard descriptors.
            unsafe { dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
        }
    }
    for sig in [1, 2, 15] {
        // SAFETY: setting a signal to be ignored.
        unsafe { signal(sig, SIG_IGN) };
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status we pass.
        if unsafe { waitpid(-1, &mut status, 0) } < 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

fn last_errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn exec(args: &[String]) -> String {
    let Some(split) = args.iter().position(|a| a == "--") else {
        return "usage: moat-guest exec FILTERS NNP NPROC USER CWD TTY [KEY=VALUE…] -- ARGV…".into();
    };
    let (head, argv) = (&args[..split], &args[split + 1..]);
    let [filters, nnp, nproc, wanted, cwd, tty, extra @ ..] = head else {
        return "usage: moat-guest exec FILTERS NNP NPROC USER CWD TTY [KEY=VALUE…] -- ARGV…".into();
    };
    if argv.is_empty() {
        return "no command given".into();
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let user = match user::resolve_user(
        Some(wanted.as_str()).filter(|w| !w.is_empty()),
        &read("/etc/passwd"),
        &read("/etc/group"),
    ) {
        Ok(u) => u,
        Err(e) => return e,
    };
    let hostname = read("/proc/sys/kernel/hostname");
    let tty = tty == "1";
    let mut env = user::environment(&user, hostname.trim(), tty, extra);
    // An older gVisor's statx needs help (see statx.rs): preload it, after
    // whatever the caller preloads.
    if std::path::Path::new(STATX_LIBRARY).exists() {
        match env.iter_mut().find(|kv| kv.starts_with("LD_PRELOAD=")) {
            Some(kv) => *kv = format!("{kv}:{STATX_LIBRARY}"),
            None => env.push(format!("LD_PRELOAD={STATX_LIBRARY}")),
        }
    }
    let Some(program) = user::find_program(&argv[0], &env) else {
        return format!("{}: executable file not found in $PATH", argv[0]);
    };
    let cwd = if cwd.is_empty() { user.home.clone() } else { cwd.clone() };

    // SAFETY: setsid and ioctl(TIOCSCTTY) on our own descriptors.
    unsafe {
        setsid();
        if tty {
            ioctl(0, TIOCSCTTY, 0);
        }
    }
    if nnp == "1" {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return last_errno("prctl(PR_SET_NO_NEW_PRIVS)");
        }
    }
    // The sandbox's PID limit, held inside gVisor: the host's cgroup counts
    // gVisor's own threads, and a fork bomb that reached it would take
    // gVisor's kernel down with it. gVisor counts RLIMIT_NPROC per user.
    if let Ok(n) = nproc.parse::<u64>() {
        if n > 0 {
            // SAFETY: setrlimit reads the two limits we pass.
            if unsafe { setrlimit(RLIMIT_NPROC, &[n, n]) } != 0 {
                return last_errno("setrlimit(RLIMIT_NPROC)");
            }
        }
    }
    if let Err(e) = install_filters(filters) {
        return e;
    }
    // CAP_SYS_ADMIN was for the filters only.
    // SAFETY: plain prctl with integer arguments.
    if unsafe { prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) } != 0 {
        return last_errno("drop CAP_SYS_ADMIN");
    }
    if let Err(e) = set_caps(KEPT_CAPS.iter().fold(0u64, |m, c| m | 1 << c)) {
        return e;
    }
    // SAFETY: these calls read the arrays and strings we pass.
    unsafe {
        if setgroups(user.groups.len(), user.groups.as_ptr()) != 0 {
            return last_errno("setgroups");
        }
        if setresgid(user.gid, user.gid, user.gid) != 0 {
            return last_errno("setgid");
        }
        if setresuid(user.uid, user.uid, user.uid) != 0 {
            return last_errno("setuid");
        }
        let Ok(c_cwd) = CString::new(cwd.as_str()) else {
            return "a NUL byte in the working directory".into();
        };
        if chdir(c_cwd.as_ptr()) != 0 {
            return last_errno(&format!("cannot enter the working directory {cwd}"));
        }
    }
    let to_c = |v: &[String]| -> Option<Vec<CString>> {
        v.iter().map(|s| CString::new(s.as_str()).ok()).collect()
    };
    let (Some(c_argv), Some(c_env), Ok(c_prog)) =
        (to_c(argv), to_c(&env), CString::new(program.as_str()))
    else {
        return "an argument with a NUL byte".into();
    };
    let mut p_argv: Vec<*const i8> = c_argv.iter().map(|c| c.as_ptr()).collect();
    p_argv.push(std::ptr::null());
    let mut p_env: Vec<*const i8> = c_env.iter().map(|c| c.as_ptr()).collect();
    p_env.push(std::ptr::null());
    // SAFETY: null-terminated arrays of valid C strings.
    unsafe { execve(c_prog.as_ptr(), p_argv.as_ptr(), p_env.as_ptr()) };
    last_errno(&format!("cannot run {program}"))
}

/// The filters file: for each program, its instruction count (u32, native
/// endian) and its instructions (8 bytes each), in the order they are installed.
fn install_filters(path: &str) -> Result<(), String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the seccomp filters {path}: {e}"))?;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let (len, tail) = rest.split_at(4.min(rest.len()));
        let n = u32::from_ne_bytes(len.try_into().map_err(|_| "a truncated filter")?) as usize;
        if tail.len() < n * 8 || n == 0 || n > 4096 {
            return Err(format!("the seccomp filters in {path} are damaged"));
        }
        let (prog, next) = tail.split_at(n * 8);
        // Copied into u64s so that the instructions are aligned.
        let insns: Vec<u64> = prog
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        #[repr(C)]
        struct SockFprog {
            len: u16,
            filter: *const c_void,
        }
        let fprog = SockFprog {
            len: n as u16,
            filter: insns.as_ptr().cast(),
        };
        // SAFETY: seccomp(2) reads the program we describe.
        if unsafe { syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0 as c_long, &fprog) } != 0 {
            return Err(last_errno("seccomp"));
        }
        rest = next;
    }
    Ok(())
}

/// capset(2), v3: effective and permitted sets of `caps` (less what we
/// lack: runsc withholds CAP_NET_RAW, for one), no inheritable ones.
fn set_caps(caps: u64) -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut now = [0u32; 6];
    // SAFETY: capget writes a v3 header's two data structs, which `now` holds.
    if unsafe { syscall(SYS_CAPGET, &header, now.as_mut_ptr()) } != 0 {
        return Err(last_errno("capget"));
    }
    let permitted = u64::from(now[1]) | u64::from(now[4]) << 32;
    let caps = caps & permitted;
    let (lo, hi) = (caps as u32, (caps >> 32) as u32);
    let data: [u32; 6] = [lo, lo, 0, hi, hi, 0];
    // SAFETY: capset reads a v3 header and two data structs, which these are.
    if unsafe { syscall(SYS_CAPSET, &header, data.as_ptr()) } != 0 {
        return Err(last_errno("capset"));
    }
    Ok(())
}

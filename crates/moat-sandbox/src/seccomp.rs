//! The seccomp policy, an allow-list kept as data in `seccomp.json` and
//! compiled to BPF with seccompiler when a sandbox starts.
//!
//! The file is read in full: an unknown field, a syscall allowed twice, a
//! syscall both allowed and refused outright, two errnos for one syscall or
//! a value that does not fit its argument is an error, and the default
//! action is the file's. A call is decided in this order: a refusal that
//! matches fails it with its errno; else a call the file allows runs; else
//! the default action applies (ENOSYS in moat's file, so that programs take
//! an unknown call for one the kernel lacks and fall back).
//!
//! seccompiler gives each filter one action on a match and one otherwise,
//! so the policy becomes several filters, which the kernel runs together:
//! the allow filter (allowed calls, and the calls that refusals name, run;
//! anything else gets the default), then one filter per refusal errno (its
//! refusals get the errno; anything else runs), then on x86_64 the x32
//! refusal. The kernel takes the most severe result, and among errnos that
//! of the filter installed last: a refusal overrides the allow filter's
//! default. The unit tests run the compiled programs through a BPF
//! interpreter and check every verdict against the file.
//!
//! We install the filters ourselves rather than with seccompiler's
//! `apply_filter`, which also sets `no_new_privs`: that would break the
//! template's passwordless `sudo` to the sandbox's own root. Installing a
//! filter without `no_new_privs` takes CAP_SYS_ADMIN in the current user
//! namespace, which the sandbox's init holds.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

const POLICY: &str = include_str!("seccomp.json");

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("this CPU architecture has no seccomp policy in moat")]
    UnsupportedArch,
    #[error("the seccomp policy does not compile: {0}")]
    Compile(String),
    #[error("could not install the seccomp filter: {0}")]
    Install(io::Error),
}

fn bad(msg: impl Into<String>) -> SeccompError {
    SeccompError::Compile(msg.into())
}

// The file, as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Free text for the reader.
    #[serde(default)]
    #[allow(dead_code)]
    comment: Vec<String>,
    default: Action,
    allow: Vec<AllowGroup>,
    refuse: Vec<Refusal>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Allow,
    Errno(u32),
    KillProcess,
    KillThread,
    Trap,
    Log,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowGroup {
    group: String,
    syscalls: Vec<Allowed>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Allowed {
    syscall: String,
    why: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refusal {
    why: String,
    errno: u32,
    syscalls: Vec<String>,
    /// Alternatives, each a list of conditions that must all hold; absent:
    /// every call.
    #[serde(default)]
    when: Option<Vec<Vec<Cond>>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cond {
    index: u8,
    #[serde(rename = "type")]
    width: Width,
    op: Op,
    val: Num,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Width {
    Dword,
    Qword,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Every bit of `val` is set.
    AllSet,
    /// `(arg & mask) == val`.
    MaskedEq(Num),
}

/// A number, as a JSON number or a string in decimal, `0x` hex or `0o` octal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NumRepr")]
struct Num(u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum NumRepr {
    Int(u64),
    Text(String),
}

impl TryFrom<NumRepr> for Num {
    type Error = String;
    fn try_from(r: NumRepr) -> Result<Num, String> {
        let s = match r {
            NumRepr::Int(n) => return Ok(Num(n)),
            NumRepr::Text(s) => s,
        };
        let parsed = if let Some(h) = s.strip_prefix("0x") {
            u64::from_str_radix(h, 16)
        } else if let Some(o) = s.strip_prefix("0o") {
            u64::from_str_radix(o, 8)
        } else {
            s.parse()
        };
        parsed.map(Num).map_err(|_| format!("not a number: {s:?}"))
    }
}

// The file, checked: what happens to each syscall it names.

struct Policy {
    default: Action,
    calls: BTreeMap<String, CallPlan>,
    /// The refusal errnos, in the order the file first gives them.
    errnos: Vec<u32>,
}

#[derive(Default)]
struct CallPlan {
    allowed: bool,
    refused: Option<Refused>,
}

struct Refused {
    errno: u32,
    /// Alternatives of conditions that must all hold; empty: every call.
    when: Vec<Vec<Cond>>,
}

const MAX_ERRNO: u32 = 4095;

fn check_errno(errno: u32, what: &str) -> Result<(), SeccompError> {
    if errno == 0 || errno > MAX_ERRNO {
        return Err(bad(format!(
            "{what}: errno {errno} is not between 1 and {MAX_ERRNO}"
        )));
    }
    Ok(())
}

fn check_cond(c: &Cond, name: &str) -> Result<(), SeccompError> {
    let what = || format!("a condition on {name}'s argument {}", c.index);
    if c.index > 5 {
        return Err(bad(format!("{}: there are six arguments, 0 to 5", what())));
    }
    if c.width == Width::Dword {
        let mask = match c.op {
            Op::MaskedEq(m) => m.0,
            _ => 0,
        };
        if c.val.0 > u64::from(u32::MAX) || mask > u64::from(u32::MAX) {
            return Err(bad(format!(
                "{}: a value over 32 bits in a dword comparison",
                what()
            )));
        }
    }
    if let Op::MaskedEq(mask) = c.op {
        if c.val.0 & !mask.0 != 0 {
            return Err(bad(format!(
                "{}: masked_eq with bits outside the mask never matches",
                what()
            )));
        }
    }
    Ok(())
}

fn parse(text: &str) -> Result<Policy, SeccompError> {
    let file: PolicyFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if let Action::Errno(e) = file.default {
        check_errno(e, "the default action")?;
    }
    let mut calls: BTreeMap<String, CallPlan> = BTreeMap::new();
    for group in &file.allow {
        if group.group.trim().is_empty() || group.syscalls.is_empty() {
            return Err(bad("an allow group needs a name and syscalls"));
        }
        for a in &group.syscalls {
            if a.why.trim().is_empty() {
                return Err(bad(format!("{} is allowed without a reason", a.syscall)));
            }
            let plan = calls.entry(a.syscall.clone()).or_default();
            if plan.allowed {
                return Err(bad(format!("{} is allowed twice", a.syscall)));
            }
            plan.allowed = true;
        }
    }
    let mut errnos = vec![];
    for r in &file.refuse {
        if r.why.trim().is_empty() || r.syscalls.is_empty() {
            return Err(bad("a refusal needs a reason and syscalls"));
        }
        check_errno(r.errno, &r.why)?;
        if !errnos.contains(&r.errno) {
            errnos.push(r.errno);
        }
        let when = match &r.when {
            None => vec![],
            Some(alts) if alts.is_empty() || alts.iter().any(Vec::is_empty) => {
                return Err(bad(format!(
                    "{:?}: an empty 'when' or alternative (leave 'when' out to refuse every call)",
                    r.syscalls
                )))
            }
            Some(alts) => alts.clone(),
        };
        for name in &r.syscalls {
            for c in when.iter().flatten() {
                check_cond(c, name)?;
            }
            let plan = calls.entry(name.clone()).or_default();
            match &mut plan.refused {
                None => {
                    plan.refused = Some(Refused {
                        errno: r.errno,
                        when: when.clone(),
                    })
                }
                Some(prev) if prev.errno != r.errno => {
                    return Err(bad(format!(
                        "{name} is refused with errno {} and with errno {}",
                        prev.errno, r.errno
                    )))
                }
                Some(prev) if prev.when.is_empty() || when.is_empty() => {
                    return Err(bad(format!("{name} is refused outright and again")))
                }
                Some(prev) => prev.when.extend(when.iter().cloned()),
            }
            if plan.allowed && plan.refused.as_ref().is_some_and(|r| r.when.is_empty()) {
                return Err(bad(format!("{name} is both allowed and refused outright")));
            }
        }
    }
    Ok(Policy {
        default: file.default,
        calls,
        errnos,
    })
}

// Syscall numbers.

/// Syscall numbers by name, from libc: the names both architectures have,
/// then those libc gives for x86_64 only (its legacy calls, and a few that
/// libc's aarch64 table leaves out, which `EXTRA_ARCH` adds back).
macro_rules! syscall_table {
    ([$($name:ident),* $(,)?], [$($x86:ident),* $(,)?]) => {
        fn libc_number(name: &str) -> Option<i64> {
            match name {
                $(stringify!($name) => Some(libc::$name as i64),)*
                $(#[cfg(target_arch = "x86_64")] stringify!($x86) => Some(libc::$x86 as i64),)*
                _ => None,
            }
        }
    };
}

syscall_table!(
    [
        SYS_accept,
        SYS_accept4,
        SYS_acct,
        SYS_add_key,
        SYS_adjtimex,
        SYS_bind,
        SYS_bpf,
        SYS_brk,
        SYS_capget,
        SYS_capset,
        SYS_chdir,
        SYS_chroot,
        SYS_clock_adjtime,
        SYS_clock_getres,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_clock_settime,
        SYS_clone,
        SYS_clone3,
        SYS_close,
        SYS_close_range,
        SYS_connect,
        SYS_copy_file_range,
        SYS_delete_module,
        SYS_dup,
        SYS_dup3,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd2,
        SYS_execve,
        SYS_execveat,
        SYS_exit,
        SYS_exit_group,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_fadvise64,
        SYS_fallocate,
        SYS_fanotify_init,
        SYS_fanotify_mark,
        SYS_fchdir,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
        SYS_fcntl,
        SYS_fdatasync,
        SYS_fgetxattr,
        SYS_finit_module,
        SYS_flistxattr,
        SYS_flock,
        SYS_fremovexattr,
        SYS_fsconfig,
        SYS_fsetxattr,
        SYS_fsmount,
        SYS_fsopen,
        SYS_fspick,
        SYS_fstat,
        SYS_fstatfs,
        SYS_fsync,
        SYS_ftruncate,
        SYS_futex,
        SYS_futex_waitv,
        SYS_get_mempolicy,
        SYS_get_robust_list,
        SYS_getcpu,
        SYS_getcwd,
        SYS_getdents64,
        SYS_getegid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getgroups,
        SYS_getitimer,
        SYS_getpeername,
        SYS_getpgid,
        SYS_getpid,
        SYS_getppid,
        SYS_getpriority,
        SYS_getrandom,
        SYS_getresgid,
        SYS_getresuid,
        SYS_getrusage,
        SYS_getsid,
        SYS_getsockname,
        SYS_getsockopt,
        SYS_gettid,
        SYS_gettimeofday,
        SYS_getuid,
        SYS_getxattr,
        SYS_init_module,
        SYS_inotify_add_watch,
        SYS_inotify_init1,
        SYS_inotify_rm_watch,
        SYS_io_cancel,
        SYS_io_destroy,
        SYS_io_getevents,
        SYS_io_setup,
        SYS_io_submit,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_io_uring_setup,
        SYS_ioctl,
        SYS_ioprio_get,
        SYS_ioprio_set,
        SYS_kcmp,
        SYS_kexec_file_load,
        SYS_kexec_load,
        SYS_keyctl,
        SYS_kill,
        SYS_landlock_add_rule,
        SYS_landlock_create_ruleset,
        SYS_landlock_restrict_self,
        SYS_lgetxattr,
        SYS_linkat,
        SYS_listen,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_lookup_dcookie,
        SYS_lremovexattr,
        SYS_lseek,
        SYS_lsetxattr,
        SYS_madvise,
        SYS_mbind,
        SYS_membarrier,
        SYS_memfd_create,
        SYS_memfd_secret,
        SYS_migrate_pages,
        SYS_mincore,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_mlock,
        SYS_mlock2,
        SYS_mlockall,
        SYS_mmap,
        SYS_mount,
        SYS_mount_setattr,
        SYS_move_mount,
        SYS_move_pages,
        SYS_mprotect,
        SYS_mq_getsetattr,
        SYS_mq_notify,
        SYS_mq_open,
        SYS_mq_timedreceive,
        SYS_mq_timedsend,
        SYS_mq_unlink,
        SYS_mremap,
        SYS_mseal,
        SYS_msgctl,
        SYS_msgget,
        SYS_msgrcv,
        SYS_msgsnd,
        SYS_msync,
        SYS_munlock,
        SYS_munlockall,
        SYS_munmap,
        SYS_name_to_handle_at,
        SYS_nanosleep,
        SYS_newfstatat,
        SYS_nfsservctl,
        SYS_open_by_handle_at,
        SYS_open_tree,
        SYS_openat,
        SYS_openat2,
        SYS_perf_event_open,
        SYS_personality,
        SYS_pidfd_getfd,
        SYS_pidfd_open,
        SYS_pidfd_send_signal,
        SYS_pipe2,
        SYS_pivot_root,
        SYS_pkey_alloc,
        SYS_pkey_free,
        SYS_pkey_mprotect,
        SYS_ppoll,
        SYS_prctl,
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_prlimit64,
        SYS_process_madvise,
        SYS_process_mrelease,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_pselect6,
        SYS_ptrace,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_quotactl,
        SYS_quotactl_fd,
        SYS_read,
        SYS_readahead,
        SYS_readlinkat,
        SYS_readv,
        SYS_reboot,
        SYS_recvfrom,
        SYS_recvmmsg,
        SYS_recvmsg,
        SYS_remap_file_pages,
        SYS_removexattr,
        SYS_renameat2,
        SYS_request_key,
        SYS_restart_syscall,
        SYS_rseq,
        SYS_rt_sigaction,
        SYS_rt_sigpending,
        SYS_rt_sigprocmask,
        SYS_rt_sigqueueinfo,
        SYS_rt_sigreturn,
        SYS_rt_sigsuspend,
        SYS_rt_sigtimedwait,
        SYS_rt_tgsigqueueinfo,
        SYS_sched_get_priority_max,
        SYS_sched_get_priority_min,
        SYS_sched_getaffinity,
        SYS_sched_getattr,
        SYS_sched_getparam,
        SYS_sched_getscheduler,
        SYS_sched_rr_get_interval,
        SYS_sched_setaffinity,
        SYS_sched_setattr,
        SYS_sched_setparam,
        SYS_sched_setscheduler,
        SYS_sched_yield,
        SYS_seccomp,
        SYS_semctl,
        SYS_semget,
        SYS_semop,
        SYS_semtimedop,
        SYS_sendfile,
        SYS_sendmmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_set_mempolicy,
        SYS_set_mempolicy_home_node,
        SYS_set_robust_list,
        SYS_set_tid_address,
        SYS_setdomainname,
        SYS_setfsgid,
        SYS_setfsuid,
        SYS_setgid,
        SYS_setgroups,
        SYS_sethostname,
        SYS_setitimer,
        SYS_setns,
        SYS_setpgid,
        SYS_setpriority,
        SYS_setregid,
        SYS_setresgid,
        SYS_setresuid,
        SYS_setreuid,
        SYS_setsid,
        SYS_setsockopt,
        SYS_settimeofday,
        SYS_setuid,
        SYS_setxattr,
        SYS_shmat,
        SYS_shmctl,
        SYS_shmdt,
        SYS_shmget,
        SYS_shutdown,
        SYS_sigaltstack,
        SYS_signalfd4,
        SYS_socket,
        SYS_socketpair,
        SYS_splice,
        SYS_statfs,
        SYS_statx,
        SYS_swapoff,
        SYS_swapon,
        SYS_symlinkat,
        SYS_sync,
        SYS_syncfs,
        SYS_sysinfo,
        SYS_syslog,
        SYS_tee,
        SYS_tgkill,
        SYS_timer_create,
        SYS_timer_delete,
        SYS_timer_getoverrun,
        SYS_timer_gettime,
        SYS_timer_settime,
        SYS_timerfd_create,
        SYS_timerfd_gettime,
        SYS_timerfd_settime,
        SYS_times,
        SYS_tkill,
        SYS_truncate,
        SYS_umask,
        SYS_umount2,
        SYS_uname,
        SYS_unlinkat,
        SYS_unshare,
        SYS_userfaultfd,
        SYS_utimensat,
        SYS_vhangup,
        SYS_vmsplice,
        SYS_wait4,
        SYS_waitid,
        SYS_write,
        SYS_writev,
    ],
    [
        SYS__sysctl,
        SYS_access,
        SYS_afs_syscall,
        SYS_alarm,
        SYS_arch_prctl,
        SYS_chmod,
        SYS_chown,
        SYS_creat,
        SYS_dup2,
        SYS_epoll_create,
        SYS_epoll_ctl_old,
        SYS_epoll_wait,
        SYS_epoll_wait_old,
        SYS_eventfd,
        SYS_fchmodat2,
        SYS_fork,
        SYS_futimesat,
        SYS_get_thread_area,
        SYS_getdents,
        SYS_getpgrp,
        SYS_getpmsg,
        SYS_getrlimit,
        SYS_inotify_init,
        SYS_ioperm,
        SYS_iopl,
        SYS_lchown,
        SYS_link,
        SYS_lstat,
        SYS_mkdir,
        SYS_mknod,
        SYS_modify_ldt,
        SYS_open,
        SYS_pause,
        SYS_pipe,
        SYS_poll,
        SYS_putpmsg,
        SYS_readlink,
        SYS_rename,
        SYS_renameat,
        SYS_rmdir,
        SYS_security,
        SYS_select,
        SYS_set_thread_area,
        SYS_setrlimit,
        SYS_signalfd,
        SYS_stat,
        SYS_symlink,
        SYS_sync_file_range,
        SYS_sysfs,
        SYS_time,
        SYS_tuxcall,
        SYS_unlink,
        SYS_uselib,
        SYS_ustat,
        SYS_utime,
        SYS_utimes,
        SYS_vfork,
        SYS_vserver,
    ]
);

/// Calls the libc crate has no number for, being newer than its tables:
/// from 424 on, every architecture numbers its calls alike (the kernel's
/// `scripts/syscall.tbl`).
const EXTRA: &[(&str, i64)] = &[
    ("cachestat", 451),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
];

/// And those of one architecture (`arch/x86/entry/syscalls/syscall_64.tbl`;
/// for aarch64, `include/uapi/asm-generic/unistd.h`, of which libc's table
/// leaves a few out).
#[cfg(target_arch = "x86_64")]
const EXTRA_ARCH: &[(&str, i64)] = &[("io_pgetevents", 333), ("uretprobe", 335), ("uprobe", 336)];
#[cfg(target_arch = "aarch64")]
const EXTRA_ARCH: &[(&str, i64)] = &[
    ("renameat", 38),
    ("sync_file_range", 84),
    ("getrlimit", 163),
    ("setrlimit", 164),
    ("io_pgetevents", 292),
    ("fchmodat2", 452),
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const EXTRA_ARCH: &[(&str, i64)] = &[];

/// The number of `name` on this architecture, if it has the call.
fn syscall_number(name: &str) -> Option<i64> {
    EXTRA_ARCH
        .iter()
        .chain(EXTRA)
        .find(|(n, _)| *n == name)
        .map(|(_, nr)| *nr)
        .or_else(|| libc_number(&format!("SYS_{name}")))
}

// Compiling.

fn target_arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        _ => Err(SeccompError::UnsupportedArch),
    }
}

fn seccomp_action(a: Action) -> SeccompAction {
    match a {
        Action::Allow => SeccompAction::Allow,
        Action::Errno(e) => SeccompAction::Errno(e),
        Action::KillProcess => SeccompAction::KillProcess,
        Action::KillThread => SeccompAction::KillThread,
        Action::Trap => SeccompAction::Trap,
        Action::Log => SeccompAction::Log,
    }
}

fn compile_err(e: seccompiler::BackendError) -> SeccompError {
    bad(e.to_string())
}

/// seccompiler's rules for a list of alternatives; none: every call.
fn rules(alternatives: &[Vec<Cond>]) -> Result<Vec<SeccompRule>, SeccompError> {
    alternatives
        .iter()
        .map(|conds| {
            let conds = conds
                .iter()
                .map(|c| {
                    let len = match c.width {
                        Width::Dword => SeccompCmpArgLen::Dword,
                        Width::Qword => SeccompCmpArgLen::Qword,
                    };
                    let op = match c.op {
                        Op::Eq => SeccompCmpOp::Eq,
                        Op::Ne => SeccompCmpOp::Ne,
                        Op::Lt => SeccompCmpOp::Lt,
                        Op::Le => SeccompCmpOp::Le,
                        Op::Gt => SeccompCmpOp::Gt,
                        Op::Ge => SeccompCmpOp::Ge,
                        Op::AllSet => SeccompCmpOp::MaskedEq(c.val.0),
                        Op::MaskedEq(m) => SeccompCmpOp::MaskedEq(m.0),
                    };
                    SeccompCondition::new(c.index, len, op, c.val.0).map_err(compile_err)
                })
                .collect::<Result<Vec<_>, _>>()?;
            SeccompRule::new(conds).map_err(compile_err)
        })
        .collect()
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(compile_err)?;
    BpfProgram::try_from(filter).map_err(compile_err)
}

/// The filters of a checked policy, in the order to install them: the
/// allow filter (none when the default is to allow), then one per refusal
/// errno. Names this architecture lacks are skipped.
fn compile_policy(policy: &Policy, arch: TargetArch) -> Result<Vec<BpfProgram>, SeccompError> {
    let numbered: Vec<(i64, &CallPlan)> = policy
        .calls
        .iter()
        .filter_map(|(name, plan)| syscall_number(name).map(|nr| (nr, plan)))
        .collect();
    let mut filters = vec![];
    if policy.default != Action::Allow {
        // Allowed calls run; so do the calls a refusal matches, for the
        // refusal's filter to decide; anything else gets the default.
        let mut map = BTreeMap::new();
        for (nr, plan) in &numbered {
            let chain = match (&plan.refused, plan.allowed) {
                (_, true) => vec![],
                (Some(r), false) => rules(&r.when)?,
                (None, false) => continue,
            };
            map.insert(*nr, chain);
        }
        filters.push(build(
            map,
            seccomp_action(policy.default),
            SeccompAction::Allow,
            arch,
        )?);
    }
    for &errno in &policy.errnos {
        let mut map = BTreeMap::new();
        for (nr, plan) in &numbered {
            if let Some(r) = plan.refused.as_ref().filter(|r| r.errno == errno) {
                map.insert(*nr, rules(&r.when)?);
            }
        }
        if !map.is_empty() {
            filters.push(build(
                map,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                arch,
            )?);
        }
    }
    Ok(filters)
}

/// The policy's filters compiled for this machine, in the order to install them.
pub fn compile() -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target_arch()?;
    let mut filters = compile_policy(&parse(POLICY)?, arch)?;
    if cfg!(target_arch = "x86_64") {
        filters.push(no_x32());
    }
    Ok(filters)
}

/// On x86_64, x32 system calls carry the architecture of 64-bit calls and
/// their number with bit 30 set: no rule above names such a number, so
/// each would pass every argument check. They are refused (ENOSYS) as a
/// whole, whatever the file's default. seccompiler has no way to say this;
/// the filter is seven instructions of classic BPF over `seccomp_data` (nr
/// at 0, arch at 4).
fn no_x32() -> BpfProgram {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_BIT: u32 = 0x4000_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code: u16, jt: u8, jf: u8, k: u32| seccompiler::sock_filter { code, jt, jf, k };
    // BPF_LD|BPF_W|BPF_ABS = 0x20, BPF_JMP|BPF_JEQ|BPF_K = 0x15,
    // BPF_JMP|BPF_JGE|BPF_K = 0x35, BPF_RET|BPF_K = 0x06.
    vec![
        op(0x20, 0, 0, 4),
        op(0x15, 1, 0, AUDIT_ARCH_X86_64),
        op(0x06, 0, 0, RET_ALLOW),
        op(0x20, 0, 0, 0),
        op(0x35, 0, 1, X32_BIT),
        op(0x06, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
        op(0x06, 0, 0, RET_ALLOW),
    ]
}

/// Install `filters` on the calling thread; its children inherit them.
pub fn install(filters: &[BpfProgram]) -> Result<(), SeccompError> {
    for prog in filters {
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program out of `fprog`, which outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError::Install(io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The compiled filters are run here by a small classic-BPF interpreter
    //! (a test double of the kernel's), on synthetic `seccomp_data`, and
    //! every verdict is compared, as a whole return value, with what the
    //! file says.

    use super::*;
    use std::collections::BTreeSet;

    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    const RET_KILL_THREAD: u32 = 0x0000_0000;
    const RET_TRAP: u32 = 0x0003_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_LOG: u32 = 0x7ffc_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = RET_ERRNO | 1;
    const ENOSYS: u32 = RET_ERRNO | 38;

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    /// i386, which a 64-bit x86 process reaches through `int 0x80`.
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const X32_BIT: i64 = 0x4000_0000;

    // The test double: the kernel's side.

    /// `struct seccomp_data` as the kernel lays it out, in native byte order.
    fn seccomp_data(nr: i64, arch: u32, args: &[u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        d[8..16].copy_from_slice(&0x7f00_dead_beefu64.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        d
    }

    /// Run one classic-BPF program as the kernel would: the instructions
    /// seccomp allows (loads from `seccomp_data`, ALU and jumps with
    /// constants, returns); anything else, or a jump out of the program, fails
    /// the test.
    fn run_bpf(prog: &[seccompiler::sock_filter], data: &[u8; 64]) -> u32 {
        assert!(
            !prog.is_empty() && prog.len() <= 4096,
            "program length {}",
            prog.len()
        );
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let mut mem = [0u32; 16];
        loop {
            let ins = prog
                .get(pc)
                .unwrap_or_else(|| panic!("ran off the program at {pc}"));
            let k = ins.k;
            let jump = |cond: bool| pc + 1 + usize::from(if cond { ins.jt } else { ins.jf });
            pc = match ins.code {
                // BPF_LD|BPF_W|BPF_ABS
                0x20 => {
                    let k = k as usize;
                    assert!(k.is_multiple_of(4) && k + 4 <= 64, "load at {k}");
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                    pc + 1
                }
                // BPF_LD|BPF_IMM, BPF_LDX|BPF_IMM, BPF_LD|BPF_MEM, BPF_ST, BPF_MISC|BPF_TAX/TXA
                0x00 => {
                    a = k;
                    pc + 1
                }
                0x01 => {
                    x = k;
                    pc + 1
                }
                0x60 => {
                    a = mem[k as usize];
                    pc + 1
                }
                0x02 => {
                    mem[k as usize] = a;
                    pc + 1
                }
                0x07 => {
                    x = a;
                    pc + 1
                }
                0x87 => {
                    a = x;
                    pc + 1
                }
                // BPF_ALU|op|BPF_K
                0x04 => {
                    a = a.wrapping_add(k);
                    pc + 1
                }
                0x14 => {
                    a = a.wrapping_sub(k);
                    pc + 1
                }
                0x44 => {
                    a |= k;
                    pc + 1
                }
                0x54 => {
                    a &= k;
                    pc + 1
                }
                0x64 => {
                    a = a.checked_shl(k).unwrap_or(0);
                    pc + 1
                }
                0x74 => {
                    a = a.checked_shr(k).unwrap_or(0);
                    pc + 1
                }
                // BPF_JMP: JA, JEQ, JGT, JGE, JSET with a constant
                0x05 => pc + 1 + k as usize,
                0x15 => jump(a == k),
                0x25 => jump(a > k),
                0x35 => jump(a >= k),
                0x45 => jump(a & k != 0),
                // BPF_RET|BPF_K, BPF_RET|BPF_A
                0x06 => return k,
                0x16 => return a,
                code => panic!("instruction {code:#x} at {pc} is not one seccomp runs"),
            };
            assert!(pc < prog.len(), "a jump leaves the program");
        }
    }

    /// The kernel's verdict over a stack of filters (`seccomp_run_filters`):
    /// the most severe action wins (compared as signed numbers, KILL_PROCESS
    /// first, ALLOW last); among equals, that of the filter installed last.
    fn kernel_verdict(filters: &[BpfProgram], nr: i64, arch: u32, args: &[u64; 6]) -> u32 {
        let data = seccomp_data(nr, arch, args);
        let severity = |ret: u32| (ret & 0xffff_0000) as i32;
        let mut verdict = RET_ALLOW;
        for f in filters.iter().rev() {
            let ret = run_bpf(f, &data);
            if severity(ret) < severity(verdict) {
                verdict = ret;
            }
        }
        verdict
    }

    // The file's side: what it says, evaluated straight from its text.

    fn ret_of(a: Action) -> u32 {
        match a {
            Action::Allow => RET_ALLOW,
            Action::Errno(e) => RET_ERRNO | e,
            Action::KillProcess => RET_KILL_PROCESS,
            Action::KillThread => RET_KILL_THREAD,
            Action::Trap => RET_TRAP,
            Action::Log => RET_LOG,
        }
    }

    fn holds(c: &Cond, args: &[u64; 6]) -> bool {
        let arg = args[usize::from(c.index)];
        let a = match c.width {
            Width::Dword => arg & u64::from(u32::MAX),
            Width::Qword => arg,
        };
        let v = c.val.0;
        match c.op {
            Op::Eq => a == v,
            Op::Ne => a != v,
            Op::Lt => a < v,
            Op::Le => a <= v,
            Op::Gt => a > v,
            Op::Ge => a >= v,
            Op::AllSet => a & v == v,
            Op::MaskedEq(m) => a & m.0 == v,
        }
    }

    /// What the file says of a call by name (`None`: a call it does not name).
    fn file_verdict(policy: &Policy, name: Option<&str>, args: &[u64; 6]) -> u32 {
        let Some(plan) = name.and_then(|n| policy.calls.get(n)) else {
            return ret_of(policy.default);
        };
        if let Some(r) = &plan.refused {
            if r.when.is_empty() || r.when.iter().any(|alt| alt.iter().all(|c| holds(c, args))) {
                return RET_ERRNO | r.errno;
            }
        }
        if plan.allowed {
            RET_ALLOW
        } else {
            ret_of(policy.default)
        }
    }

    /// On x86_64, numbers from bit 30 up (x32's, and any larger) meet the
    /// x32 filter's ENOSYS, unless the file's default is harsher.
    fn x32_verdict(default: Action) -> u32 {
        let default = ret_of(default);
        if ((default & 0xffff_0000) as i32) < (RET_ERRNO as i32) {
            default
        } else {
            ENOSYS
        }
    }

    /// Argument values around every condition the file puts on a call:
    /// each value, its neighbours, each bit of a mask alone and cleared,
    /// the extremes, and (for dword comparisons) the same with the upper
    /// half set, which the comparison must ignore.
    fn candidates(conds: &[&Cond]) -> BTreeMap<usize, BTreeSet<u64>> {
        let mut out: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for c in conds {
            let v = c.val.0;
            let mut s: BTreeSet<u64> = [
                v,
                v.wrapping_add(1),
                v.wrapping_sub(1),
                0,
                1,
                u64::MAX,
                u64::from(u32::MAX),
                v << 1,
                v >> 1,
                !v,
            ]
            .into();
            let mask = match c.op {
                Op::AllSet => v,
                Op::MaskedEq(m) => m.0,
                _ => 0,
            };
            for b in (0..64).filter(|b| mask & (1 << b) != 0) {
                s.insert(1 << b);
                s.insert(v & !(1 << b));
                s.insert(v | (1 << b));
            }
            if mask != 0 {
                s.insert(mask);
                s.insert(!mask);
                s.insert(v | !mask);
            }
            if c.width == Width::Dword {
                let high: Vec<u64> = s.iter().map(|x| x | 0xdead_beef_0000_0000).collect();
                s.extend(high);
            }
            out.entry(usize::from(c.index)).or_default().extend(s);
        }
        out
    }

    /// Argument vectors for a call: zeros, ones, and the cartesian product
    /// of the candidates of every argument the file looks at.
    fn arg_cases(plan: Option<&CallPlan>) -> Vec<[u64; 6]> {
        let mut cases = vec![[0; 6], [u64::MAX; 6], [17, 0, 0, 0, 0, 0]];
        let conds: Vec<&Cond> = plan
            .and_then(|p| p.refused.as_ref())
            .map(|r| r.when.iter().flatten().collect())
            .unwrap_or_default();
        for (index, values) in candidates(&conds) {
            let mut next = vec![];
            for case in &cases {
                for v in &values {
                    let mut c = *case;
                    c[index] = *v;
                    next.push(c);
                }
            }
            cases.extend(next);
        }
        cases.sort();
        cases.dedup();
        cases
    }

    /// Compile `text` as `compile()` does and compare every verdict with the
    /// file's: each call it names with arguments around its conditions,
    /// every number up to 1100 and a few beyond, x32 numbers and another
    /// architecture's calls. Returns how many cases it compared.
    fn check_compiled_against_file(text: &str) -> usize {
        let policy = parse(text).unwrap();
        let mut filters = compile_policy(&policy, target_arch().unwrap()).unwrap();
        if cfg!(target_arch = "x86_64") {
            filters.push(no_x32());
        }
        let by_number: BTreeMap<i64, &str> = policy
            .calls
            .keys()
            .filter_map(|n| syscall_number(n).map(|nr| (nr, n.as_str())))
            .collect();
        let mut numbers: BTreeSet<i64> = (0..1100).collect();
        numbers.extend([0x3fff_ffff, 0x7fff_ffff, -1, i64::from(i32::MIN)]);
        numbers.extend(by_number.keys());
        let mut compared = 0;
        for nr in numbers {
            let name = by_number.get(&nr).copied();
            for args in arg_cases(name.and_then(|n| policy.calls.get(n))) {
                let got = kernel_verdict(&filters, nr, AUDIT_ARCH, &args);
                let want = if cfg!(target_arch = "x86_64") && nr as u32 >= X32_BIT as u32 {
                    x32_verdict(policy.default)
                } else {
                    file_verdict(&policy, name, &args)
                };
                assert_eq!(
                    got, want,
                    "syscall {nr} ({name:?}) with {args:x?}: the filter says {got:#x}, the file {want:#x}"
                );
                compared += 1;
            }
        }
        for nr in [0, 39, 56, 101, 165, 435, 1000] {
            if cfg!(target_arch = "x86_64") {
                let got = kernel_verdict(&filters, nr | X32_BIT, AUDIT_ARCH, &[0; 6]);
                assert_eq!(got, x32_verdict(policy.default), "x32 call {nr}");
            }
            // Another architecture's calls end the process.
            let got = kernel_verdict(&filters, nr, AUDIT_ARCH_I386, &[0; 6]);
            assert_eq!(got, RET_KILL_PROCESS, "i386 call {nr}");
            compared += 2;
        }
        compared
    }

    #[cfg(target_arch = "x86_64")]
    fn names_in(text: &str) -> Vec<String> {
        parse(text).unwrap().calls.into_keys().collect()
    }

    #[test]
    fn the_policy_compiles() {
        let filters = compile().unwrap();
        // The allow filter, EPERM's, ENOSYS's, and on x86_64 the x32 refusal.
        assert_eq!(
            filters.len(),
            if cfg!(target_arch = "x86_64") { 4 } else { 3 }
        );
        assert!(filters.iter().all(|f| !f.is_empty() && f.len() < 4096));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_syscall_in_the_policy_has_a_number_and_no_two_share_one() {
        let names = names_in(POLICY);
        let unknown: Vec<_> = names
            .iter()
            .filter(|n| syscall_number(n).is_none())
            .collect();
        assert_eq!(unknown, Vec::<&String>::new());
        let mut seen: BTreeMap<i64, &str> = BTreeMap::new();
        for n in &names {
            let nr = syscall_number(n).unwrap();
            if let Some(other) = seen.insert(nr, n) {
                panic!("{n} and {other} are both {nr}");
            }
        }
        // The numbers moat supplies agree with libc's where libc has them.
        for (n, nr) in EXTRA.iter().chain(EXTRA_ARCH) {
            if let Some(libc_nr) = libc_number(&format!("SYS_{n}")) {
                assert_eq!(*nr, libc_nr, "{n}");
            }
        }
    }

    #[test]
    fn the_compiled_filter_follows_the_file() {
        let compared = check_compiled_against_file(POLICY);
        assert!(compared > 5_000, "only {compared} cases");
    }

    /// Other defaults and every comparison, on a policy made up for the test.
    #[test]
    fn the_compiled_filter_follows_other_files() {
        let refusals = r#"[
            { "why": "t", "errno": 13, "syscalls": ["getpid", "dup"] },
            { "why": "t", "errno": 22, "syscalls": ["read"],
              "when": [[{ "index": 0, "type": "dword", "op": "lt", "val": 3 }],
                       [{ "index": 2, "type": "qword", "op": "ge", "val": "0x100000000" }]] },
            { "why": "t", "errno": 22, "syscalls": ["write"],
              "when": [[{ "index": 0, "type": "qword", "op": "gt", "val": "0xffffffff" },
                        { "index": 1, "type": "dword", "op": "le", "val": 9 }],
                       [{ "index": 5, "type": "qword", "op": { "masked_eq": "0xf0000000f" }, "val": "0x100000001" }]] },
            { "why": "t", "errno": 7, "syscalls": ["close"],
              "when": [[{ "index": 0, "type": "dword", "op": "ne", "val": 1 },
                        { "index": 0, "type": "dword", "op": "eq", "val": "0o7" }],
                       [{ "index": 3, "type": "dword", "op": "all_set", "val": "0o600" }]] },
            { "why": "t", "errno": 7, "syscalls": ["lseek"],
              "when": [[{ "index": 1, "type": "qword", "op": "le", "val": "0x100000000" }]] }
        ]"#;
        let allow = r#"[{ "group": "g", "syscalls": [
            { "syscall": "read", "why": "t" }, { "syscall": "write", "why": "t" },
            { "syscall": "close", "why": "t" }, { "syscall": "exit_group", "why": "t" } ] }]"#;
        for default in [
            r#"{ "errno": 38 }"#,
            r#"{ "errno": 13 }"#,
            r#""allow""#,
            r#""kill_process""#,
            r#""kill_thread""#,
            r#""trap""#,
            r#""log""#,
        ] {
            let text =
                format!(r#"{{ "default": {default}, "allow": {allow}, "refuse": {refusals} }}"#);
            check_compiled_against_file(&text);
        }
    }

    /// What the issue asks of the policy, spelled out call by call, as whole
    /// return values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_policy_refuses_and_allows_what_it_must() {
        let filters = compile().unwrap();
        let nr = |name: &str| syscall_number(name).unwrap_or_else(|| panic!("{name}"));
        let v = |name: &str, args: &[u64]| {
            let mut a = [0u64; 6];
            a[..args.len()].copy_from_slice(args);
            kernel_verdict(&filters, nr(name), AUDIT_ARCH, &a)
        };
        const SIGCHLD: u64 = 17;
        const THREAD: u64 = 0x3d0f00; // glibc's pthread_create flags
        let cases: &[(&str, &[u64], u32)] = &[
            ("read", &[0, 0, 0], RET_ALLOW),
            ("clone", &[SIGCHLD], RET_ALLOW),
            ("clone", &[THREAD], RET_ALLOW),
            ("clone", &[0x4111], RET_ALLOW), // vfork's CLONE_VM|CLONE_VFORK|SIGCHLD
            ("clone", &[0x1000_0000 | SIGCHLD], EPERM),
            ("clone", &[0x2_0000 | SIGCHLD], EPERM),
            ("clone", &[0x4000_0000 | SIGCHLD], EPERM),
            ("clone", &[0x80 | SIGCHLD], EPERM),
            ("clone3", &[0, 88], ENOSYS),
            ("unshare", &[0], EPERM),
            ("unshare", &[0x400], EPERM),
            ("setns", &[3, 0], EPERM),
            ("mount", &[], EPERM),
            ("open_tree_attr", &[], EPERM),
            ("bpf", &[], EPERM),
            ("keyctl", &[], EPERM),
            ("io_uring_setup", &[], EPERM),
            ("kexec_load", &[], EPERM),
            ("pidfd_getfd", &[], EPERM),
            ("process_madvise", &[], EPERM),
            ("kcmp", &[], EPERM),
            ("quotactl_fd", &[], EPERM),
            ("ptrace", &[16, 1], RET_ALLOW),
            ("personality", &[0], RET_ALLOW),
            ("personality", &[0x8], RET_ALLOW),
            ("personality", &[0x20000], RET_ALLOW),
            ("personality", &[0x20008], RET_ALLOW),
            ("personality", &[0xffff_ffff], RET_ALLOW),
            ("personality", &[u64::MAX], RET_ALLOW),
            ("personality", &[0x040_0000], EPERM), // READ_IMPLIES_EXEC
            ("personality", &[0x004_0000], EPERM), // ADDR_NO_RANDOMIZE
            ("personality", &[0x1_0000_0000], RET_ALLOW), // the kernel reads 0
            ("socket", &[1, 1, 0], RET_ALLOW),
            ("socket", &[2, 3, 1], RET_ALLOW),
            ("socket", &[10, 2, 0], RET_ALLOW),
            ("socket", &[16, 3, 0], RET_ALLOW),
            ("socket", &[17, 3, 0x300], EPERM), // AF_PACKET
            ("socket", &[44, 3, 0], EPERM),     // AF_XDP
            ("socket", &[40, 1, 0], EPERM),     // AF_VSOCK
            ("socket", &[38, 5, 0], EPERM),     // AF_ALG
            ("socket", &[30, 5, 0], EPERM),     // AF_TIPC
            ("socket", &[0x1_0000_0011, 3, 0], EPERM),
            ("socketpair", &[1, 1, 0], RET_ALLOW),
            ("socketpair", &[30, 5, 0], EPERM),
            ("ioctl", &[0, 0x5413], RET_ALLOW), // TIOCGWINSZ
            ("ioctl", &[0, 0x5412], EPERM),     // TIOCSTI
            ("ioctl", &[0, 0x541c], EPERM),     // TIOCLINUX
            ("ioctl", &[0, 0xffff_ffff_0000_5412], EPERM),
            ("chmod", &[0, 0o755], RET_ALLOW),
            ("chmod", &[0, 0o4755], EPERM),
            ("fchmodat", &[0, 0, 0o2755], EPERM),
            ("fchmodat2", &[0, 0, 0o755, 0], ENOSYS),
            ("openat", &[0, 0, 0o101, 0o644], RET_ALLOW),
            ("openat", &[0, 0, 0o101, 0o4755], EPERM),
            ("openat", &[0, 0, 0o2020_0002, 0o6755], EPERM), // O_TMPFILE|O_RDWR
            ("openat", &[0, 0, 0, 0o4755], RET_ALLOW),       // no file is made
            ("openat2", &[0, 0, 0, 24], ENOSYS),
            ("mknodat", &[0, 0, 0o10_0000 | 0o4755, 0], EPERM),
            ("listmount", &[], ENOSYS),
            ("statmount", &[], ENOSYS),
            ("memfd_secret", &[], ENOSYS),
            ("mseal", &[], ENOSYS),
            ("cachestat", &[], ENOSYS),
            ("setxattrat", &[], ENOSYS),
            ("getxattrat", &[], ENOSYS),
            ("listxattrat", &[], ENOSYS),
            ("removexattrat", &[], ENOSYS),
            ("file_getattr", &[], ENOSYS),
            ("file_setattr", &[], ENOSYS),
            ("lsm_get_self_attr", &[], ENOSYS),
            ("lsm_set_self_attr", &[], ENOSYS),
            ("lsm_list_modules", &[], ENOSYS),
            ("landlock_create_ruleset", &[], ENOSYS),
            ("landlock_add_rule", &[], ENOSYS),
            ("landlock_restrict_self", &[], ENOSYS),
            ("get_mempolicy", &[], ENOSYS), // named nowhere
            ("vserver", &[], ENOSYS),
        ];
        for (name, args, want) in cases {
            assert_eq!(v(name, args), *want, "{name}{args:x?}");
        }
        for nr in [1000, 0x3fff_ffff, X32_BIT | 39] {
            assert_eq!(
                kernel_verdict(&filters, nr, AUDIT_ARCH, &[0; 6]),
                ENOSYS,
                "{nr}"
            );
        }
        assert_eq!(
            kernel_verdict(&filters, 20, AUDIT_ARCH_I386, &[0; 6]),
            RET_KILL_PROCESS
        );
    }

    /// What init itself calls after installing the filter, and what the
    /// agents' runtimes call most, run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn what_init_and_the_runtimes_need_is_allowed() {
        let filters = compile().unwrap();
        for name in [
            // init's loop, spawn and replies
            "poll",
            "ppoll",
            "accept4",
            "accept",
            "recvmsg",
            "sendmsg",
            "recvfrom",
            "sendto",
            "setsockopt",
            "getsockopt",
            "read",
            "write",
            "close",
            "signalfd4",
            "rt_sigprocmask",
            "rt_sigaction",
            "wait4",
            "waitid",
            "kill",
            "clock_nanosleep",
            "nanosleep",
            "clone",
            "fork",
            "vfork",
            "setsid",
            "openat",
            "open",
            "ioctl",
            "dup2",
            "dup3",
            "fcntl",
            "pipe2",
            "setgroups",
            "setresgid",
            "setresuid",
            "chdir",
            "close_range",
            "execve",
            "capset",
            "capget",
            "prctl",
            "socket",
            "statx",
            "newfstatat",
            "fstat",
            "access",
            "uname",
            "getpid",
            "exit_group",
            "exit",
            "mmap",
            "munmap",
            "brk",
            "mprotect",
            "madvise",
            "sigaltstack",
            "getrandom",
            "futex",
            "rseq",
            "set_robust_list",
            "set_tid_address",
            "sched_getaffinity",
            "prlimit64",
            "lseek",
            // node, Python, Rust, apt, git, bash
            "epoll_create1",
            "epoll_ctl",
            "epoll_pwait",
            "epoll_wait",
            "eventfd2",
            "pkey_alloc",
            "pkey_mprotect",
            "memfd_create",
            "copy_file_range",
            "sendfile",
            "inotify_init1",
            "inotify_add_watch",
            "timerfd_create",
            "getdents64",
            "renameat2",
            "unlinkat",
            "mkdirat",
            "fchownat",
            "utimensat",
            "flock",
            "fsync",
            "fdatasync",
            "pread64",
            "pwrite64",
            "readlinkat",
            "symlinkat",
            "linkat",
            "faccessat2",
            "setpgid",
            "getpgid",
            "getppid",
            "gettid",
            "tgkill",
            "pidfd_open",
            "pidfd_send_signal",
            "membarrier",
            "sched_yield",
            "getcwd",
            "umask",
            "connect",
            "bind",
            "listen",
            "getsockname",
            "getpeername",
            "shutdown",
            "socketpair",
            "sendmmsg",
            "recvmmsg",
            "arch_prctl",
            "seccomp",
            "setuid",
            "setgid",
            "chroot",
            "mremap",
            "statfs",
            "fstatfs",
            "sysinfo",
            "getrusage",
            "times",
            "sync_file_range",
            "fallocate",
            "ftruncate",
            "io_setup",
            "io_submit",
            "io_getevents",
            "io_pgetevents",
            "futex_waitv",
            "map_shadow_stack",
            "uretprobe",
        ] {
            assert_eq!(
                kernel_verdict(
                    &filters,
                    syscall_number(name).unwrap(),
                    AUDIT_ARCH,
                    &[1, 2, 0o644, 0o644, 0, 0]
                ),
                RET_ALLOW,
                "{name}"
            );
        }
    }

    /// The file is read in full: mistakes are errors, not ignored.
    #[test]
    fn the_file_is_read_in_full() {
        let ok_allow = r#"[{ "group": "g", "syscalls": [{ "syscall": "read", "why": "t" }] }]"#;
        let with = |default: &str, allow: &str, refuse: &str| {
            parse(&format!(
                r#"{{ "default": {default}, "allow": {allow}, "refuse": {refuse} }}"#
            ))
        };
        assert!(with(r#"{ "errno": 38 }"#, ok_allow, "[]").is_ok());
        let bad_files = [
            // unknown fields, at every level
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [], "mismatch_action": "allow" }}"#
            ),
            r#"{ "default": { "errno": 38 }, "allow": [{ "group": "g", "syscalls": [{ "syscall": "read", "why": "t", "args": [] }] }], "refuse": [] }"#.to_string(),
            r#"{ "default": { "errno": 38 }, "allow": [{ "group": "g", "x": 1, "syscalls": [{ "syscall": "read", "why": "t" }] }], "refuse": [] }"#.to_string(),
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [{{ "why": "t", "errno": 1, "syscalls": ["mount"], "action": "allow" }}] }}"#
            ),
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [{{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [[{{ "index": 0, "type": "dword", "op": "eq", "val": 1, "x": 0 }}]] }}] }}"#
            ),
            // missing parts
            format!(r#"{{ "allow": {ok_allow}, "refuse": [] }}"#),
            r#"{ "default": { "errno": 38 }, "refuse": [] }"#.to_string(),
            // unknown action, op, type
            format!(r#"{{ "default": "deny", "allow": {ok_allow}, "refuse": [] }}"#),
            format!(
                r#"{{ "default": {{ "errno": 38, "extra": 1 }}, "allow": {ok_allow}, "refuse": [] }}"#
            ),
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [{{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [[{{ "index": 0, "type": "dword", "op": "like", "val": 1 }}]] }}] }}"#
            ),
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [{{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [[{{ "index": 0, "type": "word", "op": "eq", "val": 1 }}]] }}] }}"#
            ),
            format!(
                r#"{{ "default": {{ "errno": 38 }}, "allow": {ok_allow}, "refuse": [{{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [[{{ "index": 0, "type": "dword", "op": "eq", "val": "0xzz" }}]] }}] }}"#
            ),
        ];
        for text in &bad_files {
            assert!(parse(text).is_err(), "accepted: {text}");
        }
        let bad_parts = [
            // errno 0 would make a refused call succeed
            (r#"{ "errno": 0 }"#, ok_allow, "[]"),
            (r#"{ "errno": 4096 }"#, ok_allow, "[]"),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 0, "syscalls": ["mount"] }]"#,
            ),
            // allowed twice; without a reason; an empty group
            (
                r#"{ "errno": 38 }"#,
                r#"[{ "group": "g", "syscalls": [{ "syscall": "read", "why": "t" }] }, { "group": "h", "syscalls": [{ "syscall": "read", "why": "t" }] }]"#,
                "[]",
            ),
            (
                r#"{ "errno": 38 }"#,
                r#"[{ "group": "g", "syscalls": [{ "syscall": "read", "why": " " }] }]"#,
                "[]",
            ),
            (
                r#"{ "errno": 38 }"#,
                r#"[{ "group": "g", "syscalls": [] }]"#,
                "[]",
            ),
            // allowed and refused outright; two errnos; refused outright twice
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["read"] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["mount"] }, { "why": "t", "errno": 2, "syscalls": ["mount"] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["mount"] }, { "why": "t", "errno": 1, "syscalls": ["mount"] }]"#,
            ),
            // an empty 'when', a reason missing, no syscalls
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["mount"], "when": [[]] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "", "errno": 1, "syscalls": ["mount"] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": [] }]"#,
            ),
            // values that do not fit, an argument that does not exist, a mask that never matches
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["read"], "when": [[{ "index": 0, "type": "dword", "op": "eq", "val": "0x100000000" }]] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["read"], "when": [[{ "index": 0, "type": "dword", "op": { "masked_eq": "0x100000000" }, "val": 0 }]] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["read"], "when": [[{ "index": 6, "type": "qword", "op": "eq", "val": 1 }]] }]"#,
            ),
            (
                r#"{ "errno": 38 }"#,
                ok_allow,
                r#"[{ "why": "t", "errno": 1, "syscalls": ["read"], "when": [[{ "index": 0, "type": "qword", "op": { "masked_eq": "0xf0" }, "val": "0x1" }]] }]"#,
            ),
        ];
        for (default, allow, refuse) in bad_parts {
            assert!(
                with(default, allow, refuse).is_err(),
                "accepted: {default} {allow} {refuse}"
            );
        }
    }

    /// The default action is the file's, whatever it is.
    #[test]
    fn the_default_action_is_honoured() {
        let allow = r#"[{ "group": "g", "syscalls": [{ "syscall": "read", "why": "t" }] }]"#;
        let getpid = syscall_number("getpid").unwrap();
        for (default, want) in [
            (r#"{ "errno": 38 }"#, ENOSYS),
            (r#"{ "errno": 1 }"#, EPERM),
            (r#""kill_process""#, RET_KILL_PROCESS),
            (r#""trap""#, RET_TRAP),
            (r#""log""#, RET_LOG),
            (r#""allow""#, RET_ALLOW),
        ] {
            let policy = parse(&format!(
                r#"{{ "default": {default}, "allow": {allow}, "refuse": [] }}"#
            ))
            .unwrap();
            let filters = compile_policy(&policy, target_arch().unwrap()).unwrap();
            assert_eq!(
                kernel_verdict(&filters, getpid, AUDIT_ARCH, &[0; 6]),
                want,
                "{default}"
            );
        }
    }

    /// The real kernel gives the verdicts the interpreter does: a child
    /// process installs the filters (with no_new_privs, as an unprivileged
    /// process must) and makes calls whose answer without the filter would
    /// differ.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_kernel_agrees() {
        let filters = compile().unwrap();
        let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: the child makes raw syscalls only and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw syscalls with integer arguments; nothing here touches memory the
            // kernel could write but null pointers, which it refuses.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || install(&filters).is_err()
                {
                    libc::_exit(100);
                }
                let fails = |r: libc::c_long, e: i32| r == -1 && errno() == e;
                let checks = [
                    libc::syscall(libc::SYS_getpid) > 0,
                    fails(libc::syscall(1000), libc::ENOSYS),
                    fails(libc::syscall(libc::SYS_clone3, 0, 0), libc::ENOSYS),
                    fails(
                        libc::syscall(libc::SYS_personality, 0x040_0000),
                        libc::EPERM,
                    ),
                    libc::syscall(libc::SYS_personality, 0xffff_ffffu32) >= 0,
                    fails(
                        libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0),
                        libc::EPERM,
                    ),
                    fails(
                        libc::syscall(libc::SYS_socket, 44, libc::SOCK_RAW, 0),
                        libc::EPERM,
                    ),
                    fails(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0), libc::EPERM),
                    fails(libc::syscall(libc::SYS_unshare, 0), libc::EPERM),
                    fails(libc::syscall(458, 0, 0, 0, 0), libc::ENOSYS),
                    fails(
                        libc::syscall(libc::SYS_ioctl, -1, libc::TIOCSTI, 0),
                        libc::EPERM,
                    ),
                    fails(
                        libc::syscall(libc::SYS_ioctl, -1, libc::TIOCGWINSZ, 0),
                        libc::EBADF,
                    ),
                    fails(libc::syscall(X32_BIT | libc::SYS_getpid), libc::ENOSYS),
                ];
                let code = checks.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                libc::_exit(code as i32);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status),
            "the child ended with status {status:#x}"
        );
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "check {} failed (100: the filters did not install)",
            libc::WEXITSTATUS(status)
        );
    }
}

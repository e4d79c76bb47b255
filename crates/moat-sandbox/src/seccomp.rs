//! The seccomp policy, kept as data in `seccomp.json` and compiled to BPF with
//! seccompiler when a sandbox starts.
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

/// The policy file: filters by name, each a list of rules.
#[derive(Deserialize)]
struct Policy {
    deny: FilterSpec,
    enosys: FilterSpec,
}

#[derive(Deserialize)]
struct FilterSpec {
    match_action: Action,
    filter: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Action {
    Errno(u32),
}

#[derive(Deserialize)]
struct RuleSpec {
    syscall: String,
    #[serde(default)]
    args: Vec<ArgSpec>,
}

#[derive(Deserialize)]
struct ArgSpec {
    index: u8,
    #[serde(rename = "type")]
    len: ArgLen,
    op: Op,
    val: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ArgLen {
    Dword,
    Qword,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Eq,
    MaskedEq(u64),
}

/// Syscall numbers by name. seccompiler's own table predates some of the
/// calls we deny (the new mount API, clone3), so the numbers come from libc.
/// The legacy calls that only x86_64 has (aarch64 has just the *at forms)
/// come second.
macro_rules! syscall_table {
    ([$($name:ident),* $(,)?], [$($x86:ident),* $(,)?]) => {
        fn syscall_number(name: &str) -> Option<i64> {
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
        SYS_acct,
        SYS_add_key,
        SYS_keyctl,
        SYS_request_key,
        SYS_bpf,
        SYS_perf_event_open,
        SYS_userfaultfd,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_reboot,
        SYS_clock_adjtime,
        SYS_clock_settime,
        SYS_settimeofday,
        SYS_adjtimex,
        SYS_lookup_dcookie,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_mount_setattr,
        SYS_move_mount,
        SYS_open_tree,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_name_to_handle_at,
        SYS_open_by_handle_at,
        SYS_nfsservctl,
        SYS_quotactl,
        SYS_swapon,
        SYS_swapoff,
        SYS_vhangup,
        SYS_syslog,
        SYS_setns,
        SYS_unshare,
        SYS_clone,
        SYS_clone3,
        SYS_fchmodat2,
        SYS_openat2,
        SYS_mknodat,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_openat,
        SYS_socket,
        SYS_ioctl,
    ],
    [
        SYS_ioperm,
        SYS_iopl,
        SYS_sysfs,
        SYS__sysctl,
        SYS_uselib,
        SYS_ustat,
        SYS_mknod,
        SYS_chmod,
        SYS_open,
        SYS_creat,
    ]
);

fn target_arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        _ => Err(SeccompError::UnsupportedArch),
    }
}

fn compile_filter(spec: &FilterSpec, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Compile(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in &spec.filter {
        // A syscall this architecture lacks (the legacy x86 ones on aarch64) cannot be called there.
        let Some(nr) = syscall_number(&format!("SYS_{}", rule.syscall)) else {
            continue;
        };
        let conditions = rule
            .args
            .iter()
            .map(|a| {
                let len = match a.len {
                    ArgLen::Dword => SeccompCmpArgLen::Dword,
                    ArgLen::Qword => SeccompCmpArgLen::Qword,
                };
                let op = match a.op {
                    Op::Eq => SeccompCmpOp::Eq,
                    Op::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
                };
                SeccompCondition::new(a.index, len, op, a.val).map_err(err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let entry = rules.entry(nr).or_default();
        if !conditions.is_empty() {
            entry.push(SeccompRule::new(conditions).map_err(err)?);
        }
    }
    let Action::Errno(errno) = spec.match_action;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// The policy's filters compiled for this machine, in the order to install them.
pub fn compile() -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target_arch()?;
    let policy: Policy =
        serde_json::from_str(POLICY).map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut filters = vec![
        compile_filter(&policy.deny, arch)?,
        compile_filter(&policy.enosys, arch)?,
    ];
    if cfg!(target_arch = "x86_64") {
        filters.push(no_x32());
    }
    Ok(filters)
}

/// On x86_64, x32 system calls carry the architecture of 64-bit calls and
/// their number with bit 30 set: no rule above names such a number, so
/// each would pass every argument check. They are refused (ENOSYS) as a
/// whole. seccompiler has no way to say this; the filter is four
/// instructions of classic BPF over `seccomp_data` (nr at 0, arch at 4).
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

/// Every syscall the policy names that this architecture has, for tests.
#[cfg(test)]
fn unknown_names() -> Vec<String> {
    let policy: Policy = serde_json::from_str(POLICY).unwrap();
    policy
        .deny
        .filter
        .iter()
        .chain(&policy.enosys.filter)
        .map(|r| r.syscall.clone())
        .filter(|n| syscall_number(&format!("SYS_{n}")).is_none())
        .collect()
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
    use super::*;

    #[test]
    fn the_policy_compiles() {
        let filters = compile().unwrap();
        // deny, enosys, and on x86_64 the x32 refusal.
        assert_eq!(
            filters.len(),
            if cfg!(target_arch = "x86_64") { 3 } else { 2 }
        );
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_syscall_in_the_policy_has_a_number() {
        assert_eq!(unknown_names(), Vec::<String>::new());
    }
}

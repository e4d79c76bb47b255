//! The seccomp policy, kept as data in `seccomp.json` and compiled to BPF with
//! seccompiler when a sandbox starts.
//!
//! We install the filters ourselves rather than with seccompiler's
//! `apply_filter`, which also sets `no_new_privs`: that would break the
//! template's passwordless `sudo` to the sandbox's own root. Installing a
//! filter without `no_new_privs` takes CAP_SYS_ADMIN in the current user
//! namespace, which the sandbox's init holds.

use std::collections::HashMap;
use std::io;

use seccompiler::{BpfProgram, TargetArch};

const POLICY: &str = include_str!("seccomp.json");

/// Syscalls of the policy that aarch64 does not have (it only has the *at forms).
const X86_ONLY: &[&str] = &[
    "open", "creat", "chmod", "create_module", "get_kernel_syms", "query_module", "ioperm",
    "iopl", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("this CPU architecture has no seccomp policy in moat")]
    UnsupportedArch,
    #[error("the seccomp policy does not compile: {0}")]
    Compile(String),
    #[error("could not install the seccomp filter: {0}")]
    Install(io::Error),
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        _ => Err(SeccompError::UnsupportedArch),
    }
}

/// The policy's filters compiled for this machine, in the order to install them.
pub fn compile() -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target_arch()?;
    let mut policy: serde_json::Value =
        serde_json::from_str(POLICY).map_err(|e| SeccompError::Compile(e.to_string()))?;
    if let Some(obj) = policy.as_object_mut() {
        obj.remove("comment");
        if arch == TargetArch::aarch64 {
            for filter in obj.values_mut() {
                if let Some(list) = filter.get_mut("filter").and_then(|f| f.as_array_mut()) {
                    list.retain(|rule| {
                        let name = rule.get("syscall").and_then(|s| s.as_str()).unwrap_or("");
                        !X86_ONLY.contains(&name)
                    });
                }
            }
        }
        for filter in obj.values_mut() {
            if let Some(f) = filter.as_object_mut() {
                f.remove("comment");
            }
        }
    }
    let text = policy.to_string();
    let mut map: HashMap<String, BpfProgram> =
        seccompiler::compile_from_json(text.as_bytes(), arch)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
    ["deny", "enosys"]
        .iter()
        .map(|name| {
            map.remove(*name)
                .ok_or_else(|| SeccompError::Compile(format!("filter {name} is missing")))
        })
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
    fn the_policy_compiles_for_both_architectures() {
        let filters = compile().unwrap();
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|f| !f.is_empty()));
    }
}

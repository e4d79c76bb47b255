//! What moat puts inside a gVisor sandbox, read-only at [`GUEST_DIR`]: its
//! guest helper (built by `build.rs` from `guest/main.rs`) and the seccomp
//! filters the helper installs on every process it starts: the namespace
//! tier's policy, compiled from the same data file, so that one policy
//! governs both tiers.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use seccompiler::BpfProgram;

use crate::SandboxError;

/// Where the helper and the filters appear inside the guest (gVisor's own
/// `/dev`, so nothing is written into the sandbox's layer for them).
pub(crate) const GUEST_DIR: &str = "/dev/.moat";
pub(crate) const HELPER: &str = "/dev/.moat/guest";
pub(crate) const FILTERS: &str = "/dev/.moat/filters";

static HELPER_BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/moat-guest"));
/// `guest/statx.rs`, for gVisor releases that refuse `AT_NO_AUTOMOUNT`;
/// the helper preloads it where it finds it. Empty off x86_64.
static STATX_BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/statx.so"));

/// Write the helper and the filters into `dir`, the host side of [`GUEST_DIR`].
pub(crate) fn write(dir: &Path, statx_workaround: bool) -> Result<(), SandboxError> {
    if HELPER_BYTES.is_empty() {
        return Err(SandboxError::Start(
            "this moat was built without its gVisor guest helper (the static C library was missing): install libc6-dev and build moat again".into(),
        ));
    }
    let io = |what: &str, e| SandboxError::io(format!("{what} in {}", dir.display()), e);
    std::fs::create_dir_all(dir).map_err(|e| io("create the guest folder", e))?;
    let helper = dir.join("guest");
    std::fs::write(&helper, HELPER_BYTES).map_err(|e| io("write the guest helper", e))?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| io("chmod the guest helper", e))?;
    if statx_workaround && !STATX_BYTES.is_empty() {
        std::fs::write(dir.join("statx.so"), STATX_BYTES)
            .map_err(|e| io("write the statx library", e))?;
    }
    let filters = crate::seccomp::compile()?;
    let mut file =
        std::fs::File::create(dir.join("filters")).map_err(|e| io("write the filters", e))?;
    file.write_all(&serialize(&filters))
        .map_err(|e| io("write the filters", e))?;
    Ok(())
}

/// The filters as the helper reads them: per program, its length (u32) and
/// its instructions (8 bytes each), native endian.
fn serialize(filters: &[BpfProgram]) -> Vec<u8> {
    let mut out = Vec::new();
    for prog in filters {
        out.extend_from_slice(&(prog.len() as u32).to_ne_bytes());
        for insn in prog {
            out.extend_from_slice(&insn.code.to_ne_bytes());
            out.push(insn.jt);
            out.push(insn.jf);
            out.extend_from_slice(&insn.k.to_ne_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_serialize_as_the_helper_reads_them() {
        let prog = vec![seccompiler::sock_filter {
            code: 6,
            jt: 1,
            jf: 2,
            k: 0x7fff_0000,
        }];
        let mut want = 1u32.to_ne_bytes().to_vec();
        want.extend_from_slice(&6u16.to_ne_bytes());
        want.extend_from_slice(&[1, 2]);
        want.extend_from_slice(&0x7fff_0000u32.to_ne_bytes());
        assert_eq!(serialize(&[prog]), want);
    }

    #[test]
    fn the_helper_was_built() {
        assert!(
            HELPER_BYTES.starts_with(b"\x7fELF"),
            "build.rs did not build the guest helper"
        );
    }
}

//! The gVisor tier's stage: everything runsc needs, put together in init's
//! own mount namespace, where nothing outside sees it. It is a tmpfs over
//! that namespace's `/tmp`, a path that runsc can reach whatever ids it
//! runs with: the host's paths to the sandbox's files (under state roots
//! that the sandbox's ids may not traverse) are not needed, as those files
//! are open already (`HostMounts`).
//!
//! ```text
//! /tmp/root        the overlay: image layers and the sandbox's own layer
//! /tmp/wsN         workspace N (idmapped as in the namespace tier)
//! /tmp/fileN       the daemon's files (/etc/hosts, …)
//! /tmp/runsc       runsc, bound from where the configuration says
//! /tmp/guest/      the guest helper and the seccomp filters (/dev/.moat inside)
//! /tmp/bundle/     config.json
//! /tmp/state/      runsc's state
//! /tmp/exec/       one process spec per `runsc exec` running
//! ```

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::{guest, oci, runsc as runsc_mod};
use crate::mounts::{m, HostMounts};
use crate::spec::SandboxSpec;
use crate::SandboxError;

pub(super) struct Stage {
    pub dir: PathBuf,
    /// runsc, as bound into the stage.
    pub runsc: PathBuf,
    pub state: PathBuf,
    pub bundle: PathBuf,
}

/// Put the stage together from `host` and write runsc's bundle for `spec`.
/// Errors are whole sentences: `Refused` adds nothing to the "did not
/// start" that the daemon's side puts before them.
pub(super) fn build(
    spec: &SandboxSpec,
    host: HostMounts,
    runsc: &Path,
    release: u32,
) -> Result<Stage, SandboxError> {
    // runsc itself, opened before the stage covers /tmp (where a runsc of
    // the user's may be) and bound into the stage, where every later call
    // finds it.
    let runsc_fd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(runsc)
        .map_err(|e| {
            SandboxError::Refused(format!(
                "cannot reach {} as the sandbox's ids: {e}; install runsc where every user can run it (`sandbox.runsc` in the configuration)",
                runsc.display()
            ))
        })?;

    let stage = PathBuf::from("/tmp");
    m(
        Some("tmpfs"),
        &stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=700,size=32m"),
    )?;
    let dir = |name: &str| -> Result<PathBuf, SandboxError> {
        let p = stage.join(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| SandboxError::io(format!("create {}", p.display()), e))?;
        Ok(p)
    };
    crate::detached::attach(&host.overlay, &dir("root")?)?;
    for (i, tree) in host.workspaces.iter().enumerate() {
        crate::detached::attach(tree, &dir(&format!("ws{i}"))?)?;
    }
    for (i, tree) in host.files.iter().enumerate() {
        let p = stage.join(format!("file{i}"));
        fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o444)
            .open(&p)
            .map_err(|e| SandboxError::io(format!("create {}", p.display()), e))?;
        crate::detached::attach(tree, &p)?;
    }
    let staged = stage.join("runsc");
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o500)
        .open(&staged)
        .map_err(|e| SandboxError::io(format!("create {}", staged.display()), e))?;
    m(
        Some(&format!("/proc/self/fd/{}", runsc_fd.as_raw_fd())),
        &staged,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    drop(runsc_fd);
    let state = dir("state")?;
    dir("exec")?;
    guest::write(&stage.join("guest"), release < runsc_mod::STATX_FIXED_SINCE)?;
    let bundle = dir("bundle")?;
    let shm = spec.tmpfs_size.unwrap_or(crate::mounts::DEFAULT_SHM_SIZE);
    let config = oci::config(spec, &stage, shm);
    fs::write(bundle.join("config.json"), config.to_string())
        .map_err(|e| SandboxError::io("write the sandbox's config.json", e))?;

    Ok(Stage {
        dir: stage,
        runsc: staged,
        state,
        bundle,
    })
}

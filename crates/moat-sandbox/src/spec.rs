//! What a sandbox is made of, as the daemon hands it to the sandbox's init.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxSpec {
    pub id: String,
    /// The sandbox's name, which is also its hostname.
    pub hostname: String,
    /// The image's unpacked layers, lowest first.
    pub lower_dirs: Vec<PathBuf>,
    /// The sandbox's own layer and overlayfs's work directory (same file system).
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    /// An empty directory where the root file system is put together.
    pub rootfs: PathBuf,
    pub workspaces: Vec<BindMount>,
    /// Files the daemon writes for the sandbox (`/etc/hosts`, …), bound read-only.
    pub files: Vec<BindMount>,
    /// Set `no_new_privs` on every process; this disables the template's `sudo`.
    pub no_new_privs: bool,
    /// As root: the unprivileged host uid (and gid) that owns the sandbox's
    /// user namespace. Per-user kernel resources that the namespace's
    /// processes use (inotify instances and watches, and the like) are
    /// counted against its owner, so a sandbox owned by root could exhaust
    /// them for host root and every other sandbox.
    #[serde(default)]
    pub userns_owner: Option<u32>,
    /// As root: the sandbox's id map, by which each workspace is mounted
    /// idmapped so that its owner (as init finds it, from the directory it
    /// mounts) shows as the agent. None rootless.
    #[serde(default)]
    pub workspace_idmap: Option<crate::idmap::IdMap>,
    #[serde(default)]
    pub tier: Tier,
    /// The size in bytes of the sandbox's writable in-memory file system
    /// (`/dev/shm`), which the daemon derives from the sandbox's disk budget
    /// and memory limit; None for the default, 64 MiB.
    #[serde(default)]
    pub tmpfs_size: Option<u64>,
}

/// The isolation tier that runs the sandbox, with what it needs. Each tier
/// is an init behind the same control socket (see `init.rs`): the daemon,
/// the gateway and the model runner do not know which one they talk to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "tier", rename_all = "snake_case")]
pub enum Tier {
    /// Linux namespaces, seccomp and Landlock around the host's kernel.
    #[default]
    Namespaces,
    /// gVisor's user-space kernel, run by `runsc` (see `gvisor/`).
    Gvisor {
        /// The runsc binary.
        runsc: PathBuf,
        /// Its platform: `systrap`, `ptrace` or `kvm`.
        platform: String,
        /// Its release date (`20221219`), which says what it can do; 0 unknown.
        #[serde(default)]
        release: u32,
        /// The sandbox's PID limit, held inside gVisor too (RLIMIT_NPROC).
        #[serde(default)]
        pids: Option<u64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BindMount {
    /// The host path.
    pub source: PathBuf,
    /// The path inside the sandbox.
    pub target: PathBuf,
    pub read_only: bool,
}

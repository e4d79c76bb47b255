//! Putting the sandbox's root file system together, inside its new mount
//! namespace and before `pivot_root`: the overlay, `/proc` with its masked
//! paths, a read-only `/sys`, a minimal `/dev`, the workspaces and the files
//! the daemon wrote. No sandbox process runs while this happens (init is the
//! only one), so checking a path for symlinks and then mounting on it cannot
//! be raced from inside.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root};

use crate::detached::Lookup;
use crate::spec::{BindMount, SandboxSpec};
use crate::SandboxError;

/// Files in /proc that leak host information or offer host controls.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "kmsg",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "mtrr",
    "kallsyms",
];
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound", "driver"];
const PROC_READ_ONLY: &[&str] = &[
    "sys",
    "sysrq-trigger",
    "irq",
    "bus",
    "fs",
    // Init's OOM score: a sandbox that raised it would make the kernel pick
    // init, and with it the whole sandbox, first when memory runs short.
    "1/oom_score_adj",
    "1/oom_adj",
    "1/task/1/oom_score_adj",
    "1/task/1/oom_adj",
];
const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

pub(crate) fn m(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    mount(source, target, fstype, flags, data).map_err(|e| {
        SandboxError::sys(
            format!("mount {} on {}", source.unwrap_or("-"), target.display()),
            e,
        )
    })
}

/// The host's part of a sandbox's root file system, as detached mounts:
/// the overlay of the image's layers and the sandbox's own layer, the
/// workspaces (idmapped where the spec says so) and the daemon's files.
///
/// They are made where init can still reach the host's paths: as root,
/// before it leaves the host's user namespace (the sandbox's ids are
/// unprivileged host ids that may not even traverse the state root); rootless,
/// in its new namespaces, where the caller's own files are as reachable as
/// before. Nothing is attached anywhere until [`build_root`], in the
/// sandbox's own mount namespace.
pub struct HostMounts {
    pub(crate) overlay: OwnedFd,
    pub(crate) workspaces: Vec<OwnedFd>,
    pub(crate) files: Vec<OwnedFd>,
}

/// Make the detached mounts, and move into the directory that holds
/// `spec.rootfs`: the working directory is how [`build_root`] finds it from
/// inside (it follows a process into a new mount namespace; a path from the
/// host's root may not be open to the sandbox's ids).
pub fn open_host_mounts(spec: &SandboxSpec) -> Result<HostMounts, SandboxError> {
    // Nothing mounted here reaches another mount namespace, and nothing
    // cloned from here belongs to a peer group of the host's.
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // Rootless, made here as the sandbox's root, so that `/` inside belongs
    // to root; as root, the daemon made them for the sandbox's root already.
    mkdir(&spec.upper_dir, 0o755)?;
    mkdir(&spec.work_dir, 0o755)?;
    let overlay = crate::detached::overlay(
        &spec.lower_dirs,
        &spec.upper_dir,
        &spec.work_dir,
        &spec.rootfs,
    )?;
    let workspaces = spec
        .workspaces
        .iter()
        .map(|ws| {
            let at = crate::detached::open_path(&ws.source, Lookup::NoSymlinks)?;
            let st = nix::sys::stat::fstat(at.as_raw_fd())
                .map_err(|e| SandboxError::sys(format!("stat {}", ws.source.display()), e))?;
            // The owner as it is now, from the directory that is mounted.
            let map = spec
                .workspace_idmap
                .as_ref()
                .and_then(|m| m.workspace_mount(st.st_uid, st.st_gid));
            match map {
                Some(map) => crate::detached::idmapped_tree(&at, &map, &ws.source),
                None => crate::detached::clone_tree(&at, true),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let files = spec
        .files
        .iter()
        .map(|f| {
            crate::detached::open_path(&f.source, Lookup::Own)
                .and_then(|at| crate::detached::clone_tree(&at, false))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parent = spec
        .rootfs
        .parent()
        .ok_or_else(|| SandboxError::Start("the root file system's path has no parent".into()))?;
    chdir(parent).map_err(|e| SandboxError::sys(format!("chdir {}", parent.display()), e))?;
    Ok(HostMounts {
        overlay,
        workspaces,
        files,
    })
}

/// Put the root file system together in the sandbox's mount namespace from
/// `host` and the kernel's own file systems, and make it `/`.
pub fn build_root(spec: &SandboxSpec, host: HostMounts) -> Result<(), SandboxError> {
    // Nothing we mount from here on may propagate back to the host.
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    let name = spec
        .rootfs
        .file_name()
        .ok_or_else(|| SandboxError::Start("the root file system's path has no name".into()))?;
    crate::detached::attach(&host.overlay, Path::new(name))?;
    chdir(Path::new(name)).map_err(|e| SandboxError::sys("chdir into the new root", e))?;
    let root = Path::new(".");

    mount_proc(root)?;
    mount_sys(root)?;
    mount_dev(root, spec.tmpfs_size)?;
    for (ws, tree) in spec.workspaces.iter().zip(&host.workspaces) {
        bind(root, ws, tree, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    }
    for (file, tree) in spec.files.iter().zip(&host.files) {
        bind(
            root,
            file,
            tree,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?;
    }
    enter_root(root)
}

fn mount_proc(root: &Path) -> Result<(), SandboxError> {
    let proc_dir = prepare(root, "/proc", Kind::Dir)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m(Some("proc"), &proc_dir, Some("proc"), flags, None)?;
    for name in PROC_MASKED_FILES {
        let p = proc_dir.join(name);
        if p.exists() {
            m(Some("/dev/null"), &p, None, MsFlags::MS_BIND, None)?;
        }
    }
    for name in PROC_MASKED_DIRS {
        let p = proc_dir.join(name);
        if p.is_dir() {
            m(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | flags,
                Some("size=0"),
            )?;
        }
    }
    for name in PROC_READ_ONLY {
        let p = proc_dir.join(name);
        if p.exists() {
            m(
                Some(&p.display().to_string()),
                &p,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            set_attrs(&p, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)?;
        }
    }
    Ok(())
}

fn mount_sys(root: &Path) -> Result<(), SandboxError> {
    let sys = prepare(root, "/sys", Kind::Dir)?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mount(Some("sysfs"), &sys, Some("sysfs"), flags, None::<&str>).is_err() {
        // A fresh sysfs needs a fully visible one on the host; where there is
        // none, an empty read-only /sys is what the sandbox gets.
        m(Some("tmpfs"), &sys, Some("tmpfs"), flags, Some("size=0"))?;
        return Ok(());
    }
    let firmware = sys.join("firmware");
    if firmware.is_dir() {
        m(
            Some("tmpfs"),
            &firmware,
            Some("tmpfs"),
            flags,
            Some("size=0"),
        )?;
    }
    Ok(())
}

/// `/dev/shm`'s size when the spec names none (Docker's default).
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

/// `/dev`, with `/dev/shm` a tmpfs of `shm_size` bytes (the default when
/// None). `/dev` itself is a tmpfs of 64 KiB, for the nodes' mount points
/// and links only; the read-only tmpfs over masked paths hold nothing.
fn mount_dev(root: &Path, shm_size: Option<u64>) -> Result<(), SandboxError> {
    let dev = prepare(root, "/dev", Kind::Dir)?;
    m(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for node in DEV_NODES {
        let target = dev.join(node);
        fs::write(&target, b"")
            .map_err(|e| SandboxError::io(format!("create {}", target.display()), e))?;
        let source = format!("/dev/{node}");
        m(Some(&source), &target, None, MsFlags::MS_BIND, None)?;
        set_attrs(&target, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts, 0o755)?;
    m(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    mkdir(&shm, 0o1777)?;
    m(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&shm_options(shm_size)),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(link))
            .map_err(|e| SandboxError::io(format!("symlink /dev/{link}"), e))?;
    }
    Ok(())
}

/// The mount options of `/dev/shm`. The size is rounded up to whole KiB,
/// and is never 0, which would mean no limit at all to tmpfs.
fn shm_options(size: Option<u64>) -> String {
    let kib = size.unwrap_or(DEFAULT_SHM_SIZE).div_ceil(1024).max(1);
    format!("mode=1777,size={kib}k")
}

/// Attach `tree`, the detached mount of `b`'s host path, at `b`'s target under `root`.
fn bind(root: &Path, b: &BindMount, tree: &OwnedFd, extra: MsFlags) -> Result<(), SandboxError> {
    // What the tree is, from the tree itself: its host path may be out of
    // the sandbox's ids' reach.
    let is_dir = nix::sys::stat::fstat(tree.as_raw_fd())
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
    let kind = if is_dir { Kind::Dir } else { Kind::File };
    let target = prepare(root, &b.target.display().to_string(), kind)?;
    crate::detached::attach(tree, &target)?;
    let mut attrs = 0;
    if extra.contains(MsFlags::MS_NOSUID) {
        attrs |= MOUNT_ATTR_NOSUID;
    }
    if extra.contains(MsFlags::MS_NODEV) {
        attrs |= MOUNT_ATTR_NODEV;
    }
    if extra.contains(MsFlags::MS_NOEXEC) {
        attrs |= MOUNT_ATTR_NOEXEC;
    }
    if b.read_only {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    set_attrs(&target, attrs)
}

fn enter_root(root: &Path) -> Result<(), SandboxError> {
    chdir(root).map_err(|e| SandboxError::sys("chdir to the new root", e))?;
    pivot_root(".", ".").map_err(|e| SandboxError::sys("pivot_root", e))?;
    // The old root is stacked under the new one at "."; detach it so that no
    // path from inside can reach the host's tree.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| SandboxError::sys("detach the host root", e))?;
    chdir("/").map_err(|e| SandboxError::sys("chdir /", e))
}

#[derive(Clone, Copy)]
enum Kind {
    Dir,
    File,
}

/// The host path of `inside` under `root`, with every missing component made
/// and none of them a symlink (a sandbox could have planted one in its upper
/// layer to redirect a mount).
fn prepare(root: &Path, inside: &str, kind: Kind) -> Result<PathBuf, SandboxError> {
    let mut path = root.to_path_buf();
    let comps: Vec<Component> = Path::new(inside).components().collect();
    for (i, comp) in comps.iter().enumerate() {
        let Component::Normal(name) = comp else {
            continue;
        };
        path.push(name);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(SandboxError::SymlinkInRoot(inside.to_string()))
            }
            Ok(_) => {}
            Err(_) if last && matches!(kind, Kind::File) => fs::write(&path, b"")
                .map_err(|e| SandboxError::io(format!("create {inside}"), e))?,
            Err(_) => mkdir(&path, 0o755)?,
        }
    }
    Ok(path)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), SandboxError> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(SandboxError::io(format!("mkdir {}", path.display()), e)),
    }
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
pub(crate) const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

/// Add mount attributes to the mount at `path` and every mount under it.
/// Unlike a `MS_REMOUNT`, this keeps the flags that a user namespace may not
/// clear (those the host mount had), so it works for binds of host paths.
fn set_attrs(path: &Path, attrs: u64) -> Result<(), SandboxError> {
    if attrs == 0 {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| SandboxError::Start(format!("path with a NUL byte: {}", path.display())))?;
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `c` and `attr` are valid for the call; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(SandboxError::sys(
            format!("mount_setattr {}", path.display()),
            nix::Error::last(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shm_gets_the_spec_size_never_an_unlimited_one() {
        assert_eq!(shm_options(None), "mode=1777,size=65536k");
        assert_eq!(shm_options(Some(16 << 20)), "mode=1777,size=16384k");
        assert_eq!(shm_options(Some(1000)), "mode=1777,size=1k");
        // size=0 is tmpfs's "no limit": a zero is held to one KiB instead.
        assert_eq!(shm_options(Some(0)), "mode=1777,size=1k");
    }
}

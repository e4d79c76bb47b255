//! Detached mounts: the host's parts of a sandbox's root file system made
//! with the new mount API as file descriptors, attached later, from inside
//! the sandbox's own mount namespace, where the host's paths may be out of
//! reach (see [`crate::mounts::HostMounts`]).
//!
//! An idmapped workspace mount is a detached copy of a host directory whose
//! ids are translated by a [`MountIdMap`], so that the workspace's owner
//! shows as the agent inside and the agent's writes land as the owner on
//! disk, while the agent itself is an unprivileged host id. Only a process
//! with CAP_SYS_ADMIN over the host's file systems may make one. The mapping
//! travels to the kernel as a user namespace made for the purpose: a child
//! that unshares one, is mapped from here, and is gone once its namespace is
//! open.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::idmap::{render, MountIdMap};
use crate::SandboxError;

use crate::mounts::{MountAttr, AT_RECURSIVE};

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn cpath(path: &Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| SandboxError::Start(format!("path with a NUL byte: {}", path.display())))
}

/// How a host path is looked up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A path of the daemon's own (state and runtime directories), which
    /// no sandbox can write: links in it are the host's own.
    Own,
    /// A workspace: its path was made canonical when the sandbox was
    /// created, so a link in it now was planted (by the agent, through
    /// another workspace) to send the mount elsewhere on the host.
    NoSymlinks,
}

/// `path` opened as a place to clone a mount from, looked up as `lookup` says.
pub fn open_path(path: &Path, lookup: Lookup) -> Result<OwnedFd, SandboxError> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let c = cpath(path)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: if lookup == Lookup::NoSymlinks {
            RESOLVE_NO_SYMLINKS
        } else {
            0
        },
    };
    // SAFETY: openat2 on a valid C string and a struct laid out as open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let err = Errno::last();
        return Err(match err {
            Errno::ELOOP => SandboxError::Start(format!(
                "{} has a symbolic link in its path that was not there when the sandbox was created; remove the link, or remove the sandbox and create it again",
                path.display()
            )),
            e => SandboxError::sys(format!("open {}", path.display()), e),
        });
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A detached copy of the mount at the opened path `at` (and of those below
/// it, with `recursive`), as a bind mount makes.
pub fn clone_tree(at: &OwnedFd, recursive: bool) -> Result<OwnedFd, SandboxError> {
    let flags = OPEN_TREE_CLONE
        | OPEN_TREE_CLOEXEC
        | libc::AT_EMPTY_PATH as libc::c_uint
        | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: open_tree on a descriptor we hold and an empty path; we own the result.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, at.as_raw_fd(), c"".as_ptr(), flags) };
    if fd < 0 {
        return Err(SandboxError::sys("open_tree", Errno::last()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A detached, idmapped copy of the mount at the opened path `at` (not of
/// those below it: each file system must support idmapping on its own).
pub fn idmapped_tree(at: &OwnedFd, map: &MountIdMap, what: &Path) -> Result<OwnedFd, SandboxError> {
    let userns = mapping_userns(map)?;
    let tree = clone_tree(at, false)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, attr valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let err = Errno::last();
        return Err(SandboxError::Start(format!(
            "cannot mount the workspace {} idmapped ({err}): its file system does not support idmapped mounts; move the workspace to a local file system (ext4, xfs, btrfs, tmpfs)",
            what.display()
        )));
    }
    Ok(tree)
}

/// The sandbox's root: an overlay of `lower` (lowest first) under `upper`,
/// mounted at `at` and taken off it again as a detached mount. As root, this
/// happens in a mount namespace of init's own (nothing reaches the host's),
/// and it is the host's own overlay mount, as Docker's with user
/// namespaces: the sandbox's ids reach its layers only through it. mount(2)
/// rather than fsconfig, whose values are limited to 256 bytes (a few
/// layers' paths) and which overlayfs accepts only from Linux 6.5 on.
pub fn overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    at: &Path,
) -> Result<OwnedFd, SandboxError> {
    let lower: Vec<String> = lower
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    // nodev: device nodes in an image's layers open nothing.
    nix::mount::mount(
        Some("overlay"),
        at,
        Some("overlay"),
        nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| SandboxError::sys(format!("mount the overlay on {}", at.display()), e))?;
    let tree = open_path(at, Lookup::Own).and_then(|fd| clone_tree(&fd, false));
    nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| SandboxError::sys(format!("unmount {}", at.display()), e))?;
    tree
}

/// Attach a detached mount at `target`.
pub fn attach(tree: &OwnedFd, target: &Path) -> Result<(), SandboxError> {
    let c = cpath(target)?;
    // SAFETY: valid descriptor and C strings; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(SandboxError::sys(
            format!("move_mount on {}", target.display()),
            Errno::last(),
        ));
    }
    Ok(())
}

/// A user namespace whose only use is to carry `map` to mount_setattr.
fn mapping_userns(map: &MountIdMap) -> Result<OwnedFd, SandboxError> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("pipe", e))?;
    let (done_r, done_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SandboxError::sys("pipe", e))?;
    // SAFETY: the caller is single-threaded (init before its namespaces);
    // the child only makes syscalls and leaves with _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SandboxError::sys("fork", e)),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ready_r);
            drop(done_w);
            // SAFETY: unshare with a constant flag.
            let ok = unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0;
            let mut w = fs::File::from(ready_w);
            let _ = w.write_all(if ok { b"y" } else { b"n" });
            drop(w);
            let mut byte = [0u8; 1];
            let _ = fs::File::from(done_r).read(&mut byte);
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(ready_w);
            drop(done_r);
            let result = (|| {
                let mut byte = [0u8; 1];
                let _ = fs::File::from(ready_r).read(&mut byte);
                if &byte != b"y" {
                    return Err(SandboxError::Start(
                        "could not make the user namespace of an idmapped mount".into(),
                    ));
                }
                let pid = child.as_raw();
                let write = |file: &str, text: String| {
                    fs::write(format!("/proc/{pid}/{file}"), text).map_err(|e| {
                        SandboxError::io(format!("write an idmapped mount's {file}"), e)
                    })
                };
                write("uid_map", render(&map.uids))?;
                write("gid_map", render(&map.gids))?;
                fs::File::open(format!("/proc/{pid}/ns/user"))
                    .map(OwnedFd::from)
                    .map_err(|e| SandboxError::io("open an idmapped mount's user namespace", e))
            })();
            drop(done_w);
            let _ = nix::sys::wait::waitpid(child, None);
            result
        }
    }
}

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

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(path: &Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| SandboxError::Start(format!("path with a NUL byte: {}", path.display())))
}

/// A detached copy of the mount at `source` (and of those below it, with
/// `recursive`), as a bind mount makes.
pub fn clone_tree(source: &Path, recursive: bool) -> Result<OwnedFd, SandboxError> {
    let c = cpath(source)?;
    let flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: open_tree on a valid C string; we own the returned descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(SandboxError::sys(
            format!("open_tree {}", source.display()),
            Errno::last(),
        ));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A detached, idmapped copy of the mount at `source` (not of those below
/// it: each file system must support idmapping on its own).
pub fn tree(source: &Path, map: &MountIdMap) -> Result<OwnedFd, SandboxError> {
    let userns = mapping_userns(map)?;
    let tree = clone_tree(source, false)?;
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
            source.display()
        )));
    }
    Ok(tree)
}

/// The sandbox's root: an overlay of `lower` (lowest first) under `upper`.
/// As root, this is the host's own overlay mount (as Docker's with user
/// namespaces): the sandbox's ids reach its layers only through it.
pub fn overlay(lower: &[PathBuf], upper: &Path, work: &Path) -> Result<OwnedFd, SandboxError> {
    let fs = FsContext::open("overlay")?;
    // One `lowerdir+` per layer, topmost first: a single `lowerdir` string
    // is limited to 256 bytes by fsconfig, a few layers' paths.
    let appended = lower
        .iter()
        .rev()
        .try_for_each(|l| fs.set_string("lowerdir+", &l.display().to_string()));
    if let Err(e) = appended {
        let joined: Vec<String> = lower
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        fs.set_string("lowerdir", &joined.join(":"))
            .map_err(|_| e)?;
    }
    fs.set_string("upperdir", &upper.display().to_string())?;
    fs.set_string("workdir", &work.display().to_string())?;
    fs.set_flag("userxattr")?;
    fs.create()?;
    fs.mount()
}

/// A file system being configured with fsopen/fsconfig.
struct FsContext {
    fd: OwnedFd,
    fstype: &'static str,
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

impl FsContext {
    fn open(fstype: &'static str) -> Result<FsContext, SandboxError> {
        let c = CString::new(fstype).map_err(|_| SandboxError::Start("bad fs type".into()))?;
        // SAFETY: fsopen on a valid C string; we own the returned descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_fsopen, c.as_ptr(), FSOPEN_CLOEXEC) };
        if fd < 0 {
            return Err(SandboxError::sys(format!("fsopen {fstype}"), Errno::last()));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(FsContext { fd, fstype })
    }

    fn config(
        &self,
        cmd: libc::c_uint,
        key: Option<&str>,
        value: Option<&str>,
    ) -> Result<(), SandboxError> {
        let key_c = key.map(CString::new).transpose();
        let value_c = value.map(CString::new).transpose();
        let (Ok(key_c), Ok(value_c)) = (key_c, value_c) else {
            return Err(SandboxError::Start(format!(
                "{key:?} or its value has a NUL byte"
            )));
        };
        let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid descriptor and C strings (or null where the command takes none).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                cmd,
                ptr(&key_c),
                ptr(&value_c),
                0,
            )
        };
        if rc != 0 {
            let what = match (key, value) {
                (Some(k), Some(v)) => format!("{k}={v}"),
                (Some(k), None) => k.to_string(),
                _ => "create".to_string(),
            };
            return Err(SandboxError::sys(
                format!("{} {}: {what}", self.fstype, "option"),
                Errno::last(),
            ));
        }
        Ok(())
    }

    fn set_string(&self, key: &str, value: &str) -> Result<(), SandboxError> {
        self.config(FSCONFIG_SET_STRING, Some(key), Some(value))
    }

    fn set_flag(&self, key: &str) -> Result<(), SandboxError> {
        self.config(FSCONFIG_SET_FLAG, Some(key), None)
    }

    fn create(&self) -> Result<(), SandboxError> {
        self.config(FSCONFIG_CMD_CREATE, None, None)
    }

    fn mount(self) -> Result<OwnedFd, SandboxError> {
        // SAFETY: fsmount on a configured context; we own the returned descriptor.
        let fd =
            unsafe { libc::syscall(libc::SYS_fsmount, self.fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
        if fd < 0 {
            return Err(SandboxError::sys(
                format!("fsmount {}", self.fstype),
                Errno::last(),
            ));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
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

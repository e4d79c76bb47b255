//! Landlock, the namespace tier's second wall: where the kernel has it, a
//! sandbox's processes open only what is in the sandbox's own mount tree
//! (its root file system, `/proc`, `/dev`, the workspaces, the daemon's
//! files), so that a host descriptor that leaks in, or a host directory
//! that a mount bug makes reachable, still opens nothing.
//!
//! Init restricts itself once its root is built ([`restrict_init`]), and
//! every process it starts inherits the domain. The ruleset handles every
//! file-system right of the best ABI the kernel has, and grants all of them
//! beneath `/` only. Landlock decides an access by walking from the object
//! up to the root of its mount tree, through mount points: every mount in
//! the sandbox's tree sits below its `/`, so one rule covers them all, while
//! an object of the host's (not in this tree) meets no rule on its walk and
//! is refused with `EACCES`.
//!
//! What Landlock checks is opening (and creating, removing, renaming,
//! linking, truncating, executing, device ioctls): a descriptor that was
//! opened for reading before it arrived still reads (a leaked directory
//! descriptor still lists its own entries), and metadata (`stat`, and as
//! of ABI 7 `chmod`, `chown`, `utimes`, extended attributes) is not
//! covered.
//!
//! From ABI 6 on, the domain is also scoped: its processes cannot signal a
//! process outside it nor connect to an abstract Unix socket made outside it
//! (the daemon, and whatever else shares the network namespace from
//! outside). TCP is not restricted: the doors out are on loopback.
//!
//! Read-only workspaces stay read-only through their mounts (read-only,
//! which root inside cannot undo: it has no CAP_SYS_ADMIN, and Landlock
//! refuses every mount call to a process in a domain). Landlock itself
//! cannot say "everything beneath `/` but this subtree read-only": rights
//! accumulate along the walk, so the write rights granted on `/` reach
//! every object below it whatever a rule on the subtree says. Leaving them
//! off `/` would mean one rule per sibling of every directory on the way to
//! each read-only workspace, and none for what is made in those
//! directories later (rules hold inodes, not names): `/home/agent` itself
//! would take no new file.

use std::path::Path;

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};

use crate::SandboxError;

/// The newest Landlock ABI whose rights this code asks for; best-effort
/// compatibility lowers the request to what the running kernel has.
const NEWEST: ABI = ABI::V10;

/// The oldest ABI the wall goes up with. ABI 1 cannot grant
/// `LANDLOCK_ACCESS_FS_REFER`, so it refuses every link or rename into
/// another directory (`mv`, dpkg); there, sandboxes go without Landlock.
pub const MIN_ABI: u32 = 2;

/// `LANDLOCK_CREATE_RULESET_VERSION`, from `<linux/landlock.h>`.
const CREATE_RULESET_VERSION: libc::c_uint = 1;

/// The Landlock ABI version the running kernel offers: `None` where it has
/// no Landlock (not built in, or not enabled at boot).
pub fn host_abi() -> Option<u32> {
    // SAFETY: with no attribute, size 0 and the VERSION flag, the call
    // reads nothing and only returns the ABI version (or -1).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// The Landlock ABI that a sandbox started now on this host is restricted
/// with: `None` where the kernel has no Landlock, or only ABI 1
/// ([`MIN_ABI`]).
pub fn sandbox_abi() -> Option<u32> {
    host_abi().filter(|v| *v >= MIN_ABI)
}

/// The Landlock wall of sandboxes started now on this host, in words, for
/// `inspect`.
pub fn describe() -> String {
    match (host_abi(), sandbox_abi()) {
        (_, Some(abi)) if abi >= 6 => format!(
            "landlock (ABI {abi}): the file system beneath the sandbox's root only; signals and abstract Unix sockets scoped to the sandbox"
        ),
        (_, Some(abi)) => format!(
            "landlock (ABI {abi}): the file system beneath the sandbox's root only"
        ),
        (Some(abi), None) => {
            format!("no landlock: this kernel's ABI {abi} cannot allow renames across directories")
        }
        (None, None) => "no landlock: this kernel does not offer it".to_string(),
    }
}

/// Restrict init, and with it every process it starts, to what is beneath
/// its `/`. Call it once the root is built and entered (after `pivot_root`;
/// Landlock refuses every mount call from then on) and before the seccomp
/// filter (which may refuse the `landlock_*` calls). Returns the ABI applied,
/// or `None` where the kernel has no Landlock (or only ABI 1); where it has,
/// failing to apply it fails the start.
pub fn restrict_init() -> Result<Option<u32>, SandboxError> {
    restrict_beneath(Path::new("/"))
}

/// [`restrict_init`] with another root, for the tests.
fn restrict_beneath(root: &Path) -> Result<Option<u32>, SandboxError> {
    let Some(abi) = sandbox_abi() else {
        return Ok(None);
    };
    let failed = |what: String| {
        SandboxError::Start(format!(
            "this kernel has Landlock (ABI {abi}), but the sandbox could not be restricted with it: {what}"
        ))
    };
    let root_fd = PathFd::new(root).map_err(|e| failed(e.to_string()))?;
    let all = AccessFs::from_all(NEWEST);
    let status = (|| -> Result<_, RulesetError> {
        Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(all)?
            .scope(Scope::from_all(NEWEST))?
            .create()?
            .add_rule(PathBeneath::new(root_fd, all))?
            // `sudo` inside must keep working; init sets no_new_privs
            // itself where the configuration asks. Without it, the call
            // needs CAP_SYS_ADMIN in init's user namespace, which init has.
            .no_new_privs(false)
            .restrict_self()
    })()
    .map_err(|e| failed(e.to_string()))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(failed("the kernel enforced none of the ruleset".into()));
    }
    Ok(Some(abi))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::fs;
    use std::os::fd::AsRawFd;

    fn errno_of_openat(dir: i32, name: &str, flags: i32) -> i32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: openat on a valid C string; a descriptor it returns is closed.
        let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
        if fd >= 0 {
            // SAFETY: we own the fresh descriptor.
            unsafe { libc::close(fd) };
            return 0;
        }
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }

    #[test]
    fn the_host_abi_is_what_the_kernel_reports() {
        let abi = host_abi();
        assert_eq!(sandbox_abi(), abi.filter(|v| *v >= MIN_ABI));
        let said = describe();
        match sandbox_abi() {
            Some(v) => assert!(said.contains(&format!("ABI {v}")), "{said}"),
            None => assert!(said.starts_with("no landlock"), "{said}"),
        }
    }

    /// A thread restricted beneath one directory opens, makes, renames and
    /// runs what is below it, and nothing below a descriptor of another
    /// directory it holds. (Landlock restricts the calling thread only, so
    /// the test's other threads are left as they were.)
    #[test]
    fn a_restricted_thread_opens_only_beneath_its_root() {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(inside.path().join("mine"), b"ok").unwrap();
        fs::create_dir(inside.path().join("sub")).unwrap();
        fs::write(outside.path().join("secret"), b"host").unwrap();
        let held = fs::File::open(outside.path()).unwrap();
        let root = inside.path().to_path_buf();
        let out = outside.path().to_path_buf();
        std::thread::spawn(move || {
            // Unprivileged test runs need no_new_privs to restrict themselves.
            // SAFETY: plain prctl with integer arguments; this thread only.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let applied = restrict_beneath(&root).unwrap();
            if applied.is_none() {
                eprintln!("no Landlock here: {}", describe());
                return;
            }
            // Beneath the root: everything as before.
            assert_eq!(fs::read(root.join("mine")).unwrap(), b"ok");
            fs::write(root.join("made"), b"x").unwrap();
            fs::rename(root.join("made"), root.join("sub/moved")).unwrap();
            fs::hard_link(root.join("sub/moved"), root.join("linked")).unwrap();
            fs::remove_file(root.join("linked")).unwrap();
            assert_eq!(fs::read_dir(&root).unwrap().count(), 2);
            // Below the held descriptor of another directory: nothing.
            let dir = held.as_raw_fd();
            assert_eq!(errno_of_openat(dir, "secret", libc::O_RDONLY), libc::EACCES);
            assert_eq!(
                errno_of_openat(dir, ".", libc::O_RDONLY | libc::O_DIRECTORY),
                libc::EACCES
            );
            assert_eq!(
                errno_of_openat(dir, "..", libc::O_RDONLY | libc::O_DIRECTORY),
                libc::EACCES
            );
            assert_eq!(
                errno_of_openat(dir, "new", libc::O_WRONLY | libc::O_CREAT),
                libc::EACCES
            );
            let by_path = fs::read(out.join("secret")).unwrap_err();
            assert_eq!(by_path.raw_os_error(), Some(libc::EACCES));
            let proc_path = format!("/proc/self/fd/{dir}/secret");
            assert_eq!(
                errno_of_openat(libc::AT_FDCWD, &proc_path, libc::O_RDONLY),
                libc::EACCES
            );
            // The descriptor itself is still good: Landlock checks opens.
            assert!(nix::sys::stat::fstat(dir).is_ok());
        })
        .join()
        .unwrap();
        // The test's own thread is untouched.
        assert_eq!(fs::read(outside.path().join("secret")).unwrap(), b"host");
    }
}

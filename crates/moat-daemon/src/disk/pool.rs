//! Images made ahead: what keeps a disk budget off `create`'s time.
//!
//! A budget's image costs two slow steps, mkfs (~10 ms) and the ext4 mount
//! of its loop device (~25 ms, in the kernel). The daemon makes [`SIZE`]
//! images of the default budget (`sandbox.disk`) ahead, in a thread of their
//! own, under `STATE/disk-pool/`: each is formatted for the sandboxes' root
//! (as [`super::create`] formats it), mounted on a directory beside it,
//! and taken off that directory again as a *detached* mount (open_tree's
//! clone) that only a descriptor of the daemon's holds. A `create` whose
//! budget is the default takes one: its file is renamed into the sandbox's
//! state directory (the same file system; the loop device keeps the open
//! file) and its detached mount attached on that directory (move_mount),
//! which takes microseconds and leaves exactly what [`super::create`]
//! makes: `disk.img` beneath a loop-device ext4 mount of it, `nodev,nosuid`,
//! its root the sandbox root's with mode 0700. Every take starts a refill in
//! the background; a budget of another size, or a pool that is empty (two
//! creates within one refill), gets its image made as before.
//!
//! Detached rather than mounted in place and moved with MS_MOVE: the
//! kernel refuses to move a mount whose parent mount is shared, as `/` is on
//! systemd hosts; and a detached mount goes with the descriptor that holds
//! it, so a daemon that dies, even by SIGKILL, leaves no mount and no loop
//! device, only its image files, which the next daemon deletes as it starts.
//! The one window is an image's own mount while it is being made (the
//! ~25 ms of the mount itself): the next daemon undoes what a daemon
//! killed there left, before it makes its own images.
//!
//! Each daemon starts its pool anew, for its configuration's size and its
//! sandboxes' owner, neither of which changes while it runs: an image of
//! an old `sandbox.disk` is never handed out. `sandbox reset` leaves the
//! pool alone; it holds no sandbox's files, and [`SIZE`] sparse images take
//! a few MiB of the host each.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_sandbox::detached::{self, Lookup};
use moat_sandbox::IdMap;

use super::{format_image, image_path, mount_private, unmount, DiskError};
use crate::sandboxes::lock;
use crate::{Config, Paths};

/// How many images are kept ready. Two: a refill takes ~35 ms, about two
/// creates' worth, so that two creates at once (a script starting two
/// agents, `run` on two workspaces) or one right after another both take
/// one; more would hold more loop devices and mounts for creates that
/// arrive faster than any refill, which fall back to making their own.
pub const SIZE: usize = 2;

/// After a failure (no mkfs.ext4, a full disk, a kernel without open_tree),
/// the pool rests this long before trying again; creates make their own.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The pool's directory under the state root.
pub fn dir(paths: &Paths) -> PathBuf {
    paths.state.join("disk-pool")
}

pub struct DiskPool {
    dir: PathBuf,
    /// The budget its images have; None where there is no pool (rootless,
    /// or no default budget).
    bytes: Option<u64>,
    /// The host ids of the sandboxes' root, which owns an image's root.
    owner: (u32, u32),
    inner: Mutex<Inner>,
    next: AtomicU64,
}

#[derive(Default)]
struct Inner {
    ready: Vec<Ready>,
    /// Whether a thread is filling the pool (at most one is).
    filling: bool,
    failed: Option<Instant>,
}

/// An image of the pool: its file, and its file system as a detached mount.
struct Ready {
    /// Where the file is; emptied once a sandbox has it.
    image: PathBuf,
    tree: OwnedFd,
}

impl Drop for Ready {
    /// An image nobody took: its file goes, and its mount with the descriptor
    /// (the loop device then goes by itself).
    fn drop(&mut self) {
        if !self.image.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.image);
        }
    }
}

impl DiskPool {
    /// The daemon's pool: what an earlier daemon left removed, then filled,
    /// both in a thread of its own so that the daemon's start does not wait.
    pub fn start(paths: &Paths, config: &Config, idmap: &IdMap) -> Arc<DiskPool> {
        let bytes = if idmap.rootless {
            None
        } else {
            config.default_disk().ok().flatten()
        };
        let pool = Arc::new(DiskPool {
            dir: dir(paths),
            bytes,
            owner: (
                idmap.host_uid(0).unwrap_or(0),
                idmap.host_gid(0).unwrap_or(0),
            ),
            inner: Mutex::new(Inner {
                filling: true,
                ..Default::default()
            }),
            next: AtomicU64::new(0),
        });
        pool.spawn(true);
        pool
    }

    /// Give `state_dir` an image of the pool's, when it has one of `bytes`
    /// for `owner`: renamed to `disk.img` there, its file system mounted on
    /// it. False when the caller must make its own (nothing is left
    /// behind then).
    pub fn take(self: &Arc<Self>, state_dir: &Path, bytes: u64, owner: (u32, u32)) -> bool {
        if self.bytes != Some(bytes) || self.owner != owner {
            return false;
        }
        let ready = {
            let mut inner = lock(&self.inner);
            let ready = inner.ready.pop();
            self.refill(&mut inner);
            ready
        };
        let Some(ready) = ready else {
            return false;
        };
        match ready.install(state_dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot give a sandbox an image made ahead ({e}); it gets one of its own, and the pool rests");
                lock(&self.inner).failed = Some(Instant::now());
                false
            }
        }
    }

    /// Start filling the pool, unless a thread is at it, it is full, or it
    /// failed a moment ago.
    fn refill(self: &Arc<Self>, inner: &mut Inner) {
        let resting = inner.failed.is_some_and(|at| at.elapsed() < RETRY_AFTER);
        if inner.filling || inner.ready.len() >= SIZE || resting || self.bytes.is_none() {
            return;
        }
        inner.filling = true;
        self.spawn(false);
    }

    fn spawn(self: &Arc<Self>, clean: bool) {
        let pool = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("disk-pool".into())
            .spawn(move || pool.fill(clean));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the thread that makes disk images ahead: {e}");
            lock(&self.inner).filling = false;
        }
    }

    /// Until the pool is full; `clean` first removes what another daemon
    /// left. Clears `filling` under the same lock that decides to stop, so
    /// that a take never finds it set by a thread that has stopped.
    fn fill(&self, clean: bool) {
        // Behind what runs in the foreground: a take's refill starts while
        // its sandbox starts. Linux gives each thread its own nice value,
        // and mkfs and mount inherit it.
        // SAFETY: setpriority on this thread (0), no pointers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        if clean {
            self.clean();
        }
        loop {
            let made = {
                let mut inner = lock(&self.inner);
                match self.bytes {
                    Some(bytes) if inner.ready.len() < SIZE => bytes,
                    _ => {
                        inner.filling = false;
                        return;
                    }
                }
            };
            match self.make(made) {
                Ok(ready) => lock(&self.inner).ready.push(ready),
                Err(e) => {
                    tracing::warn!("cannot make a disk image ahead ({e}); sandboxes get theirs as they are created");
                    let mut inner = lock(&self.inner);
                    inner.filling = false;
                    inner.failed = Some(Instant::now());
                    return;
                }
            }
        }
    }

    /// What an earlier daemon left in the pool's directory: its images'
    /// files (their mounts went with it), and a mount it was making when it
    /// died, undone first.
    fn clean(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let gone = if is_dir {
                if let Err(e) = unmount(&path) {
                    tracing::warn!("{e}");
                    continue;
                }
                // Not remove_dir_all: never into a file system still there.
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = gone {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    /// A new image: formatted, mounted on a directory beside it, and taken
    /// off it again as a detached mount. Nothing is left on failure.
    fn make(&self, bytes: u64) -> Result<Ready, DiskError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|err| DiskError::Io {
                what: "create",
                path: self.dir.clone(),
                err,
            })?;
        let stem = format!(
            "{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let image = self.dir.join(format!("{stem}.img"));
        let at = self.dir.join(stem);
        let made = format_image(&image, bytes, self.owner)
            .and_then(|()| {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&at)
                    .map_err(|err| DiskError::Io {
                        what: "create",
                        path: at.clone(),
                        err,
                    })
            })
            .and_then(|()| mount_private(&image, &at))
            .and_then(|()| detach(&at));
        let _ = unmount(&at);
        let _ = fs::remove_dir(&at);
        match made {
            Ok(tree) => Ok(Ready { image, tree }),
            Err(e) => {
                let _ = fs::remove_file(&image);
                Err(e)
            }
        }
    }

    /// How many images are ready.
    #[cfg(test)]
    fn ready(&self) -> usize {
        lock(&self.inner).ready.len()
    }
}

impl Ready {
    fn install(mut self, state_dir: &Path) -> Result<(), DiskError> {
        let image = image_path(state_dir);
        fs::rename(&self.image, &image).map_err(|err| DiskError::Io {
            what: "rename into the sandbox's directory",
            path: self.image.clone(),
            err,
        })?;
        // From here, a failure removes the sandbox's copy.
        self.image = image;
        detached::attach(&self.tree, state_dir)?;
        // The sandbox's now: its mount stays when the descriptor goes.
        self.image = PathBuf::new();
        Ok(())
    }
}

/// The mount on `at` as a detached mount (with moat-sandbox's mount calls),
/// and `at` unmounted.
fn detach(at: &Path) -> Result<OwnedFd, DiskError> {
    let opened = detached::open_path(at, Lookup::Own)?;
    let tree = detached::clone_tree(&opened, false)?;
    drop(opened);
    unmount(at)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path, bytes: Option<u64>) -> Arc<DiskPool> {
        Arc::new(DiskPool {
            dir: dir.to_path_buf(),
            bytes,
            owner: (0, 0),
            inner: Mutex::new(Inner::default()),
            next: AtomicU64::new(0),
        })
    }

    #[test]
    fn another_size_or_owner_or_no_pool_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let p = pool(dir.path(), Some(64 << 20));
        assert!(!p.take(target.path(), 128 << 20, (0, 0)));
        assert!(!p.take(target.path(), 64 << 20, (1, 1)));
        // Empty (nothing made yet): the caller makes its own.
        lock(&p.inner).failed = Some(Instant::now());
        assert!(!p.take(target.path(), 64 << 20, (0, 0)));
        assert!(!lock(&p.inner).filling, "a resting pool starts no thread");
        let none = pool(dir.path(), None);
        assert!(!none.take(target.path(), 64 << 20, (0, 0)));
        assert!(!image_path(target.path()).exists());
    }

    #[test]
    fn what_an_earlier_daemon_left_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("1-0.img"), b"x").unwrap();
        fs::create_dir(dir.path().join("1-1")).unwrap();
        let p = pool(dir.path(), None);
        p.clean();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(p.ready(), 0);
    }

    #[test]
    fn an_image_made_ahead_ends_as_create_makes_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting an image needs root");
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let p = pool(&dir.path().join("pool"), Some(32 << 20));
        let ready = p.make(32 << 20).unwrap();
        let made = ready.image.clone();
        // Only the image is left beside it; its mount is the descriptor's.
        let left: Vec<_> = fs::read_dir(&p.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, vec![made.clone()]);
        lock(&p.inner).ready.push(ready);
        lock(&p.inner).failed = Some(Instant::now());

        let target = dir.path().join("sandbox");
        fs::DirBuilder::new().mode(0o755).create(&target).unwrap();
        assert!(p.take(&target, 32 << 20, (0, 0)));
        assert!(!made.exists());
        assert!(super::super::mounted(&target));
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
        assert!(
            target.join("lost+found").is_dir(),
            "the image's file system"
        );
        // Mounted again as a sandbox's after a reboot: the same image.
        unmount(&target).unwrap();
        assert!(!target.join("lost+found").exists());
        assert!(super::super::ensure_mounted(&target).unwrap());
        assert!(target.join("lost+found").is_dir());
        unmount(&target).unwrap();
        assert_eq!(p.ready(), 0);
    }

    #[test]
    fn an_image_nobody_took_goes_with_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x.img");
        fs::write(&image, b"x").unwrap();
        let tree: OwnedFd = fs::File::open(dir.path()).unwrap().into();
        drop(Ready {
            image: image.clone(),
            tree,
        });
        assert!(!image.exists());
    }
}

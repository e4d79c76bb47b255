//! Disk budgets: what a sandbox may write, its own layer and its in-memory
//! file systems, held to a size so that a sandbox that fills its disk gets
//! ENOSPC inside while the host's free space stays as it was.
//!
//! As root, a sandbox with a budget has its state directory (the directory
//! that holds `upper/` and `work/`, the overlay's upper layer and its work
//! directory) on an ext4 file system of its own: a sparse image file of the
//! budget's size, `disk.img` in that directory, mounted (loop device,
//! `nodev,nosuid`) over the directory itself. Every path the rest of the
//! daemon uses (`upper/`, `work/`, the CA, init's log) stays what it was and
//! lands inside the image; only the image itself is beneath the mount. The
//! mount stays while the sandbox exists, stopped or running, and is made
//! again where it is missing (after a reboot, or under a daemon that runs in
//! a mount namespace of its own) before a start and when the daemon starts;
//! `rm` unmounts it and the state directory goes with the image in it.
//!
//! The in-memory file system a sandbox can write (`/dev/shm`) gets a size
//! from the budget too (see [`tmpfs_size`]), rootless as well. Rootless, no
//! file system can be mounted for the layer: the budget is recorded as not
//! enforced, with the reason, and `create` says so.
//!
//! The image of a budget of the default size is made ahead (see [`pool`]):
//! `create` then only renames a file and attaches a mount.

pub mod pool;

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_api::{DiskLimit, Limits, SandboxInfo};

use crate::sandboxes::Daemon;
use crate::server::Replies;
use crate::state::SandboxRow;
use crate::DaemonError;

/// The smallest budget worth a sandbox: the ext4 file system's own
/// metadata and journal take a few MiB, and a package install more.
pub const MIN_BUDGET: u64 = 32 << 20;

/// The image's name in the sandbox's state directory.
pub const IMAGE: &str = "disk.img";

/// What enforces a budget, as `inspect` shows it.
pub const BY_LOOP: &str = "ext4 image on a loop device";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("a disk budget of {} is too small: a sandbox needs at least {}; give e.g. --disk 10g, or --disk 0 for no budget", human(*.0), human(MIN_BUDGET))]
    TooSmall(u64),
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{tool} is not installed (it comes with {package})")]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("cannot unmount {}: {err}", dir.display())]
    Unmount { dir: PathBuf, err: nix::Error },
    #[error("the disk image of this sandbox ({}) is missing, and with it the sandbox's files; remove the sandbox and create it again", path.display())]
    ImageMissing { path: PathBuf },
    #[error(transparent)]
    Mount(#[from] moat_sandbox::SandboxError),
}

impl From<DiskError> for DaemonError {
    fn from(e: DiskError) -> DaemonError {
        match e {
            DiskError::TooSmall(_) => DaemonError::BadRequest(e.to_string()),
            other => DaemonError::io(
                "the sandbox's disk image",
                std::io::Error::other(other.to_string()),
            ),
        }
    }
}

/// A budget as asked: 0 is none, anything else must be worth a sandbox.
pub fn check_budget(bytes: u64) -> Result<Option<u64>, DiskError> {
    match bytes {
        0 => Ok(None),
        b if b < MIN_BUDGET => Err(DiskError::TooSmall(b)),
        b => Ok(Some(b)),
    }
}

/// The size of `/dev/shm`: a quarter of the disk budget, and at most half
/// the memory limit, since what a tmpfs holds is memory (charged to the
/// sandbox's memory cgroup, where there is one): a sandbox that fills it
/// gets ENOSPC rather than the OOM killer. None, for the default size, when
/// the sandbox has neither.
pub fn tmpfs_size(limits: &Limits) -> Option<u64> {
    let by_disk = limits.disk.bytes.map(|b| b / 4);
    let by_memory = limits.memory.map(|m| m / 2);
    match (by_disk, by_memory) {
        (Some(d), Some(m)) => Some(d.min(m)),
        (d, m) => d.or(m),
    }
}

/// `64m`, `10g`, `1.5g`: a size as the flags take it.
pub fn human(bytes: u64) -> String {
    for (unit, shift) in [("t", 40), ("g", 30), ("m", 20), ("k", 10)] {
        let size = 1u64 << shift;
        if bytes >= size {
            if bytes.is_multiple_of(size) {
                return format!("{}{unit}", bytes >> shift);
            }
            return format!("{:.1}{unit}", bytes as f64 / size as f64);
        }
    }
    bytes.to_string()
}

pub fn image_path(state_dir: &Path) -> PathBuf {
    state_dir.join(IMAGE)
}

/// Make the budget's image in `state_dir` and mount it there. The file
/// system's root, which becomes `state_dir`, belongs to `owner` with mode
/// 0700, as the directory did. Nothing is left behind on failure.
pub fn create(state_dir: &Path, bytes: u64, owner: (u32, u32)) -> Result<(), DiskError> {
    let image = image_path(state_dir);
    let made = format_image(&image, bytes, owner).and_then(|()| mount_private(&image, state_dir));
    if made.is_err() {
        let _ = unmount(state_dir);
        let _ = fs::remove_file(&image);
    }
    made
}

/// A sparse file of `bytes` at `image` (which must not exist), with an
/// empty ext4 file system whose root belongs to `owner`. On failure the
/// caller removes what is left.
fn format_image(image: &Path, bytes: u64, owner: (u32, u32)) -> Result<(), DiskError> {
    let io = |what, err| DiskError::Io {
        what,
        path: image.to_path_buf(),
        err,
    };
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(|e| io("create", e))
        // Sparse: the host gives it blocks only as the sandbox writes.
        .and_then(|f| f.set_len(bytes).map_err(|e| io("size", e)))
        .and_then(|()| mkfs(image, owner))
}

/// `image` mounted on `dir`, its root (which `dir` now shows) mode 0700.
/// On failure the caller unmounts what is left.
fn mount_private(image: &Path, dir: &Path) -> Result<(), DiskError> {
    mount(image, dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| DiskError::Io {
        what: "chmod",
        path: dir.to_path_buf(),
        err: e,
    })
}

/// Mount the image of `state_dir` there unless it is mounted already.
/// Returns whether the directory is now the image's file system; false
/// where it has no image (no budget, rootless, or an older moat's).
pub fn ensure_mounted(state_dir: &Path) -> Result<bool, DiskError> {
    if mounted(state_dir) {
        return Ok(true);
    }
    let image = image_path(state_dir);
    if !image.is_file() {
        return Ok(false);
    }
    mount(&image, state_dir)?;
    Ok(true)
}

/// Undo every mount on `state_dir`. Detached lazily: what still uses the
/// file system (a sandbox's overlay while its last processes end) keeps it
/// until it lets go, and the loop device then goes by itself (autoclear).
pub fn unmount(state_dir: &Path) -> Result<(), DiskError> {
    for _ in 0..16 {
        if !mounted(state_dir) {
            return Ok(());
        }
        nix::mount::umount2(state_dir, nix::mount::MntFlags::MNT_DETACH).map_err(|err| {
            DiskError::Unmount {
                dir: state_dir.to_path_buf(),
                err,
            }
        })?;
    }
    Ok(())
}

/// Whether something is mounted on `dir`, from this process's mount table.
pub fn mounted(dir: &Path) -> bool {
    let Ok(dir) = fs::canonicalize(dir) else {
        return false;
    };
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let found = mount_points(&text).any(|p| p == dir);
    found
}

/// The mount points in the text of `/proc/PID/mountinfo` (field 5, with
/// its octal escapes of space, tab, newline and backslash undone).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo.lines().filter_map(|line| {
        let field = line.split(' ').nth(4)?;
        Some(PathBuf::from(unescape(field)))
    })
}

fn unescape(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'))) {
            Some(n) if n <= 0xff => {
                out.push(n as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// An ext4 file system in `image`, its root owned by `owner`, with no
/// blocks reserved for root (the budget is all the sandbox's) and nothing
/// zeroed ahead (the inode tables and the journal of a fresh sparse file
/// read as zeros already), so that the image starts at a few MiB on the
/// host whatever the budget.
fn mkfs(image: &Path, owner: (u32, u32)) -> Result<(), DiskError> {
    let extended = format!(
        "root_owner={}:{},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        owner.0, owner.1
    );
    run(
        "mkfs.ext4",
        "e2fsprogs",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-L".as_ref(),
            "moat-sandbox".as_ref(),
            "-E".as_ref(),
            extended.as_ref(),
            image.as_os_str(),
        ],
    )
}

/// Mount `image` on `dir` through a loop device.
///
/// By mount(8) (`-o loop`) rather than by the loop ioctls ourselves
/// (LOOP_CTL_GET_FREE, LOOP_CONFIGURE): it takes a free device without
/// racing other users of loop-control, falls back where LOOP_CONFIGURE is
/// missing (kernels before 5.8), sets autoclear so that the device goes
/// with the last unmount, and, above all, reuses the loop device that
/// already backs `image` where there is one (an adopted sandbox's overlay
/// still holds it when its mount must be made again), so that one image
/// never gets two devices and two ext4 instances writing it at once.
/// `noinit_itable`: the kernel would otherwise zero the inode tables in the
/// background, giving the sparse image blocks that nothing uses.
fn mount(image: &Path, dir: &Path) -> Result<(), DiskError> {
    run(
        "mount",
        "util-linux",
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop,nodev,nosuid,noinit_itable".as_ref(),
            image.as_os_str(),
            dir.as_os_str(),
        ],
    )
}

/// Run a system tool, found on PATH or in the sbin directories (a daemon
/// started from a user's shell may not have them on its PATH).
fn run(
    tool: &'static str,
    package: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<(), DiskError> {
    let path = find_tool(tool).ok_or(DiskError::Missing { tool, package })?;
    let out = Command::new(&path)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| DiskError::Tool {
            tool,
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(DiskError::Tool {
        tool,
        detail: if said.is_empty() {
            out.status.to_string()
        } else {
            said.join("; ")
        },
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Bytes free to unprivileged users on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

impl Daemon {
    /// The disk budget a new sandbox gets: the one asked for, else the
    /// configured default; validated before anything is made.
    ///
    /// Template builds ask for none and so get the default, as every
    /// sandbox does: their steps run third-party install scripts (npm's,
    /// apt's), which are what a budget keeps from filling the host, and the
    /// layer they leave is read from the mounted image like any sandbox's.
    /// A recipe that needs more than the default is built after raising
    /// `sandbox.disk` (its step then fails with ENOSPC in its output).
    pub(crate) fn disk_budget(&self, asked: Option<u64>) -> Result<Option<u64>, DaemonError> {
        match asked {
            Some(bytes) => Ok(check_budget(bytes)?),
            None => self.config.default_disk(),
        }
    }

    /// At create, once the state directory exists: the budget's image,
    /// mounted there. Returns the budget as it stands; where it cannot be
    /// enforced, the sandbox is made without it and the caller is told in
    /// one line.
    pub(crate) fn make_disk(&self, info: &SandboxInfo, r: &Replies) -> DiskLimit {
        let Some(bytes) = info.limits.disk.bytes else {
            return DiskLimit {
                bytes: None,
                enforced: false,
                by: "no budget (--disk 0, or sandbox.disk = \"0\")".into(),
            };
        };
        let shm = tmpfs_size(&info.limits).map_or_else(|| "its default size".into(), human);
        let made = if self.rootless() {
            Err("the daemon runs rootless and cannot mount a file system for the sandbox's layer (as root it would be an ext4 image on a loop device)".to_string())
        } else {
            let dir = self.paths.sandbox_state(&info.id);
            let owner = (
                self.idmap.host_uid(0).unwrap_or(0),
                self.idmap.host_gid(0).unwrap_or(0),
            );
            if self.disk_pool.take(&dir, bytes, owner) {
                Ok(())
            } else {
                create(&dir, bytes, owner).map_err(|e| e.to_string())
            }
        };
        match made {
            Ok(()) => {
                let state = &self.paths.state;
                if let Some(free) = free_bytes(state).filter(|f| *f < bytes) {
                    r.warning(format!(
                        "the disk budget of sandbox {} ({}) is more than the {} free under {}: the host's disk can fill before the budget does",
                        info.name,
                        human(bytes),
                        human(free),
                        state.display()
                    ));
                }
                DiskLimit {
                    bytes: Some(bytes),
                    enforced: true,
                    by: BY_LOOP.into(),
                }
            }
            Err(reason) => {
                let by = format!("not enforced: {reason}; /dev/shm is held to {shm}");
                r.warning(format!(
                    "the disk budget of sandbox {} ({}) is {by}",
                    info.name,
                    human(bytes)
                ));
                DiskLimit {
                    bytes: Some(bytes),
                    enforced: false,
                    by,
                }
            }
        }
    }

    /// Before a start: the sandbox's image mounted on its state directory,
    /// where it has one and it is not mounted (after a reboot). A sandbox
    /// whose budget is enforced and whose image is gone does not start: its
    /// files were in it.
    pub(crate) fn mount_disk(&self, info: &SandboxInfo) -> Result<(), DaemonError> {
        if self.rootless() {
            return Ok(());
        }
        let dir = self.paths.sandbox_state(&info.id);
        let has_image = ensure_mounted(&dir).map_err(|e| {
            DaemonError::BadRequest(format!(
                "cannot mount the disk image of sandbox {} ({}): {e}",
                info.name,
                image_path(&dir).display()
            ))
        })?;
        if !has_image && info.limits.disk.enforced {
            return Err(DaemonError::BadRequest(format!(
                "sandbox {}: {}",
                info.name,
                DiskError::ImageMissing {
                    path: image_path(&dir)
                }
            )));
        }
        Ok(())
    }

    /// When the daemon starts: every sandbox's image mounted again where it
    /// is not (after a reboot), so that its files are where the daemon
    /// looks for them (`save`, a template build's layer) before any start.
    pub(crate) fn remount_disks(&self, rows: &[SandboxRow]) {
        for row in rows.iter().filter(|r| r.phase != "creating") {
            if let Err(e) = self.mount_disk(&row.info) {
                tracing::warn!(name = %row.info.name, "{e}");
            }
        }
    }

    /// On `rm`, before the state directory goes: its mount undone.
    pub(crate) fn unmount_disk(&self, id: &str) {
        if let Err(e) = unmount(&self.paths.sandbox_state(id)) {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: Option<u64>, disk: Option<u64>) -> Limits {
        Limits {
            memory,
            disk: DiskLimit {
                bytes: disk,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn budgets_are_none_or_big_enough() {
        assert_eq!(check_budget(0).unwrap(), None);
        assert_eq!(check_budget(64 << 20).unwrap(), Some(64 << 20));
        let err = check_budget(1024).unwrap_err().to_string();
        assert_eq!(
            err,
            "a disk budget of 1k is too small: a sandbox needs at least 32m; give e.g. --disk 10g, or --disk 0 for no budget"
        );
        assert!(matches!(
            DaemonError::from(DiskError::TooSmall(1)),
            DaemonError::BadRequest(_)
        ));
    }

    #[test]
    fn shm_is_a_quarter_of_the_budget_and_at_most_half_the_memory() {
        assert_eq!(tmpfs_size(&limits(None, None)), None);
        assert_eq!(tmpfs_size(&limits(None, Some(64 << 20))), Some(16 << 20));
        assert_eq!(tmpfs_size(&limits(Some(4 << 30), None)), Some(2 << 30));
        assert_eq!(
            tmpfs_size(&limits(Some(4 << 30), Some(10 << 30))),
            Some(2 << 30)
        );
        assert_eq!(
            tmpfs_size(&limits(Some(256 << 20), Some(64 << 20))),
            Some(16 << 20)
        );
    }

    #[test]
    fn sizes_print_as_the_flags_take_them() {
        assert_eq!(human(64 << 20), "64m");
        assert_eq!(human(10 << 30), "10g");
        assert_eq!(human(3 << 29), "1.5g");
        assert_eq!(human(1000), "1000");
    }

    #[test]
    fn mount_points_are_read_with_their_escapes_undone() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    45 27 7:0 / /var/lib/moat/sandboxes/ab\\040cd rw,nosuid,nodev shared:1 - ext4 /dev/loop0 rw\n";
        let points: Vec<PathBuf> = mount_points(text).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/"),
                PathBuf::from("/var/lib/moat/sandboxes/ab cd")
            ]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("no\\escape\\9"), "no\\escape\\9");
        assert!(mounted(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!mounted(dir.path()));
    }

    #[test]
    fn a_directory_without_an_image_has_nothing_to_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ensure_mounted(dir.path()).unwrap());
        unmount(dir.path()).unwrap();
    }

    #[test]
    fn a_failed_image_leaves_nothing_behind() {
        // A budget bigger than any file may be: the image cannot be sized.
        let dir = tempfile::tempdir().unwrap();
        let err = create(dir.path(), u64::MAX, (0, 0)).unwrap_err();
        assert!(matches!(err, DiskError::Io { what: "size", .. }), "{err}");
        assert!(!image_path(dir.path()).exists());
    }
}

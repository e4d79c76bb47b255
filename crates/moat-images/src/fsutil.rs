//! File-system helpers that make the store crash-safe: temp names that the
//! sweeper recognises, write + fsync + rename, and removal of trees that an
//! unpacked layer may have made read-only.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::ImageError;

/// Marker in every temp name; anything carrying it is never a finished object.
pub const TMP_MARK: &str = ".tmp";
/// Temp names of trees being deleted: always safe to finish removing.
pub const TRASH_MARK: &str = ".tmp-rm";
/// Temp files older than this are left-overs of a crashed writer.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh, unique temp name, e.g. `<stem>.tmp-<pid>-<n><suffix>`.
pub fn tmp_name(stem: &str, suffix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{stem}{TMP_MARK}-{}-{n}{suffix}", std::process::id())
}

/// Makes a rename or create in `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(format!("sync directory {}", dir.display()), e))
}

/// Writes `bytes` to `dir/name` so that readers see either the old file or
/// the whole new one, even across a crash.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = dir.join(tmp_name(name, ""));
    let target = dir.join(name);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &target)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::io(format!("write {}", target.display()), e));
    }
    fsync_dir(dir)
}

/// Removes a file or a whole tree, tolerating a concurrent remover and
/// making read-only directories writable first (an unpacked 0555 dir
/// would otherwise stop an unprivileged remove).
pub fn remove_tree(path: &Path) -> Result<(), ImageError> {
    let what = || format!("remove {}", path.display());
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io(what(), e)),
    };
    if !meta.is_dir() {
        return match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::io(what(), e)),
            _ => Ok(()),
        };
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ImageError::io(what(), e)),
                _ => Ok(()),
            }
        }
    }
}

fn make_dirs_writable(dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_dirs_writable(&entry.path());
            }
        }
    }
}

/// Moves `path` aside under a trash name and then removes it, so that a
/// crash half-way never leaves a half-deleted object under its real name.
pub fn trash_and_remove(path: &Path) -> Result<(), ImageError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return remove_tree(path);
    };
    let trash = parent.join(format!(
        "{}{TRASH_MARK}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    match fs::rename(path, &trash) {
        Ok(()) => remove_tree(&trash),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io(format!("remove {}", path.display()), e)),
    }
}

/// Removes temp objects in `dir` that crashed writers left behind: trash at
/// once, other temp names once they are older than `STALE_AFTER`.
pub fn sweep_stale_tmp(dir: &Path, now: SystemTime) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.contains(TMP_MARK) {
            continue;
        }
        let stale = name.contains(TRASH_MARK)
            || entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE_AFTER);
        if stale {
            let path = entry.path();
            match remove_tree(&path) {
                Ok(()) => removed.push(path),
                Err(e) => tracing::warn!("could not remove stale temp {}: {e}", path.display()),
            }
        }
    }
    removed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn removes_read_only_trees() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), b"x").unwrap();
        fs::set_permissions(tree.join("a/b"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(tree.join("a"), fs::Permissions::from_mode(0o555)).unwrap();
        trash_and_remove(&tree).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // Removing what is already gone is fine: another process got there first.
        remove_tree(&tree).unwrap();
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"one").unwrap();
        write_atomic(dir.path(), "f", b"two").unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["f".to_string()]);
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
    }
}

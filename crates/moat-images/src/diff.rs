//! A sandbox's changes as an OCI layer: its overlayfs upper directory
//! written as a tar, with overlayfs's markers turned back into OCI
//! whiteouts (a character device 0/0 becomes `.wh.NAME`, a directory with
//! `user.overlay.opaque=y` gets a `.wh..wh..opq` entry).
//!
//! The upper directory is the sandbox's to write, so it is hostile: the walk
//! holds a directory descriptor at each level and opens every child relative
//! to it with `O_NOFOLLOW`, so a symlink planted there is archived as a
//! symlink and never followed, and nothing outside the directory is read.
//! The output is reproducible: entries in byte order of their names, mtimes
//! clamped to a given time, no user or group names.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use tar::{EntryType, Header};

use crate::error::ImageError;
use crate::unpack::{OPAQUE_MARKER, OVERLAY_OPAQUE_XATTR, WHITEOUT_PREFIX};

/// What a layer holds, and what of the upper directory it could not hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerSummary {
    pub entries: u64,
    pub whiteouts: u64,
    /// Sockets, fifos and device nodes: they cannot be part of an image.
    pub skipped: Vec<String>,
}

/// Writes `upper` (an overlayfs upper directory) as a layer tar to `out`,
/// clamping every mtime to at most `clamp_mtime`.
pub fn write_upper_layer<W: Write>(
    upper: &Path,
    clamp_mtime: u64,
    out: W,
) -> Result<LayerSummary, ImageError> {
    let err = |e: nix::Error| ImageError::io(format!("open {}", upper.display()), e.into());
    let root = open_dir(libc::AT_FDCWD, upper.as_os_str()).map_err(err)?;
    let mut walk = Walk {
        upper,
        tar: tar::Builder::new(out),
        clamp_mtime,
        hard_links: HashMap::new(),
        summary: LayerSummary::default(),
    };
    walk.dir(&root, Path::new(""))?;
    let mut out = walk
        .tar
        .into_inner()
        .map_err(|e| ImageError::io("finish the layer tar", e))?;
    out.flush()
        .map_err(|e| ImageError::io("write the layer tar", e))?;
    Ok(walk.summary)
}

struct Walk<'a, W: Write> {
    upper: &'a Path,
    tar: tar::Builder<W>,
    clamp_mtime: u64,
    /// (device, inode) of files with several links -> the first path archived.
    hard_links: HashMap<(u64, u64), PathBuf>,
    summary: LayerSummary,
}

fn open_dir(dir: RawFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let fd = openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in a directory, sorted by bytes, without `.` and `..`.
fn sorted_names(dir: &OwnedFd) -> nix::Result<Vec<OsString>> {
    let dup = nix::unistd::dup(dir.as_raw_fd())?;
    let mut listing = nix::dir::Dir::from_fd(dup)?;
    let mut names: Vec<OsString> = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let Ok(key) = CString::new(OVERLAY_OPAQUE_XATTR) else {
        return false;
    };
    let mut value = [0u8; 4];
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of that length.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            key.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

impl<W: Write> Walk<'_, W> {
    fn fail(&self, rel: &Path, e: impl Into<io::Error>) -> ImageError {
        ImageError::io(format!("save {}", self.upper.join(rel).display()), e.into())
    }

    fn header(&self, kind: EntryType, st: &FileStat, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        h.set_mtime((st.st_mtime.max(0) as u64).min(self.clamp_mtime));
        h.set_size(size);
        h
    }

    fn empty_file(&mut self, path: &Path) -> Result<(), ImageError> {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        self.tar
            .append_data(&mut h, path, io::empty())
            .map_err(|e| self.fail(path, e))?;
        self.summary.whiteouts += 1;
        Ok(())
    }

    fn dir(&mut self, dir: &OwnedFd, rel: &Path) -> Result<(), ImageError> {
        let names = sorted_names(dir).map_err(|e| self.fail(rel, e))?;
        for name in names {
            let child = rel.join(&name);
            let st = fstatat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.fail(&child, e))?;
            let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            match kind {
                SFlag::S_IFCHR if st.st_rdev == 0 => {
                    let mut marker = OsString::from(WHITEOUT_PREFIX);
                    marker.push(&name);
                    self.empty_file(&rel.join(marker))?;
                }
                SFlag::S_IFDIR => {
                    let fd = open_dir(dir.as_raw_fd(), &name).map_err(|e| self.fail(&child, e))?;
                    let now = fstat(fd.as_raw_fd()).map_err(|e| self.fail(&child, e))?;
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
                        return Err(self.changed(&child));
                    }
                    let mut h = self.header(EntryType::Directory, &st, 0);
                    self.tar
                        .append_data(&mut h, &child, io::empty())
                        .map_err(|e| self.fail(&child, e))?;
                    self.summary.entries += 1;
                    if is_opaque(&fd) {
                        self.empty_file(&child.join(OPAQUE_MARKER))?;
                    }
                    self.dir(&fd, &child)?;
                }
                SFlag::S_IFREG => self.file(dir, &name, &child, &st)?,
                SFlag::S_IFLNK => {
                    let target = readlinkat(Some(dir.as_raw_fd()), name.as_os_str())
                        .map_err(|e| self.fail(&child, e))?;
                    let mut h = self.header(EntryType::Symlink, &st, 0);
                    self.tar
                        .append_link(&mut h, &child, &target)
                        .map_err(|e| self.fail(&child, e))?;
                    self.summary.entries += 1;
                }
                _ => self.summary.skipped.push(child.display().to_string()),
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &Path,
        st: &FileStat,
    ) -> Result<(), ImageError> {
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.hard_links.get(&key).cloned() {
                let mut h = self.header(EntryType::Link, st, 0);
                self.tar
                    .append_link(&mut h, rel, &first)
                    .map_err(|e| self.fail(rel, e))?;
                self.summary.entries += 1;
                return Ok(());
            }
            self.hard_links.insert(key, rel.to_path_buf());
        }
        let fd = openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.fail(rel, e))?;
        // SAFETY: a fresh descriptor from openat, owned by this File alone.
        let file = unsafe { File::from_raw_fd(fd) };
        let now = fstat(file.as_fd().as_raw_fd()).map_err(|e| self.fail(rel, e))?;
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size) {
            return Err(self.changed(rel));
        }
        let mut h = self.header(EntryType::Regular, st, st.st_size.max(0) as u64);
        self.tar
            .append_data(&mut h, rel, file)
            .map_err(|e| self.fail(rel, e))?;
        self.summary.entries += 1;
        Ok(())
    }

    fn changed(&self, rel: &Path) -> ImageError {
        self.fail(
            rel,
            io::Error::other("it changed while being saved; stop the sandbox and save again"),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn c_path(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn entries(tar_bytes: &[u8]) -> Vec<(String, char, String, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type().as_byte() as char,
                    e.link_name()
                        .unwrap()
                        .map(|l| l.display().to_string())
                        .unwrap_or_default(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn archives_changes_and_whiteouts_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("etc/apt")).unwrap();
        fs::write(upper.join("etc/apt/new"), b"hi").unwrap();
        fs::hard_link(upper.join("etc/apt/new"), upper.join("etc/apt/same")).unwrap();
        symlink("/etc/shadow", upper.join("etc/shadow-link")).unwrap();
        fs::create_dir(upper.join("b")).unwrap();
        fs::write(upper.join("b/z"), b"z").unwrap();
        fs::write(upper.join("b/a"), b"a").unwrap();
        fs::set_permissions(upper.join("b/a"), fs::Permissions::from_mode(0o4755)).unwrap();
        nix::sys::stat::mknod(&upper.join("etc/issue"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        nix::unistd::mkfifo(&upper.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let key = CString::new(OVERLAY_OPAQUE_XATTR).unwrap();
        // SAFETY: valid C strings and value.
        let rc = unsafe {
            libc::lsetxattr(
                c_path(&upper.join("etc/apt")).as_ptr(),
                key.as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());

        let mut out = Vec::new();
        let summary = write_upper_layer(&upper, 1_000, &mut out).unwrap();
        assert_eq!(
            entries(&out),
            vec![
                ("b".into(), '5', "".into(), 1_000),
                ("b/a".into(), '0', "".into(), 1_000),
                ("b/z".into(), '0', "".into(), 1_000),
                ("etc".into(), '5', "".into(), 1_000),
                ("etc/apt".into(), '5', "".into(), 1_000),
                ("etc/apt/.wh..wh..opq".into(), '0', "".into(), 0),
                ("etc/apt/new".into(), '0', "".into(), 1_000),
                ("etc/apt/same".into(), '1', "etc/apt/new".into(), 1_000),
                ("etc/.wh.issue".into(), '0', "".into(), 0),
                ("etc/shadow-link".into(), '2', "/etc/shadow".into(), 1_000),
            ]
        );
        assert_eq!(
            summary,
            LayerSummary {
                entries: 8,
                whiteouts: 2,
                skipped: vec!["fifo".into()]
            }
        );
        let mut again = Vec::new();
        write_upper_layer(&upper, 1_000, &mut again).unwrap();
        assert_eq!(out, again, "the same directory gives the same bytes");

        // The layer unpacks back into the overlayfs markers it came from.
        let blob = tmp.path().join("layer.tar");
        fs::write(&blob, &out).unwrap();
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).unwrap();
        crate::unpack_layer(&blob, &dest).unwrap();
        let mut back = Vec::new();
        write_upper_layer(&dest, 1_000, &mut back).unwrap();
        assert_eq!(entries(&back), entries(&out));
    }
}

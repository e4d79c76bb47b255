//! A sandbox's changes as an OCI layer: its overlayfs upper directory
//! written as a tar, with overlayfs's markers turned back into OCI
//! whiteouts (a character device 0/0 becomes `.wh.NAME`, a directory with
//! `user.overlay.opaque=y` gets a `.wh..wh..opq` entry).
//!
//! Only those markers become whiteouts. A file the sandbox itself named
//! `.wh.…` would be read as one by every unpacker (OCI has no escape for
//! such names) and delete files of the image, so the save is refused. Sparse
//! files are archived sparsely (see `sparse`). Extended attributes are not
//! archived: a file capability (`security.capability`) the sandbox set must
//! not reach the image, so it is dropped with a warning; set-id bits are
//! checked against the image afterwards (see `setid`), where its layers are.
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
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use tar::{EntryType, Header};

use crate::error::ImageError;
use crate::sparse::{self, ChunkReader};
use crate::unpack::{OPAQUE_MARKER, OVERLAY_OPAQUE_XATTRS, WHITEOUT_PREFIX};

/// The xattr of a file capability: never archived from a sandbox.
const CAPABILITY_XATTR: &str = "security.capability";

/// What a layer holds, and what of the upper directory it could not hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerSummary {
    pub entries: u64,
    pub whiteouts: u64,
    /// One warning line each for what the layer does not hold as the sandbox
    /// had it: sockets, fifos and device nodes (they cannot be part of an
    /// image) and file capabilities (a sandbox may not grant them).
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
        sparse_total: 0,
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
    /// Apparent size of the sparse files archived so far.
    sparse_total: u64,
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

/// The value of xattr `name` of an open file, if it has one (up to 4 KiB).
fn fgetxattr(fd: RawFd, name: &str) -> Option<Vec<u8>> {
    let key = CString::new(name).ok()?;
    let mut value = vec![0u8; 4096];
    // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of that length.
    let n = unsafe { libc::fgetxattr(fd, key.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    let n = usize::try_from(n).ok()?;
    value.truncate(n);
    Some(value)
}

/// Overlayfs marks a directory opaque with `trusted.overlay.opaque=y`, or
/// `user.overlay.opaque=y` when mounted with `userxattr` (as moat does).
/// The sandbox cannot set either through the overlay.
fn is_opaque(dir: &OwnedFd) -> bool {
    OVERLAY_OPAQUE_XATTRS
        .iter()
        .any(|key| fgetxattr(dir.as_raw_fd(), key).as_deref() == Some(b"y"))
}

/// A path as the sandbox sees it, for messages.
fn in_sandbox(rel: &Path) -> String {
    format!("/{}", rel.display())
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
            let whiteout = kind == SFlag::S_IFCHR && st.st_rdev == 0;
            if !whiteout && name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
                return Err(ImageError::ReservedName {
                    path: in_sandbox(&child),
                });
            }
            match kind {
                _ if whiteout => {
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
                _ => self.summary.skipped.push(format!(
                    "{} is a socket, fifo or device and is not part of the image",
                    in_sandbox(&child)
                )),
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
        if fgetxattr(file.as_raw_fd(), CAPABILITY_XATTR).is_some() {
            self.summary.skipped.push(format!(
                "{} is saved without its file capability ({CAPABILITY_XATTR}): a sandbox cannot grant one to an image",
                in_sandbox(rel)
            ));
        }
        let size = st.st_size.max(0) as u64;
        // Fewer blocks than bytes: it may have holes worth keeping as holes.
        let holes = (st.st_blocks.max(0) as u64).saturating_mul(512) < size;
        let map = if holes {
            sparse::data_map(&file, size).map_err(|e| self.fail(rel, e))?
        } else {
            None
        };
        match map {
            Some(chunks) => self.sparse_file(&file, rel, st, size, chunks)?,
            None => {
                let mut h = self.header(EntryType::Regular, st, size);
                self.tar
                    .append_data(&mut h, rel, file)
                    .map_err(|e| self.fail(rel, e))?;
            }
        }
        self.summary.entries += 1;
        Ok(())
    }

    /// A GNU sparse entry: the map of data runs, then only the data.
    fn sparse_file(
        &mut self,
        file: &File,
        rel: &Path,
        st: &FileStat,
        size: u64,
        chunks: Vec<sparse::Chunk>,
    ) -> Result<(), ImageError> {
        // What moat's unpacker would refuse, refused here, so that a saved
        // image can always be used.
        self.sparse_total = self.sparse_total.saturating_add(size);
        if self.sparse_total > sparse::MAX_EXPANSION {
            return Err(ImageError::SparseTooLarge {
                path: in_sandbox(rel),
                total: self.sparse_total,
                limit: sparse::MAX_EXPANSION,
            });
        }
        let mut h = self.header(EntryType::GNUSparse, st, 0);
        let ext =
            sparse::make_sparse_header(&mut h, &chunks, size).map_err(|e| self.fail(rel, e))?;
        let data = io::Cursor::new(ext).chain(ChunkReader::new(file, chunks));
        self.tar
            .append_data(&mut h, rel, data)
            .map_err(|e| self.fail(rel, e))
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
    use crate::unpack::OVERLAY_OPAQUE_XATTR;
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
                skipped: vec![
                    "/fifo is a socket, fifo or device and is not part of the image".into()
                ]
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

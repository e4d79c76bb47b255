//! Safe extraction of one layer tarball into an empty directory.
//!
//! Layer tarballs come from template builds today and from registries
//! later, so every entry is treated as hostile: paths are checked by hand
//! (not with `tar::Entry::unpack_in`), nothing is ever written through a
//! symbolic link the archive made, and device nodes and fifos are refused.
//!
//! OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`) delete files of *lower*
//! layers. The unpacked layers are stacked by overlayfs, mounted with
//! `userxattr`, so they become overlayfs's own markers: a whiteout is a
//! character device 0/0 (which the kernel lets anyone make), an opaque
//! directory carries `user.overlay.opaque=y`.
//!
//! Sparse entries (GNU `S`) are written back with holes, and all the sparse
//! files of a layer may add up to at most 1 TiB (see `sparse`).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use crate::digest::open_tar_stream;
use crate::error::ImageError;
use crate::fsutil::remove_tree;
use crate::sparse::{is_zero, MAX_EXPANSION};

/// Unpacks one layer tarball into an empty directory. The daemon implements
/// this by running [`unpack_layer`] in a helper process inside the
/// sandboxes' user namespace, so that file ownership maps right.
pub trait LayerUnpacker {
    fn unpack(&self, blob: &Path, dest: &Path) -> Result<(), ImageError>;
}

/// In-process implementation (calls [`unpack_layer`] directly), for tests
/// and for callers that need no id mapping.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectUnpacker;

impl LayerUnpacker for DirectUnpacker {
    fn unpack(&self, blob: &Path, dest: &Path) -> Result<(), ImageError> {
        unpack_layer(blob, dest)
    }
}

/// Extracts a layer tar (plain or gzip) into `dest`, an existing empty
/// directory, refusing entries that could escape it (see the module docs).
/// Keeps mode bits (setuid included), mtimes, hard links, and numeric
/// owners when running as root of the current user namespace.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<(), ImageError> {
    let bad = |e: io::Error| ImageError::BadLayer {
        path: blob.to_path_buf(),
        reason: e.to_string(),
    };
    let mut archive = tar::Archive::new(open_tar_stream(blob)?);
    let mut state = Unpacker {
        blob,
        dest,
        chown: nix::unistd::geteuid().is_root(),
        symlinks: HashSet::new(),
        dirs: BTreeMap::new(),
        sparse_total: 0,
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        state.entry(&mut entry)?;
    }
    state.finish_dirs()
}

/// The OCI name of a whiteout and of an opaque-directory marker.
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs (mounted with `userxattr`) reads as "opaque directory".
pub(crate) const OVERLAY_OPAQUE_XATTR: &str = "user.overlay.opaque";
/// What marks an opaque directory in an upper directory: the `user.` xattr
/// with `userxattr`, the `trusted.` one when real root mounted the overlay.
pub(crate) const OVERLAY_OPAQUE_XATTRS: [&str; 2] =
    [OVERLAY_OPAQUE_XATTR, "trusted.overlay.opaque"];

/// Owner, mode and mtime of a directory, applied once its contents exist.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

struct Unpacker<'a> {
    blob: &'a Path,
    dest: &'a Path,
    chown: bool,
    /// Symlinks this archive created (relative paths): never written through.
    symlinks: HashSet<PathBuf>,
    /// Directories to finish, deepest applied first (reverse path order).
    dirs: BTreeMap<PathBuf, Meta>,
    /// Apparent size of the sparse files unpacked so far.
    sparse_total: u64,
}

/// How many ids a sandbox has (`moat_sandbox::idmap::RANGE`).
const SANDBOX_IDS: u32 = 65536;

fn unsafe_entry(name: &str, reason: impl Into<String>) -> ImageError {
    ImageError::UnsafeEntry {
        entry: name.to_string(),
        reason: reason.into(),
    }
}

/// Turns an archive path into a clean relative path, refusing absolute
/// paths and `..` anywhere (even where it would stay inside).
fn safe_relative(raw: &Path, name: &str, what: &str) -> Result<PathBuf, ImageError> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(unsafe_entry(
                    name,
                    format!("{what} contains a `..` component"),
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(name, format!("{what} is an absolute path")))
            }
        }
    }
    Ok(out)
}

impl Unpacker<'_> {
    fn io_err(&self, name: &str, e: io::Error) -> ImageError {
        ImageError::io(format!("unpack {name:?} into {}", self.dest.display()), e)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry
            .path()
            .map_err(|e| unsafe_entry(&name, format!("its path is unreadable: {e}")))?;
        let rel = safe_relative(&raw, &name, "its path")?;

        let whiteout = rel
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix(WHITEOUT_PREFIX))
            .map(str::to_string);
        if let Some(hidden) = whiteout {
            return self.whiteout(&rel, &hidden, &name);
        }
        match kind {
            EntryType::Char => return Err(unsafe_entry(&name, "it is a character device")),
            EntryType::Block => return Err(unsafe_entry(&name, "it is a block device")),
            EntryType::Fifo => return Err(unsafe_entry(&name, "it is a fifo")),
            _ => {}
        }
        self.check_parents(&rel, &name, "its path")?;

        let header = entry.header();
        let meta = Meta {
            mode: header.mode().map_err(|e| self.bad(&name, e))? & 0o7777,
            uid: u32::try_from(header.uid().map_err(|e| self.bad(&name, e))?).unwrap_or(u32::MAX),
            gid: u32::try_from(header.gid().map_err(|e| self.bad(&name, e))?).unwrap_or(u32::MAX),
            mtime: header.mtime().map_err(|e| self.bad(&name, e))? as i64,
        };

        // A sandbox has ids 0..65536; the helper that unpacks has one more
        // (the host's root, so that it can read the store), which no entry
        // may claim.
        if meta.uid >= SANDBOX_IDS || meta.gid >= SANDBOX_IDS {
            return Err(unsafe_entry(
                &name,
                format!(
                    "it belongs to {}:{}, beyond the {SANDBOX_IDS} ids of a sandbox",
                    meta.uid, meta.gid
                ),
            ));
        }

        if rel.as_os_str().is_empty() {
            // `./` itself: the root directory's owner and mode.
            if kind != EntryType::Directory {
                return Err(unsafe_entry(&name, "it would replace the root directory"));
            }
            self.dirs.insert(rel, meta);
            return Ok(());
        }
        let path = self.dest.join(&rel);
        self.make_parents(&rel, &name)?;

        match kind {
            EntryType::Directory => {
                if !self.clear(&path, &rel, &name, true)? {
                    DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| self.io_err(&name, e))?;
                }
                self.dirs.insert(rel, meta);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let sparse = kind == EntryType::GNUSparse;
                if sparse {
                    // The tar crate reports a sparse entry's size as its real size.
                    self.sparse_total = self.sparse_total.saturating_add(entry.size());
                    if self.sparse_total > MAX_EXPANSION {
                        return Err(unsafe_entry(
                            &name,
                            format!(
                                "its layer's sparse files would expand to more than {}",
                                crate::error::human(MAX_EXPANSION)
                            ),
                        ));
                    }
                }
                self.clear(&path, &rel, &name, false)?;
                self.write_file(entry, &path, &name, meta, sparse)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.bad(&name, e))?
                    .ok_or_else(|| unsafe_entry(&name, "it is a symbolic link without a target"))?;
                self.clear(&path, &rel, &name, false)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|e| self.io_err(&name, e))?;
                self.symlinks.insert(rel);
                if self.chown {
                    std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                        .map_err(|e| self.io_err(&name, e))?;
                }
                let t = TimeSpec::new(meta.mtime, 0);
                utimensat(None, &path, &t, &t, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| self.io_err(&name, e.into()))?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(|e| self.bad(&name, e))?
                    .ok_or_else(|| unsafe_entry(&name, "it is a hard link without a target"))?;
                let target_rel = safe_relative(&target_raw, &name, "its hard link target")?;
                if target_rel.as_os_str().is_empty() {
                    return Err(unsafe_entry(
                        &name,
                        "its hard link target is the root directory",
                    ));
                }
                self.check_parents(&target_rel, &name, "its hard link target")?;
                let target = self.dest.join(&target_rel);
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {
                        return Err(unsafe_entry(&name, "its hard link target is a directory"))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(unsafe_entry(
                            &name,
                            "its hard link target is not an earlier entry of the archive",
                        ))
                    }
                }
                if target_rel == rel {
                    return Ok(());
                }
                self.clear(&path, &rel, &name, false)?;
                fs::hard_link(&target, &path).map_err(|e| self.io_err(&name, e))?;
                if self.symlinks.contains(&target_rel) {
                    self.symlinks.insert(rel);
                }
            }
            other => {
                return Err(unsafe_entry(
                    &name,
                    format!(
                        "its entry type {:?} is not supported",
                        other.as_byte() as char
                    ),
                ))
            }
        }
        Ok(())
    }

    /// `dir/.wh.NAME` hides `dir/NAME` of the layers below; `dir/.wh..wh..opq`
    /// hides everything below in `dir`.
    fn whiteout(&mut self, rel: &Path, hidden: &str, name: &str) -> Result<(), ImageError> {
        self.check_parents(rel, name, "its path")?;
        self.make_parents(rel, name)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if format!("{WHITEOUT_PREFIX}{hidden}") == OPAQUE_MARKER {
            let dir = self.dest.join(parent);
            let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
                .map_err(|e| self.io_err(name, io::Error::other(e)))?;
            let key = std::ffi::CString::new(OVERLAY_OPAQUE_XATTR)
                .map_err(|e| self.io_err(name, io::Error::other(e)))?;
            // lsetxattr: the parent was checked not to be a symlink we made.
            // SAFETY: both strings are NUL-terminated and outlive the call.
            let rc = unsafe {
                libc::lsetxattr(c_dir.as_ptr(), key.as_ptr(), b"y".as_ptr().cast(), 1, 0)
            };
            if rc != 0 {
                return Err(self.io_err(name, io::Error::last_os_error()));
            }
            return Ok(());
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // aufs's own bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`), as Docker skips it.
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(unsafe_entry(
                name,
                "it is a whiteout with no valid name to hide",
            ));
        }
        let target_rel = parent.join(hidden);
        let path = self.dest.join(&target_rel);
        self.clear(&path, &target_rel, name, false)?;
        nix::sys::stat::mknod(
            &path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .map_err(|e| self.io_err(name, e.into()))
    }

    fn bad(&self, name: &str, e: io::Error) -> ImageError {
        ImageError::BadLayer {
            path: self.blob.to_path_buf(),
            reason: format!("entry {name:?}: {e}"),
        }
    }

    /// Refuses a path any of whose parents is a symlink this archive made:
    /// writing there would follow it, possibly out of `dest`.
    fn check_parents(&self, rel: &Path, name: &str, what: &str) -> Result<(), ImageError> {
        for ancestor in rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            if self.symlinks.contains(ancestor) {
                return Err(unsafe_entry(
                    name,
                    format!(
                        "{what} goes through {}, a symbolic link made by an earlier entry",
                        ancestor.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Creates missing parent directories (archives may omit them).
    fn make_parents(&self, rel: &Path, name: &str) -> Result<(), ImageError> {
        match rel.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(self.dest.join(parent))
                .map_err(|e| self.io_err(name, e)),
            _ => Ok(()),
        }
    }

    /// Makes room for an entry at `path`, as tar does when an archive names
    /// a path twice. Returns whether a directory is already there and kept.
    fn clear(
        &mut self,
        path: &Path,
        rel: &Path,
        name: &str,
        want_dir: bool,
    ) -> Result<bool, ImageError> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_err(name, e)),
            Ok(m) if m.is_dir() && want_dir => Ok(true),
            Ok(m) if m.is_dir() => {
                remove_tree(path)?;
                self.dirs.retain(|d, _| !d.starts_with(rel));
                self.symlinks.retain(|s| !s.starts_with(rel));
                Ok(false)
            }
            Ok(_) => {
                fs::remove_file(path).map_err(|e| self.io_err(name, e))?;
                self.symlinks.remove(rel);
                Ok(false)
            }
        }
    }

    fn write_file<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        name: &str,
        meta: Meta,
        sparse: bool,
    ) -> Result<(), ImageError> {
        // O_EXCL | O_NOFOLLOW: never open something that appeared in between.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| self.io_err(name, e))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.bad(name, e)),
            };
            // A sparse entry's holes arrive as zeros: skip over them so
            // that they stay holes on disk.
            if sparse && is_zero(&buf[..n]) {
                file.seek(SeekFrom::Current(n as i64))
            } else {
                file.write_all(&buf[..n]).map(|()| 0)
            }
            .map_err(|e| self.io_err(name, e))?;
            written += n as u64;
        }
        if sparse {
            // A file that ends in a hole gets its length here.
            file.set_len(written).map_err(|e| self.io_err(name, e))?;
        }
        self.apply_meta(&file, name, meta)
    }

    /// Owner before mode: chown clears setuid/setgid bits.
    fn apply_meta(&self, file: &File, name: &str, meta: Meta) -> Result<(), ImageError> {
        if self.chown {
            std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
                .map_err(|e| self.io_err(name, e))?;
        }
        file.set_permissions(fs::Permissions::from_mode(meta.mode))
            .map_err(|e| self.io_err(name, e))?;
        let t = TimeSpec::new(meta.mtime, 0);
        futimens(file.as_raw_fd(), &t, &t).map_err(|e| self.io_err(name, e.into()))
    }

    /// Applies directory metadata deepest first, after all contents exist,
    /// so that a 0555 directory never blocked writing its children and
    /// creating children did not disturb its mtime.
    fn finish_dirs(&self) -> Result<(), ImageError> {
        for (rel, meta) in self.dirs.iter().rev() {
            let name = rel.display().to_string();
            let path = self.dest.join(rel);
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| self.io_err(&name, e))?;
            self.apply_meta(&dir, &name, *meta)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar entry; `name` and `link` go into the header raw, so tests can
    /// build archives that the tar crate's own builder would refuse.
    pub(crate) struct E<'a> {
        pub kind: EntryType,
        pub name: &'a str,
        pub link: &'a str,
        pub mode: u32,
        pub data: &'a [u8],
    }

    pub(crate) fn file<'a>(name: &'a str, mode: u32, data: &'a [u8]) -> E<'a> {
        E {
            kind: EntryType::Regular,
            name,
            link: "",
            mode,
            data,
        }
    }
    pub(crate) fn dir(name: &str, mode: u32) -> E<'_> {
        E {
            kind: EntryType::Directory,
            name,
            link: "",
            mode,
            data: b"",
        }
    }
    pub(crate) fn link<'a>(kind: EntryType, name: &'a str, link: &'a str) -> E<'a> {
        E {
            kind,
            name,
            link,
            mode: 0o777,
            data: b"",
        }
    }

    pub(crate) fn tar_bytes(entries: &[E<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for e in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(e.kind);
            {
                let old = header.as_old_mut();
                old.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
                old.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
            }
            header.set_mode(e.mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_size(e.data.len() as u64);
            header.set_cksum();
            builder.append(&header, e.data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    struct Case {
        _tmp: tempfile::TempDir,
        blob: PathBuf,
        dest: PathBuf,
        outside: PathBuf,
    }

    fn case(entries: &[E<'_>]) -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("layer.tar");
        fs::write(&blob, tar_bytes(entries)).unwrap();
        let dest = tmp.path().join("dest");
        let outside = tmp.path().join("outside");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&outside).unwrap();
        Case {
            _tmp: tmp,
            blob,
            dest,
            outside,
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    #[test]
    fn refuses_each_escaping_entry_kind() {
        let cases: Vec<(Vec<E<'_>>, &str, &str)> = vec![
            (
                vec![file("/OUTSIDE/abs", 0o644, b"x")],
                "/OUTSIDE/abs",
                "its path is an absolute path",
            ),
            (
                vec![file("../outside/up", 0o644, b"x")],
                "../outside/up",
                "its path contains a `..` component",
            ),
            (
                vec![file("a/../../outside/up", 0o644, b"x")],
                "a/../../outside/up",
                "its path contains a `..` component",
            ),
            (
                vec![
                    link(EntryType::Symlink, "a", "OUTSIDE"),
                    file("a/through", 0o644, b"x"),
                ],
                "a/through",
                "its path goes through a, a symbolic link made by an earlier entry",
            ),
            (
                vec![
                    link(EntryType::Symlink, "a", "OUTSIDE"),
                    dir("a/sub", 0o755),
                ],
                "a/sub",
                "its path goes through a, a symbolic link made by an earlier entry",
            ),
            (
                vec![link(EntryType::Link, "h", "../outside/secret")],
                "h",
                "its hard link target contains a `..` component",
            ),
            (
                vec![link(EntryType::Link, "h", "OUTSIDE/secret")],
                "h",
                "its hard link target is an absolute path",
            ),
            (
                vec![
                    link(EntryType::Symlink, "a", "OUTSIDE"),
                    link(EntryType::Link, "h", "a/secret"),
                ],
                "h",
                "its hard link target goes through a, a symbolic link made by an earlier entry",
            ),
            (
                vec![link(EntryType::Link, "h", "not-there")],
                "h",
                "its hard link target is not an earlier entry of the archive",
            ),
            (
                vec![link(EntryType::Char, "null", "")],
                "null",
                "it is a character device",
            ),
            (
                vec![link(EntryType::Block, "sda", "")],
                "sda",
                "it is a block device",
            ),
            (
                vec![link(EntryType::Fifo, "pipe", "")],
                "pipe",
                "it is a fifo",
            ),
        ];
        for (entries, want_entry, want_reason) in cases {
            // Absolute targets must point at this case's own outside dir.
            let tmp = tempfile::tempdir().unwrap();
            let outside = tmp.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("secret"), b"s").unwrap();
            let outside_s = outside.display().to_string();
            let names: Vec<String> = entries
                .iter()
                .map(|e| e.name.replace("/OUTSIDE", &outside_s))
                .collect();
            let links: Vec<String> = entries
                .iter()
                .map(|e| e.link.replace("OUTSIDE", &outside_s).replace("//", "/"))
                .collect();
            let fixed: Vec<E<'_>> = entries
                .iter()
                .zip(names.iter().zip(links.iter()))
                .map(|(e, (n, l))| E {
                    kind: e.kind,
                    name: n,
                    link: l,
                    mode: e.mode,
                    data: e.data,
                })
                .collect();
            let blob = tmp.path().join("layer.tar");
            fs::write(&blob, tar_bytes(&fixed)).unwrap();
            let dest = tmp.path().join("dest");
            fs::create_dir(&dest).unwrap();

            let want_entry = want_entry.replace("/OUTSIDE", &outside_s);
            match unpack_layer(&blob, &dest) {
                Err(ImageError::UnsafeEntry { entry, reason }) => {
                    assert_eq!(
                        (entry.as_str(), reason.as_str()),
                        (want_entry.as_str(), want_reason)
                    )
                }
                other => panic!("{want_entry}: expected UnsafeEntry, got {other:?}"),
            }
            assert_eq!(
                listing(&outside),
                vec!["secret".to_string()],
                "{want_entry}"
            );
            assert_eq!(fs::read(outside.join("secret")).unwrap(), b"s");
        }
    }

    #[test]
    fn keeps_modes_links_and_mtimes() {
        let c = case(&[
            dir("./", 0o755),
            dir("usr/", 0o755),
            dir("usr/bin/", 0o755),
            file("usr/bin/sudo", 0o4755, b"#!sudo"),
            link(EntryType::Link, "usr/bin/sudoedit", "usr/bin/sudo"),
            link(EntryType::Symlink, "bin", "usr/bin"),
            dir("ro/", 0o555),
            file("ro/inside", 0o444, b"ro"),
            file("implicit/parent/f", 0o600, b"f"),
        ]);
        unpack_layer(&c.blob, &c.dest).unwrap();
        assert_eq!(
            listing(&c.dest),
            vec![
                "bin",
                "implicit",
                "implicit/parent",
                "implicit/parent/f",
                "ro",
                "ro/inside",
                "usr",
                "usr/bin",
                "usr/bin/sudo",
                "usr/bin/sudoedit"
            ]
        );
        let mode = |p: &str| fs::symlink_metadata(c.dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(
            vec![
                mode("usr/bin/sudo"),
                mode("ro"),
                mode("ro/inside"),
                mode("implicit/parent/f"),
                mode("")
            ],
            vec![0o4755, 0o555, 0o444, 0o600, 0o755]
        );
        let sudo = fs::metadata(c.dest.join("usr/bin/sudo")).unwrap();
        let sudoedit = fs::metadata(c.dest.join("usr/bin/sudoedit")).unwrap();
        assert_eq!((sudo.ino(), sudo.nlink()), (sudoedit.ino(), 2));
        assert_eq!(
            fs::read_link(c.dest.join("bin")).unwrap(),
            PathBuf::from("usr/bin")
        );
        assert_eq!(
            vec![
                sudo.mtime(),
                fs::symlink_metadata(c.dest.join("bin")).unwrap().mtime(),
                fs::metadata(c.dest.join("usr")).unwrap().mtime(),
            ],
            vec![1_700_000_000; 3]
        );
        assert!(c.outside.read_dir().unwrap().next().is_none());
        if nix::unistd::geteuid().is_root() {
            assert_eq!((sudo.uid(), sudo.gid()), (0, 0));
        }
    }

    #[test]
    fn turns_whiteouts_into_overlay_markers() {
        let c = case(&[
            dir("etc/", 0o755),
            file("etc/.wh.gone", 0o644, b""),
            file("etc/.wh..wh.plnk", 0o644, b""),
            dir("var/", 0o755),
            file("var/.wh..wh..opq", 0o644, b""),
            file("var/new", 0o644, b"n"),
        ]);
        unpack_layer(&c.blob, &c.dest).unwrap();
        assert_eq!(listing(&c.dest), vec!["etc", "etc/gone", "var", "var/new"]);
        let gone = fs::symlink_metadata(c.dest.join("etc/gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert_eq!((gone.file_type().is_char_device(), gone.rdev()), (true, 0));
        let mut value = [0u8; 8];
        let path = std::ffi::CString::new(c.dest.join("var").into_os_string().into_encoded_bytes())
            .unwrap();
        let key = std::ffi::CString::new(OVERLAY_OPAQUE_XATTR).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                key.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(&value[..n.max(0) as usize], b"y");

        let through_link = case(&[
            link(EntryType::Symlink, "a", "/etc"),
            file("a/.wh.passwd", 0o644, b""),
        ]);
        assert!(matches!(
            unpack_layer(&through_link.blob, &through_link.dest),
            Err(ImageError::UnsafeEntry { .. })
        ));
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let c = case(&[
            link(EntryType::Symlink, "a", "/etc"),
            dir("a/", 0o755),
            file("a/f", 0o644, b"new"),
            file("b", 0o644, b"old"),
            file("b", 0o644, b"new"),
        ]);
        unpack_layer(&c.blob, &c.dest).unwrap();
        assert_eq!(listing(&c.dest), vec!["a", "a/f", "b"]);
        assert_eq!(
            vec![
                fs::read(c.dest.join("a/f")).unwrap(),
                fs::read(c.dest.join("b")).unwrap()
            ],
            vec![b"new".to_vec(), b"new".to_vec()]
        );
    }

    #[test]
    fn truncated_tar_is_a_bad_layer() {
        let c = case(&[file("f", 0o644, &[7u8; 4000])]);
        let bytes = fs::read(&c.blob).unwrap();
        fs::write(&c.blob, &bytes[..1500]).unwrap();
        assert!(matches!(
            unpack_layer(&c.blob, &c.dest),
            Err(ImageError::BadLayer { .. })
        ));
    }
}

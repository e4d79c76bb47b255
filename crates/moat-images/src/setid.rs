//! Set-id bits in a saved layer: only those the image already had.
//!
//! A sandbox's root may not hand privileges to whoever later uses its image,
//! so a file of a sandbox's layer keeps its setuid or setgid bit only where
//! the image's layers had a regular file at the same path with that bit
//! (overlayfs copied it up: `touch /usr/bin/sudo` must not break sudo).
//! The layer is written first, inside the sandboxes' user namespace, which
//! cannot see the image's layers; this pass runs where they are, reads the
//! tar's headers and clears the bits in place (same size, new checksum), so
//! nothing else of the layer changes. Paths it cannot look up in the image
//! (a directory it may not search) count as not there: the bit goes.
//! A file with several names (hard links) keeps its bits only if the image
//! had them at every name. Directories keep theirs: a setgid directory only
//! passes its group on.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use tar::{EntryType, Header};

use crate::error::ImageError;
use crate::unpack::OVERLAY_OPAQUE_XATTRS;

const SETID: u32 = 0o6000;

/// Clears, in the layer tar at `layer`, every setuid/setgid bit of a file
/// that `lowers` (the image's unpacked layers, lowest first) did not give
/// the same file. Returns one warning line for each path it changed.
pub fn drop_new_privileges(layer: &Path, lowers: &[PathBuf]) -> Result<Vec<String>, ImageError> {
    let names = set_id_files(layer)?;
    let mut patches: Vec<(u64, u32)> = Vec::new();
    let mut warnings: Vec<(u64, String)> = Vec::new();
    for group in names {
        // One inode, one mode: its bits stay only if the image had them at
        // every name, or `ln /usr/bin/sudo /x` would make a new setuid path.
        let allowed: Vec<u32> = group
            .iter()
            .map(|n| group[0].mode & SETID & lower_setid(lowers, &n.path))
            .collect();
        let kept = allowed.iter().fold(group[0].mode & SETID, |k, a| k & a);
        let dropped = group[0].mode & SETID & !kept;
        if dropped == 0 {
            continue;
        }
        let culprit = group
            .iter()
            .zip(&allowed)
            .find(|(_, a)| **a != group[0].mode & SETID)
            .map(|(n, _)| n.path.display().to_string())
            .unwrap_or_default();
        for (name, allowed) in group.iter().zip(&allowed) {
            patches.push((name.pos, name.mode & !SETID | kept));
            let why = if *allowed & dropped == dropped {
                format!(": the sandbox linked it to /{culprit}, which the image did not give one")
            } else {
                ", which the image did not give it".to_string()
            };
            warnings.push((
                name.pos,
                format!(
                    "/{} is saved without its {}{why}",
                    name.path.display(),
                    bits(dropped)
                ),
            ));
        }
    }
    if !patches.is_empty() {
        patch_modes(layer, &patches)?;
    }
    warnings.sort();
    Ok(warnings.into_iter().map(|(_, w)| w).collect())
}

/// One name of a file in the layer: where its header is, its path and mode.
struct Name {
    pos: u64,
    path: PathBuf,
    mode: u32,
}

/// The regular files of the layer with a set-id bit, each with the hard
/// links to it (a hard link names an earlier entry).
fn set_id_files(layer: &Path) -> Result<Vec<Vec<Name>>, ImageError> {
    let bad = |e: io::Error| ImageError::BadLayer {
        path: layer.to_path_buf(),
        reason: e.to_string(),
    };
    let file =
        File::open(layer).map_err(|e| ImageError::io(format!("read {}", layer.display()), e))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut groups: Vec<Vec<Name>> = Vec::new();
    let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let header = entry.header();
        let name = Name {
            pos: entry.raw_header_position(),
            path: entry.path().map_err(bad)?.into_owned(),
            mode: header.mode().map_err(bad)?,
        };
        match header.entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
                if name.mode & SETID != 0 =>
            {
                by_path.insert(name.path.clone(), groups.len());
                groups.push(vec![name]);
            }
            EntryType::Link => {
                let target = entry.link_name().map_err(bad)?.unwrap_or_default();
                if let Some(&i) = by_path.get(target.as_ref()) {
                    groups[i].push(name);
                }
            }
            _ => {}
        }
    }
    Ok(groups)
}

fn bits(dropped: u32) -> &'static str {
    match (dropped & 0o4000 != 0, dropped & 0o2000 != 0) {
        (true, true) => "setuid and setgid bits",
        (true, false) => "setuid bit",
        _ => "setgid bit",
    }
}

/// Rewrites the mode of the headers at the given offsets.
fn patch_modes(layer: &Path, patches: &[(u64, u32)]) -> Result<(), ImageError> {
    let fail = |e: io::Error| ImageError::io(format!("rewrite {}", layer.display()), e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(layer)
        .map_err(fail)?;
    for &(pos, mode) in patches {
        let mut header = Header::new_old();
        file.read_exact_at(header.as_mut_bytes(), pos)
            .map_err(fail)?;
        header.set_mode(mode);
        header.set_cksum();
        file.write_all_at(header.as_bytes(), pos).map_err(fail)?;
    }
    file.sync_all().map_err(fail)
}

/// The set-id bits of the regular file the stacked `lowers` show at `rel`,
/// as overlayfs resolves it: the highest layer that has the path wins; a
/// whiteout, a non-directory on the way or an opaque directory hides the
/// layers below. 0 where there is no such file or it cannot be looked up.
fn lower_setid(lowers: &[PathBuf], rel: &Path) -> u32 {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        return 0;
    }
    for lower in lowers.iter().rev() {
        match look_up(lower, &parts) {
            Lookup::Found(mode) => return mode & SETID,
            Lookup::Hidden => return 0,
            Lookup::Absent => {}
        }
    }
    0
}

enum Lookup {
    /// A regular file with this mode.
    Found(u32),
    /// Not here, and the layers below do not count either.
    Hidden,
    /// Not here: look further down.
    Absent,
}

fn look_up(lower: &Path, parts: &[&std::ffi::OsStr]) -> Lookup {
    let mut path = lower.to_path_buf();
    let mut opaque = false;
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return if opaque {
                    Lookup::Hidden
                } else {
                    Lookup::Absent
                }
            }
            // Unknown is not "the image had it".
            Err(_) => return Lookup::Hidden,
        };
        let last = i + 1 == parts.len();
        let ft = meta.file_type();
        if last {
            return if ft.is_file() {
                Lookup::Found(meta.mode())
            } else {
                // A whiteout, a directory, a link: no set-id file here.
                Lookup::Hidden
            };
        }
        if ft.is_char_device() || !ft.is_dir() {
            return Lookup::Hidden;
        }
        opaque = opaque || is_opaque(&path);
    }
    Lookup::Hidden
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(c_dir) = CString::new(dir.as_os_str().as_bytes()) else {
        return true;
    };
    OVERLAY_OPAQUE_XATTRS.iter().any(|key| {
        let Ok(key) = CString::new(*key) else {
            return true;
        };
        let mut value = [0u8; 4];
        // SAFETY: NUL-terminated strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                c_dir.as_ptr(),
                key.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            // No such attribute, or none on this file system: not opaque.
            // Anything else (say, not allowed to read it): assume it is.
            let errno = io::Error::last_os_error().raw_os_error();
            return !matches!(errno, Some(libc::ENODATA | libc::EOPNOTSUPP));
        }
        n == 1 && value[0] == b'y'
    })
}

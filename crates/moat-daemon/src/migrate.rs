//! Bringing a root daemon's state written by an older moat up to date.
//!
//! Older versions mapped the sandboxes' `agent` user (uid 1000 inside) to
//! host root, so the files it owns in unpacked image layers and in each
//! sandbox's own layer belong to host uid 0 on disk. The agent is now an
//! unprivileged host id of the sandboxes' range; those files are handed to
//! it once, so that the agent still owns them inside. In those trees nothing
//! else was ever owned by host root (the sandbox's root maps to the range),
//! and the trees' own top directories, which the daemon made, are left as
//! they are.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;

/// The file whose presence says the state is migrated.
const MARKER: &str = "agent-ids-v2";

/// Whether the state under `state` was written by an older moat.
pub fn pending(state: &Path) -> bool {
    !state.join(MARKER).exists()
}

/// Hand host-root-owned files in the sandboxes' trees to `agent_uid`/`agent_gid`.
/// Sandboxes an older moat started must be stopped first: their agent is
/// still host root and could swap what the walk is about to touch.
pub fn agent_ids(state: &Path, images: &Path, agent_uid: u32, agent_gid: u32) {
    if !pending(state) {
        return;
    }
    let mut roots = vec![];
    for (parent, leaf) in [
        (images.join("layers").join("sha256"), "rootfs"),
        (state.join("sandboxes"), "upper"),
    ] {
        if let Ok(entries) = fs::read_dir(&parent) {
            roots.extend(entries.flatten().map(|e| e.path().join(leaf)));
        }
    }
    let mut changed = 0usize;
    for root in &roots {
        // The trees' own top directories are the daemon's: open, not changed.
        let Ok(dir) = Dir::open(
            root.as_path(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let dev = nix::sys::stat::fstat(dir.as_raw_fd())
            .map(|s| s.st_dev)
            .ok();
        changed += hand_over_below(dir, dev, agent_uid, agent_gid);
    }
    if changed > 0 {
        tracing::info!("gave {changed} files of the agent's in existing layers to its new host id");
    }
    let _ = fs::write(state.join(MARKER), b"");
}

/// Hand over every entry below `dir`, never following a symbolic link and
/// never leaving `dir`'s file system; returns how many entries changed.
fn hand_over_below(mut dir: Dir, dev: Option<u64>, uid: u32, gid: u32) -> usize {
    let fd = dir.as_raw_fd();
    let mut subdirs = vec![];
    let mut changed = 0;
    for entry in dir.iter().flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = nix::sys::stat::fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let new_uid = (st.st_uid == 0).then_some(nix::unistd::Uid::from_raw(uid));
        let new_gid = (st.st_gid == 0).then_some(nix::unistd::Gid::from_raw(gid));
        if (new_uid.is_some() || new_gid.is_some())
            && nix::unistd::fchownat(
                Some(fd),
                name,
                new_uid,
                new_gid,
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok()
        {
            changed += 1;
        }
        let is_dir = entry.file_type() == Some(Type::Directory)
            || st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && Some(st.st_dev) == dev {
            subdirs.push(name.to_owned());
        }
    }
    for name in subdirs {
        if let Ok(sub) = Dir::openat(
            Some(fd),
            name.as_c_str(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            changed += hand_over_below(sub, dev, uid, gid);
        }
    }
    drop(dir);
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn root_owned_files_below_the_trees_go_to_the_agent_once() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let images = state.join("images");
        let layer = images.join("layers/sha256/abc/rootfs");
        let upper = state.join("sandboxes/s1/upper");
        fs::create_dir_all(layer.join("home/agent")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("notes"), b"x").unwrap();
        std::os::unix::fs::lchown(layer.join("home"), Some(5), Some(5)).unwrap();
        agent_ids(&state, &images, 7000, 7001);
        let ids = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(ids(&layer.join("home/agent")), (7000, 7001));
        assert_eq!(ids(&upper.join("notes")), (7000, 7001));
        // Not root's: untouched; the trees' roots: untouched.
        assert_eq!(ids(&layer.join("home")), (5, 5));
        assert_eq!(ids(&layer), (0, 0));
        assert_eq!(ids(&upper), (0, 0));
        // Once: a root-owned file made later stays root's.
        fs::write(upper.join("later"), b"y").unwrap();
        agent_ids(&state, &images, 7000, 7001);
        assert_eq!(ids(&upper.join("later")), (0, 0));
    }
}

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
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The file whose presence says the state is migrated.
const MARKER: &str = "agent-ids-v2";

/// Hand host-root-owned files in the sandboxes' trees to `agent_uid`/`agent_gid`.
pub fn agent_ids(state: &Path, images: &Path, agent_uid: u32, agent_gid: u32) {
    let marker = state.join(MARKER);
    if marker.exists() {
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
    for root in roots.iter().filter(|r| r.is_dir()) {
        if let Ok(entries) = fs::read_dir(root) {
            for entry in entries.flatten() {
                changed += hand_over(&entry.path(), agent_uid, agent_gid);
            }
        }
    }
    if changed > 0 {
        tracing::info!("gave {changed} files of the agent's in existing layers to its new host id");
    }
    let _ = fs::write(&marker, b"");
}

/// Hand `path` and everything below it over; returns how many entries changed.
fn hand_over(path: &Path, uid: u32, gid: u32) -> usize {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let new_uid = (meta.uid() == 0).then_some(uid);
    let new_gid = (meta.gid() == 0).then_some(gid);
    let mut changed = 0;
    if new_uid.is_some() || new_gid.is_some() {
        // lchown keeps a symlink's target alone; chown clears set-id bits,
        // which no agent file may carry anyway.
        if std::os::unix::fs::lchown(path, new_uid, new_gid).is_ok() {
            changed += 1;
        }
    }
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                changed += hand_over(&entry.path(), uid, gid);
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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

//! Work that must happen inside the sandboxes' user namespace so that file
//! ownership maps right: unpacking image layers (files owned by uid 0 in a
//! layer must belong to the sandbox's root, not to the host's), and removing
//! a sandbox's files, which rootless belong to subordinate ids the user cannot
//! touch from outside. Both run as hidden roles of the `moat` binary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use moat_images::{ImageError, LayerUnpacker};
use moat_sandbox::{userns, IdMap};

use crate::DaemonError;

pub const UNPACK_ROLE: &str = "__unpack";
pub const REMOVE_ROLE: &str = "__remove";

/// Run `exe ROLE ARGS…` in a new user namespace with `idmap`, and wait for it.
fn run_mapped(exe: &Path, idmap: &IdMap, role: &str, args: &[&Path]) -> Result<(), String> {
    let mut child = Command::new(exe)
        .arg(role)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {}: {e}", exe.display()))?;
    let mapped = userns::map_child(&mut child, idmap, |_| Ok(()));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    mapped.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(err.trim().to_string())
    }
}

/// Unpacks layers in a helper process inside the sandboxes' user namespace.
pub struct MappedUnpacker {
    pub exe: PathBuf,
    pub idmap: IdMap,
}

impl LayerUnpacker for MappedUnpacker {
    fn unpack(&self, blob: &Path, dest: &Path) -> Result<(), ImageError> {
        run_mapped(&self.exe, &self.idmap, UNPACK_ROLE, &[blob, dest]).map_err(ImageError::Helper)
    }
}

/// Remove a tree whose files belong to ids of the sandboxes' range.
pub fn remove_mapped(exe: &Path, idmap: &IdMap, path: &Path) -> Result<(), DaemonError> {
    if !path.exists() {
        return Ok(());
    }
    if !idmap.rootless {
        return std::fs::remove_dir_all(path)
            .map_err(|e| DaemonError::io(format!("remove {}", path.display()), e));
    }
    run_mapped(exe, idmap, REMOVE_ROLE, &[path]).map_err(|e| {
        DaemonError::io(
            format!("remove {}", path.display()),
            std::io::Error::other(e),
        )
    })
}

fn role_args(args: &[String], n: usize) -> Result<Vec<PathBuf>, String> {
    if args.len() != n {
        return Err(format!("expected {n} arguments"));
    }
    Ok(args.iter().map(PathBuf::from).collect())
}

/// `moat __unpack BLOB DEST`
pub fn unpack_role_main(args: &[String]) -> i32 {
    let run = || -> Result<(), String> {
        let a = role_args(args, 2)?;
        userns::become_root_in_new_userns().map_err(|e| e.to_string())?;
        moat_images::unpack_layer(&a[0], &a[1]).map_err(|e| e.to_string())
    };
    report(run())
}

/// `moat __remove PATH`
pub fn remove_role_main(args: &[String]) -> i32 {
    let run = || -> Result<(), String> {
        let a = role_args(args, 1)?;
        userns::become_root_in_new_userns().map_err(|e| e.to_string())?;
        std::fs::remove_dir_all(&a[0]).map_err(|e| e.to_string())
    };
    report(run())
}

fn report(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

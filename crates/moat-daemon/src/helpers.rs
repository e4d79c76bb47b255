//! Work that must happen inside the sandboxes' user namespace so that file
//! ownership maps right: unpacking image layers (files owned by uid 0 in a
//! layer must belong to the sandbox's root, not to the host's), and removing
//! a sandbox's files, which rootless belong to subordinate ids the user cannot
//! touch from outside; and archiving a sandbox's upper layer for `save`,
//! which then reads ids as the sandbox sees them and cannot read a host
//! file that only host root could. All run as hidden roles of the `moat` binary.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use moat_images::{ImageError, LayerUnpacker};
use moat_sandbox::{userns, IdMap};

use crate::DaemonError;

pub const UNPACK_ROLE: &str = "__unpack";
pub const REMOVE_ROLE: &str = "__remove";
pub const SAVE_ROLE: &str = "__save-layer";

/// Run `exe ROLE ARGS…` in a new user namespace with `idmap`, and wait for
/// it; what it printed on stderr is the error, or on success its report.
fn run_mapped(exe: &Path, idmap: &IdMap, role: &str, args: &[&Path]) -> Result<String, String> {
    run_mapped_to(exe, idmap, role, args, &mut std::io::sink())
}

/// `run_mapped`, copying what the helper writes on stdout after the id
/// handshake (which uses stdout too) into `output`.
fn run_mapped_to(
    exe: &Path,
    idmap: &IdMap,
    role: &str,
    args: &[&Path],
    output: &mut dyn std::io::Write,
) -> Result<String, String> {
    let mut child = Command::new(exe)
        .arg(role)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {}: {e}", exe.display()))?;
    let mapped =
        userns::map_child(&mut child, &idmap.for_helpers(), |_| Ok(())).and_then(|mut rest| {
            std::io::copy(&mut rest, output)
                .map(|_| ())
                .map_err(moat_sandbox::SandboxError::Handshake)
        });
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    mapped.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(err)
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
        run_mapped(&self.exe, &self.idmap, UNPACK_ROLE, &[blob, dest])
            .map(|_| ())
            .map_err(ImageError::Helper)
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
    run_mapped(exe, idmap, REMOVE_ROLE, &[path])
        .map(|_| ())
        .map_err(|e| {
            DaemonError::io(
                format!("remove {}", path.display()),
                std::io::Error::other(e),
            )
        })
}

/// Writes a sandbox's upper layer as a tar into `out`, from inside the
/// sandboxes' user namespace, with mtimes clamped to `clamp_mtime`.
/// Returns the entries that could not be kept (sockets, fifos, devices).
pub fn save_layer_mapped(
    exe: &Path,
    idmap: &IdMap,
    upper: &Path,
    clamp_mtime: u64,
    out: std::fs::File,
) -> Result<Vec<String>, DaemonError> {
    let clamp = PathBuf::from(clamp_mtime.to_string());
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let report = run_mapped_to(exe, idmap, SAVE_ROLE, &[upper, &clamp], &mut out)
        .and_then(|r| {
            out.flush().map_err(|e| format!("write the layer: {e}"))?;
            Ok(r)
        })
        .map_err(|e| DaemonError::BadRequest(format!("saving {} failed: {e}", upper.display())))?;
    Ok(serde_json::from_str(report.trim()).unwrap_or_default())
}

/// `moat __save-layer UPPER CLAMP_MTIME`: the layer tar on stdout, the
/// entries that could not be kept (as a JSON list) on stderr.
pub fn save_role_main(args: &[String]) -> i32 {
    let run = || -> Result<(), String> {
        let a = role_args(args, 2)?;
        let clamp: u64 = args[1].parse().map_err(|_| "bad clamp time".to_string())?;
        userns::become_root_in_new_userns().map_err(|e| e.to_string())?;
        let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        let summary =
            moat_images::write_upper_layer(&a[0], clamp, out).map_err(|e| e.to_string())?;
        eprintln!(
            "{}",
            serde_json::to_string(&summary.skipped).unwrap_or_default()
        );
        Ok(())
    };
    report(run())
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

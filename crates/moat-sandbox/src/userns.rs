//! Starting a helper process inside a new user namespace with moat's id map.
//!
//! The child makes the namespace itself (`unshare`), says so on its stdout,
//! and waits on its stdin while the parent, still outside, writes the map;
//! only a process outside may write it for the rootless helpers to work. Both
//! the sandbox's init and the layer unpacker start this way.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout};

use nix::sched::{unshare, CloneFlags};
use nix::unistd::{setresgid, setresuid, Gid, Uid};

use crate::idmap::IdMap;
use crate::SandboxError;

/// The line the child writes once it has its user namespace.
const UNSHARED: &str = "unshared";
/// The line the parent writes once the map is in place.
const MAPPED: &str = "mapped";

/// Child side: make a user namespace and, once the parent has mapped it,
/// become its root. Uses stdin and stdout for the handshake.
pub fn become_root_in_new_userns() -> Result<(), SandboxError> {
    unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| SandboxError::sys("unshare(CLONE_NEWUSER)", e))?;
    let mut out = io::stdout().lock();
    writeln!(out, "{UNSHARED}")
        .and_then(|_| out.flush())
        .map_err(SandboxError::Handshake)?;
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(SandboxError::Handshake)?;
    if line.trim() != MAPPED {
        return Err(SandboxError::Handshake(io::Error::other(
            "the parent did not map our ids",
        )));
    }
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| SandboxError::sys("setresgid(0)", e))?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| SandboxError::sys("setresuid(0)", e))?;
    Ok(())
}

/// Parent side: wait for `child` to make its namespace, let `before_map` act
/// on it (join cgroups), write `map`, and let it go on. Returns a reader of
/// the rest of the child's stdout.
pub fn map_child(
    child: &mut Child,
    map: &IdMap,
    before_map: impl FnOnce(i32) -> Result<(), SandboxError>,
) -> Result<BufReader<ChildStdout>, SandboxError> {
    let pid = child.id() as i32;
    let stdout = child.stdout.take().ok_or_else(|| no_pipe("stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(SandboxError::Handshake)?;
    if line.trim() != UNSHARED {
        let mut rest = String::new();
        let _ = reader.get_mut().read_to_string(&mut rest);
        return Err(SandboxError::Start(format!(
            "the sandbox process stopped before making its user namespace: {}{}",
            line.trim(),
            rest.trim()
        )));
    }
    before_map(pid)?;
    map.apply(pid)?;
    let stdin = child.stdin.as_mut().ok_or_else(|| no_pipe("stdin"))?;
    writeln!(stdin, "{MAPPED}").map_err(SandboxError::Handshake)?;
    Ok(reader)
}

fn no_pipe(which: &str) -> SandboxError {
    SandboxError::Handshake(io::Error::other(format!("the child has no {which} pipe")))
}

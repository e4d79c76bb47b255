//! The `runsc` binary: where it is, which version, which platform, and the
//! command lines moat gives it. Every call names its own state directory,
//! so moat's containers never mix with anyone else's.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the daemon learns about a runsc before it starts a sandbox with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runsc {
    pub path: PathBuf,
    /// Its first `--version` line, `runsc version release-20240212.0`.
    pub version: String,
    /// The release date in the version (`20240212`), 0 where there is none.
    pub date: u32,
}

/// The first release with the systrap platform, which became the default
/// later that year (ptrace before it).
const SYSTRAP_SINCE: u32 = 20_230_501;

/// Releases before this one refuse `statx` with `AT_NO_AUTOMOUNT` (EINVAL),
/// which Debian 12's coreutils pass: `ls -l` fails on every file. moat's
/// guest helper makes such calls fail with ENOSYS instead, so that glibc
/// falls back to `fstatat` (see `guest.rs`).
pub const STATX_FIXED_SINCE: u32 = 20_240_101;

impl Runsc {
    /// `configured` if given (a path), otherwise the first `runsc` on `PATH`:
    /// a newer runsc that the user installed in `/usr/local/bin` comes
    /// before Debian's `/usr/bin/runsc`.
    pub fn find(configured: Option<&Path>) -> Result<Runsc, String> {
        let path = Self::locate(configured)?;
        let out = Command::new(&path).arg("--version").output().map_err(|e| {
            format!(
                "cannot run {}: {e}; check the runsc path (`sandbox.runsc` in the configuration)",
                path.display()
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.lines().next().unwrap_or("").trim().to_string();
        if !out.status.success() || !version.starts_with("runsc version") {
            return Err(format!(
                "{} does not answer `--version` as gVisor's runsc does; check `sandbox.runsc` in the configuration",
                path.display()
            ));
        }
        Ok(Runsc {
            date: release_date(&version),
            path,
            version,
        })
    }

    /// The runsc binary [`Runsc::find`] would ask, without asking it.
    pub fn locate(configured: Option<&Path>) -> Result<PathBuf, String> {
        match configured {
            Some(p) => Ok(p.to_path_buf()),
            None => std::env::var_os("PATH")
                .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
                .to_string_lossy()
                .split(':')
                .map(|d| Path::new(d).join("runsc"))
                .find(|p| p.is_file())
                .ok_or_else(|| "the gvisor tier needs gVisor's runsc, which is not installed: `apt-get install runsc` (Debian, Ubuntu) or see https://gvisor.dev/docs/user_guide/install/".into()),
        }
    }

    /// `wanted` (`auto`, `systrap`, `ptrace` or `kvm`) made concrete:
    /// `auto` is systrap where this runsc has it, ptrace otherwise. kvm is
    /// never chosen by itself: a `/dev/kvm` may exist that cannot run
    /// gVisor's guest (one that takes only PVM guests, say), and a sandbox
    /// would hang at start.
    pub fn platform(&self, wanted: &str) -> Result<String, String> {
        match wanted {
            "auto" | "" => Ok(if self.date >= SYSTRAP_SINCE {
                "systrap".into()
            } else {
                "ptrace".into()
            }),
            "systrap" if self.date < SYSTRAP_SINCE => Err(format!(
                "{} has no systrap platform; use ptrace or auto (`sandbox.gvisor_platform`)",
                self.version
            )),
            "systrap" | "ptrace" | "kvm" => Ok(wanted.into()),
            other => Err(format!(
                "unknown gVisor platform {other:?}: use auto, systrap, ptrace or kvm (`sandbox.gvisor_platform`)"
            )),
        }
    }
}

/// `20221219` from `runsc version 0.0~20221219.0` or `release-20240212.0`.
fn release_date(version: &str) -> u32 {
    version
        .split(|c: char| !c.is_ascii_digit())
        .find(|run| run.len() == 8)
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// The first release that honours set-id executables (with `--allow-suid`;
/// before it, gVisor ignored their bits and set no_new_privs on every
/// process): from it on, `sudo` inside works as in the namespace tier.
pub const ALLOW_SUID_SINCE: u32 = 20_250_820;

/// moat's global flags for every runsc call of one sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Globals {
    /// runsc's state root, moat's own.
    pub(crate) state: PathBuf,
    pub(crate) platform: String,
    /// The release date of the runsc in use (see [`Runsc::date`]).
    pub(crate) date: u32,
}

impl Globals {
    /// A runsc command line with moat's global flags: its own state root,
    /// the sandbox's network namespace as the host network (it holds only
    /// loopback and the doors moat opens in it), no cgroups of its own (the
    /// sandbox's cgroup holds every process runsc starts), and no overlay
    /// of runsc's own over the root file system: releases since 2023-03 put
    /// one there by default (`root:self`), which would keep what the
    /// sandbox writes in a file of runsc's, lost at stop and missing from
    /// `moat sandbox save`, instead of in the sandbox's layer. (Every
    /// release that moat runs knows `--overlay2=none`; the older ones have
    /// it as their default.) Where runsc can, set-id executables work, as
    /// in the namespace tier (`sudo`); moat's `no_new_privs` setting still
    /// turns them off.
    pub(crate) fn command(&self, runsc: &Path) -> Command {
        let mut cmd = Command::new(runsc);
        cmd.args(self.args());
        cmd
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--root".to_string(),
            self.state.display().to_string(),
            "--network=host".into(),
            "--ignore-cgroups".into(),
            "--overlay2=none".into(),
            format!("--platform={}", self.platform),
        ];
        if self.date >= ALLOW_SUID_SINCE {
            args.push("--allow-suid".into());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates_come_from_either_version_style() {
        assert_eq!(release_date("runsc version 0.0~20221219.0"), 20221219);
        assert_eq!(release_date("runsc version release-20240212.0"), 20240212);
        assert_eq!(release_date("runsc version unknown"), 0);
    }

    #[test]
    fn set_id_executables_are_allowed_where_runsc_knows_how() {
        let globals = |date| Globals {
            state: "/tmp/state".into(),
            platform: "ptrace".into(),
            date,
        };
        assert_eq!(
            globals(20221219).args(),
            [
                "--root",
                "/tmp/state",
                "--network=host",
                "--ignore-cgroups",
                "--overlay2=none",
                "--platform=ptrace"
            ]
        );
        assert!(!globals(20250811)
            .args()
            .contains(&"--allow-suid".to_string()));
        assert!(globals(20250820)
            .args()
            .contains(&"--allow-suid".to_string()));
    }

    #[test]
    fn auto_picks_the_best_platform_the_release_has() {
        let old = Runsc {
            path: "/usr/bin/runsc".into(),
            version: "runsc version 0.0~20221219.0".into(),
            date: 20221219,
        };
        let new = Runsc {
            date: 20240212,
            ..old.clone()
        };
        assert_eq!(old.platform("auto"), Ok("ptrace".into()));
        assert_eq!(new.platform("auto"), Ok("systrap".into()));
        assert!(old.platform("systrap").is_err());
        assert_eq!(old.platform("kvm"), Ok("kvm".into()));
        assert!(new.platform("firecracker").is_err());
    }
}

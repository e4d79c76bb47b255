//! Isolation tiers, from the daemon's side: which tier a new sandbox gets,
//! what the tier needs to start (the spec's [`Tier`]), and the walls that
//! `inspect` reports. The rest of the daemon does not look at the tier: every
//! tier's init serves the same control socket.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use moat_api::{Isolation, IsolationInfo, Limits, Wall};
use moat_sandbox::gvisor::runsc::Runsc;
use moat_sandbox::spec::Tier;

use crate::sandboxes::Daemon;
use crate::DaemonError;

impl Daemon {
    /// The tier a create request gets.
    pub(crate) fn pick_isolation(
        &self,
        asked: Option<Isolation>,
    ) -> Result<Isolation, DaemonError> {
        let tier = asked.unwrap_or(self.config().sandbox.isolation);
        // Checked now, so that a sandbox that cannot start is never made.
        self.tier_spec(tier, &Limits::default())?;
        Ok(tier)
    }

    /// What `tier` needs in the sandbox's spec: for gVisor, the runsc found
    /// now and its platform.
    pub(crate) fn tier_spec(&self, tier: Isolation, limits: &Limits) -> Result<Tier, DaemonError> {
        match tier {
            Isolation::Namespaces => Ok(Tier::Namespaces),
            Isolation::Gvisor => {
                let runsc = self.runsc()?;
                let platform = runsc
                    .platform(&self.config().sandbox.gvisor_platform)
                    .map_err(DaemonError::BadRequest)?;
                Ok(Tier::Gvisor {
                    runsc: runsc.path,
                    platform,
                    release: runsc.date,
                    pids: limits.pids,
                })
            }
        }
    }

    /// The runsc to use, asked for its version once per binary: the answer
    /// is kept while the file's modification time stays the same (an
    /// upgrade changes it), so creates and `ls` do not start it each time.
    fn runsc(&self) -> Result<Runsc, DaemonError> {
        static KNOWN: Mutex<Option<(PathBuf, SystemTime, Runsc)>> = Mutex::new(None);
        let configured = &self.config().sandbox.runsc;
        let configured = (!configured.is_empty()).then(|| Path::new(configured.as_str()));
        let path = Runsc::locate(configured).map_err(DaemonError::BadRequest)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mut known = crate::sandboxes::lock(&KNOWN);
        if let (Some((p, t, r)), Some(mtime)) = (known.as_ref(), mtime) {
            if *p == path && *t == mtime {
                return Ok(r.clone());
            }
        }
        let runsc = Runsc::find(Some(&path)).map_err(DaemonError::BadRequest)?;
        if let Some(mtime) = mtime {
            *known = Some((path, mtime, runsc.clone()));
        }
        Ok(runsc)
    }

    /// The tier of a sandbox as `inspect` shows it, with the walls that are
    /// up for it on this host.
    pub(crate) fn isolation_info(&self, tier: Isolation, limits: &Limits) -> IsolationInfo {
        let wall = |name: &str, up: bool, detail: String| Wall {
            name: name.into(),
            up,
            detail,
        };
        let ids = if self.rootless() {
            "ids inside are the daemon user's subordinate ids".to_string()
        } else {
            format!(
                "ids inside are unprivileged host ids from {}",
                self.config().sandbox.uid_base
            )
        };
        let cgroups = wall("cgroup limits", limits.enforced, limits.note.clone());
        let disk = wall("disk budget", limits.disk.enforced, limits.disk.by.clone());
        match tier {
            Isolation::Namespaces => {
                let landlock = moat_sandbox::landlock::sandbox_abi();
                IsolationInfo {
                    tier,
                    runsc: None,
                    platform: None,
                    walls: vec![
                        wall("user namespace", true, ids),
                        wall(
                            "seccomp",
                            true,
                            "an allow-list (crates/moat-sandbox/src/seccomp.json); x32 refused"
                                .into(),
                        ),
                        wall(
                            "landlock",
                            landlock.is_some(),
                            moat_sandbox::landlock::describe(),
                        ),
                        cgroups,
                        disk,
                    ],
                }
            }
            Isolation::Gvisor => {
                let found = self.runsc();
                let platform = found
                    .as_ref()
                    .ok()
                    .and_then(|r| r.platform(&self.config().sandbox.gvisor_platform).ok());
                let (runsc, kernel) = match &found {
                    Ok(r) => (
                        Some(format!("{} ({})", r.path.display(), r.version)),
                        wall(
                            "gVisor",
                            true,
                            format!(
                                "a user-space kernel between the sandbox and the host's, on the {} platform; the network namespace holds only loopback and moat's doors",
                                platform.as_deref().unwrap_or("?")
                            ),
                        ),
                    ),
                    Err(e) => (None, wall("gVisor", false, e.to_string())),
                };
                IsolationInfo {
                    tier,
                    runsc,
                    platform,
                    walls: vec![
                        kernel,
                        wall(
                            "seccomp",
                            true,
                            "moat's allow-list on every process, inside gVisor; runsc's own filters on gVisor itself".into(),
                        ),
                        wall("user namespace", true, ids),
                        cgroups,
                        disk,
                    ],
                }
            }
        }
    }
}

/// Host tasks that gVisor runs for a sandbox at rest (its kernel's and its
/// gofer's threads): about 55, measured with runsc 20221219 on ptrace.
const GVISOR_HOST_BASE: u64 = 256;
/// Host tasks per process inside: the ptrace platform gives each its stub
/// process and a tracing thread in gVisor's kernel, about 6 measured.
const GVISOR_HOST_PER_TASK: u64 = 8;

/// The limits the host's cgroup holds a sandbox to. In the gVisor tier the
/// sandbox's PID limit is held inside gVisor (the guest helper sets it as
/// RLIMIT_NPROC), and the host's cgroup, which counts gVisor's own tasks,
/// is sized for that many processes inside: were it reached first, gVisor's
/// kernel itself would fail, and the whole sandbox with it.
pub(crate) fn host_limits(tier: Isolation, limits: &Limits) -> Limits {
    let mut host = limits.clone();
    if tier == Isolation::Gvisor {
        host.pids = limits.pids.map(|p| {
            p.saturating_mul(GVISOR_HOST_PER_TASK)
                .saturating_add(GVISOR_HOST_BASE)
        });
    }
    host
}

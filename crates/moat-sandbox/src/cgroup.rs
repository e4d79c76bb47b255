//! Memory, CPU and PID limits through cgroups, v2 or v1, whichever the host
//! mounts. Where neither can be written (rootless without delegation) the
//! limits are recorded as not enforced, and the caller warns.

use std::fs;
use std::path::{Path, PathBuf};

use moat_api::Limits;

const ROOT: &str = "/sys/fs/cgroup";
/// The cgroup v1 controllers moat uses.
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];
/// Used where mounted: it lets `save` hold a running sandbox still.
const V1_FREEZER: &str = "freezer";
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroups of one sandbox: one directory (v2) or one per controller (v1).
#[derive(Debug, Clone, PartialEq)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
    pub v2: bool,
}

/// Where a sandbox's cgroup goes, and with which version.
#[derive(Debug, Clone, PartialEq)]
pub enum Hierarchy {
    V2 { parent: PathBuf },
    V1 { parents: Vec<PathBuf> },
    None { reason: String },
}

pub fn detect(rootless: bool) -> Hierarchy {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        let parent = if rootless {
            match own_v2_cgroup() {
                Some(own) => match own.parent() {
                    Some(p) if writable(p) => p.to_path_buf(),
                    _ => {
                        return Hierarchy::None {
                            reason: "cgroup v2 is not delegated to this user (run the daemon in a systemd user session with delegation, or as root)".into(),
                        }
                    }
                },
                None => return Hierarchy::None { reason: "cannot find this process's cgroup".into() },
            }
        } else {
            root.join("moat")
        };
        return Hierarchy::V2 { parent };
    }
    let mounted: Vec<PathBuf> = V1_CONTROLLERS
        .iter()
        .map(|c| root.join(c))
        .filter(|p| p.is_dir())
        .collect();
    if mounted.len() != V1_CONTROLLERS.len() {
        return Hierarchy::None {
            reason: "the host mounts neither cgroup v2 nor the v1 memory, pids and cpu controllers"
                .into(),
        };
    }
    if rootless && !mounted.iter().all(|p| writable(p)) {
        return Hierarchy::None { reason: "cgroup v1 is not writable by this user (run the daemon as root for enforced limits)".into() };
    }
    let mut parents: Vec<PathBuf> = mounted.into_iter().map(|p| p.join("moat")).collect();
    let freezer = root.join(V1_FREEZER);
    if freezer.is_dir() && (!rootless || writable(&freezer)) {
        parents.push(freezer.join("moat"));
    }
    Hierarchy::V1 { parents }
}

fn own_v2_cgroup() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(ROOT).join(rel.trim_start_matches('/')))
}

fn writable(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

impl Hierarchy {
    /// Make the sandbox's cgroup with `limits`. Returns the cgroup (if any)
    /// and the limits as they stand: enforced, or why not.
    pub fn create(&self, id: &str, limits: &Limits) -> (Option<Cgroup>, Limits) {
        let mut out = limits.clone();
        let made = match self {
            Hierarchy::None { reason } => Err(reason.clone()),
            Hierarchy::V2 { parent } => create_v2(parent, id, limits),
            Hierarchy::V1 { parents } => create_v1(parents, id, limits),
        };
        match made {
            Ok(cg) => {
                out.enforced = true;
                out.note = if cg.v2 {
                    "cgroup v2".into()
                } else {
                    "cgroup v1".into()
                };
                (Some(cg), out)
            }
            Err(reason) => {
                out.enforced = false;
                out.note = format!("not enforced: {reason}");
                (None, out)
            }
        }
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    fs::write(dir.join(file), value)
        .map_err(|e| format!("write {value} to {}: {e}", dir.join(file).display()))
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}

fn create_v2(parent: &Path, id: &str, limits: &Limits) -> Result<Cgroup, String> {
    mkdir(parent)?;
    // Controllers must be enabled on every level above the sandbox's cgroup.
    if let Some(top) = parent.parent() {
        let _ = write(top, "cgroup.subtree_control", "+memory +pids +cpu");
    }
    write(parent, "cgroup.subtree_control", "+memory +pids +cpu")?;
    let dir = parent.join(id);
    mkdir(&dir)?;
    if let Some(mem) = limits.memory {
        write(&dir, "memory.max", &mem.to_string())?;
        let _ = write(&dir, "memory.swap.max", "0");
    }
    if let Some(pids) = limits.pids {
        write(&dir, "pids.max", &pids.to_string())?;
    }
    if let Some(cpus) = limits.cpus {
        write(
            &dir,
            "cpu.max",
            &format!("{} {CPU_PERIOD_US}", (cpus * CPU_PERIOD_US as f64) as u64),
        )?;
    }
    Ok(Cgroup {
        dirs: vec![dir],
        v2: true,
    })
}

fn create_v1(parents: &[PathBuf], id: &str, limits: &Limits) -> Result<Cgroup, String> {
    let mut dirs = Vec::new();
    for parent in parents {
        let dir = parent.join(id);
        mkdir(&dir)?;
        let controller = parent
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("");
        match controller {
            "memory" => {
                if let Some(mem) = limits.memory {
                    write(&dir, "memory.limit_in_bytes", &mem.to_string())?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        let _ = write(&dir, "memory.memsw.limit_in_bytes", &mem.to_string());
                    }
                }
            }
            "pids" => {
                if let Some(pids) = limits.pids {
                    write(&dir, "pids.max", &pids.to_string())?;
                }
            }
            "cpu" => {
                if let Some(cpus) = limits.cpus {
                    write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(
                        &dir,
                        "cpu.cfs_quota_us",
                        &((cpus * CPU_PERIOD_US as f64) as u64).to_string(),
                    )?;
                }
            }
            _ => {}
        }
        dirs.push(dir);
    }
    Ok(Cgroup { dirs, v2: false })
}

impl Cgroup {
    /// The cgroup a sandbox with this id would have had: for clean-up after a crash.
    pub fn existing(hierarchy: &Hierarchy, id: &str) -> Option<Cgroup> {
        let cg = match hierarchy {
            Hierarchy::V2 { parent } => Cgroup {
                dirs: vec![parent.join(id)],
                v2: true,
            },
            Hierarchy::V1 { parents } => Cgroup {
                dirs: parents.iter().map(|p| p.join(id)).collect(),
                v2: false,
            },
            Hierarchy::None { .. } => return None,
        };
        cg.dirs.iter().any(|d| d.exists()).then_some(cg)
    }

    pub fn add(&self, pid: i32) -> Result<(), String> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.dirs.first() else {
            return vec![];
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Freezes (or thaws) every process of the cgroup, waiting until the
    /// kernel reports them frozen. Fails where there is no freezer.
    pub fn freeze(&self, frozen: bool) -> Result<(), String> {
        // (directory, file to write, value, file to read, line it shows when done)
        let (dir, control, value, state, done) = if self.v2 {
            let dir = self.dirs.first().ok_or("no cgroup")?;
            let (value, done) = if frozen {
                ("1", "frozen 1")
            } else {
                ("0", "frozen 0")
            };
            (dir, "cgroup.freeze", value, "cgroup.events", done)
        } else {
            let dir = self
                .dirs
                .iter()
                .find(|d| {
                    d.parent()
                        .and_then(|p| p.parent())
                        .is_some_and(|c| c.ends_with(V1_FREEZER))
                })
                .ok_or("the host mounts no cgroup v1 freezer")?;
            let value = if frozen { "FROZEN" } else { "THAWED" };
            (dir, "freezer.state", value, "freezer.state", value)
        };
        write(dir, control, value)?;
        for _ in 0..500 {
            let reached = fs::read_to_string(dir.join(state))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == done));
            if reached {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(format!(
            "{} did not become {value} within 5 s",
            dir.display()
        ))
    }

    /// Kill every process left in the cgroup and remove it.
    pub fn destroy(&self) {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            if self.v2 {
                let _ = write(&self.dirs[0], "cgroup.kill", "1");
            } else {
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}

//! A daemon of the unprivileged user `moat-test`, with the caller's
//! subordinate ids, for the tests that run sandboxes rootless. The user is
//! made by `scripts/test.sh`; the tests start as root and switch to it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{cached_shell_tarball_into, text, unique, Tier, BIN};

pub const USER: &str = "moat-test";

/// The user's daemon, its roots and a workspace it owns, under `dir`;
/// stopped and removed when dropped.
pub struct Rootless {
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// What [`Rootless::create`] says about a sandbox.
pub enum Created {
    Running,
    /// The daemon refuses this tier without root, with its own message:
    /// the caller skips, saying so.
    TierRefused(String),
}

impl Rootless {
    /// A fresh daemon's roots in /tmp, named after `tag`, with a copy of
    /// this build's binary and the shell template's cached tarball.
    pub fn setup(tag: &str) -> Rootless {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the rootless tests switch users and must start as root"
        );
        let user = nix::unistd::User::from_name(USER)
            .unwrap()
            .unwrap_or_else(|| panic!("no user {USER}: run scripts/test.sh, which creates it"));
        let dir = PathBuf::from(format!("/tmp/moat-rootless-{}", unique(tag)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cache/templates")).unwrap();
        std::fs::copy(BIN, dir.join("moat")).unwrap();
        // The template's root file system, from the cache the root daemon filled.
        let target = cached_shell_tarball_into(&dir.join("cache/templates"));
        for p in [dir.clone(), dir.join("cache"), dir.join("cache/templates")] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        for sub in ["user", "ws"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
            nix::unistd::chown(&dir.join(sub), Some(user.uid), Some(user.gid)).unwrap();
        }
        Rootless {
            dir,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// The workspace the user owns.
    pub fn ws(&self) -> PathBuf {
        self.dir.join("ws")
    }

    /// A command for `moat ARGS…` as the user, with these roots and nothing
    /// else of ours in its environment; stdin, stdout and stderr are the
    /// caller's to set.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args([
            "-u",
            USER,
            "--",
            "env",
            "-i",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "HOME=/tmp",
        ])
        .arg(format!("MOAT_HOME={}", self.state().display()))
        .arg(format!("MOAT_RUNTIME_DIR={}", self.runtime().display()))
        .arg(format!(
            "MOAT_CACHE_DIR={}",
            self.dir.join("cache").display()
        ))
        .arg(self.dir.join("moat"))
        .args(args);
        cmd
    }

    /// `moat ARGS…` as the user (see [`Rootless::cmd`]).
    pub fn moat(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// The daemon's state root (`MOAT_HOME`).
    pub fn state(&self) -> PathBuf {
        self.dir.join("user/state")
    }

    /// The daemon's runtime root (`MOAT_RUNTIME_DIR`: its socket, its lock).
    pub fn runtime(&self) -> PathBuf {
        self.dir.join("user/run")
    }

    /// Give `path` to the user, as its own files are on the host (a
    /// workspace, a file the test puts into one).
    pub fn own(&self, path: &Path) {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .unwrap();
    }

    /// A process-wide daemon of the user, shared by the sandboxes that are
    /// alive at once, and stopped and removed with the last of them.
    pub fn shared() -> std::sync::Arc<Rootless> {
        static SHARED: std::sync::Mutex<std::sync::Weak<Rootless>> =
            std::sync::Mutex::new(std::sync::Weak::new());
        let mut held = SHARED.lock().unwrap();
        if let Some(r) = held.upgrade() {
            return r;
        }
        let r = std::sync::Arc::new(Rootless::setup("sb"));
        *held = std::sync::Arc::downgrade(&r);
        r
    }

    /// Run and insist on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.moat(args);
        assert!(out.status.success(), "moat {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// `sandbox inspect NAME`'s one sandbox.
    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["sandbox", "inspect", name])).unwrap();
        v[0].clone()
    }

    /// `sandbox create --name NAME --isolation TIER shell WS`. A tier other
    /// than the namespace tier may be refused without root: that refusal,
    /// the daemon's one line naming the tier and rootless, is returned for
    /// the caller to skip on; any other failure fails the test.
    pub fn create(&self, tier: Tier, name: &str, ws: &Path) -> Created {
        let [flag, value] = tier.flags();
        let out = self.moat(&[
            "sandbox",
            "create",
            "--name",
            name,
            flag,
            value,
            "shell",
            ws.to_str().unwrap(),
        ]);
        let err = text(&out.stderr);
        if out.status.success() {
            return Created::Running;
        }
        let line = err.trim();
        if tier != Tier::Namespaces
            && line.lines().count() == 1
            && line.to_lowercase().contains(value)
            && line.contains("rootless")
        {
            return Created::TierRefused(line.to_string());
        }
        panic!("create on the {value} tier: {err}");
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        let _ = self.moat(&["sandbox", "reset", "-f"]);
        if let Ok(pid) = std::fs::read_to_string(self.runtime().join("moat.lock")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! Where moat keeps things (DESIGN.md's contracts): the state root, the
//! runtime root with the API socket, and the cache of built templates.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub state: PathBuf,
    pub runtime: PathBuf,
    pub cache: PathBuf,
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/tmp"))
}

impl Paths {
    pub fn from_env() -> Paths {
        let root = nix::unistd::geteuid().is_root();
        let uid = nix::unistd::geteuid().as_raw();
        let state = env_path("MOAT_HOME").unwrap_or_else(|| {
            if root {
                PathBuf::from("/var/lib/moat")
            } else {
                env_path("XDG_DATA_HOME")
                    .unwrap_or_else(|| home().join(".local/share"))
                    .join("moat")
            }
        });
        let runtime = env_path("MOAT_RUNTIME_DIR").unwrap_or_else(|| {
            if root {
                PathBuf::from("/run/moat")
            } else {
                env_path("XDG_RUNTIME_DIR")
                    .map(|d| d.join("moat"))
                    .unwrap_or_else(|| PathBuf::from(format!("/tmp/moat-{uid}")))
            }
        });
        let cache = env_path("MOAT_CACHE_DIR").unwrap_or_else(|| {
            env_path("XDG_CACHE_HOME")
                .unwrap_or_else(|| home().join(".cache"))
                .join("moat")
        });
        Paths {
            state,
            runtime,
            cache,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime.join("moat.sock")
    }
    pub fn lock(&self) -> PathBuf {
        self.runtime.join("moat.lock")
    }
    pub fn database(&self) -> PathBuf {
        self.state.join("moat.db")
    }
    pub fn images(&self) -> PathBuf {
        self.state.join("images")
    }
    pub fn sandbox_state(&self, id: &str) -> PathBuf {
        self.state.join("sandboxes").join(id)
    }
    pub fn sandbox_runtime(&self, id: &str) -> PathBuf {
        self.runtime.join("sandboxes").join(id)
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.runtime.join("daemon.log")
    }
}

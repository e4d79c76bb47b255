//! The moat daemon: it serves the JSON API on the Unix socket in the runtime
//! root, keeps the state in SQLite under the state root, and wires the parts
//! together: images from `moat-images` become sandboxes of `moat-sandbox`.
//! It knows no syscalls beyond processes and sockets; those belong to the
//! sandbox crate.

pub mod config;
pub mod disk;
mod exec;
mod helpers;
mod images;
mod isolation;
mod migrate;
mod model_runner;
mod models;
mod network;
pub mod paths;
mod ports;
mod sandboxes;
mod secrets;
mod server;
pub mod state;
mod step_output;
mod templates;

pub use config::Config;
pub use helpers::{
    remove_role_main, save_role_main, unpack_role_main, REMOVE_ROLE, SAVE_ROLE, UNPACK_ROLE,
};
pub use paths::Paths;
pub use server::run;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("the state database: {0}")]
    State(String),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("another moat daemon is already running (pid {pid}) on {socket}; use it, stop it, or set MOAT_RUNTIME_DIR and MOAT_HOME for a second one")]
    AlreadyRunning { pid: String, socket: String },
    #[error("no sandbox named {0:?}; see `moat sandbox ls`")]
    NoSuchSandbox(String),
    #[error("a sandbox named {0:?} already exists; pick another --name or remove it with `moat sandbox rm {0}`")]
    NameTaken(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("sandbox {0:?} is stopped; start it with `moat sandbox run {0}`")]
    Stopped(String),
    #[error(transparent)]
    Sandbox(#[from] moat_sandbox::SandboxError),
    #[error(transparent)]
    Image(#[from] moat_images::ImageError),
    #[error(transparent)]
    Model(#[from] moat_models::store::StoreError),
}

impl DaemonError {
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        DaemonError::Io {
            what: what.into(),
            err,
        }
    }
}

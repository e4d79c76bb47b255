//! What the daemon asks of a sandbox's init over its control socket. Init
//! answers from inside the sandbox, so the daemon treats every answer as
//! untrusted input: it checks each descriptor it is handed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum InitRequest {
    Ping,
    /// Start a process. Without a TTY, its stdin, stdout and stderr travel
    /// with this request; with one, the master side comes back in `Started`.
    Exec(InitExec),
    /// A fresh, unbound TCP socket made in the sandbox's network namespace:
    /// the daemon binds or connects it to open a door.
    Socket {
        ipv6: bool,
    },
    /// End every process: SIGTERM, then SIGKILL after `grace_ms`, then init exits.
    Stop {
        grace_ms: u64,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InitExec {
    pub argv: Vec<String>,
    /// `KEY=VALUE` on top of the defaults init computes for the user.
    pub env: Vec<String>,
    /// A user name, `uid`, or `uid:gid`; `agent` when absent.
    pub user: Option<String>,
    pub cwd: Option<String>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InitReply {
    Pong { pid: i32 },
    Started { pid: i32 },
    Exited { code: i32 },
    Socket,
    Stopping,
    Error { message: String },
}

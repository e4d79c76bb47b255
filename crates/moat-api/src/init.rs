//! What the daemon asks of a sandbox's init over its control socket. Init
//! answers from inside the sandbox, so the daemon treats every answer as
//! untrusted input: it checks each descriptor it is handed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum InitRequest {
    Ping,
    /// Start a process. Init makes its standard descriptors inside the
    /// sandbox (see [`InitStdio`]); the caller's ends come back in `Started`.
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
    pub stdio: InitStdio,
    /// The terminal's size, with [`InitStdio::Tty`].
    pub rows: u16,
    pub cols: u16,
}

impl InitExec {
    pub fn tty(&self) -> bool {
        self.stdio == InitStdio::Tty
    }
}

/// How a process's standard descriptors are made. Init always makes them
/// itself, inside the sandbox: no descriptor of the caller's (a terminal, a
/// pipe to a host shell) ever reaches a sandboxed process, which could keep
/// it after the command returns and read what is typed into it later.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InitStdio {
    /// All three on the sandbox's `/dev/null`: a detached process.
    #[default]
    Null,
    /// Pipes. `Started` carries, in this order, the write end of stdin's
    /// pipe (only with `stdin`; otherwise stdin is `/dev/null`), the read end
    /// of stdout's, and the read end of stderr's (not with `merge_stderr`,
    /// where stderr shares stdout's pipe).
    Pipes { stdin: bool, merge_stderr: bool },
    /// A terminal made inside; `Started` carries its master side.
    Tty,
}

impl InitStdio {
    /// How many descriptors `Started` carries.
    pub fn returned(&self) -> usize {
        match self {
            InitStdio::Null => 0,
            InitStdio::Pipes {
                stdin,
                merge_stderr,
            } => 1 + usize::from(*stdin) + usize::from(!*merge_stderr),
            InitStdio::Tty => 1,
        }
    }
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

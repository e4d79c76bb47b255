//! Starting a process in a running sandbox for the CLI. Init makes the
//! process's standard descriptors inside the sandbox (pipes, or a terminal)
//! and their other ends travel back through the daemon to the CLI, which
//! relays them to its own stdin, stdout and stderr: output flows from the
//! process to the caller without passing through the daemon, and no
//! descriptor of the caller's ever reaches the sandbox (a process left behind
//! could read the caller's terminal long after the command returned).

use std::os::fd::AsRawFd;

use moat_api::init::{InitExec, InitStdio};
use moat_api::{ExecRequest, Reply};
use moat_sandbox::control;

use crate::sandboxes::Daemon;
use crate::server::Replies;
use crate::DaemonError;

impl Daemon {
    pub fn exec(&self, req: ExecRequest, r: &Replies) -> Result<(), DaemonError> {
        let (info, control_path, agent_command) = self.exec_target(&req.name)?;
        let argv = if req.agent {
            agent_command
                .into_iter()
                .chain(req.argv.iter().cloned())
                .collect()
        } else {
            req.argv.clone()
        };
        if argv.is_empty() {
            return Err(DaemonError::BadRequest(
                "no command given: `moat sandbox exec NAME COMMAND [ARGS…]`".into(),
            ));
        }
        let cwd = req
            .workdir
            .clone()
            .or_else(|| info.workspaces.first().map(|w| w.path.clone()));
        // The sandbox's own settings first, so that the caller's -e can override them.
        let env = self
            .sandbox_env()
            .into_iter()
            .chain(req.env.iter().cloned())
            .collect();
        let exec = InitExec {
            argv,
            env,
            user: req.user.clone(),
            cwd,
            stdio: if req.tty {
                InitStdio::Tty
            } else if req.detach {
                InitStdio::Null
            } else {
                InitStdio::Pipes {
                    stdin: req.interactive,
                    merge_stderr: false,
                }
            },
            rows: req.rows,
            cols: req.cols,
        };
        let mut session = control::exec(&control_path, &exec)?;
        let theirs: Vec<i32> = session.stdio.iter().map(|m| m.as_raw_fd()).collect();
        r.send_with_fds(&Reply::Started { pid: session.pid }, &theirs);
        // Our copies must go, or the caller would never see end-of-file on its pipes.
        session.stdio.clear();
        if req.detach {
            return Ok(());
        }
        let code = session.wait()?;
        r.send(&Reply::Exited { code });
        Ok(())
    }
}

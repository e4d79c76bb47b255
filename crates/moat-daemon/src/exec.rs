//! Starting a process in a running sandbox for the CLI. The CLI's own stdin,
//! stdout and stderr travel to the sandbox's init as descriptors, so output
//! flows straight from the process to the caller without passing through the
//! daemon; with a TTY, init makes the terminal inside and its master side
//! travels back to the CLI.

use std::os::fd::{AsRawFd, OwnedFd};

use moat_api::init::InitExec;
use moat_api::{ExecRequest, Reply};
use moat_sandbox::control;

use crate::sandboxes::Daemon;
use crate::server::Replies;
use crate::DaemonError;

impl Daemon {
    pub fn exec(
        &self,
        req: ExecRequest,
        stdio: Vec<OwnedFd>,
        r: &Replies,
    ) -> Result<(), DaemonError> {
        let (info, control_path, agent_command) = self.exec_target(&req.name)?;
        if !req.tty && stdio.len() != 3 {
            return Err(DaemonError::BadRequest(
                "exec without a TTY needs the caller's stdin, stdout and stderr".into(),
            ));
        }
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
            tty: req.tty,
            rows: req.rows,
            cols: req.cols,
        };
        let raw: Vec<i32> = stdio.iter().map(|f| f.as_raw_fd()).collect();
        let session = control::exec(&control_path, &exec, &raw)?;
        // Our copies must go, or the caller would never see end-of-file on its pipes.
        drop(stdio);
        let master: Vec<i32> = session.master.iter().map(|m| m.as_raw_fd()).collect();
        r.send_with_fds(&Reply::Started { pid: session.pid }, &master);
        if req.detach {
            return Ok(());
        }
        let code = session.wait()?;
        r.send(&Reply::Exited { code });
        Ok(())
    }
}

//! Talking to the daemon: connect (starting it when it is not running), send
//! one request, and read the stream of replies.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use moat_api::{recv_frame, send_frame, Reply, Request};
use moat_daemon::Paths;

use crate::output::Progress;

pub fn connect() -> Result<UnixStream> {
    let paths = Paths::from_env();
    let socket = paths.socket();
    match UnixStream::connect(&socket) {
        Ok(s) => return Ok(s),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {}
        Err(e) => bail!("cannot reach the moat daemon at {}: {e}", socket.display()),
    }
    start_daemon(&paths)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let log = fs::read_to_string(paths.daemon_log()).unwrap_or_default();
            let last = log.lines().last().unwrap_or("(no log)");
            bail!(
                "the daemon did not come up within 15 s; its log ({}) ends with: {last}",
                paths.daemon_log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_daemon(paths: &Paths) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.runtime)
        .with_context(|| format!("cannot create {}", paths.runtime.display()))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.daemon_log())?;
    let exe = std::env::current_exe().context("cannot find the moat binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the daemon leaves our session so
    // that a terminal hangup does not end it.
    unsafe {
        cmd.pre_exec(|| {
            moat_sandbox::cloexec_from(3);
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().context("cannot start the moat daemon")?;
    eprintln!(
        "moat: started the daemon (pid {}); its log is {}",
        child.id(),
        paths.daemon_log().display()
    );
    Ok(())
}

/// A request in flight.
pub struct Call {
    pub conn: UnixStream,
}

impl Call {
    pub fn start(req: &Request, fds: &[RawFd]) -> Result<Call> {
        let conn = connect()?;
        send_frame(&conn, req, fds)
            .map_err(|e| anyhow!("cannot send the request to the daemon: {e}"))?;
        Ok(Call { conn })
    }

    /// The next reply, with any descriptors it carries.
    pub fn next(&self) -> Result<(Reply, Vec<OwnedFd>)> {
        recv_frame::<Reply>(&self.conn)
            .map_err(|e| anyhow!("lost the daemon mid-request ({e}); see its log"))
    }

    /// Read replies until the result, showing progress and warnings on the way.
    pub fn result(&self) -> Result<serde_json::Value> {
        let mut progress = Progress::new();
        loop {
            match self.next()?.0 {
                Reply::Progress { message } => progress.show(&message),
                Reply::Transfer { id, done, total } => progress.transfer(&id, done, total),
                Reply::Warning { message } => progress.warn(&message),
                Reply::Text { text } => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                }
                Reply::Ok { value } => return Ok(value),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected reply from the daemon: {other:?}"),
            }
        }
    }
}

/// Send `req` and return its result, decoded.
pub fn call<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T> {
    call_with_fds(req, &[])
}

/// `call`, passing descriptors (an archive to read or write) along.
pub fn call_with_fds<T: serde::de::DeserializeOwned>(req: &Request, fds: &[RawFd]) -> Result<T> {
    let value = Call::start(req, fds)?.result()?;
    serde_json::from_value(value).map_err(|e| {
        anyhow!("the daemon's answer does not parse ({e}); is it the same version as this moat?")
    })
}

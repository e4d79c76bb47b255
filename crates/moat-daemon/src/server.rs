//! The API socket: one thread per connection, one request per connection,
//! a stream of replies. Only the daemon's own user may connect: the socket is
//! mode 0600 in a 0700 directory, and every peer's uid is checked again.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use moat_api::{recv_frame, send_frame, Reply, Request, VersionInfo, PROTOCOL_VERSION};
use nix::sys::socket::{getsockopt, sockopt};

use crate::sandboxes::Daemon;
use crate::{Config, DaemonError, Paths};

/// Serve until killed.
pub fn run(paths: Paths, config: Config) -> Result<(), DaemonError> {
    for dir in [&paths.state, &paths.runtime] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::io(format!("create {}", dir.display()), e))?;
    }
    fs::set_permissions(&paths.runtime, fs::Permissions::from_mode(0o700))
        .map_err(|e| DaemonError::io(format!("chmod {}", paths.runtime.display()), e))?;
    raise_fd_limit();
    let _lock = take_lock(&paths.lock(), || paths.socket().display().to_string())?;
    // Two daemons on one state root would each take the other's sandboxes for dead.
    let _state_lock = take_lock(&paths.state.join("daemon.lock"), || {
        paths.state.display().to_string()
    })?;
    let socket = paths.socket();
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| DaemonError::io(format!("bind {}", socket.display()), e))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| DaemonError::io(format!("chmod {}", socket.display()), e))?;

    let daemon = Arc::new(Daemon::open(paths.clone(), config)?);
    daemon.refresh_credentials();
    daemon.reconcile()?;
    daemon.listen_models();
    tracing::info!(socket = %socket.display(), "moat daemon ready");

    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        match getsockopt(&conn, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == me => {}
            _ => continue,
        }
        let daemon = Arc::clone(&daemon);
        std::thread::spawn(move || serve(&daemon, conn));
    }
    Ok(())
}

/// Every connection through a gateway door takes two descriptors, and
/// sandboxes may hold a thousand each: take the hard limit as the soft one.
fn raise_fd_limit() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// One daemon per runtime root and per state root: an exclusive lock on a
/// file that holds the owner's pid; `place` names what is taken, for the error.
fn take_lock(path: &Path, place: impl Fn() -> String) -> Result<fs::File, DaemonError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| DaemonError::io(format!("open {}", path.display()), e))?;
    if file.try_lock().is_err() {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        return Err(DaemonError::AlreadyRunning {
            pid: pid.trim().to_string(),
            socket: place(),
        });
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// A reply channel: the connection, to which progress and results are written.
pub struct Replies<'a> {
    pub conn: &'a UnixStream,
}

impl Replies<'_> {
    pub fn send(&self, reply: &Reply) {
        let _ = send_frame(self.conn, reply, &[]);
    }
    pub fn send_with_fds(&self, reply: &Reply, fds: &[i32]) {
        let _ = send_frame(self.conn, reply, fds);
    }
    pub fn progress(&self, message: impl Into<String>) {
        self.send(&Reply::Progress {
            message: message.into(),
        });
    }
    pub fn warning(&self, message: impl Into<String>) {
        self.send(&Reply::Warning {
            message: message.into(),
        });
    }
}

fn serve(daemon: &Daemon, conn: UnixStream) {
    let Ok((req, fds)) = recv_frame::<Request>(&conn) else {
        return;
    };
    let replies = Replies { conn: &conn };
    let result = dispatch(daemon, req, fds, &replies);
    match result {
        Ok(Some(value)) => replies.send(&Reply::Ok { value }),
        Ok(None) => {}
        Err(e) => replies.send(&Reply::Error {
            message: e.to_string(),
        }),
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Option<serde_json::Value>, DaemonError> {
    serde_json::to_value(v)
        .map(Some)
        .map_err(|e| DaemonError::BadRequest(e.to_string()))
}

fn dispatch(
    daemon: &Daemon,
    req: Request,
    fds: Vec<OwnedFd>,
    r: &Replies,
) -> Result<Option<serde_json::Value>, DaemonError> {
    match req {
        Request::Version => to_value(VersionInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            rootless: daemon.rootless(),
            state_root: daemon.paths().state.display().to_string(),
            runtime_root: daemon.paths().runtime.display().to_string(),
        }),
        Request::SandboxCreate(c) => to_value(daemon.create(c, r)?),
        Request::SandboxEnsure(c) => to_value(daemon.ensure(c, r)?),
        Request::SandboxStart { name } => to_value(daemon.start_by_name(&name, r)?),
        Request::SandboxExec(e) => daemon.exec(e, r).map(|_| None),
        Request::SandboxList => to_value(daemon.list()?),
        Request::SandboxInspect { name } => to_value(daemon.inspect(&name)?),
        Request::SandboxStop { name } => to_value(daemon.stop(&name)?),
        Request::SandboxRm { name } => to_value(daemon.remove(&name)?),
        Request::SandboxReset => to_value(daemon.reset()?),
        Request::SandboxPorts {
            name,
            publish,
            unpublish,
        } => to_value(daemon.ports(&name, &publish, &unpublish)?),
        Request::NetworkProxy(p) => Ok(Some(daemon.network_proxy(p)?)),
        Request::NetworkLog { name, limit } => {
            to_value(daemon.network_log(name.as_deref(), limit)?)
        }
        Request::SecretSet { name, key } => to_value(daemon.secret_set(&name, &key.0)?),
        Request::SecretRm { name } => to_value(daemon.secret_rm(&name)?),
        Request::SecretLs => to_value(daemon.secret_ls()?),
        Request::ImageList => to_value(daemon.image_list()?),
        Request::ImageRm { reference } => to_value(daemon.image_rm(&reference)?),
        Request::ImageImport { path, reference } => {
            to_value(daemon.image_import(&path, &reference, r)?)
        }
        Request::TemplateBuild { name } => to_value(daemon.template_build(&name, r)?),
        Request::SandboxSave {
            name,
            reference,
            to_archive,
        } => to_value(daemon.sandbox_save(&name, &reference, fds, to_archive, r)?),
        Request::ImageTag { source, target } => to_value(daemon.image_tag(&source, &target)?),
        Request::ImagePush { reference } => to_value(daemon.image_push(&reference, r)?),
        Request::ImagePull { reference } => to_value(daemon.image_pull(&reference, r)?),
        Request::ImageInspect { reference } => to_value(daemon.image_inspect(&reference)?),
        Request::ImageLoad => to_value(daemon.image_load(fds, r)?),
        Request::RegistryLogin {
            registry,
            username,
            password,
        } => to_value(daemon.registry_login(&registry, &username, &password.0)?),
        Request::RegistryLogout { registry } => to_value(daemon.registry_logout(&registry)?),
        Request::ModelPackage(p) => to_value(daemon.model_package(p, fds, r)?),
        Request::ModelList => to_value(daemon.model_list()?),
        Request::ModelInspect { reference } => to_value(daemon.model_inspect(&reference)?),
        Request::ModelRm { reference, force } => to_value(daemon.model_rm(&reference, force)?),
        Request::ModelTag { source, target } => to_value(daemon.model_tag(&source, &target)?),
        Request::ModelPush { reference } => to_value(daemon.model_push(&reference, r)?),
        Request::ModelPull { reference } => to_value(daemon.model_pull(&reference, r)?),
        Request::ModelDf => to_value(daemon.model_df()?),
        Request::ModelCacheRm { model } => Ok(Some(daemon.model_cache_rm(model.as_deref())?)),
        Request::ModelChat(c) => Ok(Some(daemon.model_chat(c, r)?)),
        Request::ModelPs => Ok(Some(daemon.model_ps()?)),
        Request::ModelUnload { models, all } => Ok(Some(daemon.model_unload(&models, all)?)),
        Request::ModelConfigure {
            model,
            context_size,
            keep_alive,
            temperature,
            seed,
            max_tokens,
        } => Ok(Some(daemon.model_configure(
            &model,
            keep_alive,
            moat_models::api::ModelSettings {
                context_size,
                keep_alive: None,
                temperature,
                seed,
                max_tokens,
            },
        )?)),
        Request::ModelStatus => Ok(Some(daemon.model_status()?)),
        Request::ModelLogs { model } => Ok(Some(daemon.model_logs(model.as_deref())?)),
    }
}

//! Sandboxes as the daemon keeps them: created from an image, started,
//! watched, stopped, adopted again after a daemon restart, removed.
//!
//! A sandbox's processes do not depend on the daemon: when the daemon dies,
//! they keep running, and the next daemon adopts every sandbox whose init is
//! still the same process (same pid and start time) and still answers on its
//! control socket; the others are marked stopped and cleaned up.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use moat_api::{CreateSandbox, Limits, PortMapping, SandboxInfo, SandboxStatus, Workspace};
use moat_images::{ImageInfo, ImageStore, Reference};
use moat_sandbox::cgroup::{Cgroup, Hierarchy};
use moat_sandbox::control::NetnsId;
use moat_sandbox::spec::{BindMount, SandboxSpec};
use moat_sandbox::{control, launch, IdMap};

use crate::helpers::{remove_mapped, MappedUnpacker};
use crate::isolation;
use crate::ports::Forwarder;
use crate::server::Replies;
use crate::state::{SandboxRow, State};
use crate::{Config, DaemonError, Paths};

/// Image references of built templates.
pub fn template_reference(name: &str) -> String {
    format!("moat/{name}:latest")
}

/// A running sandbox's daemon-side parts.
struct Live {
    pid: i32,
    /// Its network namespace: every door socket must come from it.
    netns: NetnsId,
    forwarders: Vec<Forwarder>,
}

pub struct Daemon {
    pub(crate) paths: Paths,
    pub(crate) config: Config,
    pub(crate) exe: PathBuf,
    pub(crate) idmap: IdMap,
    pub(crate) hierarchy: Hierarchy,
    pub(crate) state: Mutex<State>,
    pub(crate) images: ImageStore,
    /// Models in Docker Model Runner's layout, under `STATE/models`.
    pub(crate) models: Arc<moat_models::store::ModelStore>,
    /// The model runner's HTTP service and its workers.
    pub(crate) model_service: Arc<moat_models::api::ModelService>,
    /// Why the model runner is not on the host's loopback, when it is not.
    pub(crate) models_unreachable: Mutex<Option<String>>,
    /// Serialises image changes.
    pub(crate) image_lock: Mutex<()>,
    /// Serialises template builds (held across the builds of their bases).
    pub(crate) template_lock: Mutex<()>,
    /// What each template build's sandbox fetched, per host, as the gateway logs it.
    pub(crate) build_watch: Arc<Mutex<crate::templates::BuildWatch>>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    pub(crate) gateway: Arc<moat_gateway::Gateway>,
    pub(crate) secrets: crate::secrets::Secrets,
    /// The key variables that hold the placeholder inside sandboxes.
    pub(crate) key_vars: Mutex<Vec<String>>,
    /// Disk images of the default budget, made ahead (see `disk::pool`).
    pub(crate) disk_pool: Arc<crate::disk::pool::DiskPool>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Daemon {
    pub fn open(paths: Paths, config: Config) -> Result<Daemon, DaemonError> {
        let euid = nix::unistd::geteuid();
        let rootless = !euid.is_root();
        let idmap = if rootless {
            let user = nix::unistd::User::from_uid(euid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_default();
            IdMap::for_user(&user, euid.as_raw(), nix::unistd::getegid().as_raw())
                .map_err(moat_sandbox::SandboxError::from)?
        } else {
            IdMap::for_root(config.sandbox.uid_base)
        };
        let exe =
            std::env::current_exe().map_err(|e| DaemonError::io("find the moat binary", e))?;
        for dir in [
            paths.state.join("sandboxes"),
            paths.runtime.join("sandboxes"),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| DaemonError::io(format!("create {}", dir.display()), e))?;
        }
        let state = State::open(&paths.database())?;
        if !rootless && crate::migrate::pending(&paths.state) {
            // Sandboxes an older moat started run with its boundary (their
            // agent is host root) and its init's protocol: they stop here,
            // keeping their files, and start again under this one.
            for row in state.all()? {
                if let (Some(pid), Some(start)) = (row.info.pid, row.pid_start) {
                    if process_start_time(pid) == Some(start) {
                        tracing::warn!(name = %row.info.name, "stopping a sandbox an older moat started; `moat sandbox run` starts it again");
                        kill_init(pid);
                        wait_for_exit_timeout(pid, Duration::from_secs(5));
                    }
                }
            }
            if let (Some(uid), Some(gid)) = (
                idmap.host_uid(moat_sandbox::idmap::AGENT_UID),
                idmap.host_gid(moat_sandbox::idmap::AGENT_UID),
            ) {
                crate::migrate::agent_ids(&paths.state, &paths.images(), uid, gid);
            }
        }
        let images = ImageStore::open(&paths.images())?;
        let models = Arc::new(moat_models::store::ModelStore::open(
            &paths.state.join("models"),
        )?);
        let model_service = crate::model_runner::start(&paths, &config, &exe, Arc::clone(&models))?;
        let log = Mutex::new(crate::network::start_log_writer(paths.database()));
        let build_watch = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let watch = Arc::clone(&build_watch);
        let sink: moat_gateway::LogSink = Arc::new(move |entry| {
            Daemon::watch_build(&watch, &entry);
            let _ = lock(&log).send(entry);
        });
        let extra_ca: Vec<PathBuf> = config
            .gateway
            .extra_ca_certs
            .iter()
            .map(PathBuf::from)
            .collect();
        let extra_ca: Vec<&Path> = extra_ca.iter().map(PathBuf::as_path).collect();
        let gateway = Arc::new(
            moat_gateway::Gateway::new(sink, &extra_ca)
                .map_err(|e| DaemonError::Config(format!("the gateway: {e}")))?,
        );
        gateway.set_static_names(config.gateway.static_names()?);
        gateway.set_limits(config.gateway.limits()?);
        let secrets = crate::secrets::Secrets::new(paths.state.join("secrets.json"));
        let disk_pool = crate::disk::pool::DiskPool::start(&paths, &config, &idmap);
        Ok(Daemon {
            hierarchy: moat_sandbox::cgroup::detect(rootless),
            paths,
            config,
            exe,
            idmap,
            state: Mutex::new(state),
            images,
            models,
            model_service,
            models_unreachable: Mutex::new(None),
            image_lock: Mutex::new(()),
            template_lock: Mutex::new(()),
            build_watch,
            live: Arc::new(Mutex::new(HashMap::new())),
            gateway,
            secrets,
            key_vars: Mutex::new(Vec::new()),
            disk_pool,
        })
    }

    pub(crate) fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn gateway(&self) -> &moat_gateway::Gateway {
        &self.gateway
    }

    pub fn rootless(&self) -> bool {
        self.idmap.rootless
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub(crate) fn unpacker(&self) -> MappedUnpacker {
        MappedUnpacker {
            exe: self.exe.clone(),
            idmap: self.idmap.clone(),
        }
    }

    pub(crate) fn row(&self, name: &str) -> Result<SandboxRow, DaemonError> {
        lock(&self.state)
            .by_name(name)?
            .ok_or_else(|| DaemonError::NoSuchSandbox(name.to_string()))
    }

    /// Bring the database in line with what runs: adopt live sandboxes, mark
    /// dead ones stopped, and remove what an interrupted create left.
    pub fn reconcile(&self) -> Result<(), DaemonError> {
        let rows = lock(&self.state).all()?;
        self.remount_disks(&rows);
        for row in rows {
            let id = row.info.id.clone();
            // A build's steps ran from the daemon that died: nothing can finish it.
            if crate::templates::is_build_sandbox(&row.info.name) {
                tracing::warn!(name = %row.info.name, "removing the sandbox of an interrupted template build");
                if let Err(e) = self.remove(&row.info.name) {
                    tracing::warn!(name = %row.info.name, "cannot remove it: {e}");
                }
                continue;
            }
            match row.phase.as_str() {
                "creating" => {
                    tracing::warn!(name = %row.info.name, "removing a sandbox whose creation was interrupted");
                    self.remove_files(&id);
                    lock(&self.state).delete(&id)?;
                }
                "running" => {
                    let alive = row.info.pid.zip(row.pid_start).is_some_and(|(pid, start)| {
                        process_start_time(pid) == Some(start)
                            && control::ping(&self.control_path(&id)).is_ok()
                    });
                    let netns = lock(&self.state)
                        .netns(&id)?
                        .and_then(|n| n.parse::<NetnsId>().ok());
                    match (alive, row.info.pid, netns) {
                        (true, Some(pid), Some(netns)) => {
                            tracing::info!(name = %row.info.name, pid, "adopting a running sandbox");
                            if let Err(e) = self.go_live(&row.info, pid, netns) {
                                tracing::warn!(name = %row.info.name, "cannot reopen the gateway door: {e}");
                            }
                        }
                        _ => {
                            tracing::info!(name = %row.info.name, "a sandbox that was running has stopped");
                            self.cleanup_stopped(&id);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>, DaemonError> {
        Ok(lock(&self.state)
            .all()?
            .into_iter()
            .filter(|r| r.phase != "creating")
            .map(|r| self.shown(r.info))
            .collect())
    }

    pub fn inspect(&self, name: &str) -> Result<SandboxInfo, DaemonError> {
        Ok(self.shown(self.row(name)?.info))
    }

    /// A sandbox as `ls` and `inspect` show it: with its walls on this host.
    fn shown(&self, mut info: SandboxInfo) -> SandboxInfo {
        info.isolation = self.isolation_info(info.isolation.tier, &info.limits);
        info
    }

    pub fn create(&self, req: CreateSandbox, r: &Replies) -> Result<SandboxInfo, DaemonError> {
        if let Some(name) = req
            .name
            .as_deref()
            .filter(|n| crate::templates::is_build_sandbox(n))
        {
            return Err(DaemonError::BadRequest(format!(
                "bad sandbox name {name:?}: names starting with {:?} are the template builds'",
                crate::templates::BUILD_SANDBOX_PREFIX
            )));
        }
        let agent = crate::templates::agent(&req.agent)?;
        parse_workspaces(&req.workspaces)?;
        self.disk_budget(req.limits.disk)?;
        let template = req.template.clone().unwrap_or(agent.template);
        let image = self.resolve_image(&template, req.pull_template.as_deref(), r)?;
        self.create_from_image(&req, &image, None, r)
    }

    /// A sandbox of `image`, started; `policy` replaces the configured
    /// default before the first start, so that no request escapes it.
    pub(crate) fn create_from_image(
        &self,
        req: &CreateSandbox,
        image: &ImageInfo,
        policy: Option<&moat_gateway::policy::Policy>,
        r: &Replies,
    ) -> Result<SandboxInfo, DaemonError> {
        let workspaces = parse_workspaces(&req.workspaces)?;
        let name = match &req.name {
            Some(n) => {
                validate_name(n)?;
                n.clone()
            }
            None => self.default_name(&req.agent, &workspaces[0].path)?,
        };
        let disk = self.disk_budget(req.limits.disk)?;
        let tier = self.pick_isolation(req.isolation)?;
        // An explicit 0 means no limit; an absent value takes the configured default.
        let pick = |asked: Option<u64>, default: u64| match asked {
            Some(0) => None,
            Some(v) => Some(v),
            None => Some(default).filter(|d| *d > 0),
        };
        let limits = Limits {
            memory: pick(req.limits.memory, self.config.default_memory().unwrap_or(0)),
            cpus: match req.limits.cpus {
                Some(c) if c <= 0.0 => None,
                Some(c) => Some(c),
                None => self.config.sandbox.cpus.cores(),
            },
            pids: pick(req.limits.pids, self.config.sandbox.pids_limit),
            enforced: false,
            note: String::new(),
            // Whether it is enforced is known once its image is made.
            disk: moat_api::DiskLimit {
                bytes: disk,
                ..Default::default()
            },
        };
        let info = SandboxInfo {
            id: new_id(),
            name,
            agent: req.agent.clone(),
            template: image.reference.clone(),
            image_id: image.id.clone(),
            status: SandboxStatus::Stopped,
            workspaces,
            created: now_rfc3339(),
            limits,
            ports: vec![],
            pid: None,
            isolation: moat_api::IsolationInfo {
                tier,
                ..Default::default()
            },
        };
        let row = SandboxRow {
            info: info.clone(),
            layers: image.layers.clone(),
            phase: "creating".into(),
            pid_start: None,
        };
        lock(&self.state).insert(&row)?;
        let prepared = self
            .make_files(&info)
            .and_then(|()| {
                let mut limits = info.limits.clone();
                limits.disk = self.make_disk(&info, r);
                lock(&self.state).set_limits(&info.id, &limits)
            })
            .and_then(|()| match policy {
                Some(p) => {
                    let text =
                        serde_json::to_string(p).map_err(|e| DaemonError::State(e.to_string()))?;
                    lock(&self.state).set_policy(&info.id, &text)
                }
                None => Ok(()),
            });
        if let Err(e) = prepared {
            self.remove_files(&info.id);
            lock(&self.state).delete(&info.id)?;
            return Err(e);
        }
        lock(&self.state).set_phase(&info.id, "stopped", None, None)?;
        // A sandbox that cannot start the first time is not kept.
        self.start(&info.name, r).inspect_err(|_| {
            self.remove_files(&info.id);
            let _ = lock(&self.state).delete(&info.id);
        })
    }

    /// `run AGENT WORKSPACE…`: reuse the sandbox of that agent on those workspaces.
    pub fn ensure(&self, req: CreateSandbox, r: &Replies) -> Result<SandboxInfo, DaemonError> {
        let workspaces = parse_workspaces(&req.workspaces)?;
        let existing = self.list()?.into_iter().find(|s| {
            s.agent == req.agent
                && s.workspaces == workspaces
                && req.name.as_ref().is_none_or(|n| n == &s.name)
                && req.isolation.is_none_or(|i| i == s.isolation.tier)
        });
        match existing {
            Some(s) if s.status == SandboxStatus::Running => Ok(s),
            Some(s) => self.start(&s.name, r),
            None => self.create(req, r),
        }
    }

    pub fn start_by_name(&self, name: &str, r: &Replies) -> Result<SandboxInfo, DaemonError> {
        let row = self.row(name)?;
        if row.info.status == SandboxStatus::Running {
            return Ok(row.info);
        }
        self.start(name, r)
    }

    pub(crate) fn control_path(&self, id: &str) -> PathBuf {
        self.paths.sandbox_runtime(id).join("ctl.sock")
    }

    fn start(&self, name: &str, r: &Replies) -> Result<SandboxInfo, DaemonError> {
        let row = self.row(name)?;
        self.mount_disk(&row.info)?;
        let id = row.info.id.clone();
        let lower_dirs = self.lower_dirs(&row)?;
        let host_limits = isolation::host_limits(row.info.isolation.tier, &row.info.limits);
        let (cgroup, mut limits) = self.hierarchy.create(&id, &host_limits);
        limits.pids = row.info.limits.pids;
        if !limits.enforced
            && (limits.memory.is_some() || limits.pids.is_some() || limits.cpus.is_some())
        {
            r.warning(format!("limits of sandbox {name} are {}", limits.note));
        }
        lock(&self.state).set_limits(&id, &limits)?;

        let run_dir = self.paths.sandbox_runtime(&id);
        fs::create_dir_all(run_dir.join("rootfs"))
            .map_err(|e| DaemonError::io(format!("create {}", run_dir.display()), e))?;
        // Init finds the root file system from here as the sandbox's root,
        // an unprivileged id: whatever the umask, it must be able to look in.
        fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| DaemonError::io(format!("chmod {}", run_dir.display()), e))?;
        let etc = self.write_etc_files(&row.info, &run_dir, &lower_dirs)?;
        let state_dir = self.paths.sandbox_state(&id);
        self.make_layer_dirs(&state_dir)?;
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: row.info.name.clone(),
            lower_dirs,
            upper_dir: state_dir.join("upper"),
            work_dir: state_dir.join("work"),
            rootfs: run_dir.join("rootfs"),
            workspaces: Self::workspace_mounts(&row.info.workspaces),
            files: etc,
            no_new_privs: self.config.sandbox.no_new_privs,
            userns_owner: self.userns_owner(&id)?,
            workspace_idmap: (!self.idmap.rootless).then(|| self.idmap.clone()),
            tier: self.tier_spec(row.info.isolation.tier, &row.info.limits)?,
            tmpfs_size: crate::disk::tmpfs_size(&row.info.limits),
        };
        let control = self.control_path(&id);
        let started = launch::start(&launch::Launch {
            exe: &self.exe,
            spec: &spec,
            idmap: &self.idmap,
            cgroup: cgroup.as_ref(),
            control: &control,
            log: &state_dir.join("init.log"),
        });
        let launch::Started { pid, netns } = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.destroy();
                }
                return Err(e.into());
            }
        };
        lock(&self.state).set_netns(&id, &netns.to_string())?;
        lock(&self.state).set_phase(&id, "running", Some(pid), process_start_time(pid))?;
        let info = self.row(name)?.info;
        // Without its door the sandbox would run with no way out at all: that is a failed start.
        if let Err(e) = self.go_live(&info, pid, netns) {
            kill_init(pid);
            wait_for_exit_timeout(pid, Duration::from_secs(5));
            self.cleanup_stopped(&id);
            return Err(e);
        }
        Ok(info)
    }

    /// The workspaces as init mounts them (as root, idmapped by the map in
    /// the spec, to the owner init finds).
    fn workspace_mounts(workspaces: &[Workspace]) -> Vec<BindMount> {
        workspaces
            .iter()
            .map(|w| BindMount {
                source: w.path.clone().into(),
                target: w.path.clone().into(),
                read_only: w.read_only,
            })
            .collect()
    }

    /// As root, the host id that owns the sandbox's user namespace: one of
    /// its own, above the range that ids inside map to, so that what the
    /// kernel counts per user (inotify instances, …) is counted per sandbox
    /// and never against host root. None rootless (the namespace is the
    /// caller's).
    fn userns_owner(&self, id: &str) -> Result<Option<u32>, DaemonError> {
        if self.idmap.rootless {
            return Ok(None);
        }
        let slot = lock(&self.state).slot(id)?;
        let base = self.config.sandbox.uid_base;
        Ok(base
            .checked_add(moat_sandbox::idmap::RANGE)
            .and_then(|b| b.checked_add(slot % 1_000_000)))
    }

    /// The daemon's side of a running sandbox, after a start or an adoption:
    /// watch its init, open its gateway door, publish its ports.
    fn go_live(&self, info: &SandboxInfo, pid: i32, netns: NetnsId) -> Result<(), DaemonError> {
        lock(&self.live).insert(
            info.id.clone(),
            Live {
                pid,
                netns,
                forwarders: vec![],
            },
        );
        self.watch(info.id.clone(), pid);
        self.open_gateway_door(&info.id, &info.name, netns)?;
        // The model door is a convenience, not a boundary: a sandbox that
        // cannot have one still runs.
        if let Err(e) = self.open_model_door(&info.id, &info.name, netns) {
            tracing::warn!(name = %info.name, "{e}");
        }
        self.start_forwarders(info, netns);
        Ok(())
    }

    /// The unpacked layers a sandbox mounts. While its image is still in the
    /// store, missing layers are unpacked again (after their blobs are
    /// verified); otherwise the layers it kept must still be there.
    fn lower_dirs(&self, row: &SandboxRow) -> Result<Vec<PathBuf>, DaemonError> {
        let image = Reference::parse(&row.info.template)
            .ok()
            .and_then(|r| self.images.get(&r).ok().flatten());
        if let Some(image) = image.filter(|i| i.id == row.info.image_id) {
            let _guard = lock(&self.image_lock);
            return Ok(self.images.layer_dirs(&image, &self.unpacker())?);
        }
        Ok(row
            .layers
            .iter()
            .map(|l| self.images.layer_dir(l))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// The sandbox's state directory. Its init makes the upper layer in it,
    /// as the sandbox's root, which must therefore own it (as root; rootless,
    /// the daemon's own uid is mapped inside and that suffices).
    fn make_files(&self, info: &SandboxInfo) -> Result<(), DaemonError> {
        let dir = self.paths.sandbox_state(&info.id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| DaemonError::io(format!("create {}", dir.display()), e))?;
        if !self.idmap.rootless {
            let uid = self.idmap.host_uid(0).map(nix::unistd::Uid::from_raw);
            let gid = self.idmap.host_gid(0).map(nix::unistd::Gid::from_raw);
            nix::unistd::chown(&dir, uid, gid)
                .map_err(|e| DaemonError::io(format!("chown {}", dir.display()), e.into()))?;
        }
        Ok(())
    }

    /// As root, the sandbox's own layer and overlayfs's work directory,
    /// owned by the sandbox's root (a host id of its range) as if it had made
    /// them: init mounts the overlay before it has that id. Rootless, init
    /// makes them inside.
    fn make_layer_dirs(&self, state_dir: &Path) -> Result<(), DaemonError> {
        if self.idmap.rootless {
            return Ok(());
        }
        let uid = self.idmap.host_uid(0).map(nix::unistd::Uid::from_raw);
        let gid = self.idmap.host_gid(0).map(nix::unistd::Gid::from_raw);
        for dir in [state_dir.join("upper"), state_dir.join("work")] {
            match fs::DirBuilder::new().mode(0o755).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DaemonError::io(format!("create {}", dir.display()), e)),
            }
            // Also where an earlier start made it and could not finish.
            let meta = fs::symlink_metadata(&dir)
                .map_err(|e| DaemonError::io(format!("stat {}", dir.display()), e))?;
            if !meta.is_dir() {
                return Err(DaemonError::State(format!(
                    "{} is not a directory; remove the sandbox and create it again",
                    dir.display()
                )));
            }
            use std::os::unix::fs::MetadataExt;
            if Some(meta.uid()) != uid.map(|u| u.as_raw())
                || Some(meta.gid()) != gid.map(|g| g.as_raw())
            {
                nix::unistd::chown(&dir, uid, gid)
                    .map_err(|e| DaemonError::io(format!("chown {}", dir.display()), e.into()))?;
            }
        }
        Ok(())
    }

    /// Files the sandbox gets from the daemon, bound read-only: its name in
    /// `/etc`, and its CA in the trust store (alone, and appended to the
    /// image's bundle).
    fn write_etc_files(
        &self,
        info: &SandboxInfo,
        run_dir: &Path,
        lower_dirs: &[PathBuf],
    ) -> Result<Vec<BindMount>, DaemonError> {
        let ca = self.sandbox_ca(&info.id)?;
        let image_bundle = lower_dirs
            .iter()
            .rev()
            .find_map(|d| {
                fs::read_to_string(d.join(crate::network::CA_BUNDLE_INSIDE.trim_start_matches('/')))
                    .ok()
            })
            .unwrap_or_default();
        let hosts = format!(
            "127.0.0.1\tlocalhost {name}\n127.0.0.1\thost.docker.internal model-runner.docker.internal\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            name = info.name
        );
        let resolv = "# moat: the sandbox has no DNS of its own; the egress gateway resolves names.\noptions ndots:0\n";
        let files = [
            ("hosts", "/etc/hosts", hosts),
            ("hostname", "/etc/hostname", format!("{}\n", info.name)),
            ("resolv.conf", "/etc/resolv.conf", resolv.to_string()),
            (
                "moat-proxy-ca.crt",
                crate::network::CA_CERT_INSIDE,
                ca.cert.clone(),
            ),
            (
                "ca-bundle.crt",
                crate::network::CA_BUNDLE_INSIDE,
                format!("{image_bundle}{}", ca.cert),
            ),
        ];
        let mut binds = Vec::new();
        for (name, target, text) in files {
            let path = run_dir.join(name);
            fs::write(&path, text)
                .map_err(|e| DaemonError::io(format!("write {}", path.display()), e))?;
            binds.push(BindMount {
                source: path,
                target: PathBuf::from(target),
                read_only: true,
            });
        }
        Ok(binds)
    }

    /// Watch init; when it ends, clean up and mark the sandbox stopped.
    fn watch(&self, id: String, pid: i32) {
        let live = Arc::clone(&self.live);
        let hierarchy = self.hierarchy.clone();
        let db = self.paths.database();
        let gateway = Arc::clone(&self.gateway);
        let model_service = Arc::clone(&self.model_service);
        std::thread::spawn(move || {
            wait_for_exit(pid);
            if finish(&live, &id, pid) {
                gateway.detach(&id);
                model_service.detach(&id);
                if let Some(cg) = Cgroup::existing(&hierarchy, &id) {
                    cg.destroy();
                }
                if let Ok(mut st) = State::open(&db) {
                    let _ = st.set_phase(&id, "stopped", None, None);
                }
            }
        });
    }

    fn cleanup_stopped(&self, id: &str) {
        if let Some(l) = lock(&self.live).remove(id) {
            drop(l.forwarders);
        }
        self.gateway.detach(id);
        self.model_service.detach(id);
        if let Some(cg) = Cgroup::existing(&self.hierarchy, id) {
            cg.destroy();
        }
        let _ = lock(&self.state).set_phase(id, "stopped", None, None);
    }

    pub fn stop(&self, name: &str) -> Result<SandboxInfo, DaemonError> {
        let row = self.row(name)?;
        if let (SandboxStatus::Running, Some(pid)) = (row.info.status, row.info.pid) {
            let grace = Duration::from_secs(self.config.sandbox.stop_timeout);
            let asked = control::stop(&self.control_path(&row.info.id), grace).is_ok();
            if !(asked && wait_for_exit_timeout(pid, grace + Duration::from_secs(2))) {
                kill_init(pid);
                wait_for_exit_timeout(pid, Duration::from_secs(5));
            }
            self.cleanup_stopped(&row.info.id);
        }
        self.inspect(name)
    }

    pub fn remove(&self, name: &str) -> Result<SandboxInfo, DaemonError> {
        let row = self.row(name)?;
        if let (SandboxStatus::Running, Some(pid)) = (row.info.status, row.info.pid) {
            // rm needs no grace: whatever runs in the sandbox ends with it.
            kill_init(pid);
            wait_for_exit_timeout(pid, Duration::from_secs(5));
            self.cleanup_stopped(&row.info.id);
        }
        self.remove_files(&row.info.id);
        lock(&self.state).delete(&row.info.id)?;
        let mut info = row.info;
        info.status = SandboxStatus::Stopped;
        info.pid = None;
        Ok(info)
    }

    fn remove_files(&self, id: &str) {
        let _ = fs::remove_dir_all(self.paths.sandbox_runtime(id));
        self.unmount_disk(id);
        if let Err(e) = remove_mapped(&self.exe, &self.idmap, &self.paths.sandbox_state(id)) {
            tracing::warn!("{e}");
        }
    }

    pub fn reset(&self) -> Result<Vec<String>, DaemonError> {
        let mut removed = Vec::new();
        for s in self.list()? {
            self.remove(&s.name)?;
            removed.push(s.name);
        }
        Ok(removed)
    }

    pub fn ports(
        &self,
        name: &str,
        publish: &[PortMapping],
        unpublish: &[u16],
    ) -> Result<SandboxInfo, DaemonError> {
        let row = self.row(name)?;
        let mut ports = row.info.ports.clone();
        ports.retain(|p| !unpublish.contains(&p.host_port));
        for p in publish {
            if ports.iter().any(|q| q.host_port == p.host_port) {
                return Err(DaemonError::BadRequest(format!(
                    "host port {} is already published for {name}; unpublish it first with --unpublish {}",
                    p.host_port, p.host_port
                )));
            }
            ports.push(*p);
        }
        if let Some(l) = lock(&self.live).get_mut(&row.info.id) {
            l.forwarders
                .retain(|f| !unpublish.contains(&f.mapping.host_port));
            for p in publish {
                l.forwarders.push(Forwarder::start(
                    *p,
                    self.control_path(&row.info.id),
                    l.netns,
                )?);
            }
        }
        lock(&self.state).set_ports(&row.info.id, &ports)?;
        self.inspect(name)
    }

    fn start_forwarders(&self, info: &SandboxInfo, netns: NetnsId) {
        let mut live = lock(&self.live);
        let Some(l) = live.get_mut(&info.id) else {
            return;
        };
        for p in &info.ports {
            match Forwarder::start(*p, self.control_path(&info.id), netns) {
                Ok(f) => l.forwarders.push(f),
                Err(e) => tracing::warn!(sandbox = %info.name, "cannot publish port: {e}"),
            }
        }
    }

    pub(crate) fn exec_target(
        &self,
        name: &str,
    ) -> Result<(SandboxInfo, PathBuf, Vec<String>), DaemonError> {
        let row = self.row(name)?;
        if row.info.status != SandboxStatus::Running {
            return Err(DaemonError::Stopped(name.to_string()));
        }
        let command = crate::templates::agent(&row.info.agent)?.command;
        let control = self.control_path(&row.info.id);
        Ok((row.info, control, command))
    }

    fn default_name(&self, agent: &str, workspace: &str) -> Result<String, DaemonError> {
        let base = Path::new(workspace)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("workspace");
        let clean: String = base
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let stem = format!("{agent}-{}", clean.trim_matches('-'));
        let taken: Vec<String> = lock(&self.state)
            .all()?
            .into_iter()
            .map(|r| r.info.name)
            .collect();
        let mut name = stem.clone();
        let mut n = 1;
        while taken.contains(&name) {
            n += 1;
            name = format!("{stem}-{n}");
        }
        Ok(name)
    }

    // ---- images and templates ----

    /// A template name builds (or reuses) that template; anything else must be an image in the store.
    fn resolve_image(
        &self,
        template_or_image: &str,
        pull: Option<&str>,
        r: &Replies,
    ) -> Result<ImageInfo, DaemonError> {
        if crate::templates::exists(template_or_image) {
            return self.ensure_template(template_or_image, r);
        }
        let reference = Reference::parse(template_or_image)?;
        self.image_for_create(&reference, pull, r)?.ok_or_else(|| {
            DaemonError::BadRequest(format!(
                "unknown template or image {template_or_image:?}: templates are {}; images are listed by `moat image ls`",
                crate::templates::names().join(", ")
            ))
        })
    }

    pub fn image_list(&self) -> Result<Vec<ImageInfo>, DaemonError> {
        Ok(self.images.list()?)
    }

    pub fn image_import(
        &self,
        path: &str,
        reference: &str,
        r: &Replies,
    ) -> Result<ImageInfo, DaemonError> {
        let reference = Reference::parse(reference)?;
        let _guard = lock(&self.image_lock);
        r.progress(format!("importing {path} as {reference}"));
        Ok(self.images.import_rootfs(
            Path::new(path),
            &reference,
            &format!("moat image import {path}"),
            Default::default(),
            &self.unpacker(),
        )?)
    }

    pub fn image_rm(&self, reference: &str) -> Result<ImageInfo, DaemonError> {
        let reference = Reference::parse(reference)?;
        let _guard = lock(&self.image_lock);
        let in_use: Vec<String> = lock(&self.state)
            .all()?
            .into_iter()
            .flat_map(|r| r.layers)
            .collect();
        Ok(self.images.remove(&reference, &in_use)?)
    }
}

/// Drop the live entry of `id` if it still belongs to `pid`; true if this call did.
fn finish(live: &Mutex<HashMap<String, Live>>, id: &str, pid: i32) -> bool {
    let mut map = lock(live);
    if map.get(id).is_some_and(|l| l.pid == pid) {
        map.remove(id);
        true
    } else {
        false
    }
}

/// Workspaces as absolute, existing directories; `:ro`/`:readonly` on extras.
fn parse_workspaces(raw: &[String]) -> Result<Vec<Workspace>, DaemonError> {
    if raw.is_empty() {
        return Err(DaemonError::BadRequest(
            "no workspace given: name the folder the agent works in, e.g. `.`".into(),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, w)| {
            let (path, read_only) = match w.rsplit_once(':') {
                Some((p, "ro" | "readonly")) => (p, true),
                _ => (w.as_str(), false),
            };
            if i == 0 && read_only {
                return Err(DaemonError::BadRequest(format!("the first workspace ({path}) is the agent's own and must be writable; drop the :ro")));
            }
            if !path.starts_with('/') {
                return Err(DaemonError::BadRequest(format!("workspace {path:?} is not an absolute path")));
            }
            let canon = fs::canonicalize(path).map_err(|_| {
                DaemonError::BadRequest(format!("workspace {path} does not exist: create it first or check the path"))
            })?;
            if !canon.is_dir() {
                return Err(DaemonError::BadRequest(format!("workspace {path} is not a directory")));
            }
            if canon == Path::new("/") {
                return Err(DaemonError::BadRequest("the host's root cannot be a workspace".into()));
            }
            Ok(Workspace { path: canon.display().to_string(), read_only })
        })
        .collect()
}

pub fn validate_name(name: &str) -> Result<(), DaemonError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DaemonError::BadRequest(format!(
            "bad sandbox name {name:?}: use up to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn new_id() -> String {
    let bytes: [u8; 6] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_rfc3339() -> String {
    moat_images::now_rfc3339()
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command come state (field 3) … starttime (field 22).
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn kill_init(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Block until `pid` has exited, reaping it if it is our child.
fn wait_for_exit(pid: i32) {
    while !wait_for_exit_timeout(pid, Duration::from_secs(3600)) {}
}

fn wait_for_exit_timeout(pid: i32, timeout: Duration) -> bool {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open returns a new descriptor (or -1) that we own.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    let exited = if raw < 0 {
        true
    } else {
        // SAFETY: `raw` is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)), Ok(n) if n > 0)
    };
    if exited {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
    exited
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("demo").is_ok());
        assert!(validate_name("shell-my_project.2").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn workspaces_parse_with_read_only_extras() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let got =
            parse_workspaces(&[a.display().to_string(), format!("{}:ro", b.display())]).unwrap();
        let canon = |p: &Path| fs::canonicalize(p).unwrap().display().to_string();
        assert_eq!(
            got,
            vec![
                Workspace {
                    path: canon(&a),
                    read_only: false
                },
                Workspace {
                    path: canon(&b),
                    read_only: true
                }
            ]
        );
        assert!(parse_workspaces(&[format!("{}:ro", a.display())]).is_err());
        assert!(parse_workspaces(&[dir.path().join("missing").display().to_string()]).is_err());
        assert!(parse_workspaces(&["relative".into()]).is_err());
    }

    #[test]
    fn start_time_of_ourselves_is_known() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert_eq!(process_start_time(-5), None);
    }
}

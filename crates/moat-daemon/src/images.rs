//! Images beyond templates: a sandbox saved as an image, tags, registry
//! pull and push, OCI archives, and the registry credentials that
//! `moat image login` stores (in a file only the daemon's user can read).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use moat_api::SandboxStatus;
use moat_images::registry::{self, PushSummary, RegistryOptions, Transfer};
use moat_images::{ImageInfo, Reference};
use moat_sandbox::cgroup::Cgroup;
use serde::{Deserialize, Serialize};

use crate::sandboxes::{lock, Daemon};
use crate::server::Replies;
use crate::DaemonError;

/// Where an image saved from a sandbox came from, as OCI labels.
const LABEL_BASE_NAME: &str = "org.opencontainers.image.base.name";
const LABEL_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
const LABEL_SANDBOX: &str = "dev.moat.sandbox";
const LABEL_AGENT: &str = "dev.moat.agent";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Login {
    username: String,
    password: String,
}

/// What `image inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ImageDetails {
    #[serde(flatten)]
    pub info: ImageInfo,
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
}

fn take_fd(mut fds: Vec<OwnedFd>, what: &str) -> Result<File, DaemonError> {
    match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => Ok(File::from(fd)),
        _ => Err(DaemonError::BadRequest(format!(
            "{what} needs exactly one file descriptor with the request"
        ))),
    }
}

impl Daemon {
    fn logins_path(&self) -> PathBuf {
        self.paths.state.join("registries.json")
    }

    fn logins(&self) -> BTreeMap<String, Login> {
        fs::read_to_string(self.logins_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_logins(&self, logins: &BTreeMap<String, Login>) -> Result<(), DaemonError> {
        let text = serde_json::to_vec(logins).map_err(|e| DaemonError::State(e.to_string()))?;
        crate::secrets::write_private(&self.logins_path(), &text)
    }

    pub(crate) fn registry_options(&self) -> RegistryOptions {
        let extra_ca_pem = self
            .config
            .gateway
            .extra_ca_certs
            .iter()
            .filter_map(|p| fs::read(p).ok())
            .collect();
        let credentials: HashMap<String, (String, String)> = self
            .logins()
            .into_iter()
            .map(|(registry, l)| (registry, (l.username, l.password)))
            .collect();
        RegistryOptions {
            insecure: self.config.registry.insecure.clone(),
            extra_ca_pem,
            credentials,
            mirrors: self.config.registry.mirrors.clone(),
        }
    }

    /// `moat sandbox save NAME REF`: the sandbox's changes on top of its image.
    pub fn sandbox_save(
        &self,
        name: &str,
        reference: &str,
        fds: Vec<OwnedFd>,
        to_archive: bool,
        r: &Replies,
    ) -> Result<ImageInfo, DaemonError> {
        let archive = if to_archive {
            Some(take_fd(fds, "saving to an archive")?)
        } else {
            None
        };
        let reference = Reference::parse(reference)?;
        let row = self.row(name)?;
        // A running sandbox is paused (as `docker commit` does) while its
        // layer is read, so that the files hold still; without a freezer
        // (rootless without cgroup delegation) it must be stopped first.
        let freezer = match row.info.status {
            SandboxStatus::Stopped => None,
            SandboxStatus::Running => {
                let cgroup = Cgroup::existing(&self.hierarchy, &row.info.id)
                    .ok_or_else(|| cannot_pause(name, "it has no cgroup to freeze"))?;
                Some(cgroup)
            }
        };
        let _guard = lock(&self.image_lock);
        let base = self
            .images
            .list()?
            .into_iter()
            .find(|i| i.id == row.info.image_id)
            .ok_or_else(|| {
                DaemonError::BadRequest(format!(
                    "the image sandbox {name} was made from ({}, {}) is no longer in the store; it cannot be saved on top of it",
                    row.info.template, row.info.image_id
                ))
            })?;
        let upper = self.paths.sandbox_state(&row.info.id).join("upper");
        if !upper.is_dir() {
            return Err(DaemonError::BadRequest(format!(
                "sandbox {name} has no changes on disk yet; run it once first"
            )));
        }
        // Files the sandbox wrote after its image was made get the image's
        // time, so that saving the same changes twice gives the same layer.
        let clamp = humantime::parse_rfc3339(&base.created)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        r.progress(format!("archiving the changes of sandbox {name}"));
        let incoming = self.images.incoming_dir();
        fs::create_dir_all(&incoming)
            .map_err(|e| DaemonError::io(format!("create {}", incoming.display()), e))?;
        let tmp = tempfile::Builder::new()
            .prefix("save-")
            .tempfile_in(&incoming)
            .map_err(|e| DaemonError::io("create a temp file in the image store", e))?;
        let out = tmp
            .reopen()
            .map_err(|e| DaemonError::io("open the temp layer", e))?;
        if let Some(cgroup) = &freezer {
            cgroup.freeze(true).map_err(|e| {
                let _ = cgroup.freeze(false);
                cannot_pause(name, &e)
            })?;
            r.progress(format!(
                "sandbox {name} is paused while its changes are read"
            ));
        }
        let skipped = crate::helpers::save_layer_mapped(&self.exe, &self.idmap, &upper, clamp, out);
        if let Some(cgroup) = &freezer {
            if let Err(e) = cgroup.freeze(false) {
                r.warning(format!(
                    "sandbox {name} could not be resumed: {e}; stop and start it"
                ));
            }
        }
        // One line each: sockets, fifos and devices left out, file
        // capabilities dropped.
        for warning in skipped? {
            r.warning(warning);
        }
        // Set-id bits only where the image had them (the helper that wrote
        // the layer cannot see the image's layers; this process can).
        let lowers = self.images.layer_dirs(&base, &self.unpacker())?;
        for warning in moat_images::drop_new_privileges(tmp.path(), &lowers)? {
            r.warning(warning);
        }
        let labels = BTreeMap::from([
            (LABEL_BASE_NAME.to_string(), base.reference.clone()),
            (LABEL_BASE_DIGEST.to_string(), base.id.clone()),
            (LABEL_SANDBOX.to_string(), row.info.name.clone()),
            (LABEL_AGENT.to_string(), row.info.agent.clone()),
        ]);
        r.progress(format!("storing {reference}"));
        let info = self.images.commit_layer(
            &base,
            tmp.path(),
            &reference,
            &format!("moat sandbox save {name}"),
            labels,
            &self.unpacker(),
        )?;
        if let Some(mut file) = archive {
            r.progress("writing the OCI archive".to_string());
            let written = moat_images::archive::export(&self.images, &reference, &mut file)
                .and_then(|()| {
                    file.sync_all()
                        .map_err(|e| moat_images::ImageError::io("write the archive", e))
                });
            // The archive is the result; the store keeps no name for it.
            let in_use = self.layers_in_use()?;
            self.images.remove(&reference, &in_use)?;
            written?;
        }
        Ok(info)
    }

    fn layers_in_use(&self) -> Result<Vec<String>, DaemonError> {
        Ok(lock(&self.state)
            .all()?
            .into_iter()
            .flat_map(|r| r.layers)
            .collect())
    }

    pub fn image_tag(&self, source: &str, target: &str) -> Result<ImageInfo, DaemonError> {
        let source = Reference::parse(source)?;
        let target = Reference::parse(target)?;
        let _guard = lock(&self.image_lock);
        Ok(self.images.tag(&source, &target)?)
    }

    pub fn image_inspect(&self, reference: &str) -> Result<ImageDetails, DaemonError> {
        let reference = Reference::parse(reference)?;
        let info = self
            .images
            .get(&reference)?
            .ok_or(moat_images::ImageError::NotFound {
                reference: reference.to_string(),
            })?;
        let (manifest, config) = self.images.manifest_and_config(&info)?;
        Ok(ImageDetails {
            manifest: serde_json::to_value(&manifest).unwrap_or_default(),
            config: serde_json::to_value(&config).unwrap_or_default(),
            info,
        })
    }

    pub fn image_pull(&self, reference: &str, r: &Replies) -> Result<ImageInfo, DaemonError> {
        let reference = Reference::parse(reference)?;
        let _guard = lock(&self.image_lock);
        self.pull_locked(&reference, r)
    }

    fn pull_locked(&self, reference: &Reference, r: &Replies) -> Result<ImageInfo, DaemonError> {
        let report = |t: Transfer| send_transfer(r, t);
        Ok(registry::pull(
            &self.images,
            reference,
            &self.registry_options(),
            &report,
        )?)
    }

    /// The image for a new sandbox by reference, pulled when `policy` says so.
    pub(crate) fn image_for_create(
        &self,
        reference: &Reference,
        policy: Option<&str>,
        r: &Replies,
    ) -> Result<Option<ImageInfo>, DaemonError> {
        let policy = policy.unwrap_or("missing");
        let _guard = lock(&self.image_lock);
        let have = self.images.get(reference)?;
        let pull = match policy {
            "always" => reference.registry().is_some(),
            "missing" => have.is_none() && reference.registry().is_some(),
            "never" => false,
            other => {
                return Err(DaemonError::BadRequest(format!(
                    "--pull-template {other:?}: use always, missing or never"
                )))
            }
        };
        if pull {
            return self.pull_locked(reference, r).map(Some);
        }
        Ok(have)
    }

    pub fn image_push(&self, reference: &str, r: &Replies) -> Result<PushSummary, DaemonError> {
        let reference = Reference::parse(reference)?;
        let report = |t: Transfer| send_transfer(r, t);
        // Not under the image lock: a push only reads, and blobs in use by a
        // name are never swept.
        Ok(registry::push(
            &self.images,
            &reference,
            &self.registry_options(),
            &report,
        )?)
    }

    pub fn image_load(
        &self,
        fds: Vec<OwnedFd>,
        r: &Replies,
    ) -> Result<Vec<ImageInfo>, DaemonError> {
        let file = take_fd(fds, "image load")?;
        let _guard = lock(&self.image_lock);
        r.progress("reading the OCI archive".to_string());
        let input = std::io::BufReader::with_capacity(1 << 20, file);
        Ok(moat_images::archive::load(&self.images, input)?)
    }

    pub fn registry_login(
        &self,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<String, DaemonError> {
        if registry.is_empty() || registry.contains('/') {
            return Err(DaemonError::BadRequest(format!(
                "{registry:?} is not a registry host; give HOST[:PORT], e.g. localhost:5000"
            )));
        }
        let mut options = self.registry_options();
        options.credentials.insert(
            registry.to_string(),
            (username.to_string(), password.to_string()),
        );
        registry::check_login(registry, &options)?;
        let mut logins = self.logins();
        logins.insert(
            registry.to_string(),
            Login {
                username: username.to_string(),
                password: password.to_string(),
            },
        );
        self.save_logins(&logins)?;
        Ok(format!("Login Succeeded ({registry} as {username})"))
    }

    pub fn registry_logout(&self, registry: &str) -> Result<String, DaemonError> {
        let mut logins = self.logins();
        if logins.remove(registry).is_none() {
            return Err(DaemonError::BadRequest(format!(
                "not logged in to {registry}"
            )));
        }
        self.save_logins(&logins)?;
        Ok(format!("Removed the login for {registry}"))
    }
}

fn cannot_pause(name: &str, why: &str) -> DaemonError {
    DaemonError::BadRequest(format!(
        "sandbox {name} is running and cannot be paused while it is saved ({why}); stop it first (`moat sandbox stop {name}`)"
    ))
}

pub(crate) fn send_transfer(r: &Replies, t: Transfer) {
    match t {
        Transfer::Step(message) => r.progress(message),
        Transfer::Bytes { id, done, total } => {
            r.send(&moat_api::Reply::Transfer { id, done, total })
        }
    }
}

//! Model management through the daemon (`moat model package|ls|inspect|rm|
//! tag|push|pull|df`): requests in, the model store of `moat-models` does
//! the work, replies in Docker Model Runner's shapes out. Files to package
//! arrive as descriptors the CLI opened, so the daemon never opens a path a
//! caller named; registry pulls and pushes use the logins and trusted CAs
//! that image transfers use.

use std::fs::File;
use std::os::fd::OwnedFd;

use moat_api::{ModelDiskUsage, ModelInfo, ModelPackageRequest, ModelRemoved};
use moat_models::store::{Model, PackageOptions, PushSummary, Source, Transfer};

use crate::images::send_transfer;
use crate::sandboxes::Daemon;
use crate::server::Replies;
use crate::DaemonError;

/// DMR's `GET /models` entry for a stored model.
pub(crate) fn model_info(model: &Model) -> ModelInfo {
    ModelInfo {
        id: model.id.clone(),
        tags: model.tags.clone(),
        created: model.created,
        config: serde_json::to_value(&model.config).unwrap_or_default(),
    }
}

impl Daemon {
    pub fn model_package(
        &self,
        req: ModelPackageRequest,
        fds: Vec<OwnedFd>,
        r: &Replies,
    ) -> Result<ModelInfo, DaemonError> {
        let wanted =
            req.ggufs.len() + req.licenses.len() + usize::from(req.chat_template.is_some());
        if fds.len() != wanted {
            return Err(DaemonError::BadRequest(format!(
                "model package named {wanted} files but {} descriptors came with it; run the same moat for the CLI and the daemon",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter();
        let mut take = |names: Vec<String>| -> Vec<Source> {
            names
                .into_iter()
                .zip(fds.by_ref())
                .map(|(name, fd)| Source::file(name, File::from(fd)))
                .collect()
        };
        let ggufs = take(req.ggufs);
        let licenses = take(req.licenses);
        let chat_template = take(req.chat_template.into_iter().collect()).pop();
        r.progress(format!("packaging {}", req.reference));
        let report = |t: Transfer| send_transfer(r, t);
        let model = self.models.package_with_progress(
            ggufs,
            &req.reference,
            PackageOptions {
                licenses,
                context_size: req.context_size,
                chat_template,
            },
            &report,
        )?;
        Ok(model_info(&model))
    }

    pub fn model_list(&self) -> Result<Vec<ModelInfo>, DaemonError> {
        Ok(self.models.list()?.iter().map(model_info).collect())
    }

    pub fn model_inspect(&self, reference: &str) -> Result<ModelInfo, DaemonError> {
        Ok(model_info(&self.models.get(reference)?))
    }

    pub fn model_rm(&self, reference: &str, force: bool) -> Result<ModelRemoved, DaemonError> {
        let removed = self.models.remove(reference, force)?;
        Ok(ModelRemoved {
            untagged: removed.untagged,
            deleted: removed.deleted,
        })
    }

    pub fn model_tag(&self, source: &str, target: &str) -> Result<ModelInfo, DaemonError> {
        Ok(model_info(&self.models.tag(source, target)?))
    }

    pub fn model_push(&self, reference: &str, r: &Replies) -> Result<PushSummary, DaemonError> {
        let report = |t: Transfer| send_transfer(r, t);
        Ok(self
            .models
            .push(reference, &self.registry_options(), &report)?)
    }

    pub fn model_pull(&self, reference: &str, r: &Replies) -> Result<ModelInfo, DaemonError> {
        let report = |t: Transfer| send_transfer(r, t);
        let model = self
            .models
            .pull(reference, &self.registry_options(), &report)?;
        Ok(model_info(&model))
    }

    pub fn model_df(&self) -> Result<ModelDiskUsage, DaemonError> {
        Ok(ModelDiskUsage {
            models_disk_usage: self.models.disk_usage()?,
            prompt_cache_disk_usage: moat_models::engine::prompt_cache::disk_usage(
                &crate::model_runner::prompt_cache_root(&self.paths),
            ),
        })
    }

    /// `moat model cache rm [MODEL]`: the saved prompts of one model (of
    /// every one without a name) are removed; a loaded model keeps what
    /// it holds in memory.
    pub fn model_cache_rm(&self, model: Option<&str>) -> Result<serde_json::Value, DaemonError> {
        let id = match model {
            Some(m) => Some(
                self.model_service
                    .find(m)
                    .map_err(crate::model_runner::api_error)?
                    .id,
            ),
            None => None,
        };
        let root = crate::model_runner::prompt_cache_root(&self.paths);
        let freed =
            moat_models::engine::prompt_cache::remove(&root, id.as_deref()).map_err(|e| {
                DaemonError::io(format!("clear the prompt cache in {}", root.display()), e)
            })?;
        Ok(serde_json::json!({ "freed": freed }))
    }
}

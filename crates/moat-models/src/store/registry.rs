//! The model store's side of the registry transfer that the image crate
//! implements once ([`moat_images::registry`]): models are asked for as OCI
//! manifests, refused unless their config is DMR's model config and they
//! carry GGUF weights, and named only after every layer arrived whole, every
//! GGUF passed the header check and every shard of a split model is there.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use moat_images::oci::{digest_hex, Descriptor, Manifest, MEDIA_DOCKER_MANIFEST, MEDIA_MANIFEST};
use moat_images::registry::{self, PulledBlobs, PushSource, RegistryStore};
use moat_images::{ImageError, Reference};

use super::config::{ConfigFile, ANNOTATION_FILEPATH, MEDIA_GGUF, MEDIA_MODEL_CONFIG_PREFIX};
use super::{
    read_checked, resolve, HubConfig, HubReference, Model, ModelReference, ModelStore, PushSummary,
    RegistryOptions, StoreError, Transfer,
};
use crate::gguf::{self, GgufInfo};

const MODEL_MANIFESTS: [&str; 2] = [MEDIA_MANIFEST, MEDIA_DOCKER_MANIFEST];

impl ModelStore {
    /// Pulls a model from its registry (Docker Hub when the reference names
    /// none; Hugging Face for `hf.co/…`), resuming what an earlier, broken
    /// pull left.
    pub fn pull(
        &self,
        reference: &str,
        opts: &RegistryOptions,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Model, StoreError> {
        if let Some(hub) = HubReference::parse(reference) {
            return self.pull_from_hub(&hub?, &HubConfig::from_env(), opts, progress);
        }
        let local = ModelReference::parse(reference)?;
        registry::pull(self, &local.remote(), opts, progress).map_err(|e| hub_hint(&local, e))
    }

    /// Pushes the stored model `reference` to the registry its name starts
    /// with (Docker Hub when none).
    pub fn push(
        &self,
        reference: &str,
        opts: &RegistryOptions,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<PushSummary, StoreError> {
        let local = ModelReference::parse(reference)?;
        // Missing models are reported by their local name, before any connection.
        self.get(reference)?;
        registry::push(self, &local.remote(), opts, progress).map_err(|e| hub_hint(&local, e))
    }

    /// The layers of a manifest that hold GGUF weights, each with its file
    /// (in `incoming/` when just downloaded, else in `blobs/`), checked.
    fn check_weights(
        &self,
        reference: &Reference,
        manifest: &Manifest,
        incoming: &HashMap<&str, &Path>,
    ) -> Result<(), StoreError> {
        let mut infos: Vec<(String, GgufInfo)> = Vec::new();
        for layer in manifest
            .layers
            .iter()
            .filter(|l| l.media_type == MEDIA_GGUF)
        {
            let name = layer_name(layer);
            let path = match incoming.get(layer.digest.as_str()) {
                Some(p) => p.to_path_buf(),
                None => self.blob_path(&layer.digest)?,
            };
            let info = gguf::read_file(&path).map_err(|e| {
                // Its digest matched, so the registry holds a bad model:
                // downloading it again would not help.
                if incoming.contains_key(layer.digest.as_str()) {
                    let _ = fs::remove_file(&path);
                }
                StoreError::BadGguf {
                    name: format!("{name} of {reference}"),
                    reason: e.to_string(),
                }
            })?;
            infos.push((name, info));
        }
        let n = infos.len() as u64;
        if n > 1 {
            for (i, (name, info)) in infos.iter().enumerate() {
                let (no, count) = (info.uint("split.no"), info.uint("split.count"));
                if no != Some(i as u64) || count != Some(n) {
                    return Err(StoreError::BadPackage(format!(
                        "{reference}: GGUF layer {} ({name}) is not shard {} of {n} (its header says shard {:?} of {:?}); the model in the registry is broken, ask its publisher",
                        i + 1,
                        i + 1,
                        no.map(|x| x + 1),
                        count
                    )));
                }
            }
        }
        Ok(())
    }
}

impl RegistryStore for ModelStore {
    type Pulled = Model;
    type Error = StoreError;

    fn accepted_manifests(&self) -> &[&str] {
        &MODEL_MANIFESTS
    }

    fn incoming_dir(&self) -> std::path::PathBuf {
        ModelStore::incoming_dir(self)
    }

    fn blob_path(&self, digest: &str) -> Result<std::path::PathBuf, ImageError> {
        ModelStore::blob_path(self, digest).map_err(|e| ImageError::Registry {
            reference: digest.to_string(),
            reason: e.to_string(),
        })
    }

    fn check_manifest(
        &self,
        reference: &Reference,
        manifest: &Manifest,
        config: &[u8],
    ) -> Result<(), StoreError> {
        let refuse = |reason: String| {
            StoreError::Registry(ImageError::Registry {
                reference: reference.to_string(),
                reason,
            })
        };
        if !manifest
            .config
            .media_type
            .starts_with(MEDIA_MODEL_CONFIG_PREFIX)
        {
            return Err(refuse(format!(
                "it is not a model (its config is {}); images are pulled with `moat image pull`",
                manifest.config.media_type
            )));
        }
        if !manifest.layers.iter().any(|l| l.media_type == MEDIA_GGUF) {
            return Err(refuse(
                "it has no GGUF weights (only GGUF models run here)".to_string(),
            ));
        }
        if let Some(bad) = manifest
            .layers
            .iter()
            .find(|l| digest_hex(&l.digest).is_none())
        {
            return Err(refuse(format!(
                "layer digest {:?} is not sha256:<64 hex digits>",
                bad.digest
            )));
        }
        serde_json::from_slice::<ConfigFile>(config)
            .map_err(|e| refuse(format!("its config does not parse: {e}")))?;
        Ok(())
    }

    fn commit_pull(&self, reference: &Reference, pulled: PulledBlobs) -> Result<Model, StoreError> {
        let tag = ModelReference::parse(&reference.to_string())?.to_string();
        let id = super::sha256_digest(&pulled.manifest_bytes);
        let _lock = self.lock()?;
        let incoming: HashMap<&str, &Path> = pulled
            .incoming
            .iter()
            .map(|(d, p)| (d.digest.as_str(), p.as_path()))
            .collect();
        self.check_weights(reference, &pulled.manifest, &incoming)?;
        let mut added = Vec::new();
        let result = (|| {
            for (layer, from) in &pulled.incoming {
                let to = ModelStore::blob_path(self, &layer.digest)?;
                fs::rename(from, &to).map_err(|e| {
                    StoreError::io(format!("move {} into the store", from.display()), e)
                })?;
                added.push(layer.digest.clone());
            }
            self.finish_commit(
                &pulled.manifest,
                &pulled.config_bytes,
                &pulled.manifest_bytes,
                &id,
                &tag,
            )
        })();
        if result.is_err() {
            let index = self.read_index().unwrap_or_default();
            let mut candidates: std::collections::HashSet<String> = added.into_iter().collect();
            candidates.insert(pulled.manifest.config.digest.clone());
            if let Err(e) = self.delete_unreferenced(&index, &candidates, Some(&id)) {
                tracing::warn!("left the files of a failed pull in place: {e}");
            }
        }
        result
    }

    fn push_source(&self, reference: &Reference) -> Result<PushSource, StoreError> {
        let local = ModelReference::parse(&reference.to_string())?;
        let index = self.read_index()?;
        let (at, _) = resolve(&index, &local.to_string())?;
        let entry = &index.models[at];
        let path = self.manifest_path(&entry.id)?;
        let manifest_bytes = read_checked(&path, &entry.id)?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: format!("it is not an OCI manifest: {e}"),
            })?;
        let mut mount_sources: HashMap<String, Vec<String>> = HashMap::new();
        for other in &index.models {
            let Ok(other_manifest) = self.read_manifest(&other.id) else {
                continue;
            };
            for tag in &other.tags {
                let Ok(other_ref) = ModelReference::parse(tag) else {
                    continue;
                };
                if other_ref.registry() != local.registry()
                    || other_ref.repository() == local.repository()
                {
                    continue;
                }
                for blob in other_manifest
                    .layers
                    .iter()
                    .chain(std::iter::once(&other_manifest.config))
                {
                    let repos = mount_sources.entry(blob.digest.clone()).or_default();
                    if !repos.iter().any(|r| r == other_ref.repository()) {
                        repos.push(other_ref.repository().to_string());
                    }
                }
            }
        }
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MEDIA_MANIFEST.to_string());
        Ok(PushSource {
            manifest_bytes,
            media_type,
            manifest,
            mount_sources,
        })
    }
}

/// The file name a layer was packaged from, or its short digest.
fn layer_name(layer: &Descriptor) -> String {
    layer
        .annotations
        .get(ANNOTATION_FILEPATH)
        .cloned()
        .unwrap_or_else(|| {
            digest_hex(&layer.digest)
                .map(|h| h[..12].to_string())
                .unwrap_or_else(|| layer.digest.clone())
        })
}

/// A model named without a registry comes from Docker Hub; when that cannot
/// be reached, say so and how to name another.
fn hub_hint(local: &ModelReference, e: StoreError) -> StoreError {
    let unreachable = matches!(
        &e,
        StoreError::Registry(ImageError::Registry { reason, .. })
            if reason.contains("is the registry up and reachable")
    );
    let on_hub = local.registry() == super::DEFAULT_REGISTRY;
    match e {
        StoreError::Registry(ImageError::Registry { reference, reason })
            if unreachable && on_hub =>
        {
            StoreError::Registry(ImageError::Registry {
                reference,
                reason: format!(
                    "{reason}; {local} has no registry host, so it means Docker Hub (docker.io): name a registry that is reachable, e.g. localhost:5000/{}",
                    local.repository()
                ),
            })
        }
        other => other,
    }
}

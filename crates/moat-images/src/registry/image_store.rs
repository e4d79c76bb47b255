//! The image store's side of the registry transfer: which manifests it
//! takes, how a pulled image enters `blobs/` and `index.json`, and what a
//! push of one of its images sends.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use super::{PulledBlobs, PushSource, RegistryStore};
use crate::error::ImageError;
use crate::fsutil::fsync_dir;
use crate::layout::{ImageInfo, ImageStore};
use crate::oci::{Manifest, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_INDEX, MEDIA_MANIFEST};
use crate::reference::Reference;

/// Manifest media types an image pull asks for: single images and the
/// multi-platform lists that point at them.
pub const IMAGE_MANIFESTS: [&str; 4] = [
    MEDIA_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_INDEX,
    MEDIA_DOCKER_LIST,
];

/// Config media types of Docker Model Runner's models start with this.
const MODEL_MEDIA_PREFIX: &str = "application/vnd.docker.ai.";

impl RegistryStore for ImageStore {
    type Pulled = ImageInfo;
    type Error = ImageError;

    fn accepted_manifests(&self) -> &[&str] {
        &IMAGE_MANIFESTS
    }

    fn incoming_dir(&self) -> PathBuf {
        ImageStore::incoming_dir(self)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        ImageStore::blob_path(self, digest)
    }

    fn check_manifest(
        &self,
        reference: &Reference,
        manifest: &Manifest,
        _config: &[u8],
    ) -> Result<(), ImageError> {
        // A model's layers are weights, not file systems: refused before
        // gigabytes are fetched for nothing.
        if manifest.config.media_type.starts_with(MODEL_MEDIA_PREFIX) {
            return Err(ImageError::Registry {
                reference: reference.to_string(),
                reason: format!(
                    "it is a model ({}), not an image; pull it with `moat model pull {reference}`",
                    manifest.config.media_type
                ),
            });
        }
        Ok(())
    }

    fn commit_pull(
        &self,
        reference: &Reference,
        pulled: PulledBlobs,
    ) -> Result<ImageInfo, ImageError> {
        let _lock = self.lock()?;
        self.put_json_blob(&pulled.manifest.config.media_type, &pulled.config_bytes)?;
        for (layer, from) in &pulled.incoming {
            let to = ImageStore::blob_path(self, &layer.digest)?;
            fs::rename(from, &to).map_err(|e| {
                ImageError::io(format!("move {} into the store", from.display()), e)
            })?;
        }
        // A layer that was already stored when the pull began must still be:
        // nothing may be named whose blobs are gone.
        for layer in &pulled.manifest.layers {
            if !ImageStore::blob_path(self, &layer.digest)?.exists() {
                return Err(ImageError::MissingBlob {
                    digest: layer.digest.clone(),
                });
            }
        }
        fsync_dir(&self.root().join("blobs").join("sha256"))?;
        let desc = self.put_json_blob(&pulled.media_type, &pulled.manifest_bytes)?;
        self.set_name_locked(reference, desc)
    }

    fn push_source(&self, reference: &Reference) -> Result<PushSource, ImageError> {
        let entry = self.entry(reference)?;
        let manifest_bytes = self.read_small_blob(&entry.digest)?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| ImageError::Registry {
                reference: reference.to_string(),
                reason: format!("its manifest does not parse: {e}"),
            })?;
        let mut mount_sources: HashMap<String, Vec<String>> = HashMap::new();
        for other in self.list()? {
            let Ok(other_ref) = Reference::parse(&other.reference) else {
                continue;
            };
            if other_ref.registry() != reference.registry()
                || other_ref.repository() == reference.repository()
            {
                continue;
            }
            if let Ok((m, _)) = self.manifest_and_config(&other) {
                for l in m.layers.iter().chain(std::iter::once(&m.config)) {
                    mount_sources
                        .entry(l.digest.clone())
                        .or_default()
                        .push(other_ref.repository().to_string());
                }
            }
        }
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| entry.media_type.clone());
        Ok(PushSource {
            manifest_bytes,
            media_type,
            manifest,
            mount_sources,
        })
    }
}

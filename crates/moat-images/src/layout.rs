//! The image store: an OCI image layout under `root/` (`oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`) plus unpacked layers under
//! `root/layers/sha256/<diff-id hex>/{rootfs/,complete}`.
//!
//! Crash safety: blobs and index.json are written to temp names, fsynced
//! and renamed; an unpacked layer is built under a temp name and renamed
//! into place with its `complete` marker already inside; deletions rename
//! to a trash name first. Every change to index.json, and every sweep of
//! unreferenced objects, holds an flock on `root/index.lock`, so two
//! processes never lose each other's updates or sweep each other's work.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;

use crate::digest::{digest_layer, sha256_digest, Compression};
use crate::error::ImageError;
use crate::fsutil::{
    fsync_dir, remove_tree, sweep_stale_tmp, tmp_name, trash_and_remove, write_atomic, TMP_MARK,
};
use crate::oci::{
    digest_hex, now_rfc3339, oci_arch, Descriptor, History, ImageConfig, Index, Manifest,
    OciLayout, RootFs, RuntimeConfig, ANNOTATION_REF_NAME, LAYOUT_VERSION, MEDIA_CONFIG,
    MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR, MEDIA_LAYER_ZSTD, MEDIA_MANIFEST,
};
use crate::reference::Reference;
use crate::unpack::LayerUnpacker;

/// What the daemon and CLI show about an image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ImageInfo {
    /// `name:tag`.
    pub reference: String,
    /// `sha256:<hex>` of the manifest.
    pub id: String,
    /// RFC 3339 UTC, from the config.
    pub created: String,
    /// Sum of the layer blob sizes.
    pub size: u64,
    /// Diff ids `sha256:<hex>`, lowest first.
    pub layers: Vec<String>,
}

/// The PATH every image starts with; agents expect a Debian-like one.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Manifests and configs are small; a larger one is damage, not data.
const MAX_JSON_BLOB: u64 = 4 << 20;
const COMPLETE: &str = "complete";
/// How long a partial download waits in `incoming/` for a pull to resume it.
const INCOMING_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// An OCI image layout plus unpacked layers, shared by processes through flock.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Held while index.json may change or objects are swept.
pub(crate) struct IndexLock(#[allow(dead_code)] Flock<File>);

/// Blobs and diff ids that some index entry still needs.
struct Marks {
    blobs: HashSet<String>,
    diff_ids: HashSet<String>,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, and removes temp files
    /// that crashed writers left there more than an hour ago.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.to_path_buf(),
        };
        for dir in [store.blobs_dir(), store.layers_dir()] {
            fs::create_dir_all(&dir)
                .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
        }
        let _lock = store.lock()?;
        let layout_path = root.join("oci-layout");
        match fs::read(&layout_path) {
            Ok(bytes) => {
                let layout: OciLayout = serde_json::from_slice(&bytes).map_err(|e| {
                    corrupt(&layout_path, format!("it is not an OCI layout file: {e}"))
                })?;
                if layout.image_layout_version != LAYOUT_VERSION {
                    return Err(corrupt(
                        &layout_path,
                        format!(
                            "layout version {} is not the supported {LAYOUT_VERSION}",
                            layout.image_layout_version
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let layout = OciLayout {
                    image_layout_version: LAYOUT_VERSION.to_string(),
                };
                write_atomic(root, "oci-layout", &to_json(&layout)?)?;
            }
            Err(e) => return Err(ImageError::io(format!("read {}", layout_path.display()), e)),
        }
        if store.index_path().exists() {
            store.read_index()?;
        } else {
            store.write_index(&Index::empty())?;
        }
        let now = SystemTime::now();
        for dir in [root.to_path_buf(), store.blobs_dir(), store.layers_dir()] {
            for removed in sweep_stale_tmp(&dir, now) {
                tracing::info!("removed left-over temp {}", removed.display());
            }
        }
        store.sweep_incoming(now);
        Ok(store)
    }

    /// Where downloads and saves in progress live: a broken pull leaves its
    /// partial layer here for the next one to resume.
    pub fn incoming_dir(&self) -> PathBuf {
        self.root.join("incoming")
    }

    /// Partial downloads nobody resumed for a day, and what crashed saves left.
    fn sweep_incoming(&self, now: SystemTime) {
        let Ok(entries) = fs::read_dir(self.incoming_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > INCOMING_KEPT);
            if old {
                let path = entry.path();
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!("could not remove stale {}: {e}", path.display());
                }
            }
        }
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Imports a root file system tarball (plain tar or gzip, told apart by
    /// magic bytes) as a one-layer image named `reference` with `labels`, replacing any
    /// image of that name. The layer is unpacked before the name appears, so
    /// a broken tarball is reported here and never becomes a visible image.
    pub fn import_rootfs(
        &self,
        tar: &Path,
        reference: &Reference,
        created_by: &str,
        labels: BTreeMap<String, String>,
        unpacker: &dyn LayerUnpacker,
    ) -> Result<ImageInfo, ImageError> {
        // Held throughout, so that a concurrent `remove` cannot sweep the
        // blobs written here before the index names them.
        let _lock = self.lock()?;
        let created = now_rfc3339();
        let config = ImageConfig {
            created: Some(created.clone()),
            architecture: oci_arch().to_string(),
            os: "linux".to_string(),
            config: RuntimeConfig {
                env: vec![DEFAULT_PATH.to_string()],
                labels,
                ..RuntimeConfig::default()
            },
            rootfs: RootFs {
                kind: "layers".to_string(),
                diff_ids: Vec::new(),
            },
            ..ImageConfig::default()
        };
        self.stack_layer(Vec::new(), config, tar, reference, created_by, unpacker)
    }

    /// Stacks a layer tarball (the changes a sandbox made) on `base` and
    /// names the result `reference`; `labels` go into the config, next to
    /// the ones `base` had, and the history records `created_by`.
    pub fn commit_layer(
        &self,
        base: &ImageInfo,
        tar: &Path,
        reference: &Reference,
        created_by: &str,
        labels: BTreeMap<String, String>,
        unpacker: &dyn LayerUnpacker,
    ) -> Result<ImageInfo, ImageError> {
        let _lock = self.lock()?;
        let manifest: Manifest = self.read_json_blob(&base.id)?;
        let mut config: ImageConfig = self.read_json_blob(&manifest.config.digest)?;
        config.config.labels.extend(labels);
        let layers = manifest
            .layers
            .into_iter()
            .map(|mut l| {
                l.media_type = oci_layer_media(&l.media_type).to_string();
                l
            })
            .collect();
        self.stack_layer(layers, config, tar, reference, created_by, unpacker)
    }

    /// Writes `tar` as a new top layer over `layers` (whose diff ids are in
    /// `config`), then the config, the manifest and the name. Callers hold
    /// the lock, so that a concurrent `remove` cannot sweep the blobs
    /// written here before the index names them.
    fn stack_layer(
        &self,
        mut layers: Vec<Descriptor>,
        mut config: ImageConfig,
        tar: &Path,
        reference: &Reference,
        created_by: &str,
        unpacker: &dyn LayerUnpacker,
    ) -> Result<ImageInfo, ImageError> {
        let (layer, diff_id) = self.put_layer_blob(tar)?;
        let mut written = vec![layer.digest.clone()];
        let result = (|| {
            let created = now_rfc3339();
            config.created = Some(created.clone());
            config.rootfs.diff_ids.push(diff_id.clone());
            config.history.push(History {
                created: Some(created),
                created_by: Some(created_by.to_string()),
                ..History::default()
            });
            layers.push(layer.clone());
            let config_desc = self.put_json_blob(MEDIA_CONFIG, &to_json(&config)?)?;
            written.push(config_desc.digest.clone());
            let manifest = Manifest {
                schema_version: 2,
                media_type: Some(MEDIA_MANIFEST.to_string()),
                config: config_desc,
                layers,
                extra: serde_json::Map::new(),
            };
            let manifest_bytes = to_json(&manifest)?;
            let manifest_desc = self.put_json_blob(MEDIA_MANIFEST, &manifest_bytes)?;
            written.push(manifest_desc.digest.clone());
            // The blob was hashed as it was written, so no second verify pass.
            self.ensure_layer(&layer, &diff_id, unpacker, false)?;
            self.set_name_locked(reference, manifest_desc)
        })();
        if result.is_err() {
            self.drop_unreferenced_blobs(&written);
        }
        result
    }

    /// Points `reference` at a manifest already in the store. Callers hold the lock.
    pub(crate) fn set_name_locked(
        &self,
        reference: &Reference,
        mut manifest_desc: Descriptor,
    ) -> Result<ImageInfo, ImageError> {
        let name = reference.to_string();
        manifest_desc
            .annotations
            .insert(ANNOTATION_REF_NAME.to_string(), name.clone());
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.ref_name() != Some(name.as_str()));
        index.manifests.push(manifest_desc.clone());
        self.write_index(&index)?;
        // The replaced image's manifest and config are unreferenced now.
        // Unpacked layers stay: a sandbox may still mount them, and only
        // `remove` is told which ones.
        if let Err(e) = self.sweep(&index, None) {
            tracing::warn!("could not sweep unreferenced blobs after naming {name}: {e}");
        }
        self.image_info(&manifest_desc, &name)
    }

    /// Gives the image `source` a second name, as `docker tag` does.
    pub fn tag(&self, source: &Reference, target: &Reference) -> Result<ImageInfo, ImageError> {
        let _lock = self.lock()?;
        let entry = self.entry(source)?;
        let desc = Descriptor::new(entry.media_type.as_str(), entry.digest.clone(), entry.size);
        self.set_name_locked(target, desc)
    }

    /// The index entry of a name, or NotFound.
    pub(crate) fn entry(&self, reference: &Reference) -> Result<Descriptor, ImageError> {
        let name = reference.to_string();
        self.read_index()?
            .manifests
            .into_iter()
            .find(|d| d.ref_name() == Some(name.as_str()))
            .ok_or(ImageError::NotFound { reference: name })
    }

    /// The manifest and config of a stored image, as the registry and
    /// `image inspect` see them.
    pub fn manifest_and_config(
        &self,
        image: &ImageInfo,
    ) -> Result<(Manifest, ImageConfig), ImageError> {
        let manifest: Manifest = self.read_json_blob(&image.id)?;
        let config: ImageConfig = self.read_json_blob(&manifest.config.digest)?;
        Ok((manifest, config))
    }

    /// All named images, sorted by reference. An image whose manifest or
    /// config is damaged is still listed (with what the index knows) so
    /// that it can be found and removed.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let index = self.read_index()?;
        let mut images = Vec::new();
        for entry in &index.manifests {
            let Some(name) = entry.ref_name() else {
                continue;
            };
            match self.image_info(entry, name) {
                Ok(info) => images.push(info),
                Err(e) => {
                    tracing::warn!("image {name} is damaged: {e}");
                    images.push(bare_info(entry, name));
                }
            }
        }
        images.sort_by(|a, b| a.reference.cmp(&b.reference).then(a.id.cmp(&b.id)));
        Ok(images)
    }

    /// The image of that name, if there is one.
    pub fn get(&self, reference: &Reference) -> Result<Option<ImageInfo>, ImageError> {
        let name = reference.to_string();
        let index = self.read_index()?;
        match index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(name.as_str()))
        {
            Some(entry) => self.image_info(entry, &name).map(Some),
            None => Ok(None),
        }
    }

    /// Directories to stack as overlay lower layers, lowest first,
    /// unpacking (after verifying the blob) any that are missing.
    pub fn layer_dirs(
        &self,
        image: &ImageInfo,
        unpacker: &dyn LayerUnpacker,
    ) -> Result<Vec<PathBuf>, ImageError> {
        let manifest: Manifest = self.read_json_blob(&image.id)?;
        let config: ImageConfig = self.read_json_blob(&manifest.config.digest)?;
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(self.layer_count_mismatch(
                &image.id,
                manifest.layers.len(),
                diff_ids.len(),
            ));
        }
        manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(layer, diff_id)| self.ensure_layer(layer, diff_id, unpacker, true))
            .collect()
    }

    /// The unpacked root of one layer, by diff id, if it is complete.
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        let missing = || ImageError::MissingLayer {
            diff_id: diff_id.to_string(),
        };
        let hex = digest_hex(diff_id).ok_or_else(missing)?;
        let dir = self.layers_dir().join(hex);
        if dir.join(COMPLETE).is_file() {
            Ok(dir.join("rootfs"))
        } else {
            Err(missing())
        }
    }

    /// Removes the name, then deletes blobs and unpacked layers that no
    /// remaining image references, except layers whose diff id is in
    /// `in_use` (a sandbox still mounts them).
    pub fn remove(
        &self,
        reference: &Reference,
        in_use: &[String],
    ) -> Result<ImageInfo, ImageError> {
        let name = reference.to_string();
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let Some(entry) = index
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(name.as_str()))
            .cloned()
        else {
            return Err(ImageError::NotFound { reference: name });
        };
        // A damaged image must stay removable: report what the index knows.
        let info = self
            .image_info(&entry, &name)
            .unwrap_or_else(|_| bare_info(&entry, &name));
        index
            .manifests
            .retain(|d| d.ref_name() != Some(name.as_str()));
        self.write_index(&index)?;
        let in_use: HashSet<String> = in_use
            .iter()
            .map(|d| digest_hex(d).unwrap_or(d.as_str()).to_string())
            .collect();
        // The name is gone either way; garbage left by a failed sweep is
        // collected by the next one, which marks and sweeps everything.
        if let Err(e) = self.sweep(&index, Some(&in_use)) {
            tracing::warn!("could not delete unreferenced image data: {e}");
        }
        Ok(info)
    }

    // ---- paths ----

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers").join("sha256")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| {
            corrupt(
                &self.index_path(),
                format!("digest {digest:?} is not sha256:<64 hex digits>"),
            )
        })?;
        Ok(self.blobs_dir().join(hex))
    }

    // ---- index ----

    pub(crate) fn lock(&self) -> Result<IndexLock, ImageError> {
        let path = self.root.join("index.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(IndexLock)
            .map_err(|(_, errno)| ImageError::io(format!("lock {}", path.display()), errno.into()))
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.index_path();
        let bytes =
            fs::read(&path).map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(&path, format!("it is not an OCI index: {e}")))
    }

    /// Callers hold the lock.
    fn write_index(&self, index: &Index) -> Result<(), ImageError> {
        write_atomic(&self.root, "index.json", &to_json(index)?)
    }

    // ---- blobs ----

    /// Streams a layer tarball into blobs/, hashing as it copies. Always
    /// renames over an existing blob of the same digest: the new copy is
    /// known good, the old one may have rotted.
    /// Returns the layer's descriptor and its diff id.
    fn put_layer_blob(&self, tar: &Path) -> Result<(Descriptor, String), ImageError> {
        let dir = self.blobs_dir();
        let tmp = dir.join(tmp_name("layer", ""));
        let result = (|| {
            let mut file = File::create(&tmp)
                .map_err(|e| ImageError::io(format!("create {}", tmp.display()), e))?;
            let digests = digest_layer(tar, Some(&mut file))?;
            file.sync_all()
                .map_err(|e| ImageError::io(format!("write {}", tmp.display()), e))?;
            let diff_id = digests.diff_id.map_err(|reason| ImageError::BadLayer {
                path: tar.to_path_buf(),
                reason,
            })?;
            let target = self.blob_path(&digests.digest)?;
            fs::rename(&tmp, &target)
                .map_err(|e| ImageError::io(format!("write {}", target.display()), e))?;
            fsync_dir(&dir)?;
            let media = match digests.compression {
                Compression::None => MEDIA_LAYER_TAR,
                Compression::Gzip => MEDIA_LAYER_GZIP,
                Compression::Zstd => MEDIA_LAYER_ZSTD,
            };
            Ok((
                Descriptor::new(media, digests.digest, digests.size),
                diff_id,
            ))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub(crate) fn put_json_blob(
        &self,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Descriptor, ImageError> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_atomic(&self.blobs_dir(), &name, bytes)?;
        Ok(Descriptor::new(media_type, digest, bytes.len() as u64))
    }

    /// Reads a small JSON blob, checking it against its digest.
    pub(crate) fn read_json_blob<T: DeserializeOwned>(
        &self,
        digest: &str,
    ) -> Result<T, ImageError> {
        let bytes = self.read_small_blob(digest)?;
        let path = self.blob_path(digest)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(&path, format!("it does not parse as expected: {e}")))
    }

    /// The bytes of a manifest or config, checked against their digest.
    pub(crate) fn read_small_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::MissingBlob {
                    digest: digest.to_string(),
                })
            }
            Err(e) => return Err(ImageError::io(format!("open {}", path.display()), e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BLOB + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
        if bytes.len() as u64 > MAX_JSON_BLOB || sha256_digest(&bytes) != digest {
            return Err(ImageError::CorruptBlob {
                digest: digest.to_string(),
            });
        }
        Ok(bytes)
    }

    fn image_info(&self, entry: &Descriptor, name: &str) -> Result<ImageInfo, ImageError> {
        let manifest: Manifest = self.read_json_blob(&entry.digest)?;
        let config: ImageConfig = self.read_json_blob(&manifest.config.digest)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(self.layer_count_mismatch(
                &entry.digest,
                manifest.layers.len(),
                config.rootfs.diff_ids.len(),
            ));
        }
        Ok(ImageInfo {
            reference: name.to_string(),
            id: entry.digest.clone(),
            created: config.created.unwrap_or_default(),
            size: manifest.layers.iter().map(|l| l.size).sum(),
            layers: config.rootfs.diff_ids,
        })
    }

    fn layer_count_mismatch(&self, manifest: &str, layers: usize, diff_ids: usize) -> ImageError {
        let path = self
            .blob_path(manifest)
            .unwrap_or_else(|_| self.index_path());
        corrupt(
            &path,
            format!("the manifest has {layers} layers but its config {diff_ids} diff ids"),
        )
    }

    // ---- unpacked layers ----

    /// Returns the unpacked `rootfs/` of a layer, unpacking it first if
    /// needed: into a temp dir, `complete` written last, renamed into place.
    fn ensure_layer(
        &self,
        layer: &Descriptor,
        diff_id: &str,
        unpacker: &dyn LayerUnpacker,
        verify: bool,
    ) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(diff_id).ok_or_else(|| {
            corrupt(
                &self.index_path(),
                format!("diff id {diff_id:?} is not sha256:<64 hex digits>"),
            )
        })?;
        let layers = self.layers_dir();
        let dir = layers.join(hex);
        if dir.join(COMPLETE).exists() {
            return Ok(dir.join("rootfs"));
        }
        if fs::symlink_metadata(&dir).is_ok() {
            // A half-made layer from something that did not use a temp name.
            trash_and_remove(&dir)?;
        }
        let blob = self.blob_path(&layer.digest)?;
        if !blob.exists() {
            return Err(ImageError::MissingBlob {
                digest: layer.digest.clone(),
            });
        }
        if verify {
            let found = digest_layer(&blob, None)?;
            let intact = found.digest == layer.digest
                && found.size == layer.size
                && found.diff_id.as_deref() == Ok(diff_id);
            if !intact {
                return Err(ImageError::CorruptBlob {
                    digest: layer.digest.clone(),
                });
            }
        }
        let tmp = layers.join(tmp_name(hex, ""));
        let result = self.unpack_into(&blob, &tmp, unpacker);
        if let Err(e) = result {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &dir) {
            Ok(()) => fsync_dir(&layers)?,
            // Another process finished the same layer first; theirs is as good.
            Err(_) if dir.join(COMPLETE).exists() => remove_tree(&tmp)?,
            Err(e) => {
                let _ = remove_tree(&tmp);
                return Err(ImageError::io(format!("rename into {}", dir.display()), e));
            }
        }
        Ok(dir.join("rootfs"))
    }

    fn unpack_into(
        &self,
        blob: &Path,
        tmp: &Path,
        unpacker: &dyn LayerUnpacker,
    ) -> Result<(), ImageError> {
        let rootfs = tmp.join("rootfs");
        for dir in [tmp, rootfs.as_path()] {
            fs::create_dir(dir)
                .map_err(|e| ImageError::io(format!("create {}", dir.display()), e))?;
        }
        unpacker.unpack(blob, &rootfs)?;
        // Written last: its presence means the tree above is whole.
        let marker = tmp.join(COMPLETE);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| ImageError::io(format!("create {}", marker.display()), e))?;
        fsync_dir(tmp)
    }

    // ---- garbage ----

    /// What the index still needs. Fails (and so stops a sweep) if any
    /// remaining manifest or config cannot be read, since its blobs could
    /// not be told apart from garbage.
    fn marks(&self, index: &Index) -> Result<Marks, ImageError> {
        let mut marks = Marks {
            blobs: HashSet::new(),
            diff_ids: HashSet::new(),
        };
        let add = |set: &mut HashSet<String>, digest: &str| {
            if let Some(hex) = digest_hex(digest) {
                set.insert(hex.to_string());
            }
        };
        for entry in &index.manifests {
            add(&mut marks.blobs, &entry.digest);
            let manifest: Manifest = self.read_json_blob(&entry.digest)?;
            add(&mut marks.blobs, &manifest.config.digest);
            for layer in &manifest.layers {
                add(&mut marks.blobs, &layer.digest);
            }
            let config: ImageConfig = self.read_json_blob(&manifest.config.digest)?;
            for diff_id in &config.rootfs.diff_ids {
                add(&mut marks.diff_ids, diff_id);
            }
        }
        Ok(marks)
    }

    /// Deletes blobs the index does not reference and, when `keep_layers`
    /// is given, unpacked layers it does not reference and that are not in
    /// it. Callers hold the lock.
    fn sweep(
        &self,
        index: &Index,
        keep_layers: Option<&HashSet<String>>,
    ) -> Result<(), ImageError> {
        let marks = self.marks(index)?;
        for (dir, is_layers) in [(self.blobs_dir(), false), (self.layers_dir(), true)] {
            if is_layers && keep_layers.is_none() {
                continue;
            }
            let entries = fs::read_dir(&dir)
                .map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| ImageError::io(format!("read {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains(TMP_MARK) {
                    continue;
                }
                let keep = if is_layers {
                    marks.diff_ids.contains(&name) || keep_layers.is_some_and(|k| k.contains(&name))
                } else {
                    marks.blobs.contains(&name)
                };
                if !keep {
                    tracing::debug!("deleting unreferenced {}", entry.path().display());
                    trash_and_remove(&entry.path())?;
                }
            }
            fsync_dir(&dir)?;
        }
        Ok(())
    }

    /// After a failed import: deletes the blobs it wrote unless an index
    /// entry needs them (the same content may already be an image).
    fn drop_unreferenced_blobs(&self, written: &[String]) {
        let marks = match self.read_index().and_then(|index| self.marks(&index)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("left blobs of a failed import in place: {e}");
                return;
            }
        };
        for digest in written {
            if let Some(hex) = digest_hex(digest) {
                if !marks.blobs.contains(hex) {
                    let _ = remove_tree(&self.blobs_dir().join(hex));
                }
            }
        }
    }
}

/// Docker's layer media types as their OCI equivalents, for manifests moat writes.
fn oci_layer_media(media: &str) -> &str {
    match media {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => MEDIA_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar" => MEDIA_LAYER_TAR,
        other => other,
    }
}

fn corrupt(path: &Path, reason: String) -> ImageError {
    ImageError::CorruptStore {
        path: path.to_path_buf(),
        reason,
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec_pretty(value).map_err(|e| ImageError::io("encode JSON", io::Error::other(e)))
}

/// What the index alone says about an image whose blobs are damaged.
fn bare_info(entry: &Descriptor, name: &str) -> ImageInfo {
    ImageInfo {
        reference: name.to_string(),
        id: entry.digest.clone(),
        created: String::new(),
        size: 0,
        layers: Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "layout_tests.rs"]
mod tests;

//! The model store, in Docker Model Runner's layout and media types, so that
//! a model moves between moat and DMR through any OCI registry:
//!
//! ```text
//! ROOT/layout.json              {"version":"1.0.0"}
//! ROOT/models.json              the index: id (manifest digest), tags, files
//! ROOT/manifests/sha256/<hex>   OCI image manifests
//! ROOT/blobs/sha256/<hex>       configs, GGUF weights, licenses, chat templates
//! ROOT/incoming/                packages being written, downloads being resumed
//! ```
//!
//! Nothing enters `blobs/` unchecked: a file is copied into `incoming/`
//! while it is hashed, its GGUF header is checked by [`crate::gguf`], and only
//! a whole model is renamed into place and named in the index, so that a
//! corrupt file or a broken pull leaves no half model behind. Every change
//! to the index happens under an flock of `models.lock`, which serialises
//! the daemon's threads as well as separate processes.

mod config;
mod error;
mod huggingface;
mod index;
mod reference;
mod registry;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use config::{
    ModelConfig, ANNOTATION_FILEPATH, MEDIA_CHAT_TEMPLATE, MEDIA_GGUF, MEDIA_LICENSE,
    MEDIA_MODEL_CONFIG,
};
pub use error::StoreError;
pub use huggingface::{HubConfig, HubReference};
pub use moat_images::registry::{PushSummary, RegistryOptions, Transfer};
pub use reference::{ModelReference, DEFAULT_NAMESPACE, DEFAULT_REGISTRY};

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use moat_images::fsutil::{fsync_dir, remove_tree, sweep_stale_tmp, write_atomic};
use moat_images::oci::{digest_hex, Descriptor, Manifest, MEDIA_MANIFEST};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::gguf::{self, GgufInfo};
use config::{gguf_config, ConfigDescriptor, ConfigFile, RootFs};
use index::{Index, IndexEntry};

const LAYOUT_VERSION: &str = "1.0.0";
/// Manifests, configs, licenses and templates are small; a larger one is damage.
const MAX_SMALL_BLOB: u64 = 16 << 20;
/// How long a partial download waits in `incoming/` for a pull to resume it.
const INCOMING_KEPT: Duration = Duration::from_secs(24 * 3600);
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A stored model, as the engine and the APIs use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// `sha256:<hex>` of the manifest, as DMR's ids.
    pub id: String,
    /// Normalised references (`ai/smollm2:135M-Q4_1`); empty when untagged.
    pub tags: Vec<String>,
    /// When it was packaged, in seconds since the epoch (0 when unknown).
    pub created: i64,
    pub config: ModelConfig,
    /// Absolute paths of the GGUF blobs, in shard order.
    pub gguf_paths: Vec<PathBuf>,
    /// The text of each license layer.
    pub license: Vec<String>,
    /// The text of the chat template layer, when the model was packaged with
    /// one; otherwise the engine uses the GGUF's own `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Bytes of all layers.
    pub size: u64,
}

/// A file to package: its name (kept as the layer's file path annotation)
/// and its bytes, from a path or from a descriptor the CLI passed.
pub struct Source {
    pub name: String,
    pub reader: Box<dyn Read + Send>,
    /// Its length when known (a file), for progress bars.
    pub size: Option<u64>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, StoreError> {
        let file =
            File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Source::file(name, file))
    }

    /// An open file (a descriptor the CLI passed), read from where it is.
    pub fn file(name: impl Into<String>, file: File) -> Source {
        let size = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        Source {
            name: name.into(),
            reader: Box::new(file),
            size,
        }
    }

    pub fn new(name: impl Into<String>, reader: impl Read + Send + 'static) -> Source {
        Source {
            name: name.into(),
            reader: Box::new(reader),
            size: None,
        }
    }
}

/// What `moat model package` adds besides the weights.
#[derive(Default)]
pub struct PackageOptions {
    pub licenses: Vec<Source>,
    pub context_size: Option<u64>,
    pub chat_template: Option<Source>,
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    /// Tags taken off.
    pub untagged: Vec<String>,
    /// The id of the model deleted (with its blobs no other model needs).
    pub deleted: Option<String>,
}

/// The store at one root; cheap to clone, safe to share between threads.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

/// Held while the index may change or blobs are deleted.
struct StoreLock(#[allow(dead_code)] Flock<File>);

/// A file copied into `incoming/`, hashed on the way.
struct Staged {
    file: tempfile::NamedTempFile,
    name: String,
    digest: String,
    size: u64,
}

/// How a reference matched an index entry.
enum Found {
    Tag(String),
    Id,
}

impl ModelStore {
    /// Opens (creating if needed) the store at `root`, and clears what
    /// crashed writers and abandoned downloads left there.
    pub fn open(root: &Path) -> Result<ModelStore, StoreError> {
        let store = ModelStore {
            root: root.to_path_buf(),
        };
        for dir in [
            store.blobs_dir(),
            store.manifests_dir(),
            store.incoming_dir(),
        ] {
            fs::create_dir_all(&dir)
                .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        }
        let _lock = store.lock()?;
        let layout = root.join("layout.json");
        match fs::read(&layout) {
            Ok(bytes) => {
                #[derive(Deserialize)]
                struct Layout {
                    version: String,
                }
                let found: Layout = serde_json::from_slice(&bytes).map_err(|e| {
                    corrupt(&layout, format!("it is not a model store layout file: {e}"))
                })?;
                if !found.version.starts_with("1.") {
                    return Err(corrupt(
                        &layout,
                        format!(
                            "layout version {} is not the supported {LAYOUT_VERSION}",
                            found.version
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let text = serde_json::json!({ "version": LAYOUT_VERSION }).to_string();
                write_atomic(root, "layout.json", text.as_bytes())?;
            }
            Err(e) => return Err(StoreError::io(format!("read {}", layout.display()), e)),
        }
        if store.index_path().exists() {
            store.read_index()?;
        } else {
            store.write_index(&Index::default())?;
        }
        let now = SystemTime::now();
        for dir in [root.to_path_buf(), store.blobs_dir(), store.manifests_dir()] {
            for removed in sweep_stale_tmp(&dir, now) {
                tracing::info!("removed left-over temp {}", removed.display());
            }
        }
        store.sweep_incoming(now);
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every model, newest first; one whose files are damaged is listed with
    /// what the index knows, so that it can be found and removed.
    pub fn list(&self) -> Result<Vec<Model>, StoreError> {
        let index = self.read_index()?;
        let mut models: Vec<Model> = index
            .models
            .iter()
            .map(|entry| {
                self.model(entry).unwrap_or_else(|e| {
                    tracing::warn!("model {} is damaged: {e}", entry.id);
                    Model {
                        id: entry.id.clone(),
                        tags: entry.tags.clone(),
                        created: 0,
                        config: ModelConfig::default(),
                        gguf_paths: Vec::new(),
                        license: Vec::new(),
                        chat_template: None,
                        size: 0,
                    }
                })
            })
            .collect();
        models.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(models)
    }

    /// The model a tag (`smollm2`, `ai/smollm2:135M-Q4_1`, `NAME@sha256:…`)
    /// or an id (`sha256:<hex>`, or 12 or more of its hex digits) names.
    pub fn get(&self, reference: &str) -> Result<Model, StoreError> {
        let index = self.read_index()?;
        let (at, _) = resolve(&index, reference)?;
        self.model(&index.models[at])
    }

    /// Packages GGUF files (one, or every shard of a split model, in any
    /// order) as a model named `reference`. Each file is copied into the
    /// store while it is hashed and checked before anything is named; on
    /// any failure nothing is left behind.
    pub fn package(
        &self,
        ggufs: Vec<Source>,
        reference: &str,
        opts: PackageOptions,
    ) -> Result<Model, StoreError> {
        self.package_with_progress(ggufs, reference, opts, &|_| {})
    }

    /// `package`, reporting the bytes copied of each file.
    pub fn package_with_progress(
        &self,
        ggufs: Vec<Source>,
        reference: &str,
        opts: PackageOptions,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Model, StoreError> {
        let target = ModelReference::parse(reference)?;
        if target.digest().is_some() {
            return Err(StoreError::InvalidReference {
                reference: reference.to_string(),
                reason: "a package is named by a tag, not a digest".into(),
            });
        }
        if ggufs.is_empty() {
            return Err(StoreError::BadPackage(
                "no GGUF file to package; give one with --gguf FILE".into(),
            ));
        }
        let mut staged_weights = Vec::new();
        for source in ggufs {
            staged_weights.push(self.stage(source, progress)?);
        }
        let mut licenses = Vec::new();
        for source in opts.licenses {
            licenses.push(self.stage(source, progress)?);
        }
        let template = match opts.chat_template {
            Some(source) => Some(self.stage(source, progress)?),
            None => None,
        };
        self.package_staged(
            staged_weights,
            licenses,
            template,
            opts.context_size,
            &target,
        )
    }

    /// Checks staged GGUF files (and licenses and a template) and commits
    /// them as one model named `target`: the part of packaging after the
    /// bytes are in `incoming/`, shared by `package` and Hugging Face pulls.
    fn package_staged(
        &self,
        staged_weights: Vec<Staged>,
        licenses: Vec<Staged>,
        template: Option<Staged>,
        context_size: Option<u64>,
        target: &ModelReference,
    ) -> Result<Model, StoreError> {
        let mut weights = Vec::new();
        for staged in staged_weights {
            let info = gguf::read_file(staged.file.path()).map_err(|e| StoreError::BadGguf {
                name: staged.name.clone(),
                reason: e.to_string(),
            })?;
            weights.push((staged, info));
        }
        let weights = order_shards(weights)?;
        if let Some(template) = &template {
            check_template(template)?;
        }

        let infos: Vec<GgufInfo> = weights.iter().map(|(_, info)| info.clone()).collect();
        let weights_size = weights.iter().map(|(s, _)| s.size).sum();
        let config = gguf_config(&infos, weights_size, context_size);
        let staged: Vec<(Staged, &str)> = weights
            .into_iter()
            .map(|(s, _)| (s, MEDIA_GGUF))
            .chain(licenses.into_iter().map(|s| (s, MEDIA_LICENSE)))
            .chain(template.into_iter().map(|s| (s, MEDIA_CHAT_TEMPLATE)))
            .collect();
        let layers: Vec<Descriptor> = staged
            .iter()
            .map(|(s, media)| {
                let mut d = Descriptor::new(media, s.digest.clone(), s.size);
                d.annotations
                    .insert(ANNOTATION_FILEPATH.to_string(), s.name.clone());
                d
            })
            .collect();
        let config_file = ConfigFile {
            config,
            descriptor: ConfigDescriptor {
                created: Some(moat_images::now_rfc3339()),
                extra: serde_json::Map::new(),
            },
            rootfs: RootFs {
                kind: "rootfs".to_string(),
                diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
            },
            extra: serde_json::Map::new(),
        };
        let config_bytes = to_json(&config_file)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.to_string()),
            config: Descriptor::new(
                MEDIA_MODEL_CONFIG,
                sha256_digest(&config_bytes),
                config_bytes.len() as u64,
            ),
            layers,
            extra: serde_json::Map::new(),
        };
        let manifest_bytes = to_json(&manifest)?;
        let blobs = staged.into_iter().map(|(s, _)| s).collect();
        self.commit(
            blobs,
            &manifest,
            &config_bytes,
            &manifest_bytes,
            &target.to_string(),
        )
    }

    /// Gives the model `source` names the tag `target` too, taking it off
    /// any other model, as `docker model tag` does.
    pub fn tag(&self, source: &str, target: &str) -> Result<Model, StoreError> {
        let tag = ModelReference::parse(target)?;
        if tag.digest().is_some() {
            return Err(StoreError::InvalidReference {
                reference: target.to_string(),
                reason: "a tag cannot pin a digest".into(),
            });
        }
        let tag = tag.to_string();
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let (at, _) = resolve(&index, source)?;
        index.untag(&tag);
        index.models[at].tags.push(tag);
        self.write_index(&index)?;
        self.model(&index.models[at])
    }

    /// Removes a tag, and the model with it when no tag is left. A model
    /// named by its id loses all its tags, which takes `force` when it has
    /// more than one. Blobs go only when no other model needs them.
    pub fn remove(&self, reference: &str, force: bool) -> Result<Removed, StoreError> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let (at, found) = resolve(&index, reference)?;
        let entry = &mut index.models[at];
        let mut removed = Removed::default();
        match found {
            Found::Tag(tag) => {
                entry.tags.retain(|t| *t != tag);
                removed.untagged.push(tag);
            }
            Found::Id => {
                if entry.tags.len() > 1 && !force {
                    return Err(StoreError::MultipleTags {
                        id: entry.id.clone(),
                        tags: entry.tags.clone(),
                    });
                }
                removed.untagged = std::mem::take(&mut entry.tags);
            }
        }
        if !entry.tags.is_empty() {
            self.write_index(&index)?;
            return Ok(removed);
        }
        let gone = index.models.remove(at);
        let needed = self.blobs_needed_by(&gone);
        self.write_index(&index)?;
        removed.deleted = Some(gone.id.clone());
        // The index no longer names it; what a failed delete leaves is only
        // disk space, which the next removal of a sharing model frees.
        if let Err(e) = self.delete_unreferenced(&index, &needed, Some(&gone.id)) {
            tracing::warn!("could not delete the files of model {}: {e}", gone.id);
        }
        Ok(removed)
    }

    /// Bytes the store takes on disk, partial downloads included.
    pub fn disk_usage(&self) -> Result<u64, StoreError> {
        fn walk(dir: &Path) -> io::Result<u64> {
            let mut total = 0;
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    total += walk(&entry.path())?;
                } else if meta.is_file() {
                    total += meta.len();
                }
            }
            Ok(total)
        }
        walk(&self.root).map_err(|e| StoreError::io(format!("read {}", self.root.display()), e))
    }

    /// Where partial downloads and packages being written live.
    pub fn incoming_dir(&self) -> PathBuf {
        self.root.join("incoming")
    }

    /// The path of the blob with `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest_hex(digest).ok_or_else(|| {
            corrupt(
                &self.index_path(),
                format!("digest {digest:?} is not sha256:<64 hex digits>"),
            )
        })?;
        Ok(self.blobs_dir().join(hex))
    }

    // ---- paths and the index ----

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests").join("sha256")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("models.json")
    }

    fn manifest_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        let hex = digest_hex(id).ok_or_else(|| {
            corrupt(
                &self.index_path(),
                format!("model id {id:?} is not sha256:<64 hex digits>"),
            )
        })?;
        Ok(self.manifests_dir().join(hex))
    }

    fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("models.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map(StoreLock)
            .map_err(|(_, errno)| StoreError::io(format!("lock {}", path.display()), errno.into()))
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        let bytes =
            fs::read(&path).map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
        let mut index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(&path, format!("it is not a models index: {e}")))?;
        // DMR keeps tags as they were typed (`ai/smollm2`); one spelling here.
        for entry in &mut index.models {
            for tag in &mut entry.tags {
                if let Ok(r) = ModelReference::parse(tag) {
                    *tag = r.to_string();
                }
            }
        }
        Ok(index)
    }

    /// Callers hold the lock.
    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| StoreError::io("encode models.json", io::Error::other(e)))?;
        Ok(write_atomic(&self.root, "models.json", &bytes)?)
    }

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

    // ---- reading models ----

    fn model(&self, entry: &IndexEntry) -> Result<Model, StoreError> {
        let manifest = self.read_manifest(&entry.id)?;
        let config: ConfigFile = {
            let path = self.blob_path(&manifest.config.digest)?;
            let bytes = self.read_small_blob(&manifest.config.digest)?;
            serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(&path, format!("it is not a model config: {e}")))?
        };
        let mut model = Model {
            id: entry.id.clone(),
            tags: entry.tags.clone(),
            created: config
                .descriptor
                .created
                .as_deref()
                .and_then(parse_time)
                .unwrap_or(0),
            config: config.config,
            gguf_paths: Vec::new(),
            license: Vec::new(),
            chat_template: None,
            size: manifest.layers.iter().map(|l| l.size).sum(),
        };
        for layer in &manifest.layers {
            let path = self.blob_path(&layer.digest)?;
            match layer.media_type.as_str() {
                MEDIA_GGUF => {
                    if !fs::metadata(&path).is_ok_and(|m| m.len() == layer.size) {
                        return Err(StoreError::MissingBlob {
                            digest: layer.digest.clone(),
                        });
                    }
                    model.gguf_paths.push(path);
                }
                MEDIA_LICENSE => model.license.push(self.read_text(&layer.digest)?),
                MEDIA_CHAT_TEMPLATE => model.chat_template = Some(self.read_text(&layer.digest)?),
                _ => {}
            }
        }
        Ok(model)
    }

    fn read_manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(id)?;
        let bytes = read_checked(&path, id)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(&path, format!("it is not an OCI manifest: {e}")))
    }

    /// The bytes of a small blob, checked against its digest.
    fn read_small_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        read_checked(&self.blob_path(digest)?, digest)
    }

    fn read_text(&self, digest: &str) -> Result<String, StoreError> {
        let bytes = self.read_small_blob(digest)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    // ---- writing models ----

    /// Copies `source` into `incoming/`, hashing it on the way.
    fn stage(
        &self,
        mut source: Source,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Staged, StoreError> {
        let incoming = self.incoming_dir();
        let mut file = tempfile::Builder::new()
            .prefix("package-")
            .tempfile_in(&incoming)
            .map_err(|e| StoreError::io(format!("create a file in {}", incoming.display()), e))?;
        let write_err = |e| StoreError::io(format!("write {}", file_label(&source.name)), e);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut last = Instant::now();
        {
            let mut out = BufWriter::with_capacity(1 << 20, file.as_file_mut());
            loop {
                let n = match source.reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::io(format!("read {}", source.name), e)),
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(write_err)?;
                size += n as u64;
                if let Some(total) = source.size.filter(|_| last.elapsed() >= PROGRESS_EVERY) {
                    last = Instant::now();
                    progress(Transfer::Bytes {
                        id: source.name.clone(),
                        done: size.min(total),
                        total,
                    });
                }
            }
            out.flush().map_err(write_err)?;
        }
        file.as_file().sync_all().map_err(write_err)?;
        progress(Transfer::Bytes {
            id: source.name.clone(),
            done: size,
            total: size,
        });
        Ok(Staged {
            file,
            name: source.name,
            digest: format!("sha256:{}", hex::encode(hasher.finalize())),
            size,
        })
    }

    /// Moves staged blobs into `blobs/`, writes the config and the manifest,
    /// and names the model `tag`, all under the lock; on failure, removes
    /// what it added that no model needs.
    fn commit(
        &self,
        staged: Vec<Staged>,
        manifest: &Manifest,
        config_bytes: &[u8],
        manifest_bytes: &[u8],
        tag: &str,
    ) -> Result<Model, StoreError> {
        let id = sha256_digest(manifest_bytes);
        let _lock = self.lock()?;
        let mut added = Vec::new();
        let result = (|| {
            for s in staged {
                let target = self.blob_path(&s.digest)?;
                // The same bytes are already stored (and were checked then).
                if fs::metadata(&target).is_ok_and(|m| m.len() == s.size) {
                    continue;
                }
                s.file.persist(&target).map_err(|e| {
                    StoreError::io(format!("move {} into the store", s.name), e.error)
                })?;
                added.push(s.digest);
            }
            self.finish_commit(manifest, config_bytes, manifest_bytes, &id, tag)
        })();
        if result.is_err() {
            let index = self.read_index().unwrap_or_default();
            let manifest_id = Some(id.as_str());
            let mut candidates: HashSet<String> = added.into_iter().collect();
            candidates.insert(manifest.config.digest.clone());
            if let Err(e) = self.delete_unreferenced(&index, &candidates, manifest_id) {
                tracing::warn!("left the files of a failed package in place: {e}");
            }
        }
        result
    }

    /// The part of a commit after the layer blobs are in place: config,
    /// manifest, index. Callers hold the lock.
    fn finish_commit(
        &self,
        manifest: &Manifest,
        config_bytes: &[u8],
        manifest_bytes: &[u8],
        id: &str,
        tag: &str,
    ) -> Result<Model, StoreError> {
        for layer in &manifest.layers {
            if !fs::metadata(self.blob_path(&layer.digest)?).is_ok_and(|m| m.len() == layer.size) {
                return Err(StoreError::MissingBlob {
                    digest: layer.digest.clone(),
                });
            }
        }
        fsync_dir(&self.blobs_dir())?;
        let config_hex = digest_hex(&manifest.config.digest).unwrap_or_default();
        write_atomic(&self.blobs_dir(), config_hex, config_bytes)?;
        let manifest_hex = digest_hex(id).unwrap_or_default();
        write_atomic(&self.manifests_dir(), manifest_hex, manifest_bytes)?;
        let mut index = self.read_index()?;
        let files = manifest
            .layers
            .iter()
            .map(|l| l.digest.clone())
            .chain(std::iter::once(manifest.config.digest.clone()))
            .collect();
        index.add(
            IndexEntry {
                id: id.to_string(),
                files,
                ..IndexEntry::default()
            },
            Some(tag),
        );
        self.write_index(&index)?;
        let at = index
            .models
            .iter()
            .position(|m| m.id == id)
            .ok_or_else(|| corrupt(&self.index_path(), format!("{id} vanished from it")))?;
        self.model(&index.models[at])
    }

    // ---- deleting ----

    /// The blobs a model's manifest and index entry name.
    fn blobs_needed_by(&self, entry: &IndexEntry) -> HashSet<String> {
        let mut blobs: HashSet<String> = entry.files.iter().cloned().collect();
        if let Ok(manifest) = self.read_manifest(&entry.id) {
            blobs.insert(manifest.config.digest.clone());
            blobs.extend(manifest.layers.into_iter().map(|l| l.digest));
        }
        blobs
    }

    /// Deletes those of `candidates` (and the manifest `manifest_id`) that no
    /// model of `index` needs. Callers hold the lock.
    fn delete_unreferenced(
        &self,
        index: &Index,
        candidates: &HashSet<String>,
        manifest_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut needed = HashSet::new();
        for entry in &index.models {
            needed.extend(self.blobs_needed_by(entry));
        }
        for digest in candidates.difference(&needed) {
            remove_tree(&self.blob_path(digest)?)?;
        }
        fsync_dir(&self.blobs_dir())?;
        if let Some(id) = manifest_id {
            if !index.models.iter().any(|m| m.id == id) {
                remove_tree(&self.manifest_path(id)?)?;
                fsync_dir(&self.manifests_dir())?;
            }
        }
        Ok(())
    }
}

/// Finds the entry a reference names: by tag first, then by id.
fn resolve(index: &Index, reference: &str) -> Result<(usize, Found), StoreError> {
    let parsed = ModelReference::parse(reference);
    if let Ok(r) = &parsed {
        let tag = r.to_string();
        if let Some(at) = index.models.iter().position(|m| m.tags.contains(&tag)) {
            return Ok((at, Found::Tag(tag)));
        }
        if let Some(digest) = r.digest() {
            if let Some(at) = index.models.iter().position(|m| m.id == digest) {
                return Ok((at, Found::Id));
            }
        }
    }
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    let id_like = hex.len() >= 12
        && hex.len() <= 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if id_like {
        let matching: Vec<usize> = index
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.id.strip_prefix("sha256:")
                    .is_some_and(|id| id.starts_with(hex))
            })
            .map(|(i, _)| i)
            .collect();
        match matching.as_slice() {
            [at] => return Ok((*at, Found::Id)),
            [] => {}
            many => {
                return Err(StoreError::AmbiguousId {
                    prefix: reference.to_string(),
                    count: many.len(),
                })
            }
        }
    }
    match parsed {
        Err(e) if !id_like => Err(e),
        _ => Err(StoreError::NotFound {
            reference: reference.to_string(),
        }),
    }
}

/// Puts the shards of a split model in order, and makes sure that they are
/// all there and of one model; a single file must not be one shard of many.
fn order_shards(
    mut weights: Vec<(Staged, GgufInfo)>,
) -> Result<Vec<(Staged, GgufInfo)>, StoreError> {
    let split = |info: &GgufInfo| (info.uint("split.no"), info.uint("split.count"));
    let n = weights.len() as u64;
    if let [(staged, info)] = weights.as_slice() {
        if let (no, Some(count)) = split(info) {
            if count > 1 {
                return Err(StoreError::BadPackage(format!(
                    "{} is shard {} of {count} of a split model; give every shard with --gguf",
                    staged.name,
                    no.unwrap_or(0) + 1
                )));
            }
        }
        return Ok(weights);
    }
    for (staged, info) in &weights {
        match split(info) {
            (Some(no), Some(count)) if count == n && no < n => {}
            (Some(_), Some(count)) => {
                return Err(StoreError::BadPackage(format!(
                    "{} is a shard of a model split in {count}, but {n} files were given; give every shard of one model with --gguf",
                    staged.name
                )))
            }
            _ => {
                return Err(StoreError::BadPackage(format!(
                    "{} is not a shard of a split model (it has no split.no and split.count); package one GGUF file, or every shard of one split model",
                    staged.name
                )))
            }
        }
    }
    weights.sort_by_key(|(_, info)| info.uint("split.no").unwrap_or(0));
    for (i, pair) in weights.windows(2).enumerate() {
        if pair[0].1.uint("split.no") == pair[1].1.uint("split.no") {
            return Err(StoreError::BadPackage(format!(
                "{} and {} are both shard {} and another shard is missing; give every shard of one model with --gguf",
                pair[0].0.name,
                pair[1].0.name,
                i + 1
            )));
        }
    }
    Ok(weights)
}

/// A chat template is Jinja text of a few KiB.
fn check_template(staged: &Staged) -> Result<(), StoreError> {
    let bad = |reason: &str| {
        StoreError::BadPackage(format!(
            "chat template {} {reason}; give a Jinja template file with --chat-template",
            staged.name
        ))
    };
    if staged.size > MAX_SMALL_BLOB {
        return Err(bad("is larger than 16 MiB"));
    }
    let bytes = fs::read(staged.file.path())
        .map_err(|e| StoreError::io(format!("read {}", staged.name), e))?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(bad("is not UTF-8 text"));
    }
    Ok(())
}

/// Reads a small file and checks it against `digest`.
fn read_checked(path: &Path, digest: &str) -> Result<Vec<u8>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::MissingBlob {
                digest: digest.to_string(),
            })
        }
        Err(e) => return Err(StoreError::io(format!("open {}", path.display()), e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_BLOB + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_SMALL_BLOB {
        return Err(corrupt(path, "it is larger than 16 MiB".into()));
    }
    let actual = sha256_digest(&bytes);
    if actual != digest {
        return Err(corrupt(
            path,
            format!("its content hashes to {actual}, not {digest}"),
        ));
    }
    Ok(bytes)
}

/// RFC 3339 as Go writes it (`2025-03-24T11:09:41.123+01:00`, or `…Z`), in
/// seconds since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    let (base, offset) = match s.strip_suffix('Z') {
        Some(base) => (base, 0i64),
        None => {
            let at = s.len().checked_sub(6)?;
            if !s.is_char_boundary(at) {
                return None;
            }
            let (base, zone) = s.split_at(at);
            let sign = match zone.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours: i64 = zone.get(1..3)?.parse().ok()?;
            let minutes: i64 = zone.get(4..6)?.parse().ok()?;
            (base, sign * (hours * 3600 + minutes * 60))
        }
    };
    let time = humantime::parse_rfc3339_weak(base).ok()?;
    let secs = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok().map(|s| s - offset)
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::io("encode JSON", io::Error::other(e)))
}

fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

fn file_label(name: &str) -> String {
    format!("the store's copy of {name}")
}

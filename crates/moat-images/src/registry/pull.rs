//! Registry to store: manifests resolved and checked, layers downloaded
//! (resumably) into `incoming/`, the result named (by the store's
//! `commit_pull`) once every blob is whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use nix::fcntl::{Flock, FlockArg};
use oci_client::errors::OciDistributionError;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    runtime, short, PulledBlobs, RegistryOptions, RegistryStore, Session, Transfer, PARALLEL_BLOBS,
    PROGRESS_EVERY,
};
use crate::digest::sha256_digest;
use crate::error::ImageError;
use crate::oci::{
    digest_hex, oci_arch, Descriptor, Manifest, MEDIA_DOCKER_LIST, MEDIA_INDEX, MEDIA_MANIFEST,
};
use crate::reference::Reference;

#[derive(Deserialize)]
struct IndexDoc {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct MediaTypeOnly {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// Pulls `reference` from its registry into `store` and names it so. A
/// name on Docker Hub is asked of the mirrors first; a mirror that fails
/// is passed over (and said so), as Docker does.
pub fn pull<S: RegistryStore>(
    store: &S,
    reference: &Reference,
    opts: &RegistryOptions,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<S::Pulled, S::Error>
where
    S::Error: std::fmt::Display,
{
    let on_hub = reference
        .registry()
        .is_some_and(|r| super::DOCKER_HUB.contains(&r));
    for mirror in opts.mirrors.iter().filter(|_| on_hub) {
        let session = Session::at(reference, mirror, opts)?;
        match runtime()?.block_on(pull_async(store, &session, progress)) {
            Ok(pulled) => return Ok(pulled),
            Err(e) => progress(Transfer::Step(format!(
                "mirror {mirror} could not give {reference} ({e}); trying the next"
            ))),
        }
    }
    let session = Session::new(reference, opts)?;
    runtime()?.block_on(pull_async(store, &session, progress))
}

async fn pull_async<S: RegistryStore>(
    store: &S,
    s: &Session<'_>,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<S::Pulled, S::Error> {
    progress(Transfer::Step(format!("resolving {}", s.reference)));
    let accepted = store.accepted_manifests();
    let (mut bytes, mut media_type) =
        fetch_manifest(s, &s.image, s.reference.digest.as_deref(), accepted).await?;
    if is_index(&media_type, &bytes) {
        let index: IndexDoc = serde_json::from_slice(&bytes)
            .map_err(|e| s.err(format!("its index does not parse: {e}")))?;
        let arch = oci_arch();
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| s.err(format!("the image has no linux/{arch} variant")))?;
        let by_digest = oci_client::Reference::with_digest(
            s.registry.clone(),
            s.reference.repository().to_string(),
            entry.digest.clone(),
        );
        progress(Transfer::Step(format!(
            "linux/{arch} is {}",
            short(&entry.digest)
        )));
        (bytes, media_type) = fetch_manifest(s, &by_digest, Some(&entry.digest), accepted).await?;
        if media_type.is_empty() {
            media_type = entry.media_type.clone();
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| s.err(format!("its manifest does not parse: {e}")))?;

    let config_bytes = fetch_small_blob(s, &manifest.config).await?;
    store.check_manifest(s.reference, &manifest, &config_bytes)?;
    let incoming = store.incoming_dir();
    fs::create_dir_all(&incoming)
        .map_err(|e| ImageError::io(format!("create {}", incoming.display()), e))?;
    let wanted: Vec<&Descriptor> = manifest.layers.iter().collect();
    futures_util::stream::iter(
        wanted
            .into_iter()
            .map(|layer| fetch_layer(store, s, layer, progress)),
    )
    .buffer_unordered(PARALLEL_BLOBS)
    .try_collect::<Vec<()>>()
    .await?;

    let mut fetched = Vec::new();
    for layer in &manifest.layers {
        let from = incoming.join(layer_hex(s, layer)?);
        if fs::metadata(&from).is_ok_and(|m| m.len() == layer.size) {
            fetched.push((layer.clone(), from));
        }
    }
    let media = if media_type.is_empty() {
        MEDIA_MANIFEST.to_string()
    } else {
        media_type
    };
    let manifest_digest = sha256_digest(&bytes);
    let pulled = store.commit_pull(
        s.reference,
        PulledBlobs {
            manifest_bytes: bytes,
            media_type: media,
            manifest,
            config_bytes,
            incoming: fetched,
        },
    )?;
    progress(Transfer::Step(format!(
        "pulled {} ({})",
        s.reference,
        short(&manifest_digest)
    )));
    Ok(pulled)
}

fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    if media_type == MEDIA_INDEX || media_type == MEDIA_DOCKER_LIST {
        return true;
    }
    serde_json::from_slice::<MediaTypeOnly>(bytes).is_ok_and(|m| {
        m.manifests.is_some()
            && m.media_type
                .as_deref()
                .is_none_or(|t| t == MEDIA_INDEX || t == MEDIA_DOCKER_LIST)
    })
}

/// A manifest's bytes and media type, checked against `want` (when the
/// reference names a digest) or against the digest the registry reports.
async fn fetch_manifest(
    s: &Session<'_>,
    image: &oci_client::Reference,
    want: Option<&str>,
    accepted: &[&str],
) -> Result<(Vec<u8>, String), ImageError> {
    let (bytes, reported) = s
        .client
        .pull_manifest_raw(image, &s.auth, accepted)
        .await
        .map_err(|e| match e {
            OciDistributionError::ImageManifestNotFoundError(_) => {
                s.err("the registry has no such image or tag; check the name and tag")
            }
            other => s.err(other),
        })?;
    let actual = sha256_digest(&bytes);
    let expected = want.unwrap_or(reported.as_str());
    if expected.starts_with("sha256:") && actual != expected {
        return Err(s.err(format!("the manifest's digest is {actual}, not {expected}")));
    }
    let media_type = serde_json::from_slice::<MediaTypeOnly>(&bytes)
        .ok()
        .and_then(|m| m.media_type)
        .unwrap_or_default();
    Ok((bytes.to_vec(), media_type))
}

async fn fetch_small_blob(s: &Session<'_>, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    s.client
        .pull_blob(&s.image, desc.digest.as_str(), &mut out)
        .await
        .map_err(|e| s.err(format!("blob {}: {e}", short(&desc.digest))))?;
    // pull_blob has checked the bytes against the digest.
    Ok(out)
}

fn layer_hex<'d>(s: &Session<'_>, layer: &'d Descriptor) -> Result<&'d str, ImageError> {
    digest_hex(&layer.digest)
        .ok_or_else(|| s.err(format!("layer digest {:?} is not sha256", layer.digest)))
}

/// Downloads one layer into `incoming/`, resuming a partial download, and
/// verifies it. A layer the store already has is not fetched.
async fn fetch_layer<S: RegistryStore>(
    store: &S,
    s: &Session<'_>,
    layer: &Descriptor,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<(), ImageError> {
    let hex = layer_hex(s, layer)?;
    let id = short(&layer.digest);
    let stored = store.blob_path(&layer.digest)?;
    let in_store = || fs::metadata(&stored).is_ok_and(|m| m.len() == layer.size);
    if in_store() {
        progress(Transfer::Step(format!("{id}: already in the store")));
        return Ok(());
    }
    let path = store.incoming_dir().join(hex);
    // Two pulls that need the same blob (two daemon threads) take turns on
    // its partial file instead of writing into it at once; the second then
    // finds it whole, or already moved into the store.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let file = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| ImageError::io(format!("lock {}", path.display()), errno.into()))?;
    if in_store() {
        // Another pull finished it meanwhile; what this open created is not needed.
        let _ = fs::remove_file(&path);
        progress(Transfer::Step(format!("{id}: already in the store")));
        return Ok(());
    }
    let mut have = file
        .metadata()
        .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?
        .len();
    if have > layer.size {
        file.set_len(0)
            .map_err(|e| ImageError::io(format!("truncate {}", path.display()), e))?;
        have = 0;
    }
    let (digest, size) = if have < layer.size {
        let response = if have > 0 {
            progress(Transfer::Step(format!(
                "{id}: resuming at {have} of {} bytes",
                layer.size
            )));
            s.client
                .pull_blob_stream_partial(&s.image, layer.digest.as_str(), have, None)
                .await
        } else {
            s.client
                .pull_blob_stream(&s.image, layer.digest.as_str())
                .await
                .map(oci_client::client::BlobResponse::Full)
        }
        .map_err(|e| s.err(format!("layer {id}: {e}")))?;
        let (stream, append) = match response {
            oci_client::client::BlobResponse::Partial(st) => (st, true),
            oci_client::client::BlobResponse::Full(st) => (st, false),
        };
        // Hashed as it arrives (after the part a broken pull left, when resuming).
        let mut hasher = Sha256::new();
        let mut done = 0;
        if append {
            (hasher, done) = hash_into(&path, Sha256::new())?;
        } else {
            file.set_len(0)
                .map_err(|e| ImageError::io(format!("truncate {}", path.display()), e))?;
        }
        let mut writer: &File = &file;
        writer
            .seek(io::SeekFrom::Start(done))
            .map_err(|e| ImageError::io(format!("seek {}", path.display()), e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, writer);
        let write_err = |e| ImageError::io(format!("write {}", path.display()), e);
        let mut last = Instant::now();
        let mut stream = stream.stream;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // What arrived stays on disk for the next pull to resume from.
                    out.flush().map_err(write_err)?;
                    return Err(s.err(format!("layer {id} broke off after {done} bytes ({e}); run the same command again to resume")));
                }
            };
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(write_err)?;
            done += chunk.len() as u64;
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                progress(Transfer::Bytes {
                    id: id.clone(),
                    done,
                    total: layer.size,
                });
            }
        }
        out.flush().map_err(write_err)?;
        out.get_ref().sync_data().map_err(write_err)?;
        (format!("sha256:{}", hex::encode(hasher.finalize())), done)
    } else {
        let (hasher, size) = hash_into(&path, Sha256::new())?;
        (format!("sha256:{}", hex::encode(hasher.finalize())), size)
    };
    if digest != layer.digest || size != layer.size {
        let _ = fs::remove_file(&path);
        return Err(s.err(format!(
            "layer {id} arrived as {size} bytes with digest {}, not {} bytes with {}; it was discarded",
            short(&digest),
            layer.size,
            id
        )));
    }
    progress(Transfer::Bytes {
        id,
        done: size,
        total: layer.size,
    });
    Ok(())
}

/// Feeds a file into `hasher`; returns it and the number of bytes read.
fn hash_into(path: &std::path::Path, mut hasher: Sha256) -> Result<(Sha256, u64), ImageError> {
    let mut file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::io(format!("read {}", path.display()), e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher, size))
}

//! OCI archives: an image layout in one tar file (`oci-layout`, `index.json`,
//! `blobs/sha256/…`), the format `skopeo copy oci-archive:` and
//! `docker load` read. `export` writes one image; `load` takes every named
//! image of an archive, verifying each blob before the store has it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::error::ImageError;
use crate::fsutil::{fsync_dir, tmp_name};
use crate::layout::{ImageInfo, ImageStore};
use crate::oci::{
    digest_hex, Descriptor, Index, Manifest, OciLayout, ANNOTATION_REF_NAME, LAYOUT_VERSION,
};
use crate::reference::Reference;

/// containerd's (and so Docker's) annotation for the full image name.
const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// index.json and manifests are small; anything bigger is not an archive of ours.
const MAX_JSON: u64 = 4 << 20;

fn append(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    size: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    tar.append_data(&mut h, path, data)
}

/// Writes the image `reference` as an OCI archive to `out`.
pub fn export(
    store: &ImageStore,
    reference: &Reference,
    out: impl Write,
) -> Result<(), ImageError> {
    let entry = store.entry(reference)?;
    let manifest_bytes = store.read_small_blob(&entry.digest)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| ImageError::CorruptStore {
            path: store.root().join("index.json"),
            reason: format!("manifest of {reference} does not parse: {e}"),
        })?;
    let fail = |e: io::Error| ImageError::io("write the OCI archive", e);
    let mut tar = tar::Builder::new(out);
    let layout = serde_json::to_vec(&OciLayout {
        image_layout_version: LAYOUT_VERSION.into(),
    })
    .map_err(|e| fail(io::Error::other(e)))?;
    append(&mut tar, "oci-layout", layout.len() as u64, &layout[..]).map_err(fail)?;
    let mut desc = Descriptor::new(&entry.media_type, entry.digest.clone(), entry.size);
    desc.annotations
        .insert(ANNOTATION_REF_NAME.into(), reference.tag.clone());
    desc.annotations
        .insert(ANNOTATION_IMAGE_NAME.into(), reference.to_string());
    let mut index = Index::empty();
    index.manifests.push(desc);
    let index_bytes = serde_json::to_vec_pretty(&index).map_err(|e| fail(io::Error::other(e)))?;
    append(
        &mut tar,
        "index.json",
        index_bytes.len() as u64,
        &index_bytes[..],
    )
    .map_err(fail)?;

    let mut seen = HashSet::new();
    let blobs = std::iter::once(&manifest.config).chain(manifest.layers.iter());
    let hex = digest_hex(&entry.digest).unwrap_or_default().to_string();
    append(
        &mut tar,
        &format!("blobs/sha256/{hex}"),
        manifest_bytes.len() as u64,
        &manifest_bytes[..],
    )
    .map_err(fail)?;
    for blob in blobs {
        if !seen.insert(blob.digest.clone()) {
            continue;
        }
        let path = store.blob_path(&blob.digest)?;
        let file = File::open(&path).map_err(|_| ImageError::MissingBlob {
            digest: blob.digest.clone(),
        })?;
        let size = file
            .metadata()
            .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?
            .len();
        let hex = digest_hex(&blob.digest).unwrap_or_default();
        append(&mut tar, &format!("blobs/sha256/{hex}"), size, file).map_err(fail)?;
    }
    tar.into_inner().and_then(|mut w| w.flush()).map_err(fail)
}

/// Loads every image an OCI archive names into the store. Blobs are
/// hashed on the way in and refused unless they match their name; names
/// come from `io.containerd.image.name`, or `org.opencontainers.image.ref.name`
/// when that is a whole reference.
pub fn load(store: &ImageStore, input: impl Read) -> Result<Vec<ImageInfo>, ImageError> {
    let staging = store.incoming_dir().join(tmp_name("load", ""));
    fs::create_dir_all(&staging)
        .map_err(|e| ImageError::io(format!("create {}", staging.display()), e))?;
    let result = load_into(store, input, &staging);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn bad(reason: impl Into<String>) -> ImageError {
    ImageError::BadLayer {
        path: "the OCI archive".into(),
        reason: reason.into(),
    }
}

fn load_into(
    store: &ImageStore,
    input: impl Read,
    staging: &Path,
) -> Result<Vec<ImageInfo>, ImageError> {
    let mut archive = tar::Archive::new(input);
    let mut index: Option<Index> = None;
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if entry.header().entry_type().is_dir() {
            continue;
        }
        if path == "index.json" {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_JSON)
                .read_to_end(&mut bytes)
                .map_err(|e| bad(e.to_string()))?;
            index =
                Some(serde_json::from_slice(&bytes).map_err(|e| bad(format!("index.json: {e}")))?);
        } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let digest = format!("sha256:{hex}");
            if digest_hex(&digest).is_none() {
                return Err(bad(format!("{path} is not named by a sha256 digest")));
            }
            let target = staging.join(hex);
            let mut file = File::create(&target)
                .map_err(|e| ImageError::io(format!("create {}", target.display()), e))?;
            let mut hasher = sha2::Sha256::default();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(|e| bad(e.to_string()))?;
                if n == 0 {
                    break;
                }
                sha2::Digest::update(&mut hasher, &buf[..n]);
                file.write_all(&buf[..n])
                    .map_err(|e| ImageError::io(format!("write {}", target.display()), e))?;
            }
            let actual = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)));
            if actual != digest {
                return Err(bad(format!(
                    "{path} does not match its digest (it is {actual})"
                )));
            }
        }
    }
    let index = index.ok_or_else(|| bad("it has no index.json; is it an OCI archive?"))?;
    let mut named = Vec::new();
    for desc in &index.manifests {
        let name = desc
            .annotations
            .get(ANNOTATION_IMAGE_NAME)
            .or_else(|| {
                desc.annotations
                    .get(ANNOTATION_REF_NAME)
                    .filter(|n| n.contains(['/', ':']))
            })
            .ok_or_else(|| {
                bad(format!(
                    "manifest {} has no image name (annotation {ANNOTATION_IMAGE_NAME})",
                    desc.digest
                ))
            })?;
        named.push((Reference::parse(name)?, desc.clone()));
    }
    let blobs_dir = store.root().join("blobs").join("sha256");
    let _lock = store.lock()?;
    let mut loaded = Vec::new();
    for (reference, desc) in named {
        let hex =
            digest_hex(&desc.digest).ok_or_else(|| bad(format!("bad digest {:?}", desc.digest)))?;
        let manifest_path = staging.join(hex);
        let bytes = fs::read(&manifest_path)
            .map_err(|_| bad(format!("manifest {} is not in the archive", desc.digest)))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("manifest {}: {e}", desc.digest)))?;
        for blob in std::iter::once(&manifest.config)
            .chain(manifest.layers.iter())
            .chain(std::iter::once(&desc))
        {
            let hex = digest_hex(&blob.digest)
                .ok_or_else(|| bad(format!("bad digest {:?}", blob.digest)))?;
            let from = staging.join(hex);
            let to = blobs_dir.join(hex);
            if to.exists() {
                continue;
            }
            if !from.exists() {
                return Err(bad(format!(
                    "blob {} of {reference} is not in the archive",
                    blob.digest
                )));
            }
            // Linked, not moved: two images of one archive may share it.
            fs::hard_link(&from, &to)
                .or_else(|_| fs::copy(&from, &to).map(|_| ()))
                .map_err(|e| ImageError::io(format!("write {}", to.display()), e))?;
        }
        fsync_dir(&blobs_dir)?;
        let entry = Descriptor::new(&desc.media_type, desc.digest.clone(), desc.size);
        loaded.push(store.set_name_locked(&reference, entry)?);
    }
    Ok(loaded)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::DirectUnpacker;

    #[test]
    fn exports_and_loads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("a")).unwrap();
        let rootfs = tmp.path().join("rootfs.tar");
        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, "etc/hello", 2, &b"hi"[..]).unwrap();
        fs::write(&rootfs, b.into_inner().unwrap()).unwrap();
        let reference = Reference::parse("localhost:5000/me/x:v1").unwrap();
        let info = store
            .import_rootfs(
                &rootfs,
                &reference,
                "test",
                Default::default(),
                &DirectUnpacker,
            )
            .unwrap();

        let mut bytes = Vec::new();
        export(&store, &reference, &mut bytes).unwrap();
        let other = ImageStore::open(&tmp.path().join("b")).unwrap();
        let loaded = load(&other, &bytes[..]).unwrap();
        assert_eq!(loaded, vec![info.clone()]);
        assert_eq!(other.list().unwrap(), vec![info]);

        // A flipped byte anywhere in a blob is refused, and nothing is named.
        let third = ImageStore::open(&tmp.path().join("c")).unwrap();
        let pos = bytes.windows(2).position(|w| w == b"hi").unwrap();
        bytes[pos] = b'H';
        assert!(load(&third, &bytes[..]).is_err());
        assert_eq!(third.list().unwrap(), vec![]);
    }
}

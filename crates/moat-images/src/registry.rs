//! Pull and push images between the store and OCI registries, through the
//! `oci-client` crate (the OCI distribution protocol, token and basic auth).
//!
//! Every byte from a registry is checked: manifests against the digest they
//! were asked by (or the one the registry names), blobs against their
//! descriptor's digest and size before they enter `blobs/`, and layer diff
//! ids when a layer is first unpacked. Downloads go to `incoming/<hex>`, which
//! survives a broken connection, so the next pull asks only for the rest.
//! Pushes skip blobs the registry has, mount blobs it has under another
//! repository, and stream the rest from disk.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::digest::sha256_digest;
use crate::error::ImageError;
use crate::fsutil::fsync_dir;
use crate::layout::{ImageInfo, ImageStore};
use crate::oci::{
    digest_hex, oci_arch, Descriptor, Manifest, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST,
    MEDIA_INDEX, MEDIA_MANIFEST,
};
use crate::reference::Reference;

/// How to reach registries: which may be spoken to in plain HTTP, which CAs
/// to trust beyond the host's, and the credentials `moat image login` stored.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Hosts (`host:port`) reached over HTTP. Loopback registries always are.
    pub insecure: Vec<String>,
    /// PEM certificates trusted in addition to the host's trust store.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Registry host -> (user, password).
    pub credentials: HashMap<String, (String, String)>,
}

/// What a pull or push is doing, for the CLI's progress display.
#[derive(Debug, Clone, PartialEq)]
pub enum Transfer {
    Step(String),
    Bytes {
        /// The blob's short digest (12 hex digits).
        id: String,
        done: u64,
        total: u64,
    },
}

/// What a push did with each blob.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PushSummary {
    pub digest: String,
    pub uploaded: Vec<String>,
    pub mounted: Vec<String>,
    pub skipped: Vec<String>,
}

const PARALLEL_BLOBS: usize = 4;
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
const ACCEPTED: [&str; 4] = [
    MEDIA_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_INDEX,
    MEDIA_DOCKER_LIST,
];

fn short(digest: &str) -> String {
    digest_hex(digest)
        .map(|h| h[..12].to_string())
        .unwrap_or_else(|| digest.to_string())
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(registry);
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A registry session for one reference.
struct Session<'a> {
    client: Client,
    auth: RegistryAuth,
    image: oci_client::Reference,
    registry: String,
    reference: &'a Reference,
}

impl<'a> Session<'a> {
    fn new(reference: &'a Reference, opts: &RegistryOptions) -> Result<Self, ImageError> {
        let registry = reference
            .registry()
            .ok_or_else(|| ImageError::Registry {
                reference: reference.to_string(),
                reason: "the name has no registry host; name one, e.g. localhost:5000/NAME:TAG (`moat image tag` gives an image a second name)".into(),
            })?
            .to_string();
        // reqwest is built without a default crypto provider; the gateway
        // uses ring too, so the process has one kind of TLS.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut insecure = opts.insecure.clone();
        if is_loopback(&registry) {
            insecure.push(registry.clone());
        }
        let extra_root_certificates = opts
            .extra_ca_pem
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            extra_root_certificates,
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| registry_error(reference, e))?;
        let repository = reference.repository().to_string();
        let image = match &reference.digest {
            Some(d) => oci_client::Reference::with_digest(registry.clone(), repository, d.clone()),
            None => {
                oci_client::Reference::with_tag(registry.clone(), repository, reference.tag.clone())
            }
        };
        let auth = match opts.credentials.get(&registry) {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Session {
            client,
            auth,
            image,
            registry,
            reference,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> ImageError {
        registry_error(self.reference, e)
    }
}

fn registry_error(reference: &Reference, e: impl std::fmt::Display) -> ImageError {
    let mut reason = e.to_string();
    if is_auth_error(&reason) {
        reason.push_str(" (log in first: moat image login REGISTRY)");
    }
    ImageError::Registry {
        reference: reference.to_string(),
        reason,
    }
}

/// Whether a registry error means the credentials were missing or refused.
fn is_auth_error(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["401", "unauthorized", "not authorized", "authentication"]
        .iter()
        .any(|k| lower.contains(k))
}

fn runtime() -> Result<tokio::runtime::Runtime, ImageError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ImageError::io("start the registry client", e))
}

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

/// Checks that the credentials in `opts` for `registry` are accepted, as
/// `docker login` does: a token (or basic-auth) round trip and one
/// authenticated request.
pub fn check_login(registry: &str, opts: &RegistryOptions) -> Result<(), ImageError> {
    let probe = Reference::parse(&format!("{registry}/moat-login-check:latest"))?;
    let s = Session::new(&probe, opts)?;
    runtime()?.block_on(async {
        s.client
            .auth(&s.image, &s.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| s.err(e))?;
        match s.client.catalog(&s.image, &s.auth, Some(1), None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if is_auth_error(&e.to_string()) {
                    Err(ImageError::Registry {
                        reference: registry.to_string(),
                        reason: "the user name or password was refused".into(),
                    })
                } else {
                    // A registry without a catalog still took the credentials.
                    Ok(())
                }
            }
        }
    })
}

/// Pulls `reference` from its registry into the store and names it so.
pub fn pull(
    store: &ImageStore,
    reference: &Reference,
    opts: &RegistryOptions,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<ImageInfo, ImageError> {
    let session = Session::new(reference, opts)?;
    runtime()?.block_on(pull_async(store, &session, progress))
}

async fn pull_async(
    store: &ImageStore,
    s: &Session<'_>,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<ImageInfo, ImageError> {
    progress(Transfer::Step(format!("resolving {}", s.reference)));
    let (mut bytes, mut media_type) =
        fetch_manifest(s, &s.image, s.reference.digest.as_deref()).await?;
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
        (bytes, media_type) = fetch_manifest(s, &by_digest, Some(&entry.digest)).await?;
        if media_type.is_empty() {
            media_type = entry.media_type.clone();
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| s.err(format!("its manifest does not parse: {e}")))?;

    let config_bytes = fetch_small_blob(s, &manifest.config).await?;
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

    let _lock = store.lock()?;
    store.put_json_blob(&manifest.config.media_type, &config_bytes)?;
    for layer in &manifest.layers {
        let from = incoming.join(layer_hex(s, layer)?);
        if from.exists() {
            let to = store.blob_path(&layer.digest)?;
            fs::rename(&from, &to).map_err(|e| {
                ImageError::io(format!("move {} into the store", from.display()), e)
            })?;
        }
    }
    fsync_dir(&store.root().join("blobs").join("sha256"))?;
    let media = if media_type.is_empty() {
        MEDIA_MANIFEST.to_string()
    } else {
        media_type
    };
    let desc = store.put_json_blob(&media, &bytes)?;
    let info = store.set_name_locked(s.reference, desc)?;
    progress(Transfer::Step(format!(
        "pulled {} ({})",
        s.reference,
        short(&info.id)
    )));
    Ok(info)
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
) -> Result<(Vec<u8>, String), ImageError> {
    let (bytes, reported) = s
        .client
        .pull_manifest_raw(image, &s.auth, &ACCEPTED)
        .await
        .map_err(|e| match e {
            OciDistributionError::ImageManifestNotFoundError(_) => {
                s.err("the registry has no such image or tag")
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
    if sha256_digest(&out) != desc.digest {
        return Err(s.err(format!(
            "blob {} does not match its digest",
            short(&desc.digest)
        )));
    }
    Ok(out)
}

fn layer_hex<'d>(s: &Session<'_>, layer: &'d Descriptor) -> Result<&'d str, ImageError> {
    digest_hex(&layer.digest)
        .ok_or_else(|| s.err(format!("layer digest {:?} is not sha256", layer.digest)))
}

/// Downloads one layer into `incoming/`, resuming a partial download, and
/// verifies it. A layer the store already has is not fetched.
async fn fetch_layer(
    store: &ImageStore,
    s: &Session<'_>,
    layer: &Descriptor,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<(), ImageError> {
    let hex = layer_hex(s, layer)?;
    let id = short(&layer.digest);
    let stored = store.blob_path(&layer.digest)?;
    if fs::metadata(&stored).is_ok_and(|m| m.len() == layer.size) {
        progress(Transfer::Step(format!("{id}: already in the store")));
        return Ok(());
    }
    let path = store.incoming_dir().join(hex);
    let mut have = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if have > layer.size {
        let _ = fs::remove_file(&path);
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
        }
        let file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
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

/// Pushes the stored image `reference` to its registry.
pub fn push(
    store: &ImageStore,
    reference: &Reference,
    opts: &RegistryOptions,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<PushSummary, ImageError> {
    let entry = store.entry(reference)?;
    let manifest_bytes = store.read_small_blob(&entry.digest)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| ImageError::Registry {
            reference: reference.to_string(),
            reason: format!("its manifest does not parse: {e}"),
        })?;
    // Other repositories of the same registry that hold each blob: the
    // registry can link a blob from there instead of taking it again.
    let mut sources: HashMap<String, Vec<String>> = HashMap::new();
    for other in store.list()? {
        let Ok(other_ref) = Reference::parse(&other.reference) else {
            continue;
        };
        if other_ref.registry() != reference.registry()
            || other_ref.repository() == reference.repository()
        {
            continue;
        }
        if let Ok((m, _)) = store.manifest_and_config(&other) {
            for l in m.layers.iter().chain(std::iter::once(&m.config)) {
                sources
                    .entry(l.digest.clone())
                    .or_default()
                    .push(other_ref.repository().to_string());
            }
        }
    }
    let session = Session::new(reference, opts)?;
    let media = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| entry.media_type.clone());
    runtime()?.block_on(async {
        let s = &session;
        s.client
            .auth(&s.image, &s.auth, RegistryOperation::Push)
            .await
            .map_err(|e| s.err(e))?;
        let blobs: Vec<&Descriptor> = manifest
            .layers
            .iter()
            .chain(std::iter::once(&manifest.config))
            .collect();
        let outcomes = futures_util::stream::iter(
            blobs
                .into_iter()
                .map(|b| push_blob(store, s, b, sources.get(&b.digest), progress)),
        )
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect::<Vec<(String, BlobOutcome)>>()
        .await?;
        let header = http::HeaderValue::from_str(&media).map_err(|e| s.err(e))?;
        s.client
            .push_manifest_raw(&s.image, manifest_bytes.clone(), header)
            .await
            .map_err(|e| s.err(format!("manifest: {e}")))?;
        let mut summary = PushSummary {
            digest: entry.digest.clone(),
            ..PushSummary::default()
        };
        for (digest, outcome) in outcomes {
            match outcome {
                BlobOutcome::Uploaded => summary.uploaded.push(digest),
                BlobOutcome::Mounted => summary.mounted.push(digest),
                BlobOutcome::Present => summary.skipped.push(digest),
            }
        }
        progress(Transfer::Step(format!(
            "pushed {} ({})",
            s.reference,
            short(&entry.digest)
        )));
        Ok(summary)
    })
}

enum BlobOutcome {
    Uploaded,
    Mounted,
    Present,
}

async fn push_blob(
    store: &ImageStore,
    s: &Session<'_>,
    blob: &Descriptor,
    sources: Option<&Vec<String>>,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<(String, BlobOutcome), ImageError> {
    let id = short(&blob.digest);
    let exists = s
        .client
        .blob_exists(&s.image, &blob.digest)
        .await
        .map_err(|e| s.err(format!("blob {id}: {e}")))?;
    if exists {
        progress(Transfer::Step(format!("{id}: already in the registry")));
        return Ok((blob.digest.clone(), BlobOutcome::Present));
    }
    for repo in sources.into_iter().flatten() {
        let from =
            oci_client::Reference::with_tag(s.registry.clone(), repo.clone(), "latest".into());
        if s.client
            .mount_blob(&s.image, &from, &blob.digest)
            .await
            .is_ok()
        {
            progress(Transfer::Step(format!("{id}: mounted from {repo}")));
            return Ok((blob.digest.clone(), BlobOutcome::Mounted));
        }
    }
    let path: PathBuf = store.blob_path(&blob.digest)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let total = blob.size;
    // The upload stream must be 'static, so it counts into an atomic that a
    // ticker beside it reports from.
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
        let chunk = chunk.map_err(OciDistributionError::IoError)?;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(chunk)
    });
    let upload = s
        .client
        .push_blob_stream(&s.image, stream, &blob.digest, Some(total));
    let ticker = async {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            progress(Transfer::Bytes {
                id: id.clone(),
                done: sent.load(Ordering::Relaxed),
                total,
            });
        }
    };
    let result = match futures_util::future::select(Box::pin(upload), Box::pin(ticker)).await {
        futures_util::future::Either::Left((result, _)) => result,
        futures_util::future::Either::Right((never, _)) => never,
    };
    result.map_err(|e| {
        s.err(format!(
            "blob {id} failed to upload ({e}); run the same command again to finish the push"
        ))
    })?;
    progress(Transfer::Bytes {
        id,
        done: total,
        total,
    });
    Ok((blob.digest.clone(), BlobOutcome::Uploaded))
}

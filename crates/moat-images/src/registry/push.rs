//! Store to registry: blobs the registry has are skipped, blobs it holds
//! elsewhere are mounted, the rest streamed from disk; the manifest last,
//! so that a registry never names a manifest whose blobs it lacks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_client::RegistryOperation;

use super::{
    runtime, short, RegistryOptions, RegistryStore, Session, Transfer, PARALLEL_BLOBS,
    PROGRESS_EVERY,
};
use crate::digest::sha256_digest;
use crate::error::ImageError;
use crate::oci::Descriptor;
use crate::reference::Reference;

/// What a push did with each blob.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PushSummary {
    pub digest: String,
    pub uploaded: Vec<String>,
    pub mounted: Vec<String>,
    pub skipped: Vec<String>,
}

/// Pushes what `store` holds as `reference` to its registry.
pub fn push<S: RegistryStore>(
    store: &S,
    reference: &Reference,
    opts: &RegistryOptions,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<PushSummary, S::Error> {
    let source = store.push_source(reference)?;
    let digest = sha256_digest(&source.manifest_bytes);
    let manifest = &source.manifest;
    let session = Session::new(reference, opts)?;
    let summary = runtime()?.block_on(async {
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
                .map(|b| push_blob(store, s, b, source.mount_sources.get(&b.digest), progress)),
        )
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect::<Vec<(String, BlobOutcome)>>()
        .await?;
        let header = http::HeaderValue::from_str(&source.media_type).map_err(|e| s.err(e))?;
        s.client
            .push_manifest_raw(&s.image, source.manifest_bytes.clone(), header)
            .await
            .map_err(|e| s.err(format!("manifest: {e}")))?;
        let mut summary = PushSummary {
            digest: digest.clone(),
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
            short(&digest)
        )));
        Ok::<_, ImageError>(summary)
    })?;
    Ok(summary)
}

enum BlobOutcome {
    Uploaded,
    Mounted,
    Present,
}

async fn push_blob<S: RegistryStore>(
    store: &S,
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

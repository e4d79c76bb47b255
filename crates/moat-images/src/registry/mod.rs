//! Pull and push between a local store and OCI registries, through the
//! `oci-client` crate (the OCI distribution protocol, token and basic auth).
//!
//! The transfer is one mechanism for every store that speaks OCI: the image
//! store and the model store each implement [`RegistryStore`] (where blobs
//! live, where downloads wait, which manifests they take, and how a pulled
//! manifest is named), so that resuming, verifying and skipping blobs is
//! written once.
//!
//! Every byte from a registry is checked: manifests against the digest they
//! were asked by (or the one the registry names), blobs against their
//! descriptor's digest and size before they enter the store. Downloads go to
//! `incoming/<hex>`, which survives a broken connection, so the next pull
//! asks only for the rest; nothing is named until every blob is whole.
//! Pushes skip blobs the registry has, mount blobs it has under another
//! repository, and stream the rest from disk.

mod image_store;
mod pull;
mod push;

pub use pull::pull;
pub use push::{push, PushSummary};

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};

use crate::error::ImageError;
use crate::oci::{digest_hex, Descriptor, Manifest};
use crate::reference::Reference;

pub use image_store::IMAGE_MANIFESTS;

/// A local store that registry pulls fill and pushes read.
pub trait RegistryStore: Sync {
    /// What a finished pull gives back (the named image or model).
    type Pulled;
    /// The store's own error, which the transfer's errors convert into.
    type Error: From<ImageError>;

    /// Manifest media types to ask the registry for (its Accept header).
    fn accepted_manifests(&self) -> &[&str];
    /// Where partial downloads wait for the next pull to resume them.
    fn incoming_dir(&self) -> PathBuf;
    /// Where the blob with this digest lives once the store has it.
    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError>;
    /// Refuses, before any layer is fetched, a manifest (and config) that
    /// this store cannot hold, e.g. a model pulled as an image.
    fn check_manifest(
        &self,
        reference: &Reference,
        manifest: &Manifest,
        config: &[u8],
    ) -> Result<(), Self::Error>;
    /// Moves the verified blobs in and names the manifest `reference`; the
    /// only step of a pull that changes what the store shows.
    fn commit_pull(
        &self,
        reference: &Reference,
        pulled: PulledBlobs,
    ) -> Result<Self::Pulled, Self::Error>;
    /// The stored manifest of `reference`, for a push.
    fn push_source(&self, reference: &Reference) -> Result<PushSource, Self::Error>;
}

/// Everything a pull fetched and verified, ready to enter the store.
#[derive(Debug, Clone)]
pub struct PulledBlobs {
    /// The manifest as the registry sent it (its digest is the id).
    pub manifest_bytes: Vec<u8>,
    pub media_type: String,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    /// Layers that were downloaded, each verified in `incoming/`; layers
    /// the store already had are not here.
    pub incoming: Vec<(Descriptor, PathBuf)>,
}

/// A stored manifest as a push sends it.
#[derive(Debug, Clone)]
pub struct PushSource {
    pub manifest_bytes: Vec<u8>,
    pub media_type: String,
    pub manifest: Manifest,
    /// For each blob digest, other repositories of the same registry that
    /// hold it: the registry can mount it from there instead of taking it again.
    pub mount_sources: HashMap<String, Vec<String>>,
}

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
    /// Registries (`host:port`) asked first, in order, for names on Docker
    /// Hub, as Docker's `registry-mirrors`; Docker Hub itself comes last.
    pub mirrors: Vec<String>,
}

/// The names Docker Hub goes by.
pub const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

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

const PARALLEL_BLOBS: usize = 4;
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

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
        let registry = reference.registry().ok_or_else(|| ImageError::Registry {
                reference: reference.to_string(),
                reason: "the name has no registry host; name one, e.g. localhost:5000/NAME:TAG (`moat image tag` gives an image a second name)".into(),
            })?;
        Self::at(reference, registry, opts)
    }

    /// A session that asks `registry` (a mirror) for `reference`'s repository.
    fn at(
        reference: &'a Reference,
        registry: &str,
        opts: &RegistryOptions,
    ) -> Result<Self, ImageError> {
        let registry = registry.to_string();
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
    } else if reason.contains("error sending request") {
        reason.push_str(
            " (is the registry up and reachable? one without TLS must be named in registry.insecure)",
        );
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

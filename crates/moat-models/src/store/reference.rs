//! Model references as Docker Model Runner reads them: `smollm2` is
//! `ai/smollm2:latest` on Docker Hub, `ai/smollm2:135M-Q4_1` a tag of it,
//! `localhost:5000/ai/smollm2:135M-Q4_1` the same name on another registry,
//! `NAME@sha256:…` one manifest. The syntax is the image crate's
//! [`Reference`]; what this adds is the `ai/` namespace for one-word names
//! and Docker Hub as the registry when none is named, so that every
//! spelling of a name is stored as one tag.

use moat_images::{ImageError, Reference};

use super::StoreError;

/// The namespace a one-word model name is in.
pub const DEFAULT_NAMESPACE: &str = "ai";
/// Where a model without a registry host comes from.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Docker Hub's other names, dropped so that its models are stored without one.
const HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A parsed, normalised model reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelReference {
    /// The name as stored: no Docker Hub host, `ai/` added to one-word names.
    inner: Reference,
}

impl ModelReference {
    pub fn parse(s: &str) -> Result<ModelReference, StoreError> {
        // Hugging Face names keep their case and may say huggingface.co;
        // they are stored as the Hub pull names them.
        let hub_tag = match super::HubReference::parse(s) {
            Some(hub) => Some(hub?.tag()),
            None => None,
        };
        let mut inner = Reference::parse(hub_tag.as_deref().unwrap_or(s)).map_err(|e| match e {
            ImageError::InvalidReference { reason, .. } => StoreError::InvalidReference {
                reference: s.to_string(),
                reason,
            },
            other => StoreError::InvalidReference {
                reference: s.to_string(),
                reason: other.to_string(),
            },
        })?;
        if let Some(host) = inner.registry() {
            if HUB_ALIASES.contains(&host) {
                inner.name = inner.name[host.len() + 1..].to_string();
            }
        }
        if inner.registry().is_none() && !inner.name.contains('/') {
            inner.name = format!("{DEFAULT_NAMESPACE}/{}", inner.name);
        }
        Ok(ModelReference { inner })
    }

    /// The reference to ask a registry for: Docker Hub when none is named.
    pub fn remote(&self) -> Reference {
        let mut remote = self.inner.clone();
        if remote.registry().is_none() {
            remote.name = format!("{DEFAULT_REGISTRY}/{}", remote.name);
        }
        remote
    }

    /// The registry host this model lives on (Docker Hub's when none is named).
    pub fn registry(&self) -> &str {
        self.inner.registry().unwrap_or(DEFAULT_REGISTRY)
    }

    /// The repository within the registry (`ai/smollm2`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The manifest digest the reference pins, if it does.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest.as_deref()
    }
}

/// `ai/smollm2:latest`, `localhost:5000/ai/smollm2:135M-Q4_1`, `ai/x@sha256:…`:
/// the form tags are stored and shown in.
impl std::fmt::Display for ModelReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

//! The store's one error type. Each message says what went wrong and what to
//! do, on one line, because the CLI and the HTTP APIs show it as it is.

use std::path::PathBuf;

/// Everything that can go wrong in the model store and its registry transfers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A reference that does not parse.
    #[error("invalid model reference {reference:?}: {reason}; write [REGISTRY/][NAMESPACE/]NAME[:TAG], e.g. ai/smollm2:135M-Q4_1")]
    InvalidReference { reference: String, reason: String },

    /// No tag or id matches.
    #[error("model {reference} not found; run `moat model pull {reference}` to fetch it (`moat model ls` lists the models there are)")]
    NotFound { reference: String },

    /// A GGUF file that the header check refuses.
    #[error("{name} is not a usable GGUF model: {reason}; check the file (a cut-short download is the usual cause) and try again")]
    BadGguf { name: String, reason: String },

    /// What was given to `package` does not make one model.
    #[error("{0}")]
    BadPackage(String),

    /// A model named by id that several tags point at.
    #[error("model {id} has {} tags ({}); remove the tags one by one, or use --force to remove the model and all its tags", tags.len(), tags.join(", "))]
    MultipleTags { id: String, tags: Vec<String> },

    /// A short id that more than one model's id starts with.
    #[error("{prefix} matches {count} models; give more of the id")]
    AmbiguousId { prefix: String, count: usize },

    /// A file of the store (models.json, a manifest, a config) is damaged.
    #[error("model store file {} is damaged: {reason}; `moat model rm -f` the model and pull or package it again", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// A blob a manifest names is not in the store.
    #[error("blob {digest} is missing from the model store; `moat model rm -f` the model and pull or package it again")]
    MissingBlob { digest: String },

    /// A registry transfer, or a file operation of the helpers shared with
    /// the image store, failed (the message says why and what to do).
    #[error(transparent)]
    Registry(#[from] moat_images::ImageError),

    /// A pull from Hugging Face failed (the reason says what to do).
    #[error("hf.co/{repo}: {reason}")]
    Hub { repo: String, reason: String },

    /// A file system operation failed.
    #[error("{what}: {source}; check permissions and free space")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }
}

//! The one error type of the crate. Every message says what went wrong and
//! what to do about it, on one line, because the CLI shows it as is.

use std::path::PathBuf;

/// Everything that can go wrong in the image store, the unpacker and template builds.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A registry refused or broke off, or sent something that does not check out.
    #[error("registry: {reference}: {reason}")]
    Registry { reference: String, reason: String },

    /// A user-supplied image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}; use lower-case NAME[:TAG], e.g. moat/shell:v1")]
    InvalidReference { reference: String, reason: String },

    /// No index entry carries this name.
    #[error("image {reference} not found; run `moat image ls` to see the images there are")]
    NotFound { reference: String },

    /// A blob's content does not hash to its digest.
    #[error("blob {digest} is corrupt (its content does not match its digest); run `moat image rm` on the image and build or pull it again")]
    CorruptBlob { digest: String },

    /// A blob that an index entry or manifest refers to is not there.
    #[error("blob {digest} is missing from the image store; run `moat image rm` on the image and build or pull it again")]
    MissingBlob { digest: String },

    /// The store's own files (index.json, oci-layout, a manifest) do not parse or are inconsistent.
    #[error("image store file {path} is damaged: {reason}; fix or remove it, or `moat image rm` the image and build or pull it again")]
    CorruptStore { path: PathBuf, reason: String },

    /// A layer tarball is not a valid (optionally gzip-compressed) tar stream.
    #[error("layer tarball {path} is not a valid tar stream: {reason}; rebuild or re-download it")]
    BadLayer { path: PathBuf, reason: String },

    /// A layer entry would write outside its destination, or is a kind we do not create.
    #[error("refusing layer entry {entry:?}: {reason}; the tarball is unsafe to unpack, rebuild it from a trusted source")]
    UnsafeEntry { entry: String, reason: String },

    /// A file in a sandbox is named like an OCI whiteout: in a layer it would
    /// delete the file of that name below instead of being a file.
    #[error("{path} in the sandbox has a name that image layers reserve for deletions (it starts with \".wh.\"); rename or remove it, then save again")]
    ReservedName { path: String },

    /// Sparse files whose holes would expand past what a layer may hold.
    #[error("{path} in the sandbox is a sparse file that takes the layer's sparse files to {}, more than the {} a layer may hold; remove or shrink it (truncate -s), then save again", human(*total), human(*limit))]
    SparseTooLarge {
        path: String,
        total: u64,
        limit: u64,
    },

    /// Not enough free space on a file system.
    #[error("not enough free space in {}: need {}, have {}; free some space or point MOAT_CACHE_DIR at a larger file system", path.display(), human(*need), human(*have))]
    NoSpace { path: PathBuf, need: u64, have: u64 },

    /// A host program that a step needs is not installed.
    #[error("`{tool}` is not installed; install it with `{install}`")]
    MissingTool { tool: String, install: String },

    /// The template build command failed.
    #[error("building template {name} failed: {tail}; check the network and the messages above, then try again")]
    TemplateBuild { name: String, tail: String },

    /// An unknown template name.
    #[error("unknown template {name:?}; known templates: {known}")]
    UnknownTemplate { name: String, known: String },

    /// The helper process that unpacks layers (in the sandboxes' user namespace) failed.
    #[error("unpacking a layer failed: {0}")]
    Helper(String),

    /// A layer that a sandbox mounts is not unpacked in the store any more.
    #[error(
        "layer {diff_id} is missing from the image store; remove the sandbox and create it again"
    )]
    MissingLayer { diff_id: String },

    /// A file system operation failed.
    #[error("{what}: {source}; check permissions and free space")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Wraps an io::Error with a description of the operation that failed.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Byte counts as people read them (binary units, one decimal).
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(
            vec![human(0), human(1023), human(1024), human(3 << 30)],
            vec!["0 B", "1023 B", "1.0 KiB", "3.0 GiB"]
        );
    }

    #[test]
    fn messages_are_one_line() {
        let e = ImageError::NoSpace {
            path: "/x".into(),
            need: 1 << 30,
            have: 5 << 20,
        };
        assert_eq!(
            e.to_string(),
            "not enough free space in /x: need 1.0 GiB, have 5.0 MiB; free some space or point MOAT_CACHE_DIR at a larger file system"
        );
    }
}

//! moat-images: the OCI image store: content-addressed blobs, manifests, an
//! index of names, unpacked layers, and template builds.
//!
//! The store is an OCI image layout on disk (so standard tools can read
//! it) plus a directory of unpacked layers that the sandbox stacks as
//! overlay lower layers. Writes are crash-safe (temp + fsync + rename) and
//! serialised between processes by an flock; layer tarballs are unpacked
//! with hand-made path checks because they may come from anywhere.

pub mod archive;
mod diff;
mod digest;
mod error;
pub mod fsutil;
pub mod layered;
mod layout;
pub mod oci;
mod reference;
pub mod registry;
#[cfg(test)]
mod save_tests;
mod setid;
mod sparse;
pub mod template;
mod unpack;

pub use diff::{write_upper_layer, LayerSummary};
pub use error::ImageError;
pub use layout::{ImageInfo, ImageStore};
pub use oci::now_rfc3339;
pub use reference::Reference;
pub use setid::drop_new_privileges;
pub use unpack::{unpack_layer, DirectUnpacker, LayerUnpacker};

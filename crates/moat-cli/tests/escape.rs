//! The escape battery (`battery/escape.rs`) on the namespace tier: Linux
//! namespaces, seccomp and Landlock around the host's kernel. The same
//! battery runs on the gVisor tier from `escape_gvisor.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Namespaces;

#[path = "battery/escape.rs"]
mod escape;

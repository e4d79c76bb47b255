//! The escape battery (`battery/escape.rs`) on the namespace tier: Linux
//! namespaces, seccomp and Landlock around the host's kernel. The same
//! battery runs on the gVisor tier from `escape_gvisor.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Namespaces;

/// Whether the battery's sandboxes are run by an unprivileged user's daemon
/// (`escape_rootless.rs`, `escape_gvisor_rootless.rs`) or, here, by root's.
const ROOTLESS: bool = false;

#[path = "battery/escape.rs"]
mod escape;

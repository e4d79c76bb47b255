//! The escape battery (`battery/escape.rs`) on the gVisor tier: the same
//! sandbox under gVisor's `runsc`, a user-space kernel between its processes
//! and the host's. Where gVisor refuses an attack differently from the host's
//! kernel, the battery says so next to the namespace tier's expectation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Gvisor;

/// Whether the battery's sandboxes are run by an unprivileged user's daemon
/// (`escape_rootless.rs`, `escape_gvisor_rootless.rs`) or, here, by root's.
const ROOTLESS: bool = false;

#[path = "battery/escape.rs"]
mod escape;

//! The attacks of "Hold the boundary" (`battery/boundary.rs`) on the
//! namespace tier. The same attacks run on the gVisor tier from
//! `boundary_gvisor.rs`; each binary also runs the rootless attack on its
//! tier, with a daemon of an unprivileged user (`common/rootless.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Namespaces;

#[path = "battery/boundary.rs"]
mod boundary;

//! The attacks of "Hold the boundary" (`battery/boundary.rs`) on the
//! namespace tier. The same attacks run on the gVisor tier from
//! `boundary_gvisor.rs`; their rootless variants live in `rootless.rs` and
//! `boundary_gvisor.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Namespaces;

#[path = "battery/boundary.rs"]
mod boundary;

//! The attacks of "Hold the boundary" (`battery/boundary.rs`) on the gVisor
//! tier, as root and, for the attacks that apply without root, as an
//! unprivileged user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Gvisor;

#[path = "battery/boundary.rs"]
mod boundary;

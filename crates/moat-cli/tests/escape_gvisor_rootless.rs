//! The escape battery (`battery/escape.rs`) on the gVisor tier, with the
//! sandboxes run by the daemon of the unprivileged user `moat-test`
//! (`common/rootless.rs`): their workspaces are that user's and the CLI runs
//! as that user. Needs the user (`scripts/test.sh` makes it); starts as
//! root, which switches to it. The same run as root is `escape_gvisor.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

/// The tier every sandbox of this binary runs on.
const TIER: common::Tier = common::Tier::Gvisor;

/// The battery's sandboxes are run by an unprivileged user's daemon.
const ROOTLESS: bool = true;

#[path = "battery/escape.rs"]
mod escape;

//! The language that moat's processes speak to each other: the requests the CLI
//! sends the daemon, the replies it gets, the messages between the daemon and a
//! sandbox's init, and the framing that carries them over Unix sockets together
//! with file descriptors (SCM_RIGHTS). Nothing here knows how a request is
//! served; both sides depend on this crate and on nothing of each other.

pub mod frame;
pub mod init;
pub mod types;

pub use frame::{recv_frame, send_frame, FrameError};
pub use types::*;

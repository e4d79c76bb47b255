//! The egress gateway: the only way out of a sandbox. Each sandbox's door at
//! `127.0.0.1:3128` leads to an HTTP forward proxy (CONNECT included) that
//! decides every request by the sandbox's [`Policy`], resolves names itself,
//! checks every address it resolved against the policy and the blocked
//! ranges, dials exactly the address it checked, and records every
//! connection and request in a log the daemon keeps. It knows nothing of how
//! sandboxes are made: it is handed listening sockets and a policy.

pub mod credentials;
mod echo;
mod encoding;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod limits;
pub mod log;
pub mod policy;
mod proxy;
pub mod ranges;
pub mod tls;
mod tunnel;

pub use limits::Limits;
pub use log::{LogEntry, LogSink};
pub use policy::{Action, Policy, Rule, Verdict};
pub use proxy::{Gateway, GatewayError, LoopbackDialer};

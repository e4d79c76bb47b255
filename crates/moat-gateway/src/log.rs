//! One row of the network log: every connection and request the gateway
//! decides, allowed or blocked. The gateway hands rows to a sink; the daemon
//! stores them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// RFC 3339, UTC, with milliseconds.
    pub time: String,
    pub sandbox: String,
    pub method: String,
    pub host: String,
    pub port: u16,
    /// The request path, where the gateway saw it (plain HTTP, intercepted HTTPS).
    pub path: Option<String>,
    pub rule: String,
    /// `allowed` or `blocked`.
    pub decision: String,
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// Where log rows go. Called on the gateway's threads: it must not block.
pub type LogSink = std::sync::Arc<dyn Fn(LogEntry) + Send + Sync>;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

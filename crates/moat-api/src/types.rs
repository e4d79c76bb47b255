//! What the CLI asks of the daemon and what it hears back.

use serde::{Deserialize, Serialize};

/// The protocol version both sides must agree on; bumped on any breaking change.
pub const PROTOCOL_VERSION: u32 = 2;

/// One request per connection. Requests that start a process (`SandboxExec`)
/// carry the caller's stdin, stdout and stderr as descriptors unless a TTY is
/// asked for, in which case the reply carries the terminal's master side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Version,
    SandboxCreate(CreateSandbox),
    /// `run AGENT WORKSPACE…`: the sandbox for that agent and those workspaces,
    /// created if there is none, started if it is stopped.
    SandboxEnsure(CreateSandbox),
    SandboxStart {
        name: String,
    },
    SandboxExec(ExecRequest),
    SandboxList,
    SandboxInspect {
        name: String,
    },
    SandboxStop {
        name: String,
    },
    SandboxRm {
        name: String,
    },
    SandboxReset,
    SandboxPorts {
        name: String,
        publish: Vec<PortMapping>,
        unpublish: Vec<u16>,
    },
    /// Change a sandbox's network policy (all fields optional; rules add up).
    NetworkProxy(NetworkProxyRequest),
    /// The newest `limit` network log rows, of one sandbox or all.
    NetworkLog {
        name: Option<String>,
        limit: u32,
    },
    /// Store an API key for a service; the reply never contains it.
    SecretSet {
        name: String,
        key: SecretValue,
    },
    SecretRm {
        name: String,
    },
    SecretLs,
    ImageList,
    ImageRm {
        reference: String,
    },
    ImageImport {
        path: String,
        reference: String,
    },
    TemplateBuild {
        name: String,
    },
    /// The sandbox's changes as a new image; with an OCI archive descriptor
    /// (passed along) the image goes there instead of the store.
    SandboxSave {
        name: String,
        reference: String,
        to_archive: bool,
    },
    ImageTag {
        source: String,
        target: String,
    },
    ImagePush {
        reference: String,
    },
    ImagePull {
        reference: String,
    },
    ImageInspect {
        reference: String,
    },
    /// An OCI archive, whose descriptor travels with the request.
    ImageLoad,
    /// Store credentials for a registry (checked against it first).
    RegistryLogin {
        registry: String,
        username: String,
        password: SecretValue,
    },
    RegistryLogout {
        registry: String,
    },
    /// A model from local GGUF files; their descriptors travel with the
    /// request (the GGUF files, then the licenses, then the chat template),
    /// so that the daemon never opens a path the caller named.
    ModelPackage(ModelPackageRequest),
    ModelList,
    ModelInspect {
        reference: String,
    },
    /// Remove a tag (and the model when none is left); an id takes `force`
    /// when several tags name the model.
    ModelRm {
        reference: String,
        force: bool,
    },
    ModelTag {
        source: String,
        target: String,
    },
    ModelPush {
        reference: String,
    },
    ModelPull {
        reference: String,
    },
    ModelDf,
    /// Clear the prompt cache of one model, or of all.
    ModelCacheRm {
        model: Option<String>,
    },
    /// One turn of a chat (`moat model run`), answered with `Text` replies;
    /// no messages only loads the model.
    ModelChat(ModelChatRequest),
    ModelPs,
    ModelUnload {
        models: Vec<String>,
        all: bool,
    },
    ModelConfigure {
        model: String,
        context_size: Option<u32>,
        keep_alive: Option<String>,
        /// Every request's temperature, whatever the client asks.
        #[serde(default)]
        temperature: Option<f32>,
        /// Every request's sampler seed, whatever the client asks.
        #[serde(default)]
        seed: Option<u32>,
        /// The most tokens any answer gets, whatever the client asks.
        #[serde(default)]
        max_tokens: Option<u32>,
    },
    ModelStatus,
    ModelLogs {
        model: Option<String>,
    },
}

/// `moat model run`: the conversation so far as (role, content) pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelChatRequest {
    pub model: String,
    pub messages: Vec<(String, String)>,
    pub max_tokens: Option<u32>,
}

/// Every reply is a stream of these, ending in `Ok`, `Error` or `Exited`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Progress {
        message: String,
    },
    /// Bytes of one blob moved so far, for a progress bar.
    Transfer {
        id: String,
        done: u64,
        total: u64,
    },
    /// Something the user should see on stderr, such as a limit that cannot be enforced.
    Warning {
        message: String,
    },
    /// Generated text, as it comes (`moat model run`).
    Text {
        text: String,
    },
    Ok {
        value: serde_json::Value,
    },
    Error {
        message: String,
    },
    /// The process runs; with a TTY the terminal's master side travels with this reply.
    Started {
        pid: i32,
    },
    /// The process ended: its exit code, or 128 + the signal that killed it.
    Exited {
        code: i32,
    },
}

/// `moat model package`: the file names of the descriptors that travel
/// with the request, and the model's name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelPackageRequest {
    pub reference: String,
    pub ggufs: Vec<String>,
    pub licenses: Vec<String>,
    pub chat_template: Option<String>,
    pub context_size: Option<u64>,
}

/// A model as Docker Model Runner's `GET /models` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// `sha256:<hex>` of the manifest.
    pub id: String,
    pub tags: Vec<String>,
    /// Seconds since the epoch.
    pub created: i64,
    /// DMR's config object: format, quantization, parameters, architecture,
    /// size, gguf, context_size.
    pub config: serde_json::Value,
}

/// What `model rm` did with one reference.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelRemoved {
    pub untagged: Vec<String>,
    /// The id of the model deleted, when its last tag went.
    pub deleted: Option<String>,
}

/// `model df`, with DMR's field name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelDiskUsage {
    pub models_disk_usage: u64,
    /// The prompt cache: saved KV state of prompts, all models together.
    #[serde(default)]
    pub prompt_cache_disk_usage: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CreateSandbox {
    pub name: Option<String>,
    pub agent: String,
    /// An image reference or a template name; the agent's default when absent.
    pub template: Option<String>,
    /// Absolute host paths; the first is the main workspace. `:ro` marks read-only extras.
    pub workspaces: Vec<String>,
    pub limits: LimitsRequest,
    /// `always`, `missing` (the default) or `never`: when to pull the
    /// template from its registry.
    #[serde(default)]
    pub pull_template: Option<String>,
    /// The tier; the configured default (`sandbox.isolation`) when absent.
    #[serde(default)]
    pub isolation: Option<Isolation>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LimitsRequest {
    /// Bytes.
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Bytes the sandbox may write (its own layer, its in-memory file
    /// systems); 0 for no budget, absent for the configured default.
    #[serde(default)]
    pub disk: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub name: String,
    /// The command; with `agent`, the arguments that follow the agent's own command.
    pub argv: Vec<String>,
    /// Start the sandbox's agent (what `run` does), with `argv` as its arguments.
    pub agent: bool,
    /// `KEY=VALUE` pairs added to the sandbox's environment.
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub tty: bool,
    /// Without a TTY: relay the caller's stdin (`-i`); otherwise stdin is empty.
    #[serde(default)]
    pub interactive: bool,
    pub rows: u16,
    pub cols: u16,
    /// Start and return at once, without waiting for the exit code.
    pub detach: bool,
}

/// An API key in transit to the daemon: it prints as `<redacted>`, so that no
/// debug output or error that shows a request can show the key.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `moat sandbox network proxy NAME …`, as Docker's flags.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkProxyRequest {
    pub name: String,
    /// `allow` or `deny`: the default for what no rule names.
    pub policy: Option<String>,
    /// `deny-all`, `balanced` or `allow-all`: start over from it.
    pub preset: Option<String>,
    pub allow_hosts: Vec<String>,
    pub block_hosts: Vec<String>,
    pub allow_cidrs: Vec<String>,
    pub block_cidrs: Vec<String>,
    pub bypass_hosts: Vec<String>,
    pub bypass_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    Running,
    Stopped,
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxStatus::Running => "running",
            SandboxStatus::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Workspace {
    pub path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub sandbox_port: u16,
}

impl std::str::FromStr for PortMapping {
    type Err = String;
    /// `HOST:SANDBOX`, or one port for both.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("bad port mapping {s:?}: write HOST_PORT:SANDBOX_PORT, e.g. 8080:3000");
        let (h, c) = s.split_once(':').unwrap_or((s, s));
        let host_port = h.parse().map_err(|_| bad())?;
        let sandbox_port = c.parse().map_err(|_| bad())?;
        if host_port == 0 || sandbox_port == 0 {
            return Err(bad());
        }
        Ok(PortMapping {
            host_port,
            sandbox_port,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    /// Whether the kernel enforces them (cgroups usable); false rootless without delegation.
    pub enforced: bool,
    /// Which cgroup hierarchy enforces them, or why none does.
    pub note: String,
    /// The disk budget, enforced apart from the cgroup limits above.
    #[serde(default = "DiskLimit::unrecorded")]
    pub disk: DiskLimit,
}

/// What a sandbox may write: its own layer (the overlay's upper layer) and
/// its in-memory file systems. Past it, writes fail inside with ENOSPC.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskLimit {
    /// The budget in bytes; None for no budget.
    pub bytes: Option<u64>,
    /// Whether the sandbox's own layer is held to it.
    pub enforced: bool,
    /// What holds it ("ext4 image on a loop device"), or why nothing does.
    pub by: String,
}

impl DiskLimit {
    /// Sandboxes made before moat had disk budgets have none: their layer
    /// lies on the host's file system.
    pub fn unrecorded() -> DiskLimit {
        DiskLimit {
            bytes: None,
            enforced: false,
            by: "no budget: the sandbox was made by an older moat, without a disk image".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub agent: String,
    pub template: String,
    pub image_id: String,
    pub status: SandboxStatus,
    pub workspaces: Vec<Workspace>,
    pub created: String,
    pub limits: Limits,
    pub ports: Vec<PortMapping>,
    /// The host pid of the sandbox's init while it runs.
    pub pid: Option<i32>,
    pub isolation: IsolationInfo,
}

/// The isolation tier a sandbox runs in. A tier is an init behind the same
/// control socket; adding one (a micro-VM, where a host can run one) adds a
/// value here and its init in moat-sandbox, and nothing in the gateway, the
/// model runner or the CLI.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Linux namespaces, seccomp, Landlock and cgroups around the host's kernel.
    #[default]
    Namespaces,
    /// gVisor's user-space kernel (`runsc`) between the sandbox and the host's.
    Gvisor,
}

impl Isolation {
    pub const ALL: [Isolation; 2] = [Isolation::Namespaces, Isolation::Gvisor];

    pub fn name(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Gvisor => "gvisor",
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Isolation, String> {
        Isolation::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Isolation::ALL.iter().map(|i| i.name()).collect();
                format!(
                    "unknown isolation tier {s:?}: moat has {}",
                    names.join(", ")
                )
            })
    }
}

/// How a sandbox is isolated, as `inspect` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IsolationInfo {
    pub tier: Isolation,
    /// gVisor: the runsc that runs it, with its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runsc: Option<String>,
    /// gVisor: its platform (`systrap`, `ptrace` or `kvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The walls between the sandbox and the host, outermost first, and
    /// whether each is up on this host.
    #[serde(default)]
    pub walls: Vec<Wall>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Wall {
    pub name: String,
    pub up: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionInfo {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub rootless: bool,
    pub state_root: String,
    pub runtime_root: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse() {
        assert_eq!(
            "8080:3000".parse::<PortMapping>(),
            Ok(PortMapping {
                host_port: 8080,
                sandbox_port: 3000
            })
        );
        assert_eq!(
            "5000".parse::<PortMapping>(),
            Ok(PortMapping {
                host_port: 5000,
                sandbox_port: 5000
            })
        );
        assert!("0:1".parse::<PortMapping>().is_err());
        assert!("a:b".parse::<PortMapping>().is_err());
    }

    #[test]
    fn secrets_never_print() {
        let r = Request::SecretSet {
            name: "openai".into(),
            key: SecretValue("sk-123".into()),
        };
        assert_eq!(
            format!("{r:?}"),
            "SecretSet { name: \"openai\", key: <redacted> }"
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"op": "secret_set", "name": "openai", "key": "sk-123"})
        );
    }

    #[test]
    fn limits_stored_before_disk_budgets_read_as_unrecorded() {
        let old: Limits = serde_json::from_str(
            r#"{"memory": 1, "cpus": null, "pids": 2, "enforced": true, "note": "cgroup v2"}"#,
        )
        .unwrap();
        assert_eq!(old.disk, DiskLimit::unrecorded());
        let req: LimitsRequest =
            serde_json::from_str(r#"{"memory": null, "cpus": null, "pids": null}"#).unwrap();
        assert_eq!(req.disk, None);
    }

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::SandboxStop {
            name: "demo".into(),
        };
        let s = serde_json::to_value(&r).unwrap();
        assert_eq!(s, serde_json::json!({"op": "sandbox_stop", "name": "demo"}));
    }
}

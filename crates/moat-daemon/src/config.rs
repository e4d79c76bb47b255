//! The daemon's settings: one TOML file, every setting also settable by an
//! environment variable (which wins). Later parts add their sections here.
//!
//! The file is `$MOAT_CONFIG`, else `/etc/moat/config.toml` as root and
//! `$XDG_CONFIG_HOME/moat/config.toml` (default `~/.config/moat/config.toml`)
//! otherwise. A missing file means the defaults. `config.example.toml` in the
//! repository documents every key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::DaemonError;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub sandbox: SandboxConfig,
    pub gateway: GatewayConfig,
    pub models: ModelsConfig,
    pub registry: RegistryConfig,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`host:port`) spoken to over plain HTTP. Loopback ones always are.
    pub insecure: Vec<String>,
    /// Registries asked first for names on Docker Hub (`ai/smollm2`), as
    /// Docker's `registry-mirrors`.
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The preset new sandboxes start with: `balanced`, `deny-all` or `allow-all`.
    pub default_policy: String,
    /// Names the gateway resolves itself: `name = "ADDRESS"` or `"ADDRESS:PORT"`.
    pub hosts: std::collections::BTreeMap<String, String>,
    /// PEM files of CAs to trust on the upstream side beyond the host's store.
    pub extra_ca_certs: Vec<String>,
    /// Services whose keys the gateway puts in, beyond the built-in ones.
    pub services: Vec<moat_gateway::credentials::Service>,
    /// How long a client may take to send a request's head ("30s").
    pub header_timeout: String,
    /// How long a keep-alive connection may wait between requests ("60s").
    pub idle_timeout: String,
    /// How long a tunnel the gateway does not intercept may carry nothing ("10m").
    pub tunnel_idle_timeout: String,
    /// How long the TLS handshake of an intercepted connection may take ("10s").
    pub tls_handshake_timeout: String,
    /// Connections one sandbox may hold open through the gateway; 0: no cap.
    pub max_connections: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            default_policy: "balanced".into(),
            hosts: Default::default(),
            extra_ca_certs: vec![],
            services: vec![],
            header_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            tunnel_idle_timeout: "10m".into(),
            tls_handshake_timeout: "10s".into(),
            max_connections: 256,
        }
    }
}

/// A timeout from the configuration: a duration above zero, as `30s` or `10m`.
fn positive_duration(
    section: &str,
    key: &str,
    text: &str,
) -> Result<std::time::Duration, DaemonError> {
    humantime::parse_duration(text.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            DaemonError::Config(format!(
                "{section}.{key}: {text:?} is not a duration above zero; write e.g. 30s or 10m"
            ))
        })
}

/// A fixed address for a name, and optionally the port to dial instead.
pub type StaticNames = std::collections::HashMap<String, (std::net::IpAddr, Option<u16>)>;

impl GatewayConfig {
    /// Every timeout and the connection cap, parsed, as the gateway takes them.
    pub fn limits(&self) -> Result<moat_gateway::Limits, DaemonError> {
        let duration = |key: &str, text: &str| positive_duration("gateway", key, text);
        Ok(moat_gateway::Limits {
            header_timeout: duration("header_timeout", &self.header_timeout)?,
            idle_timeout: duration("idle_timeout", &self.idle_timeout)?,
            tunnel_idle_timeout: duration("tunnel_idle_timeout", &self.tunnel_idle_timeout)?,
            tls_handshake_timeout: duration("tls_handshake_timeout", &self.tls_handshake_timeout)?,
            max_connections: match self.max_connections {
                0 => usize::MAX,
                n => n as usize,
            },
        })
    }

    /// The static name map, parsed.
    pub fn static_names(&self) -> Result<StaticNames, DaemonError> {
        let mut out = StaticNames::new();
        for (name, value) in &self.hosts {
            let bad = || {
                DaemonError::Config(format!(
                    "gateway.hosts: {name} = {value:?} is not ADDRESS or ADDRESS:PORT"
                ))
            };
            let parsed = match value.parse::<std::net::SocketAddr>() {
                Ok(sa) => (sa.ip(), Some(sa.port())),
                Err(_) => (
                    value
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse()
                        .map_err(|_| bad())?,
                    None,
                ),
            };
            let host = match moat_gateway::host::normalize(name).map_err(|_| bad())? {
                moat_gateway::host::Host::Name(n) => n,
                moat_gateway::host::Host::Ip(_) => return Err(bad()),
            };
            out.insert(host, parsed);
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Default memory limit of a new sandbox, like `4g` or `512m`; `0` for none.
    pub memory: String,
    /// Default CPU limit: cores (may be fractional), `0` for none, or
    /// `"auto"` (the default): all the host's cores but one, at least one,
    /// so that a sandbox busy on every core it has still leaves the host one.
    pub cpus: CpuLimit,
    /// Default limit on processes in a sandbox; `0` for none.
    pub pids_limit: u64,
    /// Default disk budget of a new sandbox (what its own layer and its
    /// in-memory file systems may hold), like `10g`; `0` for none.
    pub disk: String,
    /// As root: the first host uid/gid of the range that ids inside sandboxes map to.
    pub uid_base: u32,
    /// Set `no_new_privs` on every sandboxed process (this disables `sudo` inside).
    pub no_new_privs: bool,
    /// Seconds that `stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: u64,
    /// The tier of a new sandbox when `create` names none: `namespaces` or `gvisor`.
    pub isolation: moat_api::Isolation,
    /// The gVisor tier's runsc; empty: the first `runsc` on `PATH`.
    pub runsc: String,
    /// The gVisor tier's platform: `auto` (systrap where runsc has it, else
    /// ptrace), `systrap`, `ptrace` or `kvm`.
    pub gvisor_platform: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// The model runner's port on the host's loopback and inside every sandbox.
    pub port: u16,
    /// llama.cpp threads per model; 0: the physical cores.
    pub threads: u32,
    /// Requests each loaded model decodes together.
    pub slots: u32,
    /// Tokens of context when neither `configure` nor the package says.
    pub context_size: u32,
    /// How long an idle model stays loaded: "5m", "0" (unload at once), "-1" (forever).
    pub keep_alive: String,
    /// Memory all loaded models may take together, e.g. "12g"; empty: three quarters of RAM.
    pub memory_budget: String,
    /// Disk the prompt cache may take, all models together ("4g"); "0": no prompt cache.
    pub prompt_cache_size: String,
    /// How long a client may take to send a request's head, and then its body ("30s").
    pub header_timeout: String,
    /// How long a connection with nothing in flight may stay silent ("60s").
    pub idle_timeout: String,
    /// Connections one sandbox may hold to its model runner door; 0: no cap.
    pub max_connections: u32,
    /// Messages one chat request may carry; 0: no limit.
    pub max_messages: u32,
    /// Steps the chat template may take to render one request.
    pub template_steps: u64,
}

/// `sandbox.cpus`: a number of cores, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum CpuLimit {
    Cores(f64),
    Auto(AutoWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

impl CpuLimit {
    /// The limit in cores; None for no limit.
    pub fn cores(self) -> Option<f64> {
        match self {
            CpuLimit::Cores(c) => Some(c).filter(|c| *c > 0.0),
            CpuLimit::Auto(_) => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                Some(cores.saturating_sub(1).max(1) as f64)
            }
        }
    }
}

impl std::str::FromStr for CpuLimit {
    type Err = std::num::ParseFloatError;
    fn from_str(s: &str) -> Result<CpuLimit, Self::Err> {
        if s.trim() == "auto" {
            return Ok(CpuLimit::Auto(AutoWord::Auto));
        }
        s.trim().parse().map(CpuLimit::Cores)
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory: "4g".into(),
            cpus: CpuLimit::Auto(AutoWord::Auto),
            pids_limit: 4096,
            disk: "10g".into(),
            uid_base: 1_000_000_000,
            no_new_privs: false,
            stop_timeout: 5,
            isolation: moat_api::Isolation::Namespaces,
            runsc: String::new(),
            gvisor_platform: "auto".into(),
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            port: 12434,
            threads: 0,
            slots: 4,
            context_size: 4096,
            keep_alive: "5m".into(),
            memory_budget: String::new(),
            prompt_cache_size: "4g".into(),
            header_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            max_connections: 64,
            max_messages: 4096,
            template_steps: moat_models::chat::DEFAULT_TEMPLATE_STEPS,
        }
    }
}

impl ModelsConfig {
    /// What the model runner's doors and requests may take, parsed.
    pub fn limits(&self) -> Result<moat_models::api::Limits, DaemonError> {
        let duration = |key: &str, text: &str| positive_duration("models", key, text);
        Ok(moat_models::api::Limits {
            header_timeout: duration("header_timeout", &self.header_timeout)?,
            idle_timeout: duration("idle_timeout", &self.idle_timeout)?,
            max_connections: self.max_connections as usize,
            max_messages: self.max_messages as usize,
            template_steps: self.template_steps.max(1),
        })
    }
}

/// Where the configuration file is looked for.
pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_CONFIG") {
        return PathBuf::from(p);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/moat/config.toml");
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("moat/config.toml")
}

impl Config {
    /// Read the file (if any), then apply the environment.
    pub fn load() -> Result<Config, DaemonError> {
        let path = config_path();
        let mut cfg = Config::from_file(&path)?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, DaemonError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| DaemonError::Config(format!("{}: {}", path.display(), e.message()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(DaemonError::Config(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Environment variables override the file: `MOAT_<SECTION>_<KEY>` in upper case.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), DaemonError> {
        fn parse<T: std::str::FromStr>(key: &str, v: String) -> Result<T, DaemonError> {
            v.trim()
                .parse()
                .map_err(|_| DaemonError::Config(format!("{key}={v:?} is not a valid value")))
        }
        if let Some(v) = get("MOAT_SANDBOX_MEMORY") {
            parse_size(&v).map_err(DaemonError::Config)?;
            self.sandbox.memory = v;
        }
        if let Some(v) = get("MOAT_SANDBOX_CPUS") {
            self.sandbox.cpus = parse("MOAT_SANDBOX_CPUS", v)?;
        }
        if let Some(v) = get("MOAT_SANDBOX_PIDS_LIMIT") {
            self.sandbox.pids_limit = parse("MOAT_SANDBOX_PIDS_LIMIT", v)?;
        }
        if let Some(v) = get("MOAT_SANDBOX_DISK") {
            self.sandbox.disk = v;
        }
        if let Some(v) = get("MOAT_SANDBOX_ISOLATION") {
            self.sandbox.isolation = v
                .trim()
                .parse()
                .map_err(|e| DaemonError::Config(format!("MOAT_SANDBOX_ISOLATION: {e}")))?;
        }
        if let Some(v) = get("MOAT_SANDBOX_RUNSC") {
            self.sandbox.runsc = v;
        }
        if let Some(v) = get("MOAT_SANDBOX_GVISOR_PLATFORM") {
            self.sandbox.gvisor_platform = v;
        }
        if let Some(v) = get("MOAT_SANDBOX_UID_BASE") {
            self.sandbox.uid_base = parse("MOAT_SANDBOX_UID_BASE", v)?;
        }
        if let Some(v) = get("MOAT_SANDBOX_NO_NEW_PRIVS") {
            self.sandbox.no_new_privs = parse("MOAT_SANDBOX_NO_NEW_PRIVS", v)?;
        }
        if let Some(v) = get("MOAT_SANDBOX_STOP_TIMEOUT") {
            self.sandbox.stop_timeout = parse("MOAT_SANDBOX_STOP_TIMEOUT", v)?;
        }
        if let Some(v) = get("MOAT_GATEWAY_DEFAULT_POLICY") {
            self.gateway.default_policy = v;
        }
        if let Some(v) = get("MOAT_GATEWAY_HOSTS") {
            for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
                let (name, addr) = pair.split_once('=').ok_or_else(|| {
                    DaemonError::Config(format!(
                        "MOAT_GATEWAY_HOSTS: {pair:?} is not NAME=ADDRESS[:PORT]"
                    ))
                })?;
                self.gateway
                    .hosts
                    .insert(name.trim().to_string(), addr.trim().to_string());
            }
        }
        if let Some(v) = get("MOAT_EXTRA_CA_CERTS") {
            self.gateway
                .extra_ca_certs
                .extend(v.split(':').filter(|p| !p.is_empty()).map(String::from));
        }
        if let Some(v) = get("MOAT_GATEWAY_HEADER_TIMEOUT") {
            self.gateway.header_timeout = v;
        }
        if let Some(v) = get("MOAT_GATEWAY_IDLE_TIMEOUT") {
            self.gateway.idle_timeout = v;
        }
        if let Some(v) = get("MOAT_GATEWAY_TUNNEL_IDLE_TIMEOUT") {
            self.gateway.tunnel_idle_timeout = v;
        }
        if let Some(v) = get("MOAT_GATEWAY_TLS_HANDSHAKE_TIMEOUT") {
            self.gateway.tls_handshake_timeout = v;
        }
        if let Some(v) = get("MOAT_GATEWAY_MAX_CONNECTIONS") {
            self.gateway.max_connections = parse("MOAT_GATEWAY_MAX_CONNECTIONS", v)?;
        }
        // Ids inside map to uid_base..uid_base+65536 and each sandbox's
        // namespace owner above that: all of it must be unprivileged ids
        // that no host user has.
        if self.sandbox.uid_base < 65536 || self.sandbox.uid_base > u32::MAX - 65536 - 1_000_001 {
            return Err(DaemonError::Config(format!(
                "sandbox.uid_base = {}: it must be at least 65536 and leave 1,065,536 ids above it; the default is 1000000000",
                self.sandbox.uid_base
            )));
        }
        self.gateway.static_names()?;
        self.gateway.limits()?;
        moat_gateway::Policy::preset(&self.gateway.default_policy)
            .map_err(|e| DaemonError::Config(format!("gateway.default_policy: {e}")))?;
        if let Some(v) = get("MOAT_REGISTRY_MIRRORS") {
            self.registry.mirrors = v
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(v) = get("MOAT_INSECURE_REGISTRIES") {
            self.registry.insecure.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(String::from),
            );
        }
        if let Some(v) = get("MOAT_MODEL_PORT") {
            self.models.port = parse("MOAT_MODEL_PORT", v)?;
        }
        if let Some(v) = get("MOAT_MODELS_HEADER_TIMEOUT") {
            self.models.header_timeout = v;
        }
        if let Some(v) = get("MOAT_MODELS_IDLE_TIMEOUT") {
            self.models.idle_timeout = v;
        }
        if let Some(v) = get("MOAT_MODELS_MAX_CONNECTIONS") {
            self.models.max_connections = parse("MOAT_MODELS_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = get("MOAT_MODELS_MAX_MESSAGES") {
            self.models.max_messages = parse("MOAT_MODELS_MAX_MESSAGES", v)?;
        }
        if let Some(v) = get("MOAT_MODELS_TEMPLATE_STEPS") {
            self.models.template_steps = parse("MOAT_MODELS_TEMPLATE_STEPS", v)?;
        }
        self.models.limits()?;
        parse_size(&self.sandbox.memory).map_err(DaemonError::Config)?;
        self.default_disk()?;
        Ok(())
    }

    pub fn default_memory(&self) -> Option<u64> {
        parse_size(&self.sandbox.memory).ok().filter(|m| *m > 0)
    }

    /// `sandbox.disk` in bytes; None for no budget (`0`).
    pub fn default_disk(&self) -> Result<Option<u64>, DaemonError> {
        let bad = |e: String| DaemonError::Config(format!("sandbox.disk: {e}"));
        let bytes = parse_size(&self.sandbox.disk).map_err(bad)?;
        crate::disk::check_budget(bytes).map_err(|e| bad(e.to_string()))
    }
}

/// `512m`, `4g`, `1.5g`, `1048576` (bytes) → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 512m or 4g"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("{s:?} is not a size: write e.g. 512m or 4g"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let mut cfg: Config =
            toml::from_str("[sandbox]\nmemory = \"1g\"\npids_limit = 10\n").unwrap();
        cfg.apply_env(|k| (k == "MOAT_SANDBOX_PIDS_LIMIT").then(|| "20".to_string()))
            .unwrap();
        let mut want = Config::default();
        want.sandbox.memory = "1g".into();
        want.sandbox.pids_limit = 20;
        assert_eq!(cfg, want);
    }

    #[test]
    fn the_disk_budget_comes_from_the_file_and_the_environment() {
        assert_eq!(Config::default().default_disk().unwrap(), Some(10 << 30));
        let mut cfg: Config = toml::from_str("[sandbox]\ndisk = \"2g\"\n").unwrap();
        cfg.apply_env(|_| None).unwrap();
        assert_eq!(cfg.default_disk().unwrap(), Some(2 << 30));
        cfg.apply_env(|k| (k == "MOAT_SANDBOX_DISK").then(|| "256m".to_string()))
            .unwrap();
        assert_eq!(cfg.default_disk().unwrap(), Some(256 << 20));
        cfg.apply_env(|k| (k == "MOAT_SANDBOX_DISK").then(|| "0".to_string()))
            .unwrap();
        assert_eq!(cfg.default_disk().unwrap(), None);
        for bad in ["12q", "1k"] {
            let mut cfg = Config::default();
            let err = cfg
                .apply_env(|k| (k == "MOAT_SANDBOX_DISK").then(|| bad.to_string()))
                .unwrap_err()
                .to_string();
            assert!(err.contains("sandbox.disk"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[sandbox]\nmemroy = \"1g\"\n").is_err());
        let mut cfg = Config::default();
        assert!(cfg
            .apply_env(|k| (k == "MOAT_SANDBOX_CPUS").then(|| "many".to_string()))
            .is_err());
    }

    #[test]
    fn model_runner_limits_come_from_the_file_and_the_environment() {
        let mut cfg: Config =
            toml::from_str("[models]\nheader_timeout = \"5s\"\nmax_connections = 8\n").unwrap();
        cfg.apply_env(|k| match k {
            "MOAT_MODELS_IDLE_TIMEOUT" => Some("2s".into()),
            "MOAT_MODELS_MAX_MESSAGES" => Some("100".into()),
            _ => None,
        })
        .unwrap();
        let limits = cfg.models.limits().unwrap();
        assert_eq!(limits.header_timeout, std::time::Duration::from_secs(5));
        assert_eq!(limits.idle_timeout, std::time::Duration::from_secs(2));
        assert_eq!(limits.max_connections, 8);
        assert_eq!(limits.max_messages, 100);
        assert_eq!(
            Config::default().models.limits().unwrap(),
            moat_models::api::Limits::default()
        );
        let mut bad = Config::default();
        assert!(bad
            .apply_env(|k| (k == "MOAT_MODELS_HEADER_TIMEOUT").then(|| "soon".to_string()))
            .is_err());
    }

    #[test]
    fn gateway_limits_come_from_the_file_and_the_environment() {
        let mut cfg: Config =
            toml::from_str("[gateway]\ntunnel_idle_timeout = \"5m\"\nmax_connections = 8\n")
                .unwrap();
        cfg.apply_env(|k| match k {
            "MOAT_GATEWAY_IDLE_TIMEOUT" => Some("2s".into()),
            "MOAT_GATEWAY_TLS_HANDSHAKE_TIMEOUT" => Some("3s".into()),
            _ => None,
        })
        .unwrap();
        let limits = cfg.gateway.limits().unwrap();
        let secs = std::time::Duration::from_secs;
        assert_eq!(
            (
                limits.header_timeout,
                limits.idle_timeout,
                limits.tunnel_idle_timeout,
                limits.tls_handshake_timeout,
                limits.max_connections
            ),
            (secs(30), secs(2), secs(300), secs(3), 8)
        );
        assert_eq!(
            Config::default().gateway.limits().unwrap(),
            moat_gateway::Limits::default()
        );
        let mut bad = Config::default();
        assert!(bad
            .apply_env(|k| (k == "MOAT_GATEWAY_TUNNEL_IDLE_TIMEOUT").then(|| "later".to_string()))
            .is_err());
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let text = include_str!("../../../config.example.toml");
        assert_eq!(toml::from_str::<Config>(text).unwrap(), Config::default());
    }
}

//! The daemon's side of the egress gateway: each running sandbox's door at
//! 127.0.0.1:3128, its policy (kept in the database, applied at once), the
//! network log (written in batches by one thread), and the environment that
//! points the sandbox's tools at the proxy.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};

use moat_api::NetworkProxyRequest;
use moat_gateway::{
    policy::Default as PolicyDefault, Action, LogEntry, LoopbackDialer, Policy, Rule,
};
use nix::sys::socket::{bind, connect, listen, setsockopt, sockopt, Backlog, SockaddrIn};

use crate::sandboxes::Daemon;
use crate::state::State;
use crate::DaemonError;

/// The gateway's port inside every sandbox.
pub const GATEWAY_PORT: u16 = 3128;

/// Where a sandbox's CA certificate and the bundle that includes it appear inside.
pub const CA_CERT_INSIDE: &str = "/usr/local/share/ca-certificates/moat-proxy-ca.crt";
pub const CA_BUNDLE_INSIDE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The settings every process in a sandbox gets: the proxy, the CA bundle,
/// and `proxy-managed` in each key variable the host has a key for.
pub fn sandbox_env(key_vars: &[String]) -> Vec<String> {
    let proxy = format!("http://host.docker.internal:{GATEWAY_PORT}");
    let mut env = Vec::new();
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push(format!("{key}={proxy}"));
    }
    // The model runner's name resolves to the sandbox's own loopback (its
    // door), so it is reached directly, not through the gateway.
    for key in ["NO_PROXY", "no_proxy"] {
        env.push(format!(
            "{key}=localhost,127.0.0.1,::1,model-runner.docker.internal"
        ));
    }
    env.push(format!("SSL_CERT_FILE={CA_BUNDLE_INSIDE}"));
    env.push(format!("REQUESTS_CA_BUNDLE={CA_BUNDLE_INSIDE}"));
    env.push(format!("NODE_EXTRA_CA_CERTS={CA_CERT_INSIDE}"));
    for var in key_vars {
        env.push(format!("{var}={}", moat_gateway::credentials::PLACEHOLDER));
    }
    env
}

/// Start the thread that writes log rows to the database; returns the sink's sender.
pub fn start_log_writer(db: std::path::PathBuf) -> mpsc::Sender<LogEntry> {
    let (tx, rx) = mpsc::channel::<LogEntry>();
    std::thread::spawn(move || {
        let Ok(mut state) = State::open(&db) else {
            return;
        };
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            if let Err(e) = state.append_log(&batch) {
                tracing::warn!("network log: {e}");
            }
        }
    });
    tx
}

impl Daemon {
    /// The sandbox's policy: as stored, or the configured default for a new one.
    pub(crate) fn policy_of(&self, id: &str) -> Result<Policy, DaemonError> {
        match self.state().policy(id)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| DaemonError::State(format!("policy of {id}: {e}"))),
            None => Ok(Policy::preset(&self.config().gateway.default_policy)
                .map_err(|e| DaemonError::Config(e.to_string()))?),
        }
    }

    /// Open the sandbox's door to the gateway: a listener on 127.0.0.1:3128
    /// inside its network namespace, served by the gateway.
    pub(crate) fn open_gateway_door(
        &self,
        id: &str,
        name: &str,
        netns: moat_sandbox::control::NetnsId,
    ) -> Result<(), DaemonError> {
        let fd = moat_sandbox::control::door_socket(&self.control_path(id), netns, false)?;
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, GATEWAY_PORT));
        let sys = |what: &str, e: nix::Error| {
            DaemonError::io(format!("gateway door of {name}: {what}"), e.into())
        };
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| sys("SO_REUSEADDR", e))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| sys("bind 127.0.0.1:3128", e))?;
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| sys("listen", e))?;
        let listener = std::net::TcpListener::from(fd);
        let policy = self.policy_of(id)?;
        let ca = self.sandbox_ca(id)?;
        let loopback = self.model_runner_via_gateway(id, netns);
        self.gateway()
            .attach_with(id, name, policy, Some(&ca), listener, loopback)
            .map_err(|e| DaemonError::io("gateway", std::io::Error::other(e)))
    }

    /// The model runner's port on the host's loopback, reached through the
    /// gateway (`--allow-host localhost`), leads to the sandbox's own model
    /// door, not to the host's listener: the door answers in the sandbox's
    /// scope (inference and reading), the host's in the host's (pull,
    /// delete, unload, configure). The connection is made from inside the
    /// sandbox's network namespace, so it gains nothing the sandbox could
    /// not reach directly.
    fn model_runner_via_gateway(
        &self,
        id: &str,
        netns: moat_sandbox::control::NetnsId,
    ) -> HashMap<u16, LoopbackDialer> {
        let control = self.control_path(id);
        let dialer: LoopbackDialer = Arc::new(move || {
            let fd = moat_sandbox::control::door_socket(&control, netns, false)
                .map_err(std::io::Error::other)?;
            let door = SockaddrIn::from(SocketAddrV4::new(
                Ipv4Addr::LOCALHOST,
                crate::model_runner::MODEL_PORT_INSIDE,
            ));
            connect(fd.as_raw_fd(), &door).map_err(std::io::Error::from)?;
            Ok(std::net::TcpStream::from(fd))
        });
        HashMap::from([(self.config().models.port, dialer)])
    }

    /// The sandbox's CA, made on first use; its key stays in the sandbox's
    /// state directory on the host, readable by the daemon's user only.
    pub(crate) fn sandbox_ca(&self, id: &str) -> Result<moat_gateway::tls::CaPem, DaemonError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.paths().sandbox_state(id);
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(&cert_path),
            std::fs::read_to_string(&key_path),
        ) {
            return Ok(moat_gateway::tls::CaPem { cert, key });
        }
        let name = self
            .state()
            .all()?
            .into_iter()
            .find(|r| r.info.id == id)
            .map(|r| r.info.name)
            .unwrap_or_default();
        let ca = moat_gateway::tls::new_ca(&name).map_err(|e| DaemonError::State(e.to_string()))?;
        let write = |path: &std::path::Path, text: &str, mode: u32| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)?;
            f.write_all(text.as_bytes())
        };
        write(&key_path, &ca.key, 0o600)
            .map_err(|e| DaemonError::io("write the sandbox's CA key", e))?;
        write(&cert_path, &ca.cert, 0o644)
            .map_err(|e| DaemonError::io("write the sandbox's CA", e))?;
        Ok(ca)
    }

    /// Read the keys again (secrets file and environment) and hand them to the gateway.
    pub(crate) fn refresh_credentials(&self) {
        let services = crate::secrets::all_services(&self.config().gateway.services);
        let creds = self
            .secrets()
            .credentials(&services, |v| std::env::var(v).ok());
        let mut vars: Vec<String> = creds
            .iter()
            .flat_map(|(c, _)| c.service.env.clone())
            .collect();
        vars.sort();
        vars.dedup();
        self.gateway()
            .set_credentials(creds.into_iter().map(|(c, _)| c).collect());
        *self.key_vars.lock().unwrap_or_else(|p| p.into_inner()) = vars;
    }

    /// The environment of every process started in a sandbox.
    pub(crate) fn sandbox_env(&self) -> Vec<String> {
        sandbox_env(&self.key_vars.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn secret_set(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Vec<crate::secrets::SecretStatus>, DaemonError> {
        let services = crate::secrets::all_services(&self.config().gateway.services);
        self.secrets().set(&services, name, key)?;
        self.refresh_credentials();
        self.secret_ls()
    }

    pub fn secret_rm(&self, name: &str) -> Result<Vec<crate::secrets::SecretStatus>, DaemonError> {
        self.secrets().remove(name)?;
        self.refresh_credentials();
        self.secret_ls()
    }

    pub fn secret_ls(&self) -> Result<Vec<crate::secrets::SecretStatus>, DaemonError> {
        let services = crate::secrets::all_services(&self.config().gateway.services);
        Ok(self.secrets().status(&services, |v| std::env::var(v).ok()))
    }

    pub fn network_proxy(
        &self,
        req: NetworkProxyRequest,
    ) -> Result<serde_json::Value, DaemonError> {
        let info = self.inspect(&req.name)?;
        let mut policy = match &req.preset {
            Some(preset) => {
                Policy::preset(preset).map_err(|e| DaemonError::BadRequest(e.to_string()))?
            }
            None => self.policy_of(&info.id)?,
        };
        match req.policy.as_deref() {
            None => {}
            Some("allow") => policy.default = PolicyDefault::Allow,
            Some("deny") => policy.default = PolicyDefault::Deny,
            Some(other) => {
                return Err(DaemonError::BadRequest(format!(
                    "--policy takes allow or deny, not {other:?}"
                )))
            }
        }
        let bad = |e: moat_gateway::policy::RuleError| DaemonError::BadRequest(e.to_string());
        let host_rules = [
            (Action::Allow, &req.allow_hosts),
            (Action::Block, &req.block_hosts),
            (Action::Bypass, &req.bypass_hosts),
        ];
        let cidr_rules = [
            (Action::Allow, &req.allow_cidrs),
            (Action::Block, &req.block_cidrs),
            (Action::Bypass, &req.bypass_cidrs),
        ];
        for (action, list) in host_rules {
            for spec in list {
                policy.add(Rule::host(action, spec).map_err(bad)?);
            }
        }
        for (action, list) in cidr_rules {
            for spec in list {
                policy.add(Rule::cidr(action, spec).map_err(bad)?);
            }
        }
        let text = serde_json::to_string(&policy).map_err(|e| DaemonError::State(e.to_string()))?;
        self.state().set_policy(&info.id, &text)?;
        self.gateway().set_policy(&info.id, policy.clone());
        serde_json::to_value(&policy).map_err(|e| DaemonError::State(e.to_string()))
    }

    pub fn network_log(
        &self,
        name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LogEntry>, DaemonError> {
        if let Some(n) = name {
            self.inspect(n)?;
        }
        self.state().network_log(name, i64::from(limit.max(1)))
    }
}

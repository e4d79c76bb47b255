//! The daemon's side of the model runner: the service on the host's
//! `127.0.0.1:12434`, a door at the same address inside every running
//! sandbox, and the CLI's requests that are about running models rather
//! than storing them (`run`, `ps`, `unload`, `configure`, `status`, `logs`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use moat_api::{ModelChatRequest, Reply};
use moat_models::api::generation::{ChatInput, Out};
use moat_models::api::{ModelService, ModelSettings, Scope};
use moat_models::engine::{Runner, RunnerConfig};
use nix::sys::socket::{bind, listen, setsockopt, sockopt, Backlog, SockaddrIn};

use crate::config::{parse_size, Config};
use crate::sandboxes::lock;
use crate::server::Replies;

/// The model runner's port inside every sandbox (Docker Model Runner's).
pub const MODEL_PORT_INSIDE: u16 = 12434;
use crate::{DaemonError, Paths};

/// Start the model runner: its workers' supervisor and the HTTP service.
/// The host listener is opened by [`Daemon::listen_models`].
pub(crate) fn start(
    paths: &Paths,
    config: &Config,
    exe: &std::path::Path,
    store: Arc<moat_models::store::ModelStore>,
) -> Result<Arc<ModelService>, DaemonError> {
    let c = &config.models;
    let mut rc = RunnerConfig::for_host(exe.to_path_buf(), paths.state.join("logs").join("models"));
    if c.threads > 0 {
        rc.threads = c.threads as i32;
    }
    rc.slots = c.slots.max(1);
    rc.default_context = c.context_size.max(256);
    rc.keep_alive = moat_models::api::parse_keep_alive(&c.keep_alive)
        .map_err(|e| DaemonError::Config(format!("models.keep_alive: {}", e.message)))?;
    if !c.memory_budget.is_empty() {
        rc.memory_budget = parse_size(&c.memory_budget)
            .map_err(|e| DaemonError::Config(format!("models.memory_budget: {e}")))?;
    }
    let cache_size = parse_size(&c.prompt_cache_size)
        .map_err(|e| DaemonError::Config(format!("models.prompt_cache_size: {e}")))?;
    rc.prompt_cache = (cache_size > 0).then(|| (prompt_cache_root(paths), cache_size));
    let limits = c.limits()?;
    let runner = Runner::new(rc);
    ModelService::with_limits(
        store,
        runner,
        paths.state.join("models").join("settings.json"),
        limits,
    )
    .map_err(|e| DaemonError::io("start the model runner", e))
}

/// Where the model workers keep their prompt caches: a folder per model.
pub(crate) fn prompt_cache_root(paths: &Paths) -> std::path::PathBuf {
    paths.state.join("prompt-cache")
}

impl crate::sandboxes::Daemon {
    /// Serve the model runner on the host's loopback. A port in use is not
    /// fatal: sandboxes and everything else still work, and the warning
    /// says how to move it.
    pub(crate) fn listen_models(&self) {
        let port = self.config.models.port;
        let failed = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(listener) => self
                .model_service
                .serve("host", Scope::Host, listener)
                .err()
                .map(|e| e.to_string()),
            Err(e) => Some(format!(
                "cannot listen on 127.0.0.1:{port} ({e}); set MOAT_MODEL_PORT or [models] port to another port and restart the daemon"
            )),
        };
        if let Some(why) = &failed {
            tracing::warn!("model runner: {why}");
        }
        *lock(&self.models_unreachable) = failed;
    }

    /// Open the sandbox's door to the model runner: a listener on
    /// 127.0.0.1:12434 inside its network namespace, whatever port the host
    /// side uses (that one may be moved off a busy port; inside, nothing
    /// else can hold it, and agents' configurations name 12434).
    pub(crate) fn open_model_door(
        &self,
        id: &str,
        name: &str,
        netns: moat_sandbox::control::NetnsId,
    ) -> Result<(), DaemonError> {
        let port = MODEL_PORT_INSIDE;
        let fd = moat_sandbox::control::door_socket(&self.control_path(id), netns, false)?;
        let sys = |what: &str, e: nix::Error| {
            DaemonError::io(format!("model runner door of {name}: {what}"), e.into())
        };
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| sys("SO_REUSEADDR", e))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| sys(&format!("bind 127.0.0.1:{port}"), e))?;
        listen(&fd, Backlog::new(256).unwrap_or(Backlog::MAXCONN)).map_err(|e| sys("listen", e))?;
        self.model_service
            .serve(id, Scope::Sandbox, std::net::TcpListener::from(fd))
            .map_err(|e| DaemonError::io(format!("model runner door of {name}"), e))
    }

    /// `moat model run`: one turn of a chat, streamed as text replies; no
    /// messages only loads the model (`run -d`).
    pub(crate) fn model_chat(
        &self,
        req: ModelChatRequest,
        r: &Replies,
    ) -> Result<serde_json::Value, DaemonError> {
        let svc = self.model_service.clone();
        let model = req.model.clone();
        let messages: Vec<serde_json::Value> = req
            .messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        svc.clone().block_on(async move {
            if messages.is_empty() {
                let (worker, _) = svc.load(&model, None).await.map_err(api_error)?;
                return Ok(serde_json::json!({"loaded": model, "pid": worker.pid()}));
            }
            let mut input = ChatInput::new(model, messages);
            input.max_tokens = req.max_tokens;
            let mut gen = svc.start_chat(input).await.map_err(api_error)?;
            while let Some(out) = gen.next(&svc).await {
                match out.map_err(api_error)? {
                    Out::Text(text) => r.send(&Reply::Text { text }),
                    Out::ToolCalls(_) => {}
                    Out::Done(s) => {
                        return Ok(serde_json::json!({
                            "finish_reason": s.finish.openai(),
                            "prompt_tokens": s.prompt_tokens,
                            "completion_tokens": s.completion_tokens,
                            "timings": s.timings,
                        }))
                    }
                }
            }
            Err(DaemonError::BadRequest(
                "the model stopped without an answer; see `moat model logs`".into(),
            ))
        })
    }

    pub(crate) fn model_ps(&self) -> Result<serde_json::Value, DaemonError> {
        Ok(serde_json::to_value(self.model_service.runner.loaded()).unwrap_or_default())
    }

    pub(crate) fn model_unload(
        &self,
        models: &[String],
        all: bool,
    ) -> Result<serde_json::Value, DaemonError> {
        let svc = &self.model_service;
        let n = if all {
            svc.runner.unload(None)
        } else {
            let ids = models
                .iter()
                .map(|m| svc.find(m).map(|m| m.id).map_err(api_error))
                .collect::<Result<Vec<_>, _>>()?;
            svc.runner.unload(Some(&ids))
        };
        Ok(serde_json::json!({"unloaded_runners": n}))
    }

    /// `moat model configure`: `change` holds what to set (its keep-alive
    /// comes as the text `keep_alive`, read here).
    pub(crate) fn model_configure(
        &self,
        model: &str,
        keep_alive: Option<String>,
        change: ModelSettings,
    ) -> Result<serde_json::Value, DaemonError> {
        let svc = &self.model_service;
        let m = svc.find(model).map_err(api_error)?;
        if change.max_tokens == Some(0) {
            return Err(DaemonError::BadRequest(
                "--max-tokens 0 leaves no room for an answer; give 1 or more".into(),
            ));
        }
        let context_size = change.context_size;
        if let Some(t) = change.temperature {
            moat_models::api::check_temperature(t)
                .map_err(|why| DaemonError::BadRequest(format!("--temperature: {why}")))?;
        }
        if let Some(c) = context_size {
            if !(256..=1 << 20).contains(&c) {
                return Err(DaemonError::BadRequest(format!(
                    "--context-size {c} is out of range; give 256 to 1048576 tokens"
                )));
            }
        }
        let keep_alive = match keep_alive {
            Some(k) => Some(
                match moat_models::api::parse_keep_alive(&k).map_err(api_error)? {
                    Some(d) => d.as_secs() as i64,
                    None => -1,
                },
            ),
            None => None,
        };
        let now = svc
            .configure(
                &m.id,
                ModelSettings {
                    keep_alive,
                    ..change
                },
            )
            .map_err(api_error)?;
        // A new context size takes effect at the next load.
        if context_size.is_some() {
            svc.runner.unload(Some(std::slice::from_ref(&m.id)));
        }
        Ok(serde_json::to_value(now).unwrap_or_default())
    }

    pub(crate) fn model_status(&self) -> Result<serde_json::Value, DaemonError> {
        let svc = &self.model_service;
        let c = svc.runner.config();
        // Sandboxes reach it through their doors even when the host's port failed.
        let unreachable = lock(&self.models_unreachable).clone();
        Ok(serde_json::json!({
            "running": unreachable.is_none(),
            "error": unreachable,
            "backend": "llama.cpp",
            "endpoint": format!("http://127.0.0.1:{}/engines/llama.cpp/v1/", self.config.models.port),
            "port": self.config.models.port,
            "threads": c.threads,
            "slots": c.slots,
            "context_size": c.default_context,
            "keep_alive": c.keep_alive.map_or("-1".to_string(), |d| humantime::format_duration(d).to_string()),
            "memory_budget": c.memory_budget,
            "loaded": svc.runner.loaded(),
            "logs": svc.runner.log_dir().display().to_string(),
        }))
    }

    /// The log of a model's worker, for `moat model logs`.
    pub(crate) fn model_logs(&self, model: Option<&str>) -> Result<serde_json::Value, DaemonError> {
        let svc = &self.model_service;
        let path = match model {
            Some(m) => {
                let found = svc.find(m).map_err(api_error)?;
                let name = found.tags.first().cloned().unwrap_or_else(|| m.to_string());
                svc.runner.log_path(&name)
            }
            None => svc.runner.log_dir().to_path_buf(),
        };
        Ok(serde_json::json!({"path": path.display().to_string()}))
    }
}

pub(crate) fn api_error(e: moat_models::api::http::ApiError) -> DaemonError {
    DaemonError::BadRequest(e.message)
}

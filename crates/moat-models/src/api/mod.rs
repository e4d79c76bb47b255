//! The model runner's HTTP server: Docker Model Runner's routes, OpenAI's,
//! Anthropic's and Ollama's, on `127.0.0.1:12434` on the host and on the
//! same address inside each sandbox (its door). Inside a sandbox only the
//! inference and read-only routes answer: a pull from there would let the
//! sandbox make the host fetch what its network policy forbids, and a
//! delete would reach outside it.

mod anthropic;
mod dmr;
mod door;
pub mod generation;
pub mod http;
mod metrics;
mod ollama;
mod openai;
mod responses;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::engine::{EngineError, Loaded, ModelToLoad, Runner, Sampling, Worker};
use crate::store::{Model, ModelStore, StoreError};
use http::{ApiError, Body, Dialect};

pub use door::Limits;

/// Who is calling: the host sees every route, a sandbox only inference
/// and reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Host,
    Sandbox,
}

impl Scope {
    /// The keep-alive a request may set. A sandbox's is ignored: a model's
    /// lifetime is shared by every sandbox and the host, so `0` from one
    /// would unload it under the others' requests and `-1` pin it for
    /// ever; the model keeps the runner's (or `configure`'s) keep-alive.
    pub fn keep_alive(self, asked: Option<Option<Duration>>) -> Option<Option<Duration>> {
        match self {
            Scope::Host => asked,
            Scope::Sandbox => None,
        }
    }
}

/// Per-model settings from `moat model configure`, kept across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_size: Option<u32>,
    /// Seconds; negative: forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<i64>,
    /// The temperature every request is sampled at, in place of the one
    /// the client asks for: for agents whose clients send their own (0 is
    /// greedy: the same prompt gets the same answer every time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// The seed of every request's sampler, in place of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// The most tokens any answer gets, whatever the client asks for (or
    /// when it asks for no limit): a cap on a model that rambles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

impl ModelSettings {
    /// The sampling a request gets: what it `asked` for, with what these
    /// settings fix in its place.
    pub fn sampling(&self, asked: &Sampling) -> Sampling {
        Sampling {
            temperature: self.temperature.unwrap_or(asked.temperature),
            seed: self.seed.or(asked.seed),
            ..asked.clone()
        }
    }

    /// The answer's limit: what the request `asked` for, within the cap.
    pub fn max_tokens(&self, asked: Option<u32>) -> Option<u32> {
        match (asked, self.max_tokens) {
            (Some(a), Some(cap)) => Some(a.min(cap)),
            (a, cap) => a.or(cap),
        }
    }
}

/// The temperatures `configure` takes: OpenAI's range, which every API
/// here accepts.
pub fn check_temperature(t: f32) -> Result<f32, String> {
    if (0.0..=2.0).contains(&t) {
        Ok(t)
    } else {
        Err(format!("temperature {t} is outside 0 to 2 (0: greedy)"))
    }
}

pub struct ModelService {
    pub store: Arc<ModelStore>,
    pub runner: Arc<Runner>,
    settings_path: PathBuf,
    settings: Mutex<HashMap<String, ModelSettings>>,
    metrics: metrics::Metrics,
    runtime: tokio::runtime::Runtime,
    doors: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    templates: Mutex<HashMap<String, Arc<ChatTemplate>>>,
    limits: Limits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ModelService {
    /// `settings_path` keeps what `configure` set.
    pub fn new(
        store: Arc<ModelStore>,
        runner: Arc<Runner>,
        settings_path: PathBuf,
    ) -> std::io::Result<Arc<ModelService>> {
        Self::with_limits(store, runner, settings_path, Limits::default())
    }

    /// [`ModelService::new`] with the doors' and requests' limits.
    pub fn with_limits(
        store: Arc<ModelStore>,
        runner: Arc<Runner>,
        settings_path: PathBuf,
        limits: Limits,
    ) -> std::io::Result<Arc<ModelService>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-models")
            .enable_all()
            .build()?;
        let settings = std::fs::read(&settings_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Arc::new(ModelService {
            store,
            runner,
            settings_path,
            settings: Mutex::new(settings),
            metrics: metrics::Metrics::default(),
            runtime,
            doors: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            limits,
        }))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serve `listener` until [`ModelService::detach`] names `key`.
    pub fn serve(
        self: &Arc<Self>,
        key: &str,
        scope: Scope,
        listener: std::net::TcpListener,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let _enter = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        if let Some(old) = lock(&self.doors).insert(key.to_string(), stop) {
            let _ = old.send(true);
        }
        let door = door::Door::new(key, scope, &self.limits);
        self.runtime
            .spawn(door::accept_loop(listener, door, self.handler(), stopped));
        Ok(())
    }

    /// The door's view of [`ModelService::route`].
    fn handler(self: &Arc<Self>) -> door::Handler {
        let service = self.clone();
        Arc::new(move |scope, req| -> door::Answer {
            let service = service.clone();
            Box::pin(async move { service.route(scope, req).await })
        })
    }

    /// Stop serving the listener registered as `key`.
    pub fn detach(&self, key: &str) {
        if let Some(stop) = lock(&self.doors).remove(key) {
            let _ = stop.send(true);
        }
    }

    /// Run a future on the service's runtime (for callers outside it, such
    /// as the daemon's API threads).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    async fn route(
        self: Arc<Self>,
        scope: Scope,
        req: hyper::Request<Incoming>,
    ) -> hyper::Response<Body> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        tracing::debug!(%method, %path, "model runner request");
        if path == "/" {
            return http::text(hyper::StatusCode::OK, "The moat model runner is running\n");
        }
        if path == "/health" {
            return http::ok_json(&serde_json::json!({"status": "ok"}));
        }
        if path == "/metrics" {
            return self.metrics.render(&self.runner.loaded());
        }
        if let Some(rest) = path.strip_prefix("/anthropic/v1/") {
            return anthropic::handle(&self, &method, rest, req).await;
        }
        for prefix in ["/engines/llama.cpp/v1/", "/engines/v1/", "/v1/"] {
            if let Some(rest) = path.strip_prefix(prefix) {
                if rest == "messages" || rest.starts_with("messages/") {
                    return anthropic::handle(&self, &method, rest, req).await;
                }
                return openai::handle(&self, &method, rest, req).await;
            }
        }
        if let Some(rest) = path.strip_prefix("/api/") {
            if scope == Scope::Sandbox
                && matches!(rest, "pull" | "push" | "delete" | "create" | "copy")
            {
                return forbidden(Dialect::Ollama);
            }
            return ollama::handle(&self, scope, &method, rest, req).await;
        }
        if path.starts_with("/models") || path.starts_with("/engines") {
            if scope == Scope::Sandbox && !dmr::read_only(&method, &path) {
                return forbidden(Dialect::Plain);
            }
            return dmr::handle(&self, &method, &path, req).await;
        }
        ApiError::not_found(format!("no route {method} {path} on the model runner"))
            .response(Dialect::OpenAi)
    }

    /// Find a model in the store and make sure its worker runs.
    pub async fn load(
        self: &Arc<Self>,
        name: &str,
        keep_alive: Option<Option<Duration>>,
    ) -> Result<(Arc<Worker>, Model), ApiError> {
        let svc = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let model = svc.find(&name)?;
            let settings = svc.settings_of(&model.id);
            let keep_alive = keep_alive.or_else(|| settings.keep_alive.map(keep_alive_from_secs));
            // The header is read (and checked) only to start a worker: a
            // running model answers without it, which matters to every turn.
            if let Some(worker) = svc.runner.running_worker(&model.id, keep_alive) {
                return Ok((worker, model));
            }
            let to_load = to_load(&model, &name, &settings)?;
            let worker = svc
                .runner
                .worker(&to_load, keep_alive)
                .map_err(engine_error)?;
            Ok((worker, model))
        })
        .await
        .map_err(|e| ApiError::new(500, format!("loading the model: {e}")))?
    }

    pub fn find(&self, name: &str) -> Result<Model, ApiError> {
        self.store.get(name).map_err(store_error)
    }

    /// The chat template, compiled once per model: the one packaged with
    /// the model, else the GGUF's, else ChatML (also when the model's own
    /// does not compile, which is logged).
    fn template_for(&self, model: &Model, loaded: &Loaded) -> Result<Arc<ChatTemplate>, ApiError> {
        if let Some(t) = lock(&self.templates).get(&model.id) {
            return Ok(t.clone());
        }
        let source = model
            .chat_template
            .as_deref()
            .or(loaded.chat_template.as_deref());
        let mut template = match ChatTemplate::for_model(source) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(model = %model.id, "the model's chat template does not compile ({e}); using ChatML");
                ChatTemplate::for_model(None).map_err(|e| ApiError::new(500, e.to_string()))?
            }
        };
        template.set_steps(self.limits.template_steps);
        let template = Arc::new(template);
        lock(&self.templates).insert(model.id.clone(), template.clone());
        Ok(template)
    }

    pub fn settings_of(&self, id: &str) -> ModelSettings {
        lock(&self.settings).get(id).cloned().unwrap_or_default()
    }

    pub fn configure(&self, id: &str, change: ModelSettings) -> Result<ModelSettings, ApiError> {
        let mut all = lock(&self.settings);
        let entry = all.entry(id.to_string()).or_default();
        if change.context_size.is_some() {
            entry.context_size = change.context_size;
        }
        if change.keep_alive.is_some() {
            entry.keep_alive = change.keep_alive;
        }
        if change.temperature.is_some() {
            entry.temperature = change.temperature;
        }
        if change.seed.is_some() {
            entry.seed = change.seed;
        }
        if change.max_tokens.is_some() {
            entry.max_tokens = change.max_tokens;
        }
        let now = entry.clone();
        let bytes = serde_json::to_vec_pretty(&*all).unwrap_or_default();
        let tmp = self.settings_path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.settings_path))
            .map_err(|e| ApiError::new(500, format!("saving model settings: {e}")))?;
        Ok(now)
    }
}

fn forbidden(dialect: Dialect) -> hyper::Response<Body> {
    ApiError::new(
        403,
        "managing models is not allowed from inside a sandbox; run `moat model …` on the host",
    )
    .response(dialect)
}

/// DMR's and Ollama's keep-alive: 0 unloads at once, negative never.
pub fn keep_alive_from_secs(secs: i64) -> Option<Duration> {
    (secs >= 0).then(|| Duration::from_secs(secs as u64))
}

/// Parse a keep-alive as Ollama and DMR write it: "5m", "1h30m", "300"
/// (seconds), "0", "-1".
pub fn parse_keep_alive(text: &str) -> Result<Option<Duration>, ApiError> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(keep_alive_from_secs(secs));
    }
    if t.starts_with('-') {
        return Ok(None);
    }
    humantime::parse_duration(t).map(Some).map_err(|e| {
        ApiError::bad_request(format!(
            "keep_alive {t:?}: {e}; use e.g. \"5m\", \"0\" or \"-1\""
        ))
    })
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
        other => ApiError::new(500, other.to_string()),
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::NoMemory(_) | EngineError::WorkerGone(_) => ApiError::new(503, e.to_string()),
        EngineError::Load(_) | EngineError::Io { .. } => ApiError::new(500, e.to_string()),
    }
}

/// What the runner needs to load `model`, with memory estimated from its
/// header: the weights, and the keys and values of each token of context.
fn to_load(model: &Model, name: &str, settings: &ModelSettings) -> Result<ModelToLoad, ApiError> {
    Ok(load_spec(model, name, settings, &read_header(model, name)?))
}

/// The header of a stored model's (first) GGUF file.
fn read_header(model: &Model, name: &str) -> Result<crate::gguf::GgufInfo, ApiError> {
    let first = model
        .gguf_paths
        .first()
        .ok_or_else(|| ApiError::new(500, format!("{name} has no GGUF layer in the store")))?;
    crate::gguf::read_file(first).map_err(|e| {
        ApiError::new(500, format!("{name} is damaged in the store ({e}); remove it with `moat model rm {name}` and pull it again"))
    })
}

/// `to_load` with the header already read.
fn load_spec(
    model: &Model,
    name: &str,
    settings: &ModelSettings,
    info: &crate::gguf::GgufInfo,
) -> ModelToLoad {
    let arch = info.architecture().to_string();
    let get = |k: &str| info.uint(&format!("{arch}.{k}"));
    let layers = get("block_count").unwrap_or(32);
    let embd = get("embedding_length").unwrap_or(4096);
    let heads = get("attention.head_count").unwrap_or(32).max(1);
    let heads_kv = get("attention.head_count_kv").unwrap_or(heads);
    let k_len = get("attention.key_length").unwrap_or(embd / heads);
    let v_len = get("attention.value_length").unwrap_or(embd / heads);
    ModelToLoad {
        id: model.id.clone(),
        name: model
            .tags
            .first()
            .cloned()
            .unwrap_or_else(|| name.to_string()),
        gguf: model.gguf_paths.clone(),
        context_size: settings.context_size.or(model
            .config
            .context_size
            .map(|c| c.min(u64::from(u32::MAX)) as u32)),
        context_train: info
            .context_length()
            .map(|c| c.min(u64::from(u32::MAX)) as u32),
        weights_bytes: model.size,
        // f16 keys and values.
        kv_bytes_per_token: layers * heads_kv * (k_len + v_len) * 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_reads_like_ollama() {
        assert_eq!(
            parse_keep_alive("5m").unwrap(),
            Some(Duration::from_secs(300))
        );
        assert_eq!(parse_keep_alive("0").unwrap(), Some(Duration::ZERO));
        assert_eq!(parse_keep_alive("-1").unwrap(), None);
        assert_eq!(parse_keep_alive("-1m").unwrap(), None);
        assert_eq!(
            parse_keep_alive("90").unwrap(),
            Some(Duration::from_secs(90))
        );
        assert!(parse_keep_alive("soon").is_err());
    }

    #[test]
    fn a_models_sampling_settings_win_over_the_clients() {
        let asked = Sampling {
            temperature: 1.0,
            top_k: 7,
            seed: Some(3),
            ..Sampling::default()
        };
        assert_eq!(ModelSettings::default().sampling(&asked), asked);
        let fixed = ModelSettings {
            temperature: Some(0.0),
            seed: Some(42),
            ..ModelSettings::default()
        };
        assert_eq!(
            fixed.sampling(&asked),
            Sampling {
                temperature: 0.0,
                seed: Some(42),
                ..asked.clone()
            }
        );
        assert_eq!(fixed.max_tokens(Some(9)), Some(9));
        let capped = ModelSettings {
            max_tokens: Some(100),
            ..ModelSettings::default()
        };
        assert_eq!(
            [None, Some(50), Some(500)].map(|asked| capped.max_tokens(asked)),
            [Some(100), Some(50), Some(100)]
        );
        assert_eq!(check_temperature(2.0), Ok(2.0));
        assert_eq!(
            check_temperature(-0.1),
            Err("temperature -0.1 is outside 0 to 2 (0: greedy)".to_string())
        );
    }
}

//! Docker Model Runner's own routes, which `docker model` and moat's CLI
//! speak: the model store (`/models`: list, inspect, delete, tag, and
//! `/models/create`, a registry pull with streamed progress) and the engine
//! (`/engines/status`, `ps`, `df`, `unload`, `_configure`). Shapes follow
//! DMR's Go types, so a client written for Docker's runner reads ours.
//! Inside a sandbox only the reading routes answer ([`read_only`]): a pull
//! or a delete from there would act on the host.
//!
//! The pull and store helpers here are shared with the Ollama routes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::task::JoinHandle;

use super::http::{self, ApiError, Body, Dialect};
use super::ollama::keep_alive_value;
use super::{lock, ModelService, ModelSettings};
use crate::engine::LoadedModel;
use crate::store::{Model, ModelReference, RegistryOptions, Removed, StoreError, Transfer};

type Request = hyper::Request<Incoming>;

/// The engine moat runs, under DMR's backend name.
const BACKEND: &str = "llama.cpp";
/// Contexts `configure` accepts.
const MIN_CONTEXT: i64 = 256;
const MAX_CONTEXT: i64 = 1 << 20;

/// Whether a DMR route may be called from inside a sandbox: the reading
/// ones (inference has its own routes, which never come here).
pub fn read_only(method: &Method, _path: &str) -> bool {
    method == Method::GET
}

pub async fn handle(
    svc: &Arc<ModelService>,
    method: &Method,
    path: &str,
    req: Request,
) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let result = route(svc, method, path, &query, req).await;
    result.unwrap_or_else(|e| e.response(Dialect::Plain))
}

async fn route(
    svc: &Arc<ModelService>,
    method: &Method,
    path: &str,
    query: &str,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    let path = path.trim_end_matches('/');
    match (method, path) {
        (&Method::GET, "/models") => return list(svc).await,
        (&Method::POST, "/models/create") => return create(svc, req).await,
        (&Method::GET, "/engines/status") => {
            return Ok(http::ok_json(
                &json!({BACKEND: format!("running {BACKEND} (moat {})", env!("CARGO_PKG_VERSION"))}),
            ))
        }
        (&Method::GET, "/engines/ps") => {
            let loaded = svc.runner.loaded();
            return Ok(http::ok_json(
                &loaded.iter().map(ps_entry).collect::<Vec<_>>(),
            ));
        }
        (&Method::GET, "/engines/df") => return df(svc).await,
        (&Method::POST, "/engines/unload") => return unload(svc, req).await,
        (&Method::POST, "/engines/_configure" | "/engines/llama.cpp/_configure") => {
            return configure(svc, req).await
        }
        (&Method::GET, "/engines/_configure" | "/engines/llama.cpp/_configure") => {
            return configured(svc).await
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/models/") {
        let name = percent_decode(rest, false);
        match *method {
            Method::POST => {
                if let Some(model) = name.strip_suffix("/tag") {
                    return tag(svc, model.to_string(), query).await;
                }
            }
            Method::GET => return inspect(svc, name).await,
            Method::DELETE => return remove(svc, name, query).await,
            _ => {}
        }
    }
    Err(ApiError::not_found(format!(
        "no route {method} {path} on the model runner"
    )))
}

/// Run store work (file I/O, the store's lock) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, format!("a model store task failed: {e}")))?
}

/// A store error with the status DMR gives it.
pub(super) fn store_status(e: StoreError) -> ApiError {
    match e {
        StoreError::MultipleTags { .. } => ApiError::new(409, e.to_string()),
        StoreError::InvalidReference { .. } | StoreError::AmbiguousId { .. } => {
            ApiError::bad_request(e.to_string())
        }
        other => super::store_error(other),
    }
}

/// How the runner reaches registries: loopback registries in plain HTTP
/// (the image crate's rule), the host's trust store, no stored credentials.
pub(super) fn registry_options() -> RegistryOptions {
    RegistryOptions::default()
}

/// Start pulling `reference` on a blocking thread: its progress arrives on
/// the receiver, which closes when the pull ends; the handle gives the result.
pub(super) fn start_pull(
    svc: &Arc<ModelService>,
    reference: String,
    opts: RegistryOptions,
) -> (
    UnboundedReceiver<Transfer>,
    JoinHandle<Result<Model, StoreError>>,
) {
    let (tx, rx) = unbounded_channel();
    let store = svc.store.clone();
    let handle = svc.runtime().spawn_blocking(move || {
        let report = move |t: Transfer| {
            let _ = tx.send(t);
        };
        store.pull(&reference, &opts, &report)
    });
    (rx, handle)
}

/// A model as DMR's `GET /models` lists it.
fn model_json(m: &Model) -> Value {
    json!({"id": m.id, "tags": m.tags, "created": m.created, "config": m.config})
}

async fn list(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    let store = svc.store.clone();
    let models = blocking(move || store.list().map_err(store_status)).await?;
    Ok(http::ok_json(
        &models.iter().map(model_json).collect::<Vec<_>>(),
    ))
}

async fn inspect(svc: &Arc<ModelService>, name: String) -> Result<Response<Body>, ApiError> {
    let store = svc.store.clone();
    let model = blocking(move || store.get(&name).map_err(store_status)).await?;
    Ok(http::ok_json(&model_json(&model)))
}

/// DMR's (and Docker's) delete answer: what was untagged, what deleted.
fn removed_json(r: &Removed) -> Value {
    let mut actions: Vec<Value> = r.untagged.iter().map(|t| json!({"Untagged": t})).collect();
    if let Some(id) = &r.deleted {
        actions.push(json!({"Deleted": id}));
    }
    Value::Array(actions)
}

/// Go's `strconv.ParseBool`, as DMR reads `force`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

async fn remove(
    svc: &Arc<ModelService>,
    name: String,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let force = match query_param(query, "force") {
        None => false,
        // `?force` alone asks for it.
        Some(v) if v.is_empty() => true,
        Some(v) => parse_bool(&v).ok_or_else(|| {
            ApiError::bad_request(format!("invalid query `force`: {v:?}; use true or false"))
        })?,
    };
    let svc2 = svc.clone();
    let removed = blocking(move || {
        let removed = svc2.store.remove(&name, force).map_err(store_status)?;
        // A deleted model's worker goes too: its files are gone.
        if let Some(id) = &removed.deleted {
            svc2.runner.unload(Some(std::slice::from_ref(id)));
        }
        Ok(removed)
    })
    .await?;
    Ok(http::ok_json(&removed_json(&removed)))
}

async fn tag(
    svc: &Arc<ModelService>,
    model: String,
    query: &str,
) -> Result<Response<Body>, ApiError> {
    let (repo, tag) = match (query_param(query, "repo"), query_param(query, "tag")) {
        (Some(repo), Some(tag)) if !repo.is_empty() && !tag.is_empty() => (repo, tag),
        _ => return Err(ApiError::bad_request("missing repo or tag query parameter")),
    };
    let target = format!("{repo}:{tag}");
    let store = svc.store.clone();
    let t = target.clone();
    blocking(move || store.tag(&model, &t).map_err(store_status)).await?;
    Ok(http::json_response(
        StatusCode::CREATED,
        &json!({"message": format!("Model tagged successfully with {target:?}"), "target": target}),
    ))
}

#[derive(Debug, Deserialize)]
struct CreateRequest {
    from: String,
    #[serde(rename = "bearer-token")]
    bearer_token: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Progress of a pull as DMR streams it: per layer, bytes so far; `total`
/// is every layer seen so far.
#[derive(Debug, Default)]
struct PullProgress {
    /// (short digest, size, bytes so far) per layer.
    layers: Vec<(String, u64, u64)>,
}

impl PullProgress {
    fn line(&mut self, t: &Transfer) -> Value {
        match t {
            Transfer::Step(step) => {
                json!({"type": "progress", "message": step, "total": self.total()})
            }
            Transfer::Bytes { id, done, total } => {
                match self.layers.iter_mut().find(|l| l.0 == *id) {
                    Some(layer) => {
                        (layer.1, layer.2) = (*total, *done);
                    }
                    None => self.layers.push((id.clone(), *total, *done)),
                }
                let downloaded: u64 = self.layers.iter().map(|l| l.2).sum();
                json!({
                    "type": "progress",
                    "message": format!("Downloaded: {:.2} MB", downloaded as f64 / 1e6),
                    "total": self.total(),
                    "layer": {"id": id, "size": total, "current": done},
                })
            }
        }
    }

    fn total(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }
}

async fn create(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: CreateRequest = http::parse(&body)?;
    let reference = ModelReference::parse(&r.from).map_err(store_status)?;
    if r.bearer_token.is_some() {
        return Err(ApiError::bad_request(
            "invalid field `bearer-token`: tokens are not supported; give `username` and `password`",
        ));
    }
    let mut opts = registry_options();
    match (r.username, r.password) {
        (Some(user), Some(password)) => {
            opts.credentials
                .insert(reference.registry().to_string(), (user, password));
        }
        (None, None) => {}
        _ => {
            return Err(ApiError::bad_request(
                "invalid field `username`/`password`: give both or neither",
            ))
        }
    }
    let (mut progress, done) = start_pull(svc, r.from, opts);
    let (tx, resp) = http::streaming("application/x-ndjson");
    svc.runtime().spawn(async move {
        let mut lines = PullProgress::default();
        let mut client = true;
        while let Some(t) = progress.recv().await {
            // A client that goes away does not stop the pull: it finishes
            // into the store, and the next pull finds it there.
            if client {
                client = tx.send(http::ndjson(&lines.line(&t))).await.is_ok();
            }
        }
        let last = match done.await {
            Ok(Ok(_)) => json!({"type": "success", "message": "Model pulled successfully"}),
            Ok(Err(e)) => json!({"type": "error", "message": e.to_string()}),
            Err(e) => json!({"type": "error", "message": format!("the pull failed: {e}")}),
        };
        let _ = tx.send(http::ndjson(&last)).await;
    });
    Ok(resp)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A keep-alive as Go prints a `time.Duration` ("5m0s"); forever is "-1".
fn go_duration(d: Option<Duration>) -> String {
    let Some(d) = d else { return "-1".into() };
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{sec}s")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

/// One `/engines/ps` entry, in DMR's shape (`in_use` only when true).
fn ps_entry(m: &LoadedModel) -> Value {
    let mut v = json!({
        "backend_name": BACKEND,
        "model_name": m.name,
        "mode": "completion",
        "last_used": rfc3339(m.last_used),
        "keep_alive": go_duration(m.keep_alive),
    });
    if m.in_flight > 0 {
        v["in_use"] = json!(true);
    }
    v
}

/// Disk use: the store, and the engine (llama.cpp is linked into the
/// worker binary, so its size is the backend's).
async fn df(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    let svc2 = svc.clone();
    let (models, backend, cache) = blocking(move || {
        let models = svc2.store.disk_usage().map_err(store_status)?;
        let config = svc2.runner.config();
        let backend = std::fs::metadata(&config.worker_exe).map_or(0, |m| m.len());
        let cache = config
            .prompt_cache
            .as_ref()
            .map_or(0, |(root, _)| crate::engine::prompt_cache::disk_usage(root));
        Ok((models, backend, cache))
    })
    .await?;
    Ok(http::ok_json(&json!({
        "models_disk_usage": models,
        "default_backend_disk_usage": backend,
        "prompt_cache_disk_usage": cache,
    })))
}

#[derive(Debug, Default, Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    backend: String,
    #[serde(default)]
    models: Vec<String>,
}

/// The ids of the loaded models `names` mean: through the store, or by
/// the name a model was loaded under when the store no longer has it.
fn resolve_loaded(
    svc: &ModelService,
    names: &[String],
    loaded: &[LoadedModel],
) -> Result<Vec<String>, ApiError> {
    names
        .iter()
        .map(|name| match svc.store.get(name) {
            Ok(m) => Ok(m.id),
            Err(StoreError::NotFound { .. }) => {
                let normal = ModelReference::parse(name).map(|r| r.to_string()).unwrap_or_else(|_| name.clone());
                loaded
                    .iter()
                    .find(|l| l.name == normal || l.name == *name)
                    .map(|l| l.id.clone())
                    .ok_or_else(|| ApiError::not_found(format!("model {name} is neither in the store nor loaded; `moat model ps` lists the loaded ones")))
            }
            Err(e) => Err(store_status(e)),
        })
        .collect()
}

async fn unload(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: UnloadRequest = if body.is_empty() {
        UnloadRequest::default()
    } else {
        http::parse(&body)?
    };
    if !r.backend.is_empty() && r.backend != BACKEND {
        return Err(ApiError::bad_request(format!(
            "invalid field `backend`: {:?}; the only backend here is {BACKEND}",
            r.backend
        )));
    }
    let svc2 = svc.clone();
    let n = blocking(move || {
        if r.all {
            return Ok(svc2.runner.unload(None));
        }
        let ids = resolve_loaded(&svc2, &r.models, &svc2.runner.loaded())?;
        Ok(if ids.is_empty() {
            0
        } else {
            svc2.runner.unload(Some(&ids))
        })
    })
    .await?;
    Ok(http::ok_json(&json!({"unloaded_runners": n})))
}

#[derive(Debug, Deserialize)]
struct ConfigureRequest {
    model: String,
    #[serde(rename = "context-size", alias = "context_size")]
    context_size: Option<i64>,
    #[serde(alias = "keep-alive")]
    keep_alive: Option<Value>,
    mode: Option<String>,
    #[serde(rename = "raw-runtime-flags")]
    raw_runtime_flags: Option<String>,
    speculative: Option<Value>,
}

/// The settings a configure request asks for, checked.
fn settings_change(r: &ConfigureRequest) -> Result<ModelSettings, ApiError> {
    let flags = runtime_flags(r.raw_runtime_flags.as_deref().unwrap_or_default())?;
    if r.speculative.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(ApiError::bad_request(
            "invalid field `speculative`: speculative decoding is not supported",
        ));
    }
    match r.mode.as_deref() {
        None | Some("" | "completion" | "embedding") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid field `mode`: {other:?}; every model here serves \"completion\" and \"embedding\""
            )))
        }
    }
    let context_size = match r.context_size {
        None => None,
        Some(n) if (MIN_CONTEXT..=MAX_CONTEXT).contains(&n) => u32::try_from(n).ok(),
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "invalid field `context-size`: {n} is outside {MIN_CONTEXT} to {MAX_CONTEXT} tokens"
            )))
        }
    };
    let keep_alive = match &r.keep_alive {
        None | Some(Value::Null) => None,
        Some(v) => Some(match keep_alive_value(v, "keep_alive")? {
            None => -1,
            Some(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        }),
    };
    Ok(ModelSettings {
        context_size,
        keep_alive,
        ..flags
    })
}

/// The llama.cpp flags of `raw-runtime-flags` that moat takes, as Docker
/// Model Runner passes them through to llama-server: `--temp T`, `--seed N`
/// and `--n-predict N` (`-n N`). moat sets the others itself.
fn runtime_flags(flags: &str) -> Result<ModelSettings, ApiError> {
    let bad =
        |why: String| ApiError::bad_request(format!("invalid field `raw-runtime-flags`: {why}"));
    let mut settings = ModelSettings::default();
    let mut words = flags.split_whitespace();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (word, None),
        };
        if !matches!(flag, "--temp" | "--seed" | "--n-predict" | "-n") {
            return Err(bad(format!(
                "{flag}: moat sets llama.cpp's flags itself and takes only --temp, --seed and --n-predict; configure `context-size` and `keep_alive` as fields"
            )));
        }
        let value = inline
            .or_else(|| words.next())
            .ok_or_else(|| bad(format!("{flag} needs a value")))?;
        match flag {
            "--temp" => {
                let t = value
                    .parse::<f32>()
                    .map_err(|_| bad(format!("--temp {value:?} is not a number")))?;
                settings.temperature = Some(super::check_temperature(t).map_err(bad)?);
            }
            "--seed" => {
                settings.seed = Some(value.parse::<u32>().map_err(|_| {
                    bad(format!(
                        "--seed {value:?} is not a number from 0 to 4294967295"
                    ))
                })?);
            }
            _ => {
                let n = value.parse::<u32>().ok().filter(|&n| n > 0);
                settings.max_tokens = Some(n.ok_or_else(|| {
                    bad(format!("{flag} {value:?} is not a number of tokens from 1"))
                })?);
            }
        }
    }
    Ok(settings)
}

/// Settings as `GET /engines/_configure` shows them.
fn settings_json(model: &str, id: &str, s: &ModelSettings) -> Value {
    let mut v = json!({"model": model, "id": id});
    if let Some(n) = s.context_size {
        v["context-size"] = json!(n);
    }
    if let Some(secs) = s.keep_alive {
        v["keep_alive"] = json!(go_duration(super::keep_alive_from_secs(secs)));
    }
    let mut flags = Vec::new();
    if let Some(t) = s.temperature {
        flags.push(format!("--temp {t}"));
    }
    if let Some(n) = s.seed {
        flags.push(format!("--seed {n}"));
    }
    if let Some(n) = s.max_tokens {
        flags.push(format!("--n-predict {n}"));
    }
    if !flags.is_empty() {
        v["raw-runtime-flags"] = json!(flags.join(" "));
    }
    v
}

/// Saves the model's settings; they take effect when it next loads, so an
/// idle loaded model is unloaded now (a busy one keeps its settings until
/// it unloads).
async fn configure(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: ConfigureRequest = http::parse(&body)?;
    let change = settings_change(&r)?;
    let svc2 = svc.clone();
    let (id, now) = blocking(move || {
        let model = svc2.find(&r.model)?;
        let now = svc2.configure(&model.id, change)?;
        let idle = svc2
            .runner
            .loaded()
            .iter()
            .any(|l| l.id == model.id && l.in_flight == 0);
        if idle {
            svc2.runner.unload(Some(std::slice::from_ref(&model.id)));
        }
        Ok((model.id, now))
    })
    .await?;
    let name = svc
        .find(&id)
        .ok()
        .and_then(|m| m.tags.first().cloned())
        .unwrap_or_else(|| id.clone());
    Ok(http::ok_json(&settings_json(&name, &id, &now)))
}

async fn configured(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    let svc2 = svc.clone();
    let entries = blocking(move || {
        let all: Vec<(String, ModelSettings)> = lock(&svc2.settings)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut entries: Vec<Value> = all
            .iter()
            .map(|(id, s)| {
                let name = svc2
                    .store
                    .get(id)
                    .ok()
                    .and_then(|m| m.tags.first().cloned())
                    .unwrap_or_else(|| id.clone());
                settings_json(&name, id, s)
            })
            .collect();
        entries.sort_by(|a, b| a["model"].as_str().cmp(&b["model"].as_str()));
        Ok(entries)
    })
    .await?;
    Ok(http::ok_json(&entries))
}

/// Decode `%XX` escapes (and `+` as a space in a query); a `%` that
/// starts no escape stays as it is.
fn percent_decode(s: &str, query: bool) -> String {
    let bytes = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let escaped = match (
                    bytes.get(i + 1).and_then(|&c| hex(c)),
                    bytes.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(hi), Some(lo)) => Some(hi << 4 | lo),
                    _ => None,
                };
                match escaped {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if query => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of `key` in a query string.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k, true) == key).then(|| percent_decode(v, true))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::ModelConfig;
    use std::collections::BTreeMap;
    use std::time::UNIX_EPOCH;

    #[test]
    fn only_reading_routes_are_open_to_sandboxes() {
        assert!(read_only(&Method::GET, "/models"));
        assert!(read_only(&Method::GET, "/engines/ps"));
        assert!(!read_only(&Method::POST, "/models/create"));
        assert!(!read_only(&Method::DELETE, "/models/ai/smollm2"));
        assert!(!read_only(&Method::POST, "/engines/_configure"));
        assert!(!read_only(&Method::POST, "/engines/unload"));
    }

    #[test]
    fn a_model_reads_like_dmrs() {
        let mut gguf = BTreeMap::new();
        gguf.insert("general.architecture".to_string(), "llama".to_string());
        let m = Model {
            id: "sha256:ab".into(),
            tags: vec!["ai/smollm2:latest".into()],
            created: 1_742_816_981,
            config: ModelConfig {
                format: "gguf".into(),
                quantization: "Q4_1".into(),
                parameters: "134.52 M".into(),
                architecture: "llama".into(),
                size: "85.81 MiB".into(),
                gguf,
                context_size: None,
                extra: serde_json::Map::new(),
            },
            gguf_paths: vec!["/x".into()],
            license: vec![],
            chat_template: None,
            size: 1,
        };
        assert_eq!(
            model_json(&m),
            json!({"id": "sha256:ab", "tags": ["ai/smollm2:latest"], "created": 1_742_816_981,
                   "config": {"format": "gguf", "quantization": "Q4_1", "parameters": "134.52 M",
                              "architecture": "llama", "size": "85.81 MiB",
                              "gguf": {"general.architecture": "llama"}}})
        );
    }

    #[test]
    fn a_delete_answers_like_docker() {
        let r = Removed {
            untagged: vec!["ai/a:latest".into(), "ai/a:v1".into()],
            deleted: Some("sha256:ab".into()),
        };
        assert_eq!(
            removed_json(&r),
            json!([{"Untagged": "ai/a:latest"}, {"Untagged": "ai/a:v1"}, {"Deleted": "sha256:ab"}])
        );
        assert_eq!(
            removed_json(&Removed {
                untagged: vec!["ai/a:v1".into()],
                deleted: None
            }),
            json!([{"Untagged": "ai/a:v1"}])
        );
    }

    #[test]
    fn pull_progress_counts_every_layer() {
        let mut p = PullProgress::default();
        assert_eq!(
            p.line(&Transfer::Step("resolving ai/a:latest".into())),
            json!({"type": "progress", "message": "resolving ai/a:latest", "total": 0})
        );
        assert_eq!(
            p.line(&Transfer::Bytes {
                id: "aaaaaaaaaaaa".into(),
                done: 1_000_000,
                total: 4_000_000
            }),
            json!({"type": "progress", "message": "Downloaded: 1.00 MB", "total": 4_000_000,
                   "layer": {"id": "aaaaaaaaaaaa", "size": 4_000_000, "current": 1_000_000}})
        );
        p.line(&Transfer::Bytes {
            id: "bbbbbbbbbbbb".into(),
            done: 500_000,
            total: 1_000_000,
        });
        assert_eq!(
            p.line(&Transfer::Bytes {
                id: "aaaaaaaaaaaa".into(),
                done: 4_000_000,
                total: 4_000_000
            }),
            json!({"type": "progress", "message": "Downloaded: 4.50 MB", "total": 5_000_000,
                   "layer": {"id": "aaaaaaaaaaaa", "size": 4_000_000, "current": 4_000_000}})
        );
    }

    #[test]
    fn keep_alive_prints_like_go() {
        assert_eq!(go_duration(Some(Duration::from_secs(300))), "5m0s");
        assert_eq!(go_duration(Some(Duration::from_secs(5430))), "1h30m30s");
        assert_eq!(go_duration(Some(Duration::from_secs(42))), "42s");
        assert_eq!(go_duration(Some(Duration::ZERO)), "0s");
        assert_eq!(go_duration(None), "-1");
    }

    #[test]
    fn a_ps_entry_reads_like_dmrs() {
        let mut m = LoadedModel {
            id: "sha256:ab".into(),
            name: "ai/smollm2:latest".into(),
            pid: 7,
            context_size: 4096,
            memory: 1,
            in_flight: 0,
            last_used: UNIX_EPOCH + Duration::from_secs(1_742_816_981),
            keep_alive: Some(Duration::from_secs(300)),
            load_ms: 1.0,
        };
        assert_eq!(
            ps_entry(&m),
            json!({"backend_name": "llama.cpp", "model_name": "ai/smollm2:latest", "mode": "completion",
                   "last_used": "2025-03-24T11:49:41Z", "keep_alive": "5m0s"})
        );
        m.in_flight = 2;
        m.keep_alive = None;
        assert_eq!(
            ps_entry(&m),
            json!({"backend_name": "llama.cpp", "model_name": "ai/smollm2:latest", "mode": "completion",
                   "last_used": "2025-03-24T11:49:41Z", "keep_alive": "-1", "in_use": true})
        );
    }

    fn configure_request(v: Value) -> ConfigureRequest {
        http::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn configure_checks_its_fields() {
        let r =
            configure_request(json!({"model": "ai/a", "context-size": 8192, "keep_alive": "10m"}));
        assert_eq!(
            settings_change(&r).unwrap(),
            ModelSettings {
                context_size: Some(8192),
                keep_alive: Some(600),
                ..ModelSettings::default()
            }
        );
        let r = configure_request(json!({"model": "ai/a", "keep_alive": -1}));
        assert_eq!(
            settings_change(&r).unwrap(),
            ModelSettings {
                keep_alive: Some(-1),
                ..ModelSettings::default()
            }
        );
        let r = configure_request(json!({"model": "ai/a", "context-size": 100}));
        assert_eq!(
            settings_change(&r).unwrap_err(),
            ApiError::bad_request(
                "invalid field `context-size`: 100 is outside 256 to 1048576 tokens"
            )
        );
        let r = configure_request(json!({"model": "ai/a", "context-size": 2_000_000}));
        assert_eq!(settings_change(&r).unwrap_err().status, 400);
        let r = configure_request(json!({"model": "ai/a", "raw-runtime-flags": "--foo"}));
        assert_eq!(settings_change(&r).unwrap_err().status, 400);
        let r = configure_request(
            json!({"model": "ai/a", "raw-runtime-flags": "--temp 0 --seed=42 -n 64"}),
        );
        assert_eq!(
            settings_change(&r).unwrap(),
            ModelSettings {
                temperature: Some(0.0),
                seed: Some(42),
                max_tokens: Some(64),
                ..ModelSettings::default()
            }
        );
        for (flags, why) in [
            ("--temp 3", "invalid field `raw-runtime-flags`: temperature 3 is outside 0 to 2 (0: greedy)"),
            ("--temp", "invalid field `raw-runtime-flags`: --temp needs a value"),
            ("--seed -1", "invalid field `raw-runtime-flags`: --seed \"-1\" is not a number from 0 to 4294967295"),
            ("--n-predict 0", "invalid field `raw-runtime-flags`: --n-predict \"0\" is not a number of tokens from 1"),
            ("--ctx-size 8", "invalid field `raw-runtime-flags`: --ctx-size: moat sets llama.cpp's flags itself and takes only --temp, --seed and --n-predict; configure `context-size` and `keep_alive` as fields"),
        ] {
            let r = configure_request(json!({"model": "ai/a", "raw-runtime-flags": flags}));
            assert_eq!(settings_change(&r).unwrap_err(), ApiError::bad_request(why), "{flags}");
        }
        assert_eq!(
            settings_json(
                "ai/a:latest",
                "sha256:ab",
                &ModelSettings {
                    context_size: Some(8192),
                    keep_alive: Some(300),
                    temperature: Some(0.5),
                    seed: Some(7),
                    max_tokens: Some(99),
                }
            ),
            json!({"model": "ai/a:latest", "id": "sha256:ab", "context-size": 8192, "keep_alive": "5m0s", "raw-runtime-flags": "--temp 0.5 --seed 7 --n-predict 99"})
        );
    }

    #[test]
    fn queries_and_paths_are_decoded() {
        assert_eq!(
            percent_decode("ai%2Fsmollm2%3Alatest", false),
            "ai/smollm2:latest"
        );
        assert_eq!(percent_decode("a+b%zz%", false), "a+b%zz%");
        assert_eq!(
            query_param("repo=ai%2Fb&tag=v+1", "repo").as_deref(),
            Some("ai/b")
        );
        assert_eq!(
            query_param("repo=ai%2Fb&tag=v+1", "tag").as_deref(),
            Some("v 1")
        );
        assert_eq!(query_param("force", "force").as_deref(), Some(""));
        assert_eq!(query_param("", "force"), None);
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }
}

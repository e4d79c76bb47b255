//! Ollama's API under `/api/`, so that the `ollama` clients, and the many
//! tools written against Ollama, work with moat's runner unchanged: the
//! model list, loaded models and a model's details from the store and the
//! GGUF header; chat and generate (newline-delimited JSON streams, tools,
//! `format`, `options`, `keep_alive`, loading and unloading with an empty
//! request); embeddings; pulls with streamed progress; and deletes.
//! Requests are translated into the shared [`ChatInput`]; Ollama's
//! durations are nanoseconds, taken from the worker's timings.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::dmr::{blocking, registry_options, start_pull, store_status};
use super::generation::{ChatInput, FinishReason, Out, ResponseFormat, Summary, ToolCall};
use super::http::{self, ApiError, Body, Dialect};
use super::openai::{embed, OneOrMany};
use super::{parse_keep_alive, ModelService, Scope};
use crate::engine::{LoadedModel, Sampling};
use crate::gguf::{self, GgufInfo};
use crate::store::{Model, ModelConfig, ModelReference, Transfer};

/// The Ollama release whose API this follows (its `/api/version`); clients
/// that check for a minimum version see a current one.
pub const OLLAMA_VERSION: &str = "0.12.6";

type Request = hyper::Request<Incoming>;

pub async fn handle(
    svc: &Arc<ModelService>,
    scope: Scope,
    method: &Method,
    rest: &str,
    req: Request,
) -> Response<Body> {
    let result = match (method, rest) {
        (&Method::GET | &Method::HEAD, "version") => {
            Ok(http::ok_json(&json!({"version": OLLAMA_VERSION})))
        }
        (&Method::GET | &Method::HEAD, "tags") => tags(svc).await,
        (&Method::GET, "ps") => ps(svc).await,
        (&Method::POST, "show") => show(svc, req).await,
        (&Method::POST, "chat") => chat(svc, scope, req).await,
        (&Method::POST, "generate") => generate(svc, scope, req).await,
        (&Method::POST, "embed") => embed_route(svc, scope, req).await,
        (&Method::POST, "embeddings") => embeddings(svc, scope, req).await,
        (&Method::POST, "pull") => pull(svc, req).await,
        (&Method::DELETE, "delete") => delete(svc, req).await,
        _ => Err(ApiError::not_found(format!(
            "no route {method} /api/{rest} on the model runner"
        ))),
    };
    result.unwrap_or_else(|e| e.response(Dialect::Ollama))
}

/// Ollama takes the model as `model`, and in older clients as `name`.
fn model_name(model: Option<String>, name: Option<String>) -> Result<String, ApiError> {
    model
        .or(name)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("invalid field `model`: missing"))
}

/// A keep-alive as Ollama and DMR accept it: a duration text ("5m", "-1")
/// or a number of seconds (negative: forever).
pub(super) fn keep_alive_value(v: &Value, field: &str) -> Result<Option<Duration>, ApiError> {
    match v {
        Value::String(s) => parse_keep_alive(s)
            .map_err(|e| ApiError::bad_request(format!("invalid field `{field}`: {}", e.message))),
        Value::Number(n) => match n.as_f64() {
            Some(secs) if secs < 0.0 => Ok(None),
            Some(secs) => Duration::try_from_secs_f64(secs).map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid field `{field}`: {n} is not a number of seconds"
                ))
            }),
            None => Err(ApiError::bad_request(format!(
                "invalid field `{field}`: {n} is not a number of seconds"
            ))),
        },
        other => Err(ApiError::bad_request(format!(
            "invalid field `{field}`: {other}; use e.g. \"5m\", 300, 0 or -1"
        ))),
    }
}

fn keep_alive_of(v: Option<&Value>) -> Result<Option<Option<Duration>>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => keep_alive_value(v, "keep_alive").map(Some),
    }
}

/// Ollama's `options`. Those that are not here (`num_ctx`, `num_batch`,
/// `num_thread`, `num_gpu`, …) are accepted and left to the runner: the
/// context, threads and batch belong to the loaded model, which every
/// request shares (`moat model configure --context-size` sets the context).
#[derive(Debug, Default, Deserialize)]
struct Options {
    num_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

/// What `options` sets: the sampling, the token limit and the stops.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    sampling: Sampling,
    max_tokens: Option<u32>,
    stop: Vec<String>,
}

fn settings(o: Option<&Options>) -> Result<Settings, ApiError> {
    let d = Sampling::default();
    let Some(o) = o else {
        return Ok(Settings {
            sampling: d,
            max_tokens: None,
            stop: Vec::new(),
        });
    };
    if o.temperature.is_some_and(|t| t < 0.0) {
        return Err(ApiError::bad_request(
            "invalid field `options.temperature`: must be 0 or more",
        ));
    }
    if o.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(ApiError::bad_request(
            "invalid field `options.top_p`: must be between 0 and 1",
        ));
    }
    if o.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(ApiError::bad_request(
            "invalid field `options.min_p`: must be between 0 and 1",
        ));
    }
    let sampling = Sampling {
        temperature: o.temperature.unwrap_or(d.temperature),
        top_k: o.top_k.unwrap_or(d.top_k),
        top_p: o.top_p.unwrap_or(d.top_p),
        min_p: o.min_p.unwrap_or(d.min_p),
        // Ollama's -1 is a random seed.
        seed: o.seed.filter(|s| *s >= 0).map(|s| s as u32),
        repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: o.repeat_last_n.unwrap_or(d.repeat_last_n),
        presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
    };
    // -1 is "no limit" and -2 "fill the context": both are the context's end.
    let max_tokens = o
        .num_predict
        .filter(|n| *n > 0)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let stop = o.stop.as_ref().map(|s| match s {
        OneOrMany::One(s) => vec![s.clone()],
        OneOrMany::Many(v) => v.clone(),
    });
    Ok(Settings {
        sampling,
        max_tokens,
        stop: stop.unwrap_or_default(),
    })
}

/// `format`: `"json"`, or a JSON schema the answer must follow.
fn parse_format(v: Option<&Value>) -> Result<ResponseFormat, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ResponseFormat::Text),
        Some(Value::String(s)) if s.is_empty() => Ok(ResponseFormat::Text),
        Some(Value::String(s)) if s == "json" => Ok(ResponseFormat::JsonObject),
        Some(schema @ Value::Object(_)) => Ok(ResponseFormat::JsonSchema(schema.clone())),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid field `format`: {other}; use \"json\" or a JSON schema object"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Value>,
    #[serde(default)]
    tool_calls: Vec<OllamaToolCall>,
    tool_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OllamaToolCall {
    function: OllamaFunction,
}

#[derive(Debug, Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Ollama's messages as OpenAI's. Ollama's calls carry no ids, so each
/// gets one (`call_N`), and a tool's answer is matched to the oldest
/// unanswered call of its `tool_name` (else the oldest unanswered call).
fn to_messages(messages: &[OllamaMessage]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    let mut unanswered: VecDeque<(String, String)> = VecDeque::new();
    let mut next_id = 0;
    for (i, m) in messages.iter().enumerate() {
        if !m.images.is_empty() {
            return Err(ApiError::bad_request(format!(
                "invalid field `messages[{i}].images`: images are not supported by local text models"
            )));
        }
        match m.role.as_str() {
            "system" | "user" => out.push(json!({"role": m.role, "content": m.content})),
            "assistant" => {
                let mut msg = json!({"role": "assistant", "content": m.content});
                if !m.tool_calls.is_empty() {
                    unanswered.clear();
                    let calls: Vec<Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            let id = format!("call_{next_id}");
                            next_id += 1;
                            unanswered.push_back((id.clone(), c.function.name.clone()));
                            let arguments = match &c.function.arguments {
                                Value::String(s) => s.clone(),
                                Value::Null => "{}".to_string(),
                                other => other.to_string(),
                            };
                            json!({"id": id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}})
                        })
                        .collect();
                    msg["tool_calls"] = Value::Array(calls);
                }
                out.push(msg);
            }
            "tool" => {
                let at = m
                    .tool_name
                    .as_ref()
                    .and_then(|name| unanswered.iter().position(|(_, n)| n == name))
                    .or(if unanswered.is_empty() { None } else { Some(0) });
                let mut msg = json!({"role": "tool", "content": m.content});
                if let Some((id, name)) = at.and_then(|at| unanswered.remove(at)) {
                    msg["tool_call_id"] = json!(id);
                    msg["name"] = json!(name);
                } else if let Some(name) = &m.tool_name {
                    msg["name"] = json!(name);
                }
                out.push(msg);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid field `messages[{i}].role`: {other:?}; use \"system\", \"user\", \"assistant\" or \"tool\""
                )))
            }
        }
    }
    Ok(out)
}

/// Which of Ollama's two answer shapes: `message` (chat) or `response`
/// (generate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Generate,
}

fn now_nanos() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

fn tool_calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let arguments =
                serde_json::from_str::<Value>(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({"function": {"index": index, "name": c.name, "arguments": arguments}})
        })
        .collect()
}

/// One object of an answer, not yet done.
fn piece(shape: Shape, model: &str, created_at: &str, text: &str, calls: &[ToolCall]) -> Value {
    match shape {
        Shape::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                message["tool_calls"] = tool_calls_json(calls);
            }
            json!({"model": model, "created_at": created_at, "message": message, "done": false})
        }
        Shape::Generate => {
            json!({"model": model, "created_at": created_at, "response": text, "done": false})
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ms_nanos(ms: f64) -> u64 {
    (ms * 1e6).max(0.0).round() as u64
}

/// Makes `obj` the last object of an answer: why it ended, the counts and
/// the durations in nanoseconds (`total` since the request came, `load`
/// spent loading the model, the rest from the worker's timings).
fn finish(obj: &mut Value, summary: &Summary, total: Duration, load: Duration) {
    obj["done"] = json!(true);
    obj["done_reason"] = json!(match summary.finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::ToolCalls => "stop",
    });
    obj["total_duration"] = json!(nanos(total));
    obj["load_duration"] = json!(nanos(load));
    obj["prompt_eval_count"] = json!(summary.prompt_tokens);
    obj["prompt_eval_duration"] = json!(ms_nanos(summary.timings.prompt_ms));
    obj["eval_count"] = json!(summary.completion_tokens);
    obj["eval_duration"] = json!(ms_nanos(summary.timings.predicted_ms));
    obj["timings"] = json!(summary.timings);
}

/// The answer to a request without messages or prompt: the model loaded,
/// or unloaded when `keep_alive` is 0.
async fn load_or_unload(
    svc: &Arc<ModelService>,
    shape: Shape,
    model: &str,
    keep_alive: Option<Option<Duration>>,
) -> Result<Response<Body>, ApiError> {
    let reason = if keep_alive == Some(Some(Duration::ZERO)) {
        let found = svc.find(model)?;
        let runner = svc.runner.clone();
        blocking(move || Ok(runner.unload(Some(std::slice::from_ref(&found.id))))).await?;
        "unload"
    } else {
        svc.load(model, keep_alive).await?;
        "load"
    };
    let mut obj = piece(shape, model, &now_nanos(), "", &[]);
    obj["done"] = json!(true);
    obj["done_reason"] = json!(reason);
    Ok(http::ok_json(&obj))
}

/// Run a generation and answer in Ollama's shape: one object, or a stream
/// of them ending with the summary.
async fn answer(
    svc: &Arc<ModelService>,
    shape: Shape,
    input: ChatInput,
    raw_prompt: Option<String>,
    stream: bool,
    started: Instant,
) -> Result<Response<Body>, ApiError> {
    let model = input.model.clone();
    // Loaded first, so that the time it takes is `load_duration`.
    svc.load(&model, input.keep_alive).await?;
    let load = started.elapsed();
    let mut gen = match raw_prompt {
        Some(prompt) => svc.start_completion(input, prompt).await?,
        None => svc.start_chat(input).await?,
    };
    if !stream {
        let (text, calls, summary) = gen.collect(svc).await?;
        let mut obj = piece(shape, &model, &now_nanos(), &text, &calls);
        finish(&mut obj, &summary, started.elapsed(), load);
        return Ok(http::ok_json(&obj));
    }
    let (tx, resp) = http::streaming("application/x-ndjson");
    let svc = svc.clone();
    svc.clone().runtime().spawn(async move {
        while let Some(out) = gen.next(&svc).await {
            let (obj, last) = match out {
                Ok(Out::Text(text)) => (piece(shape, &model, &now_nanos(), &text, &[]), false),
                Ok(Out::ToolCalls(calls)) => {
                    (piece(shape, &model, &now_nanos(), "", &calls), false)
                }
                Ok(Out::Done(summary)) => {
                    let mut obj = piece(shape, &model, &now_nanos(), "", &[]);
                    finish(&mut obj, &summary, started.elapsed(), load);
                    (obj, true)
                }
                Err(e) => (e.body(Dialect::Ollama), true),
            };
            if tx.send(http::ndjson(&obj)).await.is_err() {
                // The client went away: dropping `gen` cancels the request.
                return;
            }
            if last {
                break;
            }
        }
    });
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    name: Option<String>,
    #[serde(default)]
    messages: Vec<OllamaMessage>,
    #[serde(default)]
    tools: Vec<Value>,
    format: Option<Value>,
    options: Option<Options>,
    stream: Option<bool>,
    keep_alive: Option<Value>,
}

async fn chat(
    svc: &Arc<ModelService>,
    scope: Scope,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let body = http::read_body(req.into_body()).await?;
    let r: ChatRequest = http::parse(&body)?;
    let model = model_name(r.model, r.name)?;
    let keep_alive = scope.keep_alive(keep_alive_of(r.keep_alive.as_ref())?);
    if r.messages.is_empty() {
        return load_or_unload(svc, Shape::Chat, &model, keep_alive).await;
    }
    let mut input = ChatInput::new(model, to_messages(&r.messages)?);
    input.tools = r.tools;
    input.response_format = parse_format(r.format.as_ref())?;
    let s = settings(r.options.as_ref())?;
    input.sampling = s.sampling;
    input.max_tokens = s.max_tokens;
    input.stop = s.stop;
    input.keep_alive = keep_alive;
    answer(
        svc,
        Shape::Chat,
        input,
        None,
        r.stream.unwrap_or(true),
        started,
    )
    .await
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: Option<String>,
    name: Option<String>,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: String,
    #[serde(default)]
    suffix: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    context: Vec<i64>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    images: Vec<Value>,
    format: Option<Value>,
    options: Option<Options>,
    stream: Option<bool>,
    keep_alive: Option<Value>,
}

/// The chat input of a `generate` request, and the prompt itself when it
/// is `raw` (no chat template).
fn generate_input(
    r: &GenerateRequest,
    model: String,
) -> Result<(ChatInput, Option<String>), ApiError> {
    if !r.images.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `images`: images are not supported by local text models",
        ));
    }
    if !r.suffix.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `suffix`: fill-in-the-middle is not supported; send the whole prompt",
        ));
    }
    if !r.template.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `template`: Go templates are not supported; the model's own chat template is used, or send `raw: true` with a formatted prompt",
        ));
    }
    if !r.context.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `context`: continuing from token context is not supported; send the conversation to /api/chat",
        ));
    }
    let (messages, raw) = if r.raw {
        (Vec::new(), Some(r.prompt.clone()))
    } else {
        let mut messages = Vec::new();
        if !r.system.is_empty() {
            messages.push(json!({"role": "system", "content": r.system}));
        }
        messages.push(json!({"role": "user", "content": r.prompt}));
        (messages, None)
    };
    let mut input = ChatInput::new(model, messages);
    input.response_format = parse_format(r.format.as_ref())?;
    let s = settings(r.options.as_ref())?;
    input.sampling = s.sampling;
    input.max_tokens = s.max_tokens;
    input.stop = s.stop;
    input.keep_alive = keep_alive_of(r.keep_alive.as_ref())?;
    Ok((input, raw))
}

async fn generate(
    svc: &Arc<ModelService>,
    scope: Scope,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let body = http::read_body(req.into_body()).await?;
    let r: GenerateRequest = http::parse(&body)?;
    let model = model_name(r.model.clone(), r.name.clone())?;
    if r.prompt.is_empty() {
        let keep_alive = scope.keep_alive(keep_alive_of(r.keep_alive.as_ref())?);
        return load_or_unload(svc, Shape::Generate, &model, keep_alive).await;
    }
    let (mut input, raw) = generate_input(&r, model)?;
    input.keep_alive = scope.keep_alive(input.keep_alive);
    answer(
        svc,
        Shape::Generate,
        input,
        raw,
        r.stream.unwrap_or(true),
        started,
    )
    .await
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    model: Option<String>,
    name: Option<String>,
    input: OneOrMany,
    dimensions: Option<u32>,
    keep_alive: Option<Value>,
}

async fn embed_route(
    svc: &Arc<ModelService>,
    scope: Scope,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let body = http::read_body(req.into_body()).await?;
    let r: EmbedRequest = http::parse(&body)?;
    let model = model_name(r.model, r.name)?;
    if r.dimensions.is_some() {
        return Err(ApiError::bad_request(
            "invalid field `dimensions`: the model's own embedding size is the only one",
        ));
    }
    svc.load(
        &model,
        scope.keep_alive(keep_alive_of(r.keep_alive.as_ref())?),
    )
    .await?;
    let load = started.elapsed();
    let (vectors, tokens) = embed(svc, &model, r.input.into_vec()).await?;
    Ok(http::ok_json(&json!({
        "model": model,
        "embeddings": vectors,
        "total_duration": nanos(started.elapsed()),
        "load_duration": nanos(load),
        "prompt_eval_count": tokens,
    })))
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: Option<String>,
    name: Option<String>,
    #[serde(default)]
    prompt: String,
    keep_alive: Option<Value>,
}

/// The legacy `/api/embeddings`: one prompt, one `embedding`; an empty
/// prompt only loads the model, as Ollama does.
async fn embeddings(
    svc: &Arc<ModelService>,
    scope: Scope,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: EmbeddingsRequest = http::parse(&body)?;
    let model = model_name(r.model, r.name)?;
    svc.load(
        &model,
        scope.keep_alive(keep_alive_of(r.keep_alive.as_ref())?),
    )
    .await?;
    if r.prompt.is_empty() {
        return Ok(http::ok_json(&json!({"embedding": []})));
    }
    let (vectors, _) = embed(svc, &model, vec![r.prompt]).await?;
    let embedding = vectors.into_iter().next().unwrap_or_default();
    Ok(http::ok_json(&json!({"embedding": embedding})))
}

fn rfc3339_secs(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Ollama's `details` from DMR's config; parameters as Ollama writes them
/// (`134.52M`).
fn details(config: &ModelConfig) -> Value {
    let families = if config.architecture.is_empty() {
        json!(null)
    } else {
        json!([config.architecture])
    };
    json!({
        "parent_model": "",
        "format": if config.format.is_empty() { "gguf" } else { config.format.as_str() },
        "family": config.architecture,
        "families": families,
        "parameter_size": config.parameters.replace(' ', ""),
        "quantization_level": config.quantization,
    })
}

fn digest_hex(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}

/// One `/api/tags` entry: each tag of a model is listed.
fn tag_entry(m: &Model, tag: &str) -> Value {
    json!({
        "name": tag,
        "model": tag,
        "modified_at": rfc3339_secs(m.created),
        "size": m.size,
        "digest": digest_hex(&m.id),
        "details": details(&m.config),
    })
}

async fn tags(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    let store = svc.store.clone();
    let models = blocking(move || store.list().map_err(store_status)).await?;
    let entries: Vec<Value> = models
        .iter()
        .flat_map(|m| m.tags.iter().map(move |t| tag_entry(m, t)))
        .collect();
    Ok(http::ok_json(&json!({"models": entries})))
}

/// When an idle model unloads: its last use plus its keep-alive; one kept
/// forever gets the far future Ollama gives it (its largest duration).
fn expires_at(m: &LoadedModel) -> String {
    const FOREVER: Duration = Duration::from_secs(292 * 365 * 24 * 3600);
    let t = m
        .last_used
        .checked_add(m.keep_alive.unwrap_or(FOREVER))
        .unwrap_or(m.last_used);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// One `/api/ps` entry: `size` is the runner's memory estimate; every
/// model runs on the CPU, so `size_vram` is 0.
fn ps_entry(m: &LoadedModel, stored: Option<&Model>) -> Value {
    json!({
        "name": m.name,
        "model": m.name,
        "size": m.memory,
        "digest": digest_hex(&m.id),
        "details": stored.map_or_else(|| details(&ModelConfig::default()), |s| details(&s.config)),
        "expires_at": expires_at(m),
        "size_vram": 0,
        "context_length": m.context_size,
    })
}

async fn ps(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    let svc2 = svc.clone();
    let entries = blocking(move || {
        Ok(svc2
            .runner
            .loaded()
            .iter()
            .map(|m| ps_entry(m, svc2.store.get(&m.id).ok().as_ref()))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(http::ok_json(&json!({"models": entries})))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
    #[serde(default)]
    verbose: bool,
}

fn gguf_value(v: &gguf::Value) -> Option<Value> {
    Some(match v {
        gguf::Value::Uint(n) => json!(n),
        gguf::Value::Int(n) => json!(n),
        gguf::Value::Float(f) => json!(f),
        gguf::Value::Bool(b) => json!(b),
        gguf::Value::String(s) => json!(s),
        gguf::Value::Array { .. } | gguf::Value::LongString(_) => return None,
    })
}

/// The GGUF header as Ollama's `model_info`: typed values; arrays with
/// their elements when short, else empty (Ollama lists the vocabulary only
/// when `verbose`, and moat's header reader never keeps it); the chat
/// template is `template`, not here.
fn model_info(info: &GgufInfo) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in &info.metadata {
        if key == "tokenizer.chat_template" {
            continue;
        }
        let v = match value {
            gguf::Value::Array { .. } => Value::Array(
                info.short_arrays
                    .get(key)
                    .map(|items| items.iter().filter_map(gguf_value).collect())
                    .unwrap_or_default(),
            ),
            other => match gguf_value(other) {
                Some(v) => v,
                None => continue,
            },
        };
        out.insert(key.clone(), v);
    }
    out.entry("general.parameter_count")
        .or_insert(json!(info.parameters));
    out
}

/// What the model can do here: every model completes and embeds (the
/// runner mean-pools any model's states); tools when its template takes them.
fn capabilities(template: &str) -> Vec<&'static str> {
    let mut caps = vec!["completion"];
    if template.contains("tools") {
        caps.push("tools");
    }
    caps.push("embedding");
    caps
}

/// `context` is the one the model runs with (`Runner::context_for`), so that
/// a client sizing its prompts reads the real limit.
fn show_json(name: &str, m: &Model, info: &GgufInfo, context: u32) -> Value {
    let template = m
        .chat_template
        .as_deref()
        .or_else(|| info.chat_template())
        .unwrap_or("");
    let parameters = format!("num_ctx {context}");
    let license = m.license.join("\n\n");
    let mut modelfile = format!("# Modelfile of {name}, as moat's model runner shows it\n\n");
    if let Some(path) = m.gguf_paths.first() {
        modelfile.push_str(&format!("FROM {}\n", path.display()));
    }
    if !template.is_empty() {
        modelfile.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    }
    modelfile.push_str(&format!("PARAMETER num_ctx {context}\n"));
    if !license.is_empty() {
        modelfile.push_str(&format!("LICENSE \"\"\"{license}\"\"\"\n"));
    }
    let mut out = json!({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": details(&m.config),
        "model_info": model_info(info),
        "capabilities": capabilities(template),
        "modified_at": rfc3339_secs(m.created),
    });
    if !license.is_empty() {
        out["license"] = json!(license);
    }
    out
}

async fn show(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: ShowRequest = http::parse(&body)?;
    // Nothing is held back without `verbose`: the header reader keeps no
    // long arrays to begin with.
    let _ = r.verbose;
    let name = model_name(r.model, r.name)?;
    let svc2 = svc.clone();
    blocking(move || {
        let m = svc2.find(&name)?;
        let info = super::read_header(&m, &name)?;
        let settings = svc2.settings_of(&m.id);
        let context = svc2
            .runner
            .context_for(&super::load_spec(&m, &name, &settings, &info));
        Ok(http::ok_json(&show_json(&name, &m, &info, context)))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct PullRequest {
    model: Option<String>,
    name: Option<String>,
    #[serde(default)]
    insecure: bool,
    stream: Option<bool>,
}

/// A pull's progress as Ollama's status lines.
fn pull_status(t: &Transfer) -> Value {
    match t {
        Transfer::Step(step) => json!({"status": step}),
        Transfer::Bytes { id, done, total } => {
            json!({"status": format!("pulling {id}"), "digest": id, "total": total, "completed": done})
        }
    }
}

async fn pull(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: PullRequest = http::parse(&body)?;
    let name = model_name(r.model, r.name)?;
    let reference = ModelReference::parse(&name).map_err(store_status)?;
    let mut opts = registry_options();
    if r.insecure {
        opts.insecure.push(reference.registry().to_string());
    }
    let (mut progress, done) = start_pull(svc, name, opts);
    if !r.stream.unwrap_or(true) {
        while progress.recv().await.is_some() {}
        let result = done
            .await
            .map_err(|e| ApiError::new(500, format!("the pull failed: {e}")))?;
        result.map_err(store_status)?;
        return Ok(http::ok_json(&json!({"status": "success"})));
    }
    let (tx, resp) = http::streaming("application/x-ndjson");
    svc.runtime().spawn(async move {
        let mut client = true;
        client &= tx
            .send(http::ndjson(&json!({"status": "pulling manifest"})))
            .await
            .is_ok();
        while let Some(t) = progress.recv().await {
            // A client that went away does not stop the pull: it finishes
            // into the store, and the next pull finds it there.
            if client {
                client = tx.send(http::ndjson(&pull_status(&t))).await.is_ok();
            }
        }
        let last = match done.await {
            Ok(Ok(_)) => json!({"status": "success"}),
            Ok(Err(e)) => store_status(e).body(Dialect::Ollama),
            Err(e) => json!({"error": format!("the pull failed: {e}")}),
        };
        let _ = tx.send(http::ndjson(&last)).await;
    });
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct DeleteRequest {
    model: Option<String>,
    name: Option<String>,
}

/// Removes the tag (and the model, when it was its last); a model that was
/// deleted is unloaded too.
async fn delete(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: DeleteRequest = http::parse(&body)?;
    let name = model_name(r.model, r.name)?;
    let svc2 = svc.clone();
    blocking(move || {
        let removed = svc2.store.remove(&name, false).map_err(store_status)?;
        if let Some(id) = removed.deleted {
            svc2.runner.unload(Some(&[id]));
        }
        Ok(())
    })
    .await?;
    Ok(http::text(StatusCode::OK, ""))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::Timings;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn options(v: Value) -> Options {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn options_become_sampling_limit_and_stops() {
        let s = settings(Some(&options(json!({
            "num_predict": 42, "temperature": 0.1, "top_k": 7, "top_p": 0.5, "min_p": 0.2, "seed": 9,
            "stop": ["\n\n", "User:"], "repeat_penalty": 1.2, "repeat_last_n": 32,
            "presence_penalty": 0.3, "frequency_penalty": 0.4, "num_ctx": 8192, "num_thread": 4,
        }))))
        .unwrap();
        assert_eq!(
            s,
            Settings {
                sampling: Sampling {
                    temperature: 0.1,
                    top_k: 7,
                    top_p: 0.5,
                    min_p: 0.2,
                    seed: Some(9),
                    repeat_penalty: 1.2,
                    repeat_last_n: 32,
                    presence_penalty: 0.3,
                    frequency_penalty: 0.4,
                },
                max_tokens: Some(42),
                stop: vec!["\n\n".into(), "User:".into()],
            }
        );
        let s = settings(Some(&options(json!({"num_predict": -1, "seed": -1})))).unwrap();
        assert_eq!(
            s,
            Settings {
                sampling: Sampling::default(),
                max_tokens: None,
                stop: Vec::new()
            }
        );
        assert_eq!(
            settings(None).unwrap(),
            Settings {
                sampling: Sampling::default(),
                max_tokens: None,
                stop: Vec::new()
            }
        );
        assert_eq!(
            settings(Some(&options(json!({"top_p": 2.0}))))
                .unwrap_err()
                .message,
            "invalid field `options.top_p`: must be between 0 and 1"
        );
    }

    #[test]
    fn format_is_json_or_a_schema() {
        assert_eq!(parse_format(None).unwrap(), ResponseFormat::Text);
        assert_eq!(
            parse_format(Some(&json!("json"))).unwrap(),
            ResponseFormat::JsonObject
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse_format(Some(&schema)).unwrap(),
            ResponseFormat::JsonSchema(schema.clone())
        );
        assert_eq!(
            parse_format(Some(&json!("yaml"))).unwrap_err().message,
            "invalid field `format`: \"yaml\"; use \"json\" or a JSON schema object"
        );
    }

    #[test]
    fn keep_alive_takes_text_or_seconds() {
        assert_eq!(
            keep_alive_of(Some(&json!("5m"))).unwrap(),
            Some(Some(Duration::from_secs(300)))
        );
        assert_eq!(
            keep_alive_of(Some(&json!(0))).unwrap(),
            Some(Some(Duration::ZERO))
        );
        assert_eq!(keep_alive_of(Some(&json!(-1))).unwrap(), Some(None));
        assert_eq!(keep_alive_of(None).unwrap(), None);
        assert!(keep_alive_of(Some(&json!(true))).is_err());
    }

    #[test]
    fn tool_calls_get_ids_and_results_find_their_call() {
        let messages: Vec<OllamaMessage> = serde_json::from_value(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "time", "arguments": {"tz": "CET"}}},
            ]},
            {"role": "tool", "content": "12:00", "tool_name": "time"},
            {"role": "tool", "content": "18°C"},
        ]))
        .unwrap();
        assert_eq!(
            Value::Array(to_messages(&messages).unwrap()),
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather and time in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{\"tz\":\"CET\"}"}},
                ]},
                {"role": "tool", "content": "12:00", "tool_call_id": "call_1", "name": "time"},
                {"role": "tool", "content": "18°C", "tool_call_id": "call_0", "name": "weather"},
            ])
        );
        let bad: Vec<OllamaMessage> =
            serde_json::from_value(json!([{"role": "user", "content": "x", "images": ["aGk="]}]))
                .unwrap();
        assert_eq!(
            to_messages(&bad).unwrap_err().message,
            "invalid field `messages[0].images`: images are not supported by local text models"
        );
    }

    #[test]
    fn generate_wraps_the_prompt_unless_raw() {
        let r: GenerateRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "Why?", "system": "Answer in one word.", "format": "json",
            "options": {"num_predict": 3}, "keep_alive": "1m",
        }))
        .unwrap();
        let (input, raw) = generate_input(&r, "m".into()).unwrap();
        assert_eq!(raw, None);
        assert_eq!(
            Value::Array(input.messages),
            json!([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Why?"}])
        );
        assert_eq!(input.response_format, ResponseFormat::JsonObject);
        assert_eq!(input.max_tokens, Some(3));
        assert_eq!(input.keep_alive, Some(Some(Duration::from_secs(60))));
        let r: GenerateRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "<s>[INST] x", "raw": true}))
                .unwrap();
        let (input, raw) = generate_input(&r, "m".into()).unwrap();
        assert_eq!(raw.as_deref(), Some("<s>[INST] x"));
        assert!(input.messages.is_empty());
    }

    fn summary(finish: FinishReason) -> Summary {
        Summary {
            finish,
            stop_word: None,
            prompt_tokens: 10,
            completion_tokens: 4,
            timings: Timings::new(0, 10, 20.5, 4, 8.0),
        }
    }

    #[test]
    fn chat_pieces_and_the_last_object() {
        let calls = vec![ToolCall {
            id: "call_1".into(),
            name: "weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }];
        assert_eq!(
            piece(Shape::Chat, "m", "T", "", &calls),
            json!({"model": "m", "created_at": "T", "done": false, "message": {"role": "assistant", "content": "",
                "tool_calls": [{"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}}]}})
        );
        let s = summary(FinishReason::ToolCalls);
        let mut last = piece(Shape::Chat, "m", "T", "", &[]);
        finish(
            &mut last,
            &s,
            Duration::from_millis(100),
            Duration::from_millis(50),
        );
        assert_eq!(
            last,
            json!({
                "model": "m", "created_at": "T", "message": {"role": "assistant", "content": ""},
                "done": true, "done_reason": "stop",
                "total_duration": 100_000_000u64, "load_duration": 50_000_000u64,
                "prompt_eval_count": 10, "prompt_eval_duration": 20_500_000u64,
                "eval_count": 4, "eval_duration": 8_000_000u64,
                "timings": s.timings,
            })
        );
        let s = summary(FinishReason::Length);
        let mut last = piece(Shape::Generate, "m", "T", "Because", &[]);
        finish(&mut last, &s, Duration::from_millis(1), Duration::ZERO);
        assert_eq!(
            last,
            json!({
                "model": "m", "created_at": "T", "response": "Because",
                "done": true, "done_reason": "length",
                "total_duration": 1_000_000u64, "load_duration": 0,
                "prompt_eval_count": 10, "prompt_eval_duration": 20_500_000u64,
                "eval_count": 4, "eval_duration": 8_000_000u64,
                "timings": s.timings,
            })
        );
    }

    fn model() -> Model {
        Model {
            id: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            tags: vec!["ai/smollm2:135M-Q4_1".into(), "ai/smollm2:latest".into()],
            created: 1_742_816_981,
            config: ModelConfig {
                format: "gguf".into(),
                quantization: "Q4_1".into(),
                parameters: "134.52 M".into(),
                architecture: "llama".into(),
                size: "85.81 MiB".into(),
                gguf: BTreeMap::new(),
                context_size: Some(2048),
                extra: Map::new(),
            },
            gguf_paths: vec![PathBuf::from("/store/blobs/sha256/aa")],
            license: vec!["Apache-2.0".into()],
            chat_template: None,
            size: 89_978_240,
        }
    }

    #[test]
    fn a_tags_entry() {
        let m = model();
        assert_eq!(
            tag_entry(&m, "ai/smollm2:latest"),
            json!({
                "name": "ai/smollm2:latest", "model": "ai/smollm2:latest",
                "modified_at": "2025-03-24T11:49:41Z", "size": 89_978_240u64,
                "digest": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "134.52M", "quantization_level": "Q4_1"},
            })
        );
    }

    #[test]
    fn a_ps_entry() {
        let m = model();
        let loaded = LoadedModel {
            id: m.id.clone(),
            name: "ai/smollm2:135M-Q4_1".into(),
            pid: 42,
            context_size: 4096,
            memory: 120 << 20,
            in_flight: 0,
            last_used: UNIX_EPOCH + Duration::from_secs(1_742_816_981),
            keep_alive: Some(Duration::from_secs(300)),
            load_ms: 80.0,
        };
        assert_eq!(
            ps_entry(&loaded, Some(&m)),
            json!({
                "name": "ai/smollm2:135M-Q4_1", "model": "ai/smollm2:135M-Q4_1", "size": 120u64 << 20,
                "digest": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "details": details(&m.config),
                "expires_at": "2025-03-24T11:54:41.000000000Z",
                "size_vram": 0, "context_length": 4096,
            })
        );
    }

    #[test]
    fn show_reads_the_header_with_types() {
        let m = model();
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "general.architecture".to_string(),
            gguf::Value::String("llama".into()),
        );
        metadata.insert("general.file_type".to_string(), gguf::Value::Uint(3));
        metadata.insert(
            "llama.rope.freq_base".to_string(),
            gguf::Value::Float(10000.0),
        );
        metadata.insert(
            "tokenizer.ggml.add_bos_token".to_string(),
            gguf::Value::Bool(false),
        );
        metadata.insert(
            "tokenizer.ggml.tokens".to_string(),
            gguf::Value::Array {
                elem_type: 8,
                len: 49152,
            },
        );
        metadata.insert(
            "llama.vocab_dims".to_string(),
            gguf::Value::Array {
                elem_type: 4,
                len: 2,
            },
        );
        metadata.insert(
            "tokenizer.chat_template".to_string(),
            gguf::Value::String(
                "{% for message in messages %}{% if tools %}…{% endif %}{% endfor %}".into(),
            ),
        );
        let mut short_arrays = BTreeMap::new();
        short_arrays.insert(
            "llama.vocab_dims".to_string(),
            vec![gguf::Value::Uint(1), gguf::Value::Uint(2)],
        );
        let info = GgufInfo {
            version: 3,
            metadata,
            short_arrays,
            tensor_count: 272,
            parameters: 134_515_008,
            data_start: 0,
            data_end: 0,
        };
        let template = "{% for message in messages %}{% if tools %}…{% endif %}{% endfor %}";
        assert_eq!(
            show_json("ai/smollm2:135M-Q4_1", &m, &info, 8192),
            json!({
                "modelfile": format!("# Modelfile of ai/smollm2:135M-Q4_1, as moat's model runner shows it\n\nFROM /store/blobs/sha256/aa\nTEMPLATE \"\"\"{template}\"\"\"\nPARAMETER num_ctx 8192\nLICENSE \"\"\"Apache-2.0\"\"\"\n"),
                "parameters": "num_ctx 8192",
                "template": template,
                "details": details(&m.config),
                "model_info": {
                    "general.architecture": "llama",
                    "general.file_type": 3,
                    "general.parameter_count": 134_515_008u64,
                    "llama.rope.freq_base": 10000.0,
                    "llama.vocab_dims": [1, 2],
                    "tokenizer.ggml.add_bos_token": false,
                    "tokenizer.ggml.tokens": [],
                },
                "capabilities": ["completion", "tools", "embedding"],
                "modified_at": "2025-03-24T11:49:41Z",
                "license": "Apache-2.0",
            })
        );
    }

    #[test]
    fn pull_progress_reads_like_ollama() {
        assert_eq!(
            pull_status(&Transfer::Step("resolving x".into())),
            json!({"status": "resolving x"})
        );
        assert_eq!(
            pull_status(&Transfer::Bytes {
                id: "0123456789ab".into(),
                done: 5,
                total: 10
            }),
            json!({"status": "pulling 0123456789ab", "digest": "0123456789ab", "total": 10, "completed": 5})
        );
    }
}

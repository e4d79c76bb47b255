//! OpenAI's API: chat completions (streamed as server-sent events, with
//! tools and structured output), completions, embeddings, the model
//! list and (in `responses.rs`) the Responses API, as `/v1/…`, `/engines/v1/…` and `/engines/llama.cpp/v1/…`.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::generation::{
    random_hex, ChatInput, Out, ResponseFormat, Summary, ToolCall, ToolChoice,
};
use super::http::{self, ApiError, Body, Dialect};
use super::ModelService;
use crate::engine::{FromWorker, Sampling};

pub async fn handle(
    svc: &Arc<ModelService>,
    method: &Method,
    rest: &str,
    req: Request,
) -> Response<Body> {
    let result = match (method, rest) {
        (&Method::POST, "chat/completions") => chat(svc, req).await,
        (&Method::POST, "completions") => completions(svc, req).await,
        (&Method::POST, "embeddings") => embeddings(svc, req).await,
        (&Method::POST, "responses") => super::responses::create(svc, req).await,
        (&Method::GET, "models") => list(svc),
        (&Method::GET, path) if path.starts_with("models/") => one(svc, &path["models/".len()..]),
        _ => Err(ApiError::not_found(format!(
            "no route {method} /v1/{rest} on the model runner"
        ))),
    };
    result.unwrap_or_else(|e| e.response(Dialect::OpenAi))
}

type Request = hyper::Request<Incoming>;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields OpenAI's requests share, with llama-server's
/// extensions (`top_k`, `min_p`, `repeat_penalty`, `ignore_eos`).
#[derive(Debug, Default, Deserialize)]
pub(super) struct SamplingFields {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    #[serde(default)]
    pub(super) ignore_eos: bool,
}

impl SamplingFields {
    pub(super) fn sampling(&self) -> Result<Sampling, ApiError> {
        let d = Sampling::default();
        let s = Sampling {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed.map(|s| s as u32),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
        };
        if !(0.0..=2.0).contains(&s.temperature) {
            return Err(ApiError::bad_request(
                "invalid field `temperature`: must be between 0 and 2",
            ));
        }
        if !(0.0..=1.0).contains(&s.top_p) {
            return Err(ApiError::bad_request(
                "invalid field `top_p`: must be between 0 and 1",
            ));
        }
        if !(-2.0..=2.0).contains(&s.presence_penalty)
            || !(-2.0..=2.0).contains(&s.frequency_penalty)
        {
            return Err(ApiError::bad_request(
                "invalid field `presence_penalty`/`frequency_penalty`: must be between -2 and 2",
            ));
        }
        Ok(s)
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    response_format: Option<Value>,
    n: Option<u32>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

pub fn parse_tool_choice(v: Option<&Value>) -> Result<ToolChoice, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(ApiError::bad_request(format!(
                "invalid field `tool_choice`: {other:?}; use \"auto\", \"none\", \"required\" or {{\"type\":\"function\",\"function\":{{\"name\":…}}}}"
            ))),
        },
        Some(obj) => obj
            .pointer("/function/name")
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Named(n.to_string()))
            .ok_or_else(|| ApiError::bad_request("invalid field `tool_choice`: an object needs `function.name`")),
    }
}

pub fn parse_response_format(v: Option<&Value>) -> Result<ResponseFormat, ApiError> {
    let Some(v) = v else {
        return Ok(ResponseFormat::Text);
    };
    match v.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(match v.get("schema") {
            // llama-server accepts a schema beside json_object too.
            Some(schema) => ResponseFormat::JsonSchema(schema.clone()),
            None => ResponseFormat::JsonObject,
        }),
        Some("json_schema") => v
            .pointer("/json_schema/schema")
            .map(|s| ResponseFormat::JsonSchema(s.clone()))
            .ok_or_else(|| ApiError::bad_request("invalid field `response_format.json_schema.schema`: missing")),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid field `response_format.type`: {other:?}; use \"text\", \"json_object\" or \"json_schema\""
        ))),
    }
}

fn check_messages(messages: &[Value]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "invalid field `messages`: it is empty",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer" | "user" | "assistant" | "tool") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "invalid field `messages[{i}].role`: {other:?}"
                )))
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "invalid field `messages[{i}]`: missing `role`"
                )))
            }
        }
    }
    Ok(())
}

async fn chat(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: ChatRequest = http::parse(&body)?;
    check_messages(&r.messages)?;
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "invalid field `n`: only 1 is supported",
        ));
    }
    let mut input = ChatInput::new(r.model.clone(), r.messages);
    input.tools = r.tools;
    input.tool_choice = parse_tool_choice(r.tool_choice.as_ref())?;
    input.response_format = parse_response_format(r.response_format.as_ref())?;
    input.sampling = r.sampling.sampling()?;
    input.ignore_eos = r.sampling.ignore_eos;
    input.max_tokens = r.max_completion_tokens.or(r.max_tokens);
    input.stop = r.stop.map(OneOrMany::into_vec).unwrap_or_default();
    let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
    let mut gen = svc.start_chat(input).await?;
    let id = format!("chatcmpl-{}", random_hex(24));
    let created = http::unix_now();
    let model = r.model;
    if !r.stream {
        let (text, calls, summary) = gen.collect(svc).await?;
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            message["content"] = if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            message["tool_calls"] = calls.iter().map(tool_call_json).collect();
        }
        return Ok(http::ok_json(&json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "moat",
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": summary.finish.openai()}],
            "usage": usage(&summary),
            "timings": summary.timings,
        })));
    }
    let (tx, resp) = http::streaming("text/event-stream");
    let svc = svc.clone();
    svc.clone().runtime().spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "moat",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        };
        if tx.send(http::sse(None, &chunk(json!({"role": "assistant", "content": ""}), None))).await.is_err() {
            return;
        }
        while let Some(out) = gen.next(&svc).await {
            let event = match out {
                Ok(Out::Text(text)) => http::sse(None, &chunk(json!({"content": text}), None)),
                Ok(Out::ToolCalls(calls)) => {
                    // The first delta of each call carries its id and name,
                    // the next its arguments, as OpenAI streams them.
                    for (index, call) in calls.iter().enumerate() {
                        let head = json!({"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]});
                        let args = json!({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]});
                        for delta in [head, args] {
                            if tx.send(http::sse(None, &chunk(delta, None))).await.is_err() {
                                return;
                            }
                        }
                    }
                    continue;
                }
                Ok(Out::Done(summary)) => {
                    let mut last = chunk(json!({}), Some(summary.finish.openai()));
                    last["timings"] = json!(summary.timings);
                    let _ = tx.send(http::sse(None, &last)).await;
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&summary);
                        let _ = tx.send(http::sse(None, &u)).await;
                    }
                    break;
                }
                Err(e) => {
                    let _ = tx.send(http::sse(None, &e.body(Dialect::OpenAi))).await;
                    break;
                }
            };
            if tx.send(event).await.is_err() {
                // The client went away: dropping `gen` cancels the request.
                return;
            }
        }
        let _ = tx.send(bytes::Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Ok(resp)
}

fn tool_call_json(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

pub fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.timings.cache_n},
    })
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: OneOrMany,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    response_format: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

async fn completions(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: CompletionRequest = http::parse(&body)?;
    let prompts = r.prompt.into_vec();
    let [prompt] = <[String; 1]>::try_from(prompts)
        .map_err(|_| ApiError::bad_request("invalid field `prompt`: give one prompt"))?;
    let mut input = ChatInput::new(r.model.clone(), Vec::new());
    input.sampling = r.sampling.sampling()?;
    input.ignore_eos = r.sampling.ignore_eos;
    // OpenAI's default for completions.
    input.max_tokens = Some(r.max_tokens.unwrap_or(16));
    input.stop = r.stop.map(OneOrMany::into_vec).unwrap_or_default();
    input.response_format = parse_response_format(r.response_format.as_ref())?;
    let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
    let mut gen = svc.start_completion(input, prompt).await?;
    let id = format!("cmpl-{}", random_hex(24));
    let created = http::unix_now();
    let model = r.model;
    if !r.stream {
        let (text, _, summary) = gen.collect(svc).await?;
        return Ok(http::ok_json(&json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": summary.finish.openai()}],
            "usage": usage(&summary),
            "timings": summary.timings,
        })));
    }
    let (tx, resp) = http::streaming("text/event-stream");
    let svc = svc.clone();
    svc.clone().runtime().spawn(async move {
        let chunk = |text: &str, finish: Option<&str>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
        };
        while let Some(out) = gen.next(&svc).await {
            let event = match out {
                Ok(Out::Text(text)) => http::sse(None, &chunk(&text, None)),
                Ok(Out::ToolCalls(_)) => continue,
                Ok(Out::Done(summary)) => {
                    let mut last = chunk("", Some(summary.finish.openai()));
                    last["timings"] = json!(summary.timings);
                    if include_usage {
                        last["usage"] = usage(&summary);
                    }
                    let _ = tx.send(http::sse(None, &last)).await;
                    break;
                }
                Err(e) => {
                    let _ = tx.send(http::sse(None, &e.body(Dialect::OpenAi))).await;
                    break;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(bytes::Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: OneOrMany,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// Embed `inputs` with `model`: the vectors and the tokens they took.
pub async fn embed(
    svc: &Arc<ModelService>,
    model: &str,
    inputs: Vec<String>,
) -> Result<(Vec<Vec<f32>>, u32), ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::bad_request("invalid field `input`: it is empty"));
    }
    let (worker, _) = svc.load(model, None).await?;
    let mut request = worker
        .embed(inputs)
        .map_err(|e| ApiError::new(503, e.to_string()))?;
    match request.next().await {
        Some(FromWorker::Embeddings {
            vectors, tokens, ..
        }) => Ok((vectors, tokens)),
        Some(FromWorker::Failed { status, error, .. }) => Err(ApiError::new(status, error)),
        _ => Err(ApiError::new(503, "the model worker went away; retry")),
    }
}

async fn embeddings(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: EmbeddingRequest = http::parse(&body)?;
    // The OpenAI SDK asks for base64 (little-endian f32s) by default.
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid field `encoding_format`: {other:?}; use \"float\" or \"base64\""
            )))
        }
    };
    let (vectors, tokens) = embed(svc, &r.model, r.input.into_vec()).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| {
            let embedding = if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = embedding.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(embedding)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(http::ok_json(&json!({
        "object": "list", "data": data, "model": r.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// DMR's OpenAI model entry: one per tag.
pub fn model_entries(svc: &ModelService) -> Result<Vec<Value>, ApiError> {
    let models = svc.store.list().map_err(super::store_error)?;
    Ok(models
        .iter()
        .flat_map(|m| {
            m.tags.iter().map(move |tag| json!({"id": tag, "object": "model", "created": m.created, "owned_by": "docker"}))
        })
        .collect())
}

fn list(svc: &Arc<ModelService>) -> Result<Response<Body>, ApiError> {
    Ok(http::ok_json(
        &json!({"object": "list", "data": model_entries(svc)?}),
    ))
}

fn one(svc: &Arc<ModelService>, name: &str) -> Result<Response<Body>, ApiError> {
    let m = svc.find(name)?;
    // The name as asked, in full (`ai/smollm2` is `ai/smollm2:latest`), when
    // it is one of the model's tags: which of several tags is first says nothing.
    let asked = crate::store::ModelReference::parse(name)
        .ok()
        .map(|r| r.to_string())
        .filter(|full| m.tags.contains(full));
    let id = asked
        .or_else(|| m.tags.first().cloned())
        .unwrap_or_else(|| name.to_string());
    Ok(http::json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "model", "created": m.created, "owned_by": "docker"}),
    ))
}

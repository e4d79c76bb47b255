//! Anthropic's Messages API (`/v1/messages`, `/anthropic/v1/messages` and
//! `…/messages/count_tokens`), so that Claude Code and the `anthropic` SDK
//! can talk to a local model as they talk to Claude. A request is
//! translated into the shared [`ChatInput`] (system prompt, text, tool use
//! and tool results as OpenAI-shaped messages; tools and `tool_choice` as
//! OpenAI's; structured output's JSON schema as OpenAI's `json_schema`
//! response format), and the generation's text and tool calls come back as
//! Anthropic content blocks, whole or as Anthropic's exact sequence of
//! server-sent events.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::generation::{
    random_hex, ChatInput, FinishReason, Out, ResponseFormat, Summary, ToolCall, ToolChoice,
};
use super::http::{self, ApiError, Body, Dialect};
use super::ModelService;
use crate::engine::{FromWorker, Sampling};

type Request = hyper::Request<Incoming>;

pub async fn handle(
    svc: &Arc<ModelService>,
    method: &Method,
    rest: &str,
    req: Request,
) -> Response<Body> {
    let result = match (method, rest) {
        (&Method::POST, "messages") => messages(svc, req).await,
        (&Method::POST, "messages/count_tokens") => count_tokens(svc, req).await,
        _ => Err(ApiError::not_found(format!(
            "no route {method} /v1/{rest} on the model runner; the Anthropic API here is POST /v1/messages and POST /v1/messages/count_tokens"
        ))),
    };
    result.unwrap_or_else(|e| e.response(Dialect::Anthropic))
}

/// A Messages request (`count_tokens` takes the same, less `max_tokens`).
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<SystemPrompt>,
    max_tokens: Option<u32>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<AnthropicToolChoice>,
    /// Structured output: `format` is `{"type": "json_schema", "schema": …}`
    /// (`effort` means nothing to a local model and is ignored).
    output_config: Option<OutputConfig>,
    /// The structured-outputs beta's spelling of `output_config.format`.
    output_format: Option<OutputFormat>,
}

#[derive(Debug, Deserialize)]
struct OutputConfig {
    format: Option<OutputFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutputFormat {
    JsonSchema { schema: Value },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SystemPrompt {
    Text(String),
    Blocks(Vec<SystemBlock>),
}

#[derive(Debug, Deserialize)]
struct SystemBlock {
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    Assistant,
}

/// A message: its content is a string or a list of blocks, read by hand
/// so that an error names the block that is wrong.
#[derive(Debug, Deserialize)]
struct Message {
    role: Role,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct Tool {
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum AnthropicToolChoice {
    Auto {},
    Any {},
    Tool { name: String },
    None {},
}

/// A content block as far as a local model can use it.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
}

fn field_error(at: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("invalid field `{at}`: {what}"))
}

fn str_field<'a>(block: &'a Value, at: &str, key: &str) -> Result<&'a str, ApiError> {
    match block.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(field_error(
            &format!("{at}.{key}"),
            format!("expected a string, got {other}"),
        )),
        None => Err(field_error(at, format!("missing `{key}`"))),
    }
}

/// The text of a `tool_result`'s content: a string or text blocks.
fn tool_result_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => {
            let mut texts = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let at = format!("{at}.content[{i}]");
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(str_field(item, &at, "text")?.to_string()),
                    Some(kind) => {
                        return Err(field_error(
                            &format!("{at}.type"),
                            format!("{kind:?} blocks in a tool result are not supported by local models; send text"),
                        ))
                    }
                    None => return Err(field_error(&at, "missing `type`")),
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(field_error(
            &format!("{at}.content"),
            format!("expected a string or a list of blocks, got {other}"),
        )),
    }
}

/// The blocks of a message's `content` (a string is one text block).
/// Thinking blocks are dropped: a local model does not read them back.
fn blocks(content: &Value, at: &str) -> Result<Vec<Block>, ApiError> {
    let items = match content {
        Value::String(s) => return Ok(vec![Block::Text(s.clone())]),
        Value::Array(items) => items,
        other => {
            return Err(field_error(
                at,
                format!("expected a string or a list of blocks, got {other}"),
            ))
        }
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let kind = match item.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(field_error(
                    &format!("{at}.type"),
                    format!("expected a string, got {other}"),
                ))
            }
            None => return Err(field_error(&at, "missing `type`")),
        };
        match kind {
            "text" => out.push(Block::Text(str_field(item, &at, "text")?.to_string())),
            "tool_use" => out.push(Block::ToolUse {
                id: str_field(item, &at, "id")?.to_string(),
                name: str_field(item, &at, "name")?.to_string(),
                input: item.get("input").cloned().unwrap_or_else(|| json!({})),
            }),
            "tool_result" => out.push(Block::ToolResult {
                tool_use_id: str_field(item, &at, "tool_use_id")?.to_string(),
                content: tool_result_text(item.get("content"), &at)?,
                is_error: item.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            }),
            "thinking" | "redacted_thinking" => {}
            "image" | "document" => {
                return Err(field_error(
                    &format!("{at}.type"),
                    format!("{kind:?} blocks are not supported by local text models; send text"),
                ))
            }
            other => {
                return Err(field_error(
                    &format!("{at}.type"),
                    format!("{other:?} is not a content block this server knows; use \"text\", \"tool_use\" or \"tool_result\""),
                ))
            }
        }
    }
    Ok(out)
}

/// Anthropic's conversation as OpenAI-shaped messages: the system prompt
/// first; a user turn's tool results become `tool` messages (OpenAI wants
/// them right after the assistant's calls), followed by its text; an
/// assistant turn's `tool_use` blocks become its `tool_calls`.
fn to_messages(
    system: Option<&SystemPrompt>,
    messages: &[Message],
) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(field_error("messages", "it is empty"));
    }
    let mut out = Vec::new();
    let system = match system {
        None => String::new(),
        Some(SystemPrompt::Text(s)) => s.clone(),
        Some(SystemPrompt::Blocks(b)) => b
            .iter()
            .map(|b| b.text.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    if !system.is_empty() {
        out.push(json!({"role": "system", "content": system}));
    }
    for (i, m) in messages.iter().enumerate() {
        let blocks = blocks(&m.content, &format!("messages[{i}].content"))?;
        let mut texts = Vec::new();
        match m.role {
            Role::User => {
                for b in blocks {
                    match b {
                        Block::Text(t) => texts.push(t),
                        Block::ToolResult { tool_use_id, content, is_error } => {
                            let content = if is_error { format!("Error: {content}") } else { content };
                            out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": content}));
                        }
                        Block::ToolUse { .. } => {
                            return Err(field_error(
                                &format!("messages[{i}].content"),
                                "a user message cannot hold a `tool_use` block; tool use comes from the assistant",
                            ))
                        }
                    }
                }
                if !texts.is_empty() {
                    out.push(json!({"role": "user", "content": texts.join("\n")}));
                }
            }
            Role::Assistant => {
                let mut calls = Vec::new();
                for b in blocks {
                    match b {
                        Block::Text(t) => texts.push(t),
                        Block::ToolUse { id, name, input } => calls.push(json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": input.to_string()},
                        })),
                        Block::ToolResult { .. } => {
                            return Err(field_error(
                                &format!("messages[{i}].content"),
                                "an assistant message cannot hold a `tool_result` block; send results in a user message",
                            ))
                        }
                    }
                }
                let mut msg = json!({"role": "assistant", "content": texts.join("\n")});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                out.push(msg);
            }
        }
    }
    Ok(out)
}

/// Anthropic's tools as OpenAI function tools.
fn to_tools(tools: &[Tool]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let Some(schema) = &t.input_schema else {
                let kind = t.kind.as_deref().unwrap_or("custom");
                return Err(field_error(
                    &format!("tools[{i}].input_schema"),
                    format!("missing; server tools (type {kind:?}) are not available with local models, give a custom tool with an `input_schema`"),
                ));
            };
            let mut function = json!({"name": t.name, "parameters": schema});
            if let Some(d) = &t.description {
                function["description"] = json!(d);
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

fn to_tool_choice(choice: Option<&AnthropicToolChoice>) -> ToolChoice {
    match choice {
        None | Some(AnthropicToolChoice::Auto {}) => ToolChoice::Auto,
        Some(AnthropicToolChoice::Any {}) => ToolChoice::Required,
        Some(AnthropicToolChoice::Tool { name }) => ToolChoice::Named(name.clone()),
        Some(AnthropicToolChoice::None {}) => ToolChoice::None,
    }
}

/// Sampling from Anthropic's fields; what it leaves out keeps the runner's
/// defaults (the same as every other API here).
fn sampling(r: &MessagesRequest) -> Result<Sampling, ApiError> {
    let d = Sampling::default();
    if r.temperature.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
        return Err(field_error("temperature", "must be between 0 and 1"));
    }
    if r.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(field_error("top_p", "must be between 0 and 1"));
    }
    if r.top_k.is_some_and(|k| k < 0) {
        return Err(field_error("top_k", "must be 0 or more"));
    }
    Ok(Sampling {
        temperature: r.temperature.unwrap_or(d.temperature),
        top_p: r.top_p.unwrap_or(d.top_p),
        top_k: r.top_k.unwrap_or(d.top_k),
        ..d
    })
}

/// The shared chat input of a Messages request; `max_tokens` is required
/// unless only tokens are counted.
fn to_chat_input(r: &MessagesRequest, count_only: bool) -> Result<ChatInput, ApiError> {
    let mut input = ChatInput::new(
        r.model.clone(),
        to_messages(r.system.as_ref(), &r.messages)?,
    );
    input.tools = to_tools(&r.tools)?;
    input.tool_choice = to_tool_choice(r.tool_choice.as_ref());
    if !count_only {
        input.max_tokens = match r.max_tokens {
            None => {
                return Err(field_error(
                    "max_tokens",
                    "missing; the Messages API requires it",
                ))
            }
            Some(0) => return Err(field_error("max_tokens", "must be at least 1")),
            Some(n) => Some(n),
        };
    }
    input.sampling = sampling(r)?;
    input.stop = r.stop_sequences.clone();
    let format = r
        .output_config
        .as_ref()
        .and_then(|c| c.format.as_ref())
        .or(r.output_format.as_ref());
    if let Some(OutputFormat::JsonSchema { schema }) = format {
        input.response_format = ResponseFormat::JsonSchema(schema.clone());
    }
    Ok(input)
}

/// Anthropic's ids keep the call's random part: `call_ab12` is `toolu_ab12`.
fn tool_use_id(call: &ToolCall) -> String {
    format!(
        "toolu_{}",
        call.id.strip_prefix("call_").unwrap_or(&call.id)
    )
}

/// A call's arguments as the JSON object Anthropic's `input` is.
/// Arguments that are JSON but not an object are wrapped as `{"value": …}`.
fn tool_input(call: &ToolCall) -> Value {
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => json!({"value": other}),
        Err(e) => {
            tracing::warn!(tool = %call.name, error = %e, "a tool call's arguments are not JSON; sending {{}}");
            json!({})
        }
    }
}

fn stop_reason(summary: &Summary) -> &'static str {
    match summary.finish {
        FinishReason::Stop if summary.stop_word.is_some() => "stop_sequence",
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
    }
}

fn usage(s: &Summary) -> Value {
    json!({"input_tokens": s.prompt_tokens, "output_tokens": s.completion_tokens})
}

/// A whole answer: its text, then its tool calls (an empty text block when
/// there is nothing else, so that `content[0]` is always there).
fn message_json(id: &str, model: &str, text: &str, calls: &[ToolCall], summary: &Summary) -> Value {
    let mut content = Vec::new();
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in calls {
        content.push(json!({"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": tool_input(call)}));
    }
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(summary),
        "stop_sequence": summary.stop_word,
        "usage": usage(summary),
        "timings": summary.timings,
    })
}

/// Turns the generation's output into Anthropic's events, in its order:
/// `message_start`; per block `content_block_start`, its deltas and
/// `content_block_stop` (a `ping` after the first start); then
/// `message_delta` with the stop reason and usage, and `message_stop`.
struct EventWriter {
    id: String,
    model: String,
    /// The index the next block gets.
    next: usize,
    /// Whether a text block is open (at `next - 1`).
    text_open: bool,
}

type Event = (&'static str, Value);

impl EventWriter {
    fn new(id: String, model: String) -> Self {
        EventWriter {
            id,
            model,
            next: 0,
            text_open: false,
        }
    }

    /// The first event. The prompt's size is known only at the end; it is
    /// in `message_delta`'s usage.
    fn start(&self) -> Event {
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        )
    }

    fn open(&mut self, block: Value, events: &mut Vec<Event>) {
        let index = self.next;
        self.next += 1;
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        if index == 0 {
            events.push(("ping", json!({"type": "ping"})));
        }
    }

    fn close(&self, events: &mut Vec<Event>) {
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": self.next - 1}),
        ));
    }

    fn close_text(&mut self, events: &mut Vec<Event>) {
        if self.text_open {
            self.close(events);
            self.text_open = false;
        }
    }

    fn on(&mut self, out: Out) -> Vec<Event> {
        let mut events = Vec::new();
        match out {
            Out::Text(text) => {
                if !self.text_open {
                    self.open(json!({"type": "text", "text": ""}), &mut events);
                    self.text_open = true;
                }
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.next - 1, "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            Out::ToolCalls(calls) => {
                self.close_text(&mut events);
                for call in &calls {
                    self.open(
                        json!({"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": {}}),
                        &mut events,
                    );
                    events.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": self.next - 1,
                               "delta": {"type": "input_json_delta", "partial_json": tool_input(call).to_string()}}),
                    ));
                    self.close(&mut events);
                }
            }
            Out::Done(summary) => {
                if self.next == 0 {
                    self.open(json!({"type": "text", "text": ""}), &mut events);
                    self.text_open = true;
                }
                self.close_text(&mut events);
                events.push((
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": stop_reason(&summary), "stop_sequence": summary.stop_word},
                           "usage": usage(&summary),
                           "timings": summary.timings}),
                ));
                events.push(("message_stop", json!({"type": "message_stop"})));
            }
        }
        events
    }
}

async fn messages(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: MessagesRequest = http::parse(&body)?;
    let input = to_chat_input(&r, false)?;
    let mut gen = svc.start_chat(input).await?;
    let id = format!("msg_{}", random_hex(24));
    if !r.stream {
        let (text, calls, summary) = gen.collect(svc).await?;
        return Ok(http::ok_json(&message_json(
            &id, &r.model, &text, &calls, &summary,
        )));
    }
    let (tx, resp) = http::streaming("text/event-stream");
    let svc = svc.clone();
    svc.clone().runtime().spawn(async move {
        let mut writer = EventWriter::new(id, r.model);
        let (name, start) = writer.start();
        if tx.send(http::sse(Some(name), &start)).await.is_err() {
            return;
        }
        while let Some(out) = gen.next(&svc).await {
            let events = match out {
                Ok(out) => writer.on(out),
                Err(e) => vec![("error", e.body(Dialect::Anthropic))],
            };
            for (name, data) in events {
                if tx.send(http::sse(Some(name), &data)).await.is_err() {
                    // The client went away: dropping `gen` cancels the request.
                    return;
                }
            }
        }
    });
    Ok(resp)
}

/// `count_tokens`: the prompt the request renders to with the model's chat
/// template (tools included), counted by the model's own tokenizer.
async fn count_tokens(svc: &Arc<ModelService>, req: Request) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: MessagesRequest = http::parse(&body)?;
    let input = to_chat_input(&r, true)?;
    let (worker, prompt, _) = svc.render_prompt(&input).await?;
    let mut request = worker
        .tokenize(prompt, true)
        .map_err(|e| ApiError::new(503, e.to_string()))?;
    match request.next().await {
        Some(FromWorker::Tokens { tokens, .. }) => {
            Ok(http::ok_json(&json!({"input_tokens": tokens.len()})))
        }
        Some(FromWorker::Failed { status, error, .. }) => Err(ApiError::new(status, error)),
        _ => Err(ApiError::new(503, "the model worker went away; retry")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::Timings;

    fn request(body: Value) -> MessagesRequest {
        http::parse(body.to_string().as_bytes()).unwrap()
    }

    fn summary(finish: FinishReason) -> Summary {
        Summary {
            finish,
            stop_word: None,
            prompt_tokens: 12,
            completion_tokens: 5,
            timings: Timings::new(2, 10, 20.0, 5, 10.0),
        }
    }

    fn call() -> ToolCall {
        ToolCall {
            id: "call_0123abcd".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }
    }

    #[test]
    fn a_conversation_with_tools_becomes_openai_messages() {
        let r = request(json!({
            "model": "ai/smollm2",
            "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "…", "signature": "x"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18°C"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "timeout", "is_error": true},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
            "tools": [{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"],
            "temperature": 0.2,
            "top_k": 5,
        }));
        let input = to_chat_input(&r, false).unwrap();
        assert_eq!(
            Value::Array(input.messages),
            json!([
                {"role": "system", "content": "Be brief.\nUse tools."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18°C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
                {"role": "user", "content": "And tomorrow?"},
            ])
        );
        assert_eq!(
            Value::Array(input.tools),
            json!([{"type": "function", "function": {
                "name": "get_weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }}])
        );
        assert_eq!(input.tool_choice, ToolChoice::Required);
        assert_eq!(input.max_tokens, Some(64));
        assert_eq!(input.stop, vec!["END".to_string()]);
        assert_eq!(
            input.sampling,
            Sampling {
                temperature: 0.2,
                top_k: 5,
                ..Sampling::default()
            }
        );
    }

    #[test]
    fn tool_choice_maps_each_type() {
        let choice = |c: Value| {
            let r = request(
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tool_choice": c}),
            );
            to_chat_input(&r, false).unwrap().tool_choice
        };
        assert_eq!(choice(json!({"type": "auto"})), ToolChoice::Auto);
        assert_eq!(choice(json!({"type": "any"})), ToolChoice::Required);
        assert_eq!(choice(json!({"type": "none"})), ToolChoice::None);
        assert_eq!(
            choice(json!({"type": "tool", "name": "f"})),
            ToolChoice::Named("f".into())
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let err = |body: Value| {
            let bytes = body.to_string();
            match http::parse::<MessagesRequest>(bytes.as_bytes()) {
                Err(e) => e.message,
                Ok(r) => to_chat_input(&r, false).unwrap_err().message,
            }
        };
        assert_eq!(
            err(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})),
            "invalid field `max_tokens`: missing; the Messages API requires it"
        );
        assert_eq!(
            err(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})),
            "invalid field `messages[0].content[0].type`: \"image\" blocks are not supported by local text models; send text"
        );
        assert_eq!(
            err(
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]})
            ),
            "invalid field `messages[0].content[0]`: missing `tool_use_id`"
        );
        assert_eq!(
            err(
                json!({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]})
            ),
            "invalid field `temperature`: must be between 0 and 1"
        );
        assert_eq!(
            err(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
            "invalid field `tools[0].input_schema`: missing; server tools (type \"web_search_20250305\") are not available with local models, give a custom tool with an `input_schema`"
        );
        assert!(err(
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]})
        )
        .starts_with("invalid field `messages[0].role`: unknown variant `system`"));
    }

    #[test]
    fn structured_output_is_a_json_schema_format() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]});
        let format = |extra: Value| {
            let mut body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            to_chat_input(&request(body), false)
                .unwrap()
                .response_format
        };
        assert_eq!(
            format(
                json!({"output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}})
            ),
            ResponseFormat::JsonSchema(schema.clone())
        );
        assert_eq!(
            format(json!({"output_format": {"type": "json_schema", "schema": schema}})),
            ResponseFormat::JsonSchema(schema.clone())
        );
        assert_eq!(
            format(json!({"output_config": {"effort": "high"}})),
            ResponseFormat::Text
        );
        let err = http::parse::<MessagesRequest>(
            json!({"model": "m", "max_tokens": 5, "messages": [], "output_config": {"format": {"type": "xml"}}})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert!(
            err.message
                .starts_with("invalid field `output_config.format.type`: unknown variant `xml`, expected `json_schema`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn count_tokens_needs_no_max_tokens() {
        let r = request(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let input = to_chat_input(&r, true).unwrap();
        assert_eq!(
            Value::Array(input.messages),
            json!([{"role": "user", "content": "hi"}])
        );
        assert_eq!(input.max_tokens, None);
    }

    #[test]
    fn a_whole_answer_with_a_tool_call() {
        let s = summary(FinishReason::ToolCalls);
        assert_eq!(
            message_json("msg_1", "ai/smollm2", "Checking.", &[call()], &s),
            json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "ai/smollm2",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_0123abcd", "name": "get_weather", "input": {"city": "Paris"}},
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 5},
                "timings": s.timings,
            })
        );
        let s = summary(FinishReason::Length);
        assert_eq!(
            message_json("msg_2", "m", "", &[], &s),
            json!({
                "id": "msg_2", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": ""}],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 5},
                "timings": s.timings,
            })
        );
    }

    fn stream(outs: Vec<Out>) -> Vec<Event> {
        let mut w = EventWriter::new("msg_1".into(), "m".into());
        let mut events = vec![w.start()];
        for out in outs {
            events.extend(w.on(out));
        }
        events
    }

    #[test]
    fn a_streamed_answer_follows_anthropics_event_order() {
        let s = summary(FinishReason::ToolCalls);
        let events = stream(vec![
            Out::Text("Hel".into()),
            Out::Text("lo".into()),
            Out::ToolCalls(vec![call()]),
            Out::Done(s.clone()),
        ]);
        let expected: Vec<Event> = vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_0123abcd", "name": "get_weather", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"input_tokens": 12, "output_tokens": 5}, "timings": s.timings}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ];
        assert_eq!(events, expected);
    }

    #[test]
    fn an_empty_stream_still_has_one_text_block() {
        let s = summary(FinishReason::Stop);
        let events = stream(vec![Out::Done(s.clone())]);
        let names: Vec<&str> = events.iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            events[4].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"input_tokens": 12, "output_tokens": 5}, "timings": s.timings})
        );
    }
}

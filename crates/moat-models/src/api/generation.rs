//! What every API surface does between parsing a request and writing its
//! answer: find the model, load it, render the chat template, choose a
//! grammar for forced tool calls or JSON output, start the generation, and
//! turn the worker's pieces into text and tool calls. OpenAI, Anthropic and
//! Ollama requests are converted to OpenAI-shaped messages first, so that
//! each of them is only a translation of its own shapes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::http::ApiError;
use super::ModelService;
use crate::chat::{self, ToolFormat};
use crate::engine::{Finish, FromWorker, Generate, Request, Sampling, Timings, Worker};

/// What the tools settings of a request ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema(Value),
}

/// A chat request in the terms every surface shares.
#[derive(Debug, Clone)]
pub struct ChatInput {
    pub model: String,
    /// OpenAI-shaped messages.
    pub messages: Vec<Value>,
    /// OpenAI-shaped tools.
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    pub response_format: ResponseFormat,
    pub sampling: Sampling,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// `Some(None)`: keep loaded forever; `None`: the model's setting.
    pub keep_alive: Option<Option<Duration>>,
}

impl ChatInput {
    pub fn new(model: String, messages: Vec<Value>) -> Self {
        ChatInput {
            model,
            messages,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            response_format: ResponseFormat::Text,
            sampling: Sampling::default(),
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            keep_alive: None,
        }
    }
}

/// A tool call the model made, with its arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// What a surface writes next.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Text(String),
    ToolCalls(Vec<ToolCall>),
    Done(Summary),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub finish: FinishReason,
    /// The stop string that ended the answer, if one did.
    pub stop_word: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub timings: Timings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

impl FinishReason {
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// A generation under way.
pub struct Generation {
    request: Request,
    /// The model's tool-call format, when the request offered tools.
    tools: Option<ToolFormat>,
    /// All text so far, and how much of it was given out.
    text: String,
    sent: usize,
    /// Whether the text is known not to be a tool call.
    content: bool,
    /// The first event, read before the response head was written.
    first: Option<FromWorker>,
    queue: std::collections::VecDeque<Out>,
    finished: bool,
    /// The name the client used for the model.
    pub model: String,
}

impl ModelService {
    /// Start a chat: returns once the first event is in, so that an error
    /// (an unknown model, a prompt over the context) still gets its status.
    pub async fn start_chat(self: &Arc<Self>, input: ChatInput) -> Result<Generation, ApiError> {
        let (worker, prompt, format) = self.render_prompt(&input).await?;
        let grammar = match (&input.tool_choice, &format) {
            (ToolChoice::Required, Some(f)) => Some(
                chat::grammar::tool_call_gbnf(
                    *f,
                    &input.tools,
                    &chat::grammar::ToolChoice::Required,
                )
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
            ),
            (ToolChoice::Named(name), Some(f)) => {
                if !input
                    .tools
                    .iter()
                    .any(|t| tool_name(t) == Some(name.as_str()))
                {
                    return Err(ApiError::bad_request(format!(
                        "`tool_choice` names the function {name:?}, which is not among `tools`"
                    )));
                }
                Some(
                    chat::grammar::tool_call_gbnf(
                        *f,
                        &input.tools,
                        &chat::grammar::ToolChoice::Named(name.clone()),
                    )
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                )
            }
            _ => match &input.response_format {
                ResponseFormat::Text => None,
                ResponseFormat::JsonObject => Some(chat::grammar::json_object_gbnf()),
                ResponseFormat::JsonSchema(schema) => Some(
                    chat::grammar::json_schema_to_gbnf(schema)
                        .map_err(|e| ApiError::bad_request(format!("`response_format`: {e}")))?,
                ),
            },
        };
        self.start(worker, input.model.clone(), prompt, grammar, format, &input)
            .await
    }

    /// The prompt `input` renders to with its model's chat template (tools
    /// included when offered), the worker that serves the model (loaded if
    /// it was not), and the tool-call format when tools are offered. A chat
    /// starts from it; Anthropic's `count_tokens` counts it.
    pub async fn render_prompt(
        self: &Arc<Self>,
        input: &ChatInput,
    ) -> Result<(Arc<Worker>, String, Option<ToolFormat>), ApiError> {
        check_messages(input.messages.len(), self.limits().max_messages)?;
        let (worker, model) = self.load(&input.model, input.keep_alive).await?;
        let template = self.template_for(&model, &worker.loaded)?;
        let offered = !input.tools.is_empty() && input.tool_choice != ToolChoice::None;
        let format = offered.then(|| template.tool_format());
        let (messages, tools) = (input.messages.clone(), input.tools.clone());
        let (bos, eos) = (worker.loaded.bos.clone(), worker.loaded.eos.clone());
        // Rendering is CPU work bounded by the template's steps: off the two
        // async threads, which serve every other connection meanwhile.
        let prompt = tokio::task::spawn_blocking(move || {
            template.render(&chat::RenderContext {
                messages: &messages,
                tools: offered.then_some(&tools[..]),
                add_generation_prompt: true,
                bos_token: &bos,
                eos_token: &eos,
            })
        })
        .await
        .map_err(|e| ApiError::new(500, format!("rendering the chat template: {e}")))?
        .map_err(|e| ApiError::bad_request(format!("the model's chat template failed: {e}")))?;
        Ok((worker, prompt, format))
    }

    /// Start a plain completion of `prompt` (no template).
    pub async fn start_completion(
        self: &Arc<Self>,
        input: ChatInput,
        prompt: String,
    ) -> Result<Generation, ApiError> {
        let (worker, _) = self.load(&input.model, input.keep_alive).await?;
        let grammar = match &input.response_format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(chat::grammar::json_object_gbnf()),
            ResponseFormat::JsonSchema(schema) => Some(
                chat::grammar::json_schema_to_gbnf(schema)
                    .map_err(|e| ApiError::bad_request(format!("`response_format`: {e}")))?,
            ),
        };
        self.start(worker, input.model.clone(), prompt, grammar, None, &input)
            .await
    }

    async fn start(
        self: &Arc<Self>,
        worker: Arc<Worker>,
        model: String,
        prompt: String,
        grammar: Option<String>,
        tools: Option<ToolFormat>,
        input: &ChatInput,
    ) -> Result<Generation, ApiError> {
        // The model's own settings (`moat model configure --temperature`,
        // `--max-tokens`) win over the client's.
        let settings = self.settings_of(&worker.model.id);
        let sampling = settings.sampling(&input.sampling);
        let mut request = worker
            .generate(Generate {
                id: 0,
                prompt,
                max_tokens: settings.max_tokens(input.max_tokens),
                stop: input.stop.clone(),
                sampling,
                grammar,
                ignore_eos: input.ignore_eos,
                special: tools.is_some(),
            })
            .map_err(|e| ApiError::new(503, e.to_string()))?;
        self.metrics.started(&model);
        let first = request.next().await;
        let first = match first {
            Some(FromWorker::Failed { status, error, .. }) => {
                self.metrics.finished(&model, None);
                return Err(ApiError::new(status, error));
            }
            None => {
                self.metrics.finished(&model, None);
                return Err(ApiError::new(503, "the model worker went away; retry"));
            }
            Some(ev) => ev,
        };
        Ok(Generation {
            request,
            tools,
            text: String::new(),
            sent: 0,
            content: tools.is_none(),
            first: Some(first),
            queue: Default::default(),
            finished: false,
            model,
        })
    }
}

impl Generation {
    /// The next thing to write; `Err` for a failure mid-way.
    pub async fn next(&mut self, service: &ModelService) -> Option<Result<Out, ApiError>> {
        loop {
            if let Some(out) = self.queue.pop_front() {
                return Some(Ok(out));
            }
            if self.finished {
                return None;
            }
            let ev = match self.first.take() {
                Some(ev) => Some(ev),
                None => self.request.next().await,
            };
            match ev {
                Some(FromWorker::Piece { text, .. }) => self.piece(text),
                Some(FromWorker::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                    timings,
                    stop_word,
                    ..
                }) => {
                    self.finished = true;
                    service.metrics.finished(
                        &self.model,
                        Some((prompt_tokens, completion_tokens, &timings)),
                    );
                    let mut reason = match finish {
                        Finish::Length => FinishReason::Length,
                        Finish::Stop | Finish::Cancelled => FinishReason::Stop,
                    };
                    if let Some(calls) = self.end_text() {
                        reason = FinishReason::ToolCalls;
                        self.queue.push_back(Out::ToolCalls(calls));
                    }
                    self.queue.push_back(Out::Done(Summary {
                        finish: reason,
                        stop_word,
                        prompt_tokens,
                        completion_tokens,
                        timings,
                    }));
                }
                Some(FromWorker::Failed { status, error, .. }) => {
                    self.finished = true;
                    service.metrics.finished(&self.model, None);
                    return Some(Err(ApiError::new(status, error)));
                }
                Some(_) => {}
                None => {
                    self.finished = true;
                    service.metrics.finished(&self.model, None);
                    return Some(Err(ApiError::new(503, "the model worker went away; retry")));
                }
            }
        }
    }

    /// Collect everything: text, tool calls and the summary.
    pub async fn collect(
        mut self,
        service: &ModelService,
    ) -> Result<(String, Vec<ToolCall>, Summary), ApiError> {
        let (mut text, mut calls) = (String::new(), Vec::new());
        while let Some(out) = self.next(service).await {
            match out? {
                Out::Text(t) => text.push_str(&t),
                Out::ToolCalls(c) => calls = c,
                Out::Done(summary) => return Ok((text, calls, summary)),
            }
        }
        Err(ApiError::new(
            503,
            "the generation ended without a result; retry",
        ))
    }

    fn piece(&mut self, text: String) {
        self.text.push_str(&text);
        if !self.content {
            let format = self.tools.unwrap_or_default();
            if chat::tools::may_start_tool_call(format, &self.text) {
                return;
            }
            self.content = true;
        }
        let fresh = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        if !fresh.is_empty() {
            self.queue.push_back(Out::Text(fresh));
        }
    }

    /// At the end: the tool calls in the text, if any; otherwise what was
    /// held back goes out as text.
    fn end_text(&mut self) -> Option<Vec<ToolCall>> {
        if let Some(format) = self.tools {
            let parsed = chat::tools::parse(format, &self.text);
            if !parsed.tool_calls.is_empty() {
                if !self.content && !parsed.content.trim().is_empty() {
                    self.queue.push_back(Out::Text(parsed.content));
                }
                return Some(
                    parsed
                        .tool_calls
                        .into_iter()
                        .map(|c| ToolCall {
                            id: new_call_id(),
                            name: c.name,
                            arguments: c.arguments,
                        })
                        .collect(),
                );
            }
        }
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        if !rest.is_empty() {
            self.queue.push_back(Out::Text(rest));
        }
        None
    }
}

/// A request's messages within the runner's limit: the prompt's cost grows
/// with them before the first token, and the model is shared.
fn check_messages(n: usize, limit: usize) -> Result<(), ApiError> {
    if limit > 0 && n > limit {
        return Err(ApiError::bad_request(format!(
            "the request has {n} messages, over the model runner's limit of {limit}; send fewer, or raise the limit ([models] max_messages, MOAT_MODELS_MAX_MESSAGES)"
        )));
    }
    Ok(())
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
}

pub fn new_call_id() -> String {
    format!("call_{}", random_hex(12))
}

pub fn random_hex(n: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < n {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_messages_are_refused_naming_the_limit() {
        assert!(check_messages(4096, 4096).is_ok());
        assert!(check_messages(10, 0).is_ok(), "0: no limit");
        let e = check_messages(30_000, 4096).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("30000 messages"), "{}", e.message);
        assert!(e.message.contains("limit of 4096"), "{}", e.message);
        assert!(e.message.contains("max_messages"), "{}", e.message);
    }
}

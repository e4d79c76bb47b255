//! The model's Jinja chat template, rendered the way Hugging Face's
//! `apply_chat_template` renders it, because a prompt that differs by one
//! newline from what the model saw in training makes it answer worse.
//!
//! The environment matches transformers': `trim_blocks`, `lstrip_blocks`,
//! loop controls, Python's string and dict methods (`minijinja-contrib`'s
//! pycompat), a `tojson` that writes like Python's `json.dumps`, and the
//! `raise_exception` and `strftime_now` helpers.
//!
//! Messages arrive in OpenAI's shape, which is not always what a template
//! expects, so they are adapted first, the way llama.cpp's minja does it:
//! content parts become text (unless the template only takes parts), a tool
//! call's `arguments` (JSON text in OpenAI's shape) is given to the template
//! as an object that also prints as the original text, and the capabilities
//! a template lacks are polyfilled after probing it once with sample
//! conversations: tools listed in the system prompt, earlier tool calls
//! written into the assistant's content in the model's own syntax, tool
//! results given as user turns, and a system prompt folded into the first
//! user turn.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::{Map, Value};

use super::pyjson::{dumps, DumpOptions};
use super::tools::ToolFormat;
use super::ChatError;

/// ChatML, for a model whose GGUF has no chat template.
pub const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// What to render: an OpenAI-shaped conversation and the template's other
/// variables.
#[derive(Debug, Clone, Default)]
pub struct RenderContext<'a> {
    /// OpenAI chat messages: `role`, `content` (a string, `null`, or a list
    /// of `{"type": "text", "text": …}` parts), and for the assistant
    /// `tool_calls` with `function.arguments` as JSON text; `tool` messages
    /// with `tool_call_id`.
    pub messages: &'a [Value],
    /// OpenAI tools (`{"type": "function", "function": {name, description,
    /// parameters}}`); `None` or empty when the request has none.
    pub tools: Option<&'a [Value]>,
    pub add_generation_prompt: bool,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
}

/// Less common inputs of a render.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    /// More template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub extra: Option<&'a Map<String, Value>>,
    /// The time `strftime_now` formats (in UTC); `None` is now.
    pub now: Option<SystemTime>,
}

/// What a template can render by itself, found by probing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `system` messages show up in the prompt.
    pub system_role: bool,
    /// The tools' definitions show up in the prompt.
    pub tools: bool,
    /// Assistant `tool_calls` show up in the prompt.
    pub tool_calls: bool,
    /// An assistant turn with several `tool_calls` shows them all (Llama
    /// 3.1's refuses); otherwise such a turn is split, one call per turn.
    pub parallel_tool_calls: bool,
    /// `tool` messages show up in the prompt.
    pub tool_responses: bool,
    /// Content must be given as a list of parts (a plain string fails).
    pub requires_typed_content: bool,
    /// `tool_calls[].function.arguments` must stay a string (the template
    /// concatenates it); otherwise it is given as an object that prints as
    /// its JSON text.
    pub requires_string_arguments: bool,
}

/// A compiled chat template with its probed capabilities and tool format.
/// Compile it once per model and render it per request.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    format: ToolFormat,
    caps: Capabilities,
    /// The steps one render may take.
    steps: u64,
}

/// Renders `template` once (compiling and probing it first); servers should
/// keep a [`ChatTemplate`] per model instead.
pub fn render(template: &str, ctx: &RenderContext<'_>) -> Result<String, ChatError> {
    ChatTemplate::new(template)?.render(ctx)
}

impl ChatTemplate {
    /// Compiles a Jinja chat template and probes what it can render.
    pub fn new(source: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(super::DEFAULT_TEMPLATE_STEPS));
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::TemplateSyntax(describe(&e)))?;
        let mut template = ChatTemplate {
            env,
            format: ToolFormat::detect(source),
            caps: Capabilities {
                system_role: true,
                tools: true,
                tool_calls: true,
                parallel_tool_calls: true,
                tool_responses: true,
                requires_typed_content: false,
                requires_string_arguments: false,
            },
            steps: super::DEFAULT_TEMPLATE_STEPS,
        };
        template.caps = template.probe();
        Ok(template)
    }

    /// The template a model's GGUF carries (`tokenizer.chat_template`), or
    /// ChatML when it carries none.
    pub fn for_model(gguf_template: Option<&str>) -> Result<ChatTemplate, ChatError> {
        ChatTemplate::new(gguf_template.unwrap_or(CHATML))
    }

    /// Bound each render to `steps` (MiniJinja's fuel), so that no request
    /// holds a CPU for long however many messages it carries; a render
    /// that needs more fails with [`ChatError::TooManySteps`].
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps.max(1);
        self.env.set_fuel(Some(self.steps));
    }

    /// The tool-call syntax this template's model emits.
    pub fn tool_format(&self) -> ToolFormat {
        self.format
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// The prompt for a conversation.
    pub fn render(&self, ctx: &RenderContext<'_>) -> Result<String, ChatError> {
        self.render_with(ctx, &RenderOptions::default())
    }

    /// The prompt for a conversation, with template variables of the
    /// request's own and a fixed time.
    pub fn render_with(
        &self,
        ctx: &RenderContext<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<String, ChatError> {
        let tools = normalize_tools(ctx.tools.unwrap_or(&[]))?;
        let mut messages = ctx
            .messages
            .iter()
            .enumerate()
            .map(|(index, m)| Message::from_openai(index, m))
            .collect::<Result<Vec<_>, _>>()?;
        let pass_tools = self.polyfill(&mut messages, &tools);
        let messages: Vec<JValue> = messages.iter().map(|m| m.to_template(&self.caps)).collect();
        let tools = if pass_tools && !tools.is_empty() {
            JValue::from(tools)
        } else {
            JValue::from(())
        };
        self.render_values(
            JValue::from(messages),
            tools,
            ctx.add_generation_prompt,
            (ctx.bos_token, ctx.eos_token),
            options.extra,
            options.now.unwrap_or_else(SystemTime::now),
        )
    }

    fn render_values(
        &self,
        messages: JValue,
        tools: JValue,
        add_generation_prompt: bool,
        (bos_token, eos_token): (&str, &str),
        extra: Option<&Map<String, Value>>,
        now: SystemTime,
    ) -> Result<String, ChatError> {
        let mut context: Vec<(String, JValue)> = extra
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), JValue::from_serialize(v)))
            .collect();
        context.extend([
            ("messages".to_owned(), messages),
            ("tools".to_owned(), tools),
            (
                "add_generation_prompt".to_owned(),
                JValue::from(add_generation_prompt),
            ),
            ("bos_token".to_owned(), JValue::from(bos_token)),
            ("eos_token".to_owned(), JValue::from(eos_token)),
            (
                "strftime_now".to_owned(),
                JValue::from_function(move |format: &str| strftime(now, format)),
            ),
        ]);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::TemplateSyntax(describe(&e)))?;
        template
            .render(JValue::from_iter(context))
            .map_err(|e| match refusal(&e) {
                Some(message) => ChatError::Refused(message),
                None if e.kind() == ErrorKind::OutOfFuel => ChatError::TooManySteps(self.steps),
                None => ChatError::TemplateRender(describe(&e)),
            })
    }

    /// Renders sample conversations to see what the template shows.
    fn probe(&self) -> Capabilities {
        let try_render = |messages: Value, tools: Option<&Value>, object_args: bool| -> String {
            let messages: Vec<JValue> = messages
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| probe_message(m, object_args))
                .collect();
            let tools = tools.map_or(JValue::from(()), JValue::from_serialize);
            self.render_values(
                JValue::from(messages),
                tools,
                false,
                ("", ""),
                None,
                UNIX_EPOCH,
            )
            .unwrap_or_default()
        };
        let tool = serde_json::json!([{"function": {"description": "A tool.", "name": "moat_probe_tool", "parameters": {"properties": {"moat_probe_arg": {"type": "string"}}, "type": "object"}}, "type": "function"}]);
        let user = serde_json::json!({"content": "moat probe user", "role": "user"});
        let needle = "moat-probe-needle";

        let string_content = try_render(
            serde_json::json!([{"content": needle, "role": "user"}]),
            None,
            true,
        )
        .contains(needle);
        let typed_content = try_render(
            serde_json::json!([{"content": [{"text": needle, "type": "text"}], "role": "user"}]),
            None,
            true,
        )
        .contains(needle);
        let requires_typed_content = !string_content && typed_content;
        let content = |text: &str| -> Value {
            if requires_typed_content {
                serde_json::json!([{"text": text, "type": "text"}])
            } else {
                Value::String(text.to_owned())
            }
        };
        let user = if requires_typed_content {
            serde_json::json!({"content": content("moat probe user"), "role": "user"})
        } else {
            user
        };

        let system_role = try_render(
            serde_json::json!([{"content": content(needle), "role": "system"}, user]),
            None,
            true,
        )
        .contains(needle);
        let tools =
            try_render(serde_json::json!([user]), Some(&tool), true).contains("moat_probe_tool");

        let call = serde_json::json!({"function": {"arguments": format!("{{\"moat_probe_arg\": \"{needle}\"}}"), "name": "moat_probe_tool"}, "id": "call00001", "type": "function"});
        let assistant =
            serde_json::json!({"content": content(""), "role": "assistant", "tool_calls": [call]});
        let with_call = serde_json::json!([user, assistant]);
        let shows_call =
            |out: &str| out.contains(needle) && !out.contains("\\\"moat_probe_arg\\\"");
        let (tool_calls, object_args) =
            if shows_call(&try_render(with_call.clone(), Some(&tool), true)) {
                (true, true)
            } else if shows_call(&try_render(with_call, Some(&tool), false)) {
                (true, false)
            } else {
                (false, true)
            };
        let second = "moat-probe-second";
        let two_calls = serde_json::json!([user, {"content": content(""), "role": "assistant", "tool_calls": [
            call,
            {"function": {"arguments": format!("{{\"moat_probe_arg\": \"{second}\"}}"), "name": "moat_probe_tool"}, "id": "call00002", "type": "function"}
        ]}]);
        let parallel_tool_calls = tool_calls && {
            let out = try_render(two_calls, Some(&tool), object_args);
            shows_call(&out) && out.contains(second)
        };
        let response = "moat-probe-response";
        let tool_responses = try_render(
            serde_json::json!([user, assistant, {"content": content(response), "name": "moat_probe_tool", "role": "tool", "tool_call_id": "call00001"}]),
            Some(&tool),
            object_args,
        )
        .contains(response);

        Capabilities {
            system_role,
            tools,
            tool_calls,
            parallel_tool_calls,
            tool_responses,
            requires_typed_content,
            requires_string_arguments: !object_args,
        }
    }

    /// Adapts the conversation to what the template lacks; says whether the
    /// tools should still be given to the template itself.
    fn polyfill(&self, messages: &mut Vec<Message>, tools: &[JValue]) -> bool {
        let caps = self.caps;
        let mut pass_tools = true;
        // Which tool each call id named, for results that do not say.
        let names: HashMap<String, String> = messages
            .iter()
            .flat_map(|m| &m.tool_calls)
            .filter_map(|c| Some((c.id.clone()?, c.name.clone())))
            .collect();
        if !tools.is_empty() && !caps.tools {
            pass_tools = false;
            let prompt = self.format.tools_prompt(tools);
            match messages.first_mut() {
                Some(first) if first.role == "system" => {
                    let text = first.content.text();
                    first.content = Content::Text(if text.is_empty() {
                        prompt
                    } else {
                        format!("{text}\n\n{prompt}")
                    });
                }
                _ => messages.insert(0, Message::new("system", prompt)),
            }
        }

        if caps.tool_calls && !caps.parallel_tool_calls {
            let mut split = Vec::with_capacity(messages.len());
            for mut message in messages.drain(..) {
                if message.tool_calls.len() < 2 {
                    split.push(message);
                    continue;
                }
                let calls = std::mem::take(&mut message.tool_calls);
                for (n, call) in calls.into_iter().enumerate() {
                    let mut one = message.clone();
                    if n > 0 {
                        one.content = Content::Text(String::new());
                    }
                    one.tool_calls = vec![call];
                    split.push(one);
                }
            }
            *messages = split;
        }

        if !caps.tool_calls {
            for message in messages.iter_mut().filter(|m| !m.tool_calls.is_empty()) {
                let calls: Vec<(String, JValue)> = message
                    .tool_calls
                    .iter()
                    .map(|c| (c.name.clone(), c.arguments.clone()))
                    .collect();
                let text = message.content.text();
                let rendered = self.format.render_calls(&calls);
                message.content = Content::Text(if text.is_empty() {
                    rendered
                } else {
                    format!("{text}\n{rendered}")
                });
                message.tool_calls.clear();
            }
        }

        if !caps.tool_responses {
            for message in messages.iter_mut() {
                if message.role == "tool" {
                    let name = message.name.clone().or_else(|| {
                        message
                            .tool_call_id
                            .as_ref()
                            .and_then(|id| names.get(id).cloned())
                    });
                    message.role = "user".into();
                    message.content =
                        Content::Text(tool_response_text(name.as_deref(), &message.content.text()));
                    message.from_tool = true;
                }
            }
            merge_user_turns(messages);
        }

        if !caps.system_role {
            let mut merged: Vec<Message> = Vec::with_capacity(messages.len());
            let mut pending: Vec<String> = Vec::new();
            for mut message in messages.drain(..) {
                if message.role == "system" {
                    pending.push(message.content.text());
                    continue;
                }
                if !pending.is_empty() && message.role == "user" {
                    pending.push(message.content.text());
                    message.content = Content::Text(pending.join("\n\n"));
                    pending.clear();
                }
                merged.push(message);
            }
            if !pending.is_empty() {
                merged.push(Message::new("user", pending.join("\n\n")));
            }
            *messages = merged;
        }

        if self.format == ToolFormat::Mistral {
            for (index, message) in messages.iter_mut().enumerate() {
                for (n, call) in message.tool_calls.iter_mut().enumerate() {
                    let id = call.id.clone().unwrap_or_else(|| format!("{index}-{n}"));
                    call.id = Some(mistral_id(&id));
                }
                if let Some(id) = &message.tool_call_id {
                    message.tool_call_id = Some(mistral_id(id));
                }
            }
        }
        pass_tools
    }
}

/// One OpenAI message, checked and split into what templates look at.
#[derive(Debug, Clone)]
struct Message {
    role: String,
    content: Content,
    tool_calls: Vec<Call>,
    tool_call_id: Option<String>,
    name: Option<String>,
    /// Other keys (e.g. `reasoning_content`), passed through unchanged.
    rest: Vec<(String, Value)>,
    /// Made from a `tool` message by the polyfill.
    from_tool: bool,
}

#[derive(Debug, Clone)]
enum Content {
    Text(String),
    /// Text parts, joined unless the template requires parts.
    Parts(Vec<String>),
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts.join("\n"),
        }
    }
}

#[derive(Debug, Clone)]
struct Call {
    id: Option<String>,
    kind: String,
    name: String,
    /// The arguments, parsed (keeping their key order) when `text` is a
    /// JSON object, else `text` as a string.
    arguments: JValue,
    /// The arguments as JSON text, as the client sent them.
    text: String,
}

impl Message {
    fn new(role: &str, text: String) -> Message {
        Message {
            role: role.to_owned(),
            content: Content::Text(text),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            rest: Vec::new(),
            from_tool: false,
        }
    }

    fn from_openai(index: usize, value: &Value) -> Result<Message, ChatError> {
        let invalid = |reason: String| ChatError::InvalidMessage { index, reason };
        let object = value
            .as_object()
            .ok_or_else(|| invalid("a message must be a JSON object".into()))?;
        let role = object
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("\"role\" must be a string".into()))?;
        let content = match object.get("content") {
            None | Some(Value::Null) => Content::Text(String::new()),
            Some(Value::String(s)) => Content::Text(s.clone()),
            Some(Value::Array(parts)) => Content::Parts(
                parts
                    .iter()
                    .enumerate()
                    .map(|(n, part)| {
                        text_part(part).map_err(|r| invalid(format!("content[{n}]: {r}")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => {
                return Err(invalid(
                    "\"content\" must be a string, null, or a list of content parts".into(),
                ))
            }
        };
        let tool_calls = match object.get("tool_calls") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(calls)) => calls
                .iter()
                .enumerate()
                .map(|(n, call)| {
                    Call::from_openai(call).map_err(|r| invalid(format!("tool_calls[{n}]: {r}")))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("\"tool_calls\" must be a list".into())),
        };
        let string_field = |key: &str| -> Result<Option<String>, ChatError> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(invalid(format!("\"{key}\" must be a string"))),
            }
        };
        let rest = object
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "role" | "content" | "tool_calls" | "tool_call_id" | "name"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Message {
            role: role.to_owned(),
            content,
            tool_calls,
            tool_call_id: string_field("tool_call_id")?,
            name: string_field("name")?,
            rest,
            from_tool: false,
        })
    }

    /// The message as the template sees it.
    fn to_template(&self, caps: &Capabilities) -> JValue {
        let mut pairs: Vec<(String, JValue)> =
            vec![("role".into(), JValue::from(self.role.clone()))];
        let content = if caps.requires_typed_content {
            let parts: Vec<JValue> = match &self.content {
                Content::Parts(parts) => parts.iter().map(|t| text_part_value(t)).collect(),
                Content::Text(text) => vec![text_part_value(text)],
            };
            JValue::from(parts)
        } else {
            JValue::from(self.content.text())
        };
        pairs.push(("content".into(), content));
        if !self.tool_calls.is_empty() {
            let calls: Vec<JValue> = self
                .tool_calls
                .iter()
                .map(|c| c.to_template(!caps.requires_string_arguments))
                .collect();
            pairs.push(("tool_calls".into(), JValue::from(calls)));
        }
        if let Some(id) = &self.tool_call_id {
            pairs.push(("tool_call_id".into(), JValue::from(id.clone())));
        }
        if let Some(name) = &self.name {
            pairs.push(("name".into(), JValue::from(name.clone())));
        }
        for (key, value) in &self.rest {
            pairs.push((key.clone(), JValue::from_serialize(value)));
        }
        JValue::from_iter(pairs)
    }
}

fn text_part(part: &Value) -> Result<String, String> {
    let kind = part
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a content part needs a string \"type\"")?;
    if kind != "text" {
        return Err(format!(
            "content parts of type {kind:?} are not supported: this model takes text only"
        ));
    }
    part.get("text")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "a text part needs a string \"text\"".to_owned())
}

fn text_part_value(text: &str) -> JValue {
    JValue::from_iter([("type", JValue::from("text")), ("text", JValue::from(text))])
}

impl Call {
    fn from_openai(value: &Value) -> Result<Call, String> {
        let object = value
            .as_object()
            .ok_or("a tool call must be a JSON object")?;
        let function = object
            .get("function")
            .and_then(Value::as_object)
            .ok_or("a tool call needs a \"function\" object")?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or("\"function.name\" must be a string")?;
        let text = match function.get("arguments") {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        };
        let arguments = serde_json::from_str::<JValue>(&text)
            .ok()
            .filter(|v| v.kind() == ValueKind::Map)
            .unwrap_or_else(|| JValue::from(text.clone()));
        Ok(Call {
            id: object.get("id").and_then(Value::as_str).map(str::to_owned),
            kind: object
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function")
                .to_owned(),
            name: name.to_owned(),
            arguments,
            text,
        })
    }

    fn to_template(&self, object_arguments: bool) -> JValue {
        let arguments = if object_arguments && self.arguments.kind() == ValueKind::Map {
            JValue::from_object(Arguments {
                text: self.text.clone(),
                object: self.arguments.clone(),
            })
        } else {
            JValue::from(self.text.clone())
        };
        let function = JValue::from_iter([
            ("name", JValue::from(self.name.clone())),
            ("arguments", arguments),
        ]);
        let mut pairs: Vec<(&str, JValue)> = Vec::new();
        if let Some(id) = &self.id {
            pairs.push(("id", JValue::from(id.clone())));
        }
        pairs.push(("type", JValue::from(self.kind.clone())));
        pairs.push(("function", function));
        JValue::from_iter(pairs)
    }
}

/// A probe message: like a real one, with the arguments in the given form.
fn probe_message(value: &Value, object_arguments: bool) -> JValue {
    match Message::from_openai(0, value) {
        Ok(message) => message.to_template(&Capabilities {
            system_role: true,
            tools: true,
            tool_calls: true,
            parallel_tool_calls: true,
            tool_responses: true,
            requires_typed_content: matches!(value.get("content"), Some(Value::Array(_))),
            requires_string_arguments: !object_arguments,
        }),
        Err(_) => JValue::from(()),
    }
}

/// Tool-call arguments as a template sees them: a mapping (for `| tojson`,
/// `| items`, `.get()`) that prints as the client's JSON text (for
/// `{{ arguments }}`), as llama.cpp's minja gives both.
#[derive(Debug)]
struct Arguments {
    text: String,
    object: JValue,
}

impl Object for Arguments {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        self.object.get_item(key).ok().filter(|v| !v.is_undefined())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.object.try_iter() {
            Ok(keys) => Enumerator::Values(keys.collect()),
            Err(_) => Enumerator::Empty,
        }
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Checks the tools and gives them to templates with their keys in the
/// order models were trained on (`type`, `function`; `name`, `description`,
/// `parameters`; in schemas `type`, `description`, `properties`, `required`),
/// whatever order serde_json keeps.
fn normalize_tools(tools: &[Value]) -> Result<Vec<JValue>, ChatError> {
    tools
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            let invalid = |reason: &str| ChatError::InvalidTool {
                index,
                reason: reason.to_owned(),
            };
            let object = tool
                .as_object()
                .ok_or_else(|| invalid("a tool must be a JSON object"))?;
            // Some clients send the function itself, without the wrapper.
            let function = match object.get("function") {
                Some(Value::Object(f)) => f,
                Some(_) => return Err(invalid("\"function\" must be an object")),
                None if object.contains_key("name") => object,
                None => return Err(invalid("a tool needs a \"function\" object")),
            };
            if !function.get("name").is_some_and(Value::is_string) {
                return Err(invalid("\"function.name\" must be a string"));
            }
            let function = ordered(
                function,
                &["name", "description", "parameters"],
                |key, v| {
                    if key == "parameters" {
                        ordered_schema(v)
                    } else {
                        JValue::from_serialize(v)
                    }
                },
            );
            let kind = object
                .get("type")
                .map_or_else(|| JValue::from("function"), JValue::from_serialize);
            Ok(JValue::from_iter([("type", kind), ("function", function)]))
        })
        .collect()
}

/// `object` as a template value with the `first` keys first, in that order.
fn ordered(
    object: &Map<String, Value>,
    first: &[&str],
    convert: impl Fn(&str, &Value) -> JValue,
) -> JValue {
    let known = first.iter().filter_map(|key| {
        object
            .get(*key)
            .map(|v| ((*key).to_owned(), convert(key, v)))
    });
    let others = object
        .iter()
        .filter(|(key, _)| !first.contains(&key.as_str()))
        .map(|(key, v)| (key.clone(), convert(key, v)));
    JValue::from_iter(known.chain(others).collect::<Vec<_>>())
}

fn ordered_schema(schema: &Value) -> JValue {
    match schema {
        Value::Object(object) => ordered(
            object,
            &[
                "type",
                "description",
                "enum",
                "properties",
                "items",
                "required",
            ],
            |key, v| match (key, v) {
                ("properties", Value::Object(props)) => JValue::from_iter(
                    props
                        .iter()
                        .map(|(name, s)| (name.clone(), ordered_schema(s)))
                        .collect::<Vec<_>>(),
                ),
                ("items", _) => ordered_schema(v),
                _ => JValue::from_serialize(v),
            },
        ),
        other => JValue::from_serialize(other),
    }
}

/// A tool result as a user turn, for templates without a tool role.
fn tool_response_text(name: Option<&str>, content: &str) -> String {
    let content = serde_json::from_str::<JValue>(content)
        .ok()
        .filter(|v| matches!(v.kind(), ValueKind::Map | ValueKind::Seq))
        .unwrap_or_else(|| JValue::from(content));
    let mut response = Vec::new();
    if let Some(name) = name {
        response.push(("tool", JValue::from(name)));
    }
    response.push(("content", content));
    let wrapper = JValue::from_iter([("tool_response", JValue::from_iter(response))]);
    dumps(&wrapper, &DumpOptions::default())
}

/// Joins a tool result turned user turn with the user turns around it, so
/// that templates that insist on alternating roles accept the conversation.
fn merge_user_turns(messages: &mut Vec<Message>) {
    let mut merged: Vec<Message> = Vec::with_capacity(messages.len());
    for message in messages.drain(..) {
        match merged.last_mut() {
            Some(last)
                if last.role == "user"
                    && message.role == "user"
                    && (last.from_tool || message.from_tool) =>
            {
                last.content = Content::Text(format!(
                    "{}\n{}",
                    last.content.text(),
                    message.content.text()
                ));
                last.from_tool = true;
            }
            _ => merged.push(message),
        }
    }
    *messages = merged;
}

/// Mistral's templates take only 9 alphanumeric characters as a call id; any
/// other id is mapped to one, the same way for the call and its result.
fn mistral_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_owned();
    }
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // FNV-1a: stable across runs and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..9)
        .map(|_| {
            let c = ALPHABET[(hash % 62) as usize] as char;
            hash /= 62;
            c
        })
        .collect()
}

/// The `tojson` of transformers: `json.dumps` with `ensure_ascii=False`,
/// taking `indent`, `separators`, `sort_keys` and `ensure_ascii` (as Jinja's
/// own `tojson(indent)` and transformers' `tojson(ensure_ascii, indent)` do,
/// a leading positional number is the indent, a boolean `ensure_ascii`).
fn tojson(value: &JValue, positional: Option<JValue>, kwargs: Kwargs) -> Result<JValue, JError> {
    let mut options = DumpOptions::default();
    let indent_value = |v: &JValue| -> Result<Option<String>, JError> {
        if v.is_none() || v.is_undefined() {
            Ok(None)
        } else if let Some(s) = v.as_str() {
            Ok(Some(s.to_owned()))
        } else if let Some(n) = v.as_usize() {
            Ok(Some(" ".repeat(n)))
        } else {
            Err(JError::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be a number or a string",
            ))
        }
    };
    if let Some(p) = &positional {
        if p.kind() == ValueKind::Bool {
            options.ensure_ascii = p.is_true();
        } else {
            options.indent = indent_value(p)?;
        }
    }
    if let Some(v) = kwargs.get::<Option<JValue>>("indent")? {
        options.indent = indent_value(&v)?;
    }
    if let Some(b) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        options.ensure_ascii = b;
    }
    if let Some(b) = kwargs.get::<Option<bool>>("sort_keys")? {
        options.sort_keys = b;
    }
    if let Some(v) = kwargs.get::<Option<JValue>>("separators")? {
        if !v.is_none() {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    JError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be strings",
                    )
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => options.separators = Some((item, key)),
                Err(_) => {
                    return Err(JError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
    }
    Ok(JValue::from(dumps(value, &options)))
}

/// A template's `raise_exception(message)`: the template refuses the
/// conversation.
fn raise_exception(message: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, message.clone()).with_source(Refusal(message)))
}

#[derive(Debug)]
struct Refusal(String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refusal(err: &JError) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r.0.clone());
        }
        source = e.source();
    }
    None
}

/// A minijinja error in one line: what, where, and its causes.
fn describe(err: &JError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `strftime` for the formats chat templates use, in UTC.
fn strftime(now: SystemTime, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let secs = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |n: i64, width: usize| {
            if no_pad {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(day_of_year, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, by
/// Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Fixtures: the templates of the models' tokenizer configs. The expected
    // prompts below are what transformers' `apply_chat_template` (Jinja2
    // with trim_blocks, lstrip_blocks, and its tojson, raise_exception and
    // strftime_now) renders for the same conversation; testdata/reference.py
    // prints them.
    const QWEN: &str = include_str!("testdata/qwen2.5.jinja");
    const LLAMA: &str = include_str!("testdata/llama3.1.jinja");
    const MISTRAL: &str = include_str!("testdata/mistral-v0.3.jinja");
    const GEMMA: &str = include_str!("testdata/gemma3.jinja");
    const SMOLLM2: &str = include_str!("testdata/smollm2.jinja");
    const HELPERS: &str = include_str!("testdata/helpers.jinja");

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name."}},
                "required": ["city"]
            }
        }})
    }

    /// A tool-using conversation as an OpenAI client sends it.
    fn weather_conversation() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a weather bot."}),
            json!({"role": "user", "content": "What is the weather in Paris?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_w1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
            }]}),
            json!({"role": "tool", "tool_call_id": "call_w1", "content": "{\"temperature\": 18, \"sky\": \"clear\"}"}),
        ]
    }

    fn prompt(template: &str, messages: &[Value], tools: &[Value], tokens: (&str, &str)) -> String {
        render(
            template,
            &RenderContext {
                messages,
                tools: Some(tools),
                add_generation_prompt: true,
                bos_token: tokens.0,
                eos_token: tokens.1,
            },
        )
        .unwrap()
    }

    fn chat(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect()
    }

    #[test]
    fn qwen_shows_tools_calls_and_results_in_hermes_syntax() {
        let got = prompt(QWEN, &weather_conversation(), &[weather_tool()], ("", ""));
        let want = concat!(
            "<|im_start|>system\n",
            "You are a weather bot.\n",
            "\n",
            "# Tools\n",
            "\n",
            "You may call one or more functions to assist with the user query.\n",
            "\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n",
            "<tools>\n",
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"The city's name.\"}}, \"required\": [\"city\"]}}}\n",
            "</tools>\n",
            "\n",
            "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
            "<tool_call>\n",
            "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n",
            "</tool_call><|im_end|>\n",
            "<|im_start|>user\n",
            "What is the weather in Paris?<|im_end|>\n",
            "<|im_start|>assistant\n",
            "<tool_call>\n",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
            "</tool_call><|im_end|>\n",
            "<|im_start|>user\n",
            "<tool_response>\n",
            "{\"temperature\": 18, \"sky\": \"clear\"}\n",
            "</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(got, want);
        let got = prompt(
            QWEN,
            &chat(&[
                ("user", "Hi"),
                ("assistant", "Hello! How can I help?"),
                ("user", "Tell me a joke."),
            ]),
            &[],
            ("", ""),
        );
        let want = concat!(
            "<|im_start|>system\n",
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
            "<|im_start|>user\n",
            "Hi<|im_end|>\n",
            "<|im_start|>assistant\n",
            "Hello! How can I help?<|im_end|>\n",
            "<|im_start|>user\n",
            "Tell me a joke.<|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn llama31_puts_tools_in_the_first_user_turn() {
        let tokens = ("<|begin_of_text|>", "<|eot_id|>");
        let got = prompt(LLAMA, &weather_conversation(), &[weather_tool()], tokens);
        let want = concat!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n",
            "\n",
            "Environment: ipython\n",
            "Cutting Knowledge Date: December 2023\n",
            "Today Date: 26 Jul 2024\n",
            "\n",
            "You are a weather bot.<|eot_id|><|start_header_id|>user<|end_header_id|>\n",
            "\n",
            "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n",
            "\n",
            "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n",
            "\n",
            "{\n",
            "    \"type\": \"function\",\n",
            "    \"function\": {\n",
            "        \"name\": \"get_weather\",\n",
            "        \"description\": \"Get the current weather in a city.\",\n",
            "        \"parameters\": {\n",
            "            \"type\": \"object\",\n",
            "            \"properties\": {\n",
            "                \"city\": {\n",
            "                    \"type\": \"string\",\n",
            "                    \"description\": \"The city's name.\"\n",
            "                }\n",
            "            },\n",
            "            \"required\": [\n",
            "                \"city\"\n",
            "            ]\n",
            "        }\n",
            "    }\n",
            "}\n",
            "\n",
            "What is the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n",
            "\n",
            "\"{\\\"temperature\\\": 18, \\\"sky\\\": \\\"clear\\\"}\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
        );
        assert_eq!(got, want);
        let got = prompt(
            LLAMA,
            &chat(&[("system", "You are a weather bot."), ("user", "  Hi  ")]),
            &[],
            tokens,
        );
        let want = concat!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n",
            "\n",
            "Cutting Knowledge Date: December 2023\n",
            "Today Date: 26 Jul 2024\n",
            "\n",
            "You are a weather bot.<|eot_id|><|start_header_id|>user<|end_header_id|>\n",
            "\n",
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn llama31_gets_parallel_calls_one_per_turn() {
        let call = |id: &str, city: &str| {
            json!({"id": id, "type": "function", "function": {
                "name": "get_weather", "arguments": format!("{{\"city\": \"{city}\"}}")
            }})
        };
        let messages = vec![
            json!({"role": "user", "content": "Weather in Paris and Rome?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [call("c1", "Paris"), call("c2", "Rome")]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "18"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": "21"}),
        ];
        let got = prompt(
            LLAMA,
            &messages,
            &[weather_tool()],
            ("<|begin_of_text|>", "<|eot_id|>"),
        );
        let want = concat!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n",
            "\n",
            "Environment: ipython\n",
            "Cutting Knowledge Date: December 2023\n",
            "Today Date: 26 Jul 2024\n",
            "\n",
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n",
            "\n",
            "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n",
            "\n",
            "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n",
            "\n",
            "{\n",
            "    \"type\": \"function\",\n",
            "    \"function\": {\n",
            "        \"name\": \"get_weather\",\n",
            "        \"description\": \"Get the current weather in a city.\",\n",
            "        \"parameters\": {\n",
            "            \"type\": \"object\",\n",
            "            \"properties\": {\n",
            "                \"city\": {\n",
            "                    \"type\": \"string\",\n",
            "                    \"description\": \"The city's name.\"\n",
            "                }\n",
            "            },\n",
            "            \"required\": [\n",
            "                \"city\"\n",
            "            ]\n",
            "        }\n",
            "    }\n",
            "}\n",
            "\n",
            "Weather in Paris and Rome?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n",
            "\n",
            "\"18\"<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n",
            "\n",
            "\"21\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n",
            "\n",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn mistral_gets_nine_character_call_ids() {
        let tokens = ("<s>", "</s>");
        let got = prompt(MISTRAL, &weather_conversation(), &[weather_tool()], tokens);
        let want = "<s>[AVAILABLE_TOOLS] [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"The city's name.\"}}, \"required\": [\"city\"]}}}][/AVAILABLE_TOOLS][INST] What is the weather in Paris?[/INST][TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"kTXVBiYW1\"}]</s>[TOOL_RESULTS] {\"content\": {\"temperature\": 18, \"sky\": \"clear\"}, \"call_id\": \"kTXVBiYW1\"}[/TOOL_RESULTS]";
        assert_eq!(got, want);
        assert_eq!(mistral_id("call_w1"), "kTXVBiYW1");
        assert_eq!(mistral_id("abcDEF123"), "abcDEF123");
        let got = prompt(
            MISTRAL,
            &chat(&[
                ("system", "You are a weather bot."),
                ("user", "Hi"),
                ("assistant", " Hello! "),
                ("user", "Bye"),
            ]),
            &[],
            tokens,
        );
        let want = concat!(
            "<s>[INST] Hi[/INST] Hello!</s>[INST] You are a weather bot.\n",
            "\n",
            "Bye[/INST]",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn smollm2_learns_the_tools_from_the_system_prompt() {
        let got = prompt(
            SMOLLM2,
            &weather_conversation(),
            &[weather_tool()],
            ("", ""),
        );
        let want = concat!(
            "<|im_start|>system\n",
            "You are a weather bot.\n",
            "\n",
            "You can call the following tools. Each is described by a JSON object with its name, what it does and the JSON Schema of its arguments:\n",
            "{\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"The city's name.\"}}, \"required\": [\"city\"]}}\n",
            "\n",
            "To call a tool, answer with only this and nothing else: {\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}<|im_end|>\n",
            "<|im_start|>user\n",
            "What is the weather in Paris?<|im_end|>\n",
            "<|im_start|>assistant\n",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}<|im_end|>\n",
            "<|im_start|>tool\n",
            "{\"temperature\": 18, \"sky\": \"clear\"}<|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(got, want);
        // Text parts are joined; null content is empty.
        let messages = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}),
            json!({"role": "assistant", "content": "Hi!"}),
            json!({"role": "user", "content": "Bye"}),
        ];
        let got = prompt(SMOLLM2, &messages, &[], ("", ""));
        let want = concat!(
            "<|im_start|>system\n",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
            "<|im_start|>user\n",
            "Hello\n",
            "there<|im_end|>\n",
            "<|im_start|>assistant\n",
            "Hi!<|im_end|>\n",
            "<|im_start|>user\n",
            "Bye<|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn gemma3_gets_tool_results_as_user_turns() {
        let got = prompt(
            GEMMA,
            &weather_conversation(),
            &[weather_tool()],
            ("<bos>", "<eos>"),
        );
        let want = concat!(
            "<bos><start_of_turn>user\n",
            "You are a weather bot.\n",
            "\n",
            "You can call the following tools. Each is described by a JSON object with its name, what it does and the JSON Schema of its arguments:\n",
            "{\"name\": \"get_weather\", \"description\": \"Get the current weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"The city's name.\"}}, \"required\": [\"city\"]}}\n",
            "\n",
            "To call a tool, answer with only this and nothing else: {\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}\n",
            "\n",
            "What is the weather in Paris?<end_of_turn>\n",
            "<start_of_turn>model\n",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}<end_of_turn>\n",
            "<start_of_turn>user\n",
            "{\"tool_response\": {\"tool\": \"get_weather\", \"content\": {\"temperature\": 18, \"sky\": \"clear\"}}}<end_of_turn>\n",
            "<start_of_turn>model\n",
        );
        assert_eq!(got, want);
        let got = prompt(
            GEMMA,
            &chat(&[
                ("system", "Be brief."),
                ("user", "Hi"),
                ("assistant", "Hello!"),
                ("user", "Bye"),
            ]),
            &[],
            ("<bos>", "<eos>"),
        );
        let want = concat!(
            "<bos><start_of_turn>user\n",
            "Be brief.\n",
            "\n",
            "Hi<end_of_turn>\n",
            "<start_of_turn>model\n",
            "Hello!<end_of_turn>\n",
            "<start_of_turn>user\n",
            "Bye<end_of_turn>\n",
            "<start_of_turn>model\n",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn a_model_without_a_template_gets_chatml() {
        let template = ChatTemplate::for_model(None).unwrap();
        let messages = chat(&[("system", "Be brief."), ("user", "Hi")]);
        let got = template
            .render(&RenderContext {
                messages: &messages,
                add_generation_prompt: true,
                ..Default::default()
            })
            .unwrap();
        let want = concat!(
            "<|im_start|>system\n",
            "Be brief.<|im_end|>\n",
            "<|im_start|>user\n",
            "Hi<|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(got, want);
        assert_eq!(template.tool_format(), ToolFormat::Generic);
    }

    #[test]
    fn python_helpers_work_as_in_transformers() {
        let messages = chat(&[
            ("user", "  hello big world "),
            ("user", "skip me"),
            ("user", "now stop"),
            ("user", "never"),
        ]);
        let extra = json!({"extra_map": {"a": "b", "z": 1}});
        let got = ChatTemplate::new(HELPERS)
            .unwrap()
            .render_with(
                &RenderContext {
                    messages: &messages,
                    ..Default::default()
                },
                &RenderOptions {
                    extra: extra.as_object(),
                    // 2024-07-27 01:05:00 UTC
                    now: Some(
                        UNIX_EPOCH
                            + std::time::Duration::from_secs(1_721_995_200 + 13 * 3600 + 300),
                    ),
                },
            )
            .unwrap();
        let want = concat!(
            "[hello|big|world][now|stop]2;a=b,z=1,;{\n",
            "  \"a\": \"b\",\n",
            "  \"z\": 1\n",
            "}\n",
            "\"ü<b>\";\"\\u00fc\";{\"b\":1,\"a\":[1.5,null,true]}\n",
            "Saturday 27 July 2024 01:05, Sat Jul 27 209 01AM\n",
            "  HELLO BIG WORLD  no tools 4",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn probing_finds_what_each_template_renders() {
        let caps = |source: &str| ChatTemplate::new(source).unwrap().capabilities();
        let full = Capabilities {
            system_role: true,
            tools: true,
            tool_calls: true,
            parallel_tool_calls: true,
            tool_responses: true,
            requires_typed_content: false,
            requires_string_arguments: false,
        };
        let got = [QWEN, LLAMA, MISTRAL, GEMMA, SMOLLM2, CHATML].map(caps);
        let want = [
            full,
            Capabilities {
                parallel_tool_calls: false,
                ..full
            },
            full,
            Capabilities {
                tools: false,
                tool_calls: false,
                parallel_tool_calls: false,
                tool_responses: false,
                ..full
            },
            Capabilities {
                tools: false,
                tool_calls: false,
                parallel_tool_calls: false,
                ..full
            },
            Capabilities {
                tools: false,
                tool_calls: false,
                parallel_tool_calls: false,
                ..full
            },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn arguments_print_as_sent_and_read_as_an_object() {
        let source = "{% for m in messages %}{% for c in m.tool_calls %}{% set a = c.function.arguments %}{{ a }}|{{ a | tojson }}|{{ a.city }}|{{ a is mapping }}|{% for k, v in a | items %}{{ k }}={{ v }}{% endfor %}|{{ a.get('unit', 'C') }}{% endfor %}{% endfor %}";
        let messages = vec![
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "1", "type": "function",
                "function": {"name": "f", "arguments": "{\"city\":\"Paris\",\"days\":2}"}
            }]}),
        ];
        let got = render(
            source,
            &RenderContext {
                messages: &messages,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            got,
            r#"{"city":"Paris","days":2}|{"city": "Paris", "days": 2}|Paris|True|city=Parisdays=2|C"#
        );
        // A template that concatenates the arguments gets them as text.
        let concat = "{% for m in messages %}{% for c in m.tool_calls %}{{ '<call>' + c.function.arguments + '</call>' }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(concat).unwrap();
        assert_eq!(
            template.capabilities(),
            Capabilities {
                system_role: false,
                tools: false,
                tool_calls: true,
                parallel_tool_calls: true,
                tool_responses: false,
                requires_typed_content: false,
                requires_string_arguments: true,
            }
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err(),
            ChatError::TemplateSyntax(
                "syntax error: unexpected end of input, expected end of block (in chat_template:1)"
                    .into()
            )
        );
        let refused = render(
            GEMMA,
            &RenderContext {
                messages: &chat(&[("user", "Hi"), ("user", "Hi again")]),
                ..Default::default()
            },
        );
        assert_eq!(
            refused,
            Err(ChatError::Refused(
                "Conversation roles must alternate user/assistant/user/assistant/...".into()
            ))
        );
        let failed = render(
            "{{ messages[0].content + 1 }}",
            &RenderContext {
                messages: &chat(&[("user", "Hi")]),
                ..Default::default()
            },
        );
        assert_eq!(
            failed,
            Err(ChatError::TemplateRender(
                "invalid operation: tried to use + operator on unsupported types string and number (in chat_template:1)".into()
            ))
        );
        let cases = [
            (json!("hello"), "a message must be a JSON object"),
            (json!({"content": "hi"}), "\"role\" must be a string"),
            (json!({"role": "user", "content": 5}), "\"content\" must be a string, null, or a list of content parts"),
            (
                json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
                "content[0]: content parts of type \"image_url\" are not supported: this model takes text only",
            ),
            (
                json!({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}),
                "tool_calls[0]: \"function.name\" must be a string",
            ),
        ];
        for (message, reason) in cases {
            let messages = vec![json!({"role": "user", "content": "Hi"}), message];
            assert_eq!(
                render(
                    CHATML,
                    &RenderContext {
                        messages: &messages,
                        ..Default::default()
                    }
                ),
                Err(ChatError::InvalidMessage {
                    index: 1,
                    reason: reason.into()
                })
            );
        }
        let bad_tools = [json!({"type": "function", "function": {"description": "no name"}})];
        assert_eq!(
            render(
                CHATML,
                &RenderContext {
                    tools: Some(&bad_tools),
                    ..Default::default()
                }
            ),
            Err(ChatError::InvalidTool {
                index: 0,
                reason: "\"function.name\" must be a string".into()
            })
        );
    }

    #[test]
    fn strftime_formats_in_utc() {
        let at = |secs: u64| UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let got = [
            strftime(at(0), "%Y-%m-%d %H:%M:%S %a %j"),
            strftime(at(951_782_400), "%d %b %Y %A"),
            strftime(at(1_721_995_200), "%-d %B %y %I %p %%"),
        ];
        assert_eq!(
            got,
            [
                "1970-01-01 00:00:00 Thu 001".to_owned(),
                "29 Feb 2000 Tuesday".to_owned(),
                "26 July 24 12 PM %".to_owned(),
            ]
        );
    }

    /// A conversation of `n` alternating turns, as a long agent session.
    fn turns(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({"role": role, "content": format!("turn {i}")})
            })
            .collect()
    }

    #[test]
    fn the_most_messages_allowed_render_within_the_default_steps() {
        let messages = turns(crate::api::Limits::default().max_messages);
        for (name, source) in [
            ("qwen", QWEN),
            ("llama", LLAMA),
            ("mistral", MISTRAL),
            ("gemma", GEMMA),
            ("smollm2", SMOLLM2),
            ("chatml", CHATML),
        ] {
            let template = ChatTemplate::new(source).unwrap();
            let started = std::time::Instant::now();
            let ctx = RenderContext {
                messages: &messages,
                bos_token: "<s>",
                eos_token: "</s>",
                add_generation_prompt: true,
                ..Default::default()
            };
            let prompt = template.render(&ctx);
            assert!(prompt.is_ok(), "{name}: {prompt:?}");
            eprintln!(
                "{name}: {} messages in {:?}",
                messages.len(),
                started.elapsed()
            );
        }
    }

    #[test]
    fn a_render_over_its_steps_is_refused_naming_the_limit() {
        // Quadratic in the messages, as a careless template might be.
        let quadratic =
            "{% for m in messages %}{% for n in messages %}{{ n.role }}{% endfor %}{% endfor %}";
        let mut template = ChatTemplate::new(quadratic).unwrap();
        template.set_steps(100_000);
        let messages = turns(2_000);
        let ctx = RenderContext {
            messages: &messages,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let err = template.render(&ctx).unwrap_err();
        assert_eq!(err, ChatError::TooManySteps(100_000));
        assert!(err.to_string().contains("template_steps"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The same render with room enough succeeds.
        template.set_steps(100_000_000);
        assert!(template.render(&ctx).is_ok());
    }
}

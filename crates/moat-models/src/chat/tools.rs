//! Tool calls in the syntax each model family was trained to emit, found in
//! the generated text and returned in OpenAI's shape.
//!
//! A model says "call a tool" in plain text: Qwen and Hermes wrap JSON in
//! `<tool_call>` tags, Llama 3 answers with a bare `{"name", "parameters"}`
//! object (or `<|python_tag|>`), Mistral starts with `[TOOL_CALLS]`, and a
//! model whose template knows no tools is told (by the template polyfill) to
//! answer with a JSON object. The format is detected from the chat template,
//! the text is parsed once generation ends, and while streaming
//! [`streamable_len`] says how much of the text is certainly content, so that
//! the start of a call is held back instead of reaching the client as text.
//!
//! Every parser also accepts a whole answer that is just a JSON call object,
//! because small models often forget their family's tags.

use minijinja::value::Value as JValue;
use serde_json::{Map, Value};

use super::pyjson::{dumps, DumpOptions};

/// The syntax a model family uses for tool calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    /// Hermes 2 Pro, Qwen 2.5/3, SmolLM3: `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
    Hermes,
    /// Llama 3.1/3.2/3.3: `{"name": …, "parameters": …}`, or `<|python_tag|>` code.
    Llama3,
    /// Mistral v0.3, Nemo, Small: `[TOOL_CALLS] [{"name": …, "arguments": …}]`.
    Mistral,
    /// Any other model: a JSON object `{"name": …, "arguments": …}` (or
    /// `{"tool_calls": [...]}`), which the template polyfill teaches it.
    #[default]
    Generic,
}

impl ToolFormat {
    /// The format a chat template's model was trained on, from marks only
    /// that family's templates contain.
    pub fn detect(template: &str) -> ToolFormat {
        if template.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if template.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            ToolFormat::Llama3
        } else {
            ToolFormat::Generic
        }
    }

    /// A short name for logs and `/api/show`.
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3 => "llama3",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Generic => "generic",
        }
    }

    /// The marker that starts a call in the middle of a text, if the format
    /// has one.
    fn marker(self) -> Option<&'static str> {
        match self {
            ToolFormat::Hermes => Some(HERMES_OPEN),
            ToolFormat::Llama3 => Some(PYTHON_TAG),
            ToolFormat::Mistral => Some(MISTRAL_MARK),
            ToolFormat::Generic => None,
        }
    }

    /// The key a call object carries its arguments under.
    pub(crate) fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// Calls written the way the model emits them: used to show the model
    /// its own earlier calls when the template cannot render `tool_calls`.
    /// `calls` are (name, arguments as a JSON value).
    pub(crate) fn render_calls(self, calls: &[(String, JValue)]) -> String {
        let objects: Vec<JValue> = calls
            .iter()
            .map(|(name, arguments)| {
                JValue::from_iter([
                    ("name", JValue::from(name.clone())),
                    (self.arguments_key(), arguments.clone()),
                ])
            })
            .collect();
        let plain = DumpOptions::default();
        match self {
            ToolFormat::Hermes => objects
                .iter()
                .map(|o| format!("{HERMES_OPEN}\n{}\n{HERMES_CLOSE}", dumps(o, &plain)))
                .collect::<Vec<_>>()
                .join("\n"),
            ToolFormat::Llama3 => objects
                .iter()
                .map(|o| dumps(o, &plain))
                .collect::<Vec<_>>()
                .join("; "),
            ToolFormat::Mistral => {
                format!("{MISTRAL_MARK} {}", dumps(&JValue::from(objects), &plain))
            }
            ToolFormat::Generic => match <[JValue; 1]>::try_from(objects) {
                Ok([one]) => dumps(&one, &plain),
                Err(many) => dumps(
                    &JValue::from_iter([("tool_calls", JValue::from(many))]),
                    &plain,
                ),
            },
        }
    }

    /// The system-prompt text that describes `tools` (OpenAI tool objects)
    /// and this format, for a template that cannot show tools itself.
    pub(crate) fn tools_prompt(self, tools: &[JValue]) -> String {
        let mut text = String::from(
            "You can call the following tools. Each is described by a JSON object with its name, what it does and the JSON Schema of its arguments:\n",
        );
        for tool in tools {
            let function = tool
                .get_attr("function")
                .ok()
                .filter(|f| !f.is_undefined())
                .unwrap_or_else(|| tool.clone());
            text.push_str(&dumps(&function, &DumpOptions::default()));
            text.push('\n');
        }
        let shape = match self {
            ToolFormat::Hermes => "<tool_call>\n{\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>",
            ToolFormat::Llama3 => "{\"name\": <tool name>, \"parameters\": <arguments as a JSON object>}",
            ToolFormat::Mistral => "[TOOL_CALLS] [{\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}]",
            ToolFormat::Generic => "{\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}",
        };
        text.push_str("\nTo call a tool, answer with only this and nothing else: ");
        text.push_str(shape);
        text
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";

/// One call the model made, in OpenAI's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`), `{}` when
    /// the model gave none.
    pub arguments: String,
}

/// A generated text split into what is said and what is called.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside the calls: the whole text, unchanged, when there are
    /// no calls; trimmed when there are.
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl Parsed {
    /// The part of `content` not yet sent, given the text already streamed
    /// (`text[..n]` for the `n`s that [`streamable_len`] returned).
    pub fn content_after(&self, streamed: &str) -> &str {
        if self.tool_calls.is_empty() {
            return self.content.strip_prefix(streamed).unwrap_or("");
        }
        self.content
            .strip_prefix(streamed.trim_start())
            .unwrap_or("")
    }
}

/// Splits a finished generation into content and tool calls.
pub fn parse(format: ToolFormat, text: &str) -> Parsed {
    let parsed = match format {
        ToolFormat::Hermes => parse_hermes(text),
        ToolFormat::Llama3 => parse_llama3(text),
        ToolFormat::Mistral => parse_mistral(text),
        ToolFormat::Generic => None,
    };
    if let Some(parsed) = parsed.filter(|p| !p.tool_calls.is_empty()) {
        return parsed;
    }
    if let Some(calls) = parse_whole_json(text) {
        return Parsed {
            content: String::new(),
            tool_calls: calls,
        };
    }
    if let Some(response) = generic_response(text) {
        return Parsed {
            content: response,
            tool_calls: Vec::new(),
        };
    }
    Parsed {
        content: text.to_owned(),
        tool_calls: Vec::new(),
    }
}

/// Whether `text_so_far` could still become (or already holds) a tool call,
/// so that the server must hold back at least part of it.
pub fn may_start_tool_call(format: ToolFormat, text_so_far: &str) -> bool {
    streamable_len(format, text_so_far) < text_so_far.len()
}

/// How many bytes at the start of `text_so_far` are certainly content and
/// can be streamed now. It never shrinks as the text grows. It holds back a
/// possible start of a call (a whole answer that opens with `{`, `[` or a
/// code fence; a partial or complete call marker of the format) and trailing
/// whitespace (so that a pure call sends no content at all).
pub fn streamable_len(format: ToolFormat, text_so_far: &str) -> usize {
    let trimmed = text_so_far.trim_start();
    if trimmed.is_empty()
        || trimmed.starts_with('{')
        || trimmed.starts_with('[')
        || trimmed.starts_with("```")
        || "```".starts_with(trimmed)
    {
        return 0;
    }
    let mut end = text_so_far.len();
    if let Some(marker) = format.marker() {
        if let Some(at) = text_so_far.find(marker) {
            end = at;
        } else if let Some(at) = partial_suffix(text_so_far, marker) {
            end = at;
        }
    }
    text_so_far[..end].trim_end().len()
}

/// Where a suffix of `text` that is a proper prefix of `marker` starts.
fn partial_suffix(text: &str, marker: &str) -> Option<usize> {
    (1..marker.len())
        .rev()
        .filter(|&k| marker.is_char_boundary(k))
        .find(|&k| text.ends_with(&marker[..k]))
        .map(|k| text.len() - k)
}

fn parse_hermes(text: &str) -> Option<Parsed> {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(HERMES_OPEN) {
        content.push_str(&rest[..at]);
        let after = &rest[at + HERMES_OPEN.len()..];
        let (body, next) = match after.find(HERMES_CLOSE) {
            Some(close) => (&after[..close], &after[close + HERMES_CLOSE.len()..]),
            None => (after, ""),
        };
        match json_calls(body.trim()) {
            Some(found) => calls.extend(found),
            None => content.push_str(&rest[at..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    Some(Parsed {
        content: content.trim().to_owned(),
        tool_calls: calls,
    })
}

fn parse_llama3(text: &str) -> Option<Parsed> {
    if let Some(at) = text.find(PYTHON_TAG) {
        let code = text[at + PYTHON_TAG.len()..].trim();
        let calls = json_calls(code).unwrap_or_else(|| {
            let mut arguments = Map::new();
            arguments.insert("code".into(), Value::String(code.to_owned()));
            vec![ToolCall {
                name: "python".into(),
                arguments: Value::Object(arguments).to_string(),
            }]
        });
        return Some(Parsed {
            content: text[..at].trim().to_owned(),
            tool_calls: calls,
        });
    }
    // Llama 3.2 separates several calls with ";".
    let trimmed = text.trim();
    let calls = trimmed
        .split(';')
        .map(|part| json_calls(part.trim()))
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    Some(Parsed {
        content: String::new(),
        tool_calls: calls,
    })
}

fn parse_mistral(text: &str) -> Option<Parsed> {
    let at = text.find(MISTRAL_MARK)?;
    let calls = json_calls(text[at + MISTRAL_MARK.len()..].trim())?;
    Some(Parsed {
        content: text[..at].trim().to_owned(),
        tool_calls: calls,
    })
}

/// The whole answer as one JSON value of call shape (in a code fence or not).
fn parse_whole_json(text: &str) -> Option<Vec<ToolCall>> {
    json_calls(strip_fence(text.trim()))
}

/// llama.cpp's generic format lets a model answer `{"response": "..."}`.
fn generic_response(text: &str) -> Option<String> {
    let value: Value = serde_json::from_str(strip_fence(text.trim())).ok()?;
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.get("response")?.as_str().map(str::to_owned)
}

fn strip_fence(text: &str) -> &str {
    let Some(inner) = text.strip_prefix("```") else {
        return text;
    };
    let inner = inner.strip_suffix("```").unwrap_or(inner);
    // The fence's first line names the language (```json).
    match inner.split_once('\n') {
        Some((lang, body)) if !lang.trim_start().starts_with(['{', '[']) => body.trim(),
        _ => inner.trim(),
    }
}

/// Text that is exactly one JSON value holding calls, or `None`.
fn json_calls(text: &str) -> Option<Vec<ToolCall>> {
    let value: Value = serde_json::from_str(text).ok()?;
    calls_in(&value)
}

/// The calls a JSON value holds: a call object, an array of them, or
/// `{"tool_calls": [...]}` / `{"tool_call": {...}}`.
fn calls_in(value: &Value) -> Option<Vec<ToolCall>> {
    match value {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_object).collect(),
        Value::Object(object) => {
            if let Some(list) = object.get("tool_calls") {
                return match list {
                    Value::Array(items) if !items.is_empty() => {
                        items.iter().map(call_object).collect()
                    }
                    _ => None,
                };
            }
            if let Some(one) = object.get("tool_call") {
                return call_object(one).map(|c| vec![c]);
            }
            call_object(value).map(|c| vec![c])
        }
        _ => None,
    }
}

/// `{"name", "arguments"|"parameters"}`, or OpenAI's `{"function": {...}}`.
fn call_object(value: &Value) -> Option<ToolCall> {
    let object = value.as_object()?;
    if let Some(function) = object.get("function").filter(|f| f.is_object()) {
        return call_object(function);
    }
    let name = object.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(_) => s.clone(),
            Err(_) => Value::String(s.clone()).to_string(),
        },
        Some(other) => other.to_string(),
    };
    Some(ToolCall {
        name: name.to_owned(),
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN: &str = include_str!("testdata/qwen2.5.jinja");
    const LLAMA: &str = include_str!("testdata/llama3.1.jinja");
    const MISTRAL: &str = include_str!("testdata/mistral-v0.3.jinja");
    const GEMMA: &str = include_str!("testdata/gemma3.jinja");
    const SMOLLM2: &str = include_str!("testdata/smollm2.jinja");

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn detects_the_family_from_the_template() {
        let got = [QWEN, LLAMA, MISTRAL, GEMMA, SMOLLM2].map(ToolFormat::detect);
        assert_eq!(
            got,
            [
                ToolFormat::Hermes,
                ToolFormat::Llama3,
                ToolFormat::Mistral,
                ToolFormat::Generic,
                ToolFormat::Generic
            ]
        );
    }

    #[test]
    fn parses_hermes_calls_and_keeps_the_content_around_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(
            parse(ToolFormat::Hermes, text),
            Parsed {
                content: "Let me check.".into(),
                tool_calls: vec![
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("get_time", "{}")
                ],
            }
        );
        // A call cut off before its closing tag (max_tokens, a stop word).
        assert_eq!(
            parse(
                ToolFormat::Hermes,
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}"
            ),
            Parsed {
                content: String::new(),
                tool_calls: vec![call("f", r#"{"a":1}"#)],
            }
        );
        // Broken JSON inside the tags stays content.
        let broken = "<tool_call>\n{\"name\": \"f\", \"argu\n</tool_call>";
        assert_eq!(
            parse(ToolFormat::Hermes, broken),
            Parsed {
                content: broken.into(),
                tool_calls: vec![],
            }
        );
    }

    #[test]
    fn parses_llama3_json_and_python_tag() {
        assert_eq!(
            parse(
                ToolFormat::Llama3,
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"
            ),
            Parsed {
                content: String::new(),
                tool_calls: vec![call("get_weather", r#"{"city":"Paris"}"#)],
            }
        );
        assert_eq!(
            parse(
                ToolFormat::Llama3,
                "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": true}}"
            ),
            Parsed {
                content: String::new(),
                tool_calls: vec![call("a", "{}"), call("b", r#"{"x":true}"#)],
            }
        );
        assert_eq!(
            parse(ToolFormat::Llama3, "<|python_tag|>print(1 + 1)"),
            Parsed {
                content: String::new(),
                tool_calls: vec![call("python", r#"{"code":"print(1 + 1)"}"#)],
            }
        );
        assert_eq!(
            parse(ToolFormat::Llama3, "The answer is {1, 2}."),
            Parsed {
                content: "The answer is {1, 2}.".into(),
                tool_calls: vec![],
            }
        );
    }

    #[test]
    fn parses_mistral_calls_with_or_without_the_space() {
        for text in [
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abcDEF123\"}]",
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
        ] {
            assert_eq!(
                parse(ToolFormat::Mistral, text),
                Parsed {
                    content: String::new(),
                    tool_calls: vec![call("get_weather", r#"{"city":"Paris"}"#)],
                }
            );
        }
    }

    #[test]
    fn parses_the_generic_json_shapes() {
        let cases = [
            r#"{"name": "f", "arguments": {"a": 1}}"#,
            r#"{"tool_call": {"name": "f", "arguments": {"a": 1}}}"#,
            r#"{"tool_calls": [{"name": "f", "arguments": "{\"a\":1}"}]}"#,
            "```json\n{\"name\": \"f\", \"parameters\": {\"a\": 1}}\n```",
            r#"[{"function": {"name": "f", "arguments": {"a": 1}}}]"#,
        ];
        let got: Vec<Parsed> = cases
            .iter()
            .map(|t| parse(ToolFormat::Generic, t))
            .collect();
        let want: Vec<Parsed> = cases
            .iter()
            .map(|_| Parsed {
                content: String::new(),
                tool_calls: vec![call("f", r#"{"a":1}"#)],
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            parse(ToolFormat::Generic, r#"{"response": "Hello!"}"#),
            Parsed {
                content: "Hello!".into(),
                tool_calls: vec![],
            }
        );
        // JSON that is not a call is content, unchanged.
        assert_eq!(
            parse(ToolFormat::Generic, " {\"city\": \"Paris\"}\n"),
            Parsed {
                content: " {\"city\": \"Paris\"}\n".into(),
                tool_calls: vec![],
            }
        );
        // A Qwen model that forgot its tags is still understood.
        assert_eq!(
            parse(
                ToolFormat::Hermes,
                r#"{"name": "f", "arguments": {"a": 1}}"#
            ),
            Parsed {
                content: String::new(),
                tool_calls: vec![call("f", r#"{"a":1}"#)],
            }
        );
    }

    #[test]
    fn holds_back_what_may_become_a_call() {
        let cases: &[(ToolFormat, &str, usize)] = &[
            (ToolFormat::Hermes, "", 0),
            (ToolFormat::Hermes, "\n ", 0),
            (ToolFormat::Hermes, "<tool", 0),
            (ToolFormat::Hermes, "Hello", 5),
            (ToolFormat::Hermes, "Hello <tool_c", 5),
            (ToolFormat::Hermes, "Hello <toolbox>", 15),
            (ToolFormat::Hermes, "Hi.\n<tool_call>\n{\"na", 3),
            (ToolFormat::Hermes, "Hi there \n", 8),
            (ToolFormat::Mistral, "[TOOL_", 0),
            (ToolFormat::Mistral, "Sure [TOOL_CALLS] [", 4),
            (ToolFormat::Llama3, "<|python", 0),
            (ToolFormat::Llama3, "{\"name\": ", 0),
            (ToolFormat::Generic, " {", 0),
            (ToolFormat::Generic, "``", 0),
            (ToolFormat::Generic, "The sky", 7),
        ];
        let got: Vec<(ToolFormat, &str, usize)> = cases
            .iter()
            .map(|&(f, t, _)| (f, t, streamable_len(f, t)))
            .collect();
        assert_eq!(got, cases.to_vec());
        assert!(may_start_tool_call(ToolFormat::Hermes, "Hello <tool_c"));
        assert!(!may_start_tool_call(ToolFormat::Hermes, "Hello"));
    }

    #[test]
    fn streamed_prefix_and_final_parse_fit_together() {
        let text = "Checking. <tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let mut sent = 0;
        for end in 1..=text.len() {
            if text.is_char_boundary(end) {
                sent = sent.max(streamable_len(ToolFormat::Hermes, &text[..end]));
            }
        }
        assert_eq!(&text[..sent], "Checking.");
        let parsed = parse(ToolFormat::Hermes, text);
        assert_eq!(parsed.content_after(&text[..sent]), "");
        assert_eq!(parsed.tool_calls, vec![call("f", "{}")]);

        let plain = "  Just text. ";
        let sent = streamable_len(ToolFormat::Hermes, plain);
        assert_eq!(
            parse(ToolFormat::Hermes, plain).content_after(&plain[..sent]),
            " "
        );
    }

    #[test]
    fn renders_calls_the_way_each_family_emits_them() {
        let calls = vec![(
            "get_weather".to_owned(),
            JValue::from_serialize(serde_json::json!({"city": "Paris"})),
        )];
        let got = [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ]
        .map(|f| f.render_calls(&calls));
        assert_eq!(
            got,
            [
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>".to_owned(),
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}".to_owned(),
                "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]".to_owned(),
                "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}".to_owned(),
            ]
        );
        // And what is rendered parses back.
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ] {
            let two = vec![
                calls[0].clone(),
                (
                    "now".to_owned(),
                    JValue::from_serialize(serde_json::json!({})),
                ),
            ];
            assert_eq!(
                parse(format, &format.render_calls(&two)).tool_calls,
                vec![
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("now", "{}")
                ],
                "{format:?}"
            );
        }
    }
}

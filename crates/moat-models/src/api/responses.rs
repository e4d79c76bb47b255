//! OpenAI's Responses API (`POST /v1/responses`), which Codex speaks and
//! nothing else: the request's items become chat messages for the same
//! generation as chat completions, and the answer goes back as output items
//! (a message, function calls), streamed as the Responses events
//! (`response.created` … `response.output_text.delta` … `response.completed`).
//! Nothing is stored: `previous_response_id` is refused, as a server with
//! `store: false` would.

use std::sync::Arc;

use hyper::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::generation::{random_hex, ChatInput, Out, Summary, ToolCall};
use super::http::{self, ApiError, Body, Dialect};
use super::openai::{parse_response_format, parse_tool_choice};
use super::ModelService;

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: String,
    input: Value,
    instructions: Option<String>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    #[serde(default)]
    stream: bool,
    max_output_tokens: Option<u32>,
    /// temperature and top_p (and llama-server's extensions), checked as chat's are.
    #[serde(flatten)]
    sampling: super::openai::SamplingFields,
    text: Option<TextOptions>,
    previous_response_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TextOptions {
    format: Option<Value>,
}

pub async fn create(
    svc: &Arc<ModelService>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = http::read_body(req.into_body()).await?;
    let r: ResponsesRequest = http::parse(&body)?;
    if r.previous_response_id.is_some() {
        return Err(ApiError::bad_request(
            "invalid field `previous_response_id`: the model runner keeps no responses; send the whole conversation in `input`",
        ));
    }
    let messages = messages(r.instructions, &r.input)?;
    if !messages.iter().any(|m| m["role"] != "system") {
        return Err(ApiError::bad_request("invalid field `input`: it is empty"));
    }
    let mut input = ChatInput::new(r.model.clone(), messages);
    input.sampling = r.sampling.sampling()?;
    input.ignore_eos = r.sampling.ignore_eos;
    input.tools = r.tools.iter().filter_map(chat_tool).collect();
    input.tool_choice = parse_tool_choice(chat_tool_choice(r.tool_choice).as_ref())?;
    input.response_format =
        parse_response_format(r.text.and_then(|t| t.format).map(chat_format).as_ref())?;
    input.max_tokens = r.max_output_tokens;
    let mut gen = svc.start_chat(input).await?;
    let mut answer = Answer::new(r.model);
    if !r.stream {
        let (text, calls, summary) = gen.collect(svc).await?;
        answer.text(&text);
        answer.calls(&calls);
        return Ok(http::ok_json(&answer.response("completed", Some(&summary))));
    }
    let (tx, resp) = http::streaming("text/event-stream");
    let svc = svc.clone();
    svc.clone().runtime().spawn(async move {
        let mut events = answer.start();
        loop {
            for e in events.drain(..) {
                if tx.send(e).await.is_err() {
                    return; // The client went away: dropping `gen` cancels the request.
                }
            }
            match gen.next(&svc).await {
                Some(Ok(Out::Text(text))) => events = answer.text(&text),
                Some(Ok(Out::ToolCalls(calls))) => events = answer.calls(&calls),
                Some(Ok(Out::Done(summary))) => {
                    events = answer.finish(&summary);
                    for e in events.drain(..) {
                        let _ = tx.send(e).await;
                    }
                    return;
                }
                Some(Err(e)) => {
                    let body = e.body(Dialect::OpenAi);
                    let _ = tx.send(answer.failed(&body)).await;
                    return;
                }
                None => return,
            }
        }
    });
    Ok(resp)
}

/// The request's `instructions` and `input` as OpenAI chat messages.
fn messages(instructions: Option<String>, input: &Value) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        out.push(json!({"role": "system", "content": text}));
    }
    let items = match input {
        Value::String(text) => {
            return Ok([out, vec![json!({"role": "user", "content": text})]].concat())
        }
        Value::Array(items) => items,
        _ => {
            return Err(ApiError::bad_request(
                "invalid field `input`: expected a string or an array of items",
            ))
        }
    };
    for (i, item) in items.iter().enumerate() {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let role = match role {
                    "user" | "assistant" | "system" => role,
                    // Chat templates know no `developer`; it is the system's voice.
                    "developer" => "system",
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "invalid field `input[{i}].role`: unknown role {other:?}"
                        )))
                    }
                };
                out.push(json!({"role": role, "content": content_text(item.get("content"))}));
            }
            "function_call" => {
                let call = json!({
                    "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": item.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": item.get("arguments").cloned().unwrap_or(json!("{}")),
                    },
                });
                // Consecutive calls belong to one assistant turn.
                match out.last_mut() {
                    Some(last)
                        if last["role"] == "assistant" && last.get("tool_calls").is_some() =>
                    {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => {
                        out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}))
                    }
                }
            }
            "function_call_output" => out.push(json!({
                "role": "tool",
                "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                "content": match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => content_text(Some(other)),
                    None => String::new(),
                },
            })),
            // Reasoning the model did not do, and items of tools it does not have.
            _ => {}
        }
    }
    Ok(out)
}

/// A message's content as plain text: a string, or its text parts joined.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A Responses function tool (`{"type": "function", "name": …}`) as a chat
/// tool; tools that are not functions (web search, …) are not the model's.
fn chat_tool(tool: &Value) -> Option<Value> {
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return None;
    }
    Some(json!({
        "type": "function",
        "function": {
            "name": tool.get("name")?,
            "description": tool.get("description").cloned().unwrap_or(json!("")),
            "parameters": tool.get("parameters").cloned().unwrap_or(json!({"type": "object"})),
        },
    }))
}

/// `{"type": "function", "name": N}` as chat's `{"type": "function", "function": {"name": N}}`.
fn chat_tool_choice(choice: Option<Value>) -> Option<Value> {
    match choice {
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            Some(
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}}),
            )
        }
        other => other,
    }
}

/// `text.format` (`{"type": "json_schema", "name", "schema"}`) as chat's `response_format`.
fn chat_format(format: Value) -> Value {
    match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": {
            "name": format.get("name").cloned().unwrap_or(json!("response")),
            "schema": format.get("schema").cloned().unwrap_or(json!({})),
        }}),
        _ => format,
    }
}

/// The response being built, and the events that tell a streaming client about it.
struct Answer {
    id: String,
    model: String,
    created: i64,
    /// Output items so far; the text message, when there is one, is open
    /// (its text growing) until a call or the end closes it.
    output: Vec<Value>,
    open_text: Option<usize>,
    sequence: u64,
}

impl Answer {
    fn new(model: String) -> Answer {
        Answer {
            id: format!("resp_{}", random_hex(24)),
            model,
            created: http::unix_now(),
            output: Vec::new(),
            open_text: None,
            sequence: 0,
        }
    }

    fn event(&mut self, kind: &str, mut data: Value) -> bytes::Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        http::sse(Some(kind), &data)
    }

    fn response(&self, status: &str, summary: Option<&Summary>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": self.output, "parallel_tool_calls": true,
            "tool_choice": "auto", "tools": [], "store": false, "error": null,
            "incomplete_details": null,
        });
        if let Some(s) = summary {
            r["usage"] = json!({
                "input_tokens": s.prompt_tokens,
                "input_tokens_details": {"cached_tokens": s.timings.cache_n},
                "output_tokens": s.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": s.prompt_tokens + s.completion_tokens,
            });
            r["timings"] = json!(s.timings);
            if s.finish == super::generation::FinishReason::Length {
                r["status"] = json!("incomplete");
                r["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
        }
        r
    }

    fn start(&mut self) -> Vec<bytes::Bytes> {
        let r = self.response("in_progress", None);
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// More text: opens the message item on the first piece.
    fn text(&mut self, text: &str) -> Vec<bytes::Bytes> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        let index = match self.open_text {
            Some(i) => i,
            None => {
                let item = json!({"type": "message", "id": format!("msg_{}", random_hex(24)),
                    "status": "in_progress", "role": "assistant",
                    "content": [{"type": "output_text", "text": "", "annotations": []}]});
                self.output.push(item.clone());
                let i = self.output.len() - 1;
                self.open_text = Some(i);
                let mut added = item;
                added["content"] = json!([]);
                events.push(self.event(
                    "response.output_item.added",
                    json!({"output_index": i, "item": added}),
                ));
                let id = self.output[i]["id"].clone();
                events.push(self.event("response.content_part.added", json!({"item_id": id, "output_index": i,
                    "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})));
                i
            }
        };
        let so_far = self.output[index]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.output[index]["content"][0]["text"] = json!(so_far + text);
        let id = self.output[index]["id"].clone();
        events.push(self.event(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index,
            "content_index": 0, "delta": text, "logprobs": []}),
        ));
        events
    }

    /// Closes the open message item, if any.
    fn close_text(&mut self) -> Vec<bytes::Bytes> {
        let Some(i) = self.open_text.take() else {
            return Vec::new();
        };
        self.output[i]["status"] = json!("completed");
        let item = self.output[i].clone();
        let id = item["id"].clone();
        let part = item["content"][0].clone();
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": i,
                "content_index": 0, "text": part["text"], "logprobs": []}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": i,
                "content_index": 0, "part": part}),
            ),
            self.event(
                "response.output_item.done",
                json!({"output_index": i, "item": item}),
            ),
        ]
    }

    fn calls(&mut self, calls: &[ToolCall]) -> Vec<bytes::Bytes> {
        let mut events = self.close_text();
        for call in calls {
            let item = json!({"type": "function_call", "id": format!("fc_{}", random_hex(24)),
                "call_id": call.id, "name": call.name, "arguments": call.arguments, "status": "completed"});
            self.output.push(item.clone());
            let i = self.output.len() - 1;
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": i, "item": added}),
            ));
            events.push(self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": item["id"],
                "output_index": i, "delta": call.arguments}),
            ));
            events.push(self.event(
                "response.function_call_arguments.done",
                json!({"item_id": item["id"],
                "output_index": i, "arguments": call.arguments}),
            ));
            events.push(self.event(
                "response.output_item.done",
                json!({"output_index": i, "item": item}),
            ));
        }
        events
    }

    fn finish(&mut self, summary: &Summary) -> Vec<bytes::Bytes> {
        let mut events = self.close_text();
        let r = self.response("completed", Some(summary));
        let kind = if r["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        events.push(self.event(kind, json!({"response": r})));
        events
    }

    fn failed(&mut self, error: &Value) -> bytes::Bytes {
        let mut r = self.response("failed", None);
        let message = error["error"]["message"].clone();
        r["error"] = json!({"code": "server_error", "message": message});
        self.event("response.failed", json!({"response": r}))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_messages() {
        let input = json!([
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list"}, {"type": "input_text", "text": "files"}]},
            {"type": "reasoning", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "pwd", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "a b"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]},
        ]);
        let got = messages(Some("Instructions.".into()), &input).unwrap();
        assert_eq!(
            got,
            vec![
                json!({"role": "system", "content": "Instructions."}),
                json!({"role": "system", "content": "Be brief."}),
                json!({"role": "user", "content": "list\nfiles"}),
                json!({"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "pwd", "arguments": "{}"}},
                ]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "a b"}),
                json!({"role": "assistant", "content": "done"}),
            ]
        );
        assert_eq!(
            messages(None, &json!("hi")).unwrap(),
            vec![json!({"role": "user", "content": "hi"})]
        );
        assert!(messages(None, &json!(3)).is_err());
        assert!(messages(
            None,
            &json!([{"type": "message", "role": "robot", "content": "x"}])
        )
        .is_err());
    }

    #[test]
    fn tools_and_choices_take_the_chat_shape() {
        let tool = json!({"type": "function", "name": "exec", "description": "run", "parameters": {"type": "object"}, "strict": false});
        assert_eq!(
            chat_tool(&tool),
            Some(
                json!({"type": "function", "function": {"name": "exec", "description": "run", "parameters": {"type": "object"}}})
            )
        );
        assert_eq!(chat_tool(&json!({"type": "web_search"})), None);
        assert_eq!(
            chat_tool_choice(Some(json!({"type": "function", "name": "exec"}))),
            Some(json!({"type": "function", "function": {"name": "exec"}}))
        );
        assert_eq!(
            chat_tool_choice(Some(json!("required"))),
            Some(json!("required"))
        );
        assert_eq!(
            chat_format(json!({"type": "json_schema", "name": "x", "schema": {"type": "object"}})),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
        );
    }

    fn events(bytes: &[bytes::Bytes]) -> Vec<(String, Value)> {
        bytes
            .iter()
            .map(|b| {
                let text = String::from_utf8(b.to_vec()).unwrap();
                let mut lines = text.lines();
                let name = lines
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_string();
                let data: Value =
                    serde_json::from_str(lines.next().unwrap().trim_start_matches("data: "))
                        .unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_streamed_answer_is_the_responses_event_sequence() {
        let mut a = Answer::new("m".into());
        let mut all = a.start();
        all.extend(a.text("Hel"));
        all.extend(a.text("lo"));
        all.extend(a.calls(&[ToolCall {
            id: "call_1".into(),
            name: "ls".into(),
            arguments: "{\"d\":1}".into(),
        }]));
        let summary = Summary {
            finish: super::super::generation::FinishReason::ToolCalls,
            stop_word: None,
            prompt_tokens: 7,
            completion_tokens: 3,
            timings: Default::default(),
        };
        all.extend(a.finish(&summary));
        let got = events(&all);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (name, data)) in got.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i as u64);
        }
        let done = &got.last().unwrap().1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(done["output"][1]["arguments"], "{\"d\":1}");
        assert_eq!(done["usage"]["total_tokens"], 10);
    }
}

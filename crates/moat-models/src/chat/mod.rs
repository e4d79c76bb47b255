//! Chat: turning an OpenAI-shaped conversation into the exact prompt text a
//! model was trained on, and the model's answer back into content and tool
//! calls.
//!
//! Every API moat serves (OpenAI, Anthropic, Ollama, Docker Model Runner) is
//! first converted into OpenAI-shaped messages, so this module is the one
//! place that knows about chat formats. It has three parts:
//!
//! - [`template`]: the Jinja chat template from the GGUF, rendered with
//!   `minijinja` the way Hugging Face's `apply_chat_template` does it, with
//!   the helpers templates call and with polyfills for what a template cannot
//!   express (tools for a template that has none, tool results for a template
//!   that only knows user and assistant turns). A model without a template
//!   gets ChatML.
//! - [`tools`]: the tool-call syntax a model family emits (Hermes/Qwen
//!   `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]`, plain JSON),
//!   detected from the template, parsed out of the generated text, and
//!   recognised early while streaming so that a call is never streamed as
//!   content.
//! - [`grammar`]: llama.cpp GBNF grammars that force JSON matching a schema
//!   (`response_format`) or a call of the allowed tools in the model's own
//!   syntax (`tool_choice: "required"` or a named function), so that even a
//!   135M model answers with something the API can return.

pub mod grammar;
#[cfg(test)]
pub(crate) mod model_tests;
mod pyjson;
pub mod template;
pub mod tools;

pub use grammar::{json_object_gbnf, json_schema_to_gbnf, tool_call_gbnf, ToolChoice};
pub use template::{render, Capabilities, ChatTemplate, RenderContext, RenderOptions, CHATML};
pub use tools::{Parsed, ToolCall, ToolFormat};

/// The steps (MiniJinja's fuel, about one per template instruction) one
/// render may take unless configured otherwise. Known templates take a
/// few dozen per message, so this is tens of thousands of messages' worth,
/// and a fraction of a second.
pub const DEFAULT_TEMPLATE_STEPS: u64 = 20_000_000;

/// Why a conversation could not be turned into a prompt, or a grammar could
/// not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    /// The template text is not valid Jinja (as minijinja reads it).
    #[error("the model's chat template is not valid Jinja: {0}; give the model a working template (`moat model package --chat-template FILE`)")]
    TemplateSyntax(String),
    /// The template failed while rendering (an unknown filter, a type error).
    #[error("rendering the model's chat template failed: {0}")]
    TemplateRender(String),
    /// The render took more steps than allowed.
    #[error("the chat template took more than {0} steps for this request: send fewer or shorter messages, or raise the limit ([models] template_steps, MOAT_MODELS_TEMPLATE_STEPS)")]
    TooManySteps(u64),
    /// The template itself refused the conversation with `raise_exception`,
    /// for instance because roles do not alternate user/assistant.
    #[error("the model's chat template refused the conversation: {0}")]
    Refused(String),
    /// A message is not an OpenAI-shaped chat message.
    #[error("messages[{index}]: {reason}")]
    InvalidMessage { index: usize, reason: String },
    /// A tool definition is not an OpenAI-shaped function tool.
    #[error("tools[{index}]: {reason}")]
    InvalidTool { index: usize, reason: String },
    /// `tool_choice` names a function that is not among the tools.
    #[error("tool_choice names the function {0:?}, which is not among the request's tools")]
    UnknownTool(String),
    /// `tool_choice: "required"` with no tools to choose from.
    #[error("tool_choice is \"required\" but the request has no tools")]
    NoTools,
    /// A JSON schema that cannot be turned into a grammar.
    #[error("the JSON schema cannot be used: {0}")]
    Schema(String),
}

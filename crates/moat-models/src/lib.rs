//! moat-models: the model runner. A store of GGUF models in Docker Model
//! Runner's layout, whose every file is checked in safe Rust ([`gguf`])
//! before llama.cpp may open it; the [`engine`], llama.cpp in one worker
//! process per loaded model with continuous batching over several slots and
//! a prefix cache; chat templates, tool calls and grammars; and the HTTP
//! APIs of Docker Model Runner, OpenAI, Anthropic and Ollama in front.

pub mod api;
pub mod chat;
pub mod engine;
pub mod gguf;
pub mod store;

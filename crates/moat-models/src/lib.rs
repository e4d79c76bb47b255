//! moat-models: the model runner's parts that need no engine. Today that
//! is the GGUF header reader, which checks every model file in safe Rust
//! before llama.cpp is allowed to open it (a corrupt or truncated file must
//! be refused with a reason, not crash a worker). The store in Docker Model
//! Runner's layout, the llama.cpp workers and the HTTP APIs build on it.

pub mod gguf;

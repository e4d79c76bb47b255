//! The engine: llama.cpp in worker processes. [`worker`] is the process
//! that owns a model and schedules its slots; [`supervisor`] is the
//! runner's side that starts, feeds and watches the workers; [`protocol`]
//! is what they say to each other; [`text`] turns tokens into the text a
//! client may see; [`tokens`] turns prompts into tokens in linear time.

mod cores;
pub mod prompt_cache;
pub mod protocol;
pub mod supervisor;
mod text;
mod tokens;
pub mod worker;

pub use protocol::{Finish, FromWorker, Generate, Loaded, Sampling, Timings};
pub use supervisor::{LoadedModel, ModelToLoad, Request, Runner, RunnerConfig, Worker};
pub use worker::{worker_main, ROLE};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    NoMemory(String),
    #[error("{0}")]
    WorkerGone(String),
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
}

impl EngineError {
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        EngineError::Io {
            what: what.into(),
            err,
        }
    }
}

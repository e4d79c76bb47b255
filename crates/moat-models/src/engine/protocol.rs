//! What the runner and a model worker say to each other over their socket
//! pair: length-prefixed JSON frames (a u32 big-endian length, then the
//! JSON). The worker is a separate process so that a crash inside llama.cpp
//! costs only the requests in flight on that model; everything it needs to
//! know arrives in these messages, and everything it does leaves in them.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Frames larger than this are refused: a prompt of 64 MiB is not a prompt.
pub const MAX_FRAME: usize = 64 << 20;

/// The first frame the runner sends: what to load and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadSpec {
    /// The GGUF files in shard order; llama.cpp opens the first and finds
    /// the rest by their split names, so the runner links them side by side.
    pub gguf: std::path::PathBuf,
    /// Tokens of context: one cache that the slots share (llama.cpp's
    /// unified KV cache), so one request may use all of it.
    pub context_size: u32,
    /// Sequences decoded together.
    pub slots: u32,
    pub threads: i32,
    /// Tokens per decode call (llama-server's `--batch-size`).
    pub batch: u32,
    /// Tokens per physical micro-batch (llama-server's `--ubatch-size`).
    pub ubatch: u32,
    /// The file every worker of the runner locks while it decodes, so that
    /// two models take turns on the cores (see `cores.rs`).
    #[serde(default)]
    pub cores_lock: Option<std::path::PathBuf>,
    /// Where the worker saves its slots' prefixes when it ends and finds
    /// them when it starts (`prompt_cache.rs`); `None`: no disk cache.
    #[serde(default)]
    pub prompt_cache: Option<PromptCacheSpec>,
}

/// The prompt cache a worker uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptCacheSpec {
    /// The cache of every model; each has a folder in it.
    pub root: std::path::PathBuf,
    /// Bytes the whole cache may hold; least recently used prefixes go.
    pub max_bytes: u64,
    /// The model's digest: a file of another model is never read.
    pub model: String,
}

/// What the worker reports once the model is loaded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Loaded {
    pub context_size: u32,
    pub context_train: u32,
    pub vocab: i32,
    pub embedding_length: i32,
    pub params: u64,
    pub size: u64,
    pub load_ms: f64,
    /// `tokenizer.chat_template` from the GGUF, if it has one.
    pub chat_template: Option<String>,
    /// The texts of the begin- and end-of-sequence tokens, for templates.
    pub bos: String,
    pub eos: String,
}

/// Sampling settings of one request, already checked by the API layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: Option<u32>,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for Sampling {
    /// llama-server's defaults.
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// One generation: a prompt (already templated) and when to stop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Generate {
    pub id: u64,
    pub prompt: String,
    /// Tokens to generate at most; `None` means up to the context's end.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub sampling: Sampling,
    /// A GBNF grammar (root rule `root`) that constrains every token.
    pub grammar: Option<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Write special tokens as text: tool-call markers such as Llama's
    /// `<|python_tag|>` and Mistral's `[TOOL_CALLS]` are special tokens.
    #[serde(default)]
    pub special: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ToWorker {
    Load(LoadSpec),
    Generate(Generate),
    /// The client went away: free the slot now (its cache stays).
    Cancel {
        id: u64,
    },
    Tokenize {
        id: u64,
        text: String,
        special: bool,
    },
    Embed {
        id: u64,
        inputs: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
    Cancelled,
}

/// llama-server's `timings` object, field for field.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub cache_n: u32,
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_token_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_token_ms: f64,
    pub predicted_per_second: f64,
}

impl Timings {
    pub fn new(
        cache_n: u32,
        prompt_n: u32,
        prompt_ms: f64,
        predicted_n: u32,
        predicted_ms: f64,
    ) -> Self {
        let per_token = |ms: f64, n: u32| if n == 0 { 0.0 } else { ms / f64::from(n) };
        let per_second = |ms: f64, n: u32| {
            if ms <= 0.0 {
                0.0
            } else {
                1e3 / ms * f64::from(n)
            }
        };
        Timings {
            cache_n,
            prompt_n,
            prompt_ms,
            prompt_per_token_ms: per_token(prompt_ms, prompt_n),
            prompt_per_second: per_second(prompt_ms, prompt_n),
            predicted_n,
            predicted_ms,
            predicted_per_token_ms: per_token(predicted_ms, predicted_n),
            predicted_per_second: per_second(predicted_ms, predicted_n),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FromWorker {
    Loaded(Loaded),
    /// Loading failed; the worker exits after sending this.
    LoadFailed {
        error: String,
    },
    /// Text generated since the last piece (whole UTF-8 characters, with
    /// anything that could still become a stop string held back).
    Piece {
        id: u64,
        text: String,
    },
    Done {
        id: u64,
        finish: Finish,
        /// Tokens in the whole prompt (cached ones included).
        prompt_tokens: u32,
        completion_tokens: u32,
        timings: Timings,
        /// The stop string that ended it, if one did.
        #[serde(default)]
        stop_word: Option<String>,
    },
    /// The request failed; `status` is the HTTP status it deserves.
    Failed {
        id: u64,
        status: u16,
        error: String,
    },
    Tokens {
        id: u64,
        tokens: Vec<i32>,
    },
    Embeddings {
        id: u64,
        vectors: Vec<Vec<f32>>,
        tokens: u32,
    },
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Read one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ToWorker::Generate(Generate {
            id: 7,
            prompt: "hi".into(),
            max_tokens: Some(3),
            stop: vec!["\n".into()],
            sampling: Sampling::default(),
            grammar: None,
            ignore_eos: false,
            special: false,
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &ToWorker::Cancel { id: 7 }).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), Some(msg));
        assert_eq!(
            read_frame::<ToWorker>(&mut r).unwrap(),
            Some(ToWorker::Cancel { id: 7 })
        );
        assert_eq!(read_frame::<ToWorker>(&mut r).unwrap(), None);
    }

    #[test]
    fn timings_are_derived_like_llama_server() {
        let t = Timings::new(3, 10, 20.0, 4, 8.0);
        assert_eq!(t.prompt_per_token_ms, 2.0);
        assert_eq!(t.prompt_per_second, 500.0);
        assert_eq!(t.predicted_per_second, 500.0);
    }
}
